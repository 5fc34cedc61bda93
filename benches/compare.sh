#!/usr/bin/env bash
# relay against its comparators, on this machine, in one run (issues 5 and 12).
#
#   UWS_BIN=/path/to/uws-relay bash benches/compare.sh      # every scenario, relay vs uWebSockets
#   SCENARIOS="max1k steady" COMPARATORS="uws nchan" bash benches/compare.sh
#
# The setup is issue 12's: each server runs alone, fresh for each scenario, pinned to CPU 0
# (`taskset -c $SERVER_CPU`): relay as `relay serve --shards 1 --max-connections-per-ip 0
# --rate-limit 0` (plus RELAY_ARGS), the uWebSockets comparator (UWS_BIN, built outside this
# repository from uWebSockets' public source: benches/RESULTS.md says how; skipped when unset),
# nginx + Nchan with `worker_processes 1`, the Node `ws` relay of benches/node-relay. The load
# (relay-bench, autocannon) runs pinned to CPU 1. relay-bench publishes the way a typical backend
# does: one keep-alive HTTP/1.1 connection, `POST /api/publish` requests pipelined, written once
# per 1 ms tick. 64-byte payloads; max searches step ×1.5 every 8 s after a 2 s warm-up. Every
# run is bounded (`timeout`); the whole script takes 30–40 minutes with every scenario on a
# quiet machine (longer while it waits for other work to stop: see QUIET_WAIT and STEP_QUIET).
#
# Scenarios (SCENARIOS; default: all but soak and autocannon): max1k max10k sse steady cost
# idle connect connect-hold manych storm storm-redis, and soak (issue 11: relay only, SOAK_DURATION, default 5m)
# and autocannon. See benches/RESULTS.md.
# Environment: OUT (results folder, default target/compare/<time>), SCENARIOS, COMPARATORS
# (default uws), UWS_BIN, NO_BUILD=1 (use the binaries already in target/release), RELAY_BIN,
# BENCH_BIN, RELAY_ARGS (more `relay serve` flags for every relay run but the soak's),
# SOAK_RELAY_ARGS (all the flags of the soak's relay, e.g. `--max-memory 512MiB`; default
# `--presence-channels presence:*`), SOAK_ARGS (more relay-bench soak flags), SOAK_ADDRS (client
# addresses the soak's abusers claim in X-Forwarded-For, default 8), PUBLISH (relay-bench --publish shape,
# default pipelined), STEP (per-step duration of the max searches, default 8s), STEP_QUIET
# (relay-bench --quiet-wait: how long each step may wait for other work on the machine to stop,
# default 60s), QUIET_WAIT / QUIET_BUSY (the same before each run: 300 s, 0.15 core),
# SERVER_CPU, LOAD_CPU.
#
# Installs what it needs: jq and curl (apt); for the nchan and node comparators nginx +
# libnginx-mod-nchan (apt) and ws (npm, into benches/node-relay/node_modules); autocannon (npm)
# for its scenario. Writes $OUT/summary.md (the table with ratios) and one log + RESULT json per
# run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SCENARIOS=${SCENARIOS:-"max1k max10k sse steady cost idle connect connect-hold manych storm storm-redis"}
COMPARATORS=${COMPARATORS:-"uws"}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
STEP=${STEP:-8s}
STEP_QUIET=${STEP_QUIET:-60s}
PUBLISH=${PUBLISH:-pipelined}
RELAY_ARGS=${RELAY_ARGS:-}
SOAK_RELAY_ARGS=${SOAK_RELAY_ARGS:---presence-channels presence:*}
SOAK_DURATION=${SOAK_DURATION:-5m}
SOAK_ARGS=${SOAK_ARGS:-}
SOAK_ADDRS=${SOAK_ADDRS:-8}
if [[ " $COMPARATORS " == *" uws "* ]] && [ -z "${UWS_BIN:-}" ]; then
  echo "COMPARATORS has uws but UWS_BIN is not set: skipping the uWebSockets comparator"
  echo "(build it from uWebSockets' public source as benches/RESULTS.md describes)"
  COMPARATORS=$(echo " $COMPARATORS " | sed 's/ uws / /; s/^ *//; s/ *$//')
