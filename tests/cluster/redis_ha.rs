//! Redis deployments of several processes for the cluster tests: a Redis Cluster (three masters,
//! optionally a replica each) and a Sentinel setup (a master, a replica, three Sentinels), all
//! on free loopback ports, made with `redis-cli`, killed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{default_args, free_port, Backend, Kind, Server};

/// `redis-cli -p port args…`, its stdout (empty when it cannot connect). Bounded: a local
/// server answers or refuses at once; a stuck call is killed after 10 s.
pub fn cli(port: u16, args: &[&str]) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli (package redis-tools) is installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until `ok()` holds, at most `within`; panics with `what` otherwise.
pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the replica of the master at `port` acknowledged the master's whole replication
/// stream as it is now (replicas acknowledge every second).
pub fn wait_replicated(port: u16) {
    let field = |info: &str, key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let target = field(&cli(port, &["info", "replication"]), "master_repl_offset:");
    wait_until(
        "the replica acknowledges every write",
        Duration::from_secs(10),
        || {
            let info = cli(port, &["info", "replication"]);
            info.lines()
                .filter(|l| l.starts_with("slave0:"))
                .flat_map(|l| l.split(','))
                .find_map(|kv| kv.strip_prefix("offset="))
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|acked| acked >= target)
        },
    );
}

/// A Redis Cluster: three masters and, with `replicas`, one replica each.
pub struct Cluster {
    pub nodes: Vec<Server>,
}

impl Cluster {
    pub fn start(replicas: bool) -> Cluster {
        let count = if replicas { 6 } else { 3 };
        let nodes: Vec<Server> = (0..count)
            .map(|_| {
                Server::start_with(Kind::Redis, |port, dir| {
                    let mut args = default_args(Kind::Redis, port, dir);
                    for a in [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &free_port().to_string(),
                        "--cluster-config-file",
                        dir.join("nodes.conf").to_str().unwrap(),
                    ] {
                        args.push(a.to_owned());
                    }
                    args
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&addrs);
        if replicas {
            create.args(["--cluster-replicas", "1"]);
        }
        let mut child = create
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        wait_until(
            "redis-cli --cluster create ends",
            Duration::from_secs(30),
            || child.try_wait().unwrap().is_some(),
        );
        let c = Cluster { nodes };
        wait_until(
            "every cluster node sees the cluster ok",
            Duration::from_secs(30),
            || {
                c.nodes.iter().all(|n| {
                    cli(n.port, &["cluster", "info"]).contains("cluster_state:ok")
                        && (!replicas
                            || cli(n.port, &["cluster", "nodes"])
                                .lines()
                                .filter(|l| l.contains("slave") && l.contains("connected"))
                                .count()
                                == 3)
                })
            },
        );
        if replicas {
            wait_until("every replica in sync", Duration::from_secs(30), || {
                c.nodes.iter().all(|n| {
                    let info = cli(n.port, &["info", "replication"]);
                    !info.contains("role:slave") || info.contains("master_link_status:up")
                })
            });
        }
        c
    }

    /// A live node's port (to ask the cluster something).
    fn any(&self) -> u16 {
        self.nodes.iter().find(|n| n.is_running()).unwrap().port
    }

    /// The index in `nodes` of the master serving `key` now (none during a failover).
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let slot: u16 = cli(self.any(), &["cluster", "keyslot", key])
            .parse()
            .unwrap();
        for line in cli(self.any(), &["cluster", "nodes"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let owns = f[8..].iter().any(|r| {
                let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let port: u16 = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
                return self.nodes.iter().position(|n| n.port == port);
            }
        }
        None
    }

    /// Waits until every write the master `i` took reached its replica.
    pub fn wait_replicated(&self, i: usize) {
        wait_replicated(self.nodes[i].port);
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }
}

impl Backend for Cluster {
    fn flags(&self) -> Vec<String> {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        vec![
            "--backplane".into(),
            "redis".into(),
            "--redis-url".into(),
            format!("redis-cluster://{}", seeds.join(",")),
        ]
    }
}

/// The master's name in the Sentinels' configuration.
pub const MASTER: &str = "relaymaster";

/// A Sentinel watching the master at `master` as [`MASTER`] (quorum 2).
pub fn sentinel_of(master: u16) -> Server {
    Server::start_with(Kind::Redis, |port, dir| {
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 5000\n",
                dir.display()
            ),
        )
        .unwrap();
        vec![conf.to_str().unwrap().to_owned(), "--sentinel".into()]
    })
}

/// A master, its replica and three Sentinels (quorum 2) watching it.
pub struct Sentinel {
    pub master: Server,
    pub replica: Server,
    pub sentinels: Vec<Server>,
}

impl Sentinel {
    pub fn start() -> Sentinel {
        let master = Server::start(Kind::Redis);
        let mport = master.port.to_string();
        let replica = Server::start_with(Kind::Redis, |port, dir| {
            let mut args = default_args(Kind::Redis, port, dir);
            args.extend(["--replicaof".into(), "127.0.0.1".into(), mport.clone()]);
            args
        });
        let sentinels = (0..3).map(|_| sentinel_of(master.port)).collect();
        let s = Sentinel {
            master,
            replica,
            sentinels,
        };
        wait_until("the replica in sync", Duration::from_secs(20), || {
            cli(s.replica.port, &["info", "replication"]).contains("master_link_status:up")
        });
        // A failover needs a majority of Sentinels that know each other and the replica.
        wait_until(
            "every Sentinel knows the others and the replica",
            Duration::from_secs(30),
            || {
                s.sentinels.iter().all(|x| {
                    let info = cli(x.port, &["info", "sentinel"]);
                    info.contains("slaves=1") && info.contains("sentinels=3")
                })
            },
        );
        s
    }

    /// The port of the master the Sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        let x = self.sentinels.iter().find(|x| x.is_running())?;
        let out = cli(x.port, &["sentinel", "get-master-addr-by-name", MASTER]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Waits until every write the master took reached the replica.
    pub fn wait_replicated(&self) {
        wait_replicated(self.master.port);
    }

    /// SIGKILLs the master and waits until the Sentinels have promoted the replica.
    pub fn fail_over(&mut self) {
        self.master.kill();
        let replica = self.replica.port;
        wait_until(
            "the Sentinels promote the replica",
            Duration::from_secs(30),
            || self.master_port() == Some(replica),
        );
    }

    /// The flags with `master` as the master's name.
    pub fn flags_for(&self, master: &str) -> Vec<String> {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|x| format!("127.0.0.1:{}", x.port))
            .collect();
        vec![
            "--backplane".into(),
            "redis".into(),
            "--redis-url".into(),
            format!("redis-sentinel://{}/{master}", addrs.join(",")),
        ]
    }
}

impl Backend for Sentinel {
    fn flags(&self) -> Vec<String> {
        self.flags_for(MASTER)
    }
}
