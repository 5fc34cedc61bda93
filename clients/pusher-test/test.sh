#!/usr/bin/env bash
# relay's Pusher Channels compatibility with the unmodified official libraries (pusher-js in
# Node and in headless Chromium, the `pusher` server library, Laravel Echo), installed from the
# committed package-lock (npm ci), against target/debug/relay. Every step is bounded in time.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"

log() { printf '\n== pusher: %s\n' "$*"; }

log "npm ci"
timeout 300 npm ci --no-audit --no-fund

if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium (apt-get)"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium
fi
export RELAY_BIN="${RELAY_BIN:-$root/target/debug/relay}"
if [ ! -x "$RELAY_BIN" ]; then
  (cd "$root" && timeout 900 cargo build --bin relay)
fi
log "pusher-js, pusher, Laravel Echo against $RELAY_BIN"
timeout 200 node test/pusher.mjs
