// End-to-end test of the operator dashboard (GET / on the admin port), in a real browser
// against a real gateway: `target/debug/switchyard up` with the bundled backends on the
// sample policies plus a route under rollout, REST traffic from Node, headless Chromium
// through playwright-core. Nothing is mocked. tests/dashboard/run.sh installs what it needs
// and runs it; it needs target/debug/switchyard (cargo build) and /usr/bin/chromium.
//
// Checks, in order: every sample route has a card with each of its targets in the plan
// tree; the live shares follow the traffic; a rollout is paused and resumed from the page
// (a wrong token shows the gateway's refusal in the rollout box); a weight edit in
// digits.yaml moves the live share on the page within 15 s; a broken policy file shows its
// errors in #reload-errors, and they go once it is fixed; screenshots at laptop and phone
// widths, with no page-wide horizontal scroll on the phone. Every wait is bounded, and the
// whole run is killed after TOTAL_TIMEOUT_MS.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = path.join(ROOT, 'target', 'debug', 'switchyard');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(ROOT, 'target', 'dashboard');
const TOTAL_TIMEOUT_MS = 150_000;
const READY_TIMEOUT_MS = 60_000;
const TRAFFIC_RPS = 50;

const started = performance.now();
const secs = (ms) => (ms / 1000).toFixed(1) + 's';
const log = (msg) => console.log(`[${secs(performance.now() - started).padStart(6)}] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- state and cleanup
let child = null;
let childExited = null; // a promise that resolves on exit
let childOutput = []; // the gateway's last lines (stdout and stderr)
let browser = null;
let currentPage = null;
let tmp = null;
let traffic = null;
let finishing = false;

function remember(stream, chunk) {
  for (const line of chunk.toString().split('\n')) {
    if (!line) continue;
    childOutput.push(`${stream}| ${line}`);
    if (childOutput.length > 300) childOutput.shift();
  }
}

function killGateway(signal) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-child.pid, signal);
  } catch (_) {
    /* already gone */
  }
}

async function cleanup() {
  if (traffic) traffic.stop();
  if (browser) await Promise.race([browser.close().catch(() => {}), sleep(5000)]);
  browser = null;
  if (child && child.exitCode === null && child.signalCode === null) {
    killGateway('SIGTERM');
    const exited = await Promise.race([childExited.then(() => true), sleep(5000).then(() => false)]);
    if (!exited) {
      killGateway('SIGKILL');
      await Promise.race([childExited, sleep(2000)]);
    }
  }
}

async function fail(err) {
  if (finishing) return;
  finishing = true;
  const msg = err && err.stack ? err.stack : String(err);
  console.error(`\nFAIL after ${secs(performance.now() - started)}: ${msg}`);
  if (currentPage) {
    try {
      fs.mkdirSync(SHOTS, { recursive: true });
      const shot = path.join(SHOTS, 'dashboard-failure.png');
      await Promise.race([currentPage.screenshot({ path: shot, fullPage: true }), sleep(5000)]);
      console.error(`the page when it failed: ${shot}`);
    } catch (_) {
      /* no screenshot */
    }
  }
  if (traffic) console.error(`traffic: ${traffic.summary()}`);
  if (childOutput.length) {
    console.error(`\n--- the gateway's last ${childOutput.length} lines ---\n${childOutput.join('\n')}\n---`);
  }
  if (tmp) console.error(`the test's files are kept in ${tmp}`);
  await cleanup();
  process.exit(1);
}

// The last resort: whatever happens, the gateway's process group does not outlive us.
process.on('exit', () => killGateway('SIGKILL'));
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => fail(new Error(`interrupted by ${sig}`)));
process.on('unhandledRejection', (e) => fail(e));
process.on('uncaughtException', (e) => fail(e));
const totalTimer = setTimeout(() => fail(new Error(`the whole test took over ${TOTAL_TIMEOUT_MS / 1000} s`)), TOTAL_TIMEOUT_MS);

