#!/usr/bin/env bash
# Runs every check and test of the project on a fresh machine: installs what the tests need,
# then format, lint, unit, integration and fuzz-smoke tests. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

# The cluster tests (tests/cluster_*.rs, tests/redis_cluster.rs) start their own redis-server
# (also as a Redis Cluster and as Sentinels, made with redis-cli) and nats-server.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
  || ! command -v nats-server >/dev/null; then
  log "installing redis-server and nats-server (cluster tests)"
  if command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server redis-tools nats-server >/dev/null
  else
    echo "redis-server, redis-cli and nats-server are needed by the cluster tests" >&2
  fi
fi

log "cargo fmt --check"
cargo fmt --all -- --check

# A script is parsed only as far as it runs: a quoting slip in a late line (compare.sh's summary)
# would surface only at the end of a long benchmark. Every shell script of the project must parse.
log "bash -n (every shell script parses)"
find . -name '*.sh' -not -path './target/*' -not -path '*/node_modules/*' -print0 \
  | xargs -0 -r -n1 bash -n

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# tests/deploy.rs validates deploy/k8s against the Kubernetes schemas with kubernetes-validate.
log "pip install kubernetes-validate (deploy manifest checks)"
timeout 300 python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore kubernetes-validate

log "cargo test --workspace"
cargo test --workspace --all-targets

# The container image's build stage (deploy/Dockerfile): built by a container engine where one
# runs; without one (CI), its COPY and RUN lines run as written in a scratch directory
# (scripts/dockerfile-build.py), so a file the image needs but does not copy fails here.
log "Dockerfile build stage (deploy/Dockerfile)"
if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
  timeout 3600 docker build --target build -f deploy/Dockerfile .
elif command -v podman >/dev/null && timeout 20 podman info >/dev/null 2>&1; then
  timeout 3600 podman build --target build -f deploy/Dockerfile .
else
  timeout 3600 python3 scripts/dockerfile-build.py
fi

# The JS/TS client: unit tests (node --test) and the browser test in headless Chromium against
# the relay binary that cargo test just built (target/debug/relay).
log "JS client (bash clients/js/test.sh)"
bash clients/js/test.sh

# Pusher Channels compatibility: the official pusher-js, pusher and laravel-echo packages,
# unmodified, against the same binary (Node and headless Chromium).
log "Pusher compatibility (bash clients/pusher-test/test.sh)"
bash clients/pusher-test/test.sh

# Every cargo-fuzz target for a bounded time (FUZZ_SECONDS each, default 30; 0 skips): a crash
# fails the run. Stable toolchain: fuzz/run.sh sets RUSTC_BOOTSTRAP=1 and installs cargo-fuzz.
fuzz_secs="${FUZZ_SECONDS:-30}"
if [ "$fuzz_secs" -gt 0 ]; then
  log "fuzz: each target for ${fuzz_secs}s (bash fuzz/run.sh)"
  bash fuzz/run.sh "$fuzz_secs"
fi

log "all checks passed"
