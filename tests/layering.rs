//! The layering of `src/`, checked from the source text like rust-analyzer's tidy tests: each
//! top-level module names only the modules below it (docs/ARCHITECTURE.md, "Dependency rules").
//! A new module, or a new edge, is a decision: add it to `ALLOWED` with a reason, or move the
//! code.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which crate modules each top-level module may name (`crate::x`). `main.rs` and `lib.rs`
/// wire everything and are not listed.
const ALLOWED: &[(&str, &[&str])] = &[
    // The leaf: values every layer shares.
    ("types", &[]),
    // Wire formats: never the engine, so the engine knows no wire format.
    ("protocol", &["types"]),
    // Sequencing, history, fan-out: never a wire format, a transport or a backplane.
    ("engine", &["types"]),
    // The replica layer drives the engine (`ingest`, `reset`); nothing above.
    ("backplane", &["types", "engine"]),
    // Plain data: parsed and checked, never a file read, a verifier built or a lower module's
    // grammar parsed. A Pusher app is a leaf type (`types::pusher_app`). The settings written
    // in a module's own grammar (`--redis-url`, `--webhook-url`, `--pusher-webhook`) are kept
    // as strings and parsed by the composition root (`server::prepare`).
    ("config", &["types"]),
    // The webhook dispatcher (and the outbound HTTP client): the engine's observer; never the
    // config (the composition root turns settings into `webhooks::Settings`).
    ("webhooks", &["types", "engine", "backplane"]),
    // Keys fetched from a JWKS URL, with the HTTP client of `webhooks`.
    ("jwks", &["types", "webhooks"]),
    ("auth", &["types", "config", "jwks"]),
    ("proxy", &["types"]),
    // The backend proxy: POSTs decisions to the application with the HTTP client of
    // `webhooks`; the transports act on its answers (`transport::proxied`). Its close code is
    // in the catalogue (`protocol::codes`).
    (
        "backend",
        &["types", "protocol", "config", "webhooks", "limits"],
    ),
    ("limits", &["types"]),
    ("tls", &["types", "config"]),
    ("metrics", &["types"]),
    ("tools", &["types", "config", "auth"]),
    ("transport", BELOW_TRANSPORT),
    // The composition root: any module (`*`).
    ("server", &["*"]),
];

/// What the transports may name: every layer below them.
const BELOW_TRANSPORT: &[&str] = &[
    "types",
    "protocol",
    "engine",
    "backplane",
    "config",
    "auth",
    "limits",
    "proxy",
    "tls",
    "metrics",
    "webhooks",
    "backend",
];

/// The transports proper: each depends on the shared parts of `transport` (`mod.rs`, `http`,
/// `io`, `request`, `session`, `paging`, `users`), never on another one. `server_api` is the API's
/// server-command half (`/api/users/*`, `/api/batch`; it and `api` name each other); `admin`
/// is a UI built over the others (the API's handlers, the SSE stream of its live tail, the
/// landing page's fixed responses).
/// A directory (`pusher/`) is one transport: its files name each other through `super::`.
const TRANSPORTS: &[&str] = &["ws", "sse", "api", "pusher", "demo", "landing"];

/// What `src/protocol` and `src/engine` never mention: sockets, HTTP, backplane clients.
const IO_NAMES: &[&str] = &["tokio::net", "hyper", "fred", "async_nats", "redis::"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments (line comments and doc comments; the code base has no block
/// comments), so that prose may name any module.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // `//` inside a string (a URL) is kept: only `//` after whitespace or at the start
            // of the line opens a comment here.
            Some(i) if i == 0 || l[..i].ends_with(char::is_whitespace) => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segments after each `prefix` (`crate::` or `super::`), with `prefix{a, b::c}`
/// groups expanded.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        // Not the tail of a longer path (`foo_crate::`).
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.extend(first_segment(&item));
        } else {
            out.extend(first_segment(rest));
        }
    }
    out
}

fn first_segment(s: &str) -> Option<String> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0 && s[..end] != *"self").then(|| s[..end].to_owned())
}

/// The top-level module of a file under `src/` (`engine` for `src/engine/hub.rs`).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// For each file: its module, and the modules it names.
fn edges() -> Vec<(PathBuf, String, BTreeSet<String>)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let m = module_of(&p);
            let names = names_after(&code(&text), "crate::");
            (p, m, names)
        })
        .collect()
}

/// The violations of the rules: `file: module -> other`.
fn violations() -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut bad = Vec::new();
    for (path, m, names) in edges() {
        if m == "main" || m == "lib" {
            continue;
        }
        let Some(ok) = allowed.get(m.as_str()) else {
            bad.push(format!(
                "{}: module `{m}` is not in ALLOWED (give it its place in the layers)",
                path.display()
            ));
            continue;
        };
        for n in names {
            if n != m && !ok.contains(&n.as_str()) && !ok.contains(&"*") {
                bad.push(format!(
                    "{}: `{m}` must not import `{n}` (allowed: {ok:?})",
                    path.display()
                ));
            }
        }
    }
    bad
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let bad = violations();
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn transports_never_import_one_another() {
    let dir = src().join("transport");
    let mut bad = Vec::new();
    for t in TRANSPORTS {
        let file = dir.join(format!("{t}.rs"));
        let (paths, sibling) = if file.exists() {
            (vec![file], "super::")
        } else {
            let mut files = Vec::new();
            rust_files(&dir.join(t), &mut files);
            (files, "super::super::")
        };
        assert!(!paths.is_empty(), "transport {t} has no source");
        for path in paths {
            let text = code(&std::fs::read_to_string(&path).unwrap());
            let mut names = names_after(&text, sibling);
            names.extend(names_after(&text, "crate::transport::"));
            for n in names {
                if n != *t && TRANSPORTS.contains(&n.as_str()) {
                    bad.push(format!("{}: transport `{t}` imports `{n}`", path.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn protocol_and_engine_name_no_socket_http_or_backplane_client() {
    let mut files = Vec::new();
    rust_files(&src().join("protocol"), &mut files);
    rust_files(&src().join("engine"), &mut files);
    let mut bad = Vec::new();
    for p in files {
        let text = code(&std::fs::read_to_string(&p).unwrap());
        for (i, line) in text.lines().enumerate() {
            for name in IO_NAMES {
                if line.contains(name) {
                    bad.push(format!("{}:{}: names `{name}`", p.display(), i + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "sans-IO core touches I/O:\n{}",
        bad.join("\n")
    );
}

/// The scanner itself: it must see the edges that exist, or the rules above would pass on
/// nothing.
#[test]
fn the_scanner_sees_grouped_nested_and_plain_paths() {
    let text = "use crate::{engine::hub::Hub, protocol::{json, ws}, self};\n\
                let x = crate::metrics::render();\n\
                // crate::server in a comment is prose\n\
                let url = \"http://crate::tls\"; let y = my_crate::auth::x();";
    let names = names_after(&code(text), "crate::");
    let want: BTreeSet<String> = ["engine", "protocol", "metrics", "tls"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, want);
    let transport: BTreeSet<String> = edges()
        .into_iter()
        .filter(|(_, m, _)| m == "transport")
        .flat_map(|(_, _, n)| n)
        .collect();
    for m in ["engine", "protocol", "types", "backplane"] {
        assert!(transport.contains(m), "transport's imports of {m} not seen");
    }
}
