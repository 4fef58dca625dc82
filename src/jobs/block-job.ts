/**
 * Block jobs: jobs that work on a node (backup now; mirror, stream and
 * commit would be others), with QEMU's BLOCK_JOB_* events, query-block-jobs,
 * a speed limit, and the on-error policy (report, ignore, stop, enospc).
 */
import { VdiskError, strerror, toVdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { Job, type JobOptions } from './job.js';
import { RateLimit } from './rate-limit.js';

export type BlockdevOnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
export type IoStatus = 'ok' | 'failed' | 'nospace';

export abstract class BlockJob extends Job {
  /** Bytes per second, 0 = unlimited. */
  speed = 0;
  ioStatus: IoStatus = 'ok';
  protected readonly rate = new RateLimit();

  constructor(options: JobOptions & { speed?: number }) {
    super(options);
    this.speed = options.speed ?? 0;
    this.rate.setSpeed(this.speed);
  }

  /** The errno text, as QEMU reports block job errors ("Input/output error"). */
  protected override errorText(err: unknown): string {
    const e = toVdiskError(err, 'block job');
    if (e.errno === 'ECANCELED') return 'Operation canceled';
    // The scratch limit is vdisk's own failure and says what happened; I/O errors read as QEMU's.
    return e.code === 'VDISK_SCRATCH_LIMIT' ? e.message : strerror(e.errno);
  }

  private blockInfo(): Record<string, unknown> {
    return { type: this.type, device: this.id, len: this.progressTotal, offset: this.progressCurrent, speed: this.speed };
  }

  protected override onConcluding(): void {
    // A job cancelled by the user or by its transaction is CANCELLED; one that failed is COMPLETED with the error.
    if (this.cancelled && (this.error === undefined || this.error === 'Operation canceled')) {
      this.manager.emitEvent('BLOCK_JOB_CANCELLED', this.blockInfo());
    } else {
      const data = this.blockInfo();
      if (this.error !== undefined) data.error = this.error;
      this.manager.emitEvent('BLOCK_JOB_COMPLETED', data);
    }
  }

  protected override onPending(): void {
    this.manager.emitEvent('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
  }

  /** block-job-set-speed: applies at once (a worker asleep under the old limit wakes and re-checks). */
  setSpeed(speed: number): void {
    this.checkVerb('set-speed');
    if (speed < 0) throw new VdiskError('EINVAL', "Parameter 'speed' expects a non-negative value");
    this.speed = speed;
    this.rate.setSpeed(speed);
    this.kick();
  }

  /**
   * Applies the on-error policy to an I/O error of the job's own work.
   * Returns 'retry' (ignore, or stop and the user resumed) or throws to fail the job.
   */
  protected async handleIoError(err: unknown, operation: 'read' | 'write', policy: BlockdevOnError): Promise<'retry'> {
    const e = toVdiskError(err, `${this.type} job '${this.id}'`);
    if (e.errno === 'ECANCELED') throw e;
    const nospace = e.errno === 'ENOSPC';
    const action = policy === 'enospc' || policy === 'auto' ? (nospace ? 'stop' : 'report') : policy;
    this.manager.emitEvent('BLOCK_JOB_ERROR', { device: this.id, operation, action });
    logEvent('warn', 'block-job-io-error', { id: this.id, operation, action, error: e.message });
    if (action === 'report') throw e;
    if (action === 'ignore') return 'retry';
    // stop: the job pauses (as a user pause) until resumed, then retries.
    this.ioStatus = nospace ? 'nospace' : 'failed';
    this.pauseCount++;
    await this.pausePoint();
    this.ioStatus = 'ok';
    return 'retry';
  }

  override resume(): void {
    super.resume();
    this.ioStatus = 'ok';
  }

  /** query-block-jobs' BlockJobInfo. */
  blockJobInfo(): Record<string, unknown> {
    const i: Record<string, unknown> = {
      'auto-finalize': this.autoFinalize,
      'io-status': this.ioStatus,
      device: this.id,
      'auto-dismiss': this.autoDismiss,
      busy: this.busy,
      len: this.progressTotal,
      offset: this.progressCurrent,
      status: this.status,
      paused: this.pauseCount > 0,
      speed: this.speed,
      ready: this.status === 'ready' || this.status === 'standby',
      type: this.type,
    };
    if (this.error !== undefined) i.error = this.error;
    return i;
  }
}
