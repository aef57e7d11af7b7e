#!/usr/bin/env bash
# A QEMU guest whose disk is a streamblk vhost-user-blk socket.
# vhost-user needs the guest's RAM shared with the daemon (memfd, share=on).
# reconnect-ms (QEMU 9.2+; older QEMU: reconnect=1) makes QEMU reconnect to a
# restarted daemon; the guest's disk keeps working.
#
# Start the daemon first, e.g.:
#   streamblk serve --disk name=vm1,socket=/run/streamblk/vm1.sock,overlay=/var/lib/streamblk/vm1,base=/images/debian.raw,queues=2
SOCK=${1:-/run/streamblk/vm1.sock}
exec qemu-system-x86_64 -accel kvm -m 2G -smp 2 \
    -object memory-backend-memfd,id=mem,size=2G,share=on \
    -machine q35,memory-backend=mem \
    -chardev socket,id=disk0,path="$SOCK",reconnect-ms=1000 \
    -device vhost-user-blk-pci,chardev=disk0,num-queues=2,bootindex=1 \
    -nographic
