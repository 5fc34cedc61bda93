#!/usr/bin/env bash
# relay against its comparators, on this machine, in one run (issue 5).
#
#   bash benches/compare.sh                 # every scenario, comparators nchan and node
#   SCENARIOS="max1k steady" COMPARATORS=nchan bash benches/compare.sh
#
# Each server runs alone, fresh for each scenario, pinned to CPU 0 (`taskset -c $SERVER_CPU`):
# relay as `relay serve --shards 1`, nginx + Nchan with `worker_processes 1`, the Node `ws` relay
# of benches/node-relay. The load (relay-bench, autocannon) runs pinned to CPU 1. Every run is
# bounded (`timeout`); the whole script takes about 15 minutes with every scenario on a quiet
# machine (longer while it waits for other work to stop: see QUIET_WAIT and STEP_QUIET).
#
# Scenarios: max1k max10k steady sse idle connect autocannon (see benches/RESULTS.md).
# Environment: OUT (results folder, default target/compare/<time>), SCENARIOS, COMPARATORS,
# NO_BUILD=1 (use the binaries already in target/release), RELAY_BIN, BENCH_BIN, STEP (per-step
# duration of the max searches, default 3s), STEP_QUIET (relay-bench --quiet-wait: how long each
# step may wait for other work on the machine to stop, default 60s), IDLE_CONNS (default 19000),
# QUIET_WAIT / QUIET_BUSY (the same before each run: 180 s, 0.15 core), SERVER_CPU, LOAD_CPU.
#
# Installs what it needs: nginx + libnginx-mod-nchan (apt), jq (apt), ws + autocannon (npm,
# into benches/node-relay/node_modules). Writes $OUT/summary.md (the table with ratios) and one
# log + RESULT json per run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SCENARIOS=${SCENARIOS:-"max1k max10k steady sse idle connect autocannon"}
COMPARATORS=${COMPARATORS:-"nchan node"}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
STEP=${STEP:-3s}
STEP_QUIET=${STEP_QUIET:-60s}
IDLE_CONNS=${IDLE_CONNS:-19000}
OUT=${OUT:-$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG=$OUT/compare.log
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
exec > >(tee -a "$LOG") 2>&1

say() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Install and build.
need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need_apt+=(libnginx-mod-nchan)
command -v jq >/dev/null || need_apt+=(jq)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # Debian's package may start a system nginx on port 80: it is not ours, leave it.
fi
command -v node >/dev/null || { echo "node is required (apt-get install nodejs npm)"; exit 1; }
if [ ! -d benches/node-relay/node_modules/ws ] || [ ! -d benches/node-relay/node_modules/autocannon ]; then
  say "npm ci (benches/node-relay)"
  (cd benches/node-relay && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; })
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

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo -) (dirty: $(git status --porcelain 2>/dev/null | grep -c . || true) files)"
  lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Hypervisor)'
  echo "kernel: $(uname -r)"
  echo "nginx: $(nginx -v 2>&1 | sed 's/.*\///'), nchan: $(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo ?)"
  echo "node: $(node --version), ws: $(node -p "require('$ROOT/benches/node-relay/node_modules/ws/package.json').version"), autocannon: $(node -p "require('$ROOT/benches/node-relay/node_modules/autocannon/package.json').version")"
  echo "open files limit: $(ulimit -n)"
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

start_relay() {
  local f=$OUT/servers/relay.$((++NSTART))
  mkdir -p "$OUT/servers"
  taskset -c "$SERVER_CPU" "$RELAY" serve --shards 1 --listen 127.0.0.1:0 >"$f.out" 2>"$f.err" &
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
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
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
trap stop_server EXIT

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
      echo "machine quiet (busy $b cores)"
      return 0
    fi
    if ((SECONDS - t0 > ${QUIET_WAIT:-180})); then
      echo "machine still busy ($b cores) after ${QUIET_WAIT:-180} s: measuring anyway (see 'other' CPU)"
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

# Per-target start rates of the max searches (publishes/s), so each reaches its limit in a few
# steps.
rate1k() { case $1 in relay) echo 300 ;; *) echo 8 ;; esac; }
rate10k() { case $1 in relay) echo 20 ;; *) echo 1 ;; esac; }

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

for s in $SCENARIOS; do
  for t in relay $COMPARATORS; do
    case $s in
      max1k)
        bench max1k "$t" 400 max --subs 1000 --p99-max 50ms --duration "$STEP" \
          --start-rate "$(rate1k "$t")" --sample 4 --quiet-wait "$STEP_QUIET" ;;
      max10k)
        bench max10k "$t" 400 max --subs 10000 --p99-max 500ms --duration "$STEP" \
          --start-rate "$(rate10k "$t")" --sample 4 --quiet-wait "$STEP_QUIET" ;;
      steady)
        bench steady "$t" 120 fanout --subs 1000 --rate 20 --duration 10s --quiet-wait "$STEP_QUIET" ;;
      sse)
        [ "$t" = node ] && continue # the Node relay has no SSE endpoint
        bench sse "$t" 400 sse --step-up --subs 1000 --p99-max 50ms --duration "$STEP" \
          --start-rate "$(rate1k "$t")" --sample 4 --quiet-wait "$STEP_QUIET" ;;
      idle)
        bench idle "$t" 240 idle --conns "$IDLE_CONNS" --steps 4 --procs 2 ;;
      connect)
        wait_timewait
        bench connect "$t" 60 connect --duration 5s --parallel 64 ;;
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
  row max1k '.best.deliveries_per_sec' 'deliveries/s (p99 < 50 ms)' 0 '≥ 1.7 M/s, ≥ 40× Nchan'
  row max1k '.best.p99_ms' 'p99 ms at best step' 2 ''
  row max1k '.best.bench_cpu' 'relay-bench CPU (cores) at best step' 2 '< 0.9'
  row max10k '.best.deliveries_per_sec' 'deliveries/s (p99 < 500 ms)' 0 '≥ 2 M/s, ≥ 55× Nchan'
  row max10k '.best.p99_ms' 'p99 ms at best step' 2 ''
  row max10k '.best.bench_cpu' 'relay-bench CPU (cores) at best step' 2 '< 0.9'
  row steady '.best.p99_ms' 'p99 ms, 20 publishes/s' 2 '≤ 5 ms'
  row steady '.best.p50_ms' 'p50 ms' 2 ''
  row steady '.best.loss' 'loss' 0 '0'
  row sse '.best.deliveries_per_sec' 'SSE deliveries/s (p99 < 50 ms)' 0 '≥ 1 M/s'
  row sse '.best.p99_ms' 'p99 ms at best step' 2 ''
  row idle '.per_conn' 'RSS bytes per idle connection' 0 '≤ 1024 (stretch 460)'
  row idle '.slope' 'RSS slope, bytes per connection' 0 ''
  row idle '.open' 'connections held' 0 '19000'
  row connect '.per_sec' 'WebSocket handshakes/s' 0 '≥ 15 k/s'
  row ac0 '.requests.average' 'HTTP publish req/s, no subscribers' 0 '≥ 2× Nchan'
  row ac0 '.latency.p99' 'HTTP publish p99 ms' 0 '≤ Nchan'
  row ac1k '.requests.average' 'HTTP publish req/s, 1,000 subscribers' 0 '≥ 2× Nchan'
  row ac1k '.latency.p99' 'HTTP publish p99 ms' 0 '≤ Nchan'
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