fi
OUT=${OUT:-$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG=$OUT/compare.log
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
exec > >(tee -a "$LOG") 2>&1

say() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Install and build.
need_apt=()
if [[ " $COMPARATORS " == *" nchan "* ]]; then
  command -v nginx >/dev/null || need_apt+=(nginx)
  [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need_apt+=(libnginx-mod-nchan)
fi
if [[ " $SCENARIOS " == *" storm-redis "* ]]; then
  command -v redis-server >/dev/null || need_apt+=(redis-server)
fi
command -v jq >/dev/null || need_apt+=(jq)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # Debian's package may start a system nginx on port 80: it is not ours, leave it.
fi
if [[ " $COMPARATORS " == *" node "* ]] || [[ " $SCENARIOS " == *" autocannon "* ]]; then
  command -v node >/dev/null || { echo "node is required (apt-get install nodejs npm)"; exit 1; }
  if [ ! -d benches/node-relay/node_modules/ws ] || [ ! -d benches/node-relay/node_modules/autocannon ]; then
    say "npm ci (benches/node-relay)"
    (cd benches/node-relay && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; })
  fi
fi
AUTOCANNON=$ROOT/benches/node-relay/node_modules/.bin/autocannon

if [ "${NO_BUILD:-0}" != 1 ]; then
  say "cargo build --release -p relay -p relay-bench"
  cargo build --release -p relay -p relay-bench
fi
# Copies, so a concurrent rebuild cannot change the binaries under a run.
mkdir -p "$OUT/bin"
cp "${RELAY_BIN:-target/release/relay}" "$OUT/bin/relay"
cp "${BENCH_BIN:-target/release/relay-bench}" "$OUT/bin/relay-bench"
RELAY=$OUT/bin/relay
BENCH=$OUT/bin/relay-bench
if [ -n "${UWS_BIN:-}" ]; then
  cp "$UWS_BIN" "$OUT/bin/uws-relay"
  UWS=$OUT/bin/uws-relay
fi

# relay's flags in every run: one shard (one core), and no per-IP or per-connection rate limit
# (every load comes from loopback). Since issue 11, relay also limits API requests per client
# address (`--api-rate-limit`): off too, so that the publisher is never refused (loopback is a
# trusted proxy by default, so it is not counted anyway; the flag says so explicitly). Older
# builds (RELAY_BIN) without the flag run without it.
RELAY_FLAGS="--shards 1 --max-connections-per-ip 0 --rate-limit 0"
RELAY_HELP=$("$RELAY" serve --help 2>/dev/null || true)
has_flag() { grep -q -- "$1" <<<"$RELAY_HELP"; }
has_flag --api-rate-limit && RELAY_FLAGS="$RELAY_FLAGS --api-rate-limit 0"
# SIGTERM: since issue 11 relay keeps serving for --drain-period (default 5 s) before it sends
# 1012. The storm measures the reconnect, not the drain: no drain period (older builds have none).
STORM_FLAGS=
has_flag --drain-period && STORM_FLAGS="--drain-period 0"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo -) (dirty: $(git status --porcelain 2>/dev/null | grep -c . || true) files)"
  lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Hypervisor)'
  echo "kernel: $(uname -r)"
  echo "relay: $(sha256sum "$RELAY" | cut -c1-16) (${RELAY_BIN:-target/release/relay}), flags: $RELAY_FLAGS $RELAY_ARGS (storm: $STORM_FLAGS)"
  [ -n "${UWS:-}" ] && echo "uws: $(sha256sum "$UWS" | cut -c1-16) ($UWS_BIN)"
  if [[ " $COMPARATORS " == *" nchan "* ]]; then
    echo "nginx: $(nginx -v 2>&1 | sed 's/.*\///'), nchan: $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo ?)"
  fi
  if [[ " $COMPARATORS " == *" node "* ]]; then
    echo "node: $(node --version), ws: $(node -p "require('$ROOT/benches/node-relay/node_modules/ws/package.json').version"), autocannon: $(node -p "require('$ROOT/benches/node-relay/node_modules/autocannon/package.json').version")"
  fi
  echo "open files limit: $(ulimit -n)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# ---------------------------------------------------------------------------------------------
# Servers. start_<target> sets ADDR, PID (the process to measure) and KILL (the process to end).
ADDR= PID= KILL= NSTART=0

