//! The binary frame decoder on arbitrary bytes: never panics, and whatever decodes re-encodes to
//! exactly the same bytes (every frame has one encoding).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::protocol::binary::{decode, decode_command, encode, encoded_len};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        let mut out = Vec::with_capacity(data.len());
        encode(&frame, &mut out);
        assert_eq!(out, data, "re-encoding {frame:?}");
        assert_eq!(encoded_len(&frame), data.len());
    }
    if let Err(e) = decode_command(data) {
        assert!(!e.code.is_empty());
    }
});
