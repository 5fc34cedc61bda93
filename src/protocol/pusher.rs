//! The Pusher Channels protocol (version 7), sans-IO: apps, the client messages, the server
//! events, the HMAC signatures of channel auth, user sign-in, the HTTP API and webhooks, and
//! the mapping between a Pusher app's channels and events and relay's channels and payloads.
//!
//! The mapping (see `docs/pusher.md`):
//! - Channel `C` of app `A` is relay channel `pusher/A/C`; `#server-to-user-U` is
//!   `pusher/A/~user-U` (`~` is not a Pusher channel byte, so the two never meet).
//! - A Pusher event (HTTP API or client event) is stored as the relay payload
//!   `{"event":NAME,"data":DATA,"socket_id":…,"user_id":…}` (the last two only when known), with
//!   `DATA` the JSON value the Pusher side carried (a string from the HTTP API, any value from a
//!   client event). Relay clients receive exactly that object.
//! - A relay payload reaches Pusher subscribers as that event when it is an object with a
//!   string `event` and a `data`; any other JSON payload as event [`DEFAULT_EVENT`] with the
//!   payload as its `data`; a binary payload as [`DEFAULT_EVENT`] with its base64 as `data`.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::json::json_string;
use super::ws::{begin_frame, finish_frame, OP_TEXT};
use crate::types::{ChannelName, DataKind, PresenceEvent, Publication};

/// Relay channels of Pusher apps start with this.
pub const PREFIX: &str = "pusher/";
/// The event name Pusher subscribers see for a relay payload that names none.
pub const DEFAULT_EVENT: &str = "message";
/// Longest Pusher channel name (Pusher's own limit).
pub const MAX_CHANNEL_LEN: usize = 164;
// An app's settings are plain data read by `config` (`--pusher-app`): they live with the
// leaf types, and this protocol names them from there.
pub use crate::types::pusher_app::{parse_app, App, MAX_APP_ID_LEN};
/// Longest event name (Pusher's limit).
pub const MAX_EVENT_NAME_LEN: usize = 200;
/// How far an HTTP API request's `auth_timestamp` may be from the server's clock (Pusher's
/// window).
pub const AUTH_WINDOW_SECS: u64 = 600;
/// Protocol versions spoken (pusher-js sends 7).
pub const PROTOCOLS: std::ops::RangeInclusive<u32> = 5..=7;
/// The relay presence pattern of every app's `presence-` channels.
pub const PRESENCE_PATTERN: &str = "pusher/*/presence-*";

/// Pusher close and error codes (4000–4099: do not reconnect; 4100–4199: reconnect after a
/// back-off; 4200–4299: reconnect at once; 4300–4399: other errors, no close).
pub mod code {
    /// The app key names no app.
    pub const APP_NOT_FOUND: u16 = 4001;
    /// Over the app's connection quota (`max_connections`).
    pub const OVER_QUOTA: u16 = 4004;
    /// The `protocol` query parameter is not a number.
    pub const BAD_VERSION: u16 = 4006;
    /// The protocol version is not one spoken here.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// No `protocol` query parameter.
    pub const NO_PROTOCOL: u16 = 4008;
    /// Unauthorized: a bad channel auth or sign-in signature, or a forbidden channel.
    pub const UNAUTHORIZED: u16 = 4009;
    /// The node is over capacity (memory budget): reconnect after a back-off.
    pub const OVER_CAPACITY: u16 = 4100;
    /// Reconnect at once (shutdown, a slow consumer).
    pub const RECONNECT: u16 = 4200;
    /// No pong in time.
    pub const PONG_TIMEOUT: u16 = 4201;
    /// The connection was terminated by the HTTP API (`terminate_connections`): reconnect
    /// after a back-off, as Pusher does.
    pub const TERMINATED: u16 = 4100;
    /// A client event was refused (not enabled, wrong channel, too large).
    pub const CLIENT_EVENT_REJECTED: u16 = 4301;
    /// A bad message (not JSON, unknown shape, bad channel).
    pub const BAD_MESSAGE: u16 = 4200;
}

/// What a channel is, by its name's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// Anyone may subscribe.
    Public,
    /// `private-`: needs an auth signature.
    Private,
    /// `private-encrypted-`: needs an auth signature; payloads pass through untouched; no
    /// client events.
    Encrypted,
    /// `presence-`: needs an auth signature with `channel_data`; members.
    Presence,
    /// `#server-to-user-ID`: only the connection signed in as that user.
    User,
}

