//! The error codes the transports answer with are the catalogue's (`protocol::codes`), which
//! its own tests check against docs/protocol.md: a code written in a transport and nowhere
//! else fails here.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use relay::protocol::codes::ERROR_CODES;

/// The string literals in `text` that follow one of `before` (e.g. `code: "x"`).
fn literals_after<'a>(text: &'a str, before: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(before) {
        // `#[error("…")]` is a message, not a code.
        let attribute = rest[..i].ends_with('[');
        rest = rest[i + before.len()..].trim_start();
        if attribute {
            continue;
        }
        if let Some(lit) = rest.strip_prefix('"') {
            if let Some(end) = lit.find('"') {
                out.push(&lit[..end]);
            }
        }
    }
    out
}

#[test]
fn the_transports_answer_only_with_catalogued_error_codes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    let mut seen = 0;
    let mut bad = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // An `Event::Error { code: … }`, an HTTP `error(status, code, …)`, and the sessions'
        // `error(code, …)` / `err(code, …)` helpers.
        let mut codes = literals_after(&text, "code: ");
        for helper in [
            "error(",
            "err(",
            "StatusCode::BAD_REQUEST,",
            "StatusCode::FORBIDDEN,",
        ] {
            codes.extend(literals_after(&text, helper));
        }
        for c in codes {
            seen += 1;
            if !ERROR_CODES.contains(&c) {
                bad.push(format!("{}: `{c}`", path.display()));
            }
        }
    }
    assert!(
        seen > 20,
        "the scan found only {seen} codes: it no longer sees them"
    );
    assert!(
        bad.is_empty(),
        "not in protocol::codes::ERROR_CODES:\n{}",
        bad.join("\n")
    );
}