// ---------------------------------------------------------------- helpers
class CheckError extends Error {}
const check = (cond, msg) => {
  if (!cond) throw new CheckError(typeof msg === 'function' ? msg() : msg);
};

let stepStart = performance.now();
async function step(name, fn) {
  stepStart = performance.now();
  let note;
  try {
    note = await fn();
  } catch (e) {
    e.message = `${name}: ${e.message}`;
    throw e;
  }
  log(`ok  ${name} (${secs(performance.now() - stepStart)})${note ? ': ' + note : ''}`);
}

/** Polls `probe` every `every` ms until it returns a truthy value; throws `why(last)` after `ms`. */
async function until(ms, probe, why, every = 200) {
  const deadline = performance.now() + ms;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (performance.now() > deadline) throw new CheckError(await why(last));
    await sleep(every);
  }
}

async function freePorts(n) {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise((resolve, reject) => {
      const s = net.createServer();
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => resolve(s));
    })),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

/** Writes `text` to `file` as editors do: a temporary file beside it, renamed over it. */
function writeAtomically(file, text) {
  const temp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.writeFileSync(temp, text);
  fs.renameSync(temp, file);
}

/** Route name and target names of a policy file (the `route:` line, the keys under `targets:`). */
function describePolicy(file) {
  const text = fs.readFileSync(file, 'utf8');
  const route = (text.match(/^route:\s*([^\s#]+)/m) || [])[1];
  const targets = [];
  const lines = text.split('\n');
  const at = lines.findIndex((l) => /^targets:\s*$/.test(l));
  if (at >= 0) {
    for (const l of lines.slice(at + 1)) {
      if (/^\s*(#.*)?$/.test(l)) continue;
      if (!/^\s/.test(l)) break;
      const m = l.match(/^ {2}([A-Za-z0-9_.-]+):/);
      if (m) targets.push(m[1]);
    }
  }
  return { file: path.basename(file), route, targets };
}

async function getJson(url, headers = {}) {
  const res = await fetch(url, { headers, signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (_) {
    /* not JSON */
  }
  return { status: res.status, body, text };
}

// ---------------------------------------------------------------- traffic
/** REST requests in the background at about `rps` a second, spread over `routes` by weight. */
function startTraffic(httpPort, routes, rows, rps) {
  const order = [];
  for (const { route, weight } of routes) for (let i = 0; i < weight; i++) order.push(route);
  // Interleave: digits, digits-canary, digits, ... rather than runs of one route.
  order.sort(() => Math.random() - 0.5);
  const stats = new Map(routes.map(({ route }) => [route, { sent: 0, statuses: new Map(), targets: new Map(), lastError: null }]));
  let next = 0;
  let inFlight = 0;
  let skipped = 0;
  let stopped = false;
  const maxInFlight = 32;

  async function one(route) {
    const s = stats.get(route);
    s.sent++;
    inFlight++;
    const row = rows[Math.floor(Math.random() * rows.length)];
    try {
      const res = await fetch(`http://127.0.0.1:${httpPort}/v2/models/${route}/infer`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-user-id': 'user-' + crypto.randomBytes(6).toString('hex') },
        body: JSON.stringify({ inputs: [{ name: 'INPUT__0', shape: [1, 64], datatype: 'FP32', data: row }] }),
        signal: AbortSignal.timeout(10_000),
      });
      const body = await res.text();
      s.statuses.set(res.status, (s.statuses.get(res.status) || 0) + 1);
      if (res.status === 200) {
        const t = res.headers.get('x-switchyard-target') || '?';
        s.targets.set(t, (s.targets.get(t) || 0) + 1);
      } else {
        s.lastError = `${res.status}: ${body.slice(0, 300)}`;
      }
    } catch (e) {
      s.statuses.set('error', (s.statuses.get('error') || 0) + 1);
      s.lastError = String(e && e.cause ? `${e.message} (${e.cause.message || e.cause})` : e);
    } finally {
      inFlight--;
    }
  }

  const period = 1000 / rps;
  const timer = setInterval(() => {
    if (stopped) return;
    if (inFlight >= maxInFlight) {
      skipped++;
      return;
    }
    one(order[next++ % order.length]);
  }, period);

  return {
    stats,
    stop() {
      stopped = true;
      clearInterval(timer);
    },
    ok(route) {
      return stats.get(route).statuses.get(200) || 0;
    },
    totals() {
      let sent = 0;
      let ok = 0;
      for (const s of stats.values()) {
        for (const [k, v] of s.statuses) {
          sent += v;
          if (k === 200) ok += v;
        }
      }
      return { answered: sent, ok, skipped, inFlight };
    },
    summary() {
      const parts = [];
      for (const [route, s] of stats) {
        const st = [...s.statuses].map(([k, v]) => `${k}×${v}`).join(' ') || 'none yet';
        parts.push(`${route}: ${st}${s.lastError ? ` (last failure ${s.lastError})` : ''}`);
      }
      const t = this.totals();
      return `${t.ok}/${t.answered} answered 200, ${t.skipped} ticks skipped at ${maxInFlight} in flight\n  ${parts.join('\n  ')}`;
    },
  };
}

// ---------------------------------------------------------------- the test
async function main() {
  check(fs.existsSync(BIN), `${BIN} is missing: build it first (cargo build, as the test step of .ci/run does)`);
  check(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium (tests/dashboard/run.sh does)`);

  fs.rmSync(path.join(SHOTS, 'dashboard-failure.png'), { force: true });
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'switchyard-dashboard-'));
  const policies = path.join(tmp, 'policies');
  const state = path.join(tmp, 'state');
  fs.mkdirSync(policies);
  fs.mkdirSync(state);

  // ---- the deployment: sample policies, one route under rollout, free ports
  let routes;
  const [httpPort, grpcPort, adminPort, stablePort, canaryPort] = await freePorts(5);
  const token = crypto.randomBytes(18).toString('base64url');
  await step('setup', () => {
    for (const f of fs.readdirSync(path.join(ROOT, 'policies')).filter((f) => f.endsWith('.yaml')).sort()) {
      fs.copyFileSync(path.join(ROOT, 'policies', f), path.join(policies, f));
    }
    // Modeled on tests/rollout.rs `policy(...)`: a good candidate under a slow ramp (at least
    // 5 × 10 s to complete), so it is still ramping when the page pauses it.
    fs.writeFileSync(path.join(policies, 'digits-canary.yaml'), [
      '# A canary rollout of the MLP v2 (the dashboard test adds this route).',
      'version: 1',
      'route: digits-canary',
      'targets:',
      '  stable: { backend: stable, model: digits_mlp, version: 1 }',
      '  cand: { backend: canary, model: digits_mlp, version: 2 }',
      'default: stable',
      'fallback: [stable]',
      'retry: { attempts: 1, idempotent: true }',
      'deadline: 1s',
      'shadow: { target: cand, percent: 100 }',
      'rollout:',
      '  candidate: cand',
      '  baseline: stable',
      '  steps: [5, 10, 20, 50, 100]',
      '  interval: 10s',
      '  min_requests: 5',
      '  gates:',
      '    error_rate: { max_increase: 0.05 }',
      '',
    ].join('\n'));
    routes = fs.readdirSync(policies).filter((f) => f.endsWith('.yaml')).sort().map((f) => describePolicy(path.join(policies, f)));
    for (const r of routes) check(r.route && r.targets.length, `cannot read the route and targets of ${r.file}`);

    const tokenFile = path.join(tmp, 'admin-token');
    fs.writeFileSync(tokenFile, token + '\n', { mode: 0o600 });
    let cfg = fs.readFileSync(path.join(ROOT, 'config', 'gateway.yaml'), 'utf8');
    const sub = (re, to, what) => {
      check(re.test(cfg), `config/gateway.yaml has no ${what} to replace (${re})`);
      cfg = cfg.replace(re, to);
    };
    const addr = (port) => (_, head) => `${head}127.0.0.1:${port}`;
    sub(/^(\s+http:\s*)127\.0\.0\.1:\d+/m, addr(httpPort), 'listen.http');
    sub(/^(\s+grpc:\s*)127\.0\.0\.1:\d+/m, addr(grpcPort), 'listen.grpc');
    sub(/^(\s+admin:\s*)127\.0\.0\.1:\d+/m, addr(adminPort), 'listen.admin');
    sub(/^policies:.*$/m, () => `policies: ${JSON.stringify(policies)}`, 'policies');
    sub(/^state_dir:.*$/m, () => `state_dir: ${JSON.stringify(state)}`, 'state_dir');
    sub(/^(\s+stable:\s*\n\s+endpoints:\s*)\[[^\]]*\]/m, (_, head) => `${head}["127.0.0.1:${stablePort}"]`, 'backends.stable.endpoints');
    sub(/^(\s+canary:\s*\n\s+endpoints:\s*)\[[^\]]*\]/m, (_, head) => `${head}["127.0.0.1:${canaryPort}"]`, 'backends.canary.endpoints');
    sub(/^admin:[ \t]*\n(?:[ \t]+.*(?:\n|$))*/m, () => `admin:\n  token_file: ${JSON.stringify(tokenFile)}\n`, 'admin section');
    fs.writeFileSync(path.join(tmp, 'gateway.yaml'), cfg);
    return `${routes.length} routes in ${tmp}; http ${httpPort}, grpc ${grpcPort}, admin ${adminPort}, backends ${stablePort} and ${canaryPort}`;
  });

  const admin = `http://127.0.0.1:${adminPort}`;
  const auth = { Authorization: `Bearer ${token}` };

  // ---- the gateway
  await step('gateway ready', async () => {
    child = spawn(BIN, ['up', '--config', path.join(tmp, 'gateway.yaml'), '--model-repository', 'backends/model_repository'], {
      cwd: ROOT,
      detached: true, // its own process group: killed as one, backends included
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    childExited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    child.stdout.on('data', (c) => remember('out', c));
    child.stderr.on('data', (c) => remember('err', c));
    childExited.then(({ code, signal }) => {
      if (!finishing) fail(new Error(`the gateway exited (code ${code}, signal ${signal}) before the test was done`));
    });
    await until(READY_TIMEOUT_MS, async () => {
      try {
        return (await fetch(`${admin}/v2/health/ready`, { signal: AbortSignal.timeout(2000) })).status === 200;
      } catch (_) {
        return false;
      }
    }, () => `GET ${admin}/v2/health/ready did not answer 200 within ${READY_TIMEOUT_MS / 1000} s`, 250);
    const up = childOutput.find((l) => l.includes('switchyard up listening'));
    return up ? up.replace(/^out\| /, '') : undefined;
  });

  // ---- traffic
  const rows = JSON.parse(fs.readFileSync(path.join(ROOT, 'backends', 'sample_data', 'digits_holdout.json'), 'utf8')).features;
  check(Array.isArray(rows) && rows.length && rows[0].length === 64, 'backends/sample_data/digits_holdout.json has no 64-wide feature rows');
  const weightOf = (route) => (route === 'digits' || route === 'digits-canary' ? 4 : 1);
  traffic = startTraffic(httpPort, routes.map((r) => ({ route: r.route, weight: weightOf(r.route) })), rows, TRAFFIC_RPS);
  const trafficStarted = performance.now();
  await step('traffic answered on every route', async () => {
    await until(15_000, () => routes.every((r) => traffic.ok(r.route) > 0),
      () => `not every route answered 200 within 15 s:\n  ${traffic.summary()}`);
    return `~${TRAFFIC_RPS} req/s over ${routes.length} routes`;
  });

  // ---- the browser
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  const problems = []; // script errors and CSP violations on any page
  const watch = (page, label) => {
    page.on('pageerror', (e) => problems.push(`${label}: script error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) problems.push(`${label}: ${m.text()}`);
    });
  };
  const laptop = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await laptop.newPage();
  currentPage = page;
  watch(page, 'laptop');
  const card = (route) => page.locator(`[data-route="${route}"]`);

  await step('page loads', async () => {
    const res = await page.goto(`${admin}/`, { waitUntil: 'load', timeout: 15_000 });
    check(res && res.status() === 200, `GET / answered ${res && res.status()}`);
    check((await page.title()) === 'Switchyard', `the title is ${JSON.stringify(await page.title())}`);
    await until(10_000, async () => (await page.locator('[data-route]').count()) >= routes.length,
      async () => `the page shows ${await page.locator('[data-route]').count()} route cards, not ${routes.length}`);
    return `${(res.headers()['content-security-policy'] || 'no content-security-policy').slice(0, 60)}…`;
  });

  await step('a card per route, each target in its plan tree', async () => {
    const shown = await page.locator('[data-route]').evaluateAll((els) => els.map((e) => e.getAttribute('data-route')));
    const names = routes.map((r) => r.route).sort();
    check(JSON.stringify(shown) === JSON.stringify([...shown].sort()), `the cards are not sorted by name: ${shown.join(', ')}`);
    const missing = [];
    for (const r of routes) {
      if ((await card(r.route).count()) !== 1) {
        missing.push(`no card for route ${r.route} (${r.file})`);
        continue;
      }
      for (const t of r.targets) {
        if ((await card(r.route).locator(`[data-target="${t}"]`).count()) === 0) missing.push(`${r.route}: no [data-target="${t}"]`);
      }
    }
    check(!missing.length, () => `${missing.join('; ')} (cards: ${shown.join(', ')})`);
    return `${names.length} cards, ${routes.reduce((n, r) => n + r.targets.length, 0)} targets`;
  });

  const digitsShares = () => page.evaluate(() => {
    const out = {};
    for (const tr of document.querySelectorAll('[data-route="digits"] tr[data-answer]')) {
      out[tr.getAttribute('data-answer')] = {
        share: tr.hasAttribute('data-share') ? Number(tr.getAttribute('data-share')) : null,
        text: tr.querySelector('.share-recent') ? tr.querySelector('.share-recent').textContent : null,
      };
    }
    return out;
  });

  await step('live shares follow the 90/10 split', async () => {
    let seen;
    await until(15_000, async () => {
      seen = await digitsShares();
      return seen['mlp-v1'] && seen['mlp-v1'].share > 0.75 && seen['mlp-v2'] && seen['mlp-v2'].share > 0;
    }, () => `digits shares on the page: ${JSON.stringify(seen)}`, 250);
    for (const [name, { share, text }] of Object.entries(seen)) {
      const want = share == null ? '—' : `${(share * 100).toFixed(1)}%`;
      check(text === want || (text === '—' && share === 0), `digits ${name}: the share cell says ${JSON.stringify(text)} for data-share ${share}`);
    }
    return `mlp-v1 ${seen['mlp-v1'].text}, mlp-v2 ${seen['mlp-v2'].text}`;
  });

  // ---- the rollout, from the page
  const ro = page.locator('[data-rollout="digits-canary"]');
  const roState = () => ro.getAttribute('data-state', { timeout: 2000 }).catch(() => null);
  const roReason = async () => (await getJson(`${admin}/admin/rollouts/digits-canary`, auth)).text.slice(0, 600);
  await step('rollout command with a wrong token shows the refusal', async () => {
    const s = await until(10_000, roState, () => 'no [data-rollout="digits-canary"] on the page');
    if (s !== 'ramping') throw new CheckError(`the rollout is ${s}, not ramping: ${await roReason()}`);
    await page.fill('#token', 'not-the-token');
    await ro.locator('button[data-action="pause"]').click({ timeout: 5000 });
    const err = ro.locator('.action-error');
    await err.waitFor({ state: 'visible', timeout: 5000 });
    const text = await err.textContent();
    check(/401/.test(text) && /token/i.test(text), `.action-error says ${JSON.stringify(text)}`);
    check((await roState()) === 'ramping', 'a refused pause changed the state');
    return JSON.stringify(text);
  });

  await step('pause from the page', async () => {
    await page.fill('#token', token);
    check(await page.evaluate(() => sessionStorage.getItem('switchyard-token')) === token, 'the token is not in sessionStorage under switchyard-token');
    await ro.locator('button[data-action="pause"]').click({ timeout: 5000 });
    await until(10_000, async () => (await roState()) === 'paused',
      async () => `data-state is ${await roState()} 10 s after pause; action error: ${await ro.locator('.action-error').textContent().catch(() => 'none')}`);
    const api = await getJson(`${admin}/admin/rollouts/digits-canary`, auth);
    check(api.status === 200 && api.body && api.body.state === 'paused', `GET /admin/rollouts/digits-canary says ${api.status} ${api.text.slice(0, 300)}`);
    check((await ro.locator('.action-error').count()) === 0, 'an .action-error is still shown after a good pause');
    return `the page and GET /admin/rollouts/digits-canary say paused at step ${api.body.step}`;
  });

  await step('resume from the page', async () => {
    await ro.locator('button[data-action="resume"]').click({ timeout: 5000 });
    await until(10_000, async () => {
      const s = await roState();
      return s && s !== 'paused';
    }, async () => `data-state is still ${await roState()} 10 s after resume`);
    const api = await getJson(`${admin}/admin/rollouts/digits-canary`, auth);
    check(api.body && api.body.state !== 'paused', `GET /admin/rollouts/digits-canary says ${api.text.slice(0, 300)}`);
    return `now ${await roState()}`;
  });

  await step('the token survives a reload of the page', async () => {
    await page.reload({ waitUntil: 'load' });
    check((await page.inputValue('#token')) === token, 'the token field is empty after a reload');
    await until(10_000, async () => (await page.locator('[data-route]').count()) >= routes.length, () => 'no cards after a reload');
  });

  // ---- a weight edit
  await step('weight edit moves the live share within 15 s', async () => {
    const file = path.join(policies, 'digits.yaml');
    const before = fs.readFileSync(file, 'utf8');
    const after = before.replace('mlp-v1: 90, mlp-v2: 10', 'mlp-v1: 10, mlp-v2: 90');
    check(after !== before, 'policies/digits.yaml has no "mlp-v1: 90, mlp-v2: 10" to edit');
    const edited = performance.now();
    writeAtomically(file, after);
    const seen = [];
    await until(15_000, async () => {
      const s = await digitsShares();
      const v2 = s['mlp-v2'] ? s['mlp-v2'].share : undefined;
      seen.push(`${secs(performance.now() - edited)} ${v2 === undefined ? 'no row' : v2 == null ? 'null' : v2.toFixed(3)}`);
      return typeof v2 === 'number' && v2 > 0.7;
    }, () => `the digits card's mlp-v2 data-share never passed 0.7; seen: ${seen.join(', ')}`, 250);
    const took = secs(performance.now() - edited);
    // The plan tree shows the new weights too.
    const arms = await card('digits').locator('.tree .weight[data-weight]').evaluateAll((els) => els.map((e) => {
      const leaf = e.closest('.node') && e.closest('.node').querySelector('[data-target]');
      return `${leaf ? leaf.getAttribute('data-target') : '?'}=${e.getAttribute('data-weight')}`;
    }));
    check(arms.includes('mlp-v1=10') && arms.includes('mlp-v2=90'), `the digits plan tree shows the split as ${arms.join(', ')}`);
    return `mlp-v2 share ${seen[seen.length - 1].split(' ')[1]} on the page ${took} after the edit; tree ${arms.join(', ')}`;
  });

  // ---- a broken policy
  await step('a broken policy shows its errors, and they go when it is fixed', async () => {
    const file = path.join(policies, 'digits-linear.yaml');
    const good = fs.readFileSync(file, 'utf8');
    const bad = good.replace(/^default:.*$/m, 'default: no-such-target');
    check(bad !== good, 'policies/digits-linear.yaml has no default: line to break');
    const version = await page.locator('#policy-version').getAttribute('data-version');
    writeAtomically(file, bad);
    const box = page.locator('#reload-errors');
    await box.waitFor({ state: 'visible', timeout: 10_000 }).catch(async () => {
      const p = await getJson(`${admin}/admin/policy`, auth);
      throw new CheckError(`#reload-errors did not show within 10 s; GET /admin/policy: ${p.text.slice(0, 500)}`);
    });
    const text = await box.textContent();
    check(text.includes('digits-linear.yaml'), `#reload-errors does not name digits-linear.yaml: ${JSON.stringify(text)}`);
    const errors = await box.locator('li').allTextContents();
    check(errors.length >= 1 && errors.some((e) => e.includes('digits-linear.yaml')), `#reload-errors has no element per error naming the file: ${JSON.stringify(errors)}`);
    const items = errors.length;
    check((await card('digits-linear').count()) === 1, 'the digits-linear card went with the failed reload (its policy stays in force)');
    check((await page.locator('#policy-version').getAttribute('data-version')) === version, 'the policy version changed on a failed reload');
    const shown = Date.now();
    writeAtomically(file, good);
    await box.waitFor({ state: 'hidden', timeout: 10_000 }).catch(() => {
      throw new CheckError('#reload-errors is still shown 10 s after the file was fixed');
    });
    const result = await page.locator('#last-reload').getAttribute('data-result');
    check(result === 'ok', `the last reload shows ${result} after the fix`);
    return `${items} error(s), ${JSON.stringify(errors[0].slice(0, 200))}; gone ${secs(Date.now() - shown)} after the fix`;
  });

  // ---- screenshots at two widths
  await step('laptop screenshot (1366×900)', async () => {
    const wait = 5000 - (performance.now() - trafficStarted);
    if (wait > 0) await sleep(wait);
    fs.mkdirSync(SHOTS, { recursive: true });
    await sleep(1200); // one more poll after the last change
    const file = path.join(SHOTS, 'dashboard-laptop.png');
    await page.screenshot({ path: file, fullPage: true });
    // The first screenful too: the README's picture (docs/dashboard.png is a copy).
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-top.png') });
    return path.relative(ROOT, file);
  });

  await step('phone screenshot (375×812), no page-wide horizontal scroll', async () => {
    const ctx = await browser.newContext({ viewport: { width: 375, height: 812 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    const phone = await ctx.newPage();
    currentPage = phone;
    watch(phone, 'phone');
    await phone.goto(`${admin}/`, { waitUntil: 'load', timeout: 15_000 });
    await until(10_000, async () => (await phone.locator('[data-route]').count()) >= routes.length, () => 'no cards on the phone');
    await sleep(1200);
    const width = await phone.evaluate(() => document.documentElement.scrollWidth);
    check(width <= 375 + 1, `the page is ${width} px wide on a 375 px phone: it scrolls sideways`);
    const xs = await phone.locator('[data-route]').evaluateAll((els) => [...new Set(els.map((e) => Math.round(e.getBoundingClientRect().left)))]);
    check(xs.length === 1, `the cards are not in one column on the phone (left edges ${xs.join(', ')})`);
    const file = path.join(SHOTS, 'dashboard-phone.png');
    await phone.screenshot({ path: file, fullPage: true });
    currentPage = page;
    await ctx.close();
    return `${path.relative(ROOT, file)}; scrollWidth ${width}`;
  });

  await step('no script errors or blocked resources on the page', () => {
    check(!problems.length, () => problems.join('\n'));
  });

  await step('the traffic was answered', () => {
    const t = traffic.totals();
    traffic.stop();
    check(t.answered > 0 && t.ok / t.answered >= 0.95, () => `only ${t.ok} of ${t.answered} requests answered 200:\n  ${traffic.summary()}`);
    return `${t.ok} of ${t.answered} answered 200 in ${secs(performance.now() - trafficStarted)}`;
  });
}

try {
  await main();
  finishing = true;
  await cleanup();
  clearTimeout(totalTimer);
  log(`all dashboard checks passed in ${secs(performance.now() - started)}`);
  fs.rmSync(tmp, { recursive: true, force: true });
  process.exit(0);
} catch (e) {
  await fail(e);
}