impl ChannelKind {
    /// The kind of the Pusher channel `name`.
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with("private-encrypted-") {
            ChannelKind::Encrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else if name.starts_with(USER_CHANNEL) {
            ChannelKind::User
        } else {
            ChannelKind::Public
        }
    }

    /// Whether subscribing needs a signature.
    pub fn needs_auth(self) -> bool {
        matches!(
            self,
            ChannelKind::Private | ChannelKind::Encrypted | ChannelKind::Presence
        )
    }
}

/// The Pusher name prefix of a user's own channel.
pub const USER_CHANNEL: &str = "#server-to-user-";
/// Its relay form, after `pusher/ID/`.
pub const RELAY_USER: &str = "~user-";

/// The relay channel of Pusher channel `name` of app `app_id`; `None` for a name Pusher or
/// relay would refuse (relay channel names have no `,` or `;`, which Pusher allows: see
/// docs/pusher.md).
pub fn relay_channel(app_id: &str, name: &str) -> Option<ChannelName> {
    let (rest, user) = match name.strip_prefix(USER_CHANNEL) {
        Some(u) => (u, true),
        None => (name, false),
    };
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"_-=@.".contains(&b);
    if rest.is_empty() || name.len() > MAX_CHANNEL_LEN || !rest.bytes().all(ok) {
        return None;
    }
    let relay = match user {
        true => format!("{PREFIX}{app_id}/{RELAY_USER}{rest}"),
        false => format!("{PREFIX}{app_id}/{rest}"),
    };
    ChannelName::new(&relay).ok()
}

/// The Pusher name of relay channel `name` (`pusher/ID/C` → `C`); `None` for a channel of no
/// app.
pub fn pusher_channel(name: &str) -> Option<Cow<'_, str>> {
    let rest = name.strip_prefix(PREFIX)?;
    let (_, c) = rest.split_once('/')?;
    Some(match c.strip_prefix(RELAY_USER) {
        Some(u) => Cow::Owned(format!("{USER_CHANNEL}{u}")),
        None => Cow::Borrowed(c),
    })
}

/// The app id of relay channel `name`, if it is a Pusher app's.
pub fn app_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)?.split_once('/').map(|(a, _)| a)
}

/// The `socket_id` of a connection with hub tag `tag` (`high.low`, Pusher's format).
pub fn socket_id(tag: u64) -> String {
    format!("{}.{}", tag >> 32, tag & 0xffff_ffff)
}

/// The tag of a `socket_id`; `None` when it is not `\d+.\d+` of ours.
pub fn parse_socket_id(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('.')?;
    let digits = |p: &str| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(hi) || !digits(lo) {
        return None;
    }
    let (hi, lo) = (hi.parse::<u64>().ok()?, lo.parse::<u64>().ok()?);
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

/// Whether `s` is a `socket_id` in Pusher's format (the HTTP API refuses others).
pub fn valid_socket_id(s: &str) -> bool {
    parse_socket_id(s).is_some()
}

// --- relay payloads ---------------------------------------------------------------------

/// A relay payload read as a Pusher event (borrowed).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    socket_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user_id: Option<&'a RawValue>,
}

/// `p` as a Pusher event, when it is one (see the module docs).
fn envelope(p: &[u8]) -> Option<Envelope<'_>> {
    if p.first() != Some(&b'{') {
        return None;
    }
    let e: Envelope = serde_json::from_slice(p).ok()?;
    e.event.get().starts_with('"').then_some(e)
}

/// The relay payload of a Pusher event `name` with `data` (raw JSON), sent by `socket_id`
/// (excluded from delivery) as `user_id` (presence client events).
pub fn payload(name: &str, data: &str, socket_id: Option<&str>, user_id: Option<&str>) -> Bytes {
    let mut b = BytesMut::with_capacity(name.len() + data.len() + 64);
    b.put_slice(b"{\"event\":");
    b.put_slice(json_string(name).as_bytes());
    b.put_slice(b",\"data\":");
    b.put_slice(data.as_bytes());
    if let Some(s) = socket_id {
        b.put_slice(b",\"socket_id\":");
        b.put_slice(json_string(s).as_bytes());
    }
    if let Some(u) = user_id {
        b.put_slice(b",\"user_id\":");
        b.put_slice(json_string(u).as_bytes());
    }
    b.put_u8(b'}');
    super::json::normalize_data(&String::from_utf8_lossy(&b))
}

