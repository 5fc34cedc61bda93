//! Webhooks: tells the application's backend what happened on the node, by HTTP POST.
//!
//! - [`Event`]s (`channel_occupied`, `channel_vacated`, `member_added`, `member_removed`) come
//!   from the engine's [`Observer`] calls, under the channel lock, so each hook's queue holds a
//!   channel's events in the order they happened. `client_event` comes from the Pusher
//!   client-event path ([`Webhooks::client_event`]), once the event is published.
//! - Each [`Hook`] (a URL, an event filter, a channel filter and a [`Format`]) has its own
//!   bounded queue and one sender task: one POST in flight per hook, so a receiver sees every
//!   channel's events in order. The filters are checked before anything is built or copied.
//!   A POST carries up to `batch_size` events, sent when that many are queued or `batch_delay`
//!   after the first. A failed POST (network error, timeout, non-2xx status) is retried with the
//!   same body and event ids after a full-jitter backoff, up to `max_attempts`: delivery is
//!   at least once, and receivers deduplicate by event id.
//! - A full queue drops the new event and counts it (`relay_webhook_events_dropped_total`,
//!   reason `queue_full`); so does a batch that used up its attempts (reason `attempts`).
//! - The body and the signature headers are the [`Format`]'s: [`RelayFormat`] by default
//!   (`X-Relay-Timestamp`, `X-Relay-Signature: v1=HMAC-SHA256(secret, "<timestamp>.<body>")`);
//!   another scheme (e.g. Pusher's `X-Pusher-Key`/`X-Pusher-Signature`) plugs in as another
//!   `Format` on its own hooks.
//!
//! The dispatcher runs on its own thread and runtime (in a node; on the caller's under
//! `server::run_here`, whose paused clock tests drive), so a slow receiver never touches the
//! shards.

pub mod agree;
pub mod client;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::observe::Observer;
use crate::engine::presence::Identity;
use crate::types::ChannelName;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A channel got its first subscriber.
    ChannelOccupied,
    /// A channel lost its last subscriber.
    ChannelVacated,
    /// A user joined a presence channel (its first connection there).
    MemberAdded,
    /// A user left a presence channel (its last connection there).
    MemberRemoved,
    /// A client sent an event to the other subscribers of a channel (Pusher `client-` events).
    ClientEvent,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 5] = [
        EventKind::ChannelOccupied,
        EventKind::ChannelVacated,
        EventKind::MemberAdded,
        EventKind::MemberRemoved,
        EventKind::ClientEvent,
    ];

    /// The event's `name` in bodies and filters.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ChannelOccupied => "channel_occupied",
            EventKind::ChannelVacated => "channel_vacated",
            EventKind::MemberAdded => "member_added",
            EventKind::MemberRemoved => "member_removed",
            EventKind::ClientEvent => "client_event",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of event kinds (a hook's filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSet(u8);

impl EventSet {
    /// Every kind.
    pub fn all() -> Self {
        Self(EventKind::ALL.iter().fold(0, |m, k| m | k.bit()))
    }

    /// The kinds of a hook that names none: channel and member changes. Client events are a
    /// message stream, as busy as the clients make it: a hook gets them only when it names
    /// `client_event` (Pusher's dashboard too has them opt-in).
    pub fn lifecycle() -> Self {
        Self(Self::all().0 & !EventKind::ClientEvent.bit())
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The set of the `+`-separated names in `s` (`channel_occupied+channel_vacated`).
    pub fn parse(s: &str) -> Result<Self, String> {
        s.split('+')
            .try_fold(Self(0), |set, name| match EventKind::parse(name) {
                Some(k) => Ok(Self(set.0 | k.bit())),
                None => Err(format!(
                    "unknown webhook event {name:?} (known: {})",
                    EventKind::ALL.map(EventKind::as_str).join(", ")
                )),
            })
    }
}

/// What a `client_event` carries besides its channel and user.
#[derive(Clone, Debug)]
pub struct ClientEvent {
    /// The event name (`client-…`).
    pub event: Arc<str>,
    /// Its data, the raw JSON value the client sent.
    pub data: Arc<str>,
    /// The sender's Pusher `socket_id`.
    pub socket_id: Arc<str>,
}

/// One event, as every hook sends it.
#[derive(Clone, Debug)]
pub struct Event {
    /// Stable across retries, unique per node run: `<node id>-<run>-<n>`. Receivers
    /// deduplicate with it.
    pub id: Arc<str>,
    /// What happened.
    pub kind: EventKind,
    /// Where.
    pub channel: ChannelName,
    /// Who (member events, client events on presence channels).
    pub user: Option<Arc<str>>,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// The client event (kind `client_event`).
    pub client: Option<ClientEvent>,
}

/// How a hook's POST looks: its body and its headers (the signature).
pub trait Format: Send + Sync {
    /// The body of one POST carrying `events`, at Unix time `now_ms`.
    fn body(&self, events: &[Event], now_ms: u64) -> Bytes;
    /// The headers of a POST of `body` sent at Unix time `now_ms` (called again for each try,
    /// so that a timestamp is fresh).
    fn headers(&self, body: &[u8], now_ms: u64) -> Vec<(hyper::header::HeaderName, String)>;
}

/// relay's own webhook format. Body:
/// `{"time_ms":…,"events":[{"id":"…","name":"member_added","channel":"…","user_id":"…","time_ms":…}]}`;
/// a `client_event` adds `"event":"client-…","data":<the client's JSON value>,"socket_id":"…"`.
/// Headers: `X-Relay-Timestamp` (Unix seconds) and, with a secret, `X-Relay-Signature:
/// v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub struct RelayFormat {
    secret: Option<ring::hmac::Key>,
}

impl RelayFormat {
    /// The format signing with `secret` (none: unsigned).
    pub fn new(secret: Option<&str>) -> Self {
        Self {
            secret: secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes())),
        }
    }
}

