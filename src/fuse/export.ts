/**
 * The fuse type of block-export-add (QEMU's BlockExportOptionsFuse:
 * mountpoint, growable, allow-other): a node shown as a plain raw file over
 * a regular file (as QEMU), or as one file named after the export inside a
 * directory mountpoint. A stale FUSE mount left at the path by a process
 * that died is cleared first.
 */
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import type { BlockExport, ExportDriver, ExportHandle } from '../export/registry.js';

export interface FuseExportHandle extends ExportHandle {
  /** The file that shows the node. */
  mountpoint: string;
}
import { bool, enumOf, str } from '../qapi/schema.js';
import { native, Op } from '../native.js';
import { FuseSession, mountedHere, resolveMountpoint } from './session.js';

const MNT_DETACH = 2;

/** Deletes an export (hard) when its FUSE session ends by itself. */
export type DeleteExport = (id: string) => void;

export function fuseExportDriver(deleteExport: DeleteExport): ExportDriver {
  return {
    type: 'fuse',
    members: {
      mountpoint: str,
      '*growable': bool,
      '*allow-other': enumOf('FuseExportAllowOther', ['off', 'on', 'auto']),
    },
    async create(exp: BlockExport, options: Record<string, unknown>): Promise<FuseExportHandle> {
      const mountpoint = await resolveMountpoint(options.mountpoint as string).catch((err: NodeJS.ErrnoException) => {
        throw new VdiskError('ENOENT', `Failed to stat '${options.mountpoint}': ${err.code ?? err.message}`);
      });
      if (mountedHere(mountpoint)) throw new VdiskError('EBUSY', `'${mountpoint}' is already the mountpoint of a FUSE export`);
      await clearStaleMount(mountpoint);
      let st: fs.Stats;
      try {
        st = await fs.promises.stat(mountpoint);
      } catch (err) {
        throw new VdiskError('ENOENT', `Failed to stat '${mountpoint}': ${(err as NodeJS.ErrnoException).code}`);
      }
      if (!st.isFile() && !st.isDirectory()) {
        throw new VdiskError('EINVAL', `'${mountpoint}' is not a regular file or a directory`);
      }
      const allowOther = (options['allow-other'] as string | undefined) ?? 'auto';
      const session = new FuseSession({
        id: exp.id,
        // Read per request: a filter inserted above the node (a backup) takes the next ones.
        get node() {
          return exp.node;
        },
        mountpoint,
        directory: st.isDirectory(),
        writable: exp.writable,
        growable: (options.growable as boolean | undefined) ?? false,
        writethrough: exp.writethrough,
        // mount(2) needs CAP_SYS_ADMIN, which also allows allow_other: auto means on.
        allowOther: allowOther === 'on' || (allowOther === 'auto' && (process.getuid?.() ?? 0) === 0),
        onLost: () => deleteExport(exp.id),
        stats: exp.stats,
      });
      await session.mount();
      return {
        // Read by the start-up banner.
        mountpoint: session.options.directory ? `${mountpoint}/${exp.id}` : mountpoint,
        clientCount: () => session.clients,
        shutdown: () => session.shutdown(),
      };
    },
  };
}

interface MountEntry {
  mountpoint: string;
  fstype: string;
}

function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

async function mountsAt(mountpoint: string): Promise<MountEntry[]> {
  const text = await fs.promises.readFile('/proc/self/mountinfo', 'utf8');
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    const dash = f.indexOf('-');
    if (f.length < 10 || dash < 0) continue;
    const mp = unescape(f[4]);
    if (mp === mountpoint) out.push({ mountpoint: mp, fstype: f[dash + 1] });
  }
  return out;
}

/** 'dead' (the server is gone: ENOTCONN), 'alive', or 'hung' (no answer in time). Runs on the thread pool. */
async function probe(mountpoint: string): Promise<'dead' | 'alive' | 'hung'> {
  const timeout = new Promise<'hung'>((r) => setTimeout(() => r('hung'), 2000).unref());
  const stat = fs.promises.stat(mountpoint).then(
    () => 'alive' as const,
    (err: NodeJS.ErrnoException) => (err.code === 'ENOTCONN' || err.code === 'ECONNABORTED' ? ('dead' as const) : ('alive' as const)),
  );
  return Promise.race([stat, timeout]);
}

/** Removes FUSE mounts at the path whose server has died; refuses live ones. */
export async function clearStaleMount(mountpoint: string): Promise<void> {
  for (let i = 0; i < 16; i++) {
    const mounts = await mountsAt(mountpoint);
    if (mounts.length === 0) return;
    const top = mounts[mounts.length - 1];
    if (!top.fstype.startsWith('fuse')) {
      throw new VdiskError('EBUSY', `'${mountpoint}' is a mountpoint already (${top.fstype})`);
    }
    const state = await probe(mountpoint);
    if (state !== 'dead') {
      throw new VdiskError('EBUSY', `'${mountpoint}' is already a FUSE mount ${state === 'alive' ? 'served by a running process' : 'whose server does not answer'}`);
    }
    const target = Buffer.from(`${mountpoint}\0`);
    const rc = await native.submit(Op.UMOUNT, -1, target, 0, target.length, 0, MNT_DETACH);
    if (rc < 0) throw new VdiskError('EBUSY', `Failed to remove the stale FUSE mount at '${mountpoint}': errno ${-rc}`);
    logEvent('warn', 'fuse-stale-mount-cleared', { mountpoint, fstype: top.fstype });
  }
  throw new VdiskError('EBUSY', `'${mountpoint}': too many stacked mounts`);
}
