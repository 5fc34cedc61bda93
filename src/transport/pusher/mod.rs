//! Pusher Channels on the relay engine: the client protocol on `/app/KEY` ([`ws`]) and the HTTP
//! API on `/apps/ID/…` ([`api`]), for the apps of `--pusher-app`. The wire format and the
//! signatures are in [`crate::protocol::pusher`]; channels, sequencing, history, presence and
//! fan-out are the engine's, shared with relay-protocol clients (a Pusher subscriber is a hub
//! subscriber reading the [`crate::protocol::ENC_PUSHER`] frame of each publication).

pub mod api;
pub mod ws;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::Config;
use crate::protocol::pusher::{self as wire, App, PRESENCE_PATTERN};
use crate::webhooks::{ChannelFilter, Event, Format, Hook};

/// The presence patterns of the engine: the configured ones, plus every app's `presence-`
/// channels when there are apps.
pub fn presence_patterns(config: &Config) -> Vec<String> {
    let mut patterns = config.presence_channels.clone();
    if !config.pusher_app.is_empty() && !patterns.iter().any(|p| p == PRESENCE_PATTERN) {
        patterns.push(PRESENCE_PATTERN.to_owned());
    }
    patterns
}

/// One app and its live connection count on this node.
pub struct AppState {
    /// Its settings.
    pub app: App,
    conns: AtomicUsize,
}

/// The node's Pusher apps, shared by the shards.
pub struct Registry {
    apps: Vec<AppState>,
    /// Signed-in connections by (app index, user id): each one's tag and the notice that ends
    /// it (`terminate_connections`). One entry per signed-in connection, removed when it ends.
    users: Mutex<HashMap<UserKey, Vec<SignedIn>>>,
}

/// (app index, user id).
type UserKey = (usize, Arc<str>);
/// A signed-in connection: its tag and the notice that ends it.
type SignedIn = (u64, Arc<Notify>);

