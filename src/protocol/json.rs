//! The JSON protocol (`relay.v1.json`): client commands in, server events out. Sans-IO.
//!
//! Parsing borrows from the frame: the `data` of a publish and the `id` of a command are raw JSON
//! slices of the input, forwarded without re-encoding.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{ws, ClientPresence, Command, CommandError, Event, Payload, ReqId, Request};
use crate::types::{ChannelName, DataKind, Epoch, Identity, PresenceEvent, StreamPosition};

/// A field that distinguishes "absent" from "present, even if `null`".
#[derive(Default)]
enum Raw<'a> {
    #[default]
    Absent,
    Present(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(Raw::Present)
    }
}

#[derive(serde::Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Raw<'a>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Raw<'a>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    presence: Option<RawPresence<'a>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(borrow, default)]
    cursor: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(default)]
    expected_seq: Option<u64>,
}

#[derive(serde::Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default)]
    id: Raw<'a>,
}

#[derive(serde::Deserialize)]
struct RawPresence<'a> {
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    info: Option<&'a RawValue>,
}

/// Parses one client command.
pub fn parse_command(input: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    if input.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(CommandError {
            id: None,
            code: "bad_json",
            message: "a command is one JSON object".into(),
        });
    }
    let raw: RawCommand<'_> = serde_json::from_slice(input).map_err(|e| CommandError {
        // A field of the wrong type fails the whole command: still echo the id if it reads.
        id: serde_json::from_slice::<IdOnly<'_>>(input)
            .ok()
            .and_then(|r| match r.id {
                Raw::Present(v) => Some(ReqId::Json(v.get())),
                Raw::Absent => None,
            }),
        code: if e.is_data() {
            "bad_request"
        } else {
            "bad_json"
        },
        message: if e.is_data() {
            Cow::Owned(format!("a field has the wrong type: {e}"))
        } else {
            Cow::Owned(format!("not a JSON object: {e}"))
        },
    })?;
    let id = match raw.id {
        Raw::Present(v) => Some(ReqId::Json(v.get())),
        Raw::Absent => None,
    };
    let err = |code: &'static str, message: Cow<'static, str>| CommandError { id, code, message };
    let channel = || -> Result<ChannelName, CommandError<'_>> {
        let name = raw
            .channel
            .as_deref()
            .ok_or_else(|| err("bad_request", "missing field `channel`".into()))?;
        ChannelName::new(name).map_err(|e| err("invalid_channel", e.to_string().into()))
    };
    let command = match raw.ty.as_deref() {
        Some("subscribe") => Command::Subscribe {
            channel: channel()?,
            // A seq means nothing without its epoch (the channel may have started afresh since):
            // resuming takes both, so that a client that forgot one hears so at once instead
            // of a silent `recovered:false`.
            resume: match (raw.since, raw.epoch.as_deref()) {
                (None, None) => None,
                (Some(seq), Some(e)) => Some(StreamPosition {
                    epoch: Epoch::parse(e).ok_or_else(|| {
                        err(
                            "bad_request",
                            "`epoch` is not an epoch (the hex string of a `subscribed` or \
                             `published` reply)"
                                .into(),
                        )
                    })?,
                    seq,
                }),
                (Some(_), None) => {
                    return Err(err(
                        "bad_request",
                        "`since` needs the `epoch` it belongs to (from the `subscribed` or \
                         `published` reply); to read history from the start use \
                         GET /api/history/{channel}"
                            .into(),
                    ))
                }
                (None, Some(_)) => {
                    return Err(err(
                        "bad_request",
                        "`epoch` needs `since`, the last seq seen".into(),
                    ))
                }
            },
            presence: match raw.presence {
                None => None,
                Some(p) => Some(client_presence(p).map_err(|m| err("bad_request", m.into()))?),
            },
        },
        Some("presence") => Command::Presence {
            channel: channel()?,
            page: super::Page {
                limit: raw.limit,
                cursor: raw.cursor,
            },
        },
        Some("unsubscribe") => Command::Unsubscribe {
            channel: channel()?,
        },
        Some("publish") => {
            let channel = channel()?;
            let Raw::Present(data) = raw.data else {
                return Err(err("bad_request", "missing field `data`".into()));
            };
            Command::Publish {
                channel,
                data: Payload::Json(data.get()),
                cond: super::PublishIf {
                    idempotency_key: raw.idempotency_key,
                    expected_seq: raw.expected_seq,
                },
            }
        }
        Some("heartbeat") => Command::Heartbeat,
        Some(ty @ ("auth" | "refresh")) => {
            let Some(token) = raw.token else {
                return Err(err("bad_request", "missing field `token`".into()));
            };
            if ty == "auth" {
                Command::Auth { token }
            } else {
                Command::Refresh { token }
            }
        }
        Some(other) => {
            return Err(err(
                "unknown_type",
                format!("unknown command type {:?}", truncate(other, 64)).into(),
            ))
        }
        None => return Err(err("unknown_type", "missing field `type`".into())),
    };
    Ok(Request { id, command })
}

