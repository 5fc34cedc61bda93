#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: `bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]`
# (default 60 s, all targets). A crash fails the script; its input is left in
# fuzz/artifacts/<target>/ (reproduce with `cargo fuzz run <target> <file>` from fuzz/).
#
# cargo-fuzz needs nightly flags (-Z sanitizer, sancov passes). On the stable toolchain
# RUSTC_BOOTSTRAP=1 lets rustc accept them; it is set here, so no nightly toolchain is needed.
# FUZZ_SANITIZER picks the sanitizer: `none` (default: the codecs are safe Rust, and it builds
# and runs several times faster) or `address`.
#
# The committed seeds in fuzz/corpus/<target>/ are only read: new inputs go to
# fuzz/target/corpus/<target>/ (not committed), so runs do not grow the repository.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(binary_decode json_command sse_cursor roundtrip)
fi
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "== building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer"

for t in "${targets[@]}"; do
  work="target/corpus/$t"
  mkdir -p "$work" "corpus/$t"
  echo "== fuzzing $t for ${secs}s"
  log="target/fuzz-$t.log"
  status=0
  cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 ||
    status=$?
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "== fuzzing: no crash in ${#targets[@]} targets x ${secs}s"
