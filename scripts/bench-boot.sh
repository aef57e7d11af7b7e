#!/bin/bash
# Boot benchmark (on demand, not in CI): how long a real Debian guest (systemd)
# takes to boot when its disk streams from an image store over a shaped link,
# against a boot from a local raw file.
#
#   bash scripts/bench-boot.sh           # as root; ~20 min under TCG (10 of them: copy at 100 Mbit/s)
#
# Modes, each at every rate in BENCH_RATES, BENCH_RUNS runs each:
#   local    the raw image, served by qemu-storage-daemon (the baseline; no link)
#   copy     download the whole raw image over the link, then boot it like local
#   lazy     streamblk, empty cache, no boot profile (demand fetching only)
#   profile  streamblk, empty cache, the boot profile streamed ahead of the guest
#   auto     streamblk with its defaults (adaptive fill, learning on), empty
#            cache, no profile: what a new user's first boot of an image gets
#   learned  streamblk with its defaults, empty chunk cache, the profile the
#            auto run of the same rate learned (run auto first)
# Time = from the start of the mode (daemon launch, or download start) to
# BOOT-COMPLETE on the guest's console (systemd's boot job queue is empty).
# Store bytes = bytes the store served before BOOT-COMPLETE (streamblk's
# `status --json` fetch.store_bytes; for copy, the downloaded image).
#
# The store: the image imported with 256 KiB chunks, served from a network
# namespace over a veth pair shaped with tc tbf (both directions), by
# examples/bench-boot-store.rs (tokio + hyper; requests served in parallel),
# which waits BENCH_DELAY_MS per request (the store's latency; this kernel's
# tc has no netem). The boot profile comes from one recorded boot
# (record-trace=, cut at BOOT-COMPLETE).
#
# Settings (environment):
#   BENCH_DIR=/var/tmp/streamblk-bench   work files (guest, store, per-run logs)
#   BENCH_RATES="100mbit 1gbit"          BENCH_RUNS=3
#   BENCH_MODES="local copy lazy profile auto learned"
#   BENCH_AUTO_FILL=auto  --fill-rate of auto (a number: a fixed cap, to tell
#                         the rate controller from the link's limit)
#   BENCH_FILL_RATE=0     streamblk --fill-rate of lazy and profile (MB/s; 0 =
#                         no background fill); auto and learned use the default
#   BENCH_DELAY_MS=1      store latency per request
#   BENCH_BOOT_TIMEOUT=600  seconds one boot may take
#   BENCH_SERVE_ARGS=""   extra `streamblk serve` arguments
#   BENCH_MEM_MB=1024
# Results: $BENCH_DIR/results.tsv (every run), $BENCH_DIR/results.md (the table);
# for auto and learned, runs/MODE-RATE-RUN/fill.tsv: the background fill after
# the boot, sampled every 0.1 s (time, store bytes, CPU seconds of the daemon,
# of the store server, and of the whole host).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${BENCH_DIR:-/var/tmp/streamblk-bench}
RATES=${BENCH_RATES:-"100mbit 1gbit"}
RUNS=${BENCH_RUNS:-3}
MODES=${BENCH_MODES:-"local copy lazy profile auto learned"}
FILL_RATE=${BENCH_FILL_RATE:-0}
DELAY_MS=${BENCH_DELAY_MS:-1}
BOOT_TIMEOUT=${BENCH_BOOT_TIMEOUT:-600}
SERVE_ARGS=${BENCH_SERVE_ARGS:-}
MEM_MB=${BENCH_MEM_MB:-1024}
CHUNK=262144
IMAGE=debian