wait_line() { # file, seconds: waits for "listening on http://ADDR" and prints ADDR
  local f=$1 i a
  for ((i = 0; i < $2 * 20; i++)); do
    a=$(sed -n 's/.*listening on http:\/\/\([0-9.]*:[0-9][0-9]*\).*/\1/p' "$f" 2>/dev/null | head -1)
    if [ -n "$a" ]; then
      echo "$a"
      return 0
    fi
    sleep 0.05
  done
  echo "server did not start; its output:" >&2
  cat "$f" >&2
  return 1
}

EXTRA_RELAY_ARGS=$RELAY_ARGS

start_relay() {
  local f=$OUT/servers/relay.$((++NSTART))
  mkdir -p "$OUT/servers"
  set -f # flags are words, not globs (`presence:*`)
  # shellcheck disable=SC2086
  taskset -c "$SERVER_CPU" "$RELAY" serve $RELAY_FLAGS --listen 127.0.0.1:0 $EXTRA_RELAY_ARGS \
    >"$f.out" 2>"$f.err" &
  PID=$! KILL=$!
  set +f
  ADDR=$(wait_line "$f.out" 10)
}

start_uws() {
  local f=$OUT/servers/uws.$((++NSTART))
  mkdir -p "$OUT/servers"
  taskset -c "$SERVER_CPU" "$UWS" 0 127.0.0.1 >"$f.out" 2>"$f.err" &
  PID=$! KILL=$!
  ADDR=$(wait_line "$f.out" 10)
}

start_node() {
  local f=$OUT/servers/node.$((++NSTART))
  mkdir -p "$OUT/servers"
  taskset -c "$SERVER_CPU" node "$ROOT/benches/node-relay/server.js" 0 127.0.0.1 >"$f.out" 2>"$f.err" &
  PID=$! KILL=$!
  ADDR=$(wait_line "$f.out" 10)
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start_nchan() {
  local dir=$OUT/nginx port user_line=
  mkdir -p "$dir"
  port=$(free_port)
  [ "$(id -u)" = 0 ] && user_line="user root;"
  cat >"$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
$user_line
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 40000; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$port backlog=4096;
    location = /pub {
      nchan_publisher;
      nchan_channel_id \$arg_id;
    }
    location ~ ^/sub/([A-Za-z0-9_]+)\$ {
      nchan_subscriber websocket eventsource;
      nchan_channel_id \$1;
      nchan_subscriber_first_message newest;
    }
  }
}
EOF
  taskset -c "$SERVER_CPU" nginx -c "$dir/nginx.conf" -p "$dir" >"$OUT/nginx.out" 2>&1 &
  KILL=$!
  ADDR=127.0.0.1:$port
  local i
  for ((i = 0; i < 100; i++)); do
    PID=$(pgrep -P "$KILL" | head -1 || true)
    [ -n "$PID" ] && curl -s -o /dev/null "http://$ADDR/pub?id=warmup" 2>/dev/null && break
    sleep 0.1
  done
  [ -n "$PID" ] || { cat "$OUT/nginx.out" "$dir/error.log" >&2; return 1; }
}

stop_server() {
  if [ -n "$KILL" ]; then
    kill "$KILL" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$KILL" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$KILL" 2>/dev/null || true
    wait "$KILL" 2>/dev/null || true
  fi
  KILL= PID= ADDR=
  sleep 0.5
}
trap 'stop_server; stop_redis' EXIT

# Waits (at most QUIET_WAIT seconds, default 180) until the machine is quiet: less than QUIET_BUSY
# (default 0.15) core busy over one second (other work on this 2-core machine, e.g. a compiler,
# skews every figure).
busy_cores() {
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  echo "$a $b" | awk '{ printf "%.2f", ($3 - $1) / ($4 - $2) * 2 }'
}
wait_quiet() {
  local t0=$SECONDS b
  while :; do
    b=$(busy_cores)
    if awk -v b="$b" -v q="${QUIET_BUSY:-0.15}" 'BEGIN { exit !(b < q) }'; then
      echo "machine quiet (busy $b cores, load average $(cut -d' ' -f1-3 /proc/loadavg))"
      return 0
    fi
    if ((SECONDS - t0 > ${QUIET_WAIT:-300})); then
      echo "machine still busy ($b cores) after ${QUIET_WAIT:-300} s: measuring anyway (see 'other' CPU; load average $(cut -d' ' -f1-3 /proc/loadavg))"
      return 0
    fi
    sleep 2
  done
}

