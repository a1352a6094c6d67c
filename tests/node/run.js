'use strict';
// Entry point of the Node.js SDK suite (scripts/test runs it): creates the CA every test server
// shares, then runs `node --test` on the test files with that CA trusted through
// NODE_EXTRA_CA_CERTS, the only way to give it to the Node provisioning and service clients.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn, spawnSync } = require('node:child_process');
const { once } = require('node:events');

const ROOT = path.resolve(__dirname, '..', '..');
const BINARY = process.env.ZEROTOUCH_BIN || path.join(ROOT, 'target', 'debug', 'zerotouch');

/// Runs `zerotouch serve` on a fresh data dir (free ports on 127.0.0.1) until its CA exists:
/// only `serve` creates an instance. The CA folder appears in one rename, complete.
async function createCa(dataDir, env) {
  const config = path.join(path.dirname(dataDir), 'seed.toml');
  fs.writeFileSync(config, '[listen]\nhttps = "127.0.0.1:0"\nmqtt = "127.0.0.1:0"\n');
  const server = spawn(BINARY, ['serve', '--config', config, '--data-dir', dataDir], { env, stdio: 'ignore' });
  const exited = once(server, 'exit');
  const bundle = path.join(dataDir, 'ca', 'bundle.pem');
  const deadline = Date.now() + 60000;
  try {
    while (!fs.existsSync(bundle)) {
      if (server.exitCode !== null) throw new Error(`zerotouch serve exited (${server.exitCode}) before creating its CA`);
      if (Date.now() > deadline) throw new Error('zerotouch serve did not create its CA within 60 s');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  } finally {
    if (server.exitCode === null) server.kill('SIGTERM');
    await exited;
  }
  return path.join(dataDir, 'ca');
}

async function main() {
  const seed = fs.mkdtempSync(path.join(os.tmpdir(), 'zt-node-ca-'));
  try {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ZEROTOUCH__')));
    const caDir = await createCa(path.join(seed, 'data'), env);
    const files = process.argv.slice(2).length > 0
      ? process.argv.slice(2)
      : fs.readdirSync(__dirname).filter((f) => f.endsWith('.test.js')).sort().map((f) => path.join(__dirname, f));
    const result = spawnSync(process.execPath, ['--test', ...files], {
      stdio: 'inherit',
      env: { ...process.env, NODE_EXTRA_CA_CERTS: path.join(caDir, 'bundle.pem'), ZEROTOUCH_NODE_CA_DIR: caDir },
    });
    return result.status === null ? 1 : result.status;
  } finally {
    fs.rmSync(seed, { recursive: true, force: true });
  }
}

main().then((status) => process.exit(status), (error) => {
  console.error(error);
  process.exit(1);
});
