//! A Pusher app's settings (`--pusher-app ID:KEY:SECRET[:OPTION=VALUE…]`): plain data that
//! `config` parses and checks and `protocol::pusher` serves. Here, below both, so that the
//! configuration does not depend on a wire protocol.

/// Longest app id (so that the longest relay name, `pusher/ID/~user-` plus a channel, fits
/// relay's 200 bytes).
pub const MAX_APP_ID_LEN: usize = 24;

/// One Pusher app: its credentials and limits (`--pusher-app`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct App {
    /// The app id (HTTP API paths, relay channel prefix).
    pub id: String,
    /// The public key clients connect with (`/app/KEY`).
    pub key: String,
    /// The secret that signs channel auth, sign-in, API requests and webhooks.
    pub secret: String,
    /// Whether clients may send `client-` events (on private and presence channels).
    pub client_events: bool,
    /// Most connections of the app on this node (0: no limit beyond the node's).
    pub max_connections: usize,
    /// Largest event `data`, bytes (Pusher: 10 KiB).
    pub max_event_bytes: usize,
    /// Most channels one HTTP API event names (Pusher: 100).
    pub max_channels_per_event: usize,
    /// Most events in one `batch_events` (Pusher: 10).
    pub max_batch: usize,
    /// Client events per second per connection (Pusher: 10).
    pub client_event_rate: u32,
}

impl App {
    /// An app with Pusher's default limits.
    pub fn new(id: &str, key: &str, secret: &str) -> App {
        App {
            id: id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
            client_events: false,
            max_connections: 0,
            max_event_bytes: 10 * 1024,
            max_channels_per_event: 100,
            max_batch: 10,
            client_event_rate: 10,
        }
    }
}

/// `check-config` prints an app without its secret.
impl serde::Serialize for App {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "{}:{}:<hidden>:client_events={}:max_connections={}:max_event_bytes={}:\
             max_channels_per_event={}:max_batch={}:client_event_rate={}",
            self.id,
            self.key,
            self.client_events,
            self.max_connections,
            self.max_event_bytes,
            self.max_channels_per_event,
            self.max_batch,
            self.client_event_rate
        ))
    }
}

/// Parses `ID:KEY:SECRET[:OPTION=VALUE…]` (options: `client_events=true|false`,
/// `max_connections=N`, `max_event_bytes=BYTES`, `max_channels_per_event=N`, `max_batch=N`,
/// `client_event_rate=N`).
pub fn parse_app(s: &str) -> Result<App, String> {
    let mut parts = s.trim().split(':');
    let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected ID:KEY:SECRET[:OPTION=VALUE…]".into());
    };
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if id.is_empty() || id.len() > MAX_APP_ID_LEN || !id.bytes().all(word) {
        return Err(format!(
            "app id {id:?}: 1 to {MAX_APP_ID_LEN} characters from A-Z a-z 0-9 - _"
        ));
    }
    if key.is_empty() || key.len() > 64 || !key.bytes().all(word) {
        return Err(format!(
            "app key {key:?}: 1 to 64 characters from A-Z a-z 0-9 - _"
        ));
    }
    if secret.len() < 8 {
        return Err(format!("app {id}: the secret must be at least 8 bytes"));
    }
    let mut app = App::new(id, key, secret);
    for opt in parts {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("app {id}: option {opt:?} is not NAME=VALUE"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("app {id}: {k}={v:?} is not a number"))
        };
        match k {
            "client_events" => {
                app.client_events = match v {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    _ => {
                        return Err(format!(
                            "app {id}: client_events={v:?} is not true or false"
                        ))
                    }
                }
            }
            "max_connections" => app.max_connections = num(v)?,
            "max_event_bytes" => {
                app.max_event_bytes =
                    super::parse_bytes(v).map_err(|e| format!("app {id}: max_event_bytes: {e}"))?
            }
            "max_channels_per_event" => app.max_channels_per_event = num(v)?.max(1),
            "max_batch" => app.max_batch = num(v)?.max(1),
            "client_event_rate" => {
                app.client_event_rate = u32::try_from(num(v)?).unwrap_or(u32::MAX)
            }
            _ => return Err(format!("app {id}: unknown option {k:?}")),
        }
    }
    Ok(app)
}
