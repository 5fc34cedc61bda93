//! The JSON command parser on arbitrary bytes: never panics; what it accepts has a valid channel,
//! and its raw `id` and `data` slices are themselves valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::protocol::json::{is_embeddable_json, normalize_data, parse_command};
use relay::protocol::{Command, Payload, ReqId};
use serde::de::IgnoredAny;

fn valid_json(s: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(s).is_ok()
}

fuzz_target!(|data: &[u8]| {
    match parse_command(data) {
        Ok(req) => {
            if let Some(ReqId::Json(raw)) = req.id {
                assert!(valid_json(raw), "id {raw:?}");
            }
            if let Command::Publish { channel, data, .. } = req.command {
                assert!(relay::types::ChannelName::new(channel.as_str()).is_ok());
                let Payload::Json(raw) = data else {
                    panic!("a JSON publish carries JSON")
                };
                assert!(valid_json(raw), "data {raw:?}");
                // What is stored and forwarded: still the same JSON, on one line.
                let stored = normalize_data(raw);
                assert!(!stored.contains(&b'\n') && !stored.contains(&b'\r'));
                assert!(is_embeddable_json(&stored));
            }
        }
        Err(e) => assert!(matches!(
            e.code,
            "bad_json" | "bad_request" | "unknown_type" | "invalid_channel"
        )),
    }
});
