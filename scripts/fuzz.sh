#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20), starting from
# the seed corpus in fuzz/seeds/ (and what earlier runs found, kept in
# fuzz/corpus/, not committed). Fails on any crash, leak or timeout; the
# crashing input is left in fuzz/artifacts/. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# Runs on the stable toolchain: RUSTC_BOOTSTRAP lets cargo-fuzz pass the
# instrumentation flags it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
secs=${1:-20}
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
san=${FUZZ_SANITIZER:-address}
cargo fuzz build -O --sanitizer "$san"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "fuzz: $t for ${secs}s"
    log=$(mktemp)
    status=0
    cargo fuzz run -O --sanitizer "$san" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss|SUMMARY|Done)|panicked|ERROR|cov: ' "$log" | tail -n 8 || true
    rm -f "$log"
    [ "$status" -eq 0 ] || { echo "fuzz: $t failed; the input is in fuzz/artifacts/$t" >&2; exit 1; }
done
echo "fuzz: ${#targets[@]} targets ran ${secs}s each, no crash"