/// The hub's tag of the connection that sent publication `p` (its `socket_id`), 0 for none:
/// that connection does not receive it.
pub fn origin(p: &Publication) -> u64 {
    if p.kind != DataKind::Json {
        return 0;
    }
    envelope(&p.data)
        .and_then(|e| e.socket_id)
        .and_then(|s| parse_socket_id(&s))
        .unwrap_or(0)
}

/// The Pusher frame of publication `p` on relay channel `channel`: encoded once per
/// publication for every Pusher subscriber.
pub fn message(channel: &ChannelName, p: &Publication) -> Bytes {
    let name = pusher_channel(channel.as_str()).unwrap_or(Cow::Borrowed(channel.as_str()));
    match p.kind {
        DataKind::Json => match envelope(&p.data) {
            Some(e) => event_frame(
                e.event.get(),
                Some(&name),
                e.data.get(),
                e.user_id.map(RawValue::get),
            ),
            None => event_frame(
                &json_string(DEFAULT_EVENT),
                Some(&name),
                &String::from_utf8_lossy(&p.data),
                None,
            ),
        },
        DataKind::Binary => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&p.data);
            event_frame(
                &json_string(DEFAULT_EVENT),
                Some(&name),
                &json_string(&b64),
                None,
            )
        }
    }
}

/// A Pusher event frame: `{"event":E,"channel":C,"data":D,"user_id":U}` with `event`, `data`
/// and `user_id` raw JSON.
fn event_frame(event: &str, channel: Option<&str>, data: &str, user_id: Option<&str>) -> Bytes {
    let mut b = begin_frame(event.len() + data.len() + 64 + channel.map_or(0, str::len));
    b.put_slice(b"{\"event\":");
    b.put_slice(event.as_bytes());
    if let Some(c) = channel {
        // Channel names hold no byte that needs escaping.
        b.put_slice(b",\"channel\":\"");
        b.put_slice(c.as_bytes());
        b.put_u8(b'"');
    }
    b.put_slice(b",\"data\":");
    b.put_slice(data.as_bytes());
    if let Some(u) = user_id {
        b.put_slice(b",\"user_id\":");
        b.put_slice(u.as_bytes());
    }
    b.put_u8(b'}');
    finish_frame(b, OP_TEXT)
}

/// A server event named `event` (plain, not escaped) with raw JSON `data`.
fn server_event(event: &str, channel: Option<&str>, data: &str) -> Bytes {
    event_frame(&format!("\"{event}\""), channel, data, None)
}

/// The Pusher frame of a presence change (`member_added` / `member_removed`).
pub fn presence(channel: &ChannelName, e: &PresenceEvent) -> Bytes {
    let name = pusher_channel(channel.as_str()).unwrap_or(Cow::Borrowed(channel.as_str()));
    let user = json_string(&e.who.user);
    if e.join {
        let info = e
            .who
            .info
            .as_ref()
            .map_or(Cow::Borrowed("null"), |i| String::from_utf8_lossy(i));
        let data = format!("{{\"user_id\":{user},\"user_info\":{info}}}");
        server_event(
            "pusher_internal:member_added",
            Some(&name),
            &json_string(&data),
        )
    } else {
        let data = format!("{{\"user_id\":{user}}}");
        server_event(
            "pusher_internal:member_removed",
            Some(&name),
            &json_string(&data),
        )
    }
}

/// What a Pusher subscriber of a `drop` channel sees for messages it missed: `relay:gap`.
pub fn gap(channel: &ChannelName, from: u64, to: u64) -> Bytes {
    let name = pusher_channel(channel.as_str()).unwrap_or(Cow::Borrowed(channel.as_str()));
    server_event(
        "relay:gap",
        Some(&name),
        &format!("{{\"from\":{from},\"to\":{to}}}"),
    )
}

// --- server events ------------------------------------------------------------------------

/// `pusher:connection_established`.
pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Bytes {
    let data = format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout}}}");
    server_event("pusher:connection_established", None, &json_string(&data))
}

