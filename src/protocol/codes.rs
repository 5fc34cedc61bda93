//! One catalogue of what a client can be told went wrong: the WebSocket close codes and the
//! error codes of relay's protocol (docs/protocol.md), and the close codes of the Pusher
//! protocol (docs/pusher.md). A code is defined once, here or in the codec it belongs to, and
//! listed here; the tests check that every listed code is documented, and `tests/codes.rs`
//! that the transports answer only with listed error codes.

pub use super::ws::{
    CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_INVALID_PAYLOAD, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR,
    CLOSE_RESTART, CLOSE_SLOW_CONSUMER, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN,
};

/// Close code: no valid token (a bad `auth` command, or none within `--auth-timeout`).
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code: the token expired and no `refresh` came within `--auth-timeout`.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4003;
/// Close code: disconnected by the server API; the client may reconnect.
pub const CLOSE_DISCONNECTED: u16 = 4010;
/// Close code: disconnected by the server API for good; the client must not reconnect.
pub const CLOSE_DISCONNECTED_FOR_GOOD: u16 = 4011;
/// Close code: inbound messages persistently over `--rate-limit`.
pub const CLOSE_RATE_LIMITED: u16 = 4029;
/// Close code: the connect proxy refused the connection without naming a code.
pub const CLOSE_FORBIDDEN: u16 = 4403;

/// Every close code relay's WebSocket protocol sends (`/ws`).
pub const CLOSE_CODES: &[u16] = &[
    CLOSE_NORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_TOO_BIG,
    CLOSE_INTERNAL,
    CLOSE_RESTART,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_DISCONNECTED,
    CLOSE_DISCONNECTED_FOR_GOOD,
    CLOSE_RATE_LIMITED,
    CLOSE_FORBIDDEN,
];

/// Every error code of relay's protocol: the `code` of a WebSocket `error` event, and of an
/// HTTP error body `{"error":{"code",…}}`.
pub const ERROR_CODES: &[&str] = &[
    "bad_request",
    "bad_json",
    "bad_frame",
    "unknown_type",
    "unsupported_version",
    "unsupported_frame",
    "invalid_channel",
    "unauthorized",
    "forbidden",
    "forbidden_origin",
    "already_subscribed",
    "not_subscribed",
    "too_many_subscriptions",
    "presence_full",
    "presence_disabled",
    "overloaded",
    "unavailable",
    "rate_limited",
    "seq_mismatch",
    "not_found",
];

/// Every close code the Pusher protocol sends (`/app/KEY`).
pub const PUSHER_CLOSE_CODES: &[u16] = {
    use super::pusher::code::*;
    &[
        APP_NOT_FOUND,
        OVER_QUOTA,
        BAD_VERSION,
        UNSUPPORTED_PROTOCOL,
        NO_PROTOCOL,
        UNAUTHORIZED,
        OVER_CAPACITY,
        RECONNECT,
        PONG_TIMEOUT,
        TERMINATED,
        CLIENT_EVENT_REJECTED,
        BAD_MESSAGE,
    ]
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A document of the repository (read, not embedded: the binary carries only what it
    /// serves, and deploy/Dockerfile copies what is embedded).
    fn doc(name: &str) -> String {
        let path = format!("{}/docs/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn every_close_code_is_in_the_protocol_document() {
        let protocol_md = doc("protocol.md");
        for c in CLOSE_CODES {
            assert!(
                protocol_md.contains(&format!("| {c} |")),
                "close code {c} is not in docs/protocol.md's table"
            );
        }
    }

    #[test]
    fn every_error_code_is_in_the_protocol_document() {
        let protocol_md = doc("protocol.md");
        for c in ERROR_CODES {
            assert!(
                protocol_md.contains(&format!("`{c}`")),
                "error code `{c}` is not in docs/protocol.md"
            );
        }
    }

    #[test]
    fn every_pusher_close_code_is_in_the_pusher_document() {
        let pusher_md = doc("pusher.md");
        for c in PUSHER_CLOSE_CODES {
            assert!(
                pusher_md.contains(&c.to_string()),
                "Pusher close code {c} is not in docs/pusher.md"
            );
        }
    }

    #[test]
    fn the_catalogue_names_each_code_once() {
        let mut close = CLOSE_CODES.to_vec();
        close.sort_unstable();
        close.dedup();
        assert_eq!(close.len(), CLOSE_CODES.len());
        let mut errors = ERROR_CODES.to_vec();
        errors.sort_unstable();
        errors.dedup();
        assert_eq!(errors.len(), ERROR_CODES.len());
    }
}
