/**
 * relay client: WebSocket (JSON `relay.v1.json` or binary `relay.v1.bin`) with an SSE fallback,
 * per-channel resume (`since` + `epoch`), full-jitter reconnect, heartbeats and presence.
 *
 * Dependency-free; runs in browsers and in Node >= 20 (pass `WebSocket` / `EventSource`
 * constructors where the runtime has none). The wire contract is docs/protocol.md.
 *
 * ```ts
 * import { RelayClient } from "./relay.js";
 * const relay = new RelayClient({ url: "http://127.0.0.1:8080" });
 * relay.on("message", (m) => console.log(m.channel, m.seq, m.data));
 * relay.on("resync", (r) => refetchState(r.channel)); // history could not cover the outage
 * await relay.subscribe("room:1");
 * await relay.publish("room:1", { text: "hi" });
 * ```
 */
/** An error reply of the server, or a client-side failure (`timeout`, `disconnected`, `closed`). */
export class RelayError extends Error {
    constructor(code, message, channel) {
        super(message);
        this.name = "RelayError";
        this.code = code;
        this.channel = channel;
    }
}
// ---------------------------------------------------------------------------------------------
// Pure helpers (exported for tests)
/** Most a server-advised restart delay is followed (a longer one is capped here). */
const MAX_RESTART_DELAY_MS = 60000;
/** Close code of a server disconnect for good (`POST /api/users/disconnect`, `reconnect: false`):
 * the client does not reconnect; its final `close` event carries the code and the reason. */
export const CLOSE_DISCONNECTED_FOR_GOOD = 4011;
/** The delay a 1012 close reason advises (`service restart; reconnect in N ms`: the server spreads
 * its clients over a window that grows with its connections), or `undefined` without one. */
