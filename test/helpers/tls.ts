/**
 * Certificates and pre-shared keys for the TLS tests, made with GnuTLS's
 * certtool and psktool the way QEMU's docs/system/tls.rst describes, in
 * directories laid out as QEMU and libnbd read them:
 *
 *   server/    ca-cert.pem server-cert.pem server-key.pem   (CN=localhost, SAN localhost and 127.0.0.1)
 *   client/    ca-cert.pem client-cert.pem client-key.pem   (CN=client1,O=vdisk test)
 *   client2/   the same CA, another client                 (CN=client2,O=vdisk test)
 *   rogue/     ca-cert.pem of the real CA (so it trusts the server) but a client
 *              certificate signed by a second CA            (CN=client1,O=vdisk test)
 *   nocert/    ca-cert.pem only: a client without a certificate
 *   psk/       keys.psk with alice and bob; psk-wrong/ alice with another key, and carol
 */
import fs from 'node:fs';
import path from 'node:path';
import { run } from './tools.js';

export interface Pki {
  dir: string;
  server: string;
  client: string;
  client2: string;
  rogue: string;
  nocert: string;
  psk: string;
  pskWrong: string;
  /** The DNs as GnuTLS (and so QEMU's authz) prints them. */
  client1Dn: string;
  client2Dn: string;
}

async function certtool(args: string[], cwd: string): Promise<void> {
  const r = await run('certtool', args, { cwd, timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`certtool ${args.join(' ')}: ${r.stderr}`);
}

async function key(dir: string, name: string): Promise<void> {
  const r = await run('certtool', ['--generate-privkey', '--key-type=ecdsa', '--outfile', name], { cwd: dir });
  if (r.code !== 0) throw new Error(`certtool --generate-privkey: ${r.stderr}`);
}

async function ca(dir: string, cn: string): Promise<void> {
  fs.writeFileSync(path.join(dir, 'ca.info'), `cn = ${cn}\nca\ncert_signing_key\nexpiration_days = 30\n`);
  await key(dir, 'ca-key.pem');
  await certtool(['--generate-self-signed', '--load-privkey', 'ca-key.pem', '--template', 'ca.info', '--outfile', 'ca-cert.pem'], dir);
}

/** Issues name-cert.pem / name-key.pem in caDir from the template text. */
async function issue(caDir: string, name: string, template: string): Promise<void> {
  fs.writeFileSync(path.join(caDir, `${name}.info`), template);
  await key(caDir, `${name}-key.pem`);
  await certtool(
    ['--generate-certificate', '--load-ca-certificate', 'ca-cert.pem', '--load-ca-privkey', 'ca-key.pem', '--load-privkey', `${name}-key.pem`, '--template', `${name}.info`, '--outfile', `${name}-cert.pem`],
    caDir,
  );
}

function place(files: Array<[string, string]>, dir: string): string {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const [from, to] of files) fs.copyFileSync(from, path.join(dir, to));
  return dir;
}

const CLIENT = (cn: string) => `organization = vdisk test\ncn = ${cn}\ntls_www_client\nsigning_key\nexpiration_days = 30\n`;

export async function makePki(dir: string): Promise<Pki> {
  const caDir = path.join(dir, 'ca');
  const ca2Dir = path.join(dir, 'ca2');
  fs.mkdirSync(caDir, { recursive: true });
  fs.mkdirSync(ca2Dir, { recursive: true });
  await ca(caDir, 'vdisk test CA');
  await ca(ca2Dir, 'another CA');
  await issue(caDir, 'server', 'organization = vdisk test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n');
  await issue(caDir, 'client1', CLIENT('client1'));
  await issue(caDir, 'client2', CLIENT('client2'));
  await issue(ca2Dir, 'client1', CLIENT('client1'));
  const c = (f: string) => path.join(caDir, f);
  const pki: Pki = {
    dir,
    server: place([[c('ca-cert.pem'), 'ca-cert.pem'], [c('server-cert.pem'), 'server-cert.pem'], [c('server-key.pem'), 'server-key.pem']], path.join(dir, 'server')),
    client: place([[c('ca-cert.pem'), 'ca-cert.pem'], [c('client1-cert.pem'), 'client-cert.pem'], [c('client1-key.pem'), 'client-key.pem']], path.join(dir, 'client')),
    client2: place([[c('ca-cert.pem'), 'ca-cert.pem'], [c('client2-cert.pem'), 'client-cert.pem'], [c('client2-key.pem'), 'client-key.pem']], path.join(dir, 'client2')),
    rogue: place(
      [[c('ca-cert.pem'), 'ca-cert.pem'], [path.join(ca2Dir, 'client1-cert.pem'), 'client-cert.pem'], [path.join(ca2Dir, 'client1-key.pem'), 'client-key.pem']],
      path.join(dir, 'rogue'),
    ),
    nocert: place([[c('ca-cert.pem'), 'ca-cert.pem']], path.join(dir, 'nocert')),
    psk: path.join(dir, 'psk'),
    pskWrong: path.join(dir, 'psk-wrong'),
    client1Dn: 'CN=client1,O=vdisk test',
    client2Dn: 'CN=client2,O=vdisk test',
  };
  for (const d of [pki.psk, pki.pskWrong]) fs.mkdirSync(d, { mode: 0o700 });
  for (const user of ['alice', 'bob']) {
    const r = await run('psktool', ['-u', user, '-p', path.join(pki.psk, 'keys.psk')]);
    if (r.code !== 0) throw new Error(`psktool: ${r.stderr}`);
  }
  for (const user of ['alice', 'carol']) {
    const r = await run('psktool', ['-u', user, '-p', path.join(pki.pskWrong, 'keys.psk')]);
    if (r.code !== 0) throw new Error(`psktool: ${r.stderr}`);
  }
  return pki;
}
