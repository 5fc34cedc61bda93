// relay speaks Pusher Channels: the unmodified official libraries from npm against a real relay
// (target/debug/relay serve --pusher-app …):
// - pusher-js in Node: public, private (auth endpoint served here with the `pusher` server
//   library's authorizeChannel) and presence channels, events from `trigger` and
//   `triggerBatch`, member_added / member_removed, a client event from one client to another,
//   sign-in (authenticateUser) and a server-to-user event (sendToUser);
// - webhooks in Pusher's format (--pusher-webhook): a receiver here verifies each POST with the
//   `pusher` library's own `pusher.webhook({headers, rawBody}).isValid()` and collects
//   `getEvents()`: channel_occupied, member_added, client_event, member_removed, channel_vacated;
// - a relay-protocol WebSocket client on the same channel gets the same publishes;
// - headless Chromium (Debian's /usr/bin/chromium via playwright-core): pusher-js's browser
//   bundle under Laravel Echo (Echo.channel / private / join, whisper).
// Every step is bounded in time; the whole run is killed after OVERALL_MS.
//
//   node test/pusher.mjs            (RELAY_BIN and CHROMIUM override the paths)
import { spawn } from "node:child_process";
import http from "node:http";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import PusherServer from "pusher";
import PusherJS from "pusher-js";
import WebSocket from "ws";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../../..");
const modules = path.resolve(here, "../node_modules");
const RELAY = process.env.RELAY_BIN || path.join(root, "target/debug/relay");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const OVERALL_MS = 150_000;
const STEP_MS = 10_000;
const APP = { appId: "app1", key: "key1", secret: "secret-one-1234" };

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
  console.error(`pusher test: no result within ${OVERALL_MS} ms, giving up`);
  await cleanup();
  process.exit(1);
}, OVERALL_MS);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves with the first value `pred` returns truthy for, polling; fails after STEP_MS. */
async function until(what, pred, ms = STEP_MS) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Starts the relay; resolves with its address once it printed `listening on http://ADDR`. */
function startRelay(extra = []) {
  const app = `${APP.appId}:${APP.key}:${APP.secret}:client_events=true`;
  const args = ["serve", "--listen", "127.0.0.1:0", "--pusher-app", app, "--drain-period", "0s", "--shutdown-timeout", "3s", ...extra];
  const proc = spawn(RELAY, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
  });
  proc.stderr.on("data", (d) => process.stderr.write(`[relay] ${d}`));
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  cleanups.push(async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    if (!(await Promise.race([exited.then(() => true), sleep(8000)]))) proc.kill("SIGKILL");
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
    proc.once("exit", (code) => reject(new Error(`relay exited early (${code})`)));
  });
}

/**
 * The app's webhook endpoint, as an app written for Pusher has it: every POST goes through the
 * `pusher` library's verifier (`pusher.webhook`). Resolves with its address; `hooks` collects
 * `{valid, events}` per POST.
 */
function startWebhookReceiver(server, hooks) {
  const srv = http.createServer((req, res) => {
    let rawBody = "";
    req.setEncoding("utf8");
    req.on("data", (d) => (rawBody += d));
    req.on("end", () => {
      const hook = server.webhook({ headers: req.headers, rawBody });
      const valid = hook.isValid();
      hooks.push({ valid, events: valid ? hook.getEvents() : [], time: valid ? hook.getTime() : null });
      res.writeHead(valid ? 200 : 401);
      res.end();
    });
  });
  cleanups.push(() => new Promise((r) => srv.close(r)));
  return new Promise((resolve) => srv.listen(0, "127.0.0.1", () => resolve(`127.0.0.1:${srv.address().port}`)));
}

