'use strict';
// Starts the real `zerotouch` binary for the Node.js SDK tests, as tests/python/conftest.py
// does for the Python ones: a fresh data dir and a loopback address of its own per server,
// once on SQLite and once on a PostgreSQL database created for it.
//
// Two things differ, both because of the Node SDKs:
// - The servers listen on port 443: the Node service clients (azure-iothub,
//   azure-iot-provisioning-service) and the provisioning device transports build their URLs
//   from the host name alone and cannot reach another port.
// - Every server shares one CA (run.js creates it and seeds each data dir's `ca/` with it, as
//   replicas share one), and the test process trusts it through NODE_EXTRA_CA_CERTS: the
//   provisioning and service clients have no option to pass a CA, Node reads that variable
//   once at start-up, and the device clients get it again through their `ca` option.

const assert = require('node:assert');
const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { execFileSync, spawn } = require('node:child_process');
const { describe, before, after } = require('node:test');

const ROOT = path.resolve(__dirname, '..', '..');
const BINARY = process.env.ZEROTOUCH_BIN || path.join(ROOT, 'target', 'debug', 'zerotouch');
const PG_ADMIN_URL = process.env.ZEROTOUCH_TEST_PG_URL || 'postgres://postgres@127.0.0.1:5432/test';
const BACKENDS = process.env.ZEROTOUCH_TEST_SKIP_PG === '1' ? ['sqlite'] : ['sqlite', 'postgres'];
const CA_DIR = process.env.ZEROTOUCH_NODE_CA_DIR;

function portFree(ip, port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, ip, () => server.close(() => resolve(true)));
  });
}

/** A 127.x.y.z whose ports 443, 8883 and 5671 are free: each server gets an address of its own. */
async function freeLoopbackIp() {
  for (let i = 0; i < 200; i++) {
    const ip = `127.${1 + crypto.randomInt(254)}.${crypto.randomInt(255)}.${2 + crypto.randomInt(252)}`;
    if ((await portFree(ip, 443)) && (await portFree(ip, 8883)) && (await portFree(ip, 5671))) return ip;
  }
  throw new Error('no free loopback address with ports 443, 8883 and 5671');
}

function psql(sql) {
  execFileSync('psql', [PG_ADMIN_URL, '-q', '-v', 'ON_ERROR_STOP=1', '-c', sql], { stdio: 'inherit' });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** One HTTPS request; resolves with {status, headers, body (string), json}. */
function request(method, url, { headers = {}, body, ca } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method, headers, ca, timeout: 30000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json;
        try {
          json = text ? JSON.parse(text) : undefined;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode, headers: res.headers, body: text, json });
      });
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error(`${method} ${url} timed out`)));
    if (body !== undefined) req.write(typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body));
    req.end();
  });
}

