//! Several relay processes on one backplane server (`--backplane nats`): one order and one seq
//! space per channel across nodes, resume on another node after a SIGKILL, a server outage
//! mid-stream, cross-node presence. Each test starts its own server on a free loopback port
//! and kills it when done (scenarios in `tests/cluster/mod.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod common;

use cluster::Kind;

const KIND: Kind = Kind::Nats;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_in_one_order_with_one_seq_space() {
    if KIND.available() {
        cluster::three_nodes_deliver_every_message_in_one_order_with_one_seq_space(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_different_nodes_make_no_gaps_or_repeats() {
    if KIND.available() {
        cluster::concurrent_publishers_on_different_nodes_make_no_gaps_or_repeats(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_from_one_connection_reach_two_nodes_in_order() {
    if KIND.available() {
        cluster::pipelined_publishes_from_one_connection_reach_two_nodes_in_order(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_channel_is_sequenced_without_loss_or_repeat() {
    if KIND.available() {
        cluster::a_burst_on_one_channel_is_sequenced_without_loss_or_repeat(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_listed_by_a_node_without_subscribers_of_the_channel() {
    if KIND.available() {
        cluster::presence_is_listed_by_a_node_without_subscribers_of_the_channel(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_after_its_node_is_killed() {
    if KIND.available() {
        cluster::a_client_resumes_on_another_node_after_its_node_is_killed(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats() {
    if KIND.available() {
        cluster::server_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats(
            KIND, false,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_nodes_members_leave_within_the_timeout() {
    if KIND.available() {
        cluster::presence_spans_nodes_and_a_killed_nodes_members_leave_within_the_timeout(
            &cluster::Server::start(KIND),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_without_its_data_nodes_start_new_epochs_and_say_recovered_false() {
    if KIND.available() {
        cluster::server_killed_and_restarted_mid_stream_nodes_recover_without_loss_or_repeats(
            KIND, true,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_sent_once_per_cluster_and_a_killed_nodes_holds_are_settled() {
    if KIND.available() {
        cluster::webhooks_are_sent_once_per_cluster_and_a_killed_nodes_holds_are_settled(KIND)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_command_sent_through_one_node_acts_on_every_node() {
    if KIND.available() {
        cluster::a_user_command_sent_through_one_node_acts_on_every_node(KIND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_publish_retried_on_every_node_at_once_is_published_once() {
    if KIND.available() {
        cluster::an_idempotent_publish_retried_on_every_node_at_once_is_published_once(KIND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writers_on_different_nodes_win_once_per_seq() {
    if KIND.available() {
        cluster::conditional_writers_on_different_nodes_win_once_per_seq(KIND).await;
    }
}
