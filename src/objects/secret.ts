/**
 * QEMU's `secret` object (qapi/crypto.json SecretProperties): a password or key given inline
 * (`data`) or in a file, as raw bytes or base64. Drivers look it up by id (rbd's key-secret).
 * Encrypted secrets (keyid, iv) need a master key object vdisk does not have: refused.
 */
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { type Members, enumOf, str } from '../qapi/schema.js';

export const SECRET_MEMBERS: Members = {
  '*data': str,
  '*file': str,
  '*format': enumOf('QCryptoSecretFormat', ['raw', 'base64']),
  '*keyid': str,
  '*iv': str,
};

export class Secret {
  readonly qomType = 'secret';
  private readonly bytes: Buffer;

  constructor(
    readonly id: string,
    o: Record<string, unknown>,
  ) {
    const data = o.data as string | undefined;
    const file = o.file as string | undefined;
    if ((data === undefined) === (file === undefined)) {
      throw new VdiskError('EINVAL', `'data' and 'file' are mutually exclusive, and one of them is required`);
    }
    if (o.keyid !== undefined || o.iv !== undefined) {
      throw new VdiskError('ENOTSUP', `secret '${id}': encrypted secrets (keyid, iv) are not supported`);
    }
    let raw: Buffer;
    if (file !== undefined) {
      try {
        raw = fs.readFileSync(file);
      } catch (err) {
        throw new VdiskError('ENOENT', `Unable to read ${file}: ${(err as Error).message}`);
      }
    } else {
      raw = Buffer.from(data!, 'utf8');
    }
    if (o.format === 'base64') {
      const text = raw.toString('latin1').trim();
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
        throw new VdiskError('EINVAL', `secret '${id}': the data is not valid base64`);
      }
      raw = Buffer.from(text, 'base64');
    }
    this.bytes = raw;
  }

  /** The secret as base64 (what librados takes as `key`). */
  base64(): string {
    return this.bytes.toString('base64');
  }
}
