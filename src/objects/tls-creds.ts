/**
 * TLS credentials, as QEMU's tls-creds-x509 and tls-creds-psk objects
 * (qapi/crypto.json, crypto/tlscredsx509.c, crypto/tlscredspsk.c), loaded
 * from a directory laid out as QEMU expects (docs/system/tls.rst):
 *
 *   x509, server: ca-cert.pem, server-cert.pem, server-key.pem (required),
 *                 ca-crl.pem, dh-params.pem (optional)
 *   x509, client: ca-cert.pem (required), client-cert.pem + client-key.pem
 *   psk:          keys.psk, lines "username:hexkey"; dh-params.pem (server, optional)
 *
 * QEMU speaks GnuTLS; vdisk speaks OpenSSL through node:tls, so what has to
 * match is what a peer sees: which certificates are asked for and checked,
 * the distinguished name authorization sees (GnuTLS's rendering), and the
 * PSK identities and keys. The files are read once, when the object is
 * created; a SecureContext is built then and shared by every session.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { type Members, bool, enumOf, str } from '../qapi/schema.js';

export type TlsEndpoint = 'client' | 'server';

const TLS_CREDS_MEMBERS: Members = {
  '*verify-peer': bool,
  '*dir': str,
  '*endpoint': enumOf('QCryptoTLSCredsEndpoint', ['client', 'server']),
  '*priority': str,
  '*loaded': bool,
};
export const TLS_CREDS_X509_MEMBERS: Members = { ...TLS_CREDS_MEMBERS, '*sanity-check': bool, '*passwordid': str };
export const TLS_CREDS_PSK_MEMBERS: Members = { ...TLS_CREDS_MEMBERS, '*username': str };

/**
 * Cipher suites for PSK. TLS 1.3 PSK works with OpenSSL's defaults; TLS 1.2
 * PSK suites are not in Node's default list, so they are named here (forward
 * secret ones first, as GnuTLS's "+ECDHE-PSK:+DHE-PSK:+PSK" that QEMU asks for).
 */
