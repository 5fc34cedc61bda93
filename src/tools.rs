//! The operator's helpers behind `relay gentoken`, `relay check-config` and `relay genconfig`:
//! the claims and signature of a token, the effective settings as TOML with secrets masked,
//! and a commented config file with fresh secrets. No sockets; `main.rs` reads the files and
//! prints.
//!
//! **Invariants:** a token `gentoken` prints has the claims shape `docs/security.md` documents
//! and stays within the limits `auth::Auth::verify` enforces (so the relay never refuses it for
//! its shape); `effective_toml` never prints a secret (`jwt_secret`, `api_key`, a password in a
//! backplane URL).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

use crate::auth::{MAX_TOKEN_LEN, MAX_TOKEN_PATTERNS};
use crate::config::Config;
use crate::types::{Perm, Perms, Rule, MAX_INFO_LEN, MAX_USER_LEN};

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Neither a secret nor a private key was given.
    #[error(
        "no signing key: give the relay's HS256 secret (--jwt-secret, RELAY_JWT_SECRET, or \
         jwt_secret in the --config file), or --jwt-private-key FILE for a relay that verifies \
         with --jwt-public-key"
    )]
    NoKey,
    /// The private key file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The private key cannot sign.
    #[error("{path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A claim the relay would refuse.
    #[error("{0}")]
    Claims(String),
}

/// What a token says.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    /// The user id (`sub`, also the presence user).
    pub sub: String,
    /// What it may do where (`channels` claim).
    pub grants: Vec<Rule>,
    /// How long it is valid.
    pub ttl: Duration,
    /// Presence info (`info` claim), a JSON object.
    pub info: Option<Value>,
    /// `aud` (the relay's `--jwt-audience`).
    pub audience: Option<String>,
    /// `iss` (the relay's `--jwt-issuer`).
    pub issuer: Option<String>,
}

/// The claims of `spec` issued at `now` (seconds since the Unix epoch), in the shape of
/// `docs/security.md`: `sub`, `iat`, `exp`, optional `info`, `aud`, `iss`, and `channels` with a
/// list of patterns per permission (`all` for a pattern with every permission).
pub fn claims(spec: &TokenSpec, now: u64) -> Result<Value, MintError> {
    let bad = |m: String| Err(MintError::Claims(m));
    if spec.sub.is_empty() || spec.sub.len() > MAX_USER_LEN {
        return bad(format!("--sub must be 1 to {MAX_USER_LEN} bytes"));
    }
    if spec.ttl.as_secs() == 0 {
        return bad("--ttl must be at least 1s".into());
    }
    if spec.grants.len() > MAX_TOKEN_PATTERNS {
        return bad(format!(
            "at most {MAX_TOKEN_PATTERNS} channel patterns per token"
        ));
    }
    let mut channels = Map::new();
    for rule in &spec.grants {
        let names: Vec<&str> = if rule.perms == Perms::ALL {
            vec!["all"]
        } else {
            [
                Perm::Subscribe,
                Perm::Publish,
                Perm::Presence,
                Perm::History,
            ]
            .into_iter()
            .filter(|p| rule.perms.contains(*p))
            .map(Perm::as_str)
            .collect()
        };
        for name in names {
            if let Value::Array(list) = channels
                .entry(name)
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                list.push(Value::from(rule.pattern.as_str()));
            }
        }
    }
    let mut c = json!({
        "sub": spec.sub,
        "iat": now,
        "exp": now.saturating_add(spec.ttl.as_secs()),
        "channels": channels,
    });
    match &spec.info {
        None => {}
        Some(info @ Value::Object(_)) if info.to_string().len() <= MAX_INFO_LEN => {
            c["info"] = info.clone();
        }
        Some(Value::Object(_)) => return bad(format!("--info is over {MAX_INFO_LEN} bytes")),
        Some(_) => return bad("--info must be a JSON object, e.g. '{\"name\":\"Alice\"}'".into()),
    }
    if let Some(aud) = &spec.audience {
        c["aud"] = Value::from(aud.as_str());
    }
    if let Some(iss) = &spec.issuer {
        c["iss"] = Value::from(iss.as_str());
    }
    Ok(c)
}

/// What signs a token.
pub enum SigningKey<'a> {
    /// The relay's `--jwt-secret` (HS256 unless another HS algorithm is asked for).
    Secret(&'a str),
    /// A PEM private key (PKCS#8, or PKCS#1 RSA / SEC1 EC) from `path`, whose public key the
    /// relay has as `--jwt-public-key`.
    Pem {
        /// The file, for messages.
        path: &'a Path,
        /// Its contents.
        pem: &'a [u8],
    },
}