[ "$(id -u)" = 0 ] || { echo "$0: run as root (network namespaces, tc)" >&2; exit 1; }
case "$WORK" in "$ROOT"|"$ROOT"/*) echo "BENCH_DIR must be outside the source tree" >&2; exit 1 ;; esac

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ------------------------------------------------------------------ cleanup
NS=sbkbench$$
HOST_IF=sbkbh$$
NS_IF=sbkbn$$
SUB=$(( $$ % 200 + 20 ))
HOST_IP=10.214.$SUB.1
NS_IP=10.214.$SUB.2
PORT=8080
URL=http://$NS_IP:$PORT
PIDS=()          # every background process we start
SERVER_PID=

kill_pid() {     # PID [seconds]: SIGTERM, wait, then SIGKILL
    local pid=$1 secs=${2:-20} i=0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ $i -lt $((secs * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    ip link del "$HOST_IF" 2>/dev/null || true
    rm -rf "$WORK/runs/current"
    [ $rc -eq 0 ] || log "exit $rc (cleaned up namespace $NS and processes)"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ deps
need=()
for c in qemu-system-x86_64:qemu-system-x86 qemu-storage-daemon:qemu-storage-daemon \
         debootstrap:debootstrap curl:curl python3:python3 ip:iproute2 tc:iproute2 mkfs.ext4:e2fsprogs; do
    command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    timeout 900 apt-get install -y "${need[@]}" >/dev/null || die "apt-get install ${need[*]}"
fi

mkdir -p "$WORK/bin" "$WORK/runs"
log "building streamblk and the test store (cargo build --release)"
(cd "$ROOT" && timeout 1800 cargo build --release --quiet --bins --example bench-boot-store) || die "cargo build"
# Private copies: others may rebuild the tree while the benchmark runs.
for b in streamblk examples/bench-boot-store; do
    cp "$ROOT/target/release/$b" "$WORK/bin/${b##*/}.new" && mv "$WORK/bin/${b##*/}.new" "$WORK/bin/${b##*/}"
done
SBK=$WORK/bin/streamblk

log "building the Debian guest (cached)"
timeout 3600 bash "$ROOT/tests/guest/mkdebian.sh" "$WORK/guest" >&2 || die "mkdebian.sh"
G=$WORK/guest
RAW=$G/debian.raw
RAW_BYTES=$(stat -c %s "$RAW")

log "importing into a fresh store ($((CHUNK / 1024)) KiB chunks)"
rm -rf "$WORK/store"
ID=$(timeout 600 "$SBK" image import "$RAW" --store "$WORK/store" --name "$IMAGE" --chunk-size $CHUNK 2>/dev/null) \
    || die "image import"
"$SBK" image inspect "$IMAGE" --store "$WORK/store" >&2

# ------------------------------------------------------------------ network
log "namespace $NS: store at $URL behind $HOST_IF <-> $NS_IF"
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$NS_IF"
ip link set "$NS_IF" netns "$NS"
ip addr add "$HOST_IP/30" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip netns exec "$NS" ip addr add "$NS_IP/30" dev "$NS_IF"
ip netns exec "$NS" ip link set "$NS_IF" up
ip netns exec "$NS" ip link set lo up

set_rate() {     # tc rate on both ends of the veth
    local rate=$1 burst=64kb
    case "$rate" in *gbit) burst=512kb ;; esac
    tc qdisc replace dev "$HOST_IF" root tbf rate "$rate" burst $burst latency 100ms
    ip netns exec "$NS" tc qdisc replace dev "$NS_IF" root tbf rate "$rate" burst $burst latency 100ms
}

ip netns exec "$NS" "$WORK/bin/bench-boot-store" "$WORK/store" \
    --listen "$NS_IP" --port $PORT --delay-ms "$DELAY_MS" --file "/$IMAGE.raw=$RAW" \
    > "$WORK/store-server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 100); do curl -sf -m 2 "$URL/__stats" >/dev/null && break; sleep 0.1; done
curl -sf -m 5 "$URL/__stats" >/dev/null || die "store server did not start (see $WORK/store-server.log)"
ctl() { curl -sf -m 10 "$URL/__$1"; }

# ------------------------------------------------------------------ one boot
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

wait_socket() {  # PATH PID
    local i=0
    while [ ! -S "$1" ]; do
        kill -0 "$2" 2>/dev/null || die "disk server for $1 exited (see its log)"
        i=$((i + 1)); [ $i -le 300 ] || die "no socket $1 after 30 s"
        sleep 0.1
    done
}

