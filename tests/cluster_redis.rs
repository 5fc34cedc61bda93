//! Several relay processes on one backplane server (`--backplane redis`): one order and one seq
//! space per channel across nodes, resume on another node after a SIGKILL, a server outage
//! mid-stream, cross-node presence. Each test starts its own server on a free loopback port
//! and kills it when done (scenarios in `tests/cluster/mod.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use cluster::Kind;

const KIND: Kind = Kind::Redis;

cluster::every_backplane_runs!(KIND);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats() {
    if KIND.available() {
        cluster::server_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats(
            KIND, false,
        )
        .await;
    }
}