/// `pusher:error` with `code` (`None`: `null`, an error that closes nothing).
pub fn error(code: Option<u16>, message: &str) -> Bytes {
    let code = code.map_or_else(|| "null".to_owned(), |c| c.to_string());
    let data = format!("{{\"code\":{code},\"message\":{}}}", json_string(message));
    server_event("pusher:error", None, &data)
}

/// `pusher:pong`.
pub fn pong() -> Bytes {
    server_event("pusher:pong", None, "{}")
}

/// `pusher:ping` (the server asks for a sign of life).
pub fn ping() -> Bytes {
    server_event("pusher:ping", None, "{}")
}

/// `pusher_internal:subscription_succeeded` of a channel without presence.
pub fn subscription_succeeded(channel: &str) -> Bytes {
    server_event(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        "\"{}\"",
    )
}

/// `pusher_internal:subscription_succeeded` of a presence channel with its members (user id
/// and raw JSON info, one entry per user).
pub fn presence_succeeded(channel: &str, members: &[(String, Option<Bytes>)]) -> Bytes {
    let mut ids = String::from("[");
    let mut hash = String::from("{");
    for (i, (user, info)) in members.iter().enumerate() {
        if i > 0 {
            ids.push(',');
            hash.push(',');
        }
        let u = json_string(user);
        ids.push_str(&u);
        let info = info
            .as_ref()
            .map_or(Cow::Borrowed("null"), |i| String::from_utf8_lossy(i));
        let _ = write!(hash, "{u}:{info}");
    }
    ids.push(']');
    hash.push('}');
    let data = format!(
        "{{\"presence\":{{\"ids\":{ids},\"hash\":{hash},\"count\":{}}}}}",
        members.len()
    );
    server_event(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        &json_string(&data),
    )
}

/// `pusher:subscription_error` on `channel` (what pusher-js emits to the channel's bindings).
pub fn subscription_error(channel: &str, status: u16, message: &str) -> Bytes {
    let data = format!(
        "{{\"type\":\"AuthError\",\"error\":{},\"status\":{status}}}",
        json_string(message)
    );
    server_event("pusher:subscription_error", Some(channel), &data)
}

/// `pusher:signin_success` with the signed `user_data` (a JSON string).
pub fn signin_success(user_data: &str) -> Bytes {
    let data = format!("{{\"user_data\":{}}}", json_string(user_data));
    server_event("pusher:signin_success", None, &data)
}

// --- client messages ------------------------------------------------------------------

/// A message from a Pusher client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// `pusher:ping`.
    Ping,
    /// `pusher:pong`.
    Pong,
    /// `pusher:subscribe`.
    Subscribe {
        /// The Pusher channel.
        channel: Cow<'a, str>,
        /// `KEY:SIGNATURE`, for private and presence channels.
        auth: Option<Cow<'a, str>>,
        /// Presence: the JSON string `{"user_id":…,"user_info":…}` that was signed.
        channel_data: Option<Cow<'a, str>>,
    },
    /// `pusher:unsubscribe`.
    Unsubscribe {
        /// The Pusher channel.
        channel: Cow<'a, str>,
    },
    /// `pusher:signin`.
    Signin {
        /// `KEY:SIGNATURE`.
        auth: Cow<'a, str>,
        /// The JSON string that was signed (`{"id":…}`).
        user_data: Cow<'a, str>,
    },
    /// A `client-` event.
    Client {
        /// The event name.
        event: Cow<'a, str>,
        /// The Pusher channel.
        channel: Cow<'a, str>,
        /// Its data, raw JSON.
        data: &'a str,
    },
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscribeData<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(default, borrow)]
    auth: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    channel_data: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SigninData<'a> {
    #[serde(borrow)]
    auth: Cow<'a, str>,
    #[serde(borrow)]
    user_data: Cow<'a, str>,
}