start_qemu() {   # SOCK RUNDIR
    qemu-system-x86_64 -accel tcg -m "$MEM_MB" -smp 1 -no-reboot -nic none -display none -monitor none \
        -serial stdio -object "memory-backend-memfd,id=mem,size=${MEM_MB}M,share=on" \
        -machine memory-backend=mem -chardev "socket,id=c0,path=$1" -device vhost-user-blk-pci,chardev=c0 \
        -kernel "$G/vmlinuz" -initrd "$G/initrd.img" -append 'console=ttyS0 root=/dev/vda rw quiet' \
        < /dev/null > "$2/console.log" 2> "$2/qemu.err" &
    QEMU_PID=$!
    PIDS+=("$QEMU_PID")
}

wait_boot() {    # RUNDIR: waits for BOOT-COMPLETE
    local deadline=$((SECONDS + BOOT_TIMEOUT))
    until grep -q BOOT-COMPLETE "$1/console.log" 2>/dev/null; do
        kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited before BOOT-COMPLETE (see $1/console.log)"
        [ $SECONDS -lt $deadline ] || die "no BOOT-COMPLETE after ${BOOT_TIMEOUT} s (see $1/console.log)"
        sleep 0.05
    done
}

finish_guest() { # the guest powers itself off; bound the wait
    local i=0
    while kill -0 "$QEMU_PID" 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    kill_pid "$QEMU_PID" 5
}

# streamblk serve for one run; $1 = RUNDIR, $2 = extra disk spec fields, $3 = --fill-rate
start_streamblk() {
    # shellcheck disable=SC2086
    RUST_LOG=${RUST_LOG:-info} "$SBK" serve --store "$URL" --cache-dir "$1/cache" --fill-rate "${3:-$FILL_RATE}" \
        --control-socket "$1/control.sock" $SERVE_ARGS \
        --disk "name=vm,socket=$1/vm.sock,overlay=$1/overlay,image=$IMAGE$2" > "$1/streamblk.log" 2>&1 &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
}

RESULTS=$WORK/results.tsv
# mode rate run total_s qemu_s store_bytes server_bytes server_requests hits stalls streamed first_read_ms done_ms guest_wait_ms download_s qemu_cpu_s disk_server_cpu_s fill_after_boot_Bps
run_one() {      # MODE RATE RUN
    local mode=$1 rate=$2 run=$3
    local dir=$WORK/runs/$mode-$rate-$run t0 tq tb dl=- store=0 st='{}'
    rm -rf "$dir" "$WORK/runs/current"; mkdir -p "$dir"
    ln -sfn "$dir" "$WORK/runs/current"
    ctl reset >/dev/null
    if [ "$mode" = profile ]; then ctl profiles/on >/dev/null; else ctl profiles/off >/dev/null; fi
    case "$mode" in
    local|copy)
        if [ "$mode" = local ]; then
            cp --sparse=always "$RAW" "$dir/disk.raw"
            t0=$(now)
        else
            t0=$(now)
            timeout 1800 curl -sSf -o "$dir/disk.raw" "$URL/$IMAGE.raw" || die "download $URL/$IMAGE.raw"
            dl=$(elapsed "$t0" "$(now)")
        fi
        qemu-storage-daemon --blockdev "file,filename=$dir/disk.raw,node-name=f,aio=io_uring" \
            --blockdev raw,file=f,node-name=d \
            --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$dir/vm.sock,writable=on" \
            > "$dir/qsd.log" 2>&1 &
        DAEMON_PID=$!; PIDS+=("$DAEMON_PID")
        ;;
    lazy|profile)
        t0=$(now)
        start_streamblk "$dir" ""
        ;;
    auto)
        t0=$(now)
        start_streamblk "$dir" "" "${BENCH_AUTO_FILL:-auto}"
        ;;
    learned)
        [ -d "$WORK/learned-$rate" ] || die "no learned profile for $rate: run mode auto first"
        mkdir -p "$dir/cache"
        cp -a "$WORK/learned-$rate" "$dir/cache/profiles"
        t0=$(now)
        start_streamblk "$dir" "" auto
        ;;
    esac
    wait_socket "$dir/vm.sock" "$DAEMON_PID"
    tq=$(now)
    start_qemu "$dir/vm.sock" "$dir"
    wait_boot "$dir"
    tb=$(now)
    # QEMU's CPU time to BOOT-COMPLETE: a TCG boot is CPU-bound, so wall time
    # well above it means the guest waited (for I/O or for a busy host CPU).
    local qcpu dcpu
    qcpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$QEMU_PID/stat")
    # The disk server's (streamblk's or qemu-storage-daemon's) CPU time so far.
    dcpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$DAEMON_PID/stat")
    local fill=-
    if [ "$mode" != local ] && [ "$mode" != copy ]; then
        st=$(timeout 10 "$SBK" status --control-socket "$dir/control.sock" --json) || st='{}'
    fi
    local srv; srv=$(ctl stats)
    echo "$st" > "$dir/status.json"; echo "$srv" > "$dir/server.json"

    finish_guest
    if [ "$mode" = auto ] || [ "$mode" = learned ]; then
        # The guest is gone, its disk still served: background fill should
        # take the link once the boot has been quiet for 20 s. Its rate while
        # it runs: the store's bytes sampled every 0.1 s for up to 45 s, over
        # the span they grew in (at 1 Gbit/s the whole image may take a
        # second or two, so a fixed window would miss it).
        fill=$(python3 - "$URL/__stats" "$DAEMON_PID" "$SERVER_PID" "$dir/fill.tsv" <<'EOF'
import json, os, sys, time, urllib.request
url, daemon, server, out = sys.argv[1:]
hz = os.sysconf("SC_CLK_TCK")
def served():
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["bytes"]
def cpu(pid):  # CPU seconds of a process (0 once it is gone)
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / hz
    except OSError:
        return 0.0
def host():  # busy CPU seconds of the whole host (all cores)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / hz
samples, end = [], time.time() + 45
log = open(out, "w")
log.write("t\tstore_bytes\tdaemon_cpu_s\tserver_cpu_s\thost_busy_cpu_s\n")
t00 = time.time()
while time.time() < end:
    samples.append((time.time(), served()))
    log.write(f"{samples[-1][0] - t00:.3f}\t{samples[-1][1]}\t{cpu(daemon):.2f}\t{cpu(server):.2f}\t{host():.2f}\n")
    # Done: grew, then 3 s with no growth.
    grew = [i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]]
    if grew and samples[-1][0] - samples[grew[-1]][0] > 3:
        break
    time.sleep(0.1)
