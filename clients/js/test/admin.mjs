// Browser test of the admin UI (/admin): headless Chromium (Debian's /usr/bin/chromium, driven
// by playwright-core) against a real relay (target/debug/relay serve --admin-password …). Logs
// in, sees the node status, the shards and a channel list, opens the channel inspector, publishes
// from the UI and sees the message reach a WebSocket subscriber of the test (the `ws` package)
// and the page's live tail, logs out; no console error or page error on the way. Every step is
// bounded in time; the whole run is killed after 120 s.
//
//   node test/admin.mjs            (RELAY_BIN and CHROMIUM override the paths)
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { CHROMIUM, STEP_MS, atEnd, check, finish, overallTimeout, sleep, startRelay, step } from "./harness.mjs";

const PASSWORD = "browser test password";
const overall = overallTimeout(120_000, "admin browser test");

/** A WebSocket subscriber of `channel`; resolves once subscribed, records every message. */
function subscriber(addr, channel) {
  const ws = new WebSocket(`ws://${addr}/ws`);
  atEnd(() => ws.close());
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

const { addr } = await startRelay(["--listen", "127.0.0.1:0", "--admin-password", PASSWORD, "--presence-channels", "room:*", "--drain-period", "0s", "--shutdown-timeout", "3s"]);
console.log(`relay at ${addr}`);
const userDataDir = mkdtempSync(path.join(tmpdir(), "relay-admin-chromium-"));
atEnd(() => rmSync(userDataDir, { recursive: true, force: true }));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  timeout: 30_000,
  args: ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
atEnd(() => context.close());
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

await finish("admin browser", overall);
