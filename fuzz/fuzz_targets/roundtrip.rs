//! Encode → decode returns what went in: a frame of every type built from the fuzzer's bytes
//! goes through the binary encoder and decoder unchanged; a published payload reaches binary
//! subscribers byte for byte and JSON subscribers in the documented form (the JSON value, or
//! base64 with `"encoding":"base64"`).
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use relay::protocol::binary::{self, Body, Frame, Member, Members, PresenceClaim};
use relay::protocol::json;
use relay::types::{is_channel_byte, ChannelName, DataKind, Epoch, StreamPosition};
use serde_json::value::RawValue;

/// A valid channel name: 1 to 200 bytes of the allowed set.
fn channel(u: &mut Unstructured<'_>, buf: &mut String) -> Result<()> {
    let allowed: Vec<u8> = (0..=255u8).filter(|&b| is_channel_byte(b)).collect();
    let len = u.int_in_range(1..=200)?;
    for _ in 0..len {
        buf.push(char::from(*u.choose(&allowed)?));
    }
    Ok(())
}

fn position(u: &mut Unstructured<'_>) -> Result<StreamPosition> {
    Ok(StreamPosition {
        epoch: Epoch(u.arbitrary()?),
        seq: u.arbitrary()?,
    })
}

/// A text that decodes as present: `None` or non-empty.
fn opt_text<'a>(u: &mut Unstructured<'a>) -> Result<Option<&'a str>> {
    let s: &str = u.arbitrary()?;
    Ok((!s.is_empty()).then_some(s))
}

/// A page cursor that decodes: at most `MAX_CURSOR_LEN` bytes.
fn cursor<'a>(u: &mut Unstructured<'a>) -> Result<&'a str> {
    let s: &str = u.arbitrary()?;
    let mut end = s.len().min(binary::MAX_CURSOR_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(&s[..end])
}

fn member<'a>(u: &mut Unstructured<'a>) -> Result<Member<'a>> {
    Ok(Member {
        client: u.arbitrary()?,
        user: u.arbitrary()?,
        info: opt_text(u)?,
    })
}

fn check_frame(u: &mut Unstructured<'_>) -> Result<()> {
    let mut ch = String::new();
    channel(u, &mut ch)?;
    let ch = ch.as_str();
    let id: Option<u64> = u.arbitrary()?;
    let mut members = Vec::new();
    let body = match u.int_in_range(0..=13u8)? {
        0 => Body::Subscribe {
            channel: ch,
            resume: if u.arbitrary()? {
                Some(position(u)?)
            } else {
                None
            },
            presence: if u.arbitrary()? {
                let user = opt_text(u)?.filter(|s| s.len() <= 256);
                let info = opt_text(u)?.filter(|s| s.len() <= 4096);
                Some(PresenceClaim { user, info })
            } else {
                None
            },
        },
        1 => Body::Unsubscribe { channel: ch },
        2 => Body::Publish {
            channel: ch,
            idempotency_key: opt_text(u)?.filter(|s| s.len() <= 128),
            expected_seq: u.arbitrary()?,
            payload: u.arbitrary()?,
        },
        3 => Body::Heartbeat,
        4 => Body::Presence {
            channel: ch,
            page: if u.arbitrary()? {
                Some((u.arbitrary()?, cursor(u)?))
            } else {
                None
            },
        },
        5 => Body::Subscribed {
            channel: ch,
            position: position(u)?,
            recovered: u.arbitrary()?,
        },
        6 => Body::Unsubscribed { channel: ch },
        7 => Body::Published {
            channel: ch,
            position: position(u)?,
        },
        8 => Body::HeartbeatReply,
        9 => Body::Message {
            channel: ch,
            seq: u.arbitrary()?,
            json: u.arbitrary()?,
            payload: u.arbitrary()?,
        },
        10 => {
            let code: &str = u.arbitrary()?;
            let mut end = code.len().min(255);
            while !code.is_char_boundary(end) {
                end -= 1;
            }
            Body::Error {
                code: &code[..end],
                message: u.arbitrary()?,
            }
        }
        11 => {
            let n = u.int_in_range(0..=20u8)?;
            let mut count = 0u64;
            for _ in 0..n {
                let m = member(u)?;
                let mut one = Vec::new();
                binary::encode(
                    &Frame {
                        id: None,
                        body: Body::PresenceEvent {
                            channel: "x",
                            seq: 0,
                            join: false,
                            member: m,
                        },
                    },
                    &mut one,
                );
                // The member is what follows the header (3), channel (2) and seq (1).
                members.extend_from_slice(&one[6..]);
                count += 1;
            }
            Body::PresenceState {
                channel: ch,
                seq: u.arbitrary()?,
                members: Members {
                    count,
                    bytes: &members,
                },
                next: if u.arbitrary()? {
                    Some(cursor(u)?)
                } else {
                    None
                },
            }
        }
        12 => Body::PresenceEvent {
            channel: ch,
            seq: u.arbitrary()?,
            join: u.arbitrary()?,
            member: member(u)?,
        },
        _ => Body::Gap {
            channel: ch,
            from: u.arbitrary()?,
            to: u.arbitrary()?,
        },
    };
    // Types without an id never carry one.
    let has_id = !matches!(
        body,
        Body::Message { .. } | Body::PresenceEvent { .. } | Body::Gap { .. }
    );
    let frame = Frame {
        id: id.filter(|_| has_id),
        body,
    };
    let mut out = Vec::new();
    binary::encode(&frame, &mut out);
    assert_eq!(out.len(), binary::encoded_len(&frame));
    assert_eq!(binary::decode(&out), Ok(frame));
    Ok(())
}

/// The fields of a JSON `message` that the check reads.
#[derive(serde::Deserialize)]
struct Msg<'a> {
    seq: u64,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow)]
    encoding: Option<&'a str>,
}

/// The WebSocket payload of a server frame.
fn ws_payload(frame: &[u8]) -> &[u8] {
    match frame[1] {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    }
}

fn check_payload(u: &mut Unstructured<'_>) -> Result<()> {
    let data: &[u8] = u.arbitrary()?;
    let seq: u64 = u.arbitrary()?;
    let Ok(ch) = ChannelName::new("room:1") else {
        return Ok(());
    };
    // Binary subscribers get the bytes as published.
    let f = binary::message(&ch, seq, DataKind::Binary, data);
    let Ok(Frame {
        body:
            Body::Message {
                seq: s,
                json: false,
                payload,
                ..
            },
        ..
    }) = binary::decode(ws_payload(&f))
    else {
        panic!("binary message does not decode");
    };
    assert_eq!((s, payload), (seq, data));
    // JSON subscribers get the JSON value as is, or base64 with "encoding":"base64".
    let f = json::message(&ch, seq, DataKind::Binary, data);
    let m: Msg<'_> = match serde_json::from_slice(ws_payload(&f)) {
        Ok(m) => m,
        Err(e) => panic!("JSON message is not JSON: {e}"),
    };
    assert_eq!(m.seq, seq);
    match m.encoding {
        Some(enc) => {
            assert_eq!(enc, "base64");
            let b64: &str = serde_json::from_str(m.data.get()).unwrap_or_default();
            let back = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default();
            assert_eq!(back, data);
        }
        None => {
            let trimmed = std::str::from_utf8(data)
                .unwrap_or_default()
                .trim_matches([' ', '\t']);
            assert_eq!(m.data.get(), trimmed);
        }
    }
    Ok(())
}

fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    let _ = if u.arbitrary::<bool>().unwrap_or(false) {
        check_payload(&mut u)
    } else {
        check_frame(&mut u)
    };
});
