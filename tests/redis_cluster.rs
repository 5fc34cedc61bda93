//! Relay nodes on a real Redis Cluster (three masters, a replica each when a test fails one
//! over) and on a real Sentinel setup (a master, a replica, three Sentinels): one order and
//! one seq space per channel, resume on another node after a SIGKILL, the Redis master failing
//! over with no message lost, and URLs that name the wrong deployment stopping the node. Every
//! Redis process is started on a free loopback port by the test and killed when it ends
//! (`tests/cluster/redis_ha.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use std::time::Duration;

use cluster::redis_ha::{cli, sentinel_of, Cluster, Sentinel};
use cluster::{Backend, Kind, Server};
use serde_json::json;

const KIND: Kind = Kind::Redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_three_nodes_deliver_every_message_in_one_order_with_one_seq_space() {
    if KIND.available() {
        cluster::three_nodes_deliver_every_message_in_one_order_with_one_seq_space(
            &Cluster::start(false),
        )
        .await;
    }
}

/// Channels whose keys live on different masters are each sequenced and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_channels_on_every_master_are_sequenced_and_delivered() {
    if !KIND.available() {
        return;
    }
    let redis = Cluster::start(false);
    let names: Vec<String> = (0..12).map(|i| format!("spread{i}")).collect();
    let mut masters: Vec<usize> = names
        .iter()
        .map(|n| redis.master_of(&format!("relay:{{{n}}}:meta")).unwrap())
        .collect();
    masters.sort();
    masters.dedup();
    assert_eq!(masters.len(), 3, "the channels span every master");
    let a = cluster::node(&redis, "a", &[]).await;
    let b = cluster::node(&redis, "b", &[]).await;
    let mut ws = common::Ws::connect(&a.ws_url()).await;
    for n in &names {
        ws.subscribe(n).await;
    }
    for round in 1..=2u64 {
        for n in &names {
            let body = b.publish(n, json!({"round": round})).await;
            assert_eq!(body["seq"], round, "{n}: {body}");
        }
    }
    // One order per channel (channels on different masters may interleave).
    let mut got: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.values().map(Vec::len).sum::<usize>() < 2 * names.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(v) = ws.recv_json_within(left).await else {
            panic!("missing messages: {got:?}");
        };
        if v["type"] == "message" {
            assert_eq!(v["data"]["round"], v["seq"], "{v}");
            let ch = v["channel"].as_str().unwrap().to_owned();
            got.entry(ch).or_default().push(v["seq"].as_u64().unwrap());
        }
    }
    for n in &names {
        assert_eq!(got[n], [1, 2], "{n}: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_client_resumes_on_another_node_after_its_node_is_killed() {
    if KIND.available() {
        cluster::a_client_resumes_on_another_node_after_its_node_is_killed(&Cluster::start(false))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_master_failover_loses_no_message() {
    if !KIND.available() {
        return;
    }
    let mut redis = Cluster::start(true);
    cluster::a_master_failover_loses_no_message(&mut redis, |c| {
        let i = c.master_of("relay:{ha}:meta").unwrap();
        c.wait_replicated(i);
        c.kill(i);
        cluster::redis_ha::wait_until(
            "a replica takes over the slot",
            Duration::from_secs(30),
            || c.master_of("relay:{ha}:meta").is_some_and(|m| m != i),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_three_nodes_deliver_every_message_in_one_order_with_one_seq_space() {
    if KIND.available() {
        cluster::three_nodes_deliver_every_message_in_one_order_with_one_seq_space(
            &Sentinel::start(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_a_client_resumes_on_another_node_after_its_node_is_killed() {
    if KIND.available() {
        cluster::a_client_resumes_on_another_node_after_its_node_is_killed(&Sentinel::start())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_a_master_failover_loses_no_message() {
    if !KIND.available() {
        return;
    }
    let mut redis = Sentinel::start();
    cluster::a_master_failover_loses_no_message(&mut redis, |s| {
        s.wait_replicated();
        s.fail_over();
    })
    .await;
}

/// Runs `relay serve` on `flags` and returns its exit code and everything it printed.
fn serve_fails(flags: Vec<String>) -> (Option<i32>, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend(flags.iter().map(String::as_str));
    let out = common::run_bin(&args, &[], Duration::from_secs(20));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_naming_the_wrong_deployment_stops_the_node() {
    if !KIND.available() {
        return;
    }
    let one = Server::start(KIND);
    let url = |u: String| {
        vec![
            "--backplane".to_owned(),
            "redis".into(),
            "--redis-url".into(),
            u,
        ]
    };
    let (code, text) = serve_fails(url(format!("redis-cluster://127.0.0.1:{}", one.port)));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is not a Redis Cluster node"), "{text}");

    let cluster = Cluster::start(false);
    let (code, text) = serve_fails(url(format!("redis://127.0.0.1:{}", cluster.nodes[0].port)));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is a Redis Cluster node"), "{text}");

    let sentinel = sentinel_of(one.port);
    cluster::redis_ha::wait_until("the Sentinel answers", Duration::from_secs(10), || {
        cli(sentinel.port, &["ping"]) == "PONG"
    });
    let s = |master: &str| {
        url(format!(
            "redis-sentinel://127.0.0.1:{}/{master}",
            sentinel.port
        ))
    };
    let (code, text) = serve_fails(s("nosuchmaster"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("knows no master named \"nosuchmaster\""),
        "{text}"
    );
    // A plain server named as a Sentinel.
    let (code, text) = serve_fails(url(format!(
        "redis-sentinel://127.0.0.1:{}/{}",
        one.port,
        cluster::redis_ha::MASTER
    )));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("is not a Redis Sentinel"), "{text}");
    // The right master name starts (and is ready through the Sentinel).
    let flags = s(cluster::redis_ha::MASTER);
    struct Flags(Vec<String>);
    impl Backend for Flags {
        fn flags(&self) -> Vec<String> {
            self.0.clone()
        }
    }
    let r = cluster::node(&Flags(flags), "ok", &[]).await;
    assert_eq!(r.publish("x", json!(1)).await["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_by_redis_is_resumed_with_recovered_false() {
    if KIND.available() {
        cluster::history_lost_by_redis_is_resumed_with_recovered_false(&Server::start(KIND), true)
            .await;
    }
}

/// The same loss seen first by a publish (the nodes did not reconnect): the publishing node
/// knows more of the epoch than Redis, so the message opens the next epoch instead of taking
/// the seq of a lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_by_redis_is_found_by_the_next_publish() {
    if KIND.available() {
        cluster::history_lost_by_redis_is_resumed_with_recovered_false(&Server::start(KIND), false)
            .await;
    }
}

/// A master demoted to a replica while the node stays connected to it (a failover behind one
/// DNS name keeps such connections open) answers writes with `READONLY`: the node does not
/// stay stuck on it; it fails the publish with 503, reconnects, and publishes again once the
/// address is a master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_on_a_demoted_master_reconnects() {
    if !KIND.available() {
        return;
    }
    let one = Server::start(KIND);
    let other = Server::start(KIND);
    let r = cluster::node(&one, "a", &[]).await;
    assert_eq!(r.publish("d", json!(1)).await["seq"], 1);
    let before = r
        .metric(r#"relay_backplane_reconnects_total{backplane="redis"}"#)
        .await;
    let other_port = other.port.to_string();
    assert_eq!(
        cli(one.port, &["replicaof", "127.0.0.1", &other_port]),
        "OK"
    );
    let (status, body) = r
        .post("/api/publish", &json!({"channel": "d", "data": 2}))
        .await;
    assert_eq!(status, 503, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r
        .metric(r#"relay_backplane_reconnects_total{backplane="redis"}"#)
        .await
        <= before
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node reconnects after READONLY"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cli(one.port, &["replicaof", "no", "one"]), "OK");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = r
            .post("/api/publish", &json!({"channel": "d", "data": 3}))
            .await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes again: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
