/**
 * A small S3 client: the object calls a backup needs (PUT, GET, HEAD, DELETE,
 * ListObjectsV2, and a bucket check), path-style addressing
 * (http://host:port/bucket/key: radosgw and MinIO need no DNS for it), http
 * and https, SigV4-signed (sigv4.ts). Bodies are Buffers: the objects vdisk
 * writes are bounded (one chunk, one manifest), so there is no multipart.
 *
 * Failures are S3Errors naming the operation, the key, the HTTP status and
 * S3's own error code and message (InvalidAccessKeyId, SignatureDoesNotMatch,
 * NoSuchBucket, ...): "access denied" alone does not tell a user which of the
 * key, the secret or the bucket is wrong. Network errors and 5xx answers
 * (a gateway restarting, SlowDown) are retried a few times with a growing
 * pause; 4xx answers are not (the same request would fail the same way).
 */
import http from 'node:http';
import https from 'node:https';
import type tls from 'node:tls';
import { type Errno, VdiskError } from '../../errors.js';
import { type Credentials, encodePath, sha256Hex, signRequest, canonicalQuery } from './sigv4.js';

export interface S3Config {
  /** http://host:port or https://host:port (a path after it is a prefix of every request's path). */
  endpoint: string;
  bucket: string;
  region?: string;
  credentials: Credentials;
  /** Per-request timeout (no answer, or a stalled body), milliseconds. */
  timeoutMs?: number;
  /** CA certificates (PEM) to trust for an https endpoint with a private CA, instead of the system's. */
  ca?: string | Buffer;
  /** Or a TLS context made elsewhere (a tls-creds-x509 object's: its CA, and its client certificate if any). */
  secureContext?: tls.SecureContext;
}

export class S3Error extends VdiskError {
  constructor(
    errno: Errno,
    message: string,
    readonly status: number | undefined,
    readonly s3Code: string | undefined,
  ) {
    super(errno, message, { code: 'VDISK_S3' });
  }
}

export interface ListedObject {
  key: string;
  size: number;
  etag: string;
}

interface Response {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

const ATTEMPTS = 4;
const DEFAULT_TIMEOUT_MS = 60_000;

export class S3Client {
  private readonly url: URL;
  private readonly agent: http.Agent;
  private readonly region: string;

  constructor(private readonly config: S3Config) {
    let url: URL;
    try {
      url = new URL(config.endpoint);
    } catch {
      throw new VdiskError('EINVAL', `S3 endpoint '${config.endpoint}' is not a URL (http://host:port or https://host:port)`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new VdiskError('EINVAL', `S3 endpoint '${config.endpoint}': only http and https are supported`);
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(config.bucket)) throw new VdiskError('EINVAL', `'${config.bucket}' is not a valid S3 bucket name`);
    this.url = url;
    this.region = config.region ?? 'us-east-1';
    // Keep-alive: a backup makes one request per chunk, and a TCP (and TLS) handshake each would cost more than the request.
    // The server's certificate is always checked (chain and name): a backup sent to whoever answers is no backup.
    this.agent =
      url.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, maxSockets: 16, ca: config.ca, secureContext: config.secureContext, rejectUnauthorized: true })
        : new http.Agent({ keepAlive: true, maxSockets: 16 });
  }

  get bucket(): string {
    return this.config.bucket;
  }

  /** Where objects go, for messages and manifests: endpoint/bucket. */
  get location(): string {
    return `${this.url.origin}${this.url.pathname.replace(/\/$/, '')}/${this.config.bucket}`;
  }

  close(): void {
    this.agent.destroy();
  }

  async putObject(key: string, body: Buffer, contentType = 'application/octet-stream'): Promise<void> {
    await this.request('PUT', key, {}, { 'content-type': contentType }, body, `PUT ${key}`);
  }

  async getObject(key: string): Promise<Buffer> {
    return (await this.request('GET', key, {}, {}, undefined, `GET ${key}`)).body;
  }

  /** The object's size, or undefined if there is none. */
  async headObject(key: string): Promise<number | undefined> {
    try {
      const r = await this.request('HEAD', key, {}, {}, undefined, `HEAD ${key}`);
      return Number(r.headers['content-length'] ?? 0);
    } catch (err) {
      if (err instanceof S3Error && err.status === 404) return undefined;
      throw err;
    }
  }

  async deleteObject(key: string): Promise<void> {
    await this.request('DELETE', key, {}, {}, undefined, `DELETE ${key}`);
  }

  /** Creates the bucket (PUT bucket); an existing bucket of the same owner is not an error (S3's us-east-1 rule). */
  async createBucket(): Promise<void> {
    try {
      await this.request('PUT', undefined, {}, {}, undefined, 'create the bucket');
    } catch (err) {
      if (err instanceof S3Error && err.s3Code === 'BucketAlreadyOwnedByYou') return;
      throw err;
    }
  }

  /**
   * Checks that the credentials are accepted and the bucket is there (a
   * ListObjectsV2 of at most one key: HEAD bucket answers errors without a
   * body, so S3's error code would be lost).
   */
  async checkBucket(): Promise<void> {
    await this.request('GET', undefined, { 'list-type': '2', 'max-keys': '1' }, {}, undefined, 'list the bucket');
  }

