/**
 * qemu-io's output formats: sizes (cvtstr: "64 MiB", "63.938 MiB",
 * "512 bytes"), the elapsed time ("00.00 sec", "0:00:00.00" with -C), the
 * two report lines after an I/O and the -v hex dump. printf's rounding
 * (half to even on exact ties) is reproduced, so sizes print as in C.
 */

/** printf("%.<digits>f", x) for finite x >= 0: correctly rounded, exact ties to even. */
export function printfFixed(x: number, digits: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  if (Math.abs(x) >= 1e21) return BigInt(Math.round(x)).toString() + (digits > 0 ? '.' + '0'.repeat(digits) : '');
  const rounded = x.toFixed(digits);
  // toFixed rounds exact ties up; printf rounds them to even. A double's decimal expansion is
  // exact within 100 digits for the values printed here, so a tie is visible in it.
  const exact = x.toFixed(Math.min(100, digits + 60));
  const point = exact.indexOf('.');
  const tail = exact.slice(point + 1 + digits);
  if (!/^50*$/.test(tail)) return rounded;
  const kept = digits === 0 ? exact.slice(0, point) : exact.slice(0, point + 1 + digits);
  const last = kept[kept.length - 1];
  return Number(last) % 2 === 0 ? kept : rounded;
}

const UNITS: Array<[number, string]> = [
  [2 ** 60, ' EiB'],
  [2 ** 50, ' PiB'],
  [2 ** 40, ' TiB'],
  [2 ** 30, ' GiB'],
  [2 ** 20, ' MiB'],
  [2 ** 10, ' KiB'],
];

/** qemu-io's cvtstr: three decimals and a binary unit, ".000" dropped; below 1 KiB "%f bytes". */
export function cvtstr(value: number): string {
  let str: string;
  let suffix = ' bytes';
  const unit = UNITS.find(([size]) => value >= size);
  if (unit) {
    str = printfFixed(value / unit[0], 3);
    suffix = unit[1];
  } else {
    str = printfFixed(value, 6);
  }
  const trim = str.indexOf('.000');
  return trim >= 0 ? str.slice(0, trim) + suffix : str + suffix;
}

/**
 * The elapsed time as qemu-io prints it: "SS.ss sec" under a second (and
 * without -C), else "H:MM:SS.ss".
 */
export function timestr(seconds: number, verbose: boolean): string {
  const whole = Math.floor(seconds);
  const frac = seconds - whole;
  if (verbose || whole > 0) {
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = (whole % 60) + frac;
    return `${h}:${String(m).padStart(2, '0')}:${printfFixed(s, 2).padStart(5, '0')}`;
  }
  return `${printfFixed(frac, 2).padStart(5, '0')} sec`;
}

/**
 * The lines after a read, write or discard: "read 512/512 bytes at offset 0"
 * and "512 bytes, 1 ops; 00.00 sec (x MiB/sec and y ops/sec)", or with -C
 * one line "bytes,ops,time,bytes/sec,ops/sec".
 */
export function printReport(op: string, seconds: number, offset: number, count: number, total: number, ops: number, cflag: boolean): string {
  // A timer that saw no time at all would divide by zero; a nanosecond is the clock's resolution.
  const t = seconds > 0 ? seconds : 1e-9;
  const ts = timestr(t, cflag);
  if (cflag) return `${total},${ops},${ts},${printfFixed(total / t, 3)},${printfFixed(ops / t, 3)}\n`;
  return `${op} ${total}/${count} bytes at offset ${offset}\n${cvtstr(total)}, ${ops} ops; ${ts} (${cvtstr(total / t)}/sec and ${printfFixed(ops / t, 4)} ops/sec)\n`;
}

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** read -v: 16 bytes a line, "%08x:  " of the disk offset, "%02x " each, a space, then letters and digits (others '.'). */
export function dumpBuffer(buf: Buffer, offset: number): string {
  const lines: string[] = [];
  for (let i = 0; i < buf.length; i += 16) {
    const end = Math.min(buf.length, i + 16);
    let hex = '';
    let text = '';
    for (let j = i; j < end; j++) {
      const c = buf[j];
      hex += (c < 16 ? '0' : '') + c.toString(16) + ' ';
      text += isAlnum(c) ? String.fromCharCode(c) : '.';
    }
    lines.push(`${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${text}\n`);
  }
  return lines.join('');
}