grew = [i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]]
if len(grew) < 2:
    print(0)
else:
    (t0, b0), (t1, b1) = samples[grew[0] - 1], samples[grew[-1]]
    print(int((b1 - b0) / (t1 - t0)))
EOF
)
    fi
    kill_pid "$DAEMON_PID" 30
    if [ "$mode" = auto ]; then
        # What this first boot taught the daemon, for the learned run.
        [ -d "$dir/cache/profiles" ] || die "the auto run learned no profile (see $dir/streamblk.log)"
        rm -rf "$WORK/learned-$rate"
        cp -a "$dir/cache/profiles" "$WORK/learned-$rate"
    fi
    python3 - "$mode" "$rate" "$run" "$(elapsed "$t0" "$tb")" "$(elapsed "$tq" "$tb")" "$dl" "$dir" "$qcpu" "$dcpu" "$fill" >> "$RESULTS" <<'EOF'
import json, sys
mode, rate, run, total, qemu, dl, d, qcpu, dcpu, fill = sys.argv[1:]
st = json.load(open(d + "/status.json")) or {}
srv = json.load(open(d + "/server.json"))
f = st.get("fetch") or {}
imgs = st.get("images") or [{}]
p = (imgs[0] or {}).get("profile") or {}
store = f.get("store_bytes", srv["bytes"]) if mode not in ("local", "copy") else srv["bytes"]
g = lambda k, src=p: "-" if src.get(k) is None else str(src.get(k))
print("\t".join([mode, rate, run, total, qemu, str(store), str(srv["bytes"]), str(srv["requests"]),
                 g("hits"), g("stalls"), g("streamed"), g("first_read_ms"), g("done_ms"),
                 g("guest_wait_ms", f), dl, qcpu, dcpu, fill]))
EOF
    log "$mode $rate #$run: $(tail -n1 "$RESULTS" | cut -f4) s (qemu $(tail -n1 "$RESULTS" | cut -f5) s, qemu cpu $qcpu s, disk server cpu $dcpu s), store bytes $(tail -n1 "$RESULTS" | cut -f6)"
    rm -rf "$dir/disk.raw" "$dir/cache" "$dir/overlay" "$WORK/runs/current"
}