export function restartDelay(reason) {
    const m = /reconnect in (\d+) ms/.exec(reason);
    return m ? Math.min(Number(m[1]), MAX_RESTART_DELAY_MS) : undefined;
}
/** Full-jitter exponential backoff: `random() * min(cap, base * 2^attempt)`, attempt from 0. */
export function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
    const ceiling = Math.min(capMs, baseMs * Math.pow(2, Math.min(attempt, 52)));
    return Math.floor(random() * ceiling);
}
/** Encodes a command as a JSON text frame. */
export function encodeJson(cmd) {
    if (cmd.type === "publish") {
        return JSON.stringify({ ...cmd, data: cmd.data === undefined ? null : cmd.data });
    }
    return JSON.stringify(cmd);
}
const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });
const TAG = {
    subscribe: 0x01,
    unsubscribe: 0x02,
    publish: 0x03,
    heartbeat: 0x04,
    presence: 0x05,
    subscribed: 0x81,
    unsubscribed: 0x82,
    published: 0x83,
    heartbeatReply: 0x84,
    message: 0x85,
    error: 0x86,
    presenceState: 0x87,
    presenceEvent: 0x88,
};
const F_ID = 0x01;
const F_RESUME = 0x02;
const F_RECOVERED = 0x04;
const F_JSON = 0x08;
const F_PRESENCE = 0x10;
const F_JOIN = 0x20;
function pushVarint(out, n) {
    if (!Number.isSafeInteger(n) || n < 0)
        throw new RelayError("bad_request", `not a varint: ${n}`);
    while (n >= 0x80) {
        out.push((n % 0x80) | 0x80);
        n = Math.floor(n / 0x80);
    }
    out.push(n);
}
function pushChannel(out, channel) {
    const b = enc.encode(channel);
    if (b.length < 1 || b.length > 200)
        throw new RelayError("invalid_channel", "channel must be 1 to 200 bytes");
    out.push(b.length, ...b);
}
function pushText(out, s) {
    const b = enc.encode(s ?? "");
    pushVarint(out, b.length);
    for (const x of b)
        out.push(x);
}
/** `9f2c…` (1 to 16 hex digits) → 8 bytes big-endian. */
export function epochToBytes(epoch) {
    if (!/^[0-9a-f]{1,16}$/i.test(epoch))
        throw new RelayError("bad_request", `bad epoch ${epoch}`);
    const h = epoch.padStart(16, "0");
    const out = [];
    for (let i = 0; i < 16; i += 2)
        out.push(parseInt(h.slice(i, i + 2), 16));
    return out;
}
/** 8 bytes big-endian → lowercase hex without leading zeros (the JSON form). */
export function epochFromBytes(b) {
    let h = "";
    for (const x of b)
        h += x.toString(16).padStart(2, "0");
    return h.replace(/^0+(?=.)/, "");
}
/** Encodes a command as a `relay.v1.bin` frame. */
export function encodeBinary(cmd) {
    const out = [1, TAG[cmd.type], 0];
    const flags = (f) => (out[2] |= f);
    if (cmd.id !== undefined) {
        flags(F_ID);
        pushVarint(out, cmd.id);
    }
    let payload;
    switch (cmd.type) {
        case "subscribe":
            pushChannel(out, cmd.channel);
            if (cmd.since !== undefined && cmd.epoch !== undefined) {
                flags(F_RESUME);
                out.push(...epochToBytes(cmd.epoch));
                pushVarint(out, cmd.since);
            }
            if (cmd.presence) {
                flags(F_PRESENCE);
                pushText(out, cmd.presence.user);
                pushText(out, cmd.presence.info === undefined ? "" : JSON.stringify(cmd.presence.info));
            }
            break;
        case "unsubscribe":
        case "presence":
            pushChannel(out, cmd.channel);
            break;
        case "publish":
            pushChannel(out, cmd.channel);
            payload = toBytes(cmd.data);
            break;
        case "heartbeat":
            break;
    }
    const head = Uint8Array.from(out);
    if (!payload)
        return head;
    const frame = new Uint8Array(head.length + payload.length);
    frame.set(head);
    frame.set(payload, head.length);
    return frame;
}
/** A publish payload as bytes: bytes as they are, anything else as JSON text. */
function toBytes(data) {
    if (data instanceof Uint8Array)
        return data;
    if (data instanceof ArrayBuffer)
        return new Uint8Array(data);
    if (ArrayBuffer.isView(data))
        return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return enc.encode(JSON.stringify(data === undefined ? null : data));
}
class Reader {
    constructor(b) {
        this.b = b;
        this.i = 0;
    }
    need(n) {
        if (this.i + n > this.b.length)
            throw new RelayError("bad_frame", "frame cut off");
    }
    u8() {
        this.need(1);
        return this.b[this.i++];
    }
    varint() {
        let n = 0;
        let mul = 1;
        for (let k = 0; k < 10; k++) {
            const x = this.u8();
            n += (x & 0x7f) * mul;
            mul *= 128;
            if (x < 0x80)
                return n;
        }
        throw new RelayError("bad_frame", "varint too long");
    }
    bytes(n) {
        this.need(n);
        const s = this.b.subarray(this.i, this.i + n);
        this.i += n;
        return s;
    }
    channel() {
        return dec.decode(this.bytes(this.u8()));
    }
    epoch() {
        return epochFromBytes(this.bytes(8));
    }
    text() {
        return dec.decode(this.bytes(this.varint()));
    }
    rest() {
        const s = this.b.subarray(this.i);
        this.i = this.b.length;
        return s;
    }
    member() {
        const client = this.text();
        const user = this.text();
        const info = this.text();
        const m = { client, user: user || client };
        if (info)
            m.info = JSON.parse(info);
        return m;
    }
}
/** Decodes a `relay.v1.bin` server frame. Throws {@link RelayError} `bad_frame` on a malformed one. */
export function decodeBinary(frame) {
    const r = new Reader(frame);
    const version = r.u8();
    if (version !== 1)
        throw new RelayError("bad_frame", `unsupported version ${version}`);
    const tag = r.u8();
    const flags = r.u8();
    const id = flags & F_ID ? r.varint() : undefined;
    const withId = (o) => (id === undefined ? o : { ...o, id });
    switch (tag) {
        case TAG.subscribed: {
            const channel = r.channel();
            const epoch = r.epoch();
            const seq = r.varint();
            return withId({ type: "subscribed", channel, epoch, seq, recovered: (flags & F_RECOVERED) !== 0 });
        }
        case TAG.unsubscribed:
            return withId({ type: "unsubscribed", channel: r.channel() });
        case TAG.published: {
            const channel = r.channel();
            const epoch = r.epoch();
            return withId({ type: "published", channel, epoch, seq: r.varint() });
        }
        case TAG.heartbeatReply:
            return withId({ type: "heartbeat" });
        case TAG.message: {
            const channel = r.channel();
            const seq = r.varint();
            const payload = r.rest();
            const data = flags & F_JSON ? JSON.parse(dec.decode(payload)) : payload.slice();
            return { type: "message", channel, seq, data };
        }
        case TAG.error: {
            const code = dec.decode(r.bytes(r.u8()));
            return withId({ type: "error", code, message: dec.decode(r.rest()) });
        }
        case TAG.presenceState: {
            const channel = r.channel();
            const seq = r.varint();
            const count = r.varint();
            const members = [];
            for (let k = 0; k < count; k++)
                members.push(r.member());
            return withId({ type: "presence_state", channel, seq, members });
        }
        case TAG.presenceEvent: {
            const channel = r.channel();
            const seq = r.varint();
            const m = r.member();
            return { type: "presence", channel, seq, event: flags & F_JOIN ? "join" : "leave", ...m };
        }
        default:
            throw new RelayError("bad_frame", `unknown type tag 0x${tag.toString(16)}`);
    }
}
function base64ToBytes(s) {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++)
        out[i] = bin.charCodeAt(i);
    return out;
}
/**
 * Why no transport can run here (`undefined`: one can): e.g. Node 20, which has neither a
 * global `WebSocket` nor `EventSource`. Exported for tests.
 */
