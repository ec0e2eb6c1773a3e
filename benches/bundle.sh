#!/usr/bin/env bash
# Packs the live data-plane benchmark (benches/dataplane.py) with every program it runs and
# their shared libraries into one archive, for a machine that has a Linux kernel, python3 and
# root but no way to install packages (a lent multi-core machine, a locked-down dom0).
# Programs run through the bundled glibc loader, so the target's libc version does not matter.
#
# usage: benches/bundle.sh OUT.tar.xz      (after `cargo build --release`)
# on the target, as root:
#   python3 -c 'import tarfile; tarfile.open("OUT.tar.xz").extractall("/")'
#   PATH=/tmp/vsb/wrap:$PATH VIRTSEC_BIN_DIR=/tmp/vsb/bin SURICATA_YAML=/tmp/vsb/suricata.yaml \
#       benches/dataplane.py --no-build ...
# The archive unpacks to /tmp/vsb (fixed, so the wrappers and Suricata's paths need no rewriting).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "$1")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/tmp/vsb
mkdir -p "$root"/{bin,lib,wrap,etc}
progs=(ip nft iperf3 sockperf ping)
command -v suricata >/dev/null && progs+=(suricata)
# suricata-ips turns the guests' offloads off with it.
command -v ethtool >/dev/null && progs+=(ethtool)
for p in "${progs[@]}"; do cp -L "$(command -v "$p")" "$root/bin/$p"; done
for p in virtsec virtsecd; do
    cp "$repo/target/release/$p" "$root/bin/$p"
    strip "$root/bin/$p"
done
# Every library the programs link, the loader, and the matcher virtsecd opens at run time.
for f in "$root"/bin/*; do
    ldd "$f" | awk '$3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r l; do cp -L "$l" "$root/lib/"; done
for l in /usr/lib/x86_64-linux-gnu/libhs.so.5; do [ -e "$l" ] && cp -L "$l" "$root/lib/"; done
for p in "${progs[@]}" virtsec virtsecd; do
    printf '#!/bin/sh\nexec /tmp/vsb/lib/ld-linux-x86-64.so.2 --library-path /tmp/vsb/lib /tmp/vsb/bin/%s "$@"\n' \
        "$p" >"$root/wrap/$p"
    chmod +x "$root/wrap/$p"
done
if command -v suricata >/dev/null; then
    cp /etc/suricata/*.config "$root/etc/" 2>/dev/null || true
    python3 "$repo/../shared/bench/make_suricata_yaml.py" "$root/suricata.yaml"
    sed -i "s#/etc/suricata/#/tmp/vsb/etc/#g" "$root/suricata.yaml"
fi
tar -C "$stage" -cJf "$out" tmp/vsb
echo "$out: $(du -h "$out" | cut -f1) ($(ls "$root/bin" | tr '\n' ' '))"
