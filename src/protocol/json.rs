//! The JSON protocol (`relay.v1.json`): client commands in, server events out. Sans-IO.
//!
//! Parsing borrows from the frame: the `data` of a publish and the `id` of a command are raw JSON
//! slices of the input, forwarded without re-encoding.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::ws;
use crate::types::{ChannelName, Epoch, StreamPosition};

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
}

/// A parsed client command.
#[derive(Debug)]
pub enum Command<'a> {
    /// Subscribe, resuming from a position when given.
    Subscribe {
        /// The channel.
        channel: ChannelName,
        /// Where the client left off (`since` + `epoch`).
        resume: Option<StreamPosition>,
    },
    /// Unsubscribe.
    Unsubscribe {
        /// The channel.
        channel: ChannelName,
    },
    /// Publish `data` (raw JSON) to a channel.
    Publish {
        /// The channel.
        channel: ChannelName,
        /// The JSON value as sent.
        data: &'a str,
    },
    /// Heartbeat (keeps presence alive; answered with a heartbeat).
    Heartbeat,
}

/// A command and its optional id.
#[derive(Debug)]
pub struct Request<'a> {
    /// The client's `id`, echoed in the reply (raw JSON).
    pub id: Option<&'a str>,
    /// The command.
    pub command: Command<'a>,
}

/// A command that could not be parsed; answered with an `error` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError<'a> {
    /// The `id`, when it could be read.
    pub id: Option<&'a str>,
    /// Machine-readable code (`bad_json`, `unknown_type`, `bad_request`, `invalid_channel`).
    pub code: &'static str,
    /// Human text.
    pub message: Cow<'static, str>,
}

/// Parses one client command.
pub fn parse_command(input: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    let raw: RawCommand<'_> = serde_json::from_slice(input).map_err(|e| CommandError {
        id: None,
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
        Raw::Present(v) => Some(v.get()),
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
            resume: raw.since.map(|seq| StreamPosition {
                // A missing or malformed epoch matches no channel: recovered:false.
                epoch: raw
                    .epoch
                    .as_deref()
                    .and_then(Epoch::parse)
                    .unwrap_or(Epoch(0)),
                seq,
            }),
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
                data: data.get(),
            }
        }
        Some("heartbeat") => Command::Heartbeat,
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
fn event(ty: &str, id: Option<&str>, cap: usize, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = ws::begin_frame(cap + 48);
    buf.put_slice(b"{\"type\":\"");
    buf.put_slice(ty.as_bytes());
    buf.put_u8(b'"');
    if let Some(id) = id {
        buf.put_slice(b",\"id\":");
        buf.put_slice(id.as_bytes());
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
pub fn message(channel: &ChannelName, seq: u64, data: &[u8]) -> Bytes {
    event(
        "message",
        None,
        channel.as_str().len() + data.len() + 32,
        |b| {
            put_str_field(b, "channel", channel.as_str());
            let _ = write!(b, ",\"seq\":{seq},\"data\":");
            b.put_slice(data);
        },
    )
}

/// `subscribed` frame.
pub fn subscribed(
    id: Option<&str>,
    channel: &ChannelName,
    pos: StreamPosition,
    recovered: bool,
) -> Bytes {
    event("subscribed", id, channel.as_str().len() + 64, |b| {
        put_str_field(b, "channel", channel.as_str());
        put_str_field(b, "epoch", &pos.epoch.to_string());
        let _ = write!(b, ",\"seq\":{},\"recovered\":{recovered}", pos.seq);
    })
}

/// `published` frame.
pub fn published(id: Option<&str>, channel: &ChannelName, pos: StreamPosition) -> Bytes {
    event("published", id, channel.as_str().len() + 64, |b| {
        put_str_field(b, "channel", channel.as_str());
        put_str_field(b, "epoch", &pos.epoch.to_string());
        let _ = write!(b, ",\"seq\":{}", pos.seq);
    })
}

/// `unsubscribed` frame.
pub fn unsubscribed(id: Option<&str>, channel: &ChannelName) -> Bytes {
    event("unsubscribed", id, channel.as_str().len() + 16, |b| {
        put_str_field(b, "channel", channel.as_str())
    })
}

/// `heartbeat` frame.
pub fn heartbeat(id: Option<&str>) -> Bytes {
    event("heartbeat", id, 0, |_| {})
}

/// `error` frame.
pub fn error(id: Option<&str>, code: &str, message: &str) -> Bytes {
    event("error", id, message.len() + 48, |b| {
        put_str_field(b, "code", code);
        b.put_slice(b",\"message\":");
        b.put_slice(json_string(message).as_bytes());
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
        assert_eq!(r.id, Some("7"));
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
        assert_eq!(data, r#"{"x": [1, "y"]}"#);
        assert_eq!(r.id, Some("\"q\""));
        let r = parse_command(br#"{"type":"publish","channel":"a","data":null}"#).unwrap();
        assert!(matches!(r.command, Command::Publish { data: "null", .. }));
        assert!(matches!(
            parse_command(br#"{"type":"heartbeat"}"#).unwrap().command,
            Command::Heartbeat
        ));
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
        assert_eq!(code(b"[1,2]"), "bad_request");
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
        let e = parse_command(br#"{"type":"subscribe","id":9}"#).unwrap_err();
        assert_eq!(e.id, Some("9"));
    }

    #[test]
    fn events_are_valid_json() {
        let ch = ChannelName::new("room:1").unwrap();
        let pos = StreamPosition {
            epoch: Epoch(0xab),
            seq: 3,
        };
        let frames = [
            message(&ch, 42, br#"{"t":"hi"}"#),
            subscribed(Some("1"), &ch, pos, true),
            published(Some("\"x\""), &ch, pos),
            unsubscribed(None, &ch),
            heartbeat(None),
            error(Some("2"), "bad_json", "quote \" and \n newline"),
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
        assert_eq!(parsed[5]["message"], "quote \" and \n newline");
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
