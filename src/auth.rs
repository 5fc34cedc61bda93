//! Connection auth (JWT) and channel permissions. Pure: no sockets, no runtime, no clock but
//! the one `jsonwebtoken` reads for `exp`/`nbf`.
//!
//! - [`Auth`] verifies tokens: HS256 with `--jwt-secret`, RS256/ES256 (and their longer
//!   variants, and EdDSA) with `--jwt-public-key` PEM files. The algorithm of a token must be one
//!   its key is for: `alg: none` never verifies, and an HS256 token is refused unless a shared
//!   secret is configured (so an RSA public key can never be used as an HMAC secret).
//!   `exp` and `sub` are required; `exp`, `nbf`, `aud` (`--jwt-audience`) and `iss`
//!   (`--jwt-issuer`) are checked with [`LEEWAY_SECS`] of leeway.
//! - [`Grants`] says what a connection may do on which channel: the token's `channels` claim,
//!   plus the config rules (`--allow` for every token holder, with `{sub}` standing for the
//!   token's subject; `--allow-anonymous` for everyone). Grants are checked when a command
//!   arrives (subscribe, publish, presence query, history), never per delivered message.
//!
//! **Invariant:** with no key configured ([`Auth::new`] returns `None`) everything is
//! allowed, as before auth existed; with a key, nothing is allowed that no rule names.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
// The algorithms each kind of public key verifies, shared with the JWKS key set; their old
// paths.
pub use crate::jwks::{EC_ALGS, ED_ALGS, RSA_ALGS};
use crate::jwks::{EC_ALGS as EC, ED_ALGS as ED, RSA_ALGS as RSA};
use crate::types::{sub_fits, MAX_INFO_LEN, MAX_USER_LEN};

// The rules are plain values that `config` parses too; they live in `types`.
pub use crate::types::{Pattern, Perm, Perms, Rule, MAX_PATTERN_LEN};

/// Leeway for `exp` and `nbf`, seconds (clock skew between the token issuer and the node).
pub const LEEWAY_SECS: u64 = 5;
/// Longest token accepted, bytes (checked before decoding).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Most channel patterns a token may grant (all permissions together).
pub const MAX_TOKEN_PATTERNS: usize = 256;
/// What one connection (or one API request) may do.
#[derive(Clone, Debug)]
pub struct Grants {
    all: bool,
    /// With `all`: except the Pusher apps' protected channels (see [`pusher_protected`]).
    guard_pusher: bool,
    /// What `{sub}` stands for: the token's subject, or `None` (then `{sub}` patterns match
    /// nothing) when there is no subject or it holds a separator that some `{sub}` pattern of
    /// this token or of `--allow` puts next to `{sub}`.
    sub: Option<Arc<str>>,
    own: Arc<[Rule]>,
    common: Arc<[Rule]>,
}

impl Grants {
    /// Everything, everywhere (auth off, or an API key).
    pub fn all() -> Grants {
        // Asked for every API request with a key: the empty rule lists are shared, not
        // allocated each time.
        thread_local! {
            static NONE: Arc<[Rule]> = Arc::from(Vec::new());
        }
        let none = NONE.with(Arc::clone);
        Grants {
            all: true,
            guard_pusher: false,
            sub: None,
            own: none.clone(),
            common: none,
        }
    }

    /// Only what `common` names, for a connection without a subject.
    pub fn anonymous(common: Arc<[Rule]>) -> Grants {
        Grants {
            all: false,
            guard_pusher: false,
            sub: None,
            own: Arc::from(Vec::new()),
            common,
        }
    }

    /// Everything but the Pusher apps' protected channels: what a client without a token or
    /// API key may do when JWT auth is off and Pusher apps are served. A Pusher app's private,
    /// presence and user channels are reached with the app's signatures, or by relay clients
    /// with an API key or a token that grants them; never by anyone at all.
    pub fn all_but_pusher_private() -> Grants {
        Grants {
            guard_pusher: true,
            ..Grants::all()
        }
    }

