/**
 * JSON as QMP speaks it.
 *
 * Input is a stream of JSON values with no delimiter between them, as
 * QEMU's json-streamer takes it: QmpJsonStream finds where each top-level
 * value ends and parses it. QEMU's extensions are accepted: single-quoted
 * strings and the \' escape. An ASCII control character (other than tab,
 * CR, LF) or the byte 0xFF inside a value is a lexical error that throws the
 * partial value away, so a client can always resynchronise. Limits keep a
 * hostile client from making the daemon buffer without bound.
 *
 * Output is QEMU's layout: `{"return": {}}` with a space after ':' and ',',
 * non-ASCII escaped as \uXXXX, each message ending in CRLF.
 */

/** The largest single message accepted (QEMU: 64 MiB of tokens; the Python client reads 10 MiB lines). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
/** Deepest nesting accepted (QEMU: 1024). */
export const MAX_NESTING = 1024;

export type JsonResult = { value: unknown } | { error: string };

export class QmpJsonStream {
  /**
   * The text of the value being accumulated, as the pieces it arrived in:
   * each chunk is scanned once, where it arrived, and the pieces are joined
   * once, when the value ends. (Appending to one string and indexing it made
   * V8 flatten the whole accumulated value on every chunk: a 16 MiB message
   * sent in 64 KiB pieces cost seconds of blocked event loop.)
   */
  private parts: string[] = [];
  private partsLength = 0;
  /** Scan state of the value being accumulated. */
  private depth = 0;
  private quote: '"' | "'" | undefined;
  private escaped = false;
  private started = false;

  /** Feeds text; returns every complete value (or error) it finishes, in order. */
  feed(text: string): JsonResult[] {
    const out: JsonResult[] = [];
    /** Where the current value's text in this chunk begins. */
    let start = 0;
    const finish = (end: number) => {
      const value = this.take(text, start, end);
      start = end;
      out.push(parse(value));
    };
    const drop = (end: number) => {
      this.reset();
      start = end;
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      const code = c.charCodeAt(0);
      const space = c === ' ' || c === '\t' || c === '\r' || c === '\n';
      if ((code < 0x20 && !space) || code === 0xff) {
        // A lexical error: QEMU resets its parser and reports; whatever was accumulated is lost.
        if (this.started) out.push({ error: 'JSON parse error, invalid character in input' });
        drop(i + 1);
        i++;
        continue;
      }
      if (this.quote) {
        if (this.escaped) this.escaped = false;
        else if (c === '\\') this.escaped = true;
        else if (c === this.quote) {
          this.quote = undefined;
          if (this.depth === 0) {
            finish(i + 1);
            i++;
            continue;
          }
        }
      } else if (space) {
        if (!this.started) {
          start = i + 1;
          i++;
          continue;
        }
        if (this.depth === 0) {
          // A bare scalar at top level ends at whitespace (looked at again, as the gap before the next value).
          finish(i);
          continue;
        }
      } else if (c === '"' || c === "'") {
        this.quote = c;
        this.started = true;
      } else if (c === '{' || c === '[') {
        if (this.depth === 0 && this.started) {
          // A bare scalar ran into a new value.
          finish(i);
          continue;
        }
        this.started = true;
        if (++this.depth > MAX_NESTING) {
          out.push({ error: 'JSON parse error, too many nested data structures' });
          drop(i + 1);
          i++;
          continue;
        }
      } else if (c === '}' || c === ']') {
        this.started = true;
        if (--this.depth <= 0) {
          finish(i + 1);
          i++;
          continue;
        }
      } else {
        this.started = true;
      }
      i++;
      if (this.partsLength + (i - start) > MAX_MESSAGE_BYTES) {
        out.push({ error: 'JSON parse error, message too large' });
        drop(i);
      }
    }
    if (start < text.length) {
      this.parts.push(text.slice(start));
      this.partsLength += text.length - start;
    }
    return out;
  }

