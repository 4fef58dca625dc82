/**
 * The buffer budget's rules on their own (src/nbd/limits.ts), driven by a
 * seeded simulation: users that never give bytes back (slow readers) and
 * users that do, taking 1 MiB requests whenever the budget lets them. The
 * bound (1.5 x limit plus one request per user) must hold at every step,
 * clients that give bytes back must keep getting requests, and waiters must
 * be resumed oldest first.
 */
import t from 'tap';
import { BufferBudget, type BudgetUser } from '../../src/nbd/limits.js';
import { rng } from '../helpers/tools.js';

const MiB = 1024 * 1024;

class User implements BudgetUser {
  buffered = 0;
  resumed = 0;
  constructor(
    readonly name: string,
    private readonly budget: BufferBudget,
  ) {}
  resumeFromBudget(): void {
    this.resumed++;
  }
  /** Takes one request if the budget lets it; else waits. */
  take(bytes: number): boolean {
    if (this.budget.mustWait(this.buffered)) {
      this.budget.wait(this);
      return false;
    }
    this.buffered += bytes;
    this.budget.charge(bytes);
    return true;
  }
  give(bytes: number): void {
    this.buffered -= bytes;
    this.budget.release(bytes);
  }
}

const tick = () => new Promise<void>((r) => queueMicrotask(r));

t.test('the bound holds with slow readers and busy clients, and clients that give bytes back keep going', async (t) => {
  for (const seed of [1, 2, 3, 4, 5]) {
    const random = rng(seed);
    const limit = 64 * MiB;
    const users: User[] = [];
    const budget = new BufferBudget(limit, () => users.length);
    for (let i = 0; i < 24; i++) users.push(new User(i % 3 === 0 ? `slow${i}` : `busy${i}`, budget));
    let maxTotal = 0;
    let busyTaken = 0;
    for (let step = 0; step < 20_000; step++) {
      const u = users[Math.floor(random() * users.length)];
      if (u.name.startsWith('slow') || random() < 0.5) {
        if (u.take(MiB) && u.name.startsWith('busy')) busyTaken++;
      } else if (u.buffered > 0) {
        u.give(MiB);
      }
      maxTotal = Math.max(maxTotal, budget.total);
      if (step % 100 === 0) await tick();
    }
    t.ok(maxTotal <= 1.5 * limit + users.length * MiB, `seed ${seed}: the total never passed ${1.5 * limit + users.length * MiB} (max ${maxTotal})`);
    t.ok(busyTaken > 1000, `seed ${seed}: clients that give bytes back keep getting requests (${busyTaken})`);
    const slowHeld = users.filter((u) => u.name.startsWith('slow')).reduce((n, u) => n + u.buffered, 0);
    t.ok(slowHeld <= 1.5 * limit + 8 * MiB, `seed ${seed}: the slow readers together hold ${slowHeld >> 20} MiB, within the bound`);
  }
});

t.test('waiters are resumed oldest first, only once the total is under the limit', async (t) => {
  const users: User[] = [];
  const budget = new BufferBudget(4 * MiB, () => users.length);
  const hog = new User('hog', budget);
  const a = new User('a', budget);
  const b = new User('b', budget);
  users.push(hog, a, b);
  for (let i = 0; i < 6; i++) hog.take(MiB); // hog over the limit on its own: total 6 MiB
  a.buffered = 2 * MiB; // a and b hold their share: both must wait
  b.buffered = 2 * MiB;
  budget.charge(4 * MiB);
  t.ok(budget.mustWait(a.buffered) && budget.mustWait(b.buffered), 'a and b, at their share over the limit, must wait');
  budget.wait(a);
  budget.wait(b);
  t.ok(budget.mustWait(hog.buffered), 'the hog waits too');
  hog.give(MiB);
  await tick();
  t.equal(a.resumed + b.resumed, 0, 'still over the limit: nobody is resumed');
  const order: string[] = [];
  a.resumeFromBudget = () => order.push('a');
  b.resumeFromBudget = () => order.push('b');
  for (let i = 0; i < 5; i++) hog.give(MiB);
  t.equal(order.length, 0, 'resuming waits for a microtask (never inside release)');
  await tick();
  t.same(order, ['a', 'b'], 'under the limit: oldest first');
  t.equal(budget.waiters, 0, 'nobody is left waiting');
  t.notOk(new BufferBudget(0, () => 1).mustWait(10 ** 12), 'limit 0: no daemon-wide limit');
});
