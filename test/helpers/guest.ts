/**
 * The guests test/guest/ boots under qemu-system-x86_64 (TCG): their kernel
 * and initramfs (scripts/build-guest.sh, cached), the OS-install guest's
 * media (scripts/build-install-media.sh, cached), and one run of QEMU read
 * back as the guest's serial console and its "VDISK-GUEST: PASS|FAIL" verdict.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, run } from './tools.js';

export interface GuestAssets {
  vmlinuz: string;
  initramfs: string;
}

/** Builds (or finds in the cache) the guest's kernel and initramfs. */
export async function guestAssets(): Promise<GuestAssets> {
  const r = await run('bash', [path.join(ROOT, 'scripts', 'build-guest.sh')], { timeoutMs: 280_000 });
  if (r.code !== 0) throw new Error(`scripts/build-guest.sh failed (exit ${r.code}, signal ${r.signal}):\n${r.stderr}`);
  const dir = r.stdout.trim().split('\n').pop() ?? '';
  const vmlinuz = path.join(dir, 'vmlinuz');
  const initramfs = path.join(dir, 'initramfs.gz');
  if (!fs.existsSync(vmlinuz) || !fs.existsSync(initramfs)) throw new Error(`scripts/build-guest.sh printed '${dir}', which has no vmlinuz and initramfs.gz:\n${r.stderr}`);
  return { vmlinuz, initramfs };
}

export interface Boot {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Everything the guest printed on its serial console, then QEMU's own output. */
  console: string;
  /** The one "VDISK-GUEST: PASS|FAIL ..." line, without the prefix. */
  verdict: string | undefined;
  verdicts: string[];
}

/**
 * Runs qemu-system-x86_64 with `args` (which must not name a serial port)
 * until it exits or `timeoutMs` passes, the guest's first serial port going
 * to `consoleFile`: QEMU's 16550 drops bytes when a pipe (-serial stdio) is
 * not drained at once, and a file never makes it wait.
 */
export async function runGuest(args: string[], consoleFile: string, timeoutMs: number): Promise<Boot> {
  const r = await run(
    'qemu-system-x86_64',
    ['-accel', 'tcg', '-nodefaults', '-display', 'none', '-serial', `file:${consoleFile}`, '-no-reboot', ...args],
    { timeoutMs },
  );
  const serial = fs.existsSync(consoleFile) ? fs.readFileSync(consoleFile, 'utf8') : '';
  const text = (serial + r.stdout + r.stderr).replace(/\r/g, '');
  const verdicts = [...text.matchAll(/^VDISK-GUEST: ((?:PASS|FAIL).*)$/gm)].map((m) => m[1]);
  return { code: r.code, signal: r.signal, console: text, verdict: verdicts.length === 1 ? verdicts[0] : undefined, verdicts };
}

/**
 * Builds (or finds in the cache) the OS-install guest's media
 * (scripts/build-install-media.sh): the read-only disk image the installer
 * guest (init.sh vdisk.mode=install) installs a small Debian system from.
 */
export async function installMedia(): Promise<string> {
  const r = await run('bash', [path.join(ROOT, 'scripts', 'build-install-media.sh')], { timeoutMs: 280_000 });
  if (r.code !== 0) throw new Error(`scripts/build-install-media.sh failed (exit ${r.code}, signal ${r.signal}):\n${r.stderr}`);
  const dir = r.stdout.trim().split('\n').pop() ?? '';
  const image = path.join(dir, 'media.img');
  if (!fs.existsSync(image)) throw new Error(`scripts/build-install-media.sh printed '${dir}', which has no media.img:\n${r.stderr}`);
  return image;
}
