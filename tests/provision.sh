#!/usr/bin/env bash
# Installs the system tools the slow tests use (mkfs for xfs and btrfs,
# FUSE, strace, sshfs, an SSH server, iproute2, GlusterFS's server and
# client, Redis for JuiceFS's metadata) where this runs as root with
# apt-get; elsewhere it only says what is missing, and those tests skip with
# the reason.  `provision.sh measured` adds Ceph's and MooseFS's servers and
# clients, for tox's "measured" env.
set -u
packages=(xfsprogs btrfs-progs e2fsprogs fuse3 libfuse3-dev pkg-config strace sshfs openssh-server openssh-client iproute2 util-linux glusterfs-server glusterfs-client redis-server)
if [ "${1:-}" = measured ]; then
    packages+=(ceph-mon ceph-osd ceph-mds ceph-fuse ceph-common moosefs-master moosefs-chunkserver moosefs-client)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "provision: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null
    exit $?
fi
echo "provision: missing ${missing[*]} (not root or no apt-get): the tests that need them will skip"
exit 0