# ------------------------------------------------------------------ profile
log "recording a boot trace (streamblk, 1gbit, empty cache, no profile)"
set_rate 1gbit
rm -rf "$WORK/store/profiles"
REC=$WORK/runs/record
rm -rf "$REC"; mkdir -p "$REC"
ctl profiles/off >/dev/null
start_streamblk "$REC" ",record-trace=$REC/boot.trace,trace-secs=$BOOT_TIMEOUT"
wait_socket "$REC/vm.sock" "$DAEMON_PID"
tq=$(now)
start_qemu "$REC/vm.sock" "$REC"
wait_boot "$REC"
CUT_US=$(awk -v a="$tq" -v b="$(now)" 'BEGIN { printf "%d", (b - a) * 1e6 }')
finish_guest
kill_pid "$DAEMON_PID" 30
# The trace runs from attach (at or after QEMU's start) to the daemon's exit:
# keep the reads before BOOT-COMPLETE, not the shutdown's.
awk -v cut="$CUT_US" '/^#/ || $1 <= cut' "$REC/boot.trace" > "$REC/boot-until-complete.trace"
"$SBK" profile build "$REC/boot-until-complete.trace" -o "$WORK/boot.profile" --chunk-size $CHUNK >&2
"$SBK" image set-profile "$IMAGE" "$WORK/boot.profile" --store "$WORK/store" >&2
"$SBK" image inspect "$IMAGE" --store "$WORK/store" | grep '^profile' >&2
rm -rf "$REC/cache" "$REC/overlay"