# Each handshake leaves a TIME_WAIT socket; a table full of them (up to tcp_max_tw_buckets) slows
# the next run's connects. Before a connect run, wait (at most 75 s) for them to expire.
wait_timewait() {
  local i n
  for ((i = 0; i < 75; i++)); do
    n=$(ss -tan state time-wait 2>/dev/null | tail -n +2 | wc -l || echo 0)
    [ "${n:-0}" -lt 2000 ] && break
    sleep 1
  done
  echo "TIME_WAIT sockets before the run: ${n:-?}"
}

# ---------------------------------------------------------------------------------------------
# Runs. bench NAME TARGET SECONDS ARGS...: runs relay-bench against a fresh TARGET server and
# keeps its RESULT json as $OUT/NAME.TARGET.json.
bench() {
  local name=$1 target=$2 secs=$3
  shift 3
  wait_quiet
  "start_$target"
  say "$name / $target: relay-bench $* (server pid $PID at $ADDR)"
  timeout "$secs" taskset -c "$LOAD_CPU" "$BENCH" "$@" --target "$target" --addr "$ADDR" \
    --server-pid "$PID" --json 2>&1 | tee "$OUT/$name.$target.log" || echo "(run ended with $?)"
  grep '^RESULT ' "$OUT/$name.$target.log" | tail -1 | sed 's/^RESULT //' >"$OUT/$name.$target.json" || true
  stop_server
}

soak_run() { # seconds, relay-bench soak args...
  local secs=$1 f=$OUT/servers/relay.soak
  shift
  wait_quiet
  mkdir -p "$OUT/servers"
  set -f
  # shellcheck disable=SC2086
  "$RELAY" serve --listen 127.0.0.1:0 $SOAK_RELAY_ARGS >"$f.out" 2>"$f.err" &
  PID=$! KILL=$!
  set +f
  ADDR=$(wait_line "$f.out" 10)
  say "soak / relay: relay serve $SOAK_RELAY_ARGS; relay-bench soak $* (server pid $PID at $ADDR)"
  timeout "$secs" "$BENCH" soak "$@" --target relay --addr "$ADDR" --server-pid "$PID" --json 2>&1 |
    tee "$OUT/soak.relay.log" || echo "(run ended with $?)"
  grep '^RESULT ' "$OUT/soak.relay.log" | tail -1 | sed 's/^RESULT //' >"$OUT/soak.relay.json" || true
  stop_server
}

# Start rates of the max searches (publishes/s): the grids of issue 12's measurement (×1.5 from
# 20/s at 1,000 subscribers, from 1/s at 10,000, from 100/s for many channels), the same for
# every server so that their steps are comparable.
RATE1K=${RATE1K:-20}
RATE10K=${RATE10K:-1}
RATEMANY=${RATEMANY:-100}

# storm TARGET NAME [relay flags]: relay-bench runs (and restarts) the server itself on a fixed
# port.
storm_run() {
  local target=$1 name=$2 port cmd
  shift 2
  wait_quiet
  wait_timewait
  port=$(free_port)
  case $target in
    relay) cmd="taskset -c $SERVER_CPU $RELAY serve $RELAY_FLAGS $STORM_FLAGS --listen 127.0.0.1:$port $EXTRA_RELAY_ARGS $*" ;;
    uws) cmd="taskset -c $SERVER_CPU $UWS $port 127.0.0.1" ;;
    *) echo "storm: no $target"; return 0 ;;
  esac
  say "$name / $target: relay-bench storm --subs 10000 (server: $cmd)"
  timeout 300 taskset -c "$LOAD_CPU" "$BENCH" storm --target "$target" --addr "127.0.0.1:$port" \
    --server-cmd "$cmd" --subs 10000 --rate 20 --json 2>&1 |
    tee "$OUT/$name.$target.log" || echo "(run ended with $?)"
  grep '^RESULT ' "$OUT/$name.$target.log" | tail -1 | sed 's/^RESULT //' >"$OUT/$name.$target.json" || true
}

