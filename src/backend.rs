//! The backend proxy (issue 14, Centrifugo's connect / subscribe / publish proxy): relay asks
//! the application's backend, by an HTTP POST of JSON, whether a connection may open, a
//! subscribe may be made, a client publish may go out (and with what data).
//!
//! - One function per decision point ([`admit`], [`Proxy::subscribe`], [`Proxy::publish`]):
//!   transports call it and act on its answer; nothing here touches a socket of a client.
//! - The answer is `{"result":{…}}` (allow, maybe with changes), `{"error":{"message"}}` (the
//!   client gets `forbidden` with that message) or `{"disconnect":{"code","reason"}}` (the
//!   connection is closed with that code, 4000-4999). docs/protocol.md, "Backend proxy".
//! - A backend that fails (no answer within `--proxy-timeout`, a non-2xx status, a bad answer)
//!   gets the failure policy: `deny` (default; the client gets `unavailable`) or `allow`.
//! - Requests in flight are bounded per node (`--proxy-max-in-flight`); past it the client gets
//!   `overloaded` at once, whatever the policy: a backend that falls behind is not buried.
//! - Metrics: `relay_proxy_requests_total{kind,result}`, `relay_proxy_seconds{kind}`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hyper::header::HeaderName;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::types::{ChannelName, DataKind, Pattern};
use crate::webhooks::client::{Client, PostError};

/// The lowest and highest close code a backend may ask for (the application range).
const CLOSE_CODES: std::ops::RangeInclusive<u16> = 4000..=4999;

// The close code of a refused connect, from the catalogue; its old path.
pub use crate::protocol::codes::CLOSE_FORBIDDEN;

/// Why the backend (or the proxy itself) said no: what the client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error code the client gets (`forbidden`, `unavailable`, `overloaded`).
    pub code: &'static str,
    /// The backend's reason, or what failed.
    pub message: String,
    /// Close the connection with this code and reason after the error.
    pub close: Option<(u16, String)>,
}

impl Refusal {
    /// A refusal without a close.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            close: None,
        }
    }
}

/// Who is asking: captured once from the upgrade (or SSE) request, shared by the connection's
/// requests to the backend. Held only while a proxy is configured.
pub struct Caller {
    proxy: Arc<Proxy>,
    /// `websocket` or `sse`.
    pub transport: &'static str,
    /// `json`, `binary` or `sse`.
    pub protocol: &'static str,
    /// The client's address (after trusted proxies).
    pub remote: Option<IpAddr>,
    /// The `--proxy-header` headers of the client's request, forwarded on every POST.
    pub headers: Vec<(HeaderName, String)>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("transport", &self.transport)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// The connection a request is about: its caller, client id and user.
#[derive(Clone)]
pub struct Asker {
    caller: Arc<Caller>,
    client: Arc<str>,
    user: Option<Arc<str>>,
}

impl Caller {
    /// The proxy this caller asks.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// The asker of a subscribe to `channel` by `client` (`user`), when the subscribe proxy
    /// covers the channel.
    pub fn subscribe_asker(
        self: &Arc<Self>,
        client: &Arc<str>,
        user: Option<&Arc<str>>,
        channel: &str,
    ) -> Option<Asker> {
        self.proxy
            .checks_subscribe(channel)
            .then(|| self.asker(client, user))
    }

    /// The asker of a client publish to `channel`, when the publish proxy covers it.
    pub fn publish_asker(
        self: &Arc<Self>,
        client: &Arc<str>,
        user: Option<&Arc<str>>,
        channel: &str,
    ) -> Option<Asker> {
        self.proxy
            .checks_publish(channel)
            .then(|| self.asker(client, user))
    }

    fn asker(self: &Arc<Self>, client: &Arc<str>, user: Option<&Arc<str>>) -> Asker {
        Asker {
            caller: self.clone(),
            client: client.clone(),
            user: user.cloned(),
        }
    }
}

impl Asker {
    /// The subscribe proxy's decision on `channel`.
    pub async fn subscribe(self, channel: ChannelName) -> Result<(), Refusal> {
        let p = &self.caller.proxy;
        p.subscribe(&self.caller, &self.client, self.user.as_deref(), &channel)
            .await
    }