# Boot working set: what the boot reads, from the trace and the profile.
WSET=$(python3 - "$REC/boot-until-complete.trace" "$WORK/boot.profile" "$WORK/store/manifests/$ID" <<'EOF'
import json, sys
trace, prof, man = sys.argv[1:]
blocks = set()
for line in open(trace):
    if line.startswith("#") or not line.strip():
        continue
    _, off, ln = map(int, line.split())
    blocks.update(range(off // 4096, (off + ln + 4095) // 4096))
m = json.load(open(man))
chunks = json.load(open(prof))["chunks"]
cs = m["chunk_size"]
nonzero = [c for c in chunks if m["chunks"][c] is not None]
stored = sum(m["chunks"][c]["n"] for c in nonzero)
print(len(blocks) * 4096, len(chunks), len(chunks) * cs, len(nonzero) * cs, stored)
EOF
)
read -r WS_READ WS_CHUNKS WS_CHUNK_BYTES WS_NONZERO_BYTES WS_STORED <<< "$WSET"
log "boot working set: $WS_READ bytes read (4 KiB blocks), $WS_CHUNKS chunks = $WS_CHUNK_BYTES bytes ($WS_NONZERO_BYTES not all-zero, $WS_STORED stored)"

# ------------------------------------------------------------------ runs
: > "$RESULTS"
for run in $(seq "$RUNS"); do
    for mode in $MODES; do
        if [ "$mode" = local ]; then
            run_one local - "$run"; continue
        fi
        for rate in $RATES; do
            set_rate "$rate"
            run_one "$mode" "$rate" "$run"
        done
    done
done

# ------------------------------------------------------------------ table
python3 - "$RESULTS" "$RAW_BYTES" "$WS_READ" "$WS_CHUNKS" "$WS_CHUNK_BYTES" "$WS_NONZERO_BYTES" "$WS_STORED" \
    "$RATES" "$MODES" "$FILL_RATE" "$DELAY_MS" "$RUNS" > "$WORK/results.md" <<'EOF'
import statistics as st, sys
res, raw, ws_read, ws_chunks, ws_cb, ws_nz, ws_stored, rates, modes, fill, delay, runs = sys.argv[1:]
raw, ws_read, ws_chunks, ws_cb, ws_nz, ws_stored = map(int, (raw, ws_read, ws_chunks, ws_cb, ws_nz, ws_stored))
rows = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
MiB = lambda b: f"{b / 2**20:.1f} MiB"
def med(mode, rate, col):
    v = [float(r[col]) for r in rows if r[0] == mode and (mode == "local" or r[1] == rate) and r[col] != "-"]
    return st.median(v) if v else None
loc = med("local", "-", 3)
print(f"Boot to BOOT-COMPLETE, Debian bookworm (systemd), TCG, median of {runs} runs; "
      f"store latency {delay} ms/request, 256 KiB chunks, --fill-rate {fill}.\n")
print("| mode | link | boot (s) | vs local | store bytes before boot complete | vs working set (stored) | profile hits / stalls | guest wait (ms) | QEMU CPU (s) | wall - CPU (s) |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
cpu = lambda m, r: "-" if med(m, r, 15) is None else f"{med(m, r, 15):.1f}"
def idle(mode, rate):  # QEMU start to BOOT-COMPLETE minus QEMU's CPU time: the guest waiting
    v = [float(r[4]) - float(r[15]) for r in rows
         if r[0] == mode and (mode == "local" or r[1] == rate) and len(r) > 15 and r[15] != "-"]
    return f"{st.median(v):.2f}" if v else "-"
if loc is not None:
    print(f"| local | - | {loc:.1f} | 1.00 | 0 | - | - | - | {cpu('local', '-')} | {idle('local', '-')} |")
for mode in modes.split():
    if mode == "local":
        continue
    for rate in rates.split():
        t = med(mode, rate, 3)
        if t is None:
            continue
        b = med(mode, rate, 5)
        ratio = f"{t / loc:.2f}" if loc else "-"
        hs = "-"
        if mode in ("profile", "learned") and med(mode, rate, 8) is not None:
            hs = f"{med(mode, rate, 8):.0f} / {med(mode, rate, 9):.0f}"
        extra = ""
        if mode == "copy":
            extra = f" (download {med(mode, rate, 14):.1f} s)"
        w = med(mode, rate, 13)
        w = "-" if w is None else f"{w:.0f}"
        print(f"| {mode} | {rate} | {t:.1f}{extra} | {ratio} | {MiB(b)} | {b / ws_stored:.2f}x | {hs} | {w} | {cpu(mode, rate)} | {idle(mode, rate)} |")
print()
# The goals of the defaults: a first boot close to a fill-off one, a learned
# profile as good as a hand-made one, little more than the working set read
# before the boot completes, and the link used once the guest is idle.
link = lambda r: float(r[:-4]) * (1e9 if r.endswith("gbit") else 1e6) / 8
for rate in rates.split():
    a, l, p, n = (med(m, rate, 3) for m in ("auto", "lazy", "profile", "learned"))
    if a is not None and l is not None:
        print(f"- {rate}: defaults, no profile / fill off: {a / l:.2f}x (goal <= 1.10x); "
              f"store bytes before boot complete {med('auto', rate, 5) / ws_stored:.2f}x the working set (goal <= 1.2x)")
    if n is not None and p is not None:
        print(f"- {rate}: learned profile / hand-made profile: {n / p:.2f}x (goal <= 1.05x)")
    f = med("auto", rate, 17)
    if f is not None:
        print(f"- {rate}: background fill after the boot: {f / 1e6:.1f} MB/s, {f / link(rate) * 100:.0f}% of the link (goal >= 80%)")
print()
print("QEMU CPU: CPU time QEMU used from its start to BOOT-COMPLETE (a TCG boot is CPU-bound); "
      "wall - CPU: the time the guest spent waiting (for its disk, or for a busy host).")
print()
print(f"Boot working set: {MiB(ws_read)} read by the guest (distinct 4 KiB blocks); "
      f"{ws_chunks} chunks in the profile = {MiB(ws_cb)} ({MiB(ws_nz)} not all-zero), "
      f"{MiB(ws_stored)} as stored (zstd). Image: {MiB(raw)} raw.")
print()
print("Every run (results.tsv): mode rate run total_s qemu_s store_bytes server_bytes server_requests "
      "hits stalls streamed first_read_ms done_ms guest_wait_ms download_s qemu_cpu_s disk_server_cpu_s "
      "fill_after_boot_Bps")
EOF
echo
cat "$WORK/results.md"
echo
column -t "$RESULTS"
