// Unit tests of the client: pure helpers, the binary codec (against the documented bytes of
// docs/protocol.md) and the connection logic over a fake WebSocket / EventSource.
// Run: node --test test/*.test.mjs (after `npm run build`).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  CLOSE_DISCONNECTED_FOR_GOOD,
  RelayClient,
  RelayError,
  backoffDelay,
  decodeBinary,
  encodeBinary,
  encodeJson,
  epochFromBytes,
  epochToBytes,
  relayUrls,
  restartDelay,
} from "../dist/relay.js";

const hex = (s) => Uint8Array.from(s.trim().split(/\s+/).map((x) => parseInt(x, 16)));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(pred, what, ms = 2000) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

/** A scriptable stand-in for the WHATWG WebSocket. */
class FakeWS {
  static instances = [];
  static failOpen = false;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.protocol = "";
    this.binaryType = "blob";
    this.sent = [];
    this.closedWith = undefined;
    this.onopen = this.onclose = this.onerror = this.onmessage = null;
    FakeWS.instances.push(this);
    if (FakeWS.failOpen) setTimeout(() => this.serverClose(1006, ""), 0);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(typeof data === "string" ? JSON.parse(data) : data);
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  // --- server side ---
  accept(protocol = "relay.v1.json") {
    this.readyState = 1;
    this.protocol = protocol;
    this.onopen?.({});
  }
  push(ev) {
    this.onmessage?.({ data: ev instanceof Uint8Array ? ev.buffer.slice(ev.byteOffset, ev.byteOffset + ev.byteLength) : JSON.stringify(ev) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  last() {
    return this.sent[this.sent.length - 1];
  }
}
const latest = () => FakeWS.instances[FakeWS.instances.length - 1];
function reset() {
  FakeWS.instances = [];
  FakeWS.failOpen = false;
}
function client(extra = {}) {
  return new RelayClient({
    url: "http://relay.test:8080",
    WebSocket: FakeWS,
    random: () => 0,
    heartbeatIntervalMs: 0,
    commandTimeoutMs: 500,
    ...extra,
  });
}

test("backoff: full jitter under min(cap, base*2^n)", () => {
  const top = () => 0.999999;
  assert.equal(backoffDelay(0, 100, 10_000, () => 0), 0);
  assert.equal(backoffDelay(0, 100, 10_000, top), 99);
  assert.equal(backoffDelay(1, 100, 10_000, top), 199);
  assert.equal(backoffDelay(3, 100, 10_000, top), 799);
  assert.equal(backoffDelay(10, 100, 10_000, top), 9999, "capped");
  assert.equal(backoffDelay(5000, 100, 10_000, top), 9999, "no overflow for huge attempts");
  assert.equal(backoffDelay(2, 100, 10_000, () => 0.5), 200);
  for (let n = 0; n < 20; n++) {
    const d = backoffDelay(n, 250, 5000);
    assert.ok(d >= 0 && d < Math.min(5000, 250 * 2 ** n), `attempt ${n}: ${d}`);
  }
});

test("urls derive from http or ws bases, with query", () => {
  assert.deepEqual(relayUrls("http://h:1/"), { http: "http://h:1", ws: "ws://h:1/ws", sse: "http://h:1/sse" });
  assert.deepEqual(relayUrls("wss://h", { token: "a b" }), { http: "https://h", ws: "wss://h/ws?token=a+b", sse: "https://h/sse?token=a+b" });
});

test("binary codec: the documented client frames", () => {
  assert.deepEqual(encodeBinary({ type: "subscribe", id: 7, channel: "room:1" }), hex("01 01 01 07 06 72 6f 6f 6d 3a 31"));
  assert.deepEqual(
    encodeBinary({ type: "subscribe", id: 8, channel: "room:1", since: 41, epoch: "9f2c61d3a0b4e5f7" }),
    hex("01 01 03 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29"),
  );
  assert.deepEqual(encodeBinary({ type: "publish", id: 300, channel: "room:1", data: new TextEncoder().encode("hi") }), hex("01 03 01 ac 02 06 72 6f 6f 6d 3a 31 68 69"));
  assert.deepEqual(encodeBinary({ type: "heartbeat" }), hex("01 04 00"));
  assert.deepEqual(
    encodeBinary({ type: "subscribe", channel: "a", presence: { user: "u1", info: { a: 1 } } }),
    hex("01 01 10 01 61 02 75 31 07 7b 22 61 22 3a 31 7d"),
  );
  // JSON values are published as JSON text.
  assert.deepEqual(encodeBinary({ type: "publish", channel: "a", data: { t: 1 } }), hex("01 03 00 01 61 7b 22 74 22 3a 31 7d"));
  assert.throws(() => encodeBinary({ type: "unsubscribe", channel: "" }), RelayError);
});

test("binary codec: the documented server frames", () => {
  assert.deepEqual(decodeBinary(hex("01 81 05 08 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 29")), {
    type: "subscribed", id: 8, channel: "room:1", epoch: "9f2c61d3a0b4e5f7", seq: 41, recovered: true,
  });
  assert.deepEqual(decodeBinary(hex("01 83 01 ac 02 06 72 6f 6f 6d 3a 31 9f 2c 61 d3 a0 b4 e5 f7 2a")), {
    type: "published", id: 300, channel: "room:1", epoch: "9f2c61d3a0b4e5f7", seq: 42,
  });
  const bin = decodeBinary(hex("01 85 00 06 72 6f 6f 6d 3a 31 2a 68 69"));
  assert.equal(bin.seq, 42);
  assert.deepEqual(bin.data, new TextEncoder().encode("hi"));
  assert.deepEqual(decodeBinary(hex("01 85 08 06 72 6f 6f 6d 3a 31 2b 7b 22 74 22 3a 31 7d")), {
    type: "message", channel: "room:1", seq: 43, data: { t: 1 },
  });
  assert.deepEqual(decodeBinary(hex("01 86 01 04 0f 69 6e 76 61 6c 69 64 5f 63 68 61 6e 6e 65 6c 62 61 64")), {
    type: "error", id: 4, code: "invalid_channel", message: "bad",
  });
  assert.deepEqual(decodeBinary(hex("01 88 20 01 61 09 02 63 31 02 75 31 07 7b 22 61 22 3a 31 7d")), {
    type: "presence", channel: "a", seq: 9, event: "join", client: "c1", user: "u1", info: { a: 1 },
  });
  // presence_state with one member, no info
  assert.deepEqual(decodeBinary(hex("01 87 01 05 01 61 09 01 02 63 31 02 75 31 00")), {
    type: "presence_state", id: 5, channel: "a", seq: 9, members: [{ client: "c1", user: "u1" }],
  });
  assert.throws(() => decodeBinary(hex("01 85")), /cut off/);
  assert.throws(() => decodeBinary(hex("02 84 00")), /version/);
});

test("epochs round-trip between hex and 8 bytes", () => {
  assert.equal(epochFromBytes(Uint8Array.from(epochToBytes("9f2c61d3a0b4e5f7"))), "9f2c61d3a0b4e5f7");
  assert.equal(epochFromBytes(Uint8Array.from(epochToBytes("2a"))), "2a");
  assert.equal(epochFromBytes(new Uint8Array(8)), "0");
  assert.throws(() => epochToBytes("xyz"), RelayError);
});

test("json publish of undefined sends null", () => {
  assert.deepEqual(JSON.parse(encodeJson({ type: "publish", channel: "a", data: undefined })), { type: "publish", channel: "a", data: null });
});

test("subscribe, receive, and resume after a drop with since+epoch; no duplicates", async () => {
  reset();
  const c = client();
  const got = [];
  const resyncs = [];
  c.on("message", (m) => got.push(m.seq));
  c.on("resync", (r) => resyncs.push(r));
  const ws = latest();
  assert.equal(ws.url, "ws://relay.test:8080/ws");
  assert.deepEqual(ws.protocols, ["relay.v1.json"]);
  const sub = c.subscribe("room:1");
  ws.accept();
  assert.equal(c.state, "open");
  const cmd = ws.last();
  assert.equal(cmd.type, "subscribe");
  assert.equal(cmd.since, undefined);
  ws.push({ type: "subscribed", id: cmd.id, channel: "room:1", epoch: "e1", seq: 10, recovered: false });
  const r = await sub;
  assert.equal(r.seq, 10);
  assert.equal(r.resumed, false);
  for (const seq of [11, 12, 12, 13]) ws.push({ type: "message", channel: "room:1", seq, data: { seq } });
  assert.deepEqual(got, [11, 12, 13], "the repeated 12 is dropped");
  assert.deepEqual(c.position("room:1"), { epoch: "e1", seq: 13 });

  ws.serverClose(1006);
  assert.equal(c.state, "reconnecting");
  await until(() => FakeWS.instances.length === 2, "a reconnect");
  const ws2 = latest();
  ws2.accept();
  const resume = ws2.last();
  assert.deepEqual({ ...resume, id: 0 }, { type: "subscribe", id: 0, channel: "room:1", since: 13, epoch: "e1" });
  const resubscribed = c.once("subscribed", 1000);
  ws2.push({ type: "subscribed", id: resume.id, channel: "room:1", epoch: "e1", seq: 15, recovered: true });
  assert.equal((await resubscribed).resumed, true);
  assert.deepEqual(c.position("room:1"), { epoch: "e1", seq: 13 }, "a recovered resume keeps the position until the replay");
  for (const seq of [14, 15, 16]) ws2.push({ type: "message", channel: "room:1", seq, data: null });
  assert.deepEqual(got, [11, 12, 13, 14, 15, 16]);
  assert.equal(resyncs.length, 0);
  c.close();
  assert.equal(c.state, "closed");
});

test("recovered:false after a resume surfaces a resync and jumps to the new position", async () => {
  reset();
  const c = client();
  const ws = latest();
  ws.accept();
  const p = c.subscribe("a");
  ws.push({ type: "subscribed", id: ws.last().id, channel: "a", epoch: "old", seq: 5, recovered: false });
  await p;
  ws.serverClose(1012, "restart");
  await until(() => FakeWS.instances.length === 2, "a reconnect");
  const ws2 = latest();
  ws2.accept();
  const resync = c.once("resync", 1000);
  ws2.push({ type: "subscribed", id: ws2.last().id, channel: "a", epoch: "new", seq: 0, recovered: false });
  assert.deepEqual(await resync, { channel: "a", epoch: "new", seq: 0, previousEpoch: "old", previousSeq: 5, reason: "epoch_changed" });
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  ws2.push({ type: "message", channel: "a", seq: 1, data: 1 });
  assert.deepEqual(got, [1], "the new epoch's seq 1 is delivered");
  c.close();
});

test("a resync says the server's reason when it gives one (evicted history)", async () => {
  reset();
  const c = client();
  const ws = latest();
  ws.accept();
  const p = c.subscribe("a");
  ws.push({ type: "subscribed", id: ws.last().id, channel: "a", epoch: "e", seq: 5, recovered: false });
  await p;
  ws.serverClose(1013, "overloaded");
  await until(() => FakeWS.instances.length === 2, "a reconnect", 60_000);
  const ws2 = latest();
  ws2.accept();
  const resync = c.once("resync", 1000);
  ws2.push({ type: "subscribed", id: ws2.last().id, channel: "a", epoch: "e", seq: 9, recovered: false, reason: "evicted" });
  assert.deepEqual(await resync, { channel: "a", epoch: "e", seq: 9, previousEpoch: "e", previousSeq: 5, reason: "evicted" });
  c.close();
});

test("a 1012 close reconnects after restartDelayMs, other closes after the backoff", async () => {
  reset();
  const c = client({ random: () => 0.5, restartDelayMs: 40, backoff: { baseMs: 60_000, capMs: 1_000_000 } });
  const delays = [];
  c.on("reconnecting", (r) => delays.push(r.delayMs));
  latest().accept();
  latest().serverClose(1012);
  assert.deepEqual(delays, [20]);
  await until(() => FakeWS.instances.length === 2, "a quick reconnect", 1000);
  latest().serverClose(1006); // refused while the node restarts: normal backoff (attempt 1)
  assert.deepEqual(delays, [20, 60_000], "attempt 1: random * base * 2");
  c.close();
  await sleep(30);
  assert.equal(FakeWS.instances.length, 2, "close() cancels the pending retry");
});

test("a 1012 close with a server-advised delay reconnects after that delay", async () => {
  assert.equal(restartDelay("service restart; reconnect in 1234 ms"), 1234);
  assert.equal(restartDelay("service restart; reconnect in 999999 ms"), 60_000, "capped");
  assert.equal(restartDelay("service restart"), undefined);
  reset();
  const c = client({ random: () => 0.5, restartDelayMs: 40_000, backoff: { baseMs: 60_000, capMs: 1_000_000 } });
  const delays = [];
  c.on("reconnecting", (r) => delays.push(r.delayMs));
  latest().accept();
  latest().serverClose(1012, "service restart; reconnect in 30 ms");
  assert.deepEqual(delays, [30], "the advised delay, not random * restartDelayMs");
  await until(() => FakeWS.instances.length === 2, "a reconnect after the advised delay", 1000);
  c.close();
});

test("a 4011 close (disconnected for good) stops reconnecting and reports the code and reason", async () => {
  reset();
  const c = client({ random: () => 0.5, backoff: { baseMs: 1, capMs: 2 } });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  const ws = latest();
  ws.accept();
  const sub = c.subscribe("a");
  ws.serverClose(CLOSE_DISCONNECTED_FOR_GOOD, "banned");
  assert.equal(c.state, "closed");
  assert.deepEqual(closes, [{ code: 4011, reason: "banned", willReconnect: false }]);
  await assert.rejects(sub, (e) => e.code === "closed" && /banned/.test(e.message));
  await sleep(30);
  assert.equal(FakeWS.instances.length, 1, "no new connection after 4011");
  // A 4010 (disconnected, come back) still reconnects.
  reset();
  const c2 = client({ random: () => 0.5, backoff: { baseMs: 1, capMs: 2 } });
  latest().accept();
  latest().serverClose(4010, "token revoked");
  await until(() => FakeWS.instances.length === 2, "a reconnect after 4010", 1000);
  c2.close();
});

test("gives up after maxAttempts consecutive failures", async () => {
  reset();
  FakeWS.failOpen = true;
  const c = client({ transport: "ws", backoff: { baseMs: 1, capMs: 2, maxAttempts: 3 } });
  const sub = c.subscribe("a");
  const closed = c.once("close", 2000);
  let ev;
  while ((ev = await closed) && ev.willReconnect) break;
  const final = await new Promise((resolve) => {
    if (c.state === "closed") resolve(true);
    c.on("state", (s) => s.state === "closed" && resolve(true));
  });
  assert.ok(final);
  assert.equal(FakeWS.instances.length, 4, "the first try and 3 retries");
  await assert.rejects(sub, (e) => e.code === "closed");
});

test("commands: replies resolve, errors reject with the code, silence times out", async () => {
  reset();
  const c = client({ commandTimeoutMs: 50 });
  const ws = latest();
  ws.accept();
  const p1 = c.publish("a", { x: 1 });
  const cmd = ws.last();
  assert.deepEqual({ ...cmd, id: 0 }, { type: "publish", id: 0, channel: "a", data: { x: 1 } });
  ws.push({ type: "published", id: cmd.id, channel: "a", epoch: "e", seq: 1 });
  assert.deepEqual(await p1, { channel: "a", epoch: "e", seq: 1 });

  const p2 = c.publish("bad channel", 1);
  ws.push({ type: "error", id: ws.last().id, code: "invalid_channel", message: "nope" });
  await assert.rejects(p2, (e) => e instanceof RelayError && e.code === "invalid_channel");

  const t0 = Date.now();
  await assert.rejects(c.presence("p"), (e) => e.code === "timeout");
  assert.ok(Date.now() - t0 >= 45);
  // A late reply to a timed-out command is ignored.
  ws.push({ type: "presence_state", id: ws.last().id, channel: "p", seq: 0, members: [] });

  const sub = c.subscribe("never");
  await assert.rejects(sub, (e) => e.code === "timeout");
  assert.deepEqual(c.channels(), [], "a subscribe that timed out unconfirmed is withdrawn");
  assert.equal(ws.last().type, "unsubscribe");

  const p3 = c.publish("a", 2);
  ws.serverClose(1006);
  await assert.rejects(p3, (e) => e.code === "disconnected");
  c.close();
});

test("commands issued while connecting are sent once open", async () => {
  reset();
  const c = client();
  const ws = latest();
  const p = c.publish("a", "early");
  assert.equal(ws.sent.length, 0);
  ws.accept();
  assert.equal(ws.last().data, "early");
  ws.push({ type: "published", id: ws.last().id, channel: "a", epoch: "e", seq: 3 });
  assert.equal((await p).seq, 3);
  c.close();
});

test("heartbeats are sent every interval; a silent connection is replaced", async () => {
  reset();
  const c = client({ heartbeatIntervalMs: 20 });
  const ws = latest();
  ws.accept();
  await until(() => ws.sent.some((m) => m.type === "heartbeat"), "a heartbeat", 1000);
  assert.deepEqual(ws.sent.find((m) => m.type === "heartbeat"), { type: "heartbeat" });
  ws.push({ type: "heartbeat" });
  // Now stay silent: after one unanswered period the client reconnects.
  await until(() => FakeWS.instances.length === 2, "a reconnect after silence", 1000);
  assert.ok(ws.closedWith, "the dead socket was closed");
  c.close();
});

test("gap notices move the position and are surfaced", async () => {
  reset();
  const c = client();
  const ws = latest();
  ws.accept();
  const p = c.subscribe("feed");
  ws.push({ type: "subscribed", id: ws.last().id, channel: "feed", epoch: "e", seq: 100, recovered: false });
  await p;
  const gap = c.once("gap", 500);
  ws.push({ type: "gap", channel: "feed", from: 101, to: 150 });
  assert.deepEqual(await gap, { channel: "feed", from: 101, to: 150 });
  assert.deepEqual(c.position("feed"), { epoch: "e", seq: 150 });
  c.close();
});

test("presence: identity in subscribe, join/leave events, query", async () => {
  reset();
  const c = client();
  const ws = latest();
  ws.accept();
  const p = c.subscribe("presence:x", { presence: { user: "alice", info: { name: "Alice" } } });
  const cmd = ws.last();
  assert.deepEqual(cmd.presence, { user: "alice", info: { name: "Alice" } });
  ws.push({ type: "subscribed", id: cmd.id, channel: "presence:x", epoch: "e", seq: 0, recovered: false });
  await p;
  const joined = c.once("presence", 500);
  ws.push({ type: "presence", channel: "presence:x", seq: 0, event: "join", client: "c1", user: "alice", info: { name: "Alice" } });
  assert.equal((await joined).event, "join");
  const q = c.presence("presence:x");
  ws.push({ type: "presence_state", id: ws.last().id, channel: "presence:x", seq: 0, members: [{ client: "c1", user: "alice" }] });
  assert.equal((await q).members.length, 1);
  c.close();
});

test("binary protocol: negotiated by subprotocol; frames both ways", async () => {
  reset();
  const c = client({ protocol: "binary" });
  const ws = latest();
  assert.deepEqual(ws.protocols, ["relay.v1.bin"]);
  const sub = c.subscribe("room:1");
  ws.accept("relay.v1.bin");
  const frame = ws.last();
  assert.ok(frame instanceof Uint8Array);
  assert.equal(frame[1], 0x01);
  const id = frame[3];
  ws.push(Uint8Array.from([1, 0x81, 0x01, id, 6, ...new TextEncoder().encode("room:1"), 0, 0, 0, 0, 0, 0, 0, 0x2a, 5]));
  assert.deepEqual(await sub, { channel: "room:1", epoch: "2a", seq: 5, recovered: false, resumed: false });
  const msg = c.once("message", 500);
  ws.push(hex("01 85 08 06 72 6f 6f 6d 3a 31 06 7b 22 74 22 3a 31 7d"));
  assert.deepEqual(await msg, { channel: "room:1", seq: 6, data: { t: 1 } });
  c.close();
});

test("binary asked but not echoed: falls back to JSON on that connection", async () => {
  reset();
  const c = client({ protocol: "binary" });
  const ws = latest();
  c.subscribe("a").catch(() => {});
  ws.accept("");
  assert.equal(ws.last().type, "subscribe", "sent as JSON");
  c.close();
});

/** A scriptable stand-in for EventSource. */
class FakeES {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = {};
    this.onopen = this.onerror = null;
    FakeES.instances.push(this);
  }
  addEventListener(type, fn) {
    (this.listeners[type] ??= []).push(fn);
  }
  close() {
    this.readyState = 2;
  }
  emit(type, data) {
    for (const fn of this.listeners[type] ?? []) fn({ data: JSON.stringify(data) });
  }
}

test("auto: falls back to SSE after WebSocket failures; reopening carries the cursor", async () => {
  reset();
  FakeES.instances = [];
  FakeWS.failOpen = true;
  const c = client({ EventSource: FakeES, wsFailuresBeforeSse: 2, backoff: { baseMs: 1, capMs: 1 } });
  const sub = c.subscribe("a");
  await until(() => FakeES.instances.length === 1, "an event stream");
  assert.equal(FakeWS.instances.length, 2);
  assert.equal(c.transport, "sse");
  const es = FakeES.instances[0];
  assert.equal(es.url, "http://relay.test:8080/sse?channel=a");
  es.readyState = 1;
  es.onopen({});
  es.emit("subscribed", { channels: [{ channel: "a", epoch: "e", seq: 3, recovered: false }] });
  assert.equal((await sub).seq, 3);
  es.emit("message", { channel: "a", seq: 4, data: "x" });
  assert.deepEqual(c.position("a"), { epoch: "e", seq: 4 });
  // Adding a channel reopens the stream with a cursor over the new list.
  c.subscribe("b").catch(() => {});
  await until(() => FakeES.instances.length === 2, "a reopened stream");
  assert.equal(es.readyState, 2, "the old stream is closed");
  const u = new URL(FakeES.instances[1].url);
  assert.deepEqual(u.searchParams.getAll("channel"), ["a", "b"]);
  assert.equal(u.searchParams.get("last_event_id"), "e:4,0:0");
  c.close();
});

test("state events of the constructor reach listeners attached right after it (the SSE demo)", async () => {
  FakeES.instances = [];
  const c = new RelayClient({ url: "http://relay.test:8080", transport: "sse", EventSource: FakeES, heartbeatIntervalMs: 0 });
  const states = [];
  const opens = [];
  c.on("state", (s) => states.push(s.state));
  c.on("open", (o) => opens.push(o.transport));
  const sub = c.subscribe("presence:demo", { presence: { user: "u1", info: { name: "A" } } });
  await until(() => FakeES.instances.length === 1, "the event stream");
  assert.deepEqual(states, ["connecting", "open"]);
  // The stream joins presence with the subscription's identity.
  const u = new URL(FakeES.instances[0].url);
  assert.deepEqual(u.searchParams.getAll("channel"), ["presence:demo"]);
  assert.deepEqual(
    ["presence", "presence_user", "presence_info"].map((k) => u.searchParams.get(k)),
    ["1", "u1", '{"name":"A"}'],
  );
  const es = FakeES.instances[0];
  es.readyState = 1;
  es.onopen({});
  es.emit("subscribed", { channels: [{ channel: "presence:demo", epoch: "e", seq: 0, recovered: false }] });
  await sub;
  assert.equal(c.state, "open");
  // The stream breaks and the browser reconnects it: reconnecting, then open (and `open`) again.
  es.readyState = 0;
  es.onerror({});
  es.readyState = 1;
  es.onopen({});
  assert.deepEqual(states, ["connecting", "open", "reconnecting", "open"]);
  assert.deepEqual(opens, ["sse", "sse"]);
  c.close();
});

test("a client that does not connect yet is idle; connect() starts it", async () => {
  reset();
  const c = client({ autoConnect: false });
  assert.equal(c.state, "idle");
  assert.equal(FakeWS.instances.length, 0);
  const states = [];
  c.on("state", (s) => states.push(s.state));
  c.connect();
  latest().accept();
  assert.deepEqual(states, ["connecting", "open"]);
  c.close();
});

test("no WebSocket and no EventSource (Node 20): the constructor says what to pass", () => {
  const saved = { WebSocket: globalThis.WebSocket, EventSource: globalThis.EventSource };
  delete globalThis.WebSocket;
  delete globalThis.EventSource;
  try {
    for (const transport of ["auto", "ws"]) {
      assert.throws(
        () => new RelayClient({ url: "http://relay.test", transport }),
        (e) => e instanceof RelayError && e.code === "unsupported" && /options\.WebSocket/.test(e.message) && /npm install ws/.test(e.message),
        transport,
      );
    }
    assert.throws(
      () => new RelayClient({ url: "http://relay.test", transport: "sse" }),
      (e) => e instanceof RelayError && e.code === "unsupported" && /options\.EventSource/.test(e.message),
    );
    // Given one, it runs.
    new RelayClient({ url: "http://relay.test", WebSocket: FakeWS, autoConnect: false }).close();
  } finally {
    for (const [k, v] of Object.entries(saved)) if (v !== undefined) globalThis[k] = v;
  }
});
