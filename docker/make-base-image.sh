#!/usr/bin/env bash
# Make a Debian bookworm base image locally, without any container registry: debootstrap a minimal
# rootfs with the distro Python (3.11) and `docker import` it. CI uses it as BASE_IMAGE for the CPU
# variant; anywhere a registry is reachable, `debian:bookworm-slim` is the equivalent base.
# Usage: make-base-image.sh [TAG]   (default job-base:bookworm; env MIRROR, FORCE=1 to rebuild)
# Needs root, debootstrap and a running docker daemon. Idempotent: an existing TAG is kept.
set -euo pipefail
tag=${1:-job-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
if [ "${FORCE:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"; exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is required (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }
root=$(mktemp -d /tmp/job-rootfs.XXXXXX)
cleanup() { umount -R "$root/proc" "$root/sys" "$root/dev" 2>/dev/null || true; rm -rf --one-file-system "$root"; }
trap cleanup EXIT
# The runtime needs: python3 + venv (ensurepip), CA roots, libgomp1 (OpenMP for llama.cpp and torch).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
  bookworm "$root" "$mirror" >/tmp/job-debootstrap.log 2>&1 \
  || { tail -30 /tmp/job-debootstrap.log >&2; exit 1; }
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" > "$root/etc/apt/sources.list"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["/bin/bash"]' \
  -m "debootstrap bookworm minbase + python3 python3-venv ca-certificates libgomp1 ($mirror)" - "$tag" >/dev/null
echo "base image $tag created: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
