#!/usr/bin/env bash
# Cluster benchmark (issue 17 item 5): three nodes on one backplane, subscribers spread over
# them, against one node in memory mode; memory, Redis and NATS side by side.
#
#   cargo build --release -p relay -p relay-bench
#   bash benches/cluster.sh [SUBS] [RATE] [DURATION]      # defaults 300 1000 10s
#   MODES="memory redis" bash benches/cluster.sh ...   # RELAY_BIN, BENCH_BIN: other binaries
#   BENCH_ARGS="--warmup 0s" bash benches/cluster.sh ... # extra relay-bench fanout flags
# The CPU per publish divides the relays' CPU over the whole fanout run by the messages B's
# subscribers received in it: with a relay-bench that warms up first, pass `--warmup 0s`.
#
# memory: one node; relay-bench fanout publishes to it and holds all SUBS subscribers on it.
# redis / nats: nodes A, B, C on one server; SUBS/3 subscribers on each: `relay-bench hold` on
# A and C, `relay-bench fanout` on B, which also takes the publishes (so each message makes the
# full trip: B's publish → the store → every node's ingest → fan-out). relay-bench reports
# deliveries/s and latency of B's subscribers; the holds count what A and C delivered.
# Reported per mode: deliveries/s (all nodes), p50/p99 on B, the relays' CPU per publish (all
# nodes together) and, for a backplane, the bytes the store's process read and wrote per
# message (/proc/PID/io rchar + wchar: the cost of a message crossing the backplane, all nodes'
# traffic included). The cost in µs of crossing the backplane is the CPU per publish minus
# memory mode's. Everything bounded by `timeout`; every process is killed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS="${1:-300}"
RATE="${2:-1000}"
DUR="${3:-10s}"
MODES="${MODES:-memory redis nats}"
BIN=target/release
RELAY=${RELAY_BIN:-$BIN/relay}
BENCH=${BENCH_BIN:-$BIN/relay-bench}
pids=()
SD=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  pids=()
}
trap 'cleanup; rm -rf "$SD"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { # summed utime+stime (clock ticks) of the pids given
  local t=0
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
io_bytes() { awk '/^(rchar|wchar)/ {s += $2} END {print s + 0}' "/proc/$1/io"; }
HZ=$(getconf CLK_TCK)

start_relay() { # port, extra args...; echoes nothing, appends the pid to $relays
  local port=$1; shift
  RUST_LOG=warn "$RELAY" serve --listen "127.0.0.1:$port" --shards 1 --rate-limit 0 "$@" >/dev/null 2>&1 &
  pids+=($!); relays+=($!)
  for _ in $(seq 1 150); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "relay on $port not ready" >&2; return 1
}

summary=()
for MODE in $MODES; do
  relays=(); store=""
  FLAGS=()
  case $MODE in
    memory) ;;
    redis)
      RP=$(free_port)
      redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
      store=$!; pids+=($store)
      FLAGS=(--backplane redis --redis-url "redis://127.0.0.1:$RP")
      ;;
    nats)
      RP=$(free_port)
      mkdir -p "$SD/nats"
      "$(command -v nats-server || echo /usr/sbin/nats-server)" -js -a 127.0.0.1 -p "$RP" -sd "$SD/nats" >/dev/null 2>&1 &
      store=$!; pids+=($store)
      FLAGS=(--backplane nats --nats-url "nats://127.0.0.1:$RP")
      ;;
    *) echo "unknown mode $MODE" >&2; exit 2 ;;
  esac
  sleep 0.5
  PB=$(free_port)
  HOLD_SECS=$(( ${DUR%s} + 6 ))
  holds=()
  if [ "$MODE" = memory ]; then
    start_relay "$PB"
    BSUBS=$SUBS
  else
    PA=$(free_port); PC=$(free_port)
    start_relay "$PA" "${FLAGS[@]}" --node-id a
    start_relay "$PB" "${FLAGS[@]}" --node-id b
    start_relay "$PC" "${FLAGS[@]}" --node-id c
    BSUBS=$(( SUBS / 3 ))
    for P in $PA $PC; do
      timeout 180 "$BENCH" hold --addr "127.0.0.1:$P" --prefix clusterbench --subs "$BSUBS" --duration "${HOLD_SECS}s" --src-ips 1 >"$SD/hold-$P.log" 2>&1 &
      pids+=($!); holds+=($!)
    done
    sleep 3
  fi
  echo "== $MODE: $SUBS subscribers ($BSUBS on the publishing node), $RATE msg/s, $DUR"
  t0=$(ticks "${relays[@]}"); b0=0
  [ -n "$store" ] && b0=$(io_bytes "$store")
  timeout 180 "$BENCH" fanout --addr "127.0.0.1:$PB" --prefix clusterbench --subs "$BSUBS" --rate "$RATE" --duration "$DUR" --src-ips 1 ${BENCH_ARGS:-} | tee "$SD/fanout.log"
  t1=$(ticks "${relays[@]}"); b1=0
  [ -n "$store" ] && b1=$(io_bytes "$store")
  for h in "${holds[@]}"; do wait "$h" || true; done
  # Messages published during the run: what B's subscribers got, per subscriber.
  got=$(grep -oE '\([0-9]+ of [0-9]+\)' "$SD/fanout.log" | head -1 | grep -oE '^\([0-9]+' | tr -d '(' || echo 0)
  msgs=$(( got / BSUBS ))
  lat=$(grep -oE 'p50 [0-9.]+ .*p99 [0-9.]+' "$SD/fanout.log" | head -1 | sed -E 's/ p90 [0-9.]+//' || true)
  cpu_us=$(python3 -c "print(round(($t1 - $t0) / $HZ * 1e6 / max($msgs, 1), 1))")
  bytes=-
  [ -n "$store" ] && bytes=$(python3 -c "print(round(($b1 - $b0) / max($msgs, 1)))")
  other=""
  for f in "$SD"/hold-*.log; do
    [ -e "$f" ] && other+="$(basename "$f" .log): $(tail -1 "$f"); "
  done
  [ -n "$other" ] && echo "-- other nodes: $other"
  held=$(grep -ohE 'hold: [0-9]+ messages' "$SD"/hold-*.log 2>/dev/null | grep -oE '[0-9]+' | paste -sd+ - || true)
  summary+=("| $MODE | $(grep -oE 'delivered +[0-9.]+ [kM]?/s' "$SD/fanout.log" | head -1 | tr -s ' ') | ${held:--} | $lat ms | $cpu_us µs | $bytes B |")
  cleanup
  rm -f "$SD"/hold-*.log
done
echo
echo "| mode | deliveries on B | messages delivered on A + C | latency on B | relay CPU per publish (all nodes) | store bytes per message |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${summary[@]}"