fn client_presence(p: RawPresence<'_>) -> Result<ClientPresence<'_>, &'static str> {
    let user = p.user;
    if user
        .as_ref()
        .is_some_and(|u| u.is_empty() || u.len() > super::MAX_USER_LEN)
    {
        return Err("presence.user must be 1 to 256 bytes");
    }
    let info = p.info.map(|v| v.get());
    if info.is_some_and(|i| !i.starts_with('{') || i.len() > super::MAX_INFO_LEN) {
        return Err("presence.info must be a JSON object of at most 4096 bytes");
    }
    Ok(ClientPresence { user, info })
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The payload as it is stored and forwarded: the raw JSON with line breaks (which can only be
/// insignificant whitespace between tokens, as strings escape them) turned into spaces, so the
/// same bytes are valid inside an SSE `data:` line.
pub fn normalize_data(raw: &str) -> Bytes {
    if !raw.bytes().any(|b| b == b'\n' || b == b'\r') {
        return Bytes::copy_from_slice(raw.as_bytes());
    }
    Bytes::from(
        raw.bytes()
            .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b })
            .collect::<Vec<u8>>(),
    )
}

/// Builds a text frame holding one JSON object written by `body` (which writes the members
/// after `{"type":"<ty>"`, each starting with a comma).
fn event(ty: &str, id: Option<ReqId<'_>>, cap: usize, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = ws::begin_frame(cap + 48);
    buf.put_slice(b"{\"type\":\"");
    buf.put_slice(ty.as_bytes());
    buf.put_u8(b'"');
    match id {
        Some(ReqId::Json(raw)) => {
            buf.put_slice(b",\"id\":");
            buf.put_slice(raw.as_bytes());
        }
        Some(ReqId::Num(n)) => {
            let _ = write!(buf, ",\"id\":{n}");
        }
        None => {}
    }
    body(&mut buf);
    buf.put_u8(b'}');
    ws::finish_frame(buf, ws::OP_TEXT)
}

fn put_str_field(buf: &mut BytesMut, key: &str, value: &str) {
    // Only for values that need no escaping (channel names, epochs, codes).
    let _ = write!(buf, ",\"{key}\":\"{value}\"");
}

/// `message` frame: the one every JSON subscriber of the channel receives, encoded once.
/// A binary payload is embedded as is when it is UTF-8 JSON without line breaks, else as
/// base64 with `"encoding":"base64"`.
pub fn message(channel: &ChannelName, seq: u64, kind: DataKind, data: &[u8]) -> Bytes {
    event(
        "message",
        None,
        channel.as_str().len() + data.len() * 4 / 3 + 64,
        |b| {
            put_str_field(b, "channel", channel.as_str());
            let _ = write!(b, ",\"seq\":{seq},\"data\":");
            put_data(b, kind, data);
        },
    )
}

/// Writes a payload as a JSON value, adding `,"encoding":"base64"` when it had to be encoded.
pub fn put_data(b: &mut BytesMut, kind: DataKind, data: &[u8]) {
    if kind == DataKind::Json || is_embeddable_json(data) {
        b.put_slice(data);
    } else {
        use base64::Engine as _;
        b.put_u8(b'"');
        let start = b.len();
        let n = base64::encoded_len(data.len(), true).unwrap_or(0);
        b.resize(start + n, 0);
        let _ = base64::engine::general_purpose::STANDARD.encode_slice(data, &mut b[start..]);
        b.put_slice(b"\",\"encoding\":\"base64\"");
    }
}

