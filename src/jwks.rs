//! JWKS: verification keys fetched from the identity provider (`--jwt-jwks-url`), cached by
//! `kid`, refreshed every `--jwt-jwks-refresh` and when a token names a `kid` the set does not
//! hold (at most once per [`MIN_REFETCH`]), so keys rotate without a restart.
//!
//! [`KeySet`] is what [`crate::auth::Auth`] reads (one atomic load per verify); [`start`] runs
//! the fetcher on its own thread. Only public keys are taken (RSA, EC, OKP): a symmetric
//! (`oct`) key in a key set is ignored, since anyone who can read the URL would hold it.
//! Verification stays synchronous: a token with an unknown `kid` is refused at once (the
//! client retries after the refetch); it never waits for the network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What an RSA key verifies.
pub const RSA_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
/// What an EC key verifies.
pub const EC_ALGS: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
/// What an Ed25519 key verifies.
pub const ED_ALGS: &[Algorithm] = &[Algorithm::EdDSA];

/// Least time between two fetches asked by unknown `kid`s.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// Largest key set document, bytes.
pub const MAX_DOCUMENT: usize = 1 << 20;

/// A key of the set: the key and the algorithms it may verify.
pub type Key = (DecodingKey, &'static [Algorithm]);

/// The keys in force, by `kid`. See the module docs.
pub struct KeySet {
    keys: ArcSwap<HashMap<String, Key>>,
    refetch: Notify,
    /// When an unknown `kid` last asked for a fetch (ms since `base`).
    asked_ms: AtomicU64,
    base: Instant,
}

impl Default for KeySet {
    fn default() -> Self {
        Self {
            keys: ArcSwap::from_pointee(HashMap::new()),
            refetch: Notify::new(),
            asked_ms: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

impl KeySet {
    /// The key `kid`, if the set holds it; asks for a refetch (rate limited) when it does not.
    pub fn get(&self, kid: &str) -> Option<Key> {
        if let Some(k) = self.keys.load().get(kid) {
            return Some(k.clone());
        }
        self.ask_refetch();
        None
    }

    /// Every key of the set (for a token without `kid`).
    pub fn all(&self) -> Vec<Key> {
        self.keys.load().values().cloned().collect()
    }

    fn ask_refetch(&self) {
        let now = self.base.elapsed().as_millis() as u64 + MIN_REFETCH.as_millis() as u64;
        let last = self.asked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= MIN_REFETCH.as_millis() as u64
            && self
                .asked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refetch.notify_one();
        }
    }

    /// Replaces the keys with those of the JWKS document `json`; returns how many it took.
    pub fn replace(&self, json: &[u8]) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let algs: &'static [Algorithm] = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => RSA_ALGS,
                AlgorithmParameters::EllipticCurve(_) => EC_ALGS,
                AlgorithmParameters::OctetKeyPair(_) => ED_ALGS,
                AlgorithmParameters::OctetKey(_) => continue,
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid, (k, algs));
                }
                Err(e) => tracing::warn!(kid, error = %e, "JWKS key ignored"),
            }
        }
        if keys.is_empty() && !set.keys.is_empty() {
            return Err("no usable public key with a kid in the key set".into());
        }
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }
}

/// Fetches the key set from `url` now (waiting up to 5 s, so that tokens verify from the first
/// connection), then every `refresh` and when asked, on a new thread `relay-jwks`, until
/// `shutdown`. A failed fetch keeps the keys in force and is retried.
pub fn start(
    set: Arc<KeySet>,
    url: hyper::Uri,
    refresh: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = {
        let _enter = rt.enter();
        crate::webhooks::client::Client::new()?
    };
    let fetch = {
        let (set, url, client) = (set.clone(), url.clone(), client.clone());
        move || {
            let (set, url, client) = (set.clone(), url.clone(), client.clone());
            async move {
                let r = client
                    .get(&url, Duration::from_secs(5), MAX_DOCUMENT)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|body| set.replace(&body));
                match &r {
                    Ok(n) => tracing::debug!(keys = n, "JWKS fetched"),
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "JWKS fetch failed; the keys in force stay")
                    }
                }
                r.is_ok()
            }
        }
    };
    let first = rt.block_on(fetch());
    std::thread::Builder::new()
        .name("relay-jwks".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut ok = first;
                loop {
                    // After a failure, try again soon rather than after the full period.
                    let wait = if ok {
                        refresh
                    } else {
                        refresh.min(MIN_REFETCH)
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = set.refetch.notified() => {}
                        _ = shutdown.cancelled() => return,
                    }
                    ok = fetch().await;
                }
            })
        })?;
    Ok(())
}
