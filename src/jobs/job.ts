/**
 * Jobs: long work started by a command (blockdev-create now; backups later)
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
  /** A cancel was requested (force or not). */
  cancelled = false;
  /** user pauses + error pauses; the job is paused while above zero. */
  pauseCount = 0;
  /** True while run() is between pause points (query-block-jobs' "busy"). */
  busy = false;
  manager!: JobManager;
  private resumeWaiters: Array<() => void> = [];
  private result: Promise<void> | undefined;

  constructor(options: JobOptions) {
    this.id = options.id;
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
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

  get isPaused(): boolean {
    return this.pauseCount > 0;
  }

  /** Moves to a new status, refusing moves QEMU's table does not allow (those are bugs). */
  protected transition(to: JobStatus): void {
    if (to === this.status && to !== 'aborting') return;
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
    const back = this.status;
    this.transition(back === 'ready' ? 'standby' : 'paused');
    this.busy = false;
    while (this.pauseCount > 0 && !this.cancelled) await new Promise<void>((r) => this.resumeWaiters.push(r));
    this.busy = true;
    this.transition(back);
    if (this.cancelled) throw new VdiskError('ECANCELED', CANCELED_TEXT);
  }

  pause(): void {
    this.checkVerb('pause');
    this.pauseCount++;
  }

  resume(): void {
    this.checkVerb('resume');
    if (this.pauseCount === 0) throw new VdiskError('EINVAL', "Can't resume a job that was not paused");
    this.pauseCount--;
    this.wake();
  }

  private wake(): void {
    if (this.pauseCount > 0 && !this.cancelled) return;
    for (const w of this.resumeWaiters.splice(0)) w();
  }

  /** Registered by the manager: undefined -> created. */
  markCreated(): void {
    this.transition('created');
  }

  /** Starts the work (created -> running). */
  start(): void {
    this.transition('running');
    this.busy = true;
    this.result = this.run().then(
      () => this.workDone(undefined),
      (err) => this.workDone(err),
    );
  }

  /** Resolves when the job has concluded (or is gone). */
  async settled(): Promise<void> {
    await this.result;
  }

  cancel(): void {
    this.checkVerb('cancel');
    this.cancelled = true;
    if (this.status === 'created') {
      // Never started: it goes straight away.
      this.error = CANCELED_TEXT;
      this.transition('aborting');
      void this.finalizeNow(false);
      return;
    }
    if (this.status === 'waiting' || this.status === 'pending') {
      this.error = CANCELED_TEXT;
      void this.finalizeNow(false);
      return;
    }
    this.wake();
  }

  private async workDone(err: unknown): Promise<void> {
    this.busy = false;
    if (err !== undefined || this.cancelled) {
      this.error = this.cancelled ? CANCELED_TEXT : errorText(err);
      if (err !== undefined && !this.cancelled) logEvent('warn', 'job-failed', { id: this.id, type: this.type, error: this.error });
      await this.finalizeNow(false);
      return;
    }
    this.transition('waiting');
    this.transition('pending');
    if (this.autoFinalize) await this.finalizeNow(true);
    else this.onPending();
  }

  /** job-finalize. */
  async finalize(): Promise<void> {
    this.checkVerb('finalize');
    await this.finalizeNow(!this.cancelled && this.error === undefined);
  }

  private async finalizeNow(ok: boolean): Promise<void> {
    if (!ok) this.transition('aborting');
    try {
      if (ok) await this.commit();
      else await this.abort();
    } catch (err) {
      this.error ??= errorText(err);
    }
    try {
      await this.clean();
    } catch (err) {
      logEvent('warn', 'job-clean-failed', { id: this.id, error: errorText(err) });
    }
    this.onConcluding();
    this.transition('concluded');
    logEvent('info', 'job-concluded', { id: this.id, type: this.type, error: this.error });
    if (this.autoDismiss) this.dismissNow();
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

function errorText(err: unknown): string {
  // QEMU reports strerror() of the errno; vdisk's messages say more, and name the place.
  return toVdiskError(err, 'job').message;
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