/// The `X-Relay-Signature` value for `body` sent at `timestamp` (Unix seconds).
pub fn relay_signature(key: &ring::hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex(ctx.sign().as_ref()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Format for RelayFormat {
    fn body(&self, events: &[Event], now_ms: u64) -> Bytes {
        #[derive(serde::Serialize)]
        struct Item<'a> {
            id: &'a str,
            name: &'static str,
            channel: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            user_id: Option<&'a str>,
            time_ms: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            event: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a serde_json::value::RawValue>,
            #[serde(skip_serializing_if = "Option::is_none")]
            socket_id: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct Body<'a> {
            time_ms: u64,
            events: Vec<Item<'a>>,
        }
        let body = Body {
            time_ms: now_ms,
            events: events
                .iter()
                .map(|e| Item {
                    id: &e.id,
                    name: e.kind.as_str(),
                    channel: e.channel.as_str(),
                    user_id: e.user.as_deref(),
                    time_ms: e.time_ms,
                    event: e.client.as_ref().map(|c| &*c.event),
                    // The client path checked it is JSON; a value that is not is left out
                    // rather than breaking the body.
                    data: e
                        .client
                        .as_ref()
                        .and_then(|c| serde_json::from_str(&c.data).ok()),
                    socket_id: e.client.as_ref().map(|c| &*c.socket_id),
                })
                .collect(),
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    fn headers(&self, body: &[u8], now_ms: u64) -> Vec<(hyper::header::HeaderName, String)> {
        use hyper::header::HeaderName;
        let ts = now_ms / 1000;
        let mut h = vec![(HeaderName::from_static("x-relay-timestamp"), ts.to_string())];
        if let Some(key) = &self.secret {
            h.push((
                HeaderName::from_static("x-relay-signature"),
                relay_signature(key, ts, body),
            ));
        }
        h
    }
}

/// The channels a hook hears of: those under `scope` (all without one) whose name after the
/// scope matches one of `patterns` (`*` = any run of characters; all without patterns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelFilter {
    /// A prefix every channel must have (a Pusher app's `pusher/ID/`), not part of the match.
    pub scope: Option<String>,
    /// Globs over the rest of the name.
    pub patterns: Vec<String>,
}

impl ChannelFilter {
    /// Whether events of `channel` go to the hook.
    pub fn matches(&self, channel: &str) -> bool {
        let name = match &self.scope {
            Some(scope) => match channel.strip_prefix(scope.as_str()) {
                Some(rest) => rest,
                None => return false,
            },
            None => channel,
        };
        self.patterns.is_empty()
            || self
                .patterns
                .iter()
                .any(|p| crate::engine::presence::glob_match(p, name))
    }
}

/// Where and what one hook sends.
#[derive(Clone)]
pub struct Hook {
    /// The receiver.
    pub url: hyper::Uri,
    /// The events it gets.
    pub events: EventSet,
    /// The channels it gets them of.
    pub channels: ChannelFilter,
    /// Its body and signature.
    pub format: Arc<dyn Format>,
}

/// A parsed `[EVENTS][;PATTERN…]@URL`.
#[derive(Debug)]
pub struct HookSpec {
    /// The events named (channel and member events without a name).
    pub events: EventSet,
    /// The channel patterns (all channels without one).
    pub patterns: Vec<String>,
    /// The receiver.
    pub url: hyper::Uri,
}

/// Parses a `--webhook-url` value: `[EVENTS][;PATTERN…]@URL`. EVENTS is `+`-separated event
/// names (`channel_occupied+channel_vacated@https://app.example/hooks`): channel_occupied,
/// channel_vacated, member_added and member_removed without it (`client_event` only when
/// named). Each PATTERN (`;`-separated; `*` = any run) limits the hook to the matching
/// channels: `;chat/*;rooms/*@https://…`.
pub fn parse_hook_spec(s: &str) -> Result<HookSpec, String> {
    // The filter ends at the `@` just before the scheme: a pattern may hold `@` (a channel
    // byte) and so may the URL's user info, but a scheme never does.
    let scheme = s.find("://").unwrap_or(s.len());
    let (filter, url) = match s[..scheme].rfind('@') {
        Some(at) => (Some(&s[..at]), &s[at + 1..]),
        None => (None, s),
    };
    let (events, patterns) = match filter {
        None => (EventSet::lifecycle(), Vec::new()),
        Some(f) => {
            let mut terms = f.split(';');
            let events = match terms.next().unwrap_or("") {
                "" => EventSet::lifecycle(),
                names => EventSet::parse(names)?,
            };
            let patterns: Vec<String> = terms.map(str::to_owned).collect();
            if patterns.iter().any(|p| p.is_empty()) {
                return Err(format!("{f:?}: an empty channel pattern"));
            }
            // `#`: a Pusher user channel, `#server-to-user-*`.
            let pattern_byte = |b: u8| b == b'*' || b == b'#' || crate::types::is_channel_byte(b);
            if let Some(p) = patterns.iter().find(|p| !p.bytes().all(pattern_byte)) {
                return Err(format!(
                    "channel pattern {p:?} holds a byte no channel name has"
                ));
            }
            (events, patterns)
        }
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(HookSpec {
            events,
            patterns,
            url: uri,
        }),
        _ => Err(format!("{url:?} must be an http:// or https:// URL")),
    }
}

/// Dispatcher settings (see the `--webhook-*` options).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Most events per POST.
    pub batch_size: usize,
    /// How long the first queued event waits for others to join its POST.
    pub batch_delay: Duration,
    /// A POST not answered within this fails (and is retried).
    pub timeout: Duration,
    /// Tries per batch, the first included.
    pub max_attempts: u32,
    /// Events queued per hook, at most.
    pub queue_size: usize,
    /// Backoff base and cap between tries.
    pub retry_base: Duration,
    /// The longest wait between two tries.
    pub retry_cap: Duration,
    /// How long shutdown waits for the queues to empty.
    pub shutdown_timeout: Duration,
}

/// One hook's queue, shared by the emitters and its sender task.
struct Queue {
    hook: Hook,
    events: Mutex<VecDeque<Event>>,
    ready: Notify,
}

impl Queue {
    fn wants(&self, kind: EventKind, channel: &ChannelName) -> bool {
        self.hook.events.contains(kind) && self.hook.channels.matches(channel.as_str())
    }
}

/// Where the dispatcher's sender tasks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// On a thread `relay-webhooks` with a runtime of its own: a slow receiver never holds up
    /// a shard.
    OwnThread,
    /// On the caller's runtime (`server::run_here`): their timers (batching window, retry
    /// backoff, shutdown deadline) follow the caller's clock, which a test may pause.
    Here,
}