    /// The publish proxy's decision: the data to publish.
    pub async fn publish(
        self,
        channel: &ChannelName,
        data: (DataKind, Bytes),
    ) -> Result<(DataKind, Bytes), Refusal> {
        let p = &self.caller.proxy;
        p.publish(
            &self.caller,
            &self.client,
            self.user.as_deref(),
            channel,
            data,
        )
        .await
    }
}

/// The connect-time part of a request: its caller and the token it carried (forwarded to the
/// connect proxy, then dropped).
pub struct Handshake {
    /// The caller, kept by the connection.
    pub caller: Arc<Caller>,
    /// `?token=` or `Authorization: Bearer`.
    pub token: Option<String>,
}

/// What the connect proxy decided for a connection.
#[derive(Debug, Default)]
pub struct Admitted {
    /// The user the backend named; `None`: as before (anonymous, or the token's).
    pub user: Option<Arc<str>>,
    /// Presence info (a JSON value).
    pub info: Option<Bytes>,
    /// When the connection's right ends, Unix seconds.
    pub expire_at: Option<u64>,
    /// Server-side subscriptions to make at once.
    pub channels: Vec<ChannelName>,
}

/// The backend proxy of a node: its URLs, patterns, client and in-flight bound.
pub struct Proxy {
    client: Client,
    connect: Option<hyper::Uri>,
    subscribe: Option<hyper::Uri>,
    publish: Option<hyper::Uri>,
    subscribe_channels: Vec<Pattern>,
    publish_channels: Vec<Pattern>,
    headers: Vec<HeaderName>,
    timeout: Duration,
    allow_on_failure: bool,
    max_answer: usize,
    slots: Arc<tokio::sync::Semaphore>,
}

/// Which request.
#[derive(Clone, Copy)]
enum Kind {
    Connect,
    Subscribe,
    Publish,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Subscribe => "subscribe",
            Kind::Publish => "publish",
        }
    }
}

/// The backend's answer, before it is applied.
#[derive(Deserialize, Default)]
struct Answer {
    #[serde(default)]
    result: Option<AnswerResult>,
    #[serde(default)]
    error: Option<AnswerError>,
    #[serde(default)]
    disconnect: Option<AnswerDisconnect>,
}

#[derive(Deserialize, Default)]
struct AnswerResult {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    expire_at: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    b64data: Option<String>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct AnswerDisconnect {
    code: u16,
    #[serde(default)]
    reason: String,
}

/// Parses the `--proxy-*-channels` patterns (checked by [`problems`]).
fn patterns(list: &[String]) -> Vec<Pattern> {
    list.iter().filter_map(|p| Pattern::parse(p).ok()).collect()
}

fn url(s: &Option<String>) -> Option<hyper::Uri> {
    s.as_deref().and_then(|u| u.parse().ok())
}

impl Proxy {
    /// The proxy `config` describes; `None` when no `--proxy-*-url` is set.
    pub fn from_config(c: &Config) -> std::io::Result<Option<Proxy>> {
        if c.proxy_connect_url.is_none()
            && c.proxy_subscribe_url.is_none()
            && c.proxy_publish_url.is_none()
        {
            return Ok(None);
        }
        Ok(Some(Proxy {
            client: Client::new()?,
            connect: url(&c.proxy_connect_url),
            subscribe: url(&c.proxy_subscribe_url),
            publish: url(&c.proxy_publish_url),
            subscribe_channels: patterns(&c.proxy_subscribe_channels),
            publish_channels: patterns(&c.proxy_publish_channels),
            headers: c
                .proxy_header
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            timeout: c.proxy_timeout,
            allow_on_failure: c.proxy_failure == "allow",
            // A publish answer carries data up to the message limit (base64: 4/3 of it).
            max_answer: c.max_message_size * 2 + 64 * 1024,
            slots: Arc::new(tokio::sync::Semaphore::new(c.proxy_max_in_flight)),
        }))
    }

    /// The handshake of a request from `remote` with `headers`: only the `--proxy-header`
    /// headers are kept (the connection holds them while it lasts).
    pub fn handshake(
        self: &Arc<Self>,
        (transport, protocol): (&'static str, &'static str),
        remote: Option<IpAddr>,
        headers: &hyper::HeaderMap,
        token: Option<String>,
    ) -> Handshake {
        let headers = self
            .headers
            .iter()
            .filter_map(|n| {
                let v = headers.get(n)?.to_str().ok()?;
                Some((n.clone(), v.to_owned()))
            })
            .collect();
        Handshake {
            caller: Arc::new(Caller {
                proxy: self.clone(),
                transport,
                protocol,
                remote,
                headers,
            }),
            token,
        }
    }