function sasToken(resource, key, policy, ttlSeconds = 3600) {
  const expiry = Math.floor(Date.now() / 1000) + ttlSeconds;
  const sr = encodeURIComponent(resource);
  const sig = crypto.createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${expiry}`).digest('base64');
  let token = `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${expiry}`;
  if (policy) token += `&skn=${policy}`;
  return token;
}

function parseConnectionString(cs) {
  return Object.fromEntries(cs.split(';').map((p) => {
    const i = p.indexOf('=');
    return [p.slice(0, i), p.slice(i + 1)];
  }));
}

class Server {
  constructor(backend, extraConfig = '') {
    this.backend = backend;
    this.extraConfig = extraConfig;
  }

  async start() {
    if (!fs.existsSync(BINARY)) throw new Error(`${BINARY} is missing: cargo build --bin zerotouch`);
    if (!CA_DIR) throw new Error('ZEROTOUCH_NODE_CA_DIR is unset: run the suite through tests/node/run.js');
    this.tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'zt-node-'));
    this.dataDir = path.join(this.tmp, 'data');
    fs.cpSync(CA_DIR, path.join(this.dataDir, 'ca'), { recursive: true });
    this.ip = await freeLoopbackIp();
    this.config = path.join(this.tmp, 'zerotouch.toml');
    fs.writeFileSync(this.config,
      `[listen]\nhttps = "${this.ip}:443"\nmqtt = "${this.ip}:8883"\namqp = "${this.ip}:5671"\n` +
      `[service]\nhostnames = ["${this.ip}", "localhost"]\n${this.extraConfig}`);
    this.env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ZEROTOUCH__')));
    if (this.backend === 'postgres') {
      this.database = `zt_node_${crypto.randomBytes(6).toString('hex')}`;
      psql(`CREATE DATABASE ${this.database}`);
      this.env.ZEROTOUCH__DATABASE__URL = PG_ADMIN_URL.replace(/\/[^/]*$/, `/${this.database}`);
    }
    this.logPath = path.join(this.tmp, 'server.log');
    this.spawn();
    await this.waitReady();
    const out = execFileSync(BINARY, ['credentials', '--config', this.config, '--data-dir', this.dataDir, '--json'], { env: this.env });
    this.credentials = JSON.parse(out);
    this.ca = fs.readFileSync(this.credentials.caBundlePath, 'utf8');
    this.idScope = this.credentials.idScope;
    // The backend in force is the one asked for: SQLite writes its file into the data dir.
    assert.strictEqual(fs.existsSync(path.join(this.dataDir, 'zerotouch.db')), this.backend === 'sqlite');
    return this;
  }

  spawn() {
    const log = fs.openSync(this.logPath, 'a');
    this.process = spawn(BINARY, ['serve', '--config', this.config, '--data-dir', this.dataDir],
      { env: this.env, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    this.exited = new Promise((resolve) => this.process.once('exit', resolve));
  }

  async waitReady(timeoutMs = 60000) {
    const deadline = Date.now() + timeoutMs;
    const bundle = fs.readFileSync(path.join(this.dataDir, 'ca', 'bundle.pem'));
    while (Date.now() < deadline) {
      if (this.process.exitCode !== null) throw new Error(`zerotouch exited with ${this.process.exitCode}:\n${this.log()}`);
      try {
        const r = await request('GET', `https://${this.ip}/healthz`, { ca: bundle });
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      await sleep(200);
    }
    throw new Error(`zerotouch did not become healthy:\n${this.log()}`);
  }

  log() {
    try {
      return fs.readFileSync(this.logPath, 'utf8').slice(-4000);
    } catch {
      return '';
    }
  }

  async stop() {
    if (this.process && this.process.exitCode === null) {
      this.process.kill('SIGTERM');
      const killed = setTimeout(() => this.process.kill('SIGKILL'), 10000);
      await this.exited;
      clearTimeout(killed);
    }
    if (this.database) psql(`DROP DATABASE IF EXISTS ${this.database} WITH (FORCE)`);
    if (this.tmp) fs.rmSync(this.tmp, { recursive: true, force: true });
  }

  get hubConnectionString() {
    return this.credentials.hubConnectionString;
  }

  get dpsConnectionString() {
    return this.credentials.dpsConnectionString;
  }

  /** A hub service API call signed with `iothubowner`. */
  hub(method, pathAndQuery, { headers = {}, body } = {}) {
    const cs = parseConnectionString(this.hubConnectionString);
    return request(method, `https://${cs.HostName}${pathAndQuery}`, {
      headers: { Authorization: sasToken(cs.HostName, cs.SharedAccessKey, cs.SharedAccessKeyName), ...headers },
      body,
    });
  }

  /** A management API call signed with the DPS owner policy. */
  dps(method, pathAndQuery, body) {
    const cs = parseConnectionString(this.dpsConnectionString);
    const sep = pathAndQuery.includes('?') ? '&' : '?';
    return request(method, `https://${cs.HostName}${pathAndQuery}${sep}api-version=2021-10-01`, {
      headers: {
        Authorization: sasToken(cs.HostName, cs.SharedAccessKey, cs.SharedAccessKeyName),
        'Content-Type': 'application/json',
      },
      body,
    });
  }

  /** Telemetry the hub stored for a device (the consumer API), waiting for `want` messages. */
  async storedMessages(deviceId, want = 1, waitMs = 15000) {
    const deadline = Date.now() + waitMs;
    let messages = [];
    while (Date.now() < deadline) {
      const r = await this.hub('GET', `/messages/events?from=0&limit=1000&deviceId=${encodeURIComponent(deviceId)}&wait=2`);
      assert.strictEqual(r.status, 200, r.body);
      messages = r.json.messages;
      if (messages.length >= want) break;
    }
    return messages;
  }
}

/** Runs `body(getServer)` once per backend, each with a server of its own. */
function eachBackend(name, body, extraConfig = '') {
  for (const backend of BACKENDS) {
    describe(`${name} [${backend}]`, () => {
      let server;
      before(async () => {
        server = await new Server(backend, extraConfig).start();
      });
      after(async () => {
        if (server) await server.stop();
      });
      body(() => server);
    });
  }
}

function openssl(...args) {
  execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A self-signed P-256 client certificate with CN = `cn`; returns {cert, key} as PEM text. */
function selfSigned(cn) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zt-node-x509-'));
  try {
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'), '-days', '7',
      '-subj', `/CN=${cn}`, '-addext', 'basicConstraints=critical,CA:FALSE',
      '-addext', 'keyUsage=critical,digitalSignature', '-addext', 'extendedKeyUsage=clientAuth');
    return {
      cert: fs.readFileSync(path.join(dir, 'cert.pem'), 'utf8'),
      key: fs.readFileSync(path.join(dir, 'key.pem'), 'utf8'),
    };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function deriveKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId).digest('base64');
}

function uniqueId(prefix) {
  return `${prefix}-${crypto.randomBytes(4).toString('hex')}`;
}

/** Polls `check` until it returns a truthy value or the time is up. */
async function eventually(check, timeoutMs = 15000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what}`);
}

module.exports = {
  BACKENDS, Server, eachBackend, request, sasToken, parseConnectionString, selfSigned, deriveKey,
  uniqueId, sleep, eventually,
};