/// Signs `claims`. With a PEM key the algorithm follows the key (RSA: RS256, EC P-256: ES256,
/// P-384: ES384, Ed25519: EdDSA) unless `alg` names another the key can make.
pub fn sign(
    claims: &Value,
    key: &SigningKey<'_>,
    alg: Option<Algorithm>,
) -> Result<String, MintError> {
    use Algorithm::*;
    let token = match key {
        SigningKey::Secret(secret) => {
            let alg = alg.unwrap_or(HS256);
            if !matches!(alg, HS256 | HS384 | HS512) {
                return Err(MintError::Claims(format!(
                    "--alg {alg:?} needs --jwt-private-key; a secret signs HS256, HS384 or HS512"
                )));
            }
            jsonwebtoken::encode(
                &Header::new(alg),
                claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .map_err(|e| MintError::Claims(e.to_string()))?
        }
        SigningKey::Pem { path, pem } => {
            type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;
            let rsa: Parse = EncodingKey::from_rsa_pem;
            let ec: Parse = EncodingKey::from_ec_pem;
            let ed: Parse = EncodingKey::from_ed_pem;
            let candidates: &[(Algorithm, Parse)] = &[
                (RS256, rsa),
                (RS384, rsa),
                (RS512, rsa),
                (PS256, rsa),
                (PS384, rsa),
                (PS512, rsa),
                (ES256, ec),
                (ES384, ec),
                (EdDSA, ed),
            ];
            // The first algorithm (of the asked one, else of the natural ones) that the key
            // signs with: parsing alone does not tell a P-256 key from a P-384 one.
            let natural = [RS256, ES256, ES384, EdDSA];
            let signed = candidates
                .iter()
                .filter(|(a, _)| alg.map_or(natural.contains(a), |want| want == *a))
                .find_map(|(a, parse)| {
                    let k = parse(pem).ok()?;
                    jsonwebtoken::encode(&Header::new(*a), claims, &k).ok()
                });
            signed.ok_or_else(|| MintError::Key {
                path: path.to_path_buf(),
                reason: match alg {
                    Some(a) => format!("not a PEM private key that signs {a:?}"),
                    None => "not an RSA, EC (P-256, P-384) or Ed25519 private key in PEM".into(),
                },
            })?
        }
    };
    if token.len() > MAX_TOKEN_LEN {
        return Err(MintError::Claims(format!(
            "the token is over {MAX_TOKEN_LEN} bytes: fewer patterns or a smaller --info"
        )));
    }
    Ok(token)
}

/// Parses an `--alg` name (`HS256`, `RS256`, `ES256`, `EdDSA`, …).
pub fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.trim()
        .to_ascii_uppercase()
        .replace("EDDSA", "EdDSA")
        .parse()
        .map_err(|_| format!("{s:?} is not a JWT algorithm (HS256, RS256, ES256, EdDSA, …)"))
}

/// What `relay check-config` prints for a secret.
pub const HIDDEN: &str = "<hidden>";

/// The settings as TOML (the keys of the config file, in `relay serve --help` order), secrets
/// masked; a setting that is not set is a comment.
pub fn effective_toml(config: &Config) -> String {
    let mut table = match toml::Table::try_from(config) {
        Ok(t) => t,
        // Only a field whose type serializes to no TOML value gets here; show it raw.
        Err(e) => return format!("# cannot render as TOML ({e}):\n# {config:?}\n"),
    };
    // Defaults that follow other settings, as the node runs with them.
    table.insert(
        "client_presence".into(),
        toml::Value::Boolean(config.client_presence()),
    );
    let cmd = <Config as clap::Args>::augment_args(clap::Command::new("relay"));
    let mut out = String::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        match table.remove(id).map(|v| mask(id, readable(v))) {
            Some(v) => out.push_str(&format!("{id} = {v}\n")),
            None => out.push_str(&format!("# {id}: not set\n")),
        }
    }
    out
}

/// Durations (serialized as `{secs, nanos}`) as the strings the config file takes.
fn readable(v: toml::Value) -> toml::Value {
    match v {
        toml::Value::Table(t)
            if t.len() == 2 && t.contains_key("secs") && t.contains_key("nanos") =>
        {
            let n = |k: &str| t.get(k).and_then(toml::Value::as_integer).unwrap_or(0);
            let d = Duration::new(
                n("secs").max(0) as u64,
                n("nanos").clamp(0, 999_999_999) as u32,
            );
            toml::Value::String(humantime::format_duration(d).to_string())
        }
        toml::Value::Array(items) => toml::Value::Array(items.into_iter().map(readable).collect()),
        other => other,
    }
}

/// `v` with secrets replaced by [`HIDDEN`].
fn mask(id: &str, v: toml::Value) -> toml::Value {
    match (id, v) {
        ("jwt_secret" | "admin_password" | "admin_token" | "webhook_secret", _) => {
            toml::Value::String(HIDDEN.into())
        }
        ("api_key", toml::Value::Array(keys)) => toml::Value::Array(
            keys.iter()
                .map(|_| toml::Value::String(HIDDEN.into()))
                .collect(),
        ),
        (_, toml::Value::String(url)) if url.contains("://") => {
            toml::Value::String(crate::types::mask_url_password(&url, HIDDEN))
        }
        (_, v) => v,
    }
}

