#!/usr/bin/env bash
# Installs dependencies, then runs the whole test suite: lints, unit and
# property tests, the fuzz targets (20 s each), libblkio protocol tests, the
# crash and durability tests, the streaming and fault tests, and the QEMU
# guest tests. Ends with one "N passed, M failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The benchmarks are run on demand; here they must still build.
cargo build --benches --locked
# Every fuzz target, briefly (scripts/fuzz.sh SECONDS runs them longer).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
