/**
 * Jobs: long work started by a command (blockdev-create, backups)
 * with QEMU's state machine, verbs and JOB_STATUS_CHANGE events
 * (qapi/job.json, job.c).
 *
 * A job subclass implements run(): the work, which calls pausePoint() now
 * and then (where pause takes effect and cancellation is noticed) and
 * reports progress. Optional commit/abort/clean hooks run at finalize, and
 * onConcluding() lets block jobs emit BLOCK_JOB_COMPLETED / CANCELLED.
 *
 *   created -> running -> waiting -> pending -> concluded -> null
 *                 |          \________\__ aborting __/
 *                 +-> paused (and back), ready <-> standby (jobs that have a ready phase)
 */
import { EventEmitter } from 'node:events';
import { VdiskError, toVdiskError } from '../errors.js';
import { logEvent } from '../log.js';

export type JobStatus = 'undefined' | 'created' | 'running' | 'paused' | 'ready' | 'standby' | 'waiting' | 'pending' | 'aborting' | 'concluded' | 'null';
export type JobVerb = 'cancel' | 'pause' | 'resume' | 'set-speed' | 'change' | 'complete' | 'finalize' | 'dismiss';
export type JobType = 'commit' | 'stream' | 'mirror' | 'backup' | 'create' | 'amend' | 'snapshot-load' | 'snapshot-save' | 'snapshot-delete';