REDIS_PID=
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  cat "$OUT/redis.log"
  return 1
}
stop_redis() {
  [ -n "$REDIS_PID" ] && { kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; }
  REDIS_PID=
}

core_ticks() { # busy and total ticks of the server's and the load's CPU
  awk -v s="cpu$SERVER_CPU" -v l="cpu$LOAD_CPU" '
    $1 == s { sb = $2+$3+$4+$7+$8+$9; st = sb+$5+$6 }
    $1 == l { lb = $2+$3+$4+$7+$8+$9; lt = lb+$5+$6 }
    END { print sb, lb, st, lt }' /proc/stat
}

autocannon_run() { # name target subs
  local name=$1 target=$2 subs=$3 url body hold_pid=
  wait_quiet
  "start_$target"
  if [ "$target" = nchan ]; then
    url="http://$ADDR/pub?id=ac0"
    body='{"t":0,"p":0,"s":0,"x":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
  else
    url="http://$ADDR/api/publish"
    body='{"channel":"ac0","data":{"t":0,"p":0,"s":0,"x":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}'
  fi
  say "$name / $target: autocannon -c 16 -d 5 POST $url ($subs subscribers)"
  if [ "$subs" -gt 0 ]; then
    timeout 40 taskset -c "$LOAD_CPU" "$BENCH" hold --target "$target" --addr "$ADDR" \
      --subs "$subs" --prefix ac --duration 12s --json >"$OUT/$name.$target.hold.log" 2>&1 &
    hold_pid=$!
    local i
    for ((i = 0; i < 200; i++)); do grep -q '^ready' "$OUT/$name.$target.hold.log" && break; sleep 0.05; done
    head -1 "$OUT/$name.$target.hold.log"
  fi
  local c0 c1
  c0=$(core_ticks)
  timeout 30 taskset -c "$LOAD_CPU" "$AUTOCANNON" -c 16 -d 5 -m POST \
    -H 'content-type: application/json' -b "$body" -j "$url" \
    >"$OUT/$name.$target.json" 2>"$OUT/$name.$target.err" || echo "(autocannon ended with $?)"
  c1=$(core_ticks)
  # Busy share of the server's and the load's core over the autocannon run (includes its
  # start-up): a load core near 100% means autocannon (one Node process) was the limit.
  echo "$c0 $c1" | awk '{ printf "core busy: server CPU %.0f%%, load CPU %.0f%%\n", ($5-$1)/($7-$3)*100, ($6-$2)/($8-$4)*100 }' |
    tee "$OUT/$name.$target.cores"
  jq -r '"requests/s \(.requests.average) (non-2xx \(.non2xx), errors \(.errors), timeouts \(.timeouts)), latency p50 \(.latency.p50) p99 \(.latency.p99) ms"' \
    "$OUT/$name.$target.json" || cat "$OUT/$name.$target.err"
  if [ -n "$hold_pid" ]; then
    wait "$hold_pid" || true
    grep '^hold' "$OUT/$name.$target.hold.log" || true
  fi
  stop_server
}

