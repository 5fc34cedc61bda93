// What the browser tests share (test/browser.mjs, test/admin.mjs): a relay child process on
// 127.0.0.1:0, cleanups run at the end or on the overall timeout, and steps bounded in time that
// report `ok - …` / `not ok - …`.
import { spawn } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, "../../..");
export const RELAY = process.env.RELAY_BIN || path.join(root, "target/debug/relay");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const STEP_MS = 15_000;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

const cleanups = [];
/** Runs `f` at the end (last registered first). */
export const atEnd = (f) => cleanups.push(f);
export async function cleanup() {
  while (cleanups.length) {
    try {
      await cleanups.pop()();
    } catch {
      /* best effort */
    }
  }
}

/** Ends the process with a failure if the run takes longer than `ms`. */
export function overallTimeout(ms, name) {
  return setTimeout(async () => {
    console.error(`${name}: no result within ${ms} ms, giving up`);
    await cleanup();
    process.exit(1);
  }, ms);
}

/** Starts `relay serve ARGS`; resolves with `{proc, exited, addr}` once it printed
 * `listening on http://ADDR`. Stopped (SIGTERM, then SIGKILL after 10 s) at the end. */
export function startRelay(args) {
  const proc = spawn(RELAY, ["serve", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
  });
  proc.stderr.on("data", (d) => process.stderr.write(`[relay] ${d}`));
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  atEnd(() => stopRelay({ proc, exited }));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("relay did not print its address within 15 s")), 15_000);
    let buf = "";
    proc.stdout.on("data", (d) => {
      buf += d;
      const m = /listening on http:\/\/(\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, exited, addr: m[1] });
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`relay exited early (${code})`));
    });
  });
}

export async function stopRelay(relay) {
  if (relay.proc.exitCode !== null || relay.proc.signalCode !== null) return;
  relay.proc.kill("SIGTERM");
  const r = await Promise.race([relay.exited, sleep(10_000).then(() => null)]);
  if (!r) {
    relay.proc.kill("SIGKILL");
    await relay.exited;
  }
}

const results = [];
/** Runs one named step, bounded by twice STEP_MS; a failure is reported, not thrown. */
export async function step(name, fn) {
  const t0 = Date.now();
  try {
    await Promise.race([fn(), sleep(STEP_MS * 2).then(() => Promise.reject(new Error(`step timed out after ${STEP_MS * 2} ms`)))]);
    results.push({ name, ok: true });
    console.log(`ok - ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`not ok - ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

/** Cleans up, prints the tally and exits (1 when a step failed). */
export async function finish(name, overall) {
  await cleanup();
  clearTimeout(overall);
  const failed = results.filter((r) => !r.ok).length;
  console.log(`\n${name}: ${results.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}