    /// Whether everything is allowed.
    pub fn is_all(&self) -> bool {
        self.all && !self.guard_pusher
    }

    /// Whether `perm` is allowed on `channel`.
    pub fn allows(&self, perm: Perm, channel: &str) -> bool {
        if self.all {
            return !(self.guard_pusher && pusher_protected(channel));
        }
        let sub = self.sub.as_deref();
        self.own
            .iter()
            .chain(self.common.iter())
            .any(|r| r.perms.contains(perm) && r.pattern.matches(channel, sub))
    }
}

/// Whether relay channel `channel` is a Pusher app's private (`private-`, `private-encrypted-`),
/// presence or user channel (`pusher/APP/private-…`, `…/presence-…`, `…/~user-…`; see
/// `crate::protocol::pusher`).
pub fn pusher_protected(channel: &str) -> bool {
    let Some((_, name)) = channel
        .strip_prefix("pusher/")
        .and_then(|r| r.split_once('/'))
    else {
        return false;
    };
    ["private-", "presence-", "~user-"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A verified token.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The user id (`sub`).
    pub sub: Arc<str>,
    /// Presence info (`info` claim, a JSON object), normalized.
    pub info: Option<Bytes>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// What the token (with the config rules) allows.
    pub grants: Grants,
}

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Larger than [`MAX_TOKEN_LEN`].
    #[error("token too long")]
    TooLong,
    /// Not a JWT, or its claims have the wrong shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names an algorithm no configured key is for (`none` included).
    #[error("token algorithm not accepted")]
    Algorithm,
    /// The signature does not verify.
    #[error("invalid token signature")]
    Signature,
    /// `exp` is past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// `aud` does not name `--jwt-audience`.
    #[error("wrong token audience")]
    Audience,
    /// `iss` is not `--jwt-issuer`.
    #[error("wrong token issuer")]
    Issuer,
    /// The header's `kid` is in no key set (`--jwt-jwks-url`): a new key is fetched, at most
    /// every few seconds.
    #[error("unknown token key id (kid); if the key is new, retry in a few seconds")]
    UnknownKey,
}

/// A key setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file holds no RSA, EC or Ed25519 public key.
    #[error("{0}: not an RSA, EC or Ed25519 public key in PEM")]
    Key(std::path::PathBuf),
    /// A config rule uses `{sub}` where there is no subject.
    #[error("allow_anonymous rule {0:?} uses {{sub}}, but anonymous clients have no subject")]
    AnonymousSub(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: NumericDate,
    /// Checked by jsonwebtoken when it is a number; parsed here as well so that a `nbf` that
    /// is not a number refuses the token (jsonwebtoken alone would skip the check).
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<NumericDate>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    channels: ClaimGrants,
}

