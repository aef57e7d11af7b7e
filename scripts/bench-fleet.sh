#!/bin/bash
# The fleet benchmark, on demand (root: network namespaces and tc):
#   bash scripts/bench-fleet.sh
# N hosts (FLEET_HOSTS, default "1 8"; the first is the baseline) in network
# namespaces on one bridge, each behind FLEET_HOST_RATE (default 1gbit),
# the store (nginx) behind FLEET_STORE_RATE (default 100mbit), replay the
# recorded boot trace of the Debian guest at once, caches empty, P2P on
# when N > 1. The first N is a cold baseline; every other N runs the
# scenarios of FLEET_SCENARIOS (default "cold warm kill liar join": caches
# empty; one host warm first; a home SIGKILLed at 30% of the reads; a host
# serving corrupt chunks; half the hosts joining at 30%; see benches/fleet.rs).
# Uses the guest, store and trace of scripts/bench-boot.sh in
# BENCH_DIR (default /var/tmp/streamblk-bench), made by it if missing.
# Prints a markdown table (see benches/fleet.rs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_DIR:-/var/tmp/streamblk-bench}
[ "$(id -u)" = 0 ] || { echo "bench-fleet: run as root (namespaces, tc)" >&2; exit 1; }
for tool in ip tc nginx; do
    command -v "$tool" >/dev/null || { echo "bench-fleet: $tool is missing (apt-get install iproute2 nginx)" >&2; exit 1; }
done
if [ ! -f "$WORK/runs/record/boot-until-complete.trace" ] || [ ! -d "$WORK/store" ]; then
    echo "bench-fleet: making the guest, store and boot trace with scripts/bench-boot.sh" >&2
    BENCH_DIR=$WORK BENCH_RUNS=0 bash "$ROOT/scripts/bench-boot.sh" >&2 || true
    [ -f "$WORK/runs/record/boot-until-complete.trace" ] || { echo "bench-fleet: no boot trace in $WORK" >&2; exit 1; }
fi
cd "$ROOT"
BENCH_DIR=$WORK cargo bench --quiet --bench fleet
