#!/usr/bin/env bash
# One relay node on a backplane server, loaded by relay-bench (issue 17): the same scenario in
# memory mode and through Redis or NATS, back to back.
#
#   cargo build --release -p relay -p relay-bench
#   bash benches/backplane.sh MODE SCENARIO [relay-bench args...]
#   bash benches/backplane.sh redis max --subs 1000 --start-rate 100 --duration 3s
#   bash benches/backplane.sh nats fanout --subs 100 --rate 5000 --duration 5s --publish ws
#
# MODE: memory | redis | redis-cluster (three masters, made with redis-cli) | nats. The server (redis-server, nats-server -js) and relay-bench run
# on LOAD_CPU (default 1); the relay runs on RELAY_CPUS (default 0-1: its shard pins itself to
# core 0 with --shards 1, its backplane thread may use core 1, next to the server). Every process
# is started fresh, bounded by `timeout`, and killed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?memory|redis|redis-cluster|nats}
SCENARIO=${2:?a relay-bench scenario (max, fanout, ...)}
shift 2
RELAY=${RELAY_BIN:-target/release/relay}
BENCH=${BENCH_BIN:-target/release/relay-bench}
LOAD_CPU=${LOAD_CPU:-1}
RELAY_CPUS=${RELAY_CPUS:-0-1}
pids=()
SD=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$SD"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

FLAGS=()
case $MODE in
  memory) ;;
  redis)
    BP=$(free_port)
    taskset -c "$LOAD_CPU" redis-server --port "$BP" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
    pids+=($!)
    FLAGS=(--backplane redis --redis-url "redis://127.0.0.1:$BP")
    ;;
  redis-cluster)
    # Three masters, no replicas, all on LOAD_CPU; the channel's keys live on one of them.
    seeds=()
    for _ in 1 2 3; do
      BP=$(free_port)
      mkdir -p "$SD/$BP"
      taskset -c "$LOAD_CPU" redis-server --port "$BP" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$SD/$BP" --cluster-enabled yes --cluster-port "$(free_port)" \
        --cluster-config-file "$SD/$BP/nodes.conf" >/dev/null &
      pids+=($!)
      seeds+=("127.0.0.1:$BP")
    done
    for s in "${seeds[@]}"; do
      for _ in $(seq 1 100); do redis-cli -p "${s#*:}" ping >/dev/null 2>&1 && break; sleep 0.05; done
    done
    timeout 60 redis-cli --cluster create "${seeds[@]}" --cluster-yes >/dev/null
    for _ in $(seq 1 100); do
      redis-cli -p "${seeds[0]#*:}" cluster info | grep -q cluster_state:ok && break
      sleep 0.1
    done
    FLAGS=(--backplane redis --redis-url "redis-cluster://$(IFS=,; echo "${seeds[*]}")")
    ;;
  nats)
    BP=$(free_port)
    taskset -c "$LOAD_CPU" "$(command -v nats-server || echo /usr/sbin/nats-server)" -js -a 127.0.0.1 -p "$BP" -sd "$SD" >/dev/null 2>&1 &
    pids+=($!)
    FLAGS=(--backplane nats --nats-url "nats://127.0.0.1:$BP")
    ;;
  *) echo "MODE: memory, redis, redis-cluster or nats" >&2; exit 2 ;;
esac
P=$(free_port)
RUST_LOG=warn taskset -c "$RELAY_CPUS" "$RELAY" serve --listen "127.0.0.1:$P" --shards 1 --rate-limit 0 "${FLAGS[@]}" >/dev/null 2>"$SD/relay.err" &
RP=$!
pids+=($RP)
for _ in $(seq 1 150); do
  curl -fs "http://127.0.0.1:$P/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "== $MODE: relay-bench $SCENARIO $*"
timeout 900 taskset -c "$LOAD_CPU" "$BENCH" "$SCENARIO" --addr "127.0.0.1:$P" --server-pid "$RP" "$@"
grep -E 'WARN|ERROR' "$SD/relay.err" | head -5 || true
