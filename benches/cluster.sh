#!/usr/bin/env bash
# Cluster benchmark (issue 6): single-node memory mode vs 2 nodes on one Redis.
# Delivered msg/s and publish→deliver latency, measured by relay-bench on loopback.
#
#   cargo build --release -p relay -p relay-bench
#   bash benches/cluster.sh [SUBS] [RATE] [DURATION]
#   BACKPLANE=nats bash benches/cluster.sh ...   # the same on nats-server -js
#
# memory: relay-bench fanout against one node (publish + subscribe on it).
# redis:  two nodes on one redis-server; relay-bench fanout against node B (its publishes go
#         through the Redis script, and its deliveries come back from Redis pub/sub), while a
#         relay-bench `hold` keeps SUBS subscribers on node A on the same channel (Redis fans
#         out to both nodes). Everything bounded; every process is killed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS="${1:-500}"
RATE="${2:-2000}"
DUR="${3:-10s}"
BACKPLANE="${BACKPLANE:-redis}"
BIN=target/release
pids=()
SD=""
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "$SD" ]; then rm -rf "$SD"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_relay() { # port, extra args...
  local port=$1; shift
  RUST_LOG=warn "$BIN/relay" serve --listen "127.0.0.1:$port" --shards 1 --rate-limit 0 "$@" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "relay on $port not ready" >&2; return 1
}

echo "== memory: 1 node, $SUBS subscribers, $RATE msg/s, $DUR"
P1=$(free_port)
start_relay "$P1"
timeout 120 "$BIN/relay-bench" fanout --addr "127.0.0.1:$P1" --subs "$SUBS" --rate "$RATE" --duration "$DUR" --src-ips 1
cleanup; pids=()

echo "== $BACKPLANE: 2 nodes on one server, $SUBS subscribers on each, $RATE msg/s, $DUR"
RP=$(free_port)
if [ "$BACKPLANE" = nats ]; then
  SD=$(mktemp -d)
  NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
  "$NATS" -js -a 127.0.0.1 -p "$RP" -sd "$SD" >/dev/null 2>&1 &
  pids+=($!)
  FLAGS=(--backplane nats --nats-url "nats://127.0.0.1:$RP")
else
  redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  pids+=($!)
  FLAGS=(--backplane redis --redis-url "redis://127.0.0.1:$RP")
fi
sleep 0.5
PA=$(free_port); PB=$(free_port)
start_relay "$PA" "${FLAGS[@]}" --node-id a
start_relay "$PB" "${FLAGS[@]}" --node-id b
HOLD_SECS=$(( ${DUR%s} + 4 ))
timeout 120 "$BIN/relay-bench" hold --addr "127.0.0.1:$PA" --prefix clusterbench --subs "$SUBS" --duration "${HOLD_SECS}s" --src-ips 1 >/tmp/relay-cluster-hold.log 2>&1 &
HOLD=$!
pids+=($HOLD)
sleep 2
timeout 120 "$BIN/relay-bench" fanout --addr "127.0.0.1:$PB" --prefix clusterbench --subs "$SUBS" --rate "$RATE" --duration "$DUR" --src-ips 1
wait "$HOLD" || true
echo "-- node A (relay-bench hold, same channel, subscribers on the other node):"
tail -3 /tmp/relay-cluster-hold.log || true
