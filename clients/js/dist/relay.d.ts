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
/** Which transport the client uses: `auto` tries WebSocket and falls back to SSE. */
export type TransportMode = "auto" | "ws" | "sse";
/** The WebSocket sub-protocol: JSON text frames or the binary protocol. */
export type WireProtocol = "json" | "binary";
/**
 * Connection state, as reported by the `state` event and `client.state`: `idle` before the first
 * `connect()` (with `autoConnect: false`), `connecting`, `open`, `reconnecting`, and `closed`
 * after `close()` or once it gave up (`backoff.maxAttempts`).
 */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";
/** The subset of the WHATWG WebSocket that the client uses (browsers, Node >= 22, `ws`). */
export interface WebSocketLike {
    readonly readyState: number;
    readonly protocol: string;
    binaryType: string;
    send(data: string | ArrayBuffer | Uint8Array): void;
    close(code?: number, reason?: string): void;
    onopen: ((ev: unknown) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
    onerror: ((ev: unknown) => void) | null;
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
}
/** A WebSocket constructor (`globalThis.WebSocket`, the `ws` package, a test fake). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;
/** The subset of the WHATWG EventSource that the client uses. */
export interface EventSourceLike {
    readonly readyState: number;
    onopen: ((ev: unknown) => void) | null;
    onerror: ((ev: unknown) => void) | null;
    addEventListener(type: string, listener: (ev: {
        data: string;
    }) => void): void;
    close(): void;
}
/** An EventSource constructor. */
export type EventSourceConstructor = new (url: string) => EventSourceLike;
/** A minimal `fetch` (used for publish and presence over SSE). */
export type FetchLike = (url: string, init?: {
    method?: string;
    headers?: Record<string, string>;
    body?: string;
}) => Promise<{
    ok: boolean;
    status: number;
    json(): Promise<unknown>;
}>;
/** Reconnect backoff: the n-th retry waits `random() * min(capMs, baseMs * 2^n)` (full jitter). */
export interface BackoffOptions {
    /** First retry's upper bound, ms (default 500). */
    baseMs?: number;
    /** Largest upper bound, ms (default 30000). */
    capMs?: number;
    /** Consecutive failed attempts before giving up (default Infinity). */
    maxAttempts?: number;
}
/** Options of {@link RelayClient}. */
export interface RelayOptions {
    /**
     * Base URL of the relay (`http(s)://host:port` or `ws(s)://host:port`). In a browser it
     * defaults to the page's origin.
     */
    url?: string;
    /** `auto` (default): WebSocket, then SSE if WebSocket cannot connect. */
    transport?: TransportMode;
    /** WebSocket sub-protocol (default `json`). */
    protocol?: WireProtocol;
    /** Extra query parameters for `/ws` and `/sse` (e.g. a token). */
    query?: Record<string, string>;
    /** Bearer key for `/api/*` (publish and presence over SSE). */
    apiKey?: string;
    /** WebSocket constructor (default `globalThis.WebSocket`). */
    WebSocket?: WebSocketConstructor;
    /** EventSource constructor (default `globalThis.EventSource`). */
    EventSource?: EventSourceConstructor;
    /** fetch (default `globalThis.fetch`). */
    fetch?: FetchLike;
    /** Reconnect backoff. */
    backoff?: BackoffOptions;
    /** After a 1012 (service restart) close, the first retry waits the delay the server advised in the
     * close reason (`reconnect in N ms`), else `random() * restartDelayMs` (default 250). */
    restartDelayMs?: number;
    /** Heartbeat period, ms (default 15000; 0 disables). A connection silent for a whole period after a heartbeat is considered dead and replaced. */
    heartbeatIntervalMs?: number;
    /** How long a command waits for its reply, ms (default 10000). */
    commandTimeoutMs?: number;
    /** How long a WebSocket may take to open, ms (default 10000). */
    connectTimeoutMs?: number;
    /** In `auto` mode: consecutive WebSocket failures (never opened) before switching to SSE (default 2). */
    wsFailuresBeforeSse?: number;
    /** Connect in the constructor (default true). */
    autoConnect?: boolean;
    /** Random source in [0, 1) for the jitter (tests). */
    random?: () => number;
}
/** A message of a subscribed channel. */
export interface MessageEvent {
    channel: string;
    seq: number;
    /** The JSON value; a `Uint8Array` for bytes published by a binary client. */
    data: unknown;
}
/** The server confirmed a subscription (also after every reconnect). */
export interface SubscribedEvent {
    channel: string;
    epoch: string;
    /** The channel's latest seq when subscribing. */
    seq: number;
    /** Whether the missed messages follow (only possible when resuming). */
    recovered: boolean;
    /** Whether the client asked to resume from a known position. */
    resumed: boolean;
}
/**
 * A resume failed (`recovered:false`): history no longer covers what was missed (the relay
 * restarted, the outage outlived `--history-ttl`, or the relay evicted the history under memory
 * pressure). The app should reload the channel's state; live messages continue from `seq`.
 * `evicted` is told over JSON WebSocket connections (SSE and binary ones say `history_expired`).
 */
export interface ResyncEvent {
    channel: string;
    epoch: string;
    seq: number;
    previousEpoch: string;
    previousSeq: number;
    reason: "epoch_changed" | "history_expired" | "evicted";
}
/** The server skipped messages `from..=to` (slow consumer, `drop` policy); fetch them from the history API if needed. */
export interface GapEvent {
    channel: string;
    from: number;
    to: number;
}
/** A presence member. */
export interface PresenceMember {
    client: string;
    user: string;
    info?: unknown;
}
/** A user joined or left a presence channel. */
export interface PresenceEvent extends PresenceMember {
    channel: string;
    seq: number;
    event: "join" | "leave";
}
/** Answer to {@link RelayClient.presence}. */
export interface PresenceState {
    channel: string;
    seq: number;
    members: PresenceMember[];
}
/** Answer to {@link RelayClient.publish}. */
export interface Published {
    channel: string;
    epoch: string;
    seq: number;
}
/** A channel position. */
export interface Position {
    epoch: string;
    seq: number;
}
/** Events of {@link RelayClient}. */
export interface RelayEvents {
    state: {
        state: ConnectionState;
    };
    open: {
        transport: "ws" | "sse";
        protocol: WireProtocol | "sse";
    };
    close: {
        code: number;
        reason: string;
        willReconnect: boolean;
    };
    reconnecting: {
        attempt: number;
        delayMs: number;
    };
    message: MessageEvent;
    subscribed: SubscribedEvent;
    resync: ResyncEvent;
    gap: GapEvent;
    presence: PresenceEvent;
    error: RelayError;
}
/** An error reply of the server, or a client-side failure (`timeout`, `disconnected`, `closed`). */
export declare class RelayError extends Error {
    readonly code: string;
    readonly channel?: string;
    constructor(code: string, message: string, channel?: string);
}
/** Options of {@link RelayClient.subscribe}. */
export interface SubscribeOptions {
    /**
     * Presence identity on a presence channel. Over SSE the stream joins presence
     * (`presence=1`, with `presence_user`/`presence_info` from the first subscription that has
     * one): the stream is then a member of every presence channel it carries.
     */
    presence?: {
        user?: string;
        info?: Record<string, unknown>;
    };
    /** Resume from a position saved elsewhere (e.g. localStorage). */
    from?: Position;
    /** Called for each message of this channel (in addition to the `message` event). */
    onMessage?: (m: MessageEvent) => void;
}
/** Close code of a server disconnect for good (`POST /api/users/disconnect`, `reconnect: false`):
 * the client does not reconnect; its final `close` event carries the code and the reason. */
export declare const CLOSE_DISCONNECTED_FOR_GOOD = 4011;
/** The delay a 1012 close reason advises (`service restart; reconnect in N ms`: the server spreads
 * its clients over a window that grows with its connections), or `undefined` without one. */
export declare function restartDelay(reason: string): number | undefined;
/** Full-jitter exponential backoff: `random() * min(cap, base * 2^attempt)`, attempt from 0. */
export declare function backoffDelay(attempt: number, baseMs: number, capMs: number, random?: () => number): number;
/** A command as the client sends it (codec-neutral). */
export type Command = {
    type: "subscribe";
    id?: number;
    channel: string;
    since?: number;
    epoch?: string;
    presence?: {
        user?: string;
        info?: unknown;
    };
} | {
    type: "unsubscribe";
    id?: number;
    channel: string;
} | {
    type: "publish";
    id?: number;
    channel: string;
    data: unknown;
} | {
    type: "heartbeat";
    id?: number;
} | {
    type: "presence";
    id?: number;
    channel: string;
};
/** An event as the server sends it (codec-neutral). */
export type ServerEvent = {
    type: "subscribed";
    id?: number | string;
    channel: string;
    epoch: string;
    seq: number;
    recovered: boolean;
    reason?: ResyncEvent["reason"];
} | {
    type: "unsubscribed";
    id?: number | string;
    channel: string;
} | {
    type: "published";
    id?: number | string;
    channel: string;
    epoch: string;
    seq: number;
} | {
    type: "heartbeat";
    id?: number | string;
} | {
    type: "message";
    channel: string;
    seq: number;
    data: unknown;
    encoding?: string;
} | {
    type: "error";
    id?: number | string;
    code: string;
    message: string;
} | {
    type: "presence_state";
    id?: number | string;
    channel: string;
    seq: number;
    members: PresenceMember[];
} | {
    type: "presence";
    channel: string;
    seq: number;
    event: "join" | "leave";
    client: string;
    user: string;
    info?: unknown;
} | {
    type: "gap";
    channel: string;
    from: number;
    to: number;
};
/** Encodes a command as a JSON text frame. */
export declare function encodeJson(cmd: Command): string;
/** `9f2c…` (1 to 16 hex digits) → 8 bytes big-endian. */
export declare function epochToBytes(epoch: string): number[];
/** 8 bytes big-endian → lowercase hex without leading zeros (the JSON form). */
export declare function epochFromBytes(b: Uint8Array): string;
/** Encodes a command as a `relay.v1.bin` frame. */
export declare function encodeBinary(cmd: Command): Uint8Array;
/** Decodes a `relay.v1.bin` server frame. Throws {@link RelayError} `bad_frame` on a malformed one. */
export declare function decodeBinary(frame: Uint8Array): ServerEvent;
/**
 * Why no transport can run here (`undefined`: one can): e.g. Node 20, which has neither a
 * global `WebSocket` nor `EventSource`. Exported for tests.
 */
export declare function transportMissing(mode: TransportMode, hasWs: boolean, hasEs: boolean): string | undefined;
/** Derives the `/ws`, `/sse` and API URLs from a base URL. */
export declare function relayUrls(base: string, query?: Record<string, string>): {
    ws: string;
    sse: string;
    http: string;
};
type Listener<K extends keyof RelayEvents> = (ev: RelayEvents[K]) => void;
/**
 * A connection to a relay with any number of channel subscriptions. Subscriptions and their
 * positions survive reconnects (and `close()` + `connect()`): on every new connection the
 * client re-subscribes with `since` + `epoch` and the relay replays what was missed, or says
 * it cannot (`resync` event).
 */
export declare class RelayClient {
    private readonly opts;
    private readonly urls;
    private readonly WS?;
    private readonly ES?;
    private readonly fetchFn?;
    private readonly apiKey?;
    private readonly listeners;
    private readonly subs;
    private readonly pending;
    private nextId;
    private wanted;
    private attempt;
    /** After a 1012: the delay the server advised (ms), or `true` for a random one below `restartDelayMs`. */
    private restartHint;
    private wsFailures;
    private wsEverOpened;
    private useSse;
    private ws?;
    private wire;
    private es?;
    private queue;
    private retryTimer?;
    private connectTimer?;
    private heartbeatTimer?;
    private heartbeatUnanswered;
    private sseReopen;
    private current;
    /** Events emitted inside the constructor, delivered once listeners can be attached. */
    private early?;
    private constructing;
    constructor(options?: RelayOptions);
    private flushEarly;
    /** Adds a listener; returns a function that removes it. */
    on<K extends keyof RelayEvents>(type: K, fn: Listener<K>): () => void;
    /** Removes a listener. */
    off<K extends keyof RelayEvents>(type: K, fn: Listener<K>): void;
    /** Resolves with the next event of `type` (rejects after `timeoutMs`, if given). */
    once<K extends keyof RelayEvents>(type: K, timeoutMs?: number): Promise<RelayEvents[K]>;
    private emit;
    /** The connection state. */
    get state(): ConnectionState;
    /** The transport in use (or about to be): `ws` or `sse`. */
    get transport(): "ws" | "sse";
    /** The last position seen on `channel` (what a resume starts from). */
    position(channel: string): Position | undefined;
    /** The subscribed channels. */
    channels(): string[];
    private setState;
    /** Starts connecting (and reconnecting) if not already. Subscriptions resume. */
    connect(): void;
    /** Closes for good (until `connect()`); subscriptions and positions are kept. */
    close(): void;
    /** Drops the current connection and reconnects now, resuming every subscription (e.g. after a network change). */
    reconnect(): void;
    private open;
    /** Closes the transport without reconnecting or touching pending commands. */
    private teardown;
    /** The transport went down: schedule the next attempt (or give up). */
    private down;
    /** No more reconnecting: `closed`, a final `close` event, every pending command and subscribe
     * rejected with `closed` and `why`. */
    private giveUp;
    /** The transport is up: `open` once per change of state (an SSE stream reopened for a new
     * channel list while open is no new `open`). */
    private opened;
    private openWs;
    private startHeartbeat;
    private send;
    private sendSubscribe;
    private openSse;
    /** Reopens the event stream with the current channel list (debounced to one per tick). */
    private sseChanged;
    private api;
    private handle;
    private onSubscribed;
    private onMessage;
    private onGap;
    private waiter;
    private dropWaiter;
    private command;
    private settle;
    /** Rejects every in-flight command but subscribes (those are re-sent on the next connection). */
    private failPending;
    private rejectWaiters;
    /**
     * Subscribes to `channel`. Resolves once the relay confirms (on the current or a later
     * connection); the subscription then lives until `unsubscribe`, across reconnects.
     */
    subscribe(channel: string, options?: SubscribeOptions): Promise<SubscribedEvent>;
    /** Unsubscribes from `channel` (and forgets its position). */
    unsubscribe(channel: string): Promise<void>;
    /** Publishes `data` (any JSON value; bytes on a binary connection) to `channel`. */
    publish(channel: string, data: unknown): Promise<Published>;
    /** Who is in a presence channel. */
    presence(channel: string): Promise<PresenceState>;
}
export default RelayClient;