export function transportMissing(mode, hasWs, hasEs) {
    const ws = "no WebSocket implementation here (Node 20 has none built in): pass one as options.WebSocket, " +
        'e.g. `import { WebSocket } from "ws"` (npm install ws), or run on Node >= 22 or in a browser';
    const es = "no EventSource implementation here (Node has none built in): pass one as options.EventSource " +
        '(e.g. from the "eventsource" package), or use transport "ws"';
    if (mode === "ws" && !hasWs)
        return ws;
    if (mode === "sse" && !hasEs)
        return es;
    if (mode === "auto" && !hasWs && !hasEs)
        return ws;
    return undefined;
}
/** Derives the `/ws`, `/sse` and API URLs from a base URL. */
export function relayUrls(base, query = {}) {
    const http = base.replace(/^ws(s?):/i, "http$1:").replace(/\/+$/, "");
    const q = new URLSearchParams(query).toString();
    return {
        http,
        ws: http.replace(/^http/i, "ws") + "/ws" + (q ? "?" + q : ""),
        sse: http + "/sse" + (q ? "?" + q : ""),
    };
}
/**
 * A connection to a relay with any number of channel subscriptions. Subscriptions and their
 * positions survive reconnects (and `close()` + `connect()`): on every new connection the
 * client re-subscribes with `since` + `epoch` and the relay replays what was missed, or says
 * it cannot (`resync` event).
 */