/// Whether binary `data` can be forwarded to JSON clients as is: valid JSON with no raw line
/// break (so it also fits an SSE line). UTF-8 is checked first: `from_slice` skips over the
/// bytes of a string it ignores without validating them.
pub fn is_embeddable_json(data: &[u8]) -> bool {
    !data.iter().any(|&b| b == b'\n' || b == b'\r')
        && std::str::from_utf8(data)
            .is_ok_and(|s| serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok())
}

/// A complete frame carrying `event`.
pub fn encode_event(id: Option<ReqId<'_>>, ev: &Event<'_>) -> Bytes {
    match *ev {
        Event::Subscribed {
            channel,
            position,
            recovered,
            reason,
        } => event("subscribed", id, channel.as_str().len() + 96, |b| {
            put_str_field(b, "channel", channel.as_str());
            put_str_field(b, "epoch", &position.epoch.to_string());
            let _ = write!(b, ",\"seq\":{},\"recovered\":{recovered}", position.seq);
            if let Some(reason) = reason {
                put_str_field(b, "reason", reason);
            }
        }),
        Event::Published { channel, position } => {
            event("published", id, channel.as_str().len() + 64, |b| {
                put_str_field(b, "channel", channel.as_str());
                put_str_field(b, "epoch", &position.epoch.to_string());
                let _ = write!(b, ",\"seq\":{}", position.seq);
            })
        }
        Event::Unsubscribed { channel } => {
            event("unsubscribed", id, channel.as_str().len() + 16, |b| {
                put_str_field(b, "channel", channel.as_str())
            })
        }
        Event::Heartbeat => event("heartbeat", id, 0, |_| {}),
        Event::PresenceState {
            channel,
            seq,
            members,
            next,
        } => event(
            "presence_state",
            id,
            channel.as_str().len() + 64 * members.len() + 64,
            |b| {
                put_str_field(b, "channel", channel.as_str());
                let _ = write!(b, ",\"seq\":{seq},\"members\":[");
                for (i, m) in members.iter().enumerate() {
                    if i > 0 {
                        b.put_u8(b',');
                    }
                    b.put_u8(b'{');
                    put_identity(b, m);
                    b.put_u8(b'}');
                }
                b.put_u8(b']');
                if let Some(next) = next {
                    b.put_slice(b",\"next\":");
                    b.put_slice(json_string(next).as_bytes());
                }
            },
        ),
        Event::Error { code, message } => event("error", id, message.len() + 48, |b| {
            put_str_field(b, "code", code);
            b.put_slice(b",\"message\":");
            b.put_slice(json_string(message).as_bytes());
        }),
    }
}

/// Reply to `auth`: `{"type":"authenticated","id":…,"user":…,"exp":…}`.
pub fn authenticated(id: Option<ReqId<'_>>, user: &str, exp: u64) -> Bytes {
    event("authenticated", id, user.len() + 48, |b| {
        b.put_slice(b",\"user\":");
        b.put_slice(json_string(user).as_bytes());
        let _ = write!(b, ",\"exp\":{exp}");
    })
}

/// Reply to `refresh`: `{"type":"refreshed","id":…,"exp":…}`.
pub fn refreshed(id: Option<ReqId<'_>>, exp: u64) -> Bytes {
    event("refreshed", id, 32, |b| {
        let _ = write!(b, ",\"exp\":{exp}");
    })
}

/// Pushed when the connection's token expires: `{"type":"token_expired","deadline_ms":…}`;
/// the client must `refresh` within `deadline_ms` or be closed with 4003.
pub fn token_expired(deadline_ms: u128) -> Bytes {
    event("token_expired", None, 32, |b| {
        let _ = write!(b, ",\"deadline_ms\":{deadline_ms}");
    })
}