  /** The accumulated value's text up to text[end], and a fresh state for the next one. */
  private take(text: string, start: number, end: number): string {
    const tail = text.slice(start, end);
    const value = this.parts.length === 0 ? tail : this.parts.join('') + tail;
    this.reset();
    return value;
  }

  private reset(): void {
    this.parts = [];
    this.partsLength = 0;
    this.depth = 0;
    this.quote = undefined;
    this.escaped = false;
    this.started = false;
  }
}

function parse(text: string): JsonResult {
  try {
    return { value: parseJson(text) };
  } catch (err) {
    return { error: `JSON parse error, ${(err as Error).message}` };
  }
}

/** Parses one JSON value, with QEMU's single-quoted strings. Throws Error with a short reason. */
export function parseJson(text: string): unknown {
  let i = 0;
  const ws = () => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\r' || text[i] === '\n')) i++;
  };
  const value = (): unknown => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const obj: Record<string, unknown> = Object.create(null);
      ws();
      if (text[i] === '}') {
        i++;
        return { ...obj };
      }
      for (;;) {
        ws();
        if (text[i] !== '"' && text[i] !== "'") throw new Error('expecting string');
        const key = string();
        ws();
        if (text[i] !== ':') throw new Error("expecting ':'");
        i++;
        obj[key] = value();
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === '}') {
          i++;
          // A plain object again, keys set as own properties (a "__proto__" key stays a key).
          const plain: Record<string, unknown> = {};
          for (const k of Object.keys(obj)) Object.defineProperty(plain, k, { value: obj[k], enumerable: true, writable: true, configurable: true });
          return plain;
        }
        throw new Error("expecting ',' or '}'");
      }
    }
    if (c === '[') {
      i++;
      const arr: unknown[] = [];
      ws();
      if (text[i] === ']') {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value());
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === ']') {
          i++;
          return arr;
        }
        throw new Error("expecting ',' or ']'");
      }
    }
    if (c === '"' || c === "'") return string();
    const m = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (m) {
      i += m[0].length;
      return Number(m[0]);
    }
    for (const [word, v] of [
      ['true', true],
      ['false', false],
      ['null', null],
    ] as const) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return v;
      }
    }
    if (i >= text.length) throw new Error('expecting value');
    const word = /^[A-Za-z_]\w*/.exec(text.slice(i))?.[0];
    throw new Error(word ? `invalid keyword '${word}'` : 'expecting value');
  };
  const string = (): string => {
    const q = text[i++];
    let s = '';
    for (;;) {
      if (i >= text.length) throw new Error('missing closing quote');
      const c = text[i++];
      if (c === q) return s;
      if (c !== '\\') {
        s += c;
        continue;
      }
      const e = text[i++];
      switch (e) {
        case '"':
        case "'":
        case '\\':
        case '/':
          s += e;
          break;
        case 'b':
          s += '\b';
          break;
        case 'f':
          s += '\f';
          break;
        case 'n':
          s += '\n';
          break;
        case 'r':
          s += '\r';
          break;
        case 't':
          s += '\t';
          break;
        case 'u': {
          const hex = text.slice(i, i + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) throw new Error('invalid escape sequence in string');
          s += String.fromCharCode(parseInt(hex, 16));
          i += 4;
          break;
        }
        default:
          throw new Error('invalid escape sequence in string');
      }
    }
  };
  const v = value();
  ws();
  if (i !== text.length) throw new Error('trailing characters');
  return v;
}

/** Serialises as QEMU's QMP output does: `{"a": 1, "b": [1, 2]}`, ASCII only. */
export function formatJson(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return JSON.stringify(v).replace(/[\u007f-\uffff]/g, (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`);
  if (typeof v === 'number') return Number.isFinite(v) ? String(v) : 'null';
  if (typeof v === 'boolean') return String(v);
  if (typeof v === 'bigint') return v.toString();
  if (Array.isArray(v)) return `[${v.map(formatJson).join(', ')}]`;
  const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
  return `{${entries.map(([k, x]) => `${formatJson(k)}: ${formatJson(x)}`).join(', ')}}`;
}
