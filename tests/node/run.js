'use strict';
// Entry point of the Node.js SDK suite (scripts/test runs it): creates the CA every test server
// shares, then runs `node --test` on the test files with that CA trusted through
// NODE_EXTRA_CA_CERTS, the only way to give it to the Node provisioning and service clients.

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFileSync, spawnSync } = require('node:child_process');

const ROOT = path.resolve(__dirname, '..', '..');
const BINARY = process.env.ZEROTOUCH_BIN || path.join(ROOT, 'target', 'debug', 'zerotouch');

const seed = fs.mkdtempSync(path.join(os.tmpdir(), 'zt-node-ca-'));
let status = 1;
try {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ZEROTOUCH__')));
  // `credentials` bootstraps a data dir (CA included) without serving.
  execFileSync(BINARY, ['credentials', '--data-dir', path.join(seed, 'data'), '--json'], { env, stdio: 'ignore' });
  const caDir = path.join(seed, 'data', 'ca');
  const files = process.argv.slice(2).length > 0
    ? process.argv.slice(2)
    : fs.readdirSync(__dirname).filter((f) => f.endsWith('.test.js')).sort().map((f) => path.join(__dirname, f));
  const result = spawnSync(process.execPath, ['--test', ...files], {
    stdio: 'inherit',
    env: { ...process.env, NODE_EXTRA_CA_CERTS: path.join(caDir, 'bundle.pem'), ZEROTOUCH_NODE_CA_DIR: caDir },
  });
  status = result.status === null ? 1 : result.status;
} finally {
  fs.rmSync(seed, { recursive: true, force: true });
}
process.exit(status);