/// Writes `"client":…,"user":…[,"info":…]` (no leading comma).
pub fn put_identity(b: &mut BytesMut, who: &Identity) {
    let _ = write!(b, "\"client\":\"{}\",\"user\":", who.client);
    b.put_slice(json_string(&who.user).as_bytes());
    if let Some(info) = &who.info {
        b.put_slice(b",\"info\":");
        b.put_slice(info);
    }
}

/// The `presence` event frame (join or leave), encoded once per event.
pub fn presence(channel: &ChannelName, e: &PresenceEvent) -> Bytes {
    event("presence", None, channel.as_str().len() + 128, |b| {
        put_str_field(b, "channel", channel.as_str());
        let _ = write!(b, ",\"seq\":{},\"event\":\"{}\",", e.seq, e.kind());
        put_identity(b, &e.who);
    })
}

/// The `gap` frame: this subscriber missed messages `from..=to` of the channel (slow consumer
/// under the `drop` policy); they can be fetched from history.
pub fn gap(channel: &ChannelName, from: u64, to: u64) -> Bytes {
    event("gap", None, channel.as_str().len() + 48, |b| {
        put_str_field(b, "channel", channel.as_str());
        let _ = write!(b, ",\"from\":{from},\"to\":{to}");
    })
}

/// `s` as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payload(frame: &Bytes) -> &str {
        let skip = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[skip..]).unwrap()
    }

    #[test]
    fn parses_every_command() {
        let r = parse_command(br#"{"type":"subscribe","channel":"a","id":7}"#).unwrap();
        assert_eq!(r.id, Some(ReqId::Json("7")));
        assert!(matches!(r.command, Command::Subscribe { resume: None, .. }));
        let r = parse_command(br#"{"type":"subscribe","channel":"a","since":41,"epoch":"ff"}"#)
            .unwrap();
        let Command::Subscribe {
            resume: Some(p), ..
        } = r.command
        else {
            panic!()
        };
        assert_eq!((p.epoch, p.seq), (Epoch(255), 41));
        let r =
            parse_command(br#"{"type":"publish","channel":"a","data":{"x": [1, "y"]},"id":"q"}"#)
                .unwrap();
        let Command::Publish { data, .. } = r.command else {
            panic!()
        };
        assert_eq!(data, Payload::Json(r#"{"x": [1, "y"]}"#));
        assert_eq!(r.id, Some(ReqId::Json("\"q\"")));
        let r = parse_command(br#"{"type":"publish","channel":"a","data":null}"#).unwrap();
        assert!(matches!(
            r.command,
            Command::Publish {
                data: Payload::Json("null"),
                ..
            }
        ));
        assert!(matches!(
            parse_command(br#"{"type":"heartbeat"}"#).unwrap().command,
            Command::Heartbeat
        ));
        let r =
            parse_command(br#"{"type":"presence","channel":"p","limit":5,"cursor":"c9"}"#).unwrap();
        let Command::Presence { page, .. } = r.command else {
            panic!()
        };
        assert_eq!((page.limit, page.cursor.as_deref()), (Some(5), Some("c9")));
        assert!(matches!(
            parse_command(br#"{"type":"unsubscribe","channel":"a","extra":1}"#)
                .unwrap()
                .command,
            Command::Unsubscribe { .. }
        ));
    }

    #[test]
    fn errors_have_codes_and_keep_the_id() {
        let code = |s: &[u8]| parse_command(s).unwrap_err().code;
        assert_eq!(code(b"{nope"), "bad_json");
        assert_eq!(code(b"[1,2]"), "bad_json");
        assert_eq!(code(b" \"x\""), "bad_json");
        assert_eq!(code(br#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(br#"{"channel":"a"}"#), "unknown_type");
        assert_eq!(code(br#"{"type":"subscribe"}"#), "bad_request");
        assert_eq!(code(br#"{"type":"publish","channel":"a"}"#), "bad_request");
        assert_eq!(
            code(br#"{"type":"subscribe","channel":"a b"}"#),
            "invalid_channel"
        );
        assert_eq!(
            code(br#"{"type":"subscribe","channel":"a","since":-1}"#),
            "bad_request"
        );
        // Resuming takes both halves of a position.
        for half in [
            r#""since":4"#,
            r#""epoch":"ab""#,
            r#""since":4,"epoch":"zz""#,
        ] {
            let cmd = format!(r#"{{"type":"subscribe","channel":"a","id":3,{half}}}"#);
            let e = parse_command(cmd.as_bytes()).unwrap_err();
            assert_eq!(
                (e.code, e.id),
                ("bad_request", Some(ReqId::Json("3"))),
                "{half}"
            );
        }
        let e = parse_command(br#"{"type":"subscribe","channel":5,"id":"q"}"#).unwrap_err();
        assert_eq!((e.code, e.id), ("bad_request", Some(ReqId::Json("\"q\""))));
        let e = parse_command(br#"{"type":"subscribe","id":9}"#).unwrap_err();
        assert_eq!(e.id, Some(ReqId::Json("9")));
    }

    #[test]
    fn events_are_valid_json() {
        let ch = ChannelName::new("room:1").unwrap();
        let pos = StreamPosition {
            epoch: Epoch(0xab),
            seq: 3,
        };
        let frames = [
            message(&ch, 42, DataKind::Json, br#"{"t":"hi"}"#),
            encode_event(
                Some(ReqId::Json("1")),
                &Event::Subscribed {
                    channel: &ch,
                    position: pos,
                    recovered: true,
                    reason: None,
                },
            ),
            encode_event(
                Some(ReqId::Json("\"x\"")),
                &Event::Published {
                    channel: &ch,
                    position: pos,
                },
            ),
            encode_event(None, &Event::Unsubscribed { channel: &ch }),
            encode_event(Some(ReqId::Num(5)), &Event::Heartbeat),
            encode_event(
                Some(ReqId::Json("2")),
                &Event::Error {
                    code: "bad_json",
                    message: "quote \" and \n newline",
                },
            ),
            message(&ch, 43, DataKind::Binary, &[0xff, 0x00]),
            message(&ch, 44, DataKind::Binary, b"[1,2]"),
            encode_event(
                None,
                &Event::Subscribed {
                    channel: &ch,
                    position: pos,
                    recovered: false,
                    reason: Some("evicted"),
                },
            ),
            encode_event(
                None,
                &Event::PresenceState {
                    channel: &ch,
                    seq: 3,
                    members: &[],
                    next: Some("c\"1"),
                },
            ),
        ];
        let parsed: Vec<serde_json::Value> = frames
            .iter()
            .map(|f| serde_json::from_str(payload(f)).unwrap())
            .collect();
        assert_eq!(
            parsed[0],
            serde_json::json!({"type":"message","channel":"room:1","seq":42,"data":{"t":"hi"}})
        );
        assert_eq!(
            parsed[1],
            serde_json::json!({"type":"subscribed","id":1,"channel":"room:1","epoch":"ab","seq":3,"recovered":true})
        );
        assert_eq!(parsed[2]["id"], "x");
        assert_eq!(parsed[4]["id"], 5);
        assert_eq!(parsed[5]["message"], "quote \" and \n newline");
        assert_eq!(parsed[6]["data"], "/wA=");
        assert_eq!(parsed[6]["encoding"], "base64");
        assert_eq!(parsed[7]["data"], serde_json::json!([1, 2]));
        assert!(parsed[7].get("encoding").is_none());
        assert_eq!(parsed[8]["recovered"], false);
        assert_eq!(parsed[8]["reason"], "evicted");
        assert_eq!(
            parsed[9],
            serde_json::json!({"type":"presence_state","channel":"room:1","seq":3,"members":[],"next":"c\"1"})
        );
    }

    #[test]
    fn normalize_keeps_json_valid_and_line_free() {
        let raw = "{\n  \"a\": \"x\\ny\"\r\n}";
        let n = normalize_data(raw);
        assert!(!n.contains(&b'\n') && !n.contains(&b'\r'));
        let v: serde_json::Value = serde_json::from_slice(&n).unwrap();
        assert_eq!(v["a"], "x\ny");
    }
}
