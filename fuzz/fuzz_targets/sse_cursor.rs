//! The SSE resume cursor (`Last-Event-ID`) parser: never panics, respects its limit, and what it
//! accepts survives a write → parse round trip.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relay::protocol::sse::{parse_cursor, write_id};

fuzz_target!(|data: &[u8]| {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let max = usize::from(max);
    if let Ok(cursor) = parse_cursor(s, max) {
        assert!(cursor.len() <= max);
        let mut out = BytesMut::new();
        write_id(&cursor, &mut out);
        let line = std::str::from_utf8(&out).unwrap_or_default();
        let id = line
            .strip_prefix("id: ")
            .and_then(|l| l.strip_suffix('\n'))
            .unwrap_or_default();
        assert_eq!(parse_cursor(id, max), Ok(cursor), "{id:?}");
    }
});