/// The example config (`deploy/relay.toml`, every option with a comment), embedded.
pub const EXAMPLE_CONFIG: &str = include_str!("../deploy/relay.toml");

/// A config file for a new node: [`EXAMPLE_CONFIG`] with a fresh API key and a fresh JWT
/// secret set, from `random` (hex digits of 32 random bytes each).
pub fn genconfig(mut random_hex: impl FnMut() -> String) -> String {
    let head =
        "# Written by `relay genconfig`: every option of `relay serve`, with a fresh API key\n\
                # and JWT secret. Keep this file private (chmod 600). Check it with\n\
                # `relay check-config FILE`; mint a test token with\n\
                # `relay gentoken --config FILE --sub alice --channel 'room:*'`.\n#\n";
    let mut out = String::from(head);
    for line in EXAMPLE_CONFIG.lines() {
        match line.trim_start_matches("# ").split_once(" = ") {
            Some(("api_key", _)) => out.push_str(&format!("api_key = [\"{}\"]", random_hex())),
            Some(("jwt_secret", _)) => {
                out.push_str(&format!("jwt_secret = \"{}\"", random_hex()));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec(grants: &[&str]) -> TokenSpec {
        TokenSpec {
            sub: "alice".into(),
            grants: grants.iter().map(|g| Rule::parse(g).unwrap()).collect(),
            ttl: Duration::from_secs(3600),
            info: Some(json!({"name": "Alice"})),
            audience: None,
            issuer: Some("https://auth.example".into()),
        }
    }

    #[test]
    fn claims_have_the_documented_shape() {
        let c = claims(&spec(&["all=room:*", "subscribe+history=news:*"]), 1000).unwrap();
        assert_eq!(
            c,
            json!({"sub":"alice","iat":1000,"exp":4600,"info":{"name":"Alice"},
                   "iss":"https://auth.example",
                   "channels":{"all":["room:*"],"subscribe":["news:*"],"history":["news:*"]}})
        );
        let mut s = spec(&[]);
        s.info = Some(json!([1]));
        assert!(claims(&s, 0).is_err());
        s.info = None;
        s.sub = String::new();
        assert!(claims(&s, 0).is_err());
    }

    #[test]
    fn a_secret_token_verifies_with_the_relays_auth() {
        let secret = "0123456789abcdef0123";
        let c = claims(&spec(&["all=room:*"]), crate::auth::unix_now()).unwrap();
        let token = sign(&c, &SigningKey::Secret(secret), None).unwrap();
        let cfg = Config {
            jwt_secret: Some(secret.into()),
            jwt_issuer: Some("https://auth.example".into()),
            ..Config::default()
        };
        let auth = crate::auth::Auth::new(&cfg, &[]).unwrap().unwrap();
        let p = auth.verify(&token).unwrap();
        assert_eq!(&*p.sub, "alice");
        assert!(p.grants.allows(Perm::Publish, "room:1"));
        assert!(!p.grants.allows(Perm::Subscribe, "other"));
        assert!(sign(&c, &SigningKey::Secret(secret), Some(Algorithm::RS256)).is_err());
    }

    #[test]
    fn secrets_are_masked() {
        let cfg = Config {
            jwt_secret: Some("s3cret-s3cret-s3cret".into()),
            api_key: vec!["k-one".into(), "k-two".into()],
            redis_url: "redis://app:pa55@redis:6379/0".into(),
            nats_url: "nats://tok3n@nats:4222".into(),
            ..Config::default()
        };
        let text = effective_toml(&cfg);
        for secret in ["s3cret", "k-one", "k-two", "pa55", "tok3n"] {
            assert!(!text.contains(secret), "{secret} shows in:\n{text}");
        }
        assert!(
            text.contains("api_key = [\"<hidden>\", \"<hidden>\"]"),
            "{text}"
        );
        assert!(text.contains("redis_url = \"redis://app:<hidden>@redis:6379/0\""));
        assert!(text.contains("history_ttl = \"5m\""), "{text}");
        assert!(text.contains("slow_consumer = []"), "{text}");
        assert!(text.contains("# tls_cert: not set"), "{text}");
        // What it prints reads back as the same settings.
        let uncommented: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let back = Config::from_file(Path::new("printed.toml"), &uncommented.replace(HIDDEN, "x"))
            .unwrap();
        assert_eq!(back.history_ttl, cfg.history_ttl);
        assert_eq!(back.listen, cfg.listen);
    }

    #[test]
    fn genconfig_sets_fresh_secrets_in_the_example() {
        let mut n = 0;
        let text = genconfig(|| {
            n += 1;
            format!("{n:064x}")
        });
        let c = Config::from_file(Path::new("gen.toml"), &text).unwrap();
        assert_eq!(c.api_key, [format!("{:064x}", 1)]);
        assert_eq!(c.jwt_secret, Some(format!("{:064x}", 2)));
        c.validate().unwrap();
    }
}
