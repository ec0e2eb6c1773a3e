#!/usr/bin/env bash
# Real-Xen end-to-end harness: Xen 4.17 + a Debian 12 dom0 (real oxenstored, xl, netback) +
# busybox PV guests, booted under QEMU (TCG) on any Linux machine. Builds the images from
# Debian packages only, caches what is slow (keyed on package versions), puts this tree's
# freshly built virtsec binaries into dom0, runs tests/xen-e2e/checks.sh there and reports.
# Exits non-zero on any failure; its last line is "N passed, M failed".
#
# Usage: sudo tests/xen-e2e/run.sh        (env: XEN_E2E_CACHE, XEN_E2E_TIMEOUT, XEN_E2E_KEEP)
# Recipe and timings: docs/testing.md and ../shared/docs/xen-in-qemu.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${XEN_E2E_CACHE:-/var/cache/virtsec/xen-e2e}
timeout_s=${XEN_E2E_TIMEOUT:-1200}
t_start=$(date +%s)

say() { echo "xen-e2e: $*" >&2; }
die() { say "ERROR: $*"; echo "0 passed, 1 failed"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and apt-get need it)"

# --- host tools -----------------------------------------------------------------------------
need=()
for pair in qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap zstd:zstd cpio:cpio \
            busybox:busybox-static xenstore-write:xenstore-utils; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -x /bin/busybox ] && grep -q dynamic <<<"$(file /bin/busybox 2>/dev/null)" && need+=(busybox-static)
