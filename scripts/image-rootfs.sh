#!/usr/bin/env bash
# Lays out the container image's whole root filesystem in DIR around a built
# gateway binary: the binary, the shared libraries it links (the loader,
# libc, libm, libgcc_s: from `ldd`), an /etc/passwd and /etc/group naming
# the non-root user 65532, an nsswitch.conf (so service names resolve through
# DNS), and an empty /tmp. The image is this directory and nothing else
# (FROM scratch): no shell, no package manager.
#   scripts/image-rootfs.sh target/release/gateway DIR
# Used by the Dockerfile's build stage and by the test suite's local image
# build (the same layout, built from this machine's binary).
set -euo pipefail
bin=$1
out=$2
rm -rf "$out"
mkdir -p "$out/etc" "$out/tmp"
chmod 1777 "$out/tmp"
install -m 0755 "$bin" "$out/gateway"
# Every library the binary loads, at the path the loader looks for it.
ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
  while read -r lib; do
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
  done
printf 'root:x:0:0:root:/:/sbin/nologin\ngateway:x:65532:65532:gateway:/:/sbin/nologin\n' >"$out/etc/passwd"
printf 'root:x:0:\ngateway:x:65532:\n' >"$out/etc/group"
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