export class RelayClient {
    constructor(options = {}) {
        this.listeners = new Map();
        this.subs = new Map();
        this.pending = new Map();
        this.nextId = 1;
        this.wanted = false;
        this.attempt = 0;
        /** After a 1012: the delay the server advised (ms), or `true` for a random one below `restartDelayMs`. */
        this.restartHint = false;
        this.wsFailures = 0;
        this.wsEverOpened = false;
        this.useSse = false;
        this.wire = "json";
        this.queue = [];
        this.heartbeatUnanswered = false;
        this.sseReopen = false;
        this.current = "idle";
        /** Events emitted inside the constructor, delivered once listeners can be attached. */
        this.early = [];
        this.constructing = true;
        const g = globalThis;
        const url = options.url ?? g.location?.origin;
        if (!url)
            throw new RelayError("bad_request", "RelayClient: give options.url");
        this.urls = relayUrls(url, options.query);
        this.WS = options.WebSocket ?? g.WebSocket;
        this.ES = options.EventSource ?? g.EventSource;
        this.fetchFn = options.fetch ?? (g.fetch ? g.fetch.bind(globalThis) : undefined);
        this.apiKey = options.apiKey;
        this.opts = {
            transport: options.transport ?? "auto",
            protocol: options.protocol ?? "json",
            restartDelayMs: options.restartDelayMs ?? 250,
            heartbeatIntervalMs: options.heartbeatIntervalMs ?? 15000,
            commandTimeoutMs: options.commandTimeoutMs ?? 10000,
            connectTimeoutMs: options.connectTimeoutMs ?? 10000,
            wsFailuresBeforeSse: options.wsFailuresBeforeSse ?? 2,
            autoConnect: options.autoConnect ?? true,
            random: options.random ?? Math.random,
            backoff: {
                baseMs: options.backoff?.baseMs ?? 500,
                capMs: options.backoff?.capMs ?? 30000,
                maxAttempts: options.backoff?.maxAttempts ?? Infinity,
            },
        };
        const missing = transportMissing(this.opts.transport, !!this.WS, !!this.ES);
        if (missing)
            throw new RelayError("unsupported", missing);
        if (this.opts.autoConnect)
            this.connect();
        // Like WebSocket and EventSource: what happens while constructing (`state: connecting`,
        // an SSE client's `open`) is delivered after the constructor returns, to the listeners
        // attached right after it (and before any later event).
        this.constructing = false;
        queueMicrotask(() => this.flushEarly());
    }
    flushEarly() {
        const early = this.early;
        this.early = undefined;
        for (const deliver of early ?? [])
            deliver();
    }
    // --- events ---------------------------------------------------------------------------------
    /** Adds a listener; returns a function that removes it. */
    on(type, fn) {
        let set = this.listeners.get(type);
        if (!set)
            this.listeners.set(type, (set = new Set()));
        set.add(fn);
        return () => this.off(type, fn);
    }
    /** Removes a listener. */
    off(type, fn) {
        this.listeners.get(type)?.delete(fn);
    }
    /** Resolves with the next event of `type` (rejects after `timeoutMs`, if given). */
    once(type, timeoutMs) {
        return new Promise((resolve, reject) => {
            let timer;
            const off = this.on(type, (ev) => {
                off();
                if (timer)
                    clearTimeout(timer);
                resolve(ev);
            });
            if (timeoutMs !== undefined)
                timer = setTimeout(() => {
                    off();
                    reject(new RelayError("timeout", `no ${String(type)} event within ${timeoutMs} ms`));
                }, timeoutMs);
        });
    }
    emit(type, ev) {
        if (this.constructing && this.early) {
            this.early.push(() => this.emit(type, ev));
            return;
        }
        this.flushEarly();
        const set = this.listeners.get(type);
        if (!set)
            return;
        for (const fn of [...set]) {
            try {
                fn(ev);
            }
            catch (e) {
                setTimeout(() => {
                    throw e;
                });
            }
        }
    }
    // --- state ----------------------------------------------------------------------------------
    /** The connection state. */
    get state() {
        return this.current;
    }
    /** The transport in use (or about to be): `ws` or `sse`. */
    get transport() {
        return this.useSse || this.opts.transport === "sse" ? "sse" : "ws";
    }
    /** The last position seen on `channel` (what a resume starts from). */
    position(channel) {
        const s = this.subs.get(channel);
        return s && s.epoch !== undefined && s.seq !== undefined ? { epoch: s.epoch, seq: s.seq } : undefined;
    }
    /** The subscribed channels. */
    channels() {
        return [...this.subs.keys()];
    }
    setState(state) {
        if (state === this.current)
            return;
        this.current = state;
        this.emit("state", { state });
    }
    // --- lifecycle ------------------------------------------------------------------------------
    /** Starts connecting (and reconnecting) if not already. Subscriptions resume. */
    connect() {
        if (this.wanted)
            return;
        this.wanted = true;
        this.attempt = 0;
        this.open();
    }
    /** Closes for good (until `connect()`); subscriptions and positions are kept. */
    close() {
        this.wanted = false;
        this.teardown(1000, "client close");
        if (this.retryTimer)
            clearTimeout(this.retryTimer);
        this.retryTimer = undefined;
        this.failPending("closed", "the client was closed");
        for (const s of this.subs.values())
            this.rejectWaiters(s, new RelayError("closed", "the client was closed", s.channel));
        this.queue = [];
        this.setState("closed");
        this.emit("close", { code: 1000, reason: "client close", willReconnect: false });
    }
    /** Drops the current connection and reconnects now, resuming every subscription (e.g. after a network change). */
    reconnect() {
        if (!this.wanted)
            return this.connect();
        this.teardown(4000, "reconnect");
        if (this.retryTimer)
            clearTimeout(this.retryTimer);
        this.retryTimer = undefined;
        this.failPending("disconnected", "the connection was replaced");
        this.emit("close", { code: 4000, reason: "reconnect", willReconnect: true });
        this.attempt = 0;
        this.open();
    }
    open() {
        this.setState(this.attempt === 0 && !this.wsEverOpened ? "connecting" : "reconnecting");
        const sse = this.opts.transport === "sse" || this.useSse || (this.opts.transport === "auto" && !this.WS);
        if (sse) {
            this.useSse = true;
            this.openSse();
        }
        else
            this.openWs();
    }
    /** Closes the transport without reconnecting or touching pending commands. */
    teardown(code, reason) {
        if (this.connectTimer)
            clearTimeout(this.connectTimer);
        this.connectTimer = undefined;
        if (this.heartbeatTimer)
            clearInterval(this.heartbeatTimer);
        this.heartbeatTimer = undefined;
        const ws = this.ws;
        this.ws = undefined;
        if (ws) {
            ws.onopen = ws.onmessage = ws.onerror = null;
            ws.onclose = null;
            try {
                // Browsers accept only 1000 and 3000..4999 from a client.
                ws.close(code === 1000 || (code >= 3000 && code < 5000) ? code : 1000, reason.slice(0, 100));
            }
            catch {
                /* already closed */
            }
        }
        const es = this.es;
        this.es = undefined;
        if (es) {
            es.onopen = es.onerror = null;
            es.close();
        }
        for (const s of this.subs.values())
            s.active = false;
    }
    /** The transport went down: schedule the next attempt (or give up). */
    down(code, reason, opened) {
        this.teardown(code, reason);
        this.failPending("disconnected", `connection lost (${code})`);
        if (!this.wanted)
            return;
        if (!opened && !this.useSse && this.opts.transport === "auto") {
            this.wsFailures++;
            if (!this.wsEverOpened && this.ES && this.wsFailures >= this.opts.wsFailuresBeforeSse) {
                this.useSse = true;
                this.attempt = 0;
            }
        }
        // The server said not to come back (`POST /api/users/disconnect` with `reconnect: false`):
        // another try would only be refused again, or reopen what the backend meant to end.
        if (code === CLOSE_DISCONNECTED_FOR_GOOD)
            return this.giveUp(code, reason, `disconnected by the server: ${reason || code}`);
        if (code === 1012)
            this.restartHint = restartDelay(reason) ?? true;
        const { baseMs, capMs, maxAttempts } = this.opts.backoff;
        if (this.attempt >= maxAttempts)
            return this.giveUp(code, reason, "gave up reconnecting");
        const delayMs = typeof this.restartHint === "number"
            ? this.restartHint
            : this.restartHint
                ? Math.floor(this.opts.random() * this.opts.restartDelayMs)
                : backoffDelay(this.attempt, baseMs, capMs, this.opts.random);
        this.restartHint = false;
        this.attempt++;
        this.setState("reconnecting");
        this.emit("close", { code, reason, willReconnect: true });
        this.emit("reconnecting", { attempt: this.attempt, delayMs });
        this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            if (this.wanted)
                this.open();
        }, delayMs);
    }
    /** No more reconnecting: `closed`, a final `close` event, every pending command and subscribe
     * rejected with `closed` and `why`. */
    giveUp(code, reason, why) {
        this.wanted = false;
        this.setState("closed");
        this.emit("close", { code, reason, willReconnect: false });
        this.failPending("closed", why);
        for (const s of this.subs.values())
            this.rejectWaiters(s, new RelayError("closed", why, s.channel));
    }
    /** The transport is up: `open` once per change of state (an SSE stream reopened for a new
     * channel list while open is no new `open`). */
    opened(transport) {
        this.attempt = 0;
        if (this.current === "open")
            return;
        this.setState("open");
        this.emit("open", { transport, protocol: transport === "sse" ? "sse" : this.wire });
    }
    // --- WebSocket ------------------------------------------------------------------------------
    openWs() {
        const WS = this.WS;
        if (!WS)
            return this.down(1006, "no WebSocket", false);
        const wanted = this.opts.protocol;
        let ws;
        try {
            ws = new WS(this.urls.ws, wanted === "binary" ? ["relay.v1.bin"] : ["relay.v1.json"]);
        }
        catch (e) {
            return this.down(1006, String(e), false);
        }
        ws.binaryType = "arraybuffer";
        this.ws = ws;
        let isOpen = false;
        this.connectTimer = setTimeout(() => {
            if (this.ws === ws && !isOpen)
                this.down(1006, "connect timeout", false);
        }, this.opts.connectTimeoutMs);
        ws.onopen = () => {
            if (this.ws !== ws)
                return;
            isOpen = true;
            if (this.connectTimer)
                clearTimeout(this.connectTimer);
            this.connectTimer = undefined;
            this.wsEverOpened = true;
            this.wsFailures = 0;
            // A server that did not echo relay.v1.bin speaks JSON.
            this.wire = wanted === "binary" && ws.protocol === "relay.v1.bin" ? "binary" : "json";
            this.startHeartbeat();
            for (const s of this.subs.values())
                this.sendSubscribe(s);
            const q = this.queue;
            this.queue = [];
            for (const c of q)
                this.send(c);
            this.opened("ws");
        };
        ws.onmessage = (ev) => {
            if (this.ws !== ws)
                return;
            this.heartbeatUnanswered = false;
            let e;
            try {
                if (typeof ev.data === "string")
                    e = JSON.parse(ev.data);
                else if (ev.data instanceof ArrayBuffer)
                    e = decodeBinary(new Uint8Array(ev.data));
                else if (ArrayBuffer.isView(ev.data))
                    e = decodeBinary(new Uint8Array(ev.data.buffer, ev.data.byteOffset, ev.data.byteLength));
                else
                    return;
            }
            catch (err) {
                this.emit("error", err instanceof RelayError ? err : new RelayError("bad_frame", String(err)));
                return;
            }
            this.handle(e);
        };
        ws.onerror = () => {
            /* onclose follows */
        };
        ws.onclose = (ev) => {
            if (this.ws !== ws)
                return;
            this.down(ev.code ?? 1006, ev.reason ?? "", isOpen);
        };
    }
    startHeartbeat() {
        const every = this.opts.heartbeatIntervalMs;
        if (!every)
            return;
        this.heartbeatUnanswered = false;
        this.heartbeatTimer = setInterval(() => {
            if (!this.ws)
                return;
            if (this.heartbeatUnanswered) {
                // Nothing came back for a whole period after a heartbeat: the connection is dead.
                this.down(1006, "heartbeat timeout", true);
                return;
            }
            this.heartbeatUnanswered = true;
            this.send({ type: "heartbeat" });
        }, every);
    }
    send(cmd) {
        const ws = this.ws;
        if (!ws || ws.readyState !== 1) {
            this.queue.push(cmd);
            return;
        }
        try {
            ws.send(this.wire === "binary" ? encodeBinary(cmd) : encodeJson(cmd));
        }
        catch (e) {
            if (cmd.id !== undefined)
                this.settle(cmd.id, undefined, e instanceof RelayError ? e : new RelayError("bad_request", String(e)));
        }
    }
    sendSubscribe(s) {
        const id = this.nextId++;
        this.pending.set(id, { kind: "subscribe", channel: s.channel });
        const cmd = { type: "subscribe", id, channel: s.channel };
        if (s.epoch !== undefined && s.seq !== undefined) {
            cmd.since = s.seq;
            cmd.epoch = s.epoch;
        }
        if (s.presence)
            cmd.presence = s.presence;
        this.send(cmd);
    }
    // --- SSE ------------------------------------------------------------------------------------
    openSse() {
        const ES = this.ES;
        if (!ES)
            return this.down(1006, "no EventSource", false);
        const channels = [...this.subs.keys()];
        if (channels.length === 0) {
            // Nothing to stream yet: the stream opens with the first subscription.
            this.opened("sse");
            return;
        }
        const params = new URLSearchParams();
        for (const c of channels)
            params.append("channel", c);
        const known = channels.map((c) => this.position(c));
        if (known.some((p) => p))
            params.set("last_event_id", known.map((p) => (p ? `${p.epoch}:${p.seq}` : "0:0")).join(","));
        // One stream, one presence identity: the first subscription's that has one.
        const presence = [...this.subs.values()].find((s) => s.presence)?.presence;
        if (presence) {
            params.set("presence", "1");
            if (presence.user !== undefined)
                params.set("presence_user", presence.user);
            if (presence.info !== undefined)
                params.set("presence_info", JSON.stringify(presence.info));
        }
        const url = this.urls.sse + (this.urls.sse.includes("?") ? "&" : "?") + params.toString();
        let es;
        try {
            es = new ES(url);
        }
        catch (e) {
            return this.down(1006, String(e), false);
        }
        this.es = es;
        let isOpen = false;
        const parse = (ev) => {
            if (this.es !== es)
                return undefined;
            try {
                return JSON.parse(ev.data);
            }
            catch {
                return undefined;
            }
        };
        es.onopen = () => {
            if (this.es !== es)
                return;
            isOpen = true;
            this.opened("sse");
        };
        es.onerror = () => {
            if (this.es !== es)
                return;
            for (const s of this.subs.values())
                s.active = false;
            // CONNECTING: the browser reconnects by itself with Last-Event-ID. CLOSED: it gave up.
            if (es.readyState === 2)
                this.down(1006, "event stream failed", isOpen);
            else
                this.setState("reconnecting");
        };
        es.addEventListener("subscribed", (ev) => {
            const d = parse(ev);
            for (const c of d?.channels ?? [])
                this.onSubscribed(c.channel, c.epoch, c.seq, c.recovered);
        });
        es.addEventListener("message", (ev) => {
            const d = parse(ev);
            if (d)
                this.onMessage(d.channel, d.seq, d.data, d.encoding);
        });
        es.addEventListener("presence", (ev) => {
            const d = parse(ev);
            if (d)
                this.emit("presence", d);
        });
        es.addEventListener("gap", (ev) => {
            const d = parse(ev);
            // Other reasons (epoch_changed, history_expired) are reported by `subscribed` as a resync.
            if (d && d.reason === "dropped" && d.from !== undefined && d.to !== undefined)
                this.onGap(d.channel, d.from, d.to);
        });
    }
    /** Reopens the event stream with the current channel list (debounced to one per tick). */
    sseChanged() {
        if (!this.useSse || !this.wanted || this.sseReopen)
            return;
        this.sseReopen = true;
        queueMicrotask(() => {
            this.sseReopen = false;
            if (!this.useSse || !this.wanted)
                return;
            this.teardown(1000, "channels changed");
            this.openSse();
        });
    }
    async api(method, path, body) {
        if (!this.fetchFn)
            throw new RelayError("bad_request", "no fetch: pass options.fetch");
        const headers = { "content-type": "application/json" };
        if (this.apiKey)
            headers.authorization = `Bearer ${this.apiKey}`;
        const timeout = this.opts.commandTimeoutMs;
        let timer;
        const res = await Promise.race([
            this.fetchFn(this.urls.http + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) }),
            new Promise((_, reject) => {
                timer = setTimeout(() => reject(new RelayError("timeout", `${method} ${path}: no answer within ${timeout} ms`)), timeout);
            }),
        ]).finally(() => clearTimeout(timer));
        const json = (await res.json());
        if (!res.ok)
            throw new RelayError(json.error?.code ?? `http_${res.status}`, json.error?.message ?? `HTTP ${res.status}`);
        return json;
    }
    // --- inbound --------------------------------------------------------------------------------
    handle(e) {
        switch (e.type) {
            case "message":
                return this.onMessage(e.channel, e.seq, e.data, e.encoding);
            case "subscribed":
                if (typeof e.id === "number")
                    this.pending.delete(e.id);
                return this.onSubscribed(e.channel, e.epoch, e.seq, e.recovered, e.reason);
            case "presence":
                return this.emit("presence", { channel: e.channel, seq: e.seq, event: e.event, client: e.client, user: e.user, info: e.info });
            case "gap":
                return this.onGap(e.channel, e.from, e.to);
            case "published":
                return this.settle(e.id, { channel: e.channel, epoch: e.epoch, seq: e.seq });
            case "unsubscribed":
                return this.settle(e.id, undefined);
            case "presence_state":
                return this.settle(e.id, { channel: e.channel, seq: e.seq, members: e.members });
            case "heartbeat":
                return;
            case "error": {
                const p = typeof e.id === "number" ? this.pending.get(e.id) : undefined;
                const err = new RelayError(e.code, e.message, p?.channel);
                if (p?.kind === "subscribe" && p.channel) {
                    this.pending.delete(e.id);
                    const s = this.subs.get(p.channel);
                    if (s && e.code !== "already_subscribed") {
                        this.subs.delete(p.channel);
                        this.rejectWaiters(s, err);
                        if (!s.waiters.length)
                            this.emit("error", err);
                    }
                    return;
                }
                if (p?.kind === "unsubscribe" && e.code === "not_subscribed")
                    return this.settle(e.id, undefined);
                if (p)
                    return this.settle(e.id, undefined, err);
                this.emit("error", err);
                return;
            }
        }
    }
    onSubscribed(channel, epoch, seq, recovered, reason) {
        const s = this.subs.get(channel);
        if (!s)
            return;
        const resumed = s.epoch !== undefined && s.seq !== undefined;
        const previousEpoch = s.epoch ?? "";
        const previousSeq = s.seq ?? 0;
        s.epoch = epoch;
        // Recovered: the replay (since+1 ..= seq) follows and moves the position itself.
        if (!(resumed && recovered))
            s.seq = seq;
        s.active = true;
        const ev = { channel, epoch, seq, recovered, resumed };
        s.last = ev;
        this.emit("subscribed", ev);
        if (resumed && !recovered) {
            this.emit("resync", {
                channel,
                epoch,
                seq,
                previousEpoch,
                previousSeq,
                reason: reason ?? (previousEpoch !== epoch ? "epoch_changed" : "history_expired"),
            });
        }
        const ws = s.waiters;
        s.waiters = [];
        for (const w of ws) {
            clearTimeout(w.timer);
            w.resolve(ev);
        }
    }
    onMessage(channel, seq, data, encoding) {
        const s = this.subs.get(channel);
        if (!s)
            return;
        if (s.seq !== undefined && seq <= s.seq)
            return; // already seen (never expected; cheap insurance)
        s.seq = seq;
        if (encoding === "base64" && typeof data === "string")
            data = base64ToBytes(data);
        const m = { channel, seq, data };
        if (s.onMessage) {
            try {
                s.onMessage(m);
            }
            catch (e) {
                setTimeout(() => {
                    throw e;
                });
            }
        }
        this.emit("message", m);
    }
    onGap(channel, from, to) {
        const s = this.subs.get(channel);
        if (!s)
            return;
        if (s.seq === undefined || to > s.seq)
            s.seq = to;
        this.emit("gap", { channel, from, to });
    }
    // --- commands -------------------------------------------------------------------------------
    waiter(what, channel) {
        let waiter;
        const promise = new Promise((resolve, reject) => {
            waiter = { resolve, reject, timer: undefined };
        });
        const timeout = this.opts.commandTimeoutMs;
        waiter.timer = setTimeout(() => {
            this.dropWaiter(waiter);
            waiter.reject(new RelayError("timeout", `${what}: no reply within ${timeout} ms`, channel));
        }, timeout);
        return { promise, waiter };
    }
    dropWaiter(w) {
        for (const [id, p] of this.pending)
            if (p.waiter === w)
                this.pending.delete(id);
        for (const s of this.subs.values())
            s.waiters = s.waiters.filter((x) => x !== w);
        this.queue = this.queue.filter((c) => c.id === undefined || this.pending.has(c.id));
    }
    command(cmd, channel) {
        const id = this.nextId++;
        const { promise, waiter } = this.waiter(cmd.type, channel);
        this.pending.set(id, { kind: cmd.type, channel, waiter: waiter });
        this.send({ ...cmd, id });
        return promise;
    }
    settle(id, value, err) {
        if (typeof id !== "number")
            return;
        const p = this.pending.get(id);
        if (!p)
            return;
        this.pending.delete(id);
        if (!p.waiter)
            return;
        clearTimeout(p.waiter.timer);
        if (err)
            p.waiter.reject(err);
        else
            p.waiter.resolve(value);
    }
    /** Rejects every in-flight command but subscribes (those are re-sent on the next connection). */
    failPending(code, message) {
        const sent = [...this.pending];
        this.pending.clear();
        for (const [, p] of sent) {
            if (!p.waiter)
                continue;
            clearTimeout(p.waiter.timer);
            p.waiter.reject(new RelayError(code, message, p.channel));
        }
        this.queue = this.queue.filter((c) => c.type === "subscribe");
    }
    rejectWaiters(s, err) {
        const ws = s.waiters;
        s.waiters = [];
        for (const w of ws) {
            clearTimeout(w.timer);
            w.reject(err);
        }
    }
    /**
     * Subscribes to `channel`. Resolves once the relay confirms (on the current or a later
     * connection); the subscription then lives until `unsubscribe`, across reconnects.
     */
    subscribe(channel, options = {}) {
        let s = this.subs.get(channel);
        if (s?.active && s.last)
            return Promise.resolve(s.last);
        const { promise, waiter } = this.waiter("subscribe", channel);
        if (!s) {
            s = { channel, active: false, waiters: [], presence: options.presence, onMessage: options.onMessage };
            if (options.from) {
                s.epoch = options.from.epoch;
                s.seq = options.from.seq;
            }
            this.subs.set(channel, s);
            if (this.useSse)
                this.sseChanged();
            else if (this.ws && this.ws.readyState === 1)
                this.sendSubscribe(s);
        }
        s.waiters.push(waiter);
        // A subscribe that timed out before the relay ever confirmed it is withdrawn.
        promise.then(undefined, (e) => {
            const cur = this.subs.get(channel);
            if (e.code !== "timeout" || cur !== s || cur.last || cur.waiters.length)
                return;
            this.subs.delete(channel);
            if (this.useSse)
                this.sseChanged();
            else if (this.ws && this.ws.readyState === 1)
                this.send({ type: "unsubscribe", channel });
        });
        return promise;
    }
    /** Unsubscribes from `channel` (and forgets its position). */
    async unsubscribe(channel) {
        const s = this.subs.get(channel);
        if (!s)
            return;
        this.subs.delete(channel);
        this.rejectWaiters(s, new RelayError("unsubscribed", "unsubscribed before the reply", channel));
        if (this.useSse)
            return this.sseChanged();
        if (!this.ws || this.ws.readyState !== 1)
            return;
        await this.command({ type: "unsubscribe", channel }, channel);
    }
    /** Publishes `data` (any JSON value; bytes on a binary connection) to `channel`. */
    publish(channel, data) {
        if (this.useSse)
            return this.api("POST", "/api/publish", { channel, data: data === undefined ? null : data });
        return this.command({ type: "publish", channel, data }, channel);
    }
    /** Who is in a presence channel. */
    presence(channel) {
        if (this.useSse)
            return this.api("GET", `/api/presence/${encodeURIComponent(channel)}`);
        return this.command({ type: "presence", channel }, channel);
    }
}
export default RelayClient;