/// Parses a client message; the error is the `pusher:error` message.
pub fn parse(text: &[u8]) -> Result<ClientMessage<'_>, Cow<'static, str>> {
    let m: RawMessage = serde_json::from_slice(text)
        .map_err(|e| Cow::Owned(format!("not a Pusher message: {e}")))?;
    // pusher-js sends `data` as an object; some clients send it as a JSON string.
    fn data(d: Option<&RawValue>) -> Result<Cow<'_, str>, Cow<'static, str>> {
        let d = d.ok_or(Cow::Borrowed("missing data"))?.get();
        if d.starts_with('"') {
            serde_json::from_str::<String>(d)
                .map(Cow::Owned)
                .map_err(|_| Cow::Borrowed("bad data"))
        } else {
            Ok(Cow::Borrowed(d))
        }
    }
    let bad = |what: &str| Cow::Owned(format!("bad {what} data"));
    match &*m.event {
        "pusher:ping" => Ok(ClientMessage::Ping),
        "pusher:pong" => Ok(ClientMessage::Pong),
        "pusher:subscribe" | "pusher:unsubscribe" | "pusher:signin" => {
            let d = data(m.data)?;
            let owned = |c: Cow<'_, str>| Cow::<'static, str>::Owned(c.into_owned());
            if m.event == "pusher:signin" {
                let s: SigninData = serde_json::from_str(&d).map_err(|_| bad("signin"))?;
                return Ok(ClientMessage::Signin {
                    auth: owned(s.auth),
                    user_data: owned(s.user_data),
                });
            }
            let s: SubscribeData = serde_json::from_str(&d).map_err(|_| bad("subscribe"))?;
            if m.event == "pusher:unsubscribe" {
                return Ok(ClientMessage::Unsubscribe {
                    channel: owned(s.channel),
                });
            }
            Ok(ClientMessage::Subscribe {
                channel: owned(s.channel),
                auth: s.auth.map(owned),
                channel_data: s.channel_data.map(owned),
            })
        }
        e if e.starts_with("client-") => {
            let channel = m
                .channel
                .ok_or(Cow::Borrowed("a client event needs a channel"))?;
            let data = m.data.map_or("null", RawValue::get);
            Ok(ClientMessage::Client {
                event: m.event,
                channel,
                data,
            })
        }
        other => Err(Cow::Owned(format!("unknown event {other:?}"))),
    }
}

/// A presence subscriber's `channel_data`.
#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow)]
    user_id: &'a RawValue,
    #[serde(default, borrow)]
    user_info: Option<&'a RawValue>,
}

/// The user id (a string or a number in `channel_data`, a string here) and raw info of a
/// presence subscriber's `channel_data`.
pub fn presence_member(channel_data: &str) -> Option<(String, Option<String>)> {
    let d: ChannelData = serde_json::from_str(channel_data).ok()?;
    let id = d.user_id.get();
    let user = if id.starts_with('"') {
        serde_json::from_str::<String>(id).ok()?
    } else if id.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        id.to_owned()
    } else {
        return None;
    };
    if user.is_empty() || user.len() > super::MAX_USER_LEN {
        return None;
    }
    let info = d
        .user_info
        .map(|i| i.get().to_owned())
        .filter(|i| i != "null");
    Some((user, info))
}

/// The `id` of a sign-in's `user_data`.
pub fn signin_user(user_data: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct User {
        id: String,
    }
    let u: User = serde_json::from_str(user_data).ok()?;
    (!u.id.is_empty() && u.id.len() <= super::MAX_USER_LEN).then_some(u.id)
}

// --- signatures ----------------------------------------------------------------------

/// Hex HMAC-SHA256 of `msg` with `secret`.
pub fn sign(secret: &str, msg: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex(ring::hmac::sign(&key, msg).as_ref())
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Hex MD5 of `body` (`body_md5`).
pub fn md5_hex(body: &[u8]) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(body))
}

/// Compares in constant time.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `auth` (`KEY:SIGNATURE`) signs `socket_id:channel[:channel_data]` with `app`'s
/// secret.
pub fn channel_auth_ok(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let mut msg = format!("{socket_id}:{channel}");
    if let Some(d) = channel_data {
        msg.push(':');
        msg.push_str(d);
    }
    signed_by(app, auth, msg.as_bytes())
}

/// Whether `auth` (`KEY:SIGNATURE`) signs `socket_id::user::user_data`.
pub fn user_auth_ok(app: &App, socket_id: &str, user_data: &str, auth: &str) -> bool {
    signed_by(
        app,
        auth,
        format!("{socket_id}::user::{user_data}").as_bytes(),
    )
}

