//! Which nodes share the backplane, for the admin UI: each node announces a small status record
//! every [`ANNOUNCE_EVERY`] and keeps the records of the others it saw within
//! [`FORGET_AFTER`].
//!
//! It runs on its own thread and connection, apart from the backplane proper: it never touches
//! a channel, the hot path or the backplane's connection, and a node without the admin UI does
//! not run it. Its names are outside every client channel's space:
//! - Redis: `relay:admin:node:<id>` (the record, expiring after [`FORGET_AFTER`]) and the set
//!   `relay:admin:nodes` of ids (an id whose record expired is removed by the next reader);
//!   channel keys are `relay:{<channel>}:…` and `relay:msg:<channel>` (pub/sub).
//! - NATS: core subject `relay.admin.nodes` (channels are `relay.log.<hex>` and
//!   `relay.msg.<hex>`).
//!
//! **Invariant:** a node that stops announcing (killed, partitioned) leaves every roster within
//! [`FORGET_AFTER`] plus one announce period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How often a node announces itself (and, with Redis, reads the others).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// A node not heard from for this long is gone.
pub const FORGET_AFTER: Duration = Duration::from_secs(10);
/// Most nodes a roster keeps (announcements past it are ignored until some are forgotten).
pub const MAX_NODES: usize = 1024;

const REDIS_SET: &str = "relay:admin:nodes";
const NATS_SUBJECT: &str = "relay.admin.nodes";

/// Where the roster lives.
pub enum Target {
    /// A Redis server URL.
    Redis(String),
    /// A NATS server URL.
    Nats(String),
}

/// This node's status record, built when announced; `None` once the node is gone.
pub type Record = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The nodes seen lately. See the module docs.
pub struct Roster {
    seen: Mutex<HashMap<String, (String, Instant)>>,
}

impl Roster {
    /// Starts announcing `record` as node `id` on `target` until `stop`, on a thread of its own.
    pub fn start(
        target: Target,
        id: String,
        record: Record,
        stop: CancellationToken,
    ) -> std::io::Result<Arc<Roster>> {
        let roster = Arc::new(Roster {
            seen: Mutex::new(HashMap::new()),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = roster.clone();
        std::thread::Builder::new()
            .name("relay-roster".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut logged = false;
                    while !stop.is_cancelled() {
                        let run = match &target {
                            Target::Redis(url) => redis(&r, url, &id, &record, &stop).await,
                            Target::Nats(url) => nats(&r, url, &record, &stop).await,
                        };
                        if let Err(e) = run {
                            // The backplane's own supervisor reports outages; say this once.
                            if !logged {
                                tracing::warn!(error = %e, "admin roster: backplane unreachable; retrying");
                                logged = true;
                            }
                        }
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(ANNOUNCE_EVERY) => {}
                        }
                    }
                });
            })?;
        Ok(roster)
    }

    /// The nodes seen within [`FORGET_AFTER`]: `(id, record)`, by id.
    pub fn peers(&self) -> Vec<(String, String)> {
        let now = crate::types::now();
        let mut seen = self.seen.lock();
        seen.retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_AFTER);
        let mut out: Vec<(String, String)> = seen
            .iter()
            .map(|(id, (rec, _))| (id.clone(), rec.clone()))
            .collect();
        out.sort();
        out
    }

    fn saw(&self, id: String, record: String, now: Instant) {
        let mut seen = self.seen.lock();
        if seen.len() < MAX_NODES || seen.contains_key(&id) {
            seen.insert(id, (record, now));
        }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Announces and reads over Redis until `stop` or an error.
async fn redis(
    roster: &Roster,
    url: &str,
    id: &str,
    record: &Record,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    use fred::prelude::{Builder, ClientLike, Expiration, KeysInterface, SetsInterface};
    let target = super::redis::Target::parse(url)?;
    let client = Builder::from_config(target.config).build()?;
    let conn = client.init().await?;
    let key = |id: &str| format!("relay:admin:node:{id}");
    let result: Result<(), Failure> = async {
        loop {
            let Some(rec) = record() else { return Ok(()) };
            let px = Expiration::PX(FORGET_AFTER.as_millis() as i64);
            let () = client.set(key(id), rec, Some(px), None, false).await?;
            let () = client.sadd(REDIS_SET, id).await?;
            let ids: Vec<String> = client.smembers(REDIS_SET).await?;
            // What Redis holds is the roster: a record that expired is a node gone.
            let mut live = HashMap::new();
            for other in ids.into_iter().take(MAX_NODES) {
                let rec: Option<String> = client.get(key(&other)).await?;
                match rec {
                    Some(rec) => {
                        live.insert(other, (rec, crate::types::now()));
                    }
                    None => {
                        let () = client.srem(REDIS_SET, other).await?;
                    }
                }
            }
            *roster.seen.lock() = live;
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(ANNOUNCE_EVERY) => {}
            }
        }
    }
    .await;
    let _ = client.quit().await;
    conn.abort();
    result
}

/// Announces and listens over NATS until `stop` or an error.
async fn nats(
    roster: &Roster,
    url: &str,
    record: &Record,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    use futures_util::StreamExt;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(url)
        .await?;
    let mut sub = client.subscribe(NATS_SUBJECT).await?;
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let Some(rec) = record() else { return Ok(()) };
                client.publish(NATS_SUBJECT, rec.into()).await?;
            }
            m = sub.next() => {
                let Some(m) = m else { return Err("subscription ended".into()) };
                let rec = String::from_utf8_lossy(&m.payload).into_owned();
                let id = serde_json::from_str::<serde_json::Value>(&rec)
                    .ok()
                    .and_then(|v| v["node"].as_str().map(str::to_owned));
                if let Some(id) = id {
                    roster.saw(id, rec, crate::types::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_not_heard_from_is_forgotten_after_the_timeout() {
        let r = Roster {
            seen: Mutex::new(HashMap::new()),
        };
        let now = Instant::now();
        r.saw("a".into(), "{}".into(), now);
        r.saw("b".into(), "{}".into(), now - FORGET_AFTER);
        let ids: Vec<String> = r.peers().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a"]);
    }
}
