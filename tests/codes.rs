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

/// The `.rs` files under `dir`, in its subdirectories too (`session/`, `pusher/`).
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_transports_answer_only_with_catalogued_error_codes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    let mut seen = 0;
    let mut bad = Vec::new();
    for path in rust_files(&dir) {
        let text = std::fs::read_to_string(&path).unwrap();
        // An `Event::Error { code: … }`, an HTTP `error(status, code, …)`, the sessions'
        // `error(code, …)` / `err(code, …)` helpers and the session core's refusals.
        let mut codes = literals_after(&text, "code: ");
        for helper in [
            "Refusal::new(",
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
