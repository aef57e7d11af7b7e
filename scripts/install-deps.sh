#!/usr/bin/env bash
# Installs what streamblk's build, tests and demo need on Debian bookworm (as root).
# QEMU comes from bookworm-backports: qemu-system-x86 and qemu-utils must come
# from the same release, and the guest tests use QEMU 9.2+'s reconnect-ms.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: run as root (apt-get)" >&2
    exit 1
fi

. /etc/os-release
. "$(dirname "$0")/apt-mirror.sh"
if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(bookworm_mirror | sed -n 1p)
    if [ -z "$mirror" ]; then
        echo "install-deps.sh: no bookworm source in /etc/apt to derive bookworm-backports from" >&2
        exit 1
    fi
    echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
backports=()
[ "${VERSION_CODENAME:-}" = bookworm ] && backports=(-t bookworm-backports)
apt-get install -y -q "${backports[@]}" qemu-system-x86 qemu-utils
# policy-rc.d keeps Debian from starting nginx's default site: the tests
# start their own nginx, inside a network namespace.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -q linux-image-amd64 busybox-static cpio e2fsprogs kmod gzip iproute2 nginx-light
# libvirt's daemon and clients for the libvirt test (which starts libvirtd
# itself), xmllint for virt-xml-validate, promtool (prometheus) to check the
# metrics endpoint, systemd-analyze to verify the unit.
apt-get install -y -q --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
    libxml2-utils prometheus systemd
# etcd for the fleet membership test (tests/p2p_etcd.rs starts its own on
# loopback; the packaged service is not needed), protoc for etcd-client's build.
apt-get install -y -q --no-install-recommends etcd-server protobuf-compiler

# An S3-compatible server for the S3 store test (moto, from PyPI), on loopback only.
if [ ! -x /opt/streamblk-moto/bin/moto_server ]; then
    python3 -m venv /opt/streamblk-moto || { apt-get install -y -q python3-venv && python3 -m venv /opt/streamblk-moto; }
    /opt/streamblk-moto/bin/pip install -q 'moto[server]'
fi

if ! command -v cargo >/dev/null; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "install-deps.sh: no Rust toolchain (cargo) found; install rustup's stable toolchain" >&2; exit 1; }
echo "dependencies installed: $(qemu-system-x86_64 --version | head -n1), $(cargo --version)"