/// The dispatcher: the queues the engine's events go into. Cheap to share.
pub struct Webhooks {
    queues: Vec<Arc<Queue>>,
    prefix: String,
    next: AtomicU64,
    settings: Settings,
}

impl Webhooks {
    /// Starts one sender task per hook where `runs` says. The senders stop once `shutdown` is
    /// cancelled and their queue is empty (or `shutdown_timeout` has passed).
    pub fn start(
        hooks: Vec<Hook>,
        settings: Settings,
        node_id: &str,
        seed: u64,
        shutdown: CancellationToken,
        runs: Runs,
    ) -> std::io::Result<Arc<Self>> {
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let me = Arc::new(Self {
            queues: hooks
                .into_iter()
                .map(|hook| {
                    Arc::new(Queue {
                        hook,
                        events: Mutex::new(VecDeque::new()),
                        ready: Notify::new(),
                    })
                })
                .collect(),
            prefix: format!("{node_id}-{run:x}"),
            next: AtomicU64::new(1),
            settings,
        });
        let rt = match runs {
            Runs::OwnThread => Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ),
            Runs::Here => None,
        };
        let queues = me.queues.clone();
        let settings = me.settings.clone();
        let client = {
            let _enter = rt.as_ref().map(|rt| rt.enter());
            client::Client::new()?
        };
        let senders = async move {
            let tasks: Vec<_> = queues
                .into_iter()
                .enumerate()
                .map(|(i, q)| {
                    tokio::spawn(send_loop(
                        q,
                        client.clone(),
                        settings.clone(),
                        shutdown.clone(),
                        seed ^ (i as u64).rotate_left(17),
                    ))
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        };
        match rt {
            Some(rt) => {
                std::thread::Builder::new()
                    .name("relay-webhooks".into())
                    .spawn(move || rt.block_on(senders))?;
            }
            None => {
                tokio::spawn(senders);
            }
        }
        Ok(me)
    }

    /// Queues an event for every hook that wants its kind and channel. Never blocks: a full
    /// queue drops the event (counted).
    pub fn emit(&self, kind: EventKind, channel: &ChannelName, user: Option<&Arc<str>>) {
        self.emit_with(kind, channel, user, || None);
    }

    /// The `client_event` of a client's `client-` event `event` with `data` (raw JSON) sent by
    /// `socket_id` (as `user` on a presence channel), to queue with [`PendingEvent::emit`] once
    /// the event is published; `None` (nothing copied) when no hook takes it.
    pub fn client_event(
        self: &Arc<Self>,
        channel: &ChannelName,
        user: Option<&Arc<str>>,
        event: &str,
        data: &str,
        socket_id: &str,
    ) -> Option<PendingEvent> {
        let kind = EventKind::ClientEvent;
        self.queues
            .iter()
            .any(|q| q.wants(kind, channel))
            .then(|| PendingEvent {
                hooks: self.clone(),
                channel: channel.clone(),
                user: user.cloned(),
                client: ClientEvent {
                    event: event.into(),
                    data: data.into(),
                    socket_id: socket_id.into(),
                },
            })
    }

    /// [`Self::emit`], with the client event built only if a hook takes it.
    fn emit_with(
        &self,
        kind: EventKind,
        channel: &ChannelName,
        user: Option<&Arc<str>>,
        client: impl FnOnce() -> Option<ClientEvent>,
    ) {
        let mut event = None;
        let mut client = Some(client);
        for q in self.queues.iter().filter(|q| q.wants(kind, channel)) {
            let e = event
                .get_or_insert_with(|| Event {
                    id: format!(
                        "{}-{}",
                        self.prefix,
                        self.next.fetch_add(1, Ordering::Relaxed)
                    )
                    .into(),
                    kind,
                    channel: channel.clone(),
                    user: user.cloned(),
                    time_ms: unix_ms(),
                    client: client.take().and_then(|f| f()),
                })
                .clone();
            let mut events = q.events.lock();
            if events.len() >= self.settings.queue_size {
                drop(events);
                metrics::counter!("relay_webhook_events_dropped_total", "reason" => "queue_full")
                    .increment(1);
                continue;
            }
            events.push_back(e);
            drop(events);
            q.ready.notify_one();
        }
    }
}

/// A `client_event` waiting for its event to be published ([`Webhooks::client_event`]).
pub struct PendingEvent {
    hooks: Arc<Webhooks>,
    channel: ChannelName,
    user: Option<Arc<str>>,
    client: ClientEvent,
}

impl PendingEvent {
    /// Queues it for the hooks that take it.
    pub fn emit(self) {
        let client = self.client;
        self.hooks.emit_with(
            EventKind::ClientEvent,
            &self.channel,
            self.user.as_ref(),
            || Some(client),
        );
    }
}

/// In memory mode the node decides alone: every change it sees is an event.
impl Observer for Webhooks {
    fn occupancy(&self, channel: &ChannelName, occupied: bool) {
        let kind = if occupied {
            EventKind::ChannelOccupied
        } else {
            EventKind::ChannelVacated
        };
        self.emit(kind, channel, None);
    }