const PSK_CIPHERS = [
  'TLS_AES_256_GCM_SHA384',
  'TLS_CHACHA20_POLY1305_SHA256',
  'TLS_AES_128_GCM_SHA256',
  'ECDHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

/** What a finished handshake established about the peer, or why it is refused. */
export type PeerCheck = { ok: true; identity?: string } | { ok: false; reason: string };

export abstract class TlsCreds {
  abstract readonly qomType: 'tls-creds-x509' | 'tls-creds-psk';
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  readonly dir: string | undefined;

  constructor(
    readonly id: string,
    props: Record<string, unknown>,
  ) {
    this.endpoint = (props.endpoint as TlsEndpoint | undefined) ?? 'client';
    this.verifyPeer = (props['verify-peer'] as boolean | undefined) ?? true;
    this.dir = props.dir as string | undefined;
    if (props.priority !== undefined) {
      // A GnuTLS priority string means nothing to OpenSSL; refusing it would break QEMU command lines.
      logEvent('warn', 'tls-priority-ignored', { id, priority: props.priority, reason: 'GnuTLS priority strings do not apply to OpenSSL' });
    }
  }

  /** Options of the server side of one session; `onIdentity` hears the PSK identity a client offers. */
  abstract serverOptions(onIdentity: (identity: string) => void): tls.TLSSocketOptions;

  /** After the server's handshake: whether the client is acceptable and who it is. */
  abstract checkClient(socket: tls.TLSSocket, pskIdentity: string | undefined): PeerCheck;

  /** Options of the client side, for tls.connect over an existing socket. */
  abstract clientOptions(hostname: string | undefined): tls.ConnectionOptions;

  /** After the client's handshake: whether the server is the one expected. */
  abstract checkServer(socket: tls.TLSSocket, hostname: string | undefined): PeerCheck;

  /** A file of the credentials directory; required ones must be readable (QEMU's qcrypto_tls_creds_get_path). */
  protected file(name: string, required: true): Buffer;
  protected file(name: string, required: boolean): Buffer | undefined;
  protected file(name: string, required: boolean): Buffer | undefined {
    if (this.dir === undefined) {
      if (!required) return undefined;
      throw new VdiskError('EINVAL', `Missing 'dir' property value`);
    }
    const p = path.join(this.dir, name);
    try {
      return fs.readFileSync(p);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (!required && e.code === 'ENOENT') return undefined;
      throw new VdiskError(e.code === 'EACCES' ? 'EACCES' : 'ENOENT', `Unable to access credentials ${p}: ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}`);
    }
  }
}

/**
 * A certificate's subject as GnuTLS's gnutls_x509_crt_get_dn prints it (and
 * so as QEMU's authz objects see it): RFC 4514 order, most specific first,
 * "CN=client,O=Example,C=GB". OpenSSL lists the RDNs in certificate order,
 * one a line, with the same escaping, so only the order changes.
 */
export function distinguishedName(cert: crypto.X509Certificate): string {
  return cert.subject.split('\n').reverse().join(',');
}

export class TlsCredsX509 extends TlsCreds {
  readonly qomType = 'tls-creds-x509';
  private readonly context: tls.SecureContext;

  constructor(id: string, props: Record<string, unknown>) {
    super(id, props);
    if (props.passwordid !== undefined) throw new VdiskError('ENOTSUP', 'passwordid needs secret objects, which vdisk does not have yet');
    const server = this.endpoint === 'server';
    const ca = this.file('ca-cert.pem', true);
    const crl = server ? this.file('ca-crl.pem', false) : undefined;
    const cert = this.file(server ? 'server-cert.pem' : 'client-cert.pem', server);
    const key = this.file(server ? 'server-key.pem' : 'client-key.pem', server);
    const dhparam = server ? this.file('dh-params.pem', false) : undefined;
    if ((props['sanity-check'] as boolean | undefined) ?? true) sanityCheck(this.dir!, ca, cert, server);
    try {
      this.context = tls.createSecureContext({ ca, crl, cert: cert && key ? cert : undefined, key: cert && key ? key : undefined, dhparam });
    } catch (err) {
      throw new VdiskError('EINVAL', `Cannot load credentials from ${this.dir}: ${(err as Error).message}`);
    }
  }

  serverOptions(): tls.TLSSocketOptions {
    // Verification is done after the handshake (checkClient), as QEMU does, so the reason can be logged.
    return { isServer: true, secureContext: this.context, requestCert: this.verifyPeer, rejectUnauthorized: false };
  }

  checkClient(socket: tls.TLSSocket): PeerCheck {
    if (!this.verifyPeer) return { ok: true };
    const cert = socket.getPeerX509Certificate();
    if (!cert) return { ok: false, reason: 'the client sent no certificate' };
    const identity = distinguishedName(cert);
    const error = verifyError(socket);
    if (error) return { ok: false, reason: `certificate of ${identity} not accepted: ${error}` };
    return { ok: true, identity };
  }

  clientOptions(hostname: string | undefined): tls.ConnectionOptions {
    return {
      secureContext: this.context,
      rejectUnauthorized: false,
      // SNI takes a DNS name, never an address.
      servername: hostname !== undefined && net.isIP(hostname) === 0 ? hostname : undefined,
    };
  }

  checkServer(socket: tls.TLSSocket, hostname: string | undefined): PeerCheck {
    if (!this.verifyPeer) return { ok: true };
    const cert = socket.getPeerCertificate();
    if (!cert || Object.keys(cert).length === 0) return { ok: false, reason: 'No certificate peers' };
    const error = verifyError(socket);
    if (error) return { ok: false, reason: `The certificate is not trusted: ${error}` };
    if (hostname === undefined) return { ok: false, reason: 'No hostname for certificate validation' };
    if (tls.checkServerIdentity(hostname, cert) !== undefined) return { ok: false, reason: `Certificate does not match the hostname ${hostname}` };
    return { ok: true };
  }
}

/**
 * OpenSSL's verdict on the peer's chain against our CA (and CRL), or
 * undefined when it passed. A TLSSocket made over an existing socket (as
 * STARTTLS needs) has no tls.Server to fill in `authorized`, so the verdict
 * is asked of the handle, as Node's own server and client code do; without
 * that method nothing is trusted.
 */
function verifyError(socket: tls.TLSSocket): string | undefined {
  const handle = (socket as unknown as { _handle?: { verifyError?: () => (Error & { code?: string }) | null } })._handle;
  if (typeof handle?.verifyError !== 'function') return 'this Node.js cannot report certificate verification';
  const err = handle.verifyError();
  return err ? `${err.code ?? ''}${err.code ? ': ' : ''}${err.message}` : undefined;
}

/**
 * The checks QEMU's sanity-check makes before anything is served, so a
 * mistake shows at start rather than as a failed handshake: the CA is a CA,
 * each certificate is within its dates, and ours is signed by the CA.
 */
function sanityCheck(dir: string, caPem: Buffer, certPem: Buffer | undefined, server: boolean): void {
  const now = Date.now();
  const parse = (pem: Buffer, what: string): crypto.X509Certificate[] => {
    const blocks = pem.toString('latin1').match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    if (blocks.length === 0) throw new VdiskError('EINVAL', `No certificates found in ${what} certificate file in ${dir}`);
    try {
      return blocks.map((b) => new crypto.X509Certificate(b));
    } catch (err) {
      throw new VdiskError('EINVAL', `Unable to parse ${what} certificate in ${dir}: ${(err as Error).message}`);
    }
  };
  const times = (c: crypto.X509Certificate, what: string) => {
    if (Date.parse(c.validTo) < now) throw new VdiskError('EINVAL', `The ${what} certificate ${distinguishedName(c)} has expired`);
    if (Date.parse(c.validFrom) > now) throw new VdiskError('EINVAL', `The ${what} certificate ${distinguishedName(c)} is not yet active`);
  };
  const cas = parse(caPem, 'CA');
  for (const ca of cas) {
    times(ca, 'CA');
    if (!ca.ca) throw new VdiskError('EINVAL', `The CA certificate ${distinguishedName(ca)} is not a CA (basic constraints)`);
  }
  if (!certPem) return;
  const what = server ? 'server' : 'client';
  const [cert] = parse(certPem, what);
  times(cert, what);
  if (!cas.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey))) {
    throw new VdiskError('EINVAL', `The ${what} certificate ${distinguishedName(cert)} is not signed by the CA in ${dir}/ca-cert.pem`);
  }
}

