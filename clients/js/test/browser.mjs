// Browser tests of the client: headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) against a real relay (target/debug/relay serve --demo on 127.0.0.1:0).
// The page loads the bundle the relay serves (/demo/relay.js). Every step is bounded in time;
// the whole run is killed after 150 s.
//
//   node test/browser.mjs            (RELAY_BIN and CHROMIUM override the paths)
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import { CHROMIUM, STEP_MS, atEnd, check, finish, overallTimeout, sleep, startRelay as start, step, stopRelay } from "./harness.mjs";

const overall = overallTimeout(150_000, "browser test");

/** Starts the relay with the demo on `listen`. */
const startRelay = (listen = "127.0.0.1:0") =>
  start(["--listen", listen, "--demo", "--drain-period", "1s", "--shutdown-timeout", "3s", "--sse-retry", "300ms"]);

async function api(addr, channel, data) {
  const ctl = AbortSignal.timeout(5000);
  const res = await fetch(`http://${addr}/api/publish`, { method: "POST", body: JSON.stringify({ channel, data }), signal: ctl });
  if (!res.ok) throw new Error(`publish: HTTP ${res.status}`);
  return res.json();
}

function contiguous(seqs) {
  for (let i = 1; i < seqs.length; i++) if (seqs[i] !== seqs[i - 1] + 1) return false;
  return true;
}

// --- the run ---------------------------------------------------------------------------------

let relay = await startRelay();
const port = relay.addr.split(":").pop();
console.log(`relay at ${relay.addr}`);

