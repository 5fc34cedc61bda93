//! Leaf value types shared by every layer: channel names, epochs and stream positions.

use std::fmt;
use std::sync::Arc;

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
