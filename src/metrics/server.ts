/**
 * --metrics: the Prometheus endpoint, GET /metrics over node:http on a
 * loopback TCP address or a unix socket. It has no authentication and tells
 * anyone who can reach it the names of the nodes and exports, so other
 * addresses are refused (put a reverse proxy in front to publish it).
 */
import { removeStaleSocket } from '../unix-socket.js';
import fs from 'node:fs';
import http from 'node:http';
import type { Daemon } from '../daemon.js';
import { VdiskError, toVdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { prometheusText } from './prometheus.js';

export type MetricsAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

/** --metrics HOST:PORT, [V6]:PORT, unix:PATH or an absolute PATH. */
export function parseMetricsAddress(text: string): MetricsAddress {
  if (text.startsWith('unix:') && text.length > 5) return { type: 'unix', path: text.slice(5) };
  if (text.startsWith('/')) return { type: 'unix', path: text };
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!m) throw new VdiskError('EINVAL', `--metrics: expected HOST:PORT (loopback) or unix:PATH, not '${text}'`);
  const host = m[1] ?? m[2];
  const port = Number(m[3]);
  if (port > 65535) throw new VdiskError('EINVAL', `--metrics: port ${port} is out of range`);
  if (!(host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host))) {
    throw new VdiskError('EPERM', `--metrics: refusing to listen on ${host}: the endpoint has no authentication; use a loopback address or a unix socket`);
  }
  return { type: 'inet', host, port };
}

export class MetricsServer {
  private constructor(
    private readonly server: http.Server,
    private readonly addr: MetricsAddress,
  ) {}

  /** Where it listens, as --metrics takes it (the real port when 0 was asked). */
  get endpoint(): string {
    const a = this.server.address();
    if (typeof a === 'string') return `unix:${a}`;
    return a ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : '';
  }

  static async start(daemon: Daemon, addr: MetricsAddress): Promise<MetricsServer> {
    const server = http.createServer((req, res) => {
      const path = (req.url ?? '').split('?')[0];
      if (path !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('vdisk: the metrics are at /metrics\n');
        return;
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('GET only\n');
        return;
      }
      let body: string;
      try {
        body = prometheusText(daemon);
      } catch (err) {
        logEvent('error', 'metrics-failed', { error: (err as Error).stack });
        res.writeHead(500, { 'content-type': 'text/plain' }).end('internal error\n');
        return;
      }
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' }).end(req.method === 'HEAD' ? undefined : body);
    });
    // Scrapers keep connections alive; they must not hold the daemon up at shutdown.
    server.keepAliveTimeout = 5000;
    if (addr.type === 'unix') await removeStaleSocket(addr.path, { busy: `--metrics: socket ${addr.path} is in use by a running process` });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(toVdiskError(err, `--metrics listen on ${describe(addr)}`)));
      if (addr.type === 'unix') server.listen(addr.path, () => resolve());
      else server.listen(addr.port, addr.host, () => resolve());
    });
    const m = new MetricsServer(server, addr);
    logEvent('info', 'metrics-listening', { address: m.endpoint });
    return m;
  }

  async close(): Promise<void> {
    await new Promise<void>((r) => {
      this.server.close(() => r());
      this.server.closeAllConnections();
    });
    if (this.addr.type === 'unix') fs.rmSync(this.addr.path, { force: true });
  }
}

function describe(addr: MetricsAddress): string {
  return addr.type === 'unix' ? `unix:${addr.path}` : `${addr.host}:${addr.port}`;
}

