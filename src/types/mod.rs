//! Leaf value types shared by every layer: channel names, epochs and stream positions, the
//! publication and presence event the engine hands to the encoders, shard masks, slow-consumer
//! policies, gap reasons, permission rules and trusted networks. Nothing here imports another
//! module of the crate: `protocol`, `engine`, `config` and `auth` all stand on it.

mod net;
mod publication;
pub mod pusher_app;
mod rules;

pub use net::{mask_url_password, TrustedNet};
pub(crate) use publication::identity_len;
pub use publication::{
    Encoder, FrameGauge, Identity, PresenceEvent, Publication, ENTRY_OVERHEAD, EVENT_OVERHEAD,
    FRAME_SLOTS,
};
pub(crate) use rules::sub_fits;
pub use rules::{Pattern, Perm, Perms, Rule, MAX_PATTERN_LEN};

use std::fmt;
use std::sync::Arc;

/// The node's clock, read by every layer that passes `now` into the engine or a session:
/// tokio's, which is the system's in production and a test's paused clock under
/// `tokio::time::pause()` (outside a runtime, the system's). One clock, so that the engine's
/// deadlines (channel TTL, presence expiry, history age, linger) and the drivers' timers agree
/// when a test pauses time.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;

/// A validated channel name. Cheap to clone (shared `Arc<str>`).
///
/// Invariant: 1..=[`MAX_CHANNEL_LEN`] bytes, each one [`is_channel_byte`]. None of these bytes
/// needs escaping in JSON, in an SSE line or in a URL path segment, so encoders write the name
/// as is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel name is longer than 200 bytes")]
    TooLong,
    /// The name holds a byte outside the allowed set.
    #[error("channel name has a character outside [A-Za-z0-9:_-.@/=+!~$]")]
    BadCharacter,
}

/// The bytes a channel name may hold.
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b':' | b'_' | b'-' | b'.' | b'@' | b'/' | b'=' | b'+' | b'!' | b'~' | b'$'
        )
}

impl ChannelName {
    /// Validates `name` against the channel rules.
    pub fn new(name: &str) -> Result<Self, ChannelNameError> {
        if name.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelNameError::TooLong);
        }
        if !name.bytes().all(is_channel_byte) {
            return Err(ChannelNameError::BadCharacter);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Names one sequence space of a channel. A new epoch means the channel's history started
/// afresh, so positions from another epoch cannot be resumed.
///
/// On the wire it is lowercase hex without leading zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Epoch(pub u64);

impl Epoch {
    /// Parses the wire form. `None` for anything that is not 1..=16 hex digits.
    pub fn parse(s: &str) -> Option<Epoch> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// What a payload is: JSON text (from JSON clients and the HTTP API) or opaque bytes (from
/// binary clients). Each encoder renders both kinds (see docs/protocol.md).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DataKind {
    /// Valid JSON text without raw line breaks.
    Json,
    /// Any bytes.
    Binary,
}

/// A position in a channel's stream: the last sequence ID seen, in an epoch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StreamPosition {
    /// The sequence space.
    pub epoch: Epoch,
    /// The last sequence ID seen (0 before the first message).
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_rules() {
        assert!(ChannelName::new("room:1").is_ok());
        assert!(ChannelName::new("a-b_c.d@e/f=g+h!i~j$k").is_ok());
        assert_eq!(ChannelName::new(""), Err(ChannelNameError::Empty));
        assert_eq!(
            ChannelName::new(&"a".repeat(201)),
            Err(ChannelNameError::TooLong)
        );
        assert!(ChannelName::new(&"a".repeat(200)).is_ok());
        for bad in ["a b", "a\"b", "a*", "a,b", "é", "a\\b", "a\nb", "a#b"] {
            assert_eq!(
                ChannelName::new(bad),
                Err(ChannelNameError::BadCharacter),
                "{bad}"
            );
        }
    }

    #[test]
    fn epoch_round_trip() {
        let e = Epoch(0x9f2c_61d3_a0b4_e5f7);
        assert_eq!(Epoch::parse(&e.to_string()), Some(e));
        assert_eq!(Epoch::parse(""), None);
        assert_eq!(Epoch::parse("xyz"), None);
        assert_eq!(Epoch::parse("12345678901234567"), None);
    }
}

/// Longest presence user id.
pub const MAX_USER_LEN: usize = 256;
/// Largest presence info object.
pub const MAX_INFO_LEN: usize = 4096;

/// Longest publish `idempotency_key`, in bytes (the engine keeps keys this long; the wire
/// codecs refuse longer ones).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// Most shards an engine serves (the dirty mask is one `u64`).
pub const MAX_SHARDS: usize = 64;

/// Bit set of shard indexes.
pub type ShardMask = u64;

/// What happens to a subscriber whose connection cannot take a channel's messages as fast as
/// they come (its outbox is full).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Close the connection (4008); the client resumes from its last seq.
    #[default]
    Disconnect,
    /// Skip messages and tell the client the range it missed (a gap notice) before the next one.
    Drop,
    /// Keep only the latest message of the channel for that client.
    Conflate,
}

impl SlowPolicy {
    /// Parses `disconnect`, `drop` or `conflate`.
    pub fn parse(s: &str) -> Option<SlowPolicy> {
        match s {
            "disconnect" => Some(SlowPolicy::Disconnect),
            "drop" => Some(SlowPolicy::Drop),
            "conflate" => Some(SlowPolicy::Conflate),
            _ => None,
        }
    }
}

/// Why a resume position could not be recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The channel's history started afresh since.
    EpochChanged,
    /// The history no longer holds the message after the position (or the position is ahead).
    HistoryExpired,
    /// The history held it, but memory pressure evicted it (see `--max-memory`).
    Evicted,
}

impl GapReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::EpochChanged => "epoch_changed",
            GapReason::HistoryExpired => "history_expired",
            GapReason::Evicted => "evicted",
        }
    }
}

/// splitmix64 of `seed + n` (for ids and epochs outside the engine).
pub fn mix_public(seed: u64, n: u64) -> u64 {
    mix(seed, n)
}

/// splitmix64 of `seed + n`.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shard indexes set in `mask`.
pub fn mask_iter(mut mask: ShardMask) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        Some(i)
    })
}

/// Parses `65536`, `64KiB`, `64k`, `1MiB`, `1MB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 65536 or 64KiB)"))?;
    let mul: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}