  /** Every object whose key starts with prefix (ListObjectsV2, page by page). */
  async listObjects(prefix: string): Promise<ListedObject[]> {
    const out: ListedObject[] = [];
    let token: string | undefined;
    do {
      const query: Record<string, string> = { 'list-type': '2', prefix };
      if (token !== undefined) query['continuation-token'] = token;
      const xml = (await this.request('GET', undefined, query, {}, undefined, `list ${prefix}*`)).body.toString('utf8');
      for (const m of xml.matchAll(/<Contents>([\s\S]*?)<\/Contents>/g)) {
        out.push({ key: xmlText(m[1], 'Key') ?? '', size: Number(xmlText(m[1], 'Size') ?? 0), etag: (xmlText(m[1], 'ETag') ?? '').replace(/"/g, '') });
      }
      token = xmlText(xml, 'IsTruncated') === 'true' ? xmlText(xml, 'NextContinuationToken') : undefined;
    } while (token !== undefined);
    return out;
  }

  private async request(method: string, key: string | undefined, query: Record<string, string>, headers: Record<string, string>, body: Buffer | undefined, what: string): Promise<Response> {
    const base = this.url.pathname.replace(/\/$/, '');
    const path = base + encodePath(key === undefined ? [this.config.bucket] : [this.config.bucket, key]);
    const payloadHash = sha256Hex(body ?? Buffer.alloc(0));
    let lastError: S3Error | undefined;
    for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
      // Signed afresh each attempt: the signature holds the time, and a retry minutes later must not be refused as stale.
      const signed = signRequest({ method, host: this.url.host, path, query, headers, payloadHash, region: this.region, credentials: this.config.credentials, date: new Date() });
      if (body) signed['content-length'] = String(body.length);
      let r: Response;
      try {
        r = await this.send(method, path, query, signed, body);
      } catch (err) {
        lastError = new S3Error('EIO', `S3 ${what} at ${this.location}: ${(err as Error).message}`, undefined, undefined);
        // A certificate that is not trusted will not be trusted a second later.
        if (isCertificateError(err)) throw lastError;
        await pause(attempt);
        continue;
      }
      if (r.status >= 200 && r.status < 300) return r;
      const e = this.httpError(r, what);
      if (r.status < 500) throw e;
      lastError = e;
      await pause(attempt);
    }
    throw lastError!;
  }

  private httpError(r: Response, what: string): S3Error {
    const xml = r.body.toString('utf8');
    const code = xmlText(xml, 'Code');
    const message = xmlText(xml, 'Message');
    const errno: Errno = r.status === 403 || r.status === 401 ? 'EACCES' : r.status === 404 ? 'ENOENT' : r.status === 400 ? 'EINVAL' : 'EIO';
    let text = `S3 ${what} at ${this.location}: HTTP ${r.status}${code ? ` ${code}` : ''}${message ? ` (${message})` : ''}`;
    if (code === 'InvalidAccessKeyId') text += ': the access key is not known to the endpoint';
    else if (code === 'SignatureDoesNotMatch') text += ': the secret key does not match the access key';
    else if (code === 'NoSuchBucket') text += `: bucket '${this.config.bucket}' does not exist`;
    return new S3Error(errno, text, r.status, code);
  }

  private send(method: string, path: string, query: Record<string, string>, headers: Record<string, string>, body: Buffer | undefined): Promise<Response> {
    const qs = canonicalQuery(query);
    const mod = this.url.protocol === 'https:' ? https : http;
    const timeout = this.config.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    return new Promise((resolve, reject) => {
      const req = mod.request(
        { method, host: this.url.hostname, port: this.url.port || undefined, path: qs ? `${path}?${qs}` : path, headers, agent: this.agent, timeout },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (d: Buffer) => parts.push(d));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }));
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeout} ms`)));
      req.on('error', reject);
      req.end(body);
    });
  }
}

/** Node's codes for a TLS peer that failed verification (OpenSSL's names, and the hostname check's). */
function isCertificateError(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' && /CERT|SELF_SIGNED|UNABLE_TO_|ERR_TLS_/.test(code);
}

/** Before attempt n+1: 0.2 s, 0.8 s, 1.8 s. */
function pause(attempt: number): Promise<void> {
  return attempt >= ATTEMPTS ? Promise.resolve() : new Promise((r) => setTimeout(r, 200 * attempt * attempt));
}

/** The text of the first <tag> in an XML document, entities decoded; S3's answers are flat enough for this. */
function xmlText(xml: string, tag: string): string | undefined {
  const m = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(xml);
  if (!m) return undefined;
  return m[1].replace(/&(lt|gt|quot|apos|amp|#\d+|#x[0-9a-fA-F]+);/g, (_, e: string) => {
    if (e === 'lt') return '<';
    if (e === 'gt') return '>';
    if (e === 'quot') return '"';
    if (e === 'apos') return "'";
    if (e === 'amp') return '&';
    return String.fromCodePoint(e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10));
  });
}
