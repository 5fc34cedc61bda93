//! Idempotency keys of one channel: a publish that repeats a key seen within the window gets
//! the seq of the first one and publishes nothing. Kept under the channel's lock, so the check
//! and the publish are one step; counted in the memory budget as history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes a key costs besides its text (its map and queue entries, its `Arc`).
pub const KEY_OVERHEAD: usize = 96;

/// Longest idempotency key, bytes.
pub const MAX_KEY_LEN: usize = crate::types::MAX_IDEMPOTENCY_KEY_LEN;

/// What a publish may require besides the message itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishConditions {
    /// A repeat of this key within the window gets the first publish's seq, and publishes
    /// nothing.
    pub idempotency_key: Option<Arc<str>>,
    /// Publish only when the channel's top seq is this (compare-and-set).
    pub expected_seq: Option<u64>,
}

impl PublishConditions {
    /// Whether the publish is unconditional.
    pub fn is_empty(&self) -> bool {
        self.idempotency_key.is_none() && self.expected_seq.is_none()
    }

    /// The conditions a client asked for: an idempotency key (1 to [`MAX_KEY_LEN`] bytes) and
    /// an expected seq; the error is the refusal's message.
    pub fn checked(key: Option<&str>, expected_seq: Option<u64>) -> Result<Self, String> {
        if key.is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_LEN) {
            return Err(format!("idempotency_key must be 1 to {MAX_KEY_LEN} bytes"));
        }
        Ok(Self {
            idempotency_key: key.map(Into::into),
            expected_seq,
        })
    }
}

/// One channel's keys, oldest first.
#[derive(Default)]
pub struct Keys {
    seqs: HashMap<Arc<str>, u64>,
    order: VecDeque<(Instant, Arc<str>)>,
    bytes: usize,
}

impl Keys {
    /// The seq published with `key`, if it is still kept.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.seqs.get(key).copied()
    }

    /// Records `key` for `seq` at `now`; returns the bytes it costs.
    pub fn insert(&mut self, key: Arc<str>, seq: u64, now: Instant) -> usize {
        let cost = KEY_OVERHEAD + key.len();
        self.seqs.insert(key.clone(), seq);
        self.order.push_back((now, key));
        self.bytes += cost;
        cost
    }

    /// Forgets the keys older than `window`; returns the bytes freed.
    pub fn prune(&mut self, now: Instant, window: Duration) -> usize {
        let before = self.bytes;
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) <= window {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.seqs.remove(&key);
                self.bytes -= KEY_OVERHEAD + key.len();
            }
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to_fit();
            self.seqs.shrink_to_fit();
        }
        before - self.bytes
    }

    /// What the keys cost.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the oldest key leaves the window.
    pub fn next_expiry(&self, window: Duration) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at + window)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kept_for_the_window_and_their_bytes_counted() {
        let mut k = Keys::default();
        let t0 = Instant::now();
        let cost = k.insert("a".into(), 1, t0);
        k.insert("b".into(), 2, t0 + Duration::from_secs(5));
        assert_eq!(cost, KEY_OVERHEAD + 1);
        assert_eq!((k.get("a"), k.get("b")), (Some(1), Some(2)));
        assert_eq!(
            k.prune(t0 + Duration::from_secs(10), Duration::from_secs(10)),
            0
        );
        let freed = k.prune(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(freed, cost);
        assert_eq!((k.get("a"), k.get("b")), (None, Some(2)));
        assert_eq!(k.bytes(), KEY_OVERHEAD + 1);
    }
}
