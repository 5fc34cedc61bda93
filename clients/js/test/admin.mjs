// Browser test of the admin UI (/admin): headless Chromium (Debian's /usr/bin/chromium, driven
// by playwright-core) against a real relay (target/debug/relay serve --admin-password …). Logs
// in, sees the node status, the shards and a channel list, opens the channel inspector, publishes
// from the UI and sees the message reach a WebSocket subscriber of the test (the `ws` package)
// and the page's live tail, logs out; no console error or page error on the way. Every step is
// bounded in time; the whole run is killed after OVERALL_MS.
//
//   node test/admin.mjs            (RELAY_BIN and CHROMIUM override the paths)
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../../..");
const RELAY = process.env.RELAY_BIN || path.join(root, "target/debug/relay");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PASSWORD = "browser test password";
const OVERALL_MS = 120_000;
const STEP_MS = 15_000;

const cleanups = [];
async function cleanup() {
  while (cleanups.length) {
    try {
      await cleanups.pop()();
    } catch {
      /* best effort */
    }
  }
}
const overall = setTimeout(async () => {
  console.error(`admin browser test: no result within ${OVERALL_MS} ms, giving up`);
  await cleanup();
  process.exit(1);
}, OVERALL_MS);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

function startRelay() {
  const proc = spawn(
    RELAY,
    ["serve", "--listen", "127.0.0.1:0", "--admin-password", PASSWORD, "--presence-channels", "room:*", "--drain-period", "0s", "--shutdown-timeout", "3s"],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" } },
  );
  proc.stderr.on("data", (d) => process.stderr.write(`[relay] ${d}`));
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  cleanups.push(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGKILL");
      await exited;
    }
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("relay did not print its address within 15 s")), 15_000);
    let buf = "";
    proc.stdout.on("data", (d) => {
      buf += d;
      const m = /listening on http:\/\/(\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`relay exited early (${code})`));
    });
  });
}

/** A WebSocket subscriber of `channel`; resolves once subscribed, records every message. */
function subscriber(addr, channel) {
  const ws = new WebSocket(`ws://${addr}/ws`);
  cleanups.push(() => ws.close());
  const messages = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("not subscribed within 5 s")), 5000);
    ws.on("error", reject);
    ws.on("open", () => ws.send(JSON.stringify({ type: "subscribe", channel })));
    ws.on("message", (raw) => {
      const m = JSON.parse(String(raw));
      if (m.type === "subscribed") {
        clearTimeout(timer);
        resolve({ ws, messages });
      }
      if (m.type === "message") messages.push(m);
    });
  });
}

const results = [];
async function step(name, fn) {
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

const addr = await startRelay();
console.log(`relay at ${addr}`);
const userDataDir = mkdtempSync(path.join(tmpdir(), "relay-admin-chromium-"));
cleanups.push(() => rmSync(userDataDir, { recursive: true, force: true }));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  timeout: 30_000,
  args: ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
cleanups.push(() => context.close());
context.setDefaultTimeout(STEP_MS);
const page = context.pages()[0] ?? (await context.newPage());
const problems = [];
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") problems.push(`[console ${m.type()}] ${m.text()}`);
});
page.on("pageerror", (e) => problems.push(`[page error] ${e}`));
const text = (sel) => page.locator(sel).innerText();

await step("the page asks for the password, and logs in", async () => {
  await page.goto(`http://${addr}/admin`);
  await page.locator("#login-form").waitFor({ state: "visible" });
  check(await page.locator("#dash").isHidden(), "dashboard shown before login");
  await page.fill("#password", PASSWORD);
  await page.click("#login-form button[type=submit]");
  await page.locator("#dash").waitFor({ state: "visible" });
  await page.waitForFunction(() => /node \S+ · v/.test(document.getElementById("who").textContent));
});

await step("node status, shards and nodes are shown", async () => {
  await page.waitForFunction(() => document.querySelectorAll("#cards .card").length === 6);
  await page.waitForFunction(() => document.querySelectorAll("#shards tbody tr").length >= 1);
  await page.waitForFunction(() => document.querySelector("#nodes tbody").textContent.includes("(this node)"));
  check((await text("#cards")).includes("connections"), "no connections card");
});

let sub;
await step("a channel with a subscriber is listed with its counts", async () => {
  sub = await subscriber(addr, "ui:news");
  const res = await fetch(`http://${addr}/api/publish`, { method: "POST", body: JSON.stringify({ channel: "ui:news", data: { n: 1 } }) });
  check(res.ok, `publish: HTTP ${res.status}`);
  // The list refreshes every 5 s.
  await page.waitForFunction(() => [...document.querySelectorAll("#channels tbody tr")].some((tr) => tr.cells[0].textContent === "ui:news" && tr.cells[1].textContent === "1"), null, { timeout: 12_000 });
});

await step("the inspector shows the history and opens a live tail", async () => {
  await page.locator("#channels tbody a", { hasText: "ui:news" }).click();
  await page.locator("#inspector").waitFor({ state: "visible" });
  await page.waitForFunction(() => document.querySelector("#history tbody").textContent.includes('{"n":1}'));
  await page.waitForFunction(() => document.getElementById("tail-state").textContent === "(live)");
});

await step("a publish from the UI reaches the WebSocket subscriber and the live tail", async () => {
  await page.fill("#pub-channel", "ui:news");
  await page.fill("#pub-data", '{"from":"the admin UI"}');
  await page.click("#publish-form button[type=submit]");
  await page.waitForFunction(() => document.getElementById("pub-result").textContent.includes("seq 2"));
  const deadline = Date.now() + 5000;
  while (!sub.messages.some((m) => m.seq === 2) && Date.now() < deadline) await sleep(20);
  const m = sub.messages.find((x) => x.seq === 2);
  check(m && m.channel === "ui:news" && m.data.from === "the admin UI", `subscriber got ${JSON.stringify(sub.messages)}`);
  await page.waitForFunction(() => document.getElementById("tail").textContent.includes('#2 {"from":"the admin UI"}'));
});

await step("the rates chart counts the publishes", async () => {
  await page.waitForFunction(() => document.getElementById("chart").dataset.samples >= 2, null, { timeout: 5000 });
  const rate = Number(await text("#rate-pub"));
  check(Number.isFinite(rate) && rate >= 0, `rate ${rate}`);
});

await step("log out returns to the login form", async () => {
  await page.click("#logout");
  await page.locator("#login-form").waitFor({ state: "visible" });
  const s = await page.evaluate(() => fetch("/admin/session").then((r) => r.json()));
  check(s.session === false, `session after logout ${JSON.stringify(s)}`);
});

await step("no console errors or page errors", async () => {
  check(problems.length === 0, problems.join("\n"));
});

await cleanup();
clearTimeout(overall);
const failed = results.filter((r) => !r.ok).length;
console.log(`\nadmin browser: ${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
