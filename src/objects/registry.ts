/**
 * User-creatable objects, as QEMU's --object and object-add/object-del
 * (qapi/qom.json ObjectOptions: a flat union on qom-type, with id): TLS
 * credentials, authorization lists and secrets. Objects are looked up by id when
 * something is configured to use them; a user (the NBD server, an nbd node)
 * holds the object, and an object held by someone cannot be deleted.
 */
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { type InputMode, type Type, check, enumOf, str, union } from '../qapi/schema.js';
import { AUTHZ_LIST_MEMBERS, AUTHZ_SIMPLE_MEMBERS, type Authz, AuthzList, AuthzSimple } from './authz.js';
import { SECRET_MEMBERS, Secret } from './secret.js';
import { TLS_CREDS_PSK_MEMBERS, TLS_CREDS_X509_MEMBERS, type TlsCreds, type TlsEndpoint, TlsCredsPsk, TlsCredsX509 } from './tls-creds.js';

export type UserObject = TlsCreds | Authz | Secret;

/** ObjectOptions, the object types vdisk has. */
export const OBJECT_OPTIONS: Type = union(
  'ObjectOptions',
  { 'qom-type': enumOf('ObjectType', ['authz-list', 'authz-simple', 'secret', 'tls-creds-psk', 'tls-creds-x509']), id: str },
  'qom-type',
  {
    'authz-list': AUTHZ_LIST_MEMBERS,
    'authz-simple': AUTHZ_SIMPLE_MEMBERS,
    secret: SECRET_MEMBERS,
    'tls-creds-psk': TLS_CREDS_PSK_MEMBERS,
    'tls-creds-x509': TLS_CREDS_X509_MEMBERS,
  },
);

export class ObjectRegistry {
  private readonly objects = new Map<string, UserObject>();
  /** Who holds each object (descriptions, for the error that refuses object-del). */
  private readonly users = new Map<string, Set<string>>();

  /** object-add / --object. */
  add(raw: unknown, mode: InputMode = 'json'): UserObject {
    const o = check(OBJECT_OPTIONS, raw, '', mode) as Record<string, unknown>;
    const id = o.id as string;
    if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) throw new VdiskError('EINVAL', `Parameter 'id' expects an identifier`);
    if (this.objects.has(id)) throw new VdiskError('EEXIST', `attempt to add duplicate property '${id}' to object (type 'container')`);
    let obj: UserObject;
    switch (o['qom-type']) {
      case 'tls-creds-x509':
        obj = new TlsCredsX509(id, o);
        break;
      case 'tls-creds-psk':
        obj = new TlsCredsPsk(id, o);
        break;
      case 'authz-simple':
        obj = new AuthzSimple(id, o.identity as string);
        break;
      case 'secret':
        obj = new Secret(id, o);
        break;
      default:
        obj = new AuthzList(id, o);
        break;
    }
    this.objects.set(id, obj);
    this.users.set(id, new Set());
    logEvent('info', 'object-added', { id, qomType: obj.qomType, ...('endpoint' in obj ? { endpoint: obj.endpoint, dir: obj.dir } : {}) });
    return obj;
  }

  /** object-del: refused while something uses the object. */
  delete(id: string): void {
    const obj = this.objects.get(id);
    if (!obj) throw new VdiskError('ENOENT', `object '${id}' not found`);
    const users = this.users.get(id)!;
    if (users.size > 0) {
      throw new VdiskError('EBUSY', `object '${id}' is in use, can not be deleted`, { advice: `used by ${[...users].join(', ')}` });
    }
    this.objects.delete(id);
    this.users.delete(id);
    logEvent('info', 'object-deleted', { id, qomType: obj.qomType });
  }

  get(id: string): UserObject | undefined {
    return this.objects.get(id);
  }

  list(): UserObject[] {
    return [...this.objects.values()];
  }

  /** TLS credentials by id for one endpoint, with QEMU's errors (blockdev-nbd.c nbd_get_tls_creds). */
  tlsCreds(id: string, endpoint: TlsEndpoint): TlsCreds {
    const obj = this.objects.get(id);
    if (!obj) throw new VdiskError('ENOENT', `No TLS credentials with id '${id}'`);
    if (obj.qomType !== 'tls-creds-x509' && obj.qomType !== 'tls-creds-psk') throw new VdiskError('EINVAL', `Object with id '${id}' is not TLS credentials`);
    const creds = obj as TlsCreds;
    if (creds.endpoint !== endpoint) throw new VdiskError('EINVAL', `Expected TLS credentials for a ${endpoint} endpoint`);
    return creds;
  }

  /** A secret's value as base64, with QEMU's errors (qcrypto_secret_lookup). */
  secretBase64(id: string): string {
    const obj = this.objects.get(id);
    if (!obj) throw new VdiskError('ENOENT', `No secret with id '${id}'`);
    if (!(obj instanceof Secret)) throw new VdiskError('EINVAL', `Object with ID '${id}' is not a secret`);
    return obj.base64();
  }

  /** An authorization object by id, or undefined when there is none (checked when a client comes). */
  authz(id: string): Authz | undefined {
    const obj = this.objects.get(id);
    return obj && 'isAllowed' in obj ? obj : undefined;
  }

  /** Marks an object as held by `user` until release. */
  hold(id: string, user: string): void {
    this.users.get(id)?.add(user);
  }

  release(id: string, user: string): void {
    this.users.get(id)?.delete(user);
  }
}