    /// Whether connections are asked about.
    pub fn has_connect(&self) -> bool {
        self.connect.is_some()
    }

    /// Whether a subscribe to `channel` goes to the backend.
    pub fn checks_subscribe(&self, channel: &str) -> bool {
        self.subscribe.is_some()
            && self
                .subscribe_channels
                .iter()
                .any(|p| p.matches(channel, None))
    }

    /// Whether a client publish to `channel` goes to the backend.
    pub fn checks_publish(&self, channel: &str) -> bool {
        self.publish.is_some()
            && self
                .publish_channels
                .iter()
                .any(|p| p.matches(channel, None))
    }

    /// One POST: the backend's answer, or the refusal a failure comes to (`Ok(None)`: failed,
    /// and the policy allows).
    async fn ask(
        &self,
        kind: Kind,
        url: &hyper::Uri,
        caller: &Caller,
        body: serde_json::Value,
    ) -> Result<Option<AnswerResult>, Refusal> {
        let kind_s = kind.as_str();
        let count = |result: &'static str| {
            metrics::counter!("relay_proxy_requests_total", "kind" => kind_s, "result" => result)
                .increment(1);
        };
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            count("overloaded");
            crate::limits::refused(crate::limits::Cause::ProxyInFlight, kind_s);
            return Err(Refusal::new(
                "overloaded",
                "too many backend proxy requests in flight (--proxy-max-in-flight)",
            ));
        };
        let start = Instant::now();
        let sent = self
            .client
            .send(
                hyper::Method::POST,
                url,
                caller.headers.clone(),
                Bytes::from(body.to_string()),
                self.timeout,
                Some(self.max_answer),
            )
            .await;
        metrics::histogram!("relay_proxy_seconds", "kind" => kind_s)
            .record(start.elapsed().as_secs_f64());
        let failed = |result: &'static str, why: String| {
            count(result);
            tracing::debug!(kind = kind_s, error = %why, "backend proxy request failed");
            if self.allow_on_failure {
                Ok(None)
            } else {
                Err(Refusal::new(
                    "unavailable",
                    format!("the backend could not be asked: {why}"),
                ))
            }
        };
        let answer = match sent {
            Ok(b) => match serde_json::from_slice::<Answer>(&b) {
                Ok(a) => a,
                Err(e) => return failed("bad_answer", format!("bad answer: {e}")),
            },
            Err(e @ PostError::Timeout(_)) => return failed("timeout", e.to_string()),
            Err(e @ PostError::Status(_)) => return failed("status", e.to_string()),
            Err(e) => return failed("error", e.to_string()),
        };
        if let Some(d) = answer.disconnect {
            count("disconnect");
            let code = if CLOSE_CODES.contains(&d.code) {
                d.code
            } else {
                CLOSE_FORBIDDEN
            };
            let reason = truncate(&d.reason, 120);
            return Err(Refusal {
                code: "forbidden",
                message: d.reason.clone(),
                close: Some((code, reason)),
            });
        }
        if let Some(e) = answer.error {
            count("deny");
            crate::limits::refused(crate::limits::Cause::Forbidden, kind_s);
            return Err(Refusal::new("forbidden", e.message));
        }
        count("allow");
        Ok(Some(answer.result.unwrap_or_default()))
    }

    /// The connect proxy: `Ok(None)` unchanged (failed, policy allow), `Ok(Some)` what the
    /// backend decided. The request: `{"client","transport","protocol","remote_addr"?,"token"?}`.
    pub async fn connect(
        &self,
        caller: &Caller,
        client: &str,
        token: Option<&str>,
    ) -> Result<Option<Admitted>, Refusal> {
        let Some(url) = &self.connect else {
            return Ok(None);
        };
        let mut body = identity(caller, client, None);
        if let Some(t) = token {
            body["token"] = t.into();
        }
        let Some(r) = self.ask(Kind::Connect, url, caller, body).await? else {
            return Ok(None);
        };
        let mut channels = Vec::with_capacity(r.channels.len());
        for c in &r.channels {
            match ChannelName::new(c) {
                Ok(c) => channels.push(c),
                // The backend's mistake: the connection would silently miss a channel.
                Err(e) => {
                    return Err(Refusal::new(
                        "unavailable",
                        format!("the backend named an invalid channel {c:?}: {e}"),
                    ))
                }
            }
        }
        Ok(Some(Admitted {
            user: r.user.filter(|u| !u.is_empty()).map(Arc::from),
            info: r.info.map(|i| Bytes::from(i.get().to_owned())),
            expire_at: r.expire_at,
            channels,
        }))
    }

    /// The subscribe proxy for `channel` (call when [`Proxy::checks_subscribe`]). The request:
    /// `{"client","transport","protocol","user"?,"channel"}`.
    async fn subscribe(
        &self,
        caller: &Caller,
        client: &str,
        user: Option<&str>,
        channel: &ChannelName,
    ) -> Result<(), Refusal> {
        let Some(url) = &self.subscribe else {
            return Ok(());
        };
        let mut body = identity(caller, client, user);
        body["channel"] = channel.as_str().into();
        self.ask(Kind::Subscribe, url, caller, body).await.map(drop)
    }

    /// The publish proxy for `channel` (call when [`Proxy::checks_publish`]): the data to
    /// publish, the backend's if it gave any. The request: `{"client","transport","protocol",
    /// "user"?,"channel","data"}` (`"b64data"` instead of `data` for bytes that are not JSON).
    async fn publish(
        &self,
        caller: &Caller,
        client: &str,
        user: Option<&str>,
        channel: &ChannelName,
        (kind, data): (DataKind, Bytes),
    ) -> Result<(DataKind, Bytes), Refusal> {
        let Some(url) = &self.publish else {
            return Ok((kind, data));
        };
        let mut body = identity(caller, client, user);
        body["channel"] = channel.as_str().into();
        match kind {
            DataKind::Json => match serde_json::from_slice::<serde_json::Value>(&data) {
                Ok(v) => body["data"] = v,
                Err(_) => body["b64data"] = b64(&data).into(),
            },
            DataKind::Binary => body["b64data"] = b64(&data).into(),
        }
        let Some(r) = self.ask(Kind::Publish, url, caller, body).await? else {
            return Ok((kind, data));
        };
        if let Some(d) = r.data {
            return Ok((DataKind::Json, Bytes::from(d.get().to_owned())));
        }
        if let Some(b) = r.b64data {
            return match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(v) => Ok((DataKind::Binary, Bytes::from(v))),
                Err(e) => Err(Refusal::new(
                    "unavailable",
                    format!("the backend's b64data is not base64: {e}"),
                )),
            };
        }
        Ok((kind, data))
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// At most `max` bytes of `s`, cut at a character boundary (close reasons fit 123 bytes).
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The fields every request carries.
fn identity(caller: &Caller, client: &str, user: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "client": client,
        "transport": caller.transport,
        "protocol": caller.protocol,
    });
    if let Some(ip) = caller.remote {
        v["remote_addr"] = ip.to_string().into();
    }
    if let Some(u) = user {
        v["user"] = u.into();
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answers_parse_in_every_documented_shape() {
        let a: Answer = serde_json::from_str(
            r#"{"result":{"user":"u1","info":{"n":1},"expire_at":5,"channels":["a"]}}"#,
        )
        .unwrap();
        let r = a.result.unwrap();
        assert_eq!(r.user.as_deref(), Some("u1"));
        assert_eq!(r.info.unwrap().get(), r#"{"n":1}"#);
        assert_eq!(r.channels, ["a"]);
        let a: Answer = serde_json::from_str(r#"{"error":{"message":"no"}}"#).unwrap();
        assert_eq!(a.error.unwrap().message, "no");
        let a: Answer =
            serde_json::from_str(r#"{"disconnect":{"code":4500,"reason":"bye"}}"#).unwrap();
        assert_eq!(a.disconnect.unwrap().code, 4500);
        let a: Answer = serde_json::from_str("{}").unwrap();
        assert!(a.result.is_none() && a.error.is_none());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 120), "abc");
    }
}