export class TlsCredsPsk extends TlsCreds {
  readonly qomType = 'tls-creds-psk';
  readonly username: string | undefined;
  /** Server: every identity's key. Client: our own. */
  private readonly keys = new Map<string, Buffer>();
  private readonly context: tls.SecureContext;

  constructor(id: string, props: Record<string, unknown>) {
    super(id, props);
    this.username = props.username as string | undefined;
    const server = this.endpoint === 'server';
    if (server && this.username !== undefined) throw new VdiskError('EINVAL', 'username should not be set when endpoint=server');
    const dhparam = server ? this.file('dh-params.pem', false) : undefined;
    const pskFile = path.join(this.dir ?? '', 'keys.psk');
    const text = this.file('keys.psk', true).toString('utf8');
    for (const line of text.split('\n')) {
      const colon = line.indexOf(':');
      if (colon <= 0) continue;
      const hex = line.slice(colon + 1).trim();
      if (!/^([0-9a-fA-F]{2})+$/.test(hex)) continue;
      const name = line.slice(0, colon);
      if (!this.keys.has(name)) this.keys.set(name, Buffer.from(hex, 'hex'));
    }
    if (!server) {
      const user = this.username ?? 'qemu';
      if (!this.keys.has(user)) throw new VdiskError('ENOENT', `Username ${user} not found in PSK file ${pskFile}`);
    }
    this.context = tls.createSecureContext({ ciphers: PSK_CIPHERS, dhparam });
  }

  serverOptions(onIdentity: (identity: string) => void): tls.TLSSocketOptions {
    return {
      isServer: true,
      secureContext: this.context,
      // An unknown identity gets no key, and the handshake fails.
      pskCallback: (_socket: tls.TLSSocket, identity: string) => {
        onIdentity(identity);
        return this.keys.get(identity) ?? null;
      },
    } as tls.TLSSocketOptions;
  }

  checkClient(_socket: tls.TLSSocket, pskIdentity: string | undefined): PeerCheck {
    return { ok: true, identity: pskIdentity };
  }

  clientOptions(): tls.ConnectionOptions {
    const identity = this.username ?? 'qemu';
    const psk = this.keys.get(identity)!;
    return {
      secureContext: this.context,
      pskCallback: () => ({ identity, psk }),
      // There is no certificate to check the name against.
      checkServerIdentity: () => undefined,
    };
  }

  checkServer(): PeerCheck {
    return { ok: true };
  }
}
