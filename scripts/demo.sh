#!/usr/bin/env bash
# Installs dependencies, builds streamblk and boots a real guest (Debian
# kernel, busybox root file system) whose root disk is served by streamblk.
# The guest checks its data, writes a file and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --locked

work=${STREAMBLK_DEMO_DIR:-/tmp/streamblk-demo}
mkdir -p "$work"
bash tests/guest/mkguest.sh "$work/guest"
# The image goes into a local store; the guest boots from an empty cache,
# its reads fetched on demand, the rest filled in the background.
./target/release/streamblk image import "$work/guest/rootfs.img" --store "$work/store" --name demo-guest
./target/release/streamblk image inspect demo-guest --store "$work/store"
rm -rf "$work/cache" "$work/demo.overlay"

./target/release/streamblk serve --store "$work/store" --cache-dir "$work/cache" \
    --control-socket "$work/control.sock" --fill-rate 1 \
    --disk "name=demo,socket=$work/demo.sock,overlay=$work/demo.overlay,image=demo-guest,queues=2" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S "$work/demo.sock" ] && break; sleep 0.1; done

echo "== booting the guest (TCG) from streamblk =="
timeout 300 qemu-system-x86_64 -accel tcg -m 512 -smp 1 -no-reboot -nic none \
    -display none -monitor none -serial stdio \
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
    -chardev "socket,id=c0,path=$work/demo.sock,reconnect-ms=1000" \
    -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
    -kernel "$work/guest/vmlinuz" -initrd "$work/guest/initrd.img" \
    -append "console=ttyS0 quiet panic=-1" </dev/null | tr -d '\r' | tee "$work/console.log"
grep -q GUEST-DONE "$work/console.log"
./target/release/streamblk status --control-socket "$work/control.sock"
echo "== the guest booted from an image streamed through streamblk, checked its data and wrote to its overlay ($work/demo.overlay) =="