fn signed_by(app: &App, auth: &str, msg: &[u8]) -> bool {
    let Some((key, sig)) = auth.split_once(':') else {
        return false;
    };
    ct_eq(key.as_bytes(), app.key.as_bytes())
        && ct_eq(sig.as_bytes(), sign(&app.secret, msg).as_bytes())
}

/// Why an HTTP API request's signature was refused (the 401 body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    /// A parameter is missing.
    #[error("Missing parameter: {0}")]
    Missing(&'static str),
    /// `auth_key` is not the app's key.
    #[error("Unknown auth_key")]
    UnknownKey,
    /// `auth_version` is not 1.0.
    #[error("Unsupported auth_version (1.0 is)")]
    Version,
    /// `auth_timestamp` is too far from the server's clock.
    #[error("Timestamp expired: Given timestamp ({given}) not within {AUTH_WINDOW_SECS}s of server time ({now})")]
    Expired {
        /// The request's.
        given: String,
        /// The server's.
        now: u64,
    },
    /// `body_md5` does not match the body.
    #[error("Invalid body_md5")]
    BodyMd5,
    /// `auth_signature` is wrong.
    #[error("Invalid signature: you should have sent HmacSHA256Hex({string_to_sign:?}, your_secret_key)")]
    Signature {
        /// What should have been signed.
        string_to_sign: String,
    },
}

/// Checks an HTTP API request of `app`: `method` and `path` as sent, `query` the decoded
/// (key, value) pairs, `body` the raw body, `now` Unix seconds.
pub fn check_api_request(
    app: &App,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    now: u64,
) -> Result<(), ApiAuthError> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let key = get("auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    let ts = get("auth_timestamp").ok_or(ApiAuthError::Missing("auth_timestamp"))?;
    let sig = get("auth_signature").ok_or(ApiAuthError::Missing("auth_signature"))?;
    if get("auth_version").is_some_and(|v| v != "1.0") {
        return Err(ApiAuthError::Version);
    }
    if !ct_eq(key.as_bytes(), app.key.as_bytes()) {
        return Err(ApiAuthError::UnknownKey);
    }
    let fresh = ts
        .parse::<u64>()
        .is_ok_and(|t| t.abs_diff(now) <= AUTH_WINDOW_SECS);
    if !fresh {
        return Err(ApiAuthError::Expired {
            given: ts.to_owned(),
            now,
        });
    }
    if !body.is_empty() {
        let md5 = get("body_md5").ok_or(ApiAuthError::Missing("body_md5"))?;
        if !ct_eq(md5.as_bytes(), md5_hex(body).as_bytes()) {
            return Err(ApiAuthError::BodyMd5);
        }
    }
    let mut pairs: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let sorted = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let string_to_sign = format!("{method}\n{path}\n{sorted}");
    if !ct_eq(
        sig.as_bytes(),
        sign(&app.secret, string_to_sign.as_bytes()).as_bytes(),
    ) {
        return Err(ApiAuthError::Signature { string_to_sign });
    }
    Ok(())
}

/// The `X-Pusher-Signature` of a webhook body.
pub fn webhook_signature(app: &App, body: &[u8]) -> String {
    sign(&app.secret, body)
}

/// One webhook event as Pusher sends it: `channel_occupied`, `channel_vacated`,
/// `member_added`, `member_removed` (with `user_id`), `client_event` (with `event`, `data`,
/// `socket_id` and, on presence channels, `user_id`).
#[derive(Debug, Clone, Copy)]
pub struct WebhookEvent<'a> {
    /// The event name.
    pub name: &'a str,
    /// The relay channel.
    pub channel: &'a str,
    /// Member events and presence client events.
    pub user_id: Option<&'a str>,
    /// Client events: the event name, its raw JSON data and the sender's `socket_id`.
    pub client: Option<(&'a str, &'a str, &'a str)>,
}