MAXARGS=(--duration "$STEP" --warmup 2s --publish "$PUBLISH" --quiet-wait "$STEP_QUIET")
# Time limits grow with the quiet waits: a max search may wait STEP_QUIET before each of its
# steps (and up to three noisy retries).
QS=$(echo "$STEP_QUIET" | sed 's/m$/*60/; s/s$//')
QS=$((QS))
TMAX=$((1200 + 30 * QS))
TONE=$((300 + 2 * QS))
for s in $SCENARIOS; do
  for t in relay $COMPARATORS; do
    case $s in
      max1k)
        bench max1k "$t" "$TMAX" max --subs 1000 --p99-max 50ms --start-rate "$RATE1K" "${MAXARGS[@]}" ;;
      max10k)
        bench max10k "$t" "$TMAX" max --subs 10000 --p99-max 500ms --start-rate "$RATE10K" "${MAXARGS[@]}" ;;
      sse)
        [ "$t" = relay ] || [ "$t" = nchan ] || continue # the others have no SSE endpoint
        bench sse "$t" "$TMAX" sse --step-up --subs 1000 --p99-max 50ms --start-rate "$RATE1K" "${MAXARGS[@]}" ;;
      steady)
        # --lead-in: the step follows 1 s of the same publishes, not the quiet wait's pause
        # (after one longer than TCP's 200 ms timeout the subscribers' sockets acknowledge
        # their first 16 segments at once: 16 slower passes of 200, for any server).
        bench steady "$t" "$TONE" fanout --subs 1000 --rate 20 --duration 10s --warmup 2s \
          --publish "$PUBLISH" --quiet-wait "$STEP_QUIET" --lead-in 1s --spans ;;
      idle)
        bench idle "$t" 300 idle --points 10000,19000 --procs 2 ;;
      connect)
        wait_timewait
        bench connect "$t" 120 connect --count 10000 --duration 60s --parallel 64 ;;
      connect-hold)
        wait_timewait
        bench connect-hold "$t" 120 connect --count 10000 --duration 60s --parallel 64 --hold ;;
      cost)
        # The same fixed load for every server, with every server syscall counted by perf
        # (/proc/<pid>/io counts only the read/write family: not uWS's send/recv).
        bench cost "$t" "$TONE" fanout --subs 1000 --rate 500 --duration 8s --warmup 2s \
          --publish "$PUBLISH" --perf-syscalls --quiet-wait "$STEP_QUIET" ;;
      manych)
        bench manych "$t" "$TMAX" max --subs 10000 --channels 1000 --p99-max 100ms \
          --start-rate "$RATEMANY" "${MAXARGS[@]}" ;;
      storm)
        storm_run "$t" storm ;;
      storm-redis)
        # relay with its history in Redis, so that it survives the restart: loss must be 0.
        [ "$t" = relay ] || continue
        start_redis
        storm_run relay storm-redis --backplane redis --redis-url "redis://127.0.0.1:$REDIS_PORT"
        stop_redis ;;
      soak)
        # Issue 11's setting: relay with its default flags (a shard per core, every limit at
        # its default) plus SOAK_RELAY_ARGS, neither it nor the load pinned; the abusers claim
        # SOAK_ADDRS client addresses through X-Forwarded-For (so that the per-address limits
        # apply to them), the normal load is a backend on loopback.
        [ "$t" = relay ] || continue
        # shellcheck disable=SC2086 # flags are words
        soak_run "$(($(echo "$SOAK_DURATION" | sed 's/m$/*60/; s/s$//') + 300))" \
          --duration "$SOAK_DURATION" --abuser-addrs "$SOAK_ADDRS" $SOAK_ARGS ;;
      autocannon)
        autocannon_run ac0 "$t" 0
        autocannon_run ac1k "$t" 1000 ;;
      *) echo "unknown scenario $s" ;;
    esac
  done
done

