#!/usr/bin/env bash
# Every check of the JS client: install (npm ci), build (tsc) and check that the committed
# dist/ (embedded in the relay binary for the demo) matches src/, unit tests (node --test; the
# package test runs `npm pack --dry-run` and checks what would be published), then the browser
# tests in headless Chromium against a real relay (target/debug/relay): the client's, and the
# admin UI's (test/admin.mjs; the UI lives in clients/admin/ and is embedded in the relay).
# Installs Debian's chromium if it is missing. Every step is bounded in time.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"

log() { printf '\n== js: %s\n' "$*"; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "installing nodejs and npm"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "Node.js >= 20 is required (found $(node --version))" >&2
  exit 1
fi

log "npm ci"
timeout 300 npm ci --no-audit --no-fund

log "build (tsc) and check that dist/ is up to date"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
timeout 120 npx tsc -p tsconfig.json --outDir "$fresh"
if ! diff -r "$fresh" dist >/dev/null; then
  diff -r "$fresh" dist | head -20 || true
  echo "clients/js/dist is stale: run 'npm run build' in clients/js and commit dist/" >&2
  exit 1
fi

log "unit tests (node --test)"
timeout 120 node --test --test-timeout=20000 test/*.test.mjs

log "browser test (headless Chromium against target/debug/relay)"
if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium (apt-get)"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium
fi
export RELAY_BIN="${RELAY_BIN:-$root/target/debug/relay}"
if [ ! -x "$RELAY_BIN" ]; then
  (cd "$root" && timeout 900 cargo build --bin relay)
fi
timeout 300 node test/browser.mjs

log "admin UI browser test (headless Chromium against target/debug/relay --admin-password)"
timeout 200 node test/admin.mjs
