/**
 * Unix socket files the daemon listens on (NBD, QMP, metrics): one left by a
 * process that died would make listen() fail, so it is removed if nobody
 * answers on it; one that answers belongs to a live server and is refused.
 */
import fs from 'node:fs';
import net from 'node:net';
import { VdiskError } from './errors.js';

export interface StaleSocketMessages {
  /** The error when a live server answers on the socket. */
  busy: string;
  /** The error when a file that is not a socket is there; without it, such a file is left for listen() to report. */
  notSocket?: string;
}

export async function removeStaleSocket(path: string, messages: StaleSocketMessages): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    if (messages.notSocket !== undefined) throw new VdiskError('EEXIST', messages.notSocket);
    return;
  }
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new VdiskError('EBUSY', messages.busy);
  fs.rmSync(path, { force: true });
}
