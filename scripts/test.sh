#!/usr/bin/env bash
# Installs dependencies, then runs the whole test suite: lints, unit and
# property tests, libblkio protocol tests, the crash test and the QEMU guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads=2