    fn presence(&self, channel: &ChannelName, who: &Identity, joined: bool) {
        let kind = if joined {
            EventKind::MemberAdded
        } else {
            EventKind::MemberRemoved
        };
        self.emit(kind, channel, Some(&who.user));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One hook's sender: batches, POSTs, retries. One POST in flight, so order is kept.
async fn send_loop(
    q: Arc<Queue>,
    client: client::Client,
    s: Settings,
    shutdown: CancellationToken,
    mut random: u64,
) {
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && shutdown.is_cancelled() {
            deadline = Some(Instant::now() + s.shutdown_timeout);
        }
        let empty = q.events.lock().is_empty();
        if empty {
            if deadline.is_some() {
                return;
            }
            tokio::select! {
                _ = q.ready.notified() => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
        if deadline.is_none() && q.events.lock().len() < s.batch_size {
            // Let the events of the same moment share the POST.
            tokio::select! {
                _ = tokio::time::sleep(s.batch_delay) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        let batch: Vec<Event> = {
            let mut events = q.events.lock();
            let n = events.len().min(s.batch_size.max(1));
            events.drain(..n).collect()
        };
        let body = q.hook.format.body(&batch, unix_ms());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let headers = q.hook.format.headers(&body, unix_ms());
            let started = Instant::now();
            let result = client
                .post(&q.hook.url, headers, body.clone(), s.timeout)
                .await;
            match result {
                Ok(()) => {
                    metrics::counter!("relay_webhook_events_sent_total")
                        .increment(batch.len() as u64);
                    metrics::histogram!("relay_webhook_post_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let now = unix_ms();
                    for e in &batch {
                        metrics::histogram!("relay_webhook_latency_seconds")
                            .record(now.saturating_sub(e.time_ms) as f64 / 1000.0);
                    }
                    break;
                }
                Err(e) => {
                    let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
                    if attempt >= s.max_attempts || out_of_time {
                        tracing::warn!(url = %q.hook.url, error = %e, attempt, events = batch.len(),
                            "webhook batch dropped after its last try");
                        metrics::counter!("relay_webhook_events_dropped_total", "reason" => "attempts")
                            .increment(batch.len() as u64);
                        break;
                    }
                    tracing::debug!(url = %q.hook.url, error = %e, attempt, "webhook POST failed; retrying");
                    metrics::counter!("relay_webhook_retries_total").increment(1);
                    random = crate::engine::mix_public(random, attempt as u64);
                    let wait =
                        crate::backplane::backoff(attempt - 1, s.retry_base, s.retry_cap, random);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hook_specs_take_an_optional_event_filter() {
        let all = parse_hook_spec("http://127.0.0.1:9/h").unwrap();
        assert_eq!(all.events, EventSet::lifecycle());
        assert!(!all.events.contains(EventKind::ClientEvent));
        assert!(all.patterns.is_empty());
        assert_eq!(all.url.port_u16(), Some(9));
        let some =
            parse_hook_spec("channel_occupied+member_added@https://user@app.example/h").unwrap();
        assert!(some.events.contains(EventKind::ChannelOccupied));
        assert!(some.events.contains(EventKind::MemberAdded));
        assert!(!some.events.contains(EventKind::ChannelVacated));
        let userinfo = parse_hook_spec("https://user@app.example/h").unwrap();
        assert_eq!(
            (userinfo.events, userinfo.url.host()),
            (EventSet::lifecycle(), Some("app.example"))
        );
        let client = parse_hook_spec("client_event@http://a/h").unwrap();
        assert_eq!(client.events, EventSet::parse("client_event").unwrap());
        assert!(parse_hook_spec("channel_ocupied@http://a/h").is_err());
        assert!(parse_hook_spec("ftp://a/h").is_err());
        assert!(parse_hook_spec("/relative").is_err());
    }

    #[test]
    fn hook_specs_take_channel_patterns_which_may_hold_an_at_sign() {
        let h = parse_hook_spec(";chat/*;a@b*@https://u@app.example/h").unwrap();
        assert_eq!(h.events, EventSet::lifecycle());
        assert_eq!(h.patterns, ["chat/*", "a@b*"]);
        assert_eq!(h.url.host(), Some("app.example"));
        let h = parse_hook_spec("member_added;presence:*@http://a/h").unwrap();
        assert_eq!(h.events, EventSet::parse("member_added").unwrap());
        assert_eq!(h.patterns, ["presence:*"]);
        assert!(parse_hook_spec(";;@http://a/h").is_err(), "empty pattern");
        assert!(
            parse_hook_spec(";a b@http://a/h").is_err(),
            "no channel has a space"
        );
    }

    #[test]
    fn channel_filters_match_below_their_scope() {
        let any = ChannelFilter::default();
        assert!(any.matches("x") && any.matches("pusher/a/x"));
        let chat = ChannelFilter {
            scope: None,
            patterns: vec!["chat/*".into(), "news".into()],
        };
        assert!(chat.matches("chat/1") && chat.matches("news"));
        assert!(!chat.matches("newsroom") && !chat.matches("x/chat/1"));
        let app = ChannelFilter {
            scope: Some("pusher/a/".into()),
            patterns: Vec::new(),
        };
        assert!(app.matches("pusher/a/news"));
        assert!(!app.matches("pusher/ab/news") && !app.matches("news"));
        let presence = ChannelFilter {
            scope: Some("pusher/a/".into()),
            patterns: vec!["presence-*".into()],
        };
        assert!(presence.matches("pusher/a/presence-x"));
        assert!(!presence.matches("pusher/a/private-x"));
        assert!(!presence.matches("pusher/b/presence-x"));
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        // HMAC-SHA256("key", "1.{}") computed independently with openssl:
        // printf '1.{}' | openssl dgst -sha256 -hmac key
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let sig = relay_signature(&key, 1, b"{}");
        assert_eq!(
            sig,
            "v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
        assert_ne!(sig, relay_signature(&key, 2, b"{}"));
        assert_ne!(sig, relay_signature(&key, 1, b"{ }"));
    }
}