/// A JWT NumericDate (RFC 7519 §2): seconds since the Unix epoch, a JSON number (a fraction is
/// dropped). Strings, negative numbers and anything else are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = NumericDate;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a NumericDate (a non-negative number of seconds)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumericDate, E> {
                Ok(NumericDate(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumericDate, E> {
                u64::try_from(v)
                    .map(NumericDate)
                    .map_err(|_| E::custom("a NumericDate cannot be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<NumericDate, E> {
                if v.is_finite() && (0.0..1.8e19).contains(&v) {
                    Ok(NumericDate(v as u64))
                } else {
                    Err(E::custom("a NumericDate must be a non-negative number"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ClaimGrants {
    subscribe: Vec<String>,
    publish: Vec<String>,
    presence: Vec<String>,
    history: Vec<String>,
    all: Vec<String>,
}

/// The token verifier and the config rules. Built once per node.
pub struct Auth {
    keys: Vec<(DecodingKey, &'static [Algorithm])>,
    audience: Option<String>,
    issuer: Option<String>,
    allow: Arc<[Rule]>,
    anonymous: Arc<[Rule]>,
    /// The separators around `{sub}` in the `--allow` rules.
    allow_delims: u128,
    /// Keys fetched from `--jwt-jwks-url`.
    jwks: Option<Arc<crate::jwks::KeySet>>,
}

const HS: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

impl Auth {
    /// The verifier of `cfg`, or `None` when no JWT key is configured (auth off).
    /// `public_keys` holds the contents of the `--jwt-public-key` files, read by the caller
    /// (`server::prepare`): this module does no I/O.
    pub fn new(
        cfg: &Config,
        public_keys: &[(PathBuf, Vec<u8>)],
    ) -> Result<Option<Auth>, AuthSetupError> {
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.jwt_secret {
            keys.push((DecodingKey::from_secret(secret.as_bytes()), HS));
        }
        for (path, pem) in public_keys {
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, RSA)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, EC)
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, ED)
            } else {
                return Err(AuthSetupError::Key(path.clone()));
            };
            keys.push(key);
        }
        let jwks = cfg.jwt_jwks_url.as_ref().map(|_| Arc::default());
        if keys.is_empty() && jwks.is_none() {
            return Ok(None);
        }
        if let Some(r) = cfg.allow_anonymous.iter().find(|r| r.pattern.uses_sub()) {
            return Err(AuthSetupError::AnonymousSub(r.to_text()));
        }
        Ok(Some(Auth {
            keys,
            audience: cfg.jwt_audience.clone(),
            issuer: cfg.jwt_issuer.clone(),
            allow: Arc::from(cfg.allow.clone()),
            anonymous: Arc::from(cfg.allow_anonymous.clone()),
            allow_delims: cfg.allow.iter().fold(0, |d, r| d | r.pattern.delims),
            jwks,
        }))
    }

    /// The key set fetched from `--jwt-jwks-url` (the server starts its fetcher).
    pub fn jwks(&self) -> Option<&Arc<crate::jwks::KeySet>> {
        self.jwks.as_ref()
    }

    /// What a client without a token may do.
    pub fn anonymous(&self) -> Grants {
        Grants::anonymous(self.anonymous.clone())
    }

    /// Whether anonymous clients may do anything at all.
    pub fn anonymous_allowed(&self) -> bool {
        !self.anonymous.is_empty()
    }

    /// Verifies `token` and returns who it names and what it grants.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `alg` is `none` or unknown.
            ErrorKind::Json(_) => TokenError::Algorithm,
            _ => TokenError::Malformed(e.to_string()),
        })?;
        // Keys of the JWKS: the one the `kid` names (an unknown one asks for a refetch), or
        // all of them for a token without `kid`.
        let fetched: Vec<crate::jwks::Key> = match (&self.jwks, &header.kid) {
            (Some(set), Some(kid)) => set.get(kid).into_iter().collect(),
            (Some(set), None) => set.all(),
            (None, _) => Vec::new(),
        };
        let mut last = match (&self.jwks, &header.kid) {
            (Some(_), Some(_)) if fetched.is_empty() => TokenError::UnknownKey,
            _ => TokenError::Algorithm,
        };
        for (key, algs) in self.keys.iter().chain(fetched.iter()) {
            if !algs.contains(&header.alg) {
                continue;
            }
            let mut v = Validation::new(header.alg);
            v.leeway = LEEWAY_SECS;
            v.validate_nbf = true;
            // `aud` and `iss` are checked only when present: a configured one is required.
            let mut required = vec!["exp", "sub"];
            match &self.audience {
                Some(a) => {
                    v.set_audience(&[a]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            if let Some(i) = &self.issuer {
                v.set_issuer(&[i]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Claims>(token, key, &v) {
                Ok(data) => return self.principal(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => TokenError::Signature,
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                        ErrorKind::InvalidAudience => TokenError::Audience,
                        ErrorKind::InvalidIssuer => TokenError::Issuer,
                        ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                        ErrorKind::MissingRequiredClaim(c) => {
                            TokenError::Malformed(format!("missing claim {c}"))
                        }
                        _ => TokenError::Malformed(e.to_string()),
                    };
                    // Another key of the same kind may still verify it (key rotation).
                    if last != TokenError::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn principal(&self, c: Claims) -> Result<Principal, TokenError> {
        let malformed = |m: &str| TokenError::Malformed(m.to_owned());
        if c.sub.is_empty() || c.sub.len() > MAX_USER_LEN {
            return Err(malformed("sub must be 1 to 256 bytes"));
        }
        let info = match c.info {
            None | Some(serde_json::Value::Null) => None,
            Some(v @ serde_json::Value::Object(_)) => {
                let text = v.to_string();
                if text.len() > MAX_INFO_LEN {
                    return Err(malformed("info is larger than 4096 bytes"));
                }
                Some(Bytes::from(text))
            }
            Some(_) => return Err(malformed("info must be a JSON object")),
        };
        let g = c.channels;
        let total =
            g.subscribe.len() + g.publish.len() + g.presence.len() + g.history.len() + g.all.len();
        if total > MAX_TOKEN_PATTERNS {
            return Err(malformed("too many channel patterns"));
        }
        let mut own = Vec::with_capacity(total);
        let mut delims = self.allow_delims;
        for (perms, list) in [
            (Perms(Perm::Subscribe as u8), g.subscribe),
            (Perms(Perm::Publish as u8), g.publish),
            (Perms(Perm::Presence as u8), g.presence),
            (Perms(Perm::History as u8), g.history),
            (Perms::ALL, g.all),
        ] {
            for p in list {
                let pattern = Pattern::parse(&p).map_err(|e| malformed(&e))?;
                delims |= pattern.delims;
                own.push(Rule { perms, pattern });
            }
        }
        let sub: Arc<str> = Arc::from(c.sub);
        // What every token holder may do, then what anyone may.
        let common: Vec<Rule> = self
            .allow
            .iter()
            .chain(self.anonymous.iter())
            .cloned()
            .collect();
        // A subject holding a separator of its `{sub}` patterns could stand for part of
        // another subject's channel names: it gets no `{sub}` channel at all.
        let sub_grants = sub_fits(&sub, delims).then(|| sub.clone());
        Ok(Principal {
            grants: Grants {
                all: false,
                guard_pusher: false,
                sub: sub_grants,
                own: Arc::from(own),
                common: Arc::from(common),
            },
            sub,
            info,
            exp: c.exp.0,
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn auth(cfg: Config) -> Auth {
        Auth::new(&cfg, &[]).unwrap().unwrap()
    }

    fn hs_cfg() -> Config {
        Config {
            jwt_secret: Some("s3cret".into()),
            ..Config::default()
        }
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn patterns() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("room:*").matches("room:1", None));
        assert!(p("room:*").matches("room:", None));
        assert!(!p("room:*").matches("roo", None));
        assert!(p("*").matches("anything", None));
        assert!(p("a*b*c").matches("aXXbYYc", None));
        assert!(!p("a*b*c").matches("aXXcYYb", None));
        assert!(p("exact").matches("exact", None));
        assert!(!p("exact").matches("exact2", None));
        assert!(p("user:{sub}").matches("user:alice", Some("alice")));
        assert!(!p("user:{sub}").matches("user:bob", Some("alice")));
        assert!(!p("user:{sub}").matches("user:alice", None));
        // A subject is literal: `*` in it is no wildcard.
        assert!(!p("user:{sub}").matches("user:anything", Some("*")));
        assert!(p("user:{sub}:*").matches("user:al:inbox", Some("al")));
        assert!(Pattern::parse("").is_err());
    }

    #[test]
    fn rules_and_perms() {
        let r = Rule::parse("subscribe,history=public:*").unwrap();
        assert!(r.perms.contains(Perm::Subscribe) && r.perms.contains(Perm::History));
        assert!(!r.perms.contains(Perm::Publish));
        assert_eq!(r.to_text(), "subscribe,history=public:*");
        assert_eq!(Rule::parse("all=x").unwrap().perms, Perms::ALL);
        assert!(Rule::parse("read=x").is_err());
        assert!(Rule::parse("subscribe").is_err());
    }

    #[test]
    fn grants_from_token_and_config() {
        let a = auth(Config {
            allow: vec![Rule::parse("all=user:{sub}").unwrap()],
            allow_anonymous: vec![Rule::parse("subscribe=public:*").unwrap()],
            ..hs_cfg()
        });
        let t = token(
            json!({"sub":"alice","exp":unix_now()+60,"info":{"n":1},
                   "channels":{"subscribe":["room:*"],"publish":["room:1"]}}),
            "s3cret",
        );
        let p = a.verify(&t).unwrap();
        assert_eq!(&*p.sub, "alice");
        assert_eq!(p.info.as_deref(), Some(&b"{\"n\":1}"[..]));
        let g = &p.grants;
        assert!(g.allows(Perm::Subscribe, "room:9"));
        assert!(g.allows(Perm::Publish, "room:1"));
        assert!(!g.allows(Perm::Publish, "room:2"));
        assert!(!g.allows(Perm::History, "room:1"));
        assert!(!g.allows(Perm::Presence, "room:1"));
        assert!(g.allows(Perm::History, "user:alice"));
        assert!(!g.allows(Perm::Subscribe, "user:bob"));
        assert!(g.allows(Perm::Subscribe, "public:x"));
        let anon = a.anonymous();
        assert!(anon.allows(Perm::Subscribe, "public:x"));
        assert!(!anon.allows(Perm::Publish, "public:x"));
        assert!(!anon.allows(Perm::Subscribe, "room:1"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth(Config {
            jwt_audience: Some("relay".into()),
            jwt_issuer: Some("me".into()),
            ..hs_cfg()
        });
        let now = unix_now();
        let ok = json!({"sub":"a","exp":now+60,"aud":"relay","iss":"me"});
        assert!(a.verify(&token(ok.clone(), "s3cret")).is_ok());
        assert_eq!(
            a.verify(&token(ok, "other")).unwrap_err(),
            TokenError::Signature
        );
        let expired = json!({"sub":"a","exp":now-60,"aud":"relay","iss":"me"});
        assert_eq!(
            a.verify(&token(expired, "s3cret")).unwrap_err(),
            TokenError::Expired
        );
        let aud = json!({"sub":"a","exp":now+60,"aud":"other","iss":"me"});
        assert_eq!(
            a.verify(&token(aud, "s3cret")).unwrap_err(),
            TokenError::Audience
        );
        let no_aud = json!({"sub":"a","exp":now+60,"iss":"me"});
        assert!(a.verify(&token(no_aud, "s3cret")).is_err());
        let no_iss = json!({"sub":"a","exp":now+60,"aud":"relay"});
        assert!(a.verify(&token(no_iss, "s3cret")).is_err());
        let iss = json!({"sub":"a","exp":now+60,"aud":"relay","iss":"you"});
        assert_eq!(
            a.verify(&token(iss, "s3cret")).unwrap_err(),
            TokenError::Issuer
        );
        let nbf = json!({"sub":"a","exp":now+600,"nbf":now+300,"aud":"relay","iss":"me"});
        assert_eq!(
            a.verify(&token(nbf, "s3cret")).unwrap_err(),
            TokenError::NotYetValid
        );
        let no_exp = json!({"sub":"a","aud":"relay","iss":"me"});
        assert!(matches!(
            a.verify(&token(no_exp, "s3cret")).unwrap_err(),
            TokenError::Malformed(_)
        ));
        // alg: none, with the signature stripped.
        let b64 = |v: &serde_json::Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg":"none","typ":"JWT"})),
            b64(&json!({"sub":"a","exp":now+60,"aud":"relay","iss":"me"}))
        );
        assert_eq!(a.verify(&none).unwrap_err(), TokenError::Algorithm);
        assert!(a.verify("not a token").is_err());
        assert_eq!(
            a.verify(&"x".repeat(MAX_TOKEN_LEN + 1)).unwrap_err(),
            TokenError::TooLong
        );
    }

    #[test]
    fn sub_stands_between_separators() {
        for ok in [
            "user:{sub}",
            "{sub}",
            "user:{sub}:*",
            "{sub}/inbox",
            "a.{sub}.b",
        ] {
            assert!(Pattern::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "user{sub}",
            "{sub}x",
            "{sub}*",
            "*{sub}",
            "*:{sub}",
            "{sub}{sub}",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Rule::parse("all=u-{sub}").is_ok());
        assert!(Rule::parse("all=room*:{sub}").is_err());
    }

    #[test]
    fn a_subject_cannot_reach_another_subjects_channels() {
        let a = auth(Config {
            allow: vec![
                Rule::parse("all=user:{sub}").unwrap(),
                Rule::parse("all=user:{sub}:*").unwrap(),
            ],
            ..hs_cfg()
        });
        let grants = |sub: &str| {
            let t = token(json!({"sub": sub, "exp": unix_now() + 60}), "s3cret");
            a.verify(&t).unwrap().grants
        };
        let alice = grants("alice");
        assert!(alice.allows(Perm::Subscribe, "user:alice"));
        assert!(alice.allows(Perm::Subscribe, "user:alice:inbox"));
        assert!(!alice.allows(Perm::Subscribe, "user:alicex"));
        // `alice:x` holds the separator `:`, so `user:alice:x` (which alice's namespace
        // `user:alice:*` covers) is not also hers: `{sub}` stands for nothing.
        let other = a.verify(&token(
            json!({"sub": "alice:x", "exp": unix_now() + 60}),
            "s3cret",
        ));
        let other = other.unwrap();
        assert_eq!(&*other.sub, "alice:x", "the token stays valid");
        assert!(!other.grants.allows(Perm::Subscribe, "user:alice:x"));
        assert!(!other.grants.allows(Perm::Subscribe, "user:alice:x:inbox"));
        assert!(!other.grants.allows(Perm::Subscribe, "user:alice"));
        // A separator only matters where a pattern puts it next to `{sub}`.
        let mail = grants("bob@example.com");
        assert!(mail.allows(Perm::Publish, "user:bob@example.com"));
        // The token's own `{sub}` patterns count too.
        let t = token(
            json!({"sub": "a.b", "exp": unix_now() + 60, "channels": {"all": ["t.{sub}"]}}),
            "s3cret",
        );
        assert!(!a
            .verify(&t)
            .unwrap()
            .grants
            .allows(Perm::Subscribe, "t.a.b"));
    }

    #[test]
    fn dates_must_be_numbers() {
        let a = auth(hs_cfg());
        let now = unix_now();
        let verify = |claims| a.verify(&token(claims, "s3cret"));
        assert!(matches!(
            verify(json!({"sub":"a","exp":now+60,"nbf":"yesterday"})),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(json!({"sub":"a","exp":"tomorrow"})),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(json!({"sub":"a","exp":now+60,"nbf":{"t":1}})),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(json!({"sub":"a","exp":-5})),
            Err(TokenError::Malformed(_))
        ));
        // Fractions are NumericDates too (RFC 7519 §2).
        let p = verify(json!({"sub":"a","exp":(now + 60) as f64 + 0.5,"nbf":now as f64 - 0.5}));
        assert_eq!(p.unwrap().exp, now + 60);
        assert_eq!(
            verify(json!({"sub":"a","exp":now+600,"nbf":(now + 300) as f64})).unwrap_err(),
            TokenError::NotYetValid
        );
    }

    #[test]
    fn no_key_means_auth_off() {
        assert!(Auth::new(&Config::default(), &[]).unwrap().is_none());
        let bad = Config {
            allow_anonymous: vec![Rule::parse("subscribe=u:{sub}").unwrap()],
            ..hs_cfg()
        };
        assert!(Auth::new(&bad, &[]).is_err());
    }
}