/** Allowed moves (QEMU's JobSTT). */
const TRANSITIONS: Record<JobStatus, JobStatus[]> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** States in which each verb is accepted (QEMU's JobVerbTable). */
const VERBS: Record<JobVerb, JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  change: ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

/** strerror(ECANCELED): the error a cancelled job reports. */
export const CANCELED_TEXT = 'Operation canceled';

export interface JobOptions {
  id: string;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
}

/**
 * Jobs that complete together (QEMU's JobTxn): none is finalized before all
 * have finished their work, and one failure cancels the others. A job on its
 * own is a transaction of one. The list is newest first, QEMU's order.
 */
export class JobTxn {
  readonly jobs: Job[] = [];
  aborting = false;
  private pending = false;

  add(job: Job): void {
    job.txn = this;
    this.jobs.unshift(job);
  }

  /** Called when a job's work ends (success, failure or cancel). */
  async jobFinished(job: Job): Promise<void> {
    if (job.failed && !this.aborting) {
      this.aborting = true;
      // Every other job is cancelled, even one that finished and is waiting for the rest.
      for (const other of this.jobs) if (other !== job) other.cancelForTxn();
    }
    if (!this.jobs.every((j) => j.completed)) return;
    if (this.aborting) {
      // finalizeOne ignores a job already being finalized, so reaching this twice is harmless.
      for (const j of [...this.jobs]) await j.finalizeOne(false);
      return;
    }
    // The success path is taken once, by the last job to finish.
    if (this.pending) return;
    this.pending = true;
    for (const j of this.jobs) j.toPending();
    if (this.jobs.every((j) => j.autoFinalize)) await this.finalizeAll();
    else for (const j of this.jobs) j.announcePending();
  }

  /** job-finalize on any job of the transaction finalizes all of them, in list order. */
  async finalizeAll(): Promise<void> {
    for (const j of [...this.jobs]) await j.finalizeOne(true);
  }
}

export abstract class Job {
  abstract readonly type: JobType;
  readonly id: string;
  status: JobStatus = 'undefined';
  autoFinalize: boolean;
  autoDismiss: boolean;
  progressCurrent = 0;
  progressTotal = 0;
  /** Set when the job failed or was cancelled (query-jobs' "error"). */
  error: string | undefined;
  /** A cancel was requested (by the user, or by the transaction). */
  cancelled = false;
  /** The transaction cancelled this job because a sibling failed. */
  private cancelledByTxn = false;
  /** The work has ended (run() settled, or the job never started and was cancelled). */
  completed = false;
  /** The work ended in failure or cancellation. */
  failed = false;
  /** user pauses + error pauses; the job is paused while above zero. */
  pauseCount = 0;
  /** True while run() is between pause points (query-block-jobs' "busy"). */
  busy = false;
  manager!: JobManager;
  txn: JobTxn;
  private resumeWaiters: Array<() => void> = [];
  /** Workers in sleep(): woken early by any verb, so a rate-limited job answers at once. */
  private sleepers = new Set<() => void>();
  private pausedWorkers = 0;
  private beforePause: JobStatus = 'running';
  private finalizing = false;
  private done: Promise<void>;
  private markDone!: () => void;

  constructor(options: JobOptions) {
    this.id = options.id;
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
    this.txn = new JobTxn();
    this.txn.add(this);
    this.done = new Promise((r) => (this.markDone = r));
  }

  /** The work. Throws to fail; should call pausePoint() regularly. */
  protected abstract run(): Promise<void>;
  /** Success, at finalize: make the result visible. */
  protected async commit(): Promise<void> {}
  /** Failure or cancel, at finalize: undo. */
  protected async abort(): Promise<void> {}
  /** Always, at finalize after commit/abort: release what the job held. */
  protected async clean(): Promise<void> {}
  /** Just before 'concluded' (block jobs emit BLOCK_JOB_COMPLETED / CANCELLED here). */
  protected onConcluding(): void {}
  /** When the job waits for job-finalize (block jobs emit BLOCK_JOB_PENDING). */
  protected onPending(): void {}
  /** The error text a failure reports (query-jobs, BLOCK_JOB_COMPLETED). */
  protected errorText(err: unknown): string {
    return toVdiskError(err, 'job').message;
  }

  get isPaused(): boolean {
    return this.pauseCount > 0;
  }

  /** Moves to a new status, refusing moves QEMU's table does not allow (those are bugs). */
  protected transition(to: JobStatus): void {
    // A status change to the same status is no change (QEMU never emits s -> s).
    if (to === this.status) return;
    if (!TRANSITIONS[this.status].includes(to)) {
      throw new VdiskError('EINVAL', `job '${this.id}': illegal status change ${this.status} -> ${to}`);
    }
    this.status = to;
    this.manager.emitEvent('JOB_STATUS_CHANGE', { status: to, id: this.id });
  }

  /** Refuses a verb in the wrong state, with QEMU's message. */
  checkVerb(verb: JobVerb): void {
    if (!VERBS[verb].includes(this.status)) {
      throw new VdiskError('EINVAL', `Job '${this.id}' in state '${this.status}' cannot accept command verb '${verb}'`);
    }
  }

  /** Where pause takes effect and cancellation is noticed (throws ECANCELED). */
  async pausePoint(): Promise<void> {
    if (this.cancelled) throw new VdiskError('ECANCELED', CANCELED_TEXT);
    if (this.pauseCount === 0) return;
    // A job may work with several workers: the first to stop pauses the job, the last to go on resumes it.
    if (this.pausedWorkers++ === 0) {
      this.beforePause = this.status;
      this.transition(this.beforePause === 'ready' ? 'standby' : 'paused');
      this.busy = false;
    }
    while (this.pauseCount > 0 && !this.cancelled) await new Promise<void>((r) => this.resumeWaiters.push(r));
    if (--this.pausedWorkers === 0) {
      this.busy = true;
      this.transition(this.beforePause);
    }
    if (this.cancelled) throw new VdiskError('ECANCELED', CANCELED_TEXT);
  }

  pause(): void {
    this.checkVerb('pause');
    this.pauseCount++;
    // A worker asleep under the speed limit must reach its pause point now, not when the sleep ends.
    this.kick();
  }

  resume(): void {
    this.checkVerb('resume');
    if (this.pauseCount === 0) throw new VdiskError('EINVAL', "Can't resume a job that was not paused");
    this.pauseCount--;
    this.wake();
  }

  protected wake(): void {
    this.kick();
    if (this.pauseCount > 0 && !this.cancelled) return;
    for (const w of this.resumeWaiters.splice(0)) w();
  }

  /**
   * Waits ms milliseconds, or less if kick() comes first (cancel, pause,
   * resume, a new speed): QEMU's job_sleep_ns woken by job_enter. Callers
   * re-check their state afterwards; an early wake-up is never an error.
   */
  protected sleep(ms: number): Promise<void> {
    if (this.cancelled) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.sleepers.delete(done);
        resolve();
      };
      // Timers take at most 2^31-1 ms; a longer wait is cut there and the caller asks again.
      const timer = setTimeout(done, Math.min(Math.max(0, ms), 2 ** 31 - 1));
      this.sleepers.add(done);
    });
  }

  /** Ends every sleep() in progress. */
  protected kick(): void {
    for (const s of [...this.sleepers]) s();
  }

  /** Registered by the manager: undefined -> created. */
  markCreated(): void {
    this.transition('created');
  }

  /** Starts the work (created -> running). */
  start(): void {
    this.transition('running');
    this.busy = true;
    this.run()
      .then(
        () => this.workDone(undefined),
        (err) => this.workDone(err),
      )
      .catch((err) => logEvent('error', 'job-internal-error', { id: this.id, error: (err as Error).stack }));
  }

  /** Resolves when the job has concluded. */
  settled(): Promise<void> {
    return this.done;
  }

  /** job-cancel / block-job-cancel: the job stops at its next pause point and aborts. */
  cancel(): void {
    this.checkVerb('cancel');
    this.requestCancel();
  }

  /** A sibling in the transaction failed: this job is cancelled whatever its state. */
  cancelForTxn(): void {
    if (this.status === 'concluded' || this.status === 'null' || this.cancelled) return;
    this.cancelledByTxn = true;
    this.requestCancel();
  }

  private requestCancel(): void {
    this.cancelled = true;
    if (this.status === 'created' && !this.completed) {
      // Never started (a transaction rolled back): it goes at once, with no cancel event.
      this.completed = true;
      this.failed = true;
      this.error = CANCELED_TEXT;
      void this.txn.jobFinished(this);
      return;
    }
    if (this.completed && !this.failed) {
      // Finished its work and waiting for the others (or for job-finalize): abort it now.
      this.failed = true;
      this.error = CANCELED_TEXT;
      void this.txn.jobFinished(this);
      return;
    }
    this.wake();
  }

  private async workDone(err: unknown): Promise<void> {
    this.busy = false;
    this.completed = true;
    if (err !== undefined || this.cancelled) {
      this.failed = true;
      this.error = this.cancelled ? CANCELED_TEXT : this.errorText(err);
      if (!this.cancelled) logEvent('warn', 'job-failed', { id: this.id, type: this.type, error: this.error });
      // A job cancelled because a sibling failed says so when it is finalized, as QEMU.
      if (!this.cancelledByTxn) this.transition('aborting');
    } else {
      this.transition('waiting');
    }
    await this.txn.jobFinished(this);
  }

  /** All jobs of the transaction finished well: waiting -> pending. */
  toPending(): void {
    this.transition('pending');
  }

  /** auto-finalize off: tell the user the job waits for job-finalize. */
  announcePending(): void {
    this.onPending();
  }

  /** job-finalize. */
  async finalize(): Promise<void> {
    this.checkVerb('finalize');
    await this.txn.finalizeAll();
  }

  /** Commits or aborts, cleans up, concludes (and is dismissed when auto-dismiss). */
  async finalizeOne(ok: boolean): Promise<void> {
    if (this.finalizing) return this.done;
    this.finalizing = true;
    const started = this.status !== 'created';
    if (!ok) this.transition('aborting');
    try {
      if (ok) await this.commit();
      else await this.abort();
    } catch (err) {
      this.error ??= this.errorText(err);
    }
    try {
      await this.clean();
    } catch (err) {
      logEvent('warn', 'job-clean-failed', { id: this.id, error: toVdiskError(err, 'job').message });
    }
    if (started) this.onConcluding();
    this.transition('concluded');
    logEvent('info', 'job-concluded', { id: this.id, type: this.type, error: this.error });
    // A job that never started goes away at once, whatever auto-dismiss says (as QEMU).
    if (this.autoDismiss || !started) this.dismissNow();
    this.markDone();
  }

  /** job-dismiss. */
  dismiss(): void {
    this.checkVerb('dismiss');
    this.dismissNow();
  }

  private dismissNow(): void {
    this.transition('null');
    this.manager.remove(this);
  }

  /** query-jobs' JobInfo. */
  info(): Record<string, unknown> {
    const i: Record<string, unknown> = {
      id: this.id,
      type: this.type,
      status: this.status,
      'current-progress': this.progressCurrent,
      'total-progress': this.progressTotal,
    };
    if (this.error !== undefined) i.error = this.error;
    return i;
  }
}

