/**
 * AWS Signature Version 4 for S3 requests (the header form, "Authorization:
 * AWS4-HMAC-SHA256 ..."), with node:crypto only. radosgw, MinIO and AWS all
 * accept it; the older V2 signature is refused by AWS in most regions.
 *
 * The steps are the specification's: a canonical request (method, path,
 * sorted query, sorted lower-case headers, payload hash), a string to sign
 * naming the date/region/service scope, and a signing key derived from the
 * secret by an HMAC chain over that scope. Request bodies are hashed whole
 * (x-amz-content-sha256): vdisk's objects are bounded chunks and manifests,
 * so no chunked streaming signature is needed.
 */
import crypto from 'node:crypto';

export interface Credentials {
  accessKey: string;
  secretKey: string;
}

export interface SignInput {
  method: string;
  host: string;
  /** The path as sent, already percent-encoded (encodePath). */
  path: string;
  /** Query parameters, unencoded; the signer encodes and sorts them. */
  query: Record<string, string>;
  /** Extra headers to sign (content-type, range, ...); host and the x-amz-* ones are added. */
  headers: Record<string, string>;
  /** Hex SHA-256 of the body (sha256Hex(empty) for none). */
  payloadHash: string;
  region: string;
  credentials: Credentials;
  /** The signing time; tests give a fixed one. */
  date: Date;
}

export function sha256Hex(data: Buffer | string): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function hmac(key: Buffer | string, data: string): Buffer {
  return crypto.createHmac('sha256', key).update(data, 'utf8').digest();
}

/** RFC 3986 percent-encoding as SigV4 wants it: everything but A-Z a-z 0-9 - _ . ~ is encoded. */
export function uriEncode(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** A path with each segment encoded and the slashes kept (S3 keys may hold '/'). */
export function encodePath(segments: string[]): string {
  return '/' + segments.map((seg) => seg.split('/').map(uriEncode).join('/')).join('/');
}

export function canonicalQuery(query: Record<string, string>): string {
  return Object.keys(query)
    .map((k) => [uriEncode(k), uriEncode(query[k])] as const)
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`)
    .join('&');
}

/** "20130524T000000Z": SigV4's basic ISO 8601 time. */
export function amzDate(date: Date): string {
  return date.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
}

/**
 * The headers to send: the caller's, plus host, x-amz-date,
 * x-amz-content-sha256 and Authorization.
 */
export function signRequest(input: SignInput): Record<string, string> {
  const when = amzDate(input.date);
  const day = when.slice(0, 8);
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(input.headers)) headers[k.toLowerCase()] = v;
  headers.host = input.host;
  headers['x-amz-date'] = when;
  headers['x-amz-content-sha256'] = input.payloadHash;
  const names = Object.keys(headers).sort();
  const signedHeaders = names.join(';');
  // Values trimmed and inner runs of spaces folded, as the specification's canonical form.
  const canonicalHeaders = names.map((n) => `${n}:${headers[n].trim().replace(/\s+/g, ' ')}\n`).join('');
  const canonicalRequest = [input.method, input.path, canonicalQuery(input.query), canonicalHeaders, signedHeaders, input.payloadHash].join('\n');
  const scope = `${day}/${input.region}/s3/aws4_request`;
  const stringToSign = ['AWS4-HMAC-SHA256', when, scope, sha256Hex(canonicalRequest)].join('\n');
  const kDate = hmac(`AWS4${input.credentials.secretKey}`, day);
  const kRegion = hmac(kDate, input.region);
  const kService = hmac(kRegion, 's3');
  const kSigning = hmac(kService, 'aws4_request');
  const signature = crypto.createHmac('sha256', kSigning).update(stringToSign, 'utf8').digest('hex');
  headers.authorization = `AWS4-HMAC-SHA256 Credential=${input.credentials.accessKey}/${scope}, SignedHeaders=${signedHeaders}, Signature=${signature}`;
  return headers;
}