/// A connection counted against its app's `max_connections` until dropped.
pub struct ConnSlot {
    registry: Arc<Registry>,
    app: usize,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(a) = self.registry.apps.get(self.app) {
            a.conns.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Registry {
    /// The registry of `apps`.
    pub fn new(apps: &[App]) -> Registry {
        Registry {
            apps: apps
                .iter()
                .map(|a| AppState {
                    app: a.clone(),
                    conns: AtomicUsize::new(0),
                })
                .collect(),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// The app at `index`.
    pub fn app(&self, index: usize) -> Option<&App> {
        self.apps.get(index).map(|a| &a.app)
    }

    /// The index of the app with key `key`.
    pub fn by_key(&self, key: &str) -> Option<usize> {
        self.apps.iter().position(|a| a.app.key == key)
    }

    /// The index of the app with id `id`.
    pub fn by_id(&self, id: &str) -> Option<usize> {
        self.apps.iter().position(|a| a.app.id == id)
    }

    /// A connection slot of app `index`; `None` past its `max_connections`.
    pub fn connect(self: &Arc<Self>, index: usize) -> Option<ConnSlot> {
        let a = self.apps.get(index)?;
        let n = a.conns.fetch_add(1, Ordering::Relaxed);
        let slot = ConnSlot {
            registry: self.clone(),
            app: index,
        };
        (a.app.max_connections == 0 || n < a.app.max_connections).then_some(slot)
    }

    /// Connections of app `index` on this node.
    pub fn connections(&self, index: usize) -> usize {
        self.apps
            .get(index)
            .map_or(0, |a| a.conns.load(Ordering::Relaxed))
    }

    /// Records connection `tag` as signed in as `user` of app `index`.
    pub fn sign_in(&self, index: usize, user: Arc<str>, tag: u64, kill: Arc<Notify>) {
        self.users
            .lock()
            .entry((index, user))
            .or_default()
            .push((tag, kill));
    }

    /// Forgets connection `tag`'s sign-in.
    pub fn sign_out(&self, index: usize, user: &Arc<str>, tag: u64) {
        let mut users = self.users.lock();
        let key = (index, user.clone());
        if let Some(v) = users.get_mut(&key) {
            v.retain(|(t, _)| *t != tag);
            if v.is_empty() {
                users.remove(&key);
            }
        }
    }

    /// Ends every connection signed in as `user` of app `index`; returns how many.
    pub fn terminate(&self, index: usize, user: &str) -> usize {
        let users = self.users.lock();
        let Some(v) = users.get(&(index, Arc::from(user))) else {
            return 0;
        };
        for (_, kill) in v {
            kill.notify_one();
        }
        v.len()
    }
}

/// The decoded `key=value` pairs of a query string (`+` is a space, as form encoding has it).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Pusher's webhook format for one app: the body `{"time_ms":…,"events":[…]}` with Pusher's
/// event shapes and the app's channel names, `X-Pusher-Key: KEY` and `X-Pusher-Signature:` the
/// hex HMAC-SHA256 of the body with the app's secret (what `pusher.webhook(req)` of the
/// server libraries checks). Pusher events carry no id: a retry repeats the same body.
pub struct PusherFormat {
    app: App,
}

impl PusherFormat {
    /// The format of `app`'s hooks.
    pub fn new(app: App) -> Self {
        Self { app }
    }
}

impl Format for PusherFormat {
    fn body(&self, events: &[Event], now_ms: u64) -> bytes::Bytes {
        let events: Vec<wire::WebhookEvent<'_>> = events
            .iter()
            .map(|e| wire::WebhookEvent {
                name: e.kind.as_str(),
                channel: e.channel.as_str(),
                user_id: e.user.as_deref(),
                client: e
                    .client
                    .as_ref()
                    .map(|c| (&*c.event, &*c.data, &*c.socket_id)),
            })
            .collect();
        // The hook's scope keeps other apps' channels out; an empty list is still a valid body.
        wire::webhook_body(&self.app, &events, now_ms).unwrap_or_else(|| {
            bytes::Bytes::from(format!("{{\"time_ms\":{now_ms},\"events\":[]}}"))
        })
    }

    fn headers(&self, body: &[u8], _now_ms: u64) -> Vec<(hyper::header::HeaderName, String)> {
        use hyper::header::HeaderName;
        vec![
            (
                HeaderName::from_static("x-pusher-key"),
                self.app.key.clone(),
            ),
            (
                HeaderName::from_static("x-pusher-signature"),
                wire::webhook_signature(&self.app, body),
            ),
        ]
    }
}

/// The hooks of `--pusher-webhook`: each in Pusher's format, signed with its app's key and
/// secret, hearing only of that app's channels.
pub fn webhooks(config: &Config) -> Result<Vec<Hook>, String> {
    config
        .pusher_webhooks()?
        .into_iter()
        .map(|(app, spec)| {
            let spec = crate::webhooks::parse_hook_spec(spec)
                .map_err(|e| format!("app {}: {e}", app.id))?;
            let scope = format!("{}{}/", wire::PREFIX, app.id);
            // A user's channel is `~user-U` below the scope (see `wire::relay_channel`).
            let patterns = spec
                .patterns
                .into_iter()
                .map(|p| match p.strip_prefix(wire::USER_CHANNEL) {
                    Some(rest) => format!("{}{rest}", wire::RELAY_USER),
                    None => p,
                })
                .collect();
            Ok(Hook {
                url: spec.url,
                events: spec.events,
                channels: ChannelFilter {
                    scope: Some(scope),
                    patterns,
                },
                format: std::sync::Arc::new(PusherFormat::new(app.clone())),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pusher_hook_hears_of_its_apps_channels_only_by_their_pusher_names() {
        let config = Config {
            pusher_app: vec![App::new("app1", "key1", "secret-one-1234")],
            pusher_webhook: vec![
                "app1:http://h/all".into(),
                "app1:;private-*;#server-to-user-*@http://h/some".into(),
            ],
            ..Config::default()
        };
        let hooks = webhooks(&config).unwrap();
        let all = &hooks[0].channels;
        assert!(all.matches("pusher/app1/news") && all.matches("pusher/app1/~user-7"));
        assert!(!all.matches("pusher/app10/news") && !all.matches("news"));
        let some = &hooks[1].channels;
        assert!(some.matches("pusher/app1/private-x") && some.matches("pusher/app1/~user-7"));
        assert!(!some.matches("pusher/app1/news") && !some.matches("pusher/app2/private-x"));
    }
}