const JOB_ID = /^[A-Za-z][A-Za-z0-9\-._]*$/;

/** Every job by id, in creation order; events go out through 'event'. */
export class JobManager extends EventEmitter {
  private readonly jobs = new Map<string, Job>();

  /** Registers a new job (status created) and starts it unless told not to. */
  add(job: Job, start = true): Job {
    if (!JOB_ID.test(job.id) || job.id.length > 31) throw new VdiskError('EINVAL', `Invalid job ID '${job.id}'`);
    if (this.jobs.has(job.id)) throw new VdiskError('EEXIST', `Job ID '${job.id}' already in use`);
    job.manager = this;
    this.jobs.set(job.id, job);
    job.markCreated();
    logEvent('info', 'job-created', { id: job.id, type: job.type });
    if (start) job.start();
    return job;
  }

  /** job-* lookups: "Job not found". */
  find(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new VdiskError('ENOENT', 'Job not found');
    return job;
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  /** Newest first, as query-jobs lists them. */
  list(): Job[] {
    return [...this.jobs.values()].reverse();
  }

  remove(job: Job): void {
    if (this.jobs.get(job.id) === job) this.jobs.delete(job.id);
  }

  emitEvent(event: string, data: Record<string, unknown>): void {
    this.emit('event', { event, data });
  }

  /** At shutdown: cancel everything still running and wait for it. */
  async cancelAll(): Promise<void> {
    const live = this.list().filter((j) => j.status !== 'concluded' && j.status !== 'null' && j.status !== 'aborting');
    for (const j of live) {
      try {
        j.cancel();
      } catch {
        // A job in a state that cannot be cancelled finishes by itself.
      }
    }
    await Promise.all(live.map((j) => j.settled()));
  }
}