if [ "${#need[@]}" -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- versions and cache key -----------------------------------------------------------------
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }
[ -n "$(candidate xen-hypervisor-4.17-amd64)" ] || apt-get update -qq
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ && !k {k = $2} END {print k}')
[ -n "$kpkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"
key="xen-$(candidate xen-hypervisor-4.17-amd64)_${kpkg}-$(candidate "$kpkg")_utils-$(candidate xen-utils-4.17)_v8"
key=${key//[:+~]/_}
img="$cache/$key"
mkdir -p "$img"

# --- hypervisor and kernel ------------------------------------------------------------------
if [ ! -s "$img/xen" ] || [ ! -s "$img/vmlinuz" ] || [ ! -d "$img/modules" ]; then
    say "fetching hypervisor and kernel ($key)"
    dl=$(mktemp -d)
    chmod 755 "$dl"   # apt's _apt user downloads into it
    (cd "$dl" && apt-get download -q xen-hypervisor-4.17-amd64 "$kpkg" >/dev/null)
    mkdir -p "$dl/x" "$dl/k"
    dpkg-deb -x "$dl"/xen-hypervisor-*.deb "$dl/x"
    zcat "$dl"/x/boot/xen-4.17-amd64.gz > "$img/xen.tmp" && mv "$img/xen.tmp" "$img/xen"
    dpkg-deb -x "$dl"/linux-image-*.deb "$dl/k"
    cp "$dl"/k/boot/vmlinuz-* "$img/vmlinuz"
    rm -rf "$img/modules" && mv "$dl/k/lib/modules" "$img/modules"
    rm -rf "$dl"
fi
# The guests' kernel: the ELF inside the bzImage, gzip-compressed (12 MB), which xl
# decompresses 3-4 times faster than the bzImage's XZ (0.37 s against 1.3 s natively).
# Under TCG the XZ took 20-60 s of dom0 CPU per domain, long enough for a guest created
# while dom0 was busy to miss the checks' 60 s limits on a slower host (2026-11-28: guest2
# and guest3 in 3 of 3 runs). Uncompressed (65 MB) it does not fit dom0's root file system.
if [ ! -s "$img/vmlinux.gz" ]; then
    python3 - "$img/vmlinuz" "$img/vmlinux.gz.tmp" <<'PY'
import gzip, lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no XZ payload in " + sys.argv[1])
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the XZ payload of " + sys.argv[1] + " is not an ELF image")
open(sys.argv[2], "wb").write(gzip.compress(elf, compresslevel=1))
PY
    mv "$img/vmlinux.gz.tmp" "$img/vmlinux.gz"
fi
kver=$(ls "$img/modules")

# --- dom0 root file system (debootstrap, cached as a trimmed tree) --------------------------
if [ ! -f "$img/rootfs.done" ]; then
    say "debootstrapping dom0 (once per package versions)"
    rm -rf "$img/rootfs"
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    debootstrap --variant=minbase \
        --include=xen-utils-4.17,xenstore-utils,iproute2,bridge-utils,kmod,iputils-ping,procps,jq,nftables,python3 \
        bookworm "$img/rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    r=$img/rootfs
    # Kernel modules dom0 and the guest need (not the whole tree: size is boot time).
    m=$r/usr/lib/modules/$kver
    mkdir -p "$m/kernel"
    (cd "$img/modules/$kver" && cp modules.order modules.builtin* "$m/" &&
        for d in kernel/drivers/xen kernel/drivers/net/xen-netback kernel/drivers/net/xen-netfront.ko \
                 kernel/drivers/net/veth.ko* kernel/net/sched/sch_ingress.ko* kernel/net/sched/cls_bpf.ko* \
                 kernel/net/bridge kernel/net/802 kernel/net/llc \
                 kernel/net/netfilter/nfnetlink.ko* kernel/net/netfilter/nf_tables.ko* \
                 kernel/net/netfilter/nft_limit.ko* kernel/lib/libcrc32c.ko* \
                 kernel/crypto/crc32c_generic.ko* kernel/arch/x86/crypto/crc32c-intel.ko*; do
            [ -e "$d" ] && cp -a --parents "$d" "$m/"
        done)
    chroot "$r" depmod "$kver"
    rm -rf "$r"/usr/share/{doc,man,info,locale,i18n} "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* \
           "$r"/usr/lib/udev/hwdb.* "$r"/usr/share/perl* "$r"/usr/lib/x86_64-linux-gnu/perl* \
           "$r"/usr/share/zoneinfo
    touch "$img/rootfs.done"
fi

# --- guest initramfs (static busybox, netfront, a XenStore client) --------------------------
# Keyed on the guest's /init too, so editing guest-init.sh rebuilds it.
guest_img=$img/guest-$(sha256sum "$here/guest-init.sh" | cut -c1-12).cpio.gz
if [ ! -s "$guest_img" ]; then
    say "building the guest initramfs"
    g=$(mktemp -d)
    mkdir -p "$g"/{bin,dev,proc,sys,etc,lib/modules,usr/bin,lib64,lib/x86_64-linux-gnu}
    cp /bin/busybox "$g/bin/busybox"
    for a in sh ip ping sleep mount cat echo insmod ifconfig seq date; do ln -s busybox "$g/bin/$a"; done
    nf=$(find "$img/modules/$kver" -name 'xen-netfront.ko*' -print -quit)
    case "$nf" in
        *.xz) xz -dc "$nf" > "$g/lib/modules/xen-netfront.ko" ;;
        *.zst) zstd -qdc "$nf" > "$g/lib/modules/xen-netfront.ko" ;;
        *) cp "$nf" "$g/lib/modules/xen-netfront.ko" ;;
    esac
    # Debian's xenstore-write and its libraries: the guest writes its own frontend nodes (and
    # plays a driver domain's virtsec in dom0's XenStore tree).
    for b in /usr/bin/xenstore-write /usr/bin/xenstore-read /usr/bin/xenstore-rm /usr/bin/xenstore-list /usr/bin/xenstore; do cp -a "$b" "$g/usr/bin/" 2>/dev/null || true; done
    for lib in $(ldd /usr/bin/xenstore | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
        mkdir -p "$g$(dirname "$lib")" && cp -L "$lib" "$g$lib"
    done
    cp "$here/guest-init.sh" "$g/init" && chmod +x "$g/init"
    (cd "$g" && find . | cpio -o -H newc --quiet | gzip -1) > "$guest_img.tmp" && mv "$guest_img.tmp" "$guest_img"
    rm -rf "$g"
fi
say "images ready in $(( $(date +%s) - t_start )) s"

# --- this tree's package ---------------------------------------------------------------------
# dom0 gets virtsec the way an administrator installs it: the .deb, with dpkg -i.
(cd "$repo" && bash packaging/build.sh >/dev/null) || die "packaging/build.sh failed"
deb=$(ls "$repo"/target/packaging/virtsec_*_amd64.deb | tail -1)

# --- assemble dom0 initramfs ----------------------------------------------------------------
work=$(mktemp -d)
trap '[ -n "${XEN_E2E_KEEP:-}" ] || rm -rf "$work"' EXIT
ov=$work/overlay
mkdir -p "$ov"/xen-e2e
cp "$deb" "$ov/xen-e2e/virtsec.deb"
cp "$here/dom0-init.sh" "$ov/init"
cp "$here/checks.sh" "$img/vmlinux.gz" "$ov/xen-e2e/"
cp "$guest_img" "$ov/xen-e2e/guest.cpio.gz"
# The network driver domain (check 9b): dom0's root file system without what it does not run
# (Python, apt, charset converters), this tree's .deb unpacked, and its own /init.
dd_ov=$work/dd-overlay
mkdir -p "$dd_ov"
dpkg-deb -x "$deb" "$dd_ov"
cp "$here/dd-init.sh" "$dd_ov/init" && chmod +x "$dd_ov/init"
(cd "$img/rootfs" && find . \( -path ./usr/lib/python3.11 -o -path ./usr/lib/x86_64-linux-gnu/gconv \
        -o -path ./usr/lib/apt -o -path ./var/lib/apt -o -path ./var/lib/dpkg -o -path ./var/cache \) -prune \
        -o -print | cpio -o -H newc --quiet) > "$work/dd.cpio"
(cd "$dd_ov" && find . | cpio -o -H newc --quiet) >> "$work/dd.cpio"
zstd -q -1 -T0 "$work/dd.cpio" -o "$ov/xen-e2e/dd.cpio.zst"
rm -f "$work/dd.cpio"
chmod +x "$ov/init" "$ov/xen-e2e/checks.sh"
(cd "$img/rootfs" && find . | cpio -o -H newc --quiet) > "$work/root.cpio"
(cd "$ov" && find . | cpio -o -H newc --quiet) >> "$work/root.cpio.ov"
# Two concatenated newc archives: the kernel unpacks both, the overlay last.
cat "$work/root.cpio" "$work/root.cpio.ov" | zstd -q -1 -T0 > "$work/dom0.cpio.zst"
say "dom0 initramfs $(du -m "$work/dom0.cpio.zst" | cut -f1) MB; booting Xen under QEMU (TCG)"

# --- boot -----------------------------------------------------------------------------------
# -cpu max without XSAVE and AVX-512: with them, QEMU TCG under Xen corrupts the extended
# register state of dom0 processes when several are busy at once (seen: xl failing to
# XZ-decompress a guest kernel, vif-bridge dying with status 2, only while virtsecd or another
# dom0 process was active). smap=0: TCG's SMAP emulation crashes dom0 at its first instruction.
log=$work/serial.log
t_boot=$(date +%s)
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max,-xsave,-avx512f -m 2G -smp 2 -nographic -nic none -no-reboot \
    -kernel "$img/xen" \
    -append "console=com1 com1=115200 dom0_mem=768M loglvl=all guest_loglvl=all smap=0" \
    -initrd "$img/vmlinuz console=hvc0 earlyprintk=xen rdinit=/init quiet,$work/dom0.cpio.zst" \
    </dev/null > "$log" 2>&1
qrc=$?
set -e
say "QEMU exited $qrc after $(( $(date +%s) - t_boot )) s"
[ -n "${XEN_E2E_LOG:-}" ] && cp "$log" "$XEN_E2E_LOG"

# --- report ---------------------------------------------------------------------------------
tr -d '\r' < "$log" | grep -E '^(ok|not ok|#) ' || true
pass=$(tr -d '\r' < "$log" | grep -c '^ok ' || true)
fail=$(tr -d '\r' < "$log" | grep -c '^not ok ' || true)
if ! grep -q $'^\r*# xen-e2e done' "$log"; then
    say "the checks did not finish (QEMU rc $qrc); last lines of the serial console:"
    tr -d '\r' < "$log" | tail -40 >&2
    fail=$((fail + 1))
fi
say "total $(( $(date +%s) - t_start )) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