/** The app's backend: the auth endpoints (the `pusher` library signs) and the browser page. */
function startBackend(server, relayPort) {
  const page = `<!doctype html><meta charset="utf-8"><title>pusher test</title>
<script src="/pusher.js"></script><script src="/echo.js"></script>
<script>window.relayPort = ${relayPort};</script>`;
  const files = {
    "/": ["text/html", page],
    "/pusher.js": ["text/javascript", readFileSync(path.join(modules, "pusher-js/dist/web/pusher.min.js"))],
    "/echo.js": ["text/javascript", readFileSync(path.join(modules, "laravel-echo/dist/echo.iife.js"))],
  };
  const srv = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    if (url.pathname === "/favicon.ico") {
      res.writeHead(204);
      return res.end();
    }
    if (req.method === "GET" && files[url.pathname]) {
      const [type, body] = files[url.pathname];
      res.writeHead(200, { "content-type": type });
      return res.end(body);
    }
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const form = new URLSearchParams(body);
      const socketId = form.get("socket_id");
      const user = url.searchParams.get("user") || "anon";
      let answer;
      if (url.pathname === "/pusher/auth") {
        const channel = form.get("channel_name");
        const presence = channel.startsWith("presence-") ? { user_id: user, user_info: { name: user.toUpperCase() } } : undefined;
        answer = server.authorizeChannel(socketId, channel, presence);
      } else if (url.pathname === "/pusher/user-auth") {
        answer = server.authenticateUser(socketId, { id: user, name: user });
      } else {
        res.writeHead(404);
        return res.end();
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(answer));
    });
  });
  cleanups.push(() => new Promise((r) => srv.close(r)));
  return new Promise((resolve) => srv.listen(0, "127.0.0.1", () => resolve(`127.0.0.1:${srv.address().port}`)));
}

/** A pusher-js client in Node, connected. */
async function nodeClient(relayPort, backend, user) {
  const p = new PusherJS(APP.key, {
    cluster: "mt1",
    wsHost: "127.0.0.1",
    wsPort: relayPort,
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: { endpoint: `http://${backend}/pusher/auth?user=${user}`, transport: "ajax" },
    userAuthentication: { endpoint: `http://${backend}/pusher/user-auth?user=${user}`, transport: "ajax" },
  });
  cleanups.push(() => p.disconnect());
  await until(`${user} connected`, () => p.connection.state === "connected");
  return p;
}

/** Subscribes and records every event of the channel. */
async function sub(p, name) {
  const ch = p.subscribe(name);
  const got = [];
  ch.bind_global((event, data) => got.push({ event, data }));
  const failed = [];
  ch.bind("pusher:subscription_error", (e) => failed.push(e));
  await until(`subscription to ${name}`, () => {
    if (failed.length) throw new Error(`subscription to ${name} failed: ${JSON.stringify(failed[0])}`);
    return ch.subscribed;
  });
  return { ch, got };
}

const seen = (rec, event, pred = () => true) => until(`${event}`, () => rec.got.find((e) => e.event === event && pred(e.data)));