/// The webhook body of `app` for `events` at Unix time `time_ms` (`{"time_ms":…,"events":[…]}`,
/// channels by their Pusher names), keeping only the app's own channels; `None` when none is.
/// Sent with `X-Pusher-Key: KEY` and `X-Pusher-Signature:` [`webhook_signature`].
pub fn webhook_body(app: &App, events: &[WebhookEvent<'_>], time_ms: u64) -> Option<Bytes> {
    let mut items = Vec::new();
    for e in events {
        if app_of(e.channel) != Some(app.id.as_str()) {
            continue;
        }
        let Some(channel) = pusher_channel(e.channel) else {
            continue;
        };
        let mut item = format!(
            "{{\"name\":{},\"channel\":{}",
            json_string(e.name),
            json_string(&channel)
        );
        if let Some((event, data, socket_id)) = e.client {
            let _ = write!(
                item,
                ",\"event\":{},\"data\":{},\"socket_id\":{}",
                json_string(event),
                json_string(data),
                json_string(socket_id)
            );
        }
        if let Some(u) = e.user_id {
            let _ = write!(item, ",\"user_id\":{}", json_string(u));
        }
        item.push('}');
        items.push(item);
    }
    (!items.is_empty()).then(|| {
        Bytes::from(format!(
            "{{\"time_ms\":{time_ms},\"events\":[{}]}}",
            items.join(",")
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    fn app() -> App {
        App::new("app1", "key1", "secret-secret")
    }

    #[test]
    fn channel_names_map_both_ways_and_stay_apart_per_app() {
        let c = relay_channel("app1", "private-room.1").unwrap();
        assert_eq!(c.as_str(), "pusher/app1/private-room.1");
        assert_eq!(pusher_channel(c.as_str()).unwrap(), "private-room.1");
        assert_eq!(app_of(c.as_str()), Some("app1"));
        assert_ne!(relay_channel("app2", "private-room.1").unwrap(), c);
        let u = relay_channel("app1", "#server-to-user-42").unwrap();
        assert_eq!(u.as_str(), "pusher/app1/~user-42");
        assert_eq!(pusher_channel(u.as_str()).unwrap(), "#server-to-user-42");
        assert!(relay_channel("app1", "a,b").is_none(), "relay has no ','");
        assert!(relay_channel("app1", "").is_none());
        assert!(relay_channel("app1", &"a".repeat(165)).is_none());
        assert!(
            relay_channel("app1", "~user-1").is_none(),
            "no way into user channels"
        );
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::Encrypted
        );
        assert_eq!(ChannelKind::of("presence-x"), ChannelKind::Presence);
        assert_eq!(ChannelKind::of("x"), ChannelKind::Public);
    }

    #[test]
    fn webhook_bodies_hold_the_apps_own_channels_by_their_pusher_names() {
        let a = app();
        let events = [
            WebhookEvent {
                name: "channel_occupied",
                channel: "pusher/app1/news",
                user_id: None,
                client: None,
            },
            WebhookEvent {
                name: "member_added",
                channel: "pusher/app2/presence-x",
                user_id: Some("u"),
                client: None,
            },
            WebhookEvent {
                name: "client_event",
                channel: "pusher/app1/presence-x",
                user_id: Some("u"),
                client: Some(("client-a", r#"{"b":1}"#, "1.2")),
            },
        ];
        let body = webhook_body(&a, &events, 5).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"time_ms":5,"events":[
                {"name":"channel_occupied","channel":"news"},
                {"name":"client_event","channel":"presence-x","event":"client-a",
                 "data":"{\"b\":1}","socket_id":"1.2","user_id":"u"}]})
        );
        assert_eq!(webhook_signature(&a, &body), sign("secret-secret", &body));
        assert!(webhook_body(&a, &events[1..2], 5).is_none());
    }

    #[test]
    fn socket_ids_round_trip() {
        for tag in [1u64, 0xdead_beef_0000_0001, u64::MAX] {
            assert_eq!(parse_socket_id(&socket_id(tag)), Some(tag));
        }
        assert_eq!(parse_socket_id("1.2.3"), None);
        assert_eq!(parse_socket_id("a.1"), None);
        assert_eq!(parse_socket_id("99999999999.1"), None);
    }

    #[test]
    fn apps_parse_with_options_and_hide_their_secret() {
        let a =
            parse_app("app1:key1:secret-secret:client_events=true:max_event_bytes=20KiB").unwrap();
        assert!(a.client_events);
        assert_eq!(a.max_event_bytes, 20 * 1024);
        let shown = serde_json::to_string(&a).unwrap();
        assert!(!shown.contains("secret-secret"), "{shown}");
        assert!(parse_app("app1:key1").is_err());
        assert!(parse_app("app 1:key1:secret-secret").is_err());
        assert!(parse_app("app1:key1:short").is_err());
        assert!(parse_app("app1:key1:secret-secret:nope=1").is_err());
    }

    #[test]
    fn a_pusher_event_round_trips_through_a_relay_payload() {
        let data = json_string("{\"hello\":1}");
        let p = payload("my-event", &data, Some("1.2"), None);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["event"], "my-event");
        assert_eq!(v["data"], "{\"hello\":1}");
        let c = relay_channel("app1", "ch").unwrap();
        let pubn = Publication::new(1, Instant::now(), DataKind::Json, p);
        assert_eq!(origin(&pubn), parse_socket_id("1.2").unwrap());
        let f = message(&c, &pubn);
        let text = std::str::from_utf8(&f[2..]).unwrap();
        assert_eq!(
            text,
            r#"{"event":"my-event","channel":"ch","data":"{\"hello\":1}"}"#
        );
        // A relay payload that names no event.
        let plain = Publication::new(2, Instant::now(), DataKind::Json, Bytes::from("{\"a\":1}"));
        assert_eq!(origin(&plain), 0);
        let f = message(&c, &plain);
        assert_eq!(
            std::str::from_utf8(&f[2..]).unwrap(),
            r#"{"event":"message","channel":"ch","data":{"a":1}}"#
        );
    }

    #[test]
    fn client_messages_parse() {
        let m =
            parse(br#"{"event":"pusher:subscribe","data":{"auth":"k:s","channel":"private-a"}}"#)
                .unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                channel: "private-a".into(),
                auth: Some("k:s".into()),
                channel_data: None
            }
        );
        let m = parse(br#"{"event":"client-x","channel":"private-a","data":{"b":2}}"#).unwrap();
        assert!(matches!(
            m,
            ClientMessage::Client {
                data: r#"{"b":2}"#,
                ..
            }
        ));
        assert_eq!(
            parse(br#"{"event":"pusher:ping","data":{}}"#),
            Ok(ClientMessage::Ping)
        );
        assert!(parse(b"nope").is_err());
        assert!(parse(br#"{"event":"other"}"#).is_err());
        assert_eq!(
            presence_member(r#"{"user_id":7,"user_info":{"n":"x"}}"#),
            Some(("7".into(), Some(r#"{"n":"x"}"#.into())))
        );
        assert_eq!(presence_member(r#"{"user_id":{}}"#), None);
    }

    #[test]
    fn signatures_match_pushers_reference_values() {
        // From Pusher's authentication docs: key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8, socket 1234.1234, channel private-foobar.
        let a = App::new("1", "278d425bdf160c739803", "7ad3773142a6692b25b8");
        let auth =
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert!(channel_auth_ok(
            &a,
            "1234.1234",
            "private-foobar",
            None,
            auth
        ));
        assert!(!channel_auth_ok(
            &a,
            "1234.1235",
            "private-foobar",
            None,
            auth
        ));
        let a = app();
        let q = |ts: u64, body: &[u8]| {
            let mut q = vec![
                ("auth_key".to_owned(), "key1".to_owned()),
                ("auth_timestamp".to_owned(), ts.to_string()),
                ("auth_version".to_owned(), "1.0".to_owned()),
                ("body_md5".to_owned(), md5_hex(body)),
            ];
            let s = q
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&");
            let sig = sign(
                &a.secret,
                format!("POST\n/apps/app1/events\n{s}").as_bytes(),
            );
            q.push(("auth_signature".to_owned(), sig));
            q
        };
        let body = br#"{"name":"e","data":"x","channels":["c"]}"#;
        assert_eq!(
            check_api_request(&a, "POST", "/apps/app1/events", &q(1000, body), body, 1000),
            Ok(())
        );
        assert!(matches!(
            check_api_request(&a, "POST", "/apps/app1/events", &q(1000, body), body, 2000),
            Err(ApiAuthError::Expired { .. })
        ));
        assert_eq!(
            check_api_request(&a, "POST", "/apps/app1/events", &q(1000, body), b"{}", 1000),
            Err(ApiAuthError::BodyMd5)
        );
        assert!(matches!(
            check_api_request(&a, "POST", "/apps/app2/events", &q(1000, body), body, 1000),
            Err(ApiAuthError::Signature { .. })
        ));
    }
}