# ---------------------------------------------------------------------------------------------
# Summary: relay's figure, each comparator's, the ratio, the issue's target.
j() { [ -s "$OUT/$1.$2.json" ] && jq -r "$3 // empty" "$OUT/$1.$2.json" 2>/dev/null || true; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'; }
fmt() { awk -v a="$1" -v d="${2:-0}" 'BEGIN { if (a == "") print "-"; else printf "%.*f", d, a }'; }

{
  echo "# relay vs comparators: $(date -u +%FT%TZ)"
  echo
  echo '```'
  cat "$OUT/machine.txt"
  echo '```'
  echo
  printf '| scenario | metric | relay |'
  for t in $COMPARATORS; do printf ' %s | relay / %s |' "$t" "$t"; done
  echo ' target |'
  printf '|---|---|---|'
  for t in $COMPARATORS; do printf -- '---|---|'; done
  echo '---|'
  row() { # scenario file jq-expr label digits target
    local f=$1 q=$2 label=$3 d=$4 target=$5 r v
    [ -e "$OUT/$f.relay.json" ] || return 0
    r=$(j "$f" relay "$q")
    printf '| %s | %s | %s |' "$f" "$label" "$(fmt "$r" "$d")"
    for t in $COMPARATORS; do
      v=$(j "$f" "$t" "$q")
      printf ' %s | %s |' "$(fmt "$v" "$d")" "$(ratio "$r" "$v")"
    done
    echo " $target |"
  }
  row max1k '.best.deliveries_per_sec' 'deliveries/s at the best step (p99 < 50 ms)' 0 'relay ≥ 2× uWS'
  row max1k '.best.rate' 'publishes/s at the best step' 1 ''
  row max1k '.best.p99_ms' 'p99 ms at the best step' 2 ''
  row max1k '.best.cost.server_cpu_ns_per_delivery' 'server CPU ns per delivery (best step)' 0 ''
  row max1k '.best.cost.syscalls_per_delivery' 'read/write-family syscalls per delivery (best step; /proc io: not send/recv)' 3 ''
  row max1k '.best.cost.wakeups_per_publish' 'wake-ups (voluntary switches) per publish' 3 ''
  row max1k '.best.bench_cpu' 'relay-bench CPU (cores) at the best step' 2 '< 0.9'
  row max1k '.best.bench_cost.cpu_ns_per_delivery' 'relay-bench CPU ns per delivery (best step)' 0 ''
  row max1k '.best.bench_cost.bytes_per_delivery' 'bytes read per delivery (best step)' 1 ''
  row max1k '(.rss_start // 0) / 1048576' 'server RSS MiB, subscribers idle before the load' 1 ''
  row max1k '(.rss_end // 0) / 1048576' 'server RSS MiB at the end of the load' 1 ''
  row max1k '(.rss_after // 0) / 1048576' 'server RSS MiB 10 s after the load' 1 ''
  row max1k '((.best.server_rss // 0) - (.rss_start // 0)) / 1048576' 'RSS growth at the end of the best step (the sustained max load), MiB' 1 '≤ 32'
  row max1k '((.rss_end // 0) - (.rss_start // 0)) / 1048576' 'RSS growth at the end of the search (the failing step), MiB' 1 ''
  row max1k '((.rss_after // 0) - (.rss_start // 0)) / 1048576' 'RSS growth 10 s after the load, MiB' 1 '≈ 0'
  row max10k '.best.deliveries_per_sec' 'deliveries/s at the best step (p99 < 500 ms)' 0 'relay ≥ 1.5× uWS'
  row max10k '.best.rate' 'publishes/s at the best step' 1 ''
  row max10k '.best.p99_ms' 'p99 ms at the best step' 2 ''
  row max10k '.best.cost.server_cpu_ns_per_delivery' 'server CPU ns per delivery (best step)' 0 ''
  row max10k '.best.cost.syscalls_per_delivery' 'read/write-family syscalls per delivery (best step)' 3 ''
  row max10k '.best.cost.wakeups_per_publish' 'wake-ups per publish (best step)' 3 ''
  row max10k '.best.bench_cpu' 'relay-bench CPU (cores) at the best step' 2 '< 0.9'
  row max10k '((.best.server_rss // 0) - (.rss_start // 0)) / 1048576' 'RSS growth at the end of the best step (the sustained max load), MiB' 1 '≤ 32'
  row max10k '((.rss_end // 0) - (.rss_start // 0)) / 1048576' 'RSS growth at the end of the search (the failing step), MiB' 1 ''
  row max10k '((.rss_after // 0) - (.rss_start // 0)) / 1048576' 'RSS growth 10 s after the load, MiB' 1 '≈ 0'
  row sse '.best.deliveries_per_sec' 'SSE deliveries/s at the best step (p99 < 50 ms)' 0 '≥ 0.8× relay WS max1k'
  row sse '.best.p99_ms' 'p99 ms at the best step' 2 ''
  row sse '.best.cost.server_cpu_ns_per_delivery' 'server CPU ns per delivery (best step)' 0 ''
  row sse '.best.bench_cpu' 'relay-bench CPU (cores) at the best step' 2 '< 0.9'
  row sse '.best.bench_cost.cpu_ns_per_delivery' 'relay-bench CPU ns per delivery (best step)' 0 ''
  row sse '.best.bench_cost.bytes_per_delivery' 'bytes read per delivery (best step)' 1 ''
  row steady '.best.p50_ms' 'p50 ms, 20 publishes/s to 1,000' 2 ''
  row steady '.best.p99_ms' 'p99 ms' 2 'relay ≤ uWS'
  row steady '.best.loss' 'loss' 0 '0'
  row steady '.best.cost.server_cpu_ns_per_delivery' 'server CPU ns per delivery' 0 ''
  row steady '.best.cost.syscalls_per_delivery' 'read/write-family syscalls per delivery' 3 ''
  row steady '.best.spans.first_p50_ms' 'per publish: its first delivery, p50 ms' 2 ''
  row steady '.best.spans.last_p50_ms' 'per publish: its last delivery (the end of the pass), p50 ms' 2 ''
  row steady '.best.spans.last_p99_ms' 'per publish: its last delivery, p99 ms' 2 ''
  row steady '.best.spans.spread_p50_ms' 'per publish: last − first delivery (the pass as seen), p50 ms' 2 ''
  row cost '.best.cost.server_cpu_ns_per_delivery' 'fixed 500/s to 1,000: server CPU ns per delivery' 0 ''
  row cost '.best.cost.all_syscalls_per_delivery' 'fixed 500/s to 1,000: all server syscalls per delivery (perf)' 3 ''
  row cost '.best.cost.wakeups_per_publish' 'fixed 500/s to 1,000: wake-ups per publish' 3 ''
  row cost '.best.p99_ms' 'fixed 500/s to 1,000: p99 ms (perf attached)' 2 ''
  row steady '.best.cost.wakeups_per_publish' 'wake-ups per publish' 2 ''
  row idle '.steps[0].per_conn' 'RSS bytes per idle subscribed connection, 10,000' 0 '≤ 1024'
  row idle '.steps[1].per_conn' 'RSS bytes per idle subscribed connection, 19,000' 0 '≤ 1024'
  row idle '.open' 'connections held' 0 '19000'
  row connect '.per_sec' 'WebSocket handshakes/s (10,000)' 0 ''
  row connect '.bench_cpu' 'relay-bench CPU (cores)' 2 '< 0.9'
  row connect-hold '.per_sec' '10,000 WebSocket subscribers arriving: handshake + subscribe/s, held open' 0 ''
  row connect-hold '.p99_ms' 'connect → subscribed p99 ms' 2 ''
  row connect-hold '.bench_cpu' 'relay-bench CPU (cores)' 2 '< 0.9'
  row manych '.best.rate' 'publishes/s at the best step (10,000 subs over 1,000 channels, p99 < 100 ms)' 0 ''
  row manych '.best.deliveries_per_sec' 'deliveries/s at the best step' 0 'relay ≥ 1.5× uWS'
  row manych '.best.p99_ms' 'p99 ms at the best step' 2 ''
  row manych '.best.cost.server_cpu_us_per_publish' 'server CPU µs per publish (best step)' 1 ''
  row manych '.best.cost.server_cpu_ns_per_delivery' 'server CPU ns per delivery (best step)' 0 ''
  row manych '.best.bench_cpu' 'relay-bench CPU (cores) at the best step' 2 '< 0.9'
  row manych '(.rss_start // 0) / 1048576' 'server RSS MiB before the load' 1 ''
  row manych '(.rss_end // 0) / 1048576' 'server RSS MiB at the end of the load' 1 ''
  row storm '.secs_from_term' 'storm: s from SIGTERM to all 10,000 resubscribed' 2 ''
  row storm '.secs_from_listen' 'storm: s from the new listen to all resubscribed' 2 ''
  row storm '.accept_per_sec' 'storm: resubscriptions/s' 0 ''
  row storm '.recovered' 'storm: resumes recovered (memory: none survive)' 0 ''
  row storm-redis '.secs_from_term' 'storm, Redis history: s from SIGTERM to all resubscribed' 2 ''
  row storm-redis '.accept_per_sec' 'storm, Redis history: resubscriptions/s' 0 ''
  row storm-redis '.recovered' 'storm, Redis history: resumes recovered' 0 '10000'
  row storm-redis '.loss' 'storm, Redis history: loss' 0 '0'
  row soak '.loss' 'soak: normal load loss' 0 '0'
  row soak '.p99_ms' 'soak: normal load p99 ms' 2 ''
  row soak '(.rss_max // 0) / 1048576' 'soak: server RSS max MiB' 1 'flat under the budget'
  echo
  for f in "$OUT"/ac*.cores; do
    [ -e "$f" ] && echo "- autocannon $(basename "$f" .cores): $(cat "$f")"
  done
  echo
  echo "Ratios are relay / comparator (for latency and memory, lower is better for relay)."
  echo "Logs and RESULT json: $OUT"
} >"$OUT/summary.md"
say "summary ($OUT/summary.md)"
cat "$OUT/summary.md"