async function main() {
  // The webhook verifier needs only the app's key and secret; the relay's port is not known yet.
  const verifier = new PusherServer({ ...APP, host: "127.0.0.1", useTLS: false });
  const hooks = [];
  const hookAddr = await startWebhookReceiver(verifier, hooks);
  // Every kind, on the channels of this test's webhook part only (`*hooked`).
  const kinds = "channel_occupied+channel_vacated+member_added+member_removed+client_event";
  const relayAddr = await startRelay(["--pusher-webhook", `${APP.appId}:${kinds};*hooked@http://${hookAddr}/pusher/webhooks`, "--webhook-batch-delay", "10ms"]);
  const relayPort = Number(relayAddr.split(":").pop());
  const server = new PusherServer({ ...APP, host: "127.0.0.1", port: String(relayPort), useTLS: false });
  const backend = await startBackend(server, relayPort);

  // --- pusher-js in Node ---
  const alice = await nodeClient(relayPort, backend, "alice");
  const bob = await nodeClient(relayPort, backend, "bob");
  const news = await sub(alice, "news");
  const aliceChat = await sub(alice, "private-chat");
  await sub(bob, "private-chat");
  const room = await sub(alice, "presence-room");
  assert.equal(room.ch.members.count, 1);
  await sub(bob, "presence-room");
  const added = await seen(room, "pusher:member_added", (m) => m.id === "bob");
  assert.deepEqual(added.data.info, { name: "BOB" });
  console.log("ok - public, private and presence subscriptions; member_added");

  // The same channel through relay's own protocol.
  const relayWs = new WebSocket(`ws://${relayAddr}/ws`);
  cleanups.push(() => relayWs.close());
  const relayGot = [];
  relayWs.on("message", (m) => relayGot.push(JSON.parse(m.toString())));
  await new Promise((r, j) => (relayWs.once("open", r), relayWs.once("error", j)));
  relayWs.send(JSON.stringify({ type: "subscribe", channel: "pusher/app1/news" }));
  await until("relay subscribed", () => relayGot.find((m) => m.type === "subscribed"));

  await server.trigger("news", "headline", { title: "one" });
  await server.triggerBatch([
    { channel: "news", name: "headline", data: { title: "two" } },
    { channel: "private-chat", name: "note", data: "plain string" },
  ]);
  await seen(news, "headline", (d) => d.title === "one");
  await seen(news, "headline", (d) => d.title === "two");
  await seen(aliceChat, "note", (d) => d === "plain string");
  const order = news.got.filter((e) => e.event === "headline").map((e) => e.data.title);
  assert.deepEqual(order, ["one", "two"]);
  await until("relay client got both", () => relayGot.filter((m) => m.type === "message").length >= 2);
  const relayOrder = relayGot.filter((m) => m.type === "message").map((m) => [m.seq, m.data.event, JSON.parse(m.data.data).title]);
  assert.deepEqual(relayOrder, [
    [1, "headline", "one"],
    [2, "headline", "two"],
  ]);
  console.log("ok - trigger and triggerBatch reach pusher-js and a relay client, in the same order");

  bob.channel("private-chat").trigger("client-typing", { who: "bob" });
  await seen(aliceChat, "client-typing", (d) => d.who === "bob");
  console.log("ok - a client event from one pusher-js client reaches another");

  bob.signin();
  await until("bob signed in", () => bob.user.user_data && bob.user.user_data.id === "bob");
  const toBob = [];
  bob.user.bind("private-message", (d) => toBob.push(d));
  await sleep(200); // the user channel subscribes after signin_success
  await server.sendToUser("bob", "private-message", { hi: 1 });
  await until("sendToUser", () => toBob.length === 1);
  console.log("ok - signin and sendToUser");

  bob.disconnect();
  await seen(room, "pusher:member_removed", (m) => m.id === "bob");
  console.log("ok - member_removed");

  const info = await (await server.get({ path: "/channels/presence-room", params: { info: "user_count" } })).json();
  assert.deepEqual(info, { occupied: true, user_count: 1 });
  console.log("ok - channel info through the server library");

  // --- webhooks, verified by the `pusher` library ---
  const dave = await nodeClient(relayPort, backend, "dave");
  await sub(dave, "hooked");
  const davePresence = await sub(dave, "presence-hooked");
  davePresence.ch.trigger("client-ping", { n: 1 });
  await sleep(100); // the client event is published before the leave
  dave.disconnect();
  const want = [
    ["channel_occupied", "hooked"],
    ["channel_occupied", "presence-hooked"],
    ["member_added", "presence-hooked"],
    ["client_event", "presence-hooked"],
    ["member_removed", "presence-hooked"],
    ["channel_vacated", "hooked"],
    ["channel_vacated", "presence-hooked"],
  ];
  const hookEvents = () => hooks.flatMap((h) => h.events);
  await until("every webhook event", () => hookEvents().length >= want.length);
  assert.ok(hooks.length > 0 && hooks.every((h) => h.valid), `a webhook did not verify: ${JSON.stringify(hooks)}`);
  assert.ok(hooks.every((h) => h.time instanceof Date && Math.abs(h.time - Date.now()) < 60_000));
  const events = hookEvents();
  const have = events.map((e) => [e.name, e.channel]);
  assert.deepEqual([...have].sort(), [...want].sort(), JSON.stringify(events));
  const at = (name, channel) => have.findIndex(([n, c]) => n === name && c === channel);
  // Per channel, in the order things happened.
  assert.ok(at("channel_occupied", "hooked") < at("channel_vacated", "hooked"));
  for (const [a, b] of [
    ["channel_occupied", "member_added"],
    ["member_added", "client_event"],
    ["client_event", "member_removed"],
  ]) {
    assert.ok(at(a, "presence-hooked") < at(b, "presence-hooked"), `${a} before ${b}: ${JSON.stringify(have)}`);
  }
  assert.deepEqual(
    events.filter((e) => e.name.startsWith("member_")).map((e) => e.user_id),
    ["dave", "dave"],
  );
  const client = events.find((e) => e.name === "client_event");
  assert.equal(client.event, "client-ping");
  assert.equal(client.user_id, "dave");
  assert.match(client.socket_id, /^\d+\.\d+$/);
  assert.deepEqual(JSON.parse(client.data), { n: 1 });
  // A forged POST does not verify with the same library.
  const forged = verifier.webhook({
    headers: { "x-pusher-key": APP.key, "x-pusher-signature": "00".repeat(32), "content-type": "application/json" },
    rawBody: JSON.stringify({ time_ms: Date.now(), events: [] }),
  });
  assert.equal(forged.isValid(), false);
  console.log("ok - webhooks: channel_occupied, member_added, client_event, member_removed, channel_vacated, each verified by pusher.webhook()");

  // --- headless Chromium: pusher-js's browser bundle under Laravel Echo ---
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"], timeout: 30_000 });
  cleanups.push(() => browser.close());
  const page = await browser.newPage();
  page.on("console", (m) => m.type() === "error" && console.error(`[page] ${m.text()}`));
  await page.goto(`http://${backend}/`, { timeout: STEP_MS });
  await page.evaluate(() => {
    window.got = [];
    const push = (kind) => (d) => window.got.push({ kind, d });
    window.echo = new Echo.default({
      broadcaster: "pusher",
      key: "key1",
      cluster: "mt1",
      wsHost: "127.0.0.1",
      wsPort: window.relayPort,
      forceTLS: false,
      enabledTransports: ["ws"],
      disableStats: true,
      authEndpoint: "/pusher/auth?user=carol",
    });
    echo.channel("news").listen(".headline", push("headline"));
    echo.private("chat").listen(".note", push("note")).listenForWhisper("typing", push("whisper"));
    echo.join("room").here(push("here")).joining(push("joining")).leaving(push("leaving"));
  });
  const browserGot = (kind, pred = () => true) =>
    until(`browser ${kind}`, () => page.evaluate(() => window.got).then((g) => g.find((e) => e.kind === kind && pred(e.d))));
  const hereList = await browserGot("here");
  assert.deepEqual(hereList.d.map((m) => m.name).sort(), ["ALICE", "CAROL"]);
  await until("carol joined (seen by alice)", () => room.got.find((e) => e.event === "pusher:member_added" && e.data.id === "carol"));
  await until("browser subscribed to news and chat", () =>
    page.evaluate(() => ["news", "private-chat"].every((n) => window.echo.connector.pusher.channel(n)?.subscribed)),
  );
  await server.trigger(["news", "private-chat"], "headline", { title: "to browser" });
  await server.trigger("private-chat", "note", "for echo");
  await browserGot("headline", (d) => d.title === "to browser");
  await browserGot("note", (d) => d === "for echo");
  alice.channel("private-chat").trigger("client-typing", { who: "alice" });
  await browserGot("whisper", (d) => d.who === "alice");
  const carolSeen = await until("alice sees the browser's whisper", async () => {
    await page.evaluate(() => window.echo.private("chat").whisper("typing", { who: "carol" }));
    await sleep(100);
    return aliceChat.got.find((e) => e.event === "client-typing" && e.data.who === "carol");
  });
  assert.ok(carolSeen);
  alice.unsubscribe("presence-room");
  await browserGot("leaving", (m) => m.name === "ALICE");
  console.log("ok - Laravel Echo over pusher-js in Chromium: channel, private, join, whisper, here/joining/leaving");
}

try {
  await main();
  console.log("pusher test: all passed");
  await cleanup();
  clearTimeout(overall);
  process.exit(0);
} catch (e) {
  console.error("pusher test FAILED:", e);
  await cleanup();
  process.exit(1);
}
