// `npm run build`: dist/ (ES modules + .d.ts, by tsc) and the minified
// browser bundle (one ES module, by esbuild), written to dist/ and to
// gateway/static/gateway-client.js, which the gateway serves at
// /sdk/gateway-client.js (checked in: the Rust build needs no npm).
// `npm run check-bundle` (--check): rebuilds the bundle in memory and fails
// if the checked-in copy differs.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import * as esbuild from 'esbuild';

const pkgDir = join(dirname(fileURLToPath(import.meta.url)), '..');
const checkedIn = join(pkgDir, '../../gateway/static/gateway-client.js');
const pkg = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));

async function bundle() {
  const out = await esbuild.build({
    entryPoints: [join(pkgDir, 'src/index.ts')],
    bundle: true,
    minify: true,
    format: 'esm',
    target: 'es2020',
    legalComments: 'none',
    write: false,
    logLevel: 'warning',
    banner: {
      js: `/* ${pkg.name} ${pkg.version}: generated from client-sdk/ts by \`npm run build\`; do not edit. */`,
    },
  });
  return out.outputFiles[0].text;
}

const code = await bundle();
const rel = relative(process.cwd(), checkedIn);
if (process.argv.includes('--check')) {
  let current = '';
  try {
    current = readFileSync(checkedIn, 'utf8');
  } catch {
    /* missing */
  }
  if (current !== code) {
    console.error(`check-bundle: ${rel} is stale (or missing): run \`npm run build\` in client-sdk/ts and commit it.`);
    process.exit(1);
  }
  console.log(`check-bundle: ${rel} is up to date`);
} else {
  rmSync(join(pkgDir, 'dist'), { recursive: true, force: true });
  execFileSync(process.execPath, [join(pkgDir, 'node_modules/typescript/bin/tsc'), '-p', pkgDir], { stdio: 'inherit' });
  mkdirSync(join(pkgDir, 'dist'), { recursive: true });
  writeFileSync(join(pkgDir, 'dist/gateway-client.min.js'), code);
  writeFileSync(checkedIn, code);
  const gz = gzipSync(Buffer.from(code), { level: 9 }).length;
  console.log(`build: dist/ (ESM + .d.ts) and ${rel}: ${code.length} bytes minified, ${gz} bytes gzip -9`);
}