const userDataDir = mkdtempSync(path.join(tmpdir(), "relay-chromium-"));
atEnd(() => rmSync(userDataDir, { recursive: true, force: true }));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  timeout: 30_000,
  args: [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
atEnd(() => context.close());
context.setDefaultTimeout(STEP_MS);
const page = context.pages()[0] ?? (await context.newPage());
page.on("console", (m) => m.type() === "error" && console.log(`[page] ${m.text()}`));
page.on("pageerror", (e) => console.log(`[page error] ${e}`));
await page.goto(`http://${relay.addr}/healthz`);
await page.evaluate(async () => {
  const mod = await import("/demo/relay.js");
  window.RelayClient = mod.RelayClient;
  /** A client that records everything it sees in window.rec[name]. */
  window.makeClient = (name, options) => {
    const c = new mod.RelayClient({ backoff: { baseMs: 100, capMs: 1000 }, restartDelayMs: 100, commandTimeoutMs: 5000, heartbeatIntervalMs: 5000, ...options });
    const r = (window.rec ??= {})[name] = { msgs: {}, events: [] };
    c.on("message", (m) => (r.msgs[m.channel] ??= []).push({ seq: m.seq, data: m.data instanceof Uint8Array ? { bytes: [...m.data] } : m.data }));
    for (const t of ["open", "close", "subscribed", "resync", "gap", "presence", "error"]) c.on(t, (e) => r.events.push({ t, ...(e instanceof Error ? { code: e.code, message: e.message } : e) }));
    (window.clients ??= {})[name] = c;
    return c;
  };
});
const seqs = (name, channel) => page.evaluate(([n, ch]) => (window.rec[n].msgs[ch] ?? []).map((m) => m.seq), [name, channel]);
const events = (name, type) => page.evaluate(([n, t]) => window.rec[n].events.filter((e) => e.t === t), [name, type]);
const waitFor = (fn, arg) => page.waitForFunction(fn, arg, { timeout: STEP_MS, polling: 20 });
const received = (name, channel, n) =>
  waitFor(([nm, ch, k]) => (window.rec[nm].msgs[ch] ?? []).length >= k, [name, channel, n]);

await step("websocket: connect, subscribe, receive, publish", async () => {
  const sub = await page.evaluate(() => window.makeClient("ws", {}).subscribe("t:main"));
  check(sub.seq === 0 && sub.recovered === false, `subscribed ${JSON.stringify(sub)}`);
  for (let i = 1; i <= 5; i++) await api(relay.addr, "t:main", { i });
  await received("ws", "t:main", 5);
  const pub = await page.evaluate(() => window.clients.ws.publish("t:main", { from: "browser" }));
  check(pub.seq === 6, `published ${JSON.stringify(pub)}`);
  await received("ws", "t:main", 6);
  const s = await seqs("ws", "t:main");
  check(JSON.stringify(s) === "[1,2,3,4,5,6]", `seqs ${s}`);
  const open = await events("ws", "open");
  check(open[0].transport === "ws" && open[0].protocol === "json", `open ${JSON.stringify(open)}`);
});

await step("permessage-deflate: Chromium negotiates it, two sockets decode the one compressed frame", async () => {
  // Two plain browser WebSockets (Chromium offers permessage-deflate by itself); their commands
  // go out compressed too.
  await page.evaluate((url) => {
    window.zrec = [];
    window.zsocks = [0, 1].map((i) => {
      const ws = new WebSocket(url);
      window.zrec[i] = [];
      ws.onopen = () => ws.send(JSON.stringify({ type: "subscribe", channel: "t:zip" }));
      ws.onmessage = (e) => window.zrec[i].push(JSON.parse(e.data));
      return ws;
    });
  }, `ws://${relay.addr}/ws`);
  await waitFor(() => window.zrec.every((r) => r.some((m) => m.type === "subscribed")));
  const exts = await page.evaluate(() => window.zsocks.map((ws) => ws.extensions));
  check(exts.every((e) => e.includes("permessage-deflate")), `extensions ${JSON.stringify(exts)}`);
  const big = Array.from({ length: 200 }, (_, i) => ({ i, text: "compressible text ".repeat(3) }));
  await api(relay.addr, "t:zip", big);
  await api(relay.addr, "t:zip", { small: true });
  await waitFor(() => window.zrec.every((r) => r.filter((m) => m.type === "message").length >= 2));
  const got = await page.evaluate(() => window.zrec.map((r) => r.filter((m) => m.type === "message")));
  for (const msgs of got) {
    check(JSON.stringify(msgs[0].data) === JSON.stringify(big) && msgs[0].seq === 1, `big message ${JSON.stringify(msgs[0]).slice(0, 200)}`);
    check(msgs[1].data.small === true && msgs[1].seq === 2, `small message ${JSON.stringify(msgs[1])}`);
  }
  await page.evaluate(() => window.zsocks.forEach((ws) => ws.close()));
});

await step("websocket: resume after the socket drops, nothing missed, nothing twice", async () => {
  // 1. Messages published while the client is away are replayed on return.
  await page.evaluate(() => window.clients.ws.close());
  for (let i = 0; i < 5; i++) await api(relay.addr, "t:main", { away: i });
  await page.evaluate(() => window.clients.ws.connect());
  await received("ws", "t:main", 11);
  // 2. The socket is dropped under a steady stream of publishes.
  const stream = (async () => {
    for (let i = 0; i < 40; i++) {
      await api(relay.addr, "t:main", { live: i });
      await sleep(10);
    }
  })();
  await sleep(120);
  await page.evaluate(() => window.clients.ws.reconnect());
  await sleep(120);
  await page.evaluate(() => window.clients.ws.reconnect());
  await stream;
  await received("ws", "t:main", 51);
  const s = await seqs("ws", "t:main");
  check(s.length === 51 && contiguous(s) && s[0] === 1, `seqs not 1..51: ${s}`);
  const subs = await events("ws", "subscribed");
  const resumes = subs.filter((e) => e.resumed);
  check(resumes.length === 3 && resumes.every((e) => e.recovered), `resumes ${JSON.stringify(resumes)}`);
  check((await events("ws", "resync")).length === 0, "unexpected resync");
});

await step("binary protocol (relay.v1.bin): JSON and bytes both ways", async () => {
  await page.evaluate(() => window.makeClient("bin", { protocol: "binary" }).subscribe("t:bin"));
  await page.evaluate(() => window.clients.ws.subscribe("t:bin"));
  const open = await events("bin", "open");
  check(open[0].protocol === "binary", `open ${JSON.stringify(open)}`);
  await api(relay.addr, "t:bin", { a: 1 });
  const pub = await page.evaluate(() => window.clients.bin.publish("t:bin", new Uint8Array([1, 2, 3])));
  check(pub.seq === 2, `published ${JSON.stringify(pub)}`);
  await received("bin", "t:bin", 2);
  await received("ws", "t:bin", 2);
  for (const who of ["bin", "ws"]) {
    const m = await page.evaluate((n) => window.rec[n].msgs["t:bin"], who);
    check(JSON.stringify(m) === JSON.stringify([{ seq: 1, data: { a: 1 } }, { seq: 2, data: { bytes: [1, 2, 3] } }]), `${who} got ${JSON.stringify(m)}`);
  }
});

await step("presence: join, query, leave", async () => {
  await page.evaluate(() => window.makeClient("alice", {}).subscribe("presence:t", { presence: { user: "alice", info: { name: "Alice" } } }));
  await page.evaluate(() => window.makeClient("bob", {}).subscribe("presence:t", { presence: { user: "bob", info: { name: "Bob" } } }));
  await waitFor(() => window.rec.alice.events.some((e) => e.t === "presence" && e.event === "join" && e.user === "bob"));
  const state = await page.evaluate(() => window.clients.alice.presence("presence:t"));
  const users = state.members.map((m) => m.user).sort();
  check(JSON.stringify(users) === '["alice","bob"]', `members ${JSON.stringify(state)}`);
  check(state.members.find((m) => m.user === "alice").info.name === "Alice", "info");
  await page.evaluate(() => window.clients.bob.close());
  await waitFor(() => window.rec.alice.events.some((e) => e.t === "presence" && e.event === "leave" && e.user === "bob"));
});

await step("SSE transport: subscribe, receive, publish over HTTP, resume", async () => {
  const sub = await page.evaluate(() => window.makeClient("sse", { transport: "sse" }).subscribe("t:sse"));
  check(sub.recovered === false, `subscribed ${JSON.stringify(sub)}`);
  for (let i = 1; i <= 3; i++) await api(relay.addr, "t:sse", { i });
  const pub = await page.evaluate(() => window.clients.sse.publish("t:sse", "from the page"));
  check(pub.seq === 4, `published ${JSON.stringify(pub)}`);
  await received("sse", "t:sse", 4);
  // Away and back: the stream is reopened with the client's cursor.
  await page.evaluate(() => window.clients.sse.close());
  for (let i = 0; i < 3; i++) await api(relay.addr, "t:sse", { away: i });
  await page.evaluate(() => window.clients.sse.connect());
  await received("sse", "t:sse", 7);
  // A second channel reopens the stream with a cursor over both.
  await page.evaluate(() => window.clients.sse.subscribe("t:sse2"));
  await api(relay.addr, "t:sse", { after: 1 });
  await api(relay.addr, "t:sse2", { after: 1 });
  await received("sse", "t:sse", 8);
  await received("sse", "t:sse2", 1);
  const s = await seqs("sse", "t:sse");
  check(JSON.stringify(s) === "[1,2,3,4,5,6,7,8]", `seqs ${s}`);
  check((await events("sse", "resync")).length === 0, "unexpected resync");
  const opens = await events("sse", "open");
  check(opens.every((o) => o.transport === "sse"), "transport");
});

await step("auto: falls back to SSE where WebSocket is blocked", async () => {
  await page.evaluate(() => {
    // A "proxy" that refuses WebSocket upgrades.
    class Blocked extends WebSocket {
      constructor(url, protocols) {
        super(url.replace("/ws", "/blocked"), protocols);
      }
    }
    return window.makeClient("auto", { transport: "auto", WebSocket: Blocked, wsFailuresBeforeSse: 2 }).subscribe("t:auto");
  });
  check((await page.evaluate(() => window.clients.auto.transport)) === "sse", "not on SSE");
  await api(relay.addr, "t:auto", "hello");
  await received("auto", "t:auto", 1);
});

await step("demo page over SSE: live status, each tab in the other's list, cursors, no console errors", async () => {
  const errors = [];
  const open = async (query) => {
    const p = await context.newPage();
    p.on("console", (m) => m.type() === "error" && errors.push(`${query}: ${m.text()}`));
    p.on("pageerror", (e) => errors.push(`${query}: ${e}`));
    await p.goto(`http://${relay.addr}/${query}`);
    return p;
  };
  const sseTab = await open("?transport=sse&name=Sse%20Tab");
  const wsTab = await open("?transport=ws&name=Ws%20Tab");
  try {
    const status = (p, text) =>
      p.waitForFunction((t) => document.getElementById("status-text").textContent === t, text, { timeout: STEP_MS, polling: 50 });
    await status(sseTab, "live · sse");
    await status(wsTab, "live · ws");
    const listed = (p, name) =>
      p.waitForFunction((n) => [...document.querySelectorAll("#people li")].some((li) => li.textContent.includes(n)), name, {
        timeout: STEP_MS,
        polling: 50,
      });
    await listed(wsTab, "Sse Tab");
    await listed(sseTab, "Ws Tab");
    // The SSE tab's cursor shows up in the WebSocket tab (published over the HTTP API).
    for (let i = 0; i < 5; i++) await sseTab.mouse.move(200 + 20 * i, 200 + 10 * i);
    await wsTab.waitForFunction(() => document.querySelector(".cursor span")?.textContent === "Sse Tab", null, { timeout: STEP_MS, polling: 50 });
    check(errors.length === 0, `console errors:\n${errors.join("\n")}`);
  } finally {
    await sseTab.close();
    await wsTab.close();
  }
});

await step("relay restarted mid-stream: 1012, reconnect, recovered:false surfaced, messages keep coming", async () => {
  const before = (await seqs("ws", "t:main")).length;
  const beforeSse = (await seqs("sse", "t:sse")).length;
  let publishing = true;
  let published = 0;
  const stream = (async () => {
    while (publishing) {
      try {
        await api(relay.addr, "t:main", { p: published });
        await api(relay.addr, "t:sse", { p: published });
        published++;
      } catch {
        /* the relay is down for a moment */
      }
      await sleep(25);
    }
  })();
  await received("ws", "t:main", before + 5);
  await stopRelay(relay);
  relay = await startRelay(`127.0.0.1:${port}`);
  try {
    await waitFor(() => window.rec.ws.events.some((e) => e.t === "resync"));
    await waitFor(() => window.rec.sse.events.some((e) => e.t === "resync"));
    const after = await page.evaluate(() => window.rec.ws.msgs["t:main"].length);
    await received("ws", "t:main", after + 5);
    await received("sse", "t:sse", beforeSse + 10);
  } finally {
    publishing = false;
    await stream;
  }
  const closes = await events("ws", "close");
  check(closes.some((c) => c.code === 1012 && c.willReconnect), `closes ${JSON.stringify(closes)}`);
  const [resync] = await events("ws", "resync");
  check(resync.channel === "t:main" && resync.reason === "epoch_changed" && resync.previousSeq >= before, `resync ${JSON.stringify(resync)}`);
  const s = await seqs("ws", "t:main");
  // Seqs restart in the new epoch: everything from the first decrease on is after the restart.
  const cut = s.findIndex((x, i) => i > 0 && x <= s[i - 1]);
  check(cut >= before && contiguous(s.slice(0, cut)), `before the restart: ${s.slice(0, cut)}`);
  const tail = s.slice(cut);
  check(tail[0] === resync.seq + 1 && tail.length >= 5 && contiguous(tail), `after the restart (resync at ${resync.seq}): ${tail}`);
  const sseResync = (await events("sse", "resync")).find((r) => r.channel === "t:sse");
  check(sseResync && sseResync.reason === "epoch_changed", `sse resync ${JSON.stringify(sseResync)}`);
});

await finish("browser", overall);
