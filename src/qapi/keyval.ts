/**
 * QEMU's keyval syntax for command-line options, as qemu-storage-daemon takes
 * them: `driver=qcow2,node-name=d0,file.driver=file,file.filename=a.qcow2`.
 *
 * - Keys are dotted paths into nested objects; a level whose keys are all
 *   0, 1, 2, ... becomes a list (`inject-error.0.event=read_aio`).
 * - A comma inside a value is written twice (`filename=a,,b` is "a,b").
 * - Every leaf stays a string: the schema converts it (see schema.ts).
 * - An argument that starts with '{' is JSON instead.
 */
import { VdiskError } from '../errors.js';

export function parseOptionArg(text: string, optionName: string): unknown {
  if (text.trimStart().startsWith('{')) {
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new VdiskError('EINVAL', `${optionName}: invalid JSON: ${(err as Error).message}`);
    }
  }
  return parseKeyval(text, optionName);
}

export function parseKeyval(text: string, optionName: string): Record<string, unknown> {
  const root: Record<string, unknown> = {};
  let i = 0;
  while (i < text.length) {
    const eq = text.indexOf('=', i);
    const comma = text.indexOf(',', i);
    if (eq < 0 || (comma >= 0 && comma < eq)) {
      throw new VdiskError('EINVAL', `${optionName}: expected key=value at '${text.slice(i)}'`);
    }
    const key = text.slice(i, eq);
    // '__proto__' would reach Object.prototype through an ordinary object; no QAPI member has that name.
    if (!/^[A-Za-z0-9_.\-]+$/.test(key) || key.split('.').some((p) => p === '' || p === '__proto__')) {
      throw new VdiskError('EINVAL', `${optionName}: invalid parameter name '${key}'`);
    }
    let value = '';
    let j = eq + 1;
    for (; j < text.length; j++) {
      if (text[j] === ',') {
        if (text[j + 1] === ',') {
          value += ',';
          j++;
          continue;
        }
        break;
      }
      value += text[j];
    }
    setPath(root, key.split('.'), value, key, optionName);
    i = j + 1;
  }
  return listify(root) as Record<string, unknown>;
}

function setPath(obj: Record<string, unknown>, parts: string[], value: string, key: string, optionName: string): void {
  let cur = obj;
  for (let k = 0; k < parts.length - 1; k++) {
    const next = cur[parts[k]];
    if (next === undefined) cur = cur[parts[k]] = {} as Record<string, unknown>;
    else if (typeof next === 'object') cur = next as Record<string, unknown>;
    else throw new VdiskError('EINVAL', `${optionName}: parameter '${parts.slice(0, k + 1).join('.')}' has a value and members`);
  }
  const last = parts[parts.length - 1];
  if (last in cur) {
    throw new VdiskError('EINVAL', `${optionName}: parameter '${key}' given twice`);
  }
  cur[last] = value;
}

/** Turns objects whose keys are 0..n-1 into arrays, recursively. */
function listify(v: unknown): unknown {
  if (typeof v !== 'object' || v === null) return v;
  const obj = v as Record<string, unknown>;
  const keys = Object.keys(obj);
  for (const k of keys) obj[k] = listify(obj[k]);
  if (keys.length > 0 && keys.every((k) => /^\d+$/.test(k))) {
    // Indexes are decimal numbers, as QEMU reads them: "00" is element 0.
    const byIndex = new Map<number, unknown>();
    for (const k of keys) byIndex.set(Number(k), obj[k]);
    if (byIndex.size === keys.length && [...byIndex.keys()].every((n) => n < keys.length)) {
      return Array.from({ length: keys.length }, (_, i) => byIndex.get(i));
    }
  }
  return obj;
}
