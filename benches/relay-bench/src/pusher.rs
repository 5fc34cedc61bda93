//! The Pusher Channels side of the load generator: the app a `pusher` target serves
//! (`--pusher-app ID:KEY:SECRET`), and signed HTTP API publishes (`POST /apps/ID/events` with
//! `auth_key`, `auth_timestamp`, `auth_version`, `body_md5` and `auth_signature`) that any
//! Pusher server accepts: relay's Pusher endpoint, Sockudo, soketi.

use std::fmt::Write as _;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A Pusher app: its id (HTTP API paths), key (WebSocket path, `auth_key`) and secret (signs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PusherApp {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl Default for PusherApp {
    fn default() -> Self {
        "bench:bench-key:bench-secret"
            .parse()
            .unwrap_or_else(|_| unreachable!("the default app parses"))
    }
}

impl FromStr for PusherApp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("{s:?}: expected ID:KEY:SECRET"));
        };
        // The three go into a URL path and query unescaped; Pusher's own are [A-Za-z0-9_-].
        let plain = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !(plain(id) && plain(key) && plain(secret)) {
            return Err(format!(
                "{s:?}: id, key and secret must be non-empty [A-Za-z0-9._-]"
            ));
        }
        Ok(Self {
            id: id.into(),
            key: key.into(),
            secret: secret.into(),
        })
    }
}

impl PusherApp {
    /// Where subscribers connect: protocol 7, as pusher-js does.
    pub fn ws_path(&self) -> String {
        format!("/app/{}?protocol=7&client=relay-bench&version=1", self.key)
    }

    /// What comes before a Pusher channel's name in relay's own API (`pusher/ID/`).
    pub fn relay_prefix(&self) -> String {
        format!("pusher/{}/", self.id)
    }

    /// The HTTP API path of a publish.
    pub fn events_path(&self) -> String {
        format!("/apps/{}/events", self.id)
    }

    /// The query string of a signed `POST` of `body` to `path` at Unix time `now` (seconds):
    /// the four auth parameters in sorted order (they are what is signed), then
    /// `auth_signature`.
    pub fn signed_query(&self, path: &str, body: &[u8], now: u64) -> String {
        let mut q = format!(
            "auth_key={}&auth_timestamp={now}&auth_version=1.0&body_md5={}",
            self.key,
            md5_hex(body)
        );
        let sig = sign(&self.secret, format!("POST\n{path}\n{q}").as_bytes());
        q.push_str("&auth_signature=");
        q.push_str(&sig);
        q
    }
}

/// Lowercase hex HMAC-SHA256 of `msg` with `secret`.
pub fn sign(secret: &str, msg: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex(ring::hmac::sign(&key, msg).as_ref())
}

/// Lowercase hex MD5 of `body`.
pub fn md5_hex(body: &[u8]) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(body))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Appends `raw` to `out` as a JSON string (Pusher's `data` is a string: the payload's JSON,
/// escaped, as the Pusher server libraries send it).
pub fn push_json_string(out: &mut Vec<u8>, raw: &[u8]) {
    out.push(b'"');
    for &b in raw {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let _ = std::io::Write::write_fmt(out, format_args!("\\u{b:04x}"));
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_publishes_match_the_pusher_docs_worked_example() -> Result<(), String> {
        // The worked example of Pusher's HTTP API reference ("Generating authentication
        // signatures"): app 3, key 278d425bdf160c739803, secret 7ad3773142a6692b25b8.
        let app: PusherApp = "3:278d425bdf160c739803:7ad3773142a6692b25b8".parse()?;
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(md5_hex(body), "ec365a775a4cd0599faeb73354201b6f");
        assert_eq!(
            app.signed_query(&app.events_path(), body, 1_353_088_179),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
        Ok(())
    }

    #[test]
    fn apps_parse_as_id_key_secret() -> Result<(), String> {
        let app: PusherApp = "app1:k-1:s.e_c".parse()?;
        assert_eq!(
            (app.id.as_str(), app.key.as_str(), app.secret.as_str()),
            ("app1", "k-1", "s.e_c")
        );
        assert_eq!(
            app.ws_path(),
            "/app/k-1?protocol=7&client=relay-bench&version=1"
        );
        assert_eq!(app.relay_prefix(), "pusher/app1/");
        assert!("a:b".parse::<PusherApp>().is_err());
        assert!("a::c".parse::<PusherApp>().is_err());
        assert!("a/b:k:s".parse::<PusherApp>().is_err());
        // The secret is everything after the second colon, and a colon is not plain.
        assert!("a:k:s:x".parse::<PusherApp>().is_err());
        Ok(())
    }

    #[test]
    fn data_is_the_payload_as_a_json_string() {
        let mut out = Vec::new();
        push_json_string(&mut out, br#"{"t":1,"x":"a\b"}"#);
        assert_eq!(out, br#""{\"t\":1,\"x\":\"a\\b\"}""#);
        let mut out = Vec::new();
        push_json_string(&mut out, b"\n\x01");
        assert_eq!(out, br#""\n\u0001""#);
    }
}
