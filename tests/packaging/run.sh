#!/usr/bin/env bash
# Packaging test: builds the .deb and .rpm (packaging/build.sh), checks the .deb with lintian
# (no errors), installs it into a fresh debootstrapped Debian 12 root (chroot; the base tree
# is cached by package versions), checks the binaries run there, `systemd-analyze verify`
# accepts the unit, an upgrade keeps quarantine records, removal and purge never delete them;
# checks `rpm -qlp` lists the expected files. Prints "N passed, M failed"; exits non-zero on
# any failure. Needs root (debootstrap, chroot); run by tests/run.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
cache=${VIRTSEC_PKG_CACHE:-/var/cache/virtsec/pkg-root}
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "ok - $1${2:+ ($2)}"; }
notok() { fail=$((fail + 1)); echo "not ok - $1: $2"; }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }
[ "$(id -u)" -eq 0 ] || { echo "packaging test needs root"; echo "0 passed, 1 failed"; exit 1; }

need=()
for pair in lintian:lintian rpm:rpm debootstrap:debootstrap systemd-analyze:systemd; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if out=$(bash packaging/build.sh 2>&1); then
    ok "packaging/build.sh builds both packages" "$(echo "$out" | tail -2 | xargs -n1 basename | tr '\n' ' ')"
else
    notok "packaging/build.sh" "$(echo "$out" | tail -5 | tr '\n' ' ')"; finish
fi
deb=$(ls target/packaging/virtsec_*_amd64.deb | tail -1)
rpmf=$(ls target/packaging/virtsec-*.x86_64.rpm | tail -1)

# lintian: no errors (warnings are reported).
lint=$(lintian --allow-root "$deb" 2>&1)
if ! grep -q '^E:' <<<"$lint"; then
    ok "lintian reports no errors" "$(echo "$lint" | grep -c '^W:') warning(s)"
else
    notok "lintian reports no errors" "$(echo "$lint" | grep '^E:' | tr '\n' ' ')"
fi

# rpm -qlp lists what a dom0 needs.
list=$(rpm -qlp "$rpmf" 2>/dev/null)
missing=""
for f in /usr/sbin/virtsecd /usr/bin/virtsec /etc/virtsec/virtsecd.toml /usr/lib/systemd/system/virtsecd.service \
         /etc/xen/scripts/vif-virtsec /etc/xen/scripts/vif-post.d/virtsec.hook /etc/xapi.d/plugins/virtsec /etc/xapi.d/vif-hotplug \
         /etc/logrotate.d/virtsec /usr/share/man/man8/virtsecd.8.gz /usr/share/man/man1/virtsec.1.gz; do
    grep -qx "$f" <<<"$list" || missing="$missing $f"
done
[ -z "$missing" ] && ok "rpm -qlp lists the binaries, config, unit, Xen/XAPI hooks, logrotate, man pages" "$(echo "$list" | wc -l) files" \
                  || notok "rpm -qlp lists the expected files" "missing:$missing"

# A fresh Debian 12 root with what the package depends on, cached.
key="bookworm-$(apt-cache policy nftables | awk '/Candidate:/ {print $2}')-v2"
base="$cache/$key.tar"
if [ ! -s "$base" ]; then
    mkdir -p "$cache"; t=$(mktemp -d)
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if debootstrap --variant=minbase --include=nftables,iproute2,python3,procps,systemd,init-system-helpers \
        bookworm "$t/root" "${mirror:-http://deb.debian.org/debian}" >/dev/null 2>&1; then
        tar -C "$t/root" -cf "$base.tmp" . && mv "$base.tmp" "$base"
    fi
    rm -rf "$t"
fi
[ -s "$base" ] || { notok "debootstrap a Debian 12 root" "failed"; finish; }
root=$(mktemp -d)
trap 'umount "$root/proc" 2>/dev/null; rm -rf "$root"' EXIT
tar -C "$root" -xf "$base"
mount -t proc proc "$root/proc"
# No service starts inside the chroot (standard policy-rc.d).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
cp "$deb" "$root/tmp/virtsec.deb"

if out=$(chroot "$root" dpkg -i /tmp/virtsec.deb 2>&1); then
    ok "dpkg -i into a fresh debootstrapped Debian 12 root" "$(chroot "$root" dpkg-query -W virtsec)"
else
    notok "dpkg -i into a fresh Debian 12 root" "$(echo "$out" | tail -5 | tr '\n' ' ')"; finish
fi
v=$(chroot "$root" virtsecd --version 2>&1) && ok "virtsecd --version in the chroot" "$v" || notok "virtsecd --version" "$v"
h=$(chroot "$root" virtsec --help 2>&1) && grep -q quarantine <<<"$h" && ok "virtsec --help in the chroot" "$(echo "$h" | grep -c '^  ') commands" || notok "virtsec --help" "$h"
c=$(chroot "$root" virtsecd --check-config 2>&1) && ok "the shipped configuration parses" "$c" || notok "virtsecd --check-config" "$c"
sv=$(chroot "$root" systemd-analyze verify /usr/lib/systemd/system/virtsecd.service 2>&1)
# man-db is not in the minimal root: the Documentation= page is checked as a file instead.
sv=$(echo "$sv" | grep -v "Command 'man virtsecd(8)' failed")
[ -f "$root/usr/share/man/man8/virtsecd.8.gz" ] || sv="$sv no virtsecd(8) man page"
if [ -z "$(echo "$sv" | grep -v -e '^$' -e 'xenstored.service' -e 'xen.service' -e 'proc-xen.mount' -e 'xendomains.service')" ]; then
    ok "systemd-analyze verify virtsecd.service" "$( [ -n "$sv" ] && echo "only the Xen units it orders after are absent here" || echo clean)"
else
    notok "systemd-analyze verify virtsecd.service" "$(echo "$sv" | tr '\n' ' ')"
fi
[ -d "$root/var/lib/virtsec/quarantine" ] && [ -d "$root/var/log/virtsec" ] \
    && ok "postinst made the state and log directories" || notok "postinst directories" "missing"
[ -L "$root/etc/systemd/system/multi-user.target.wants/virtsecd.service" ] \
    && ok "the unit is enabled" || notok "the unit is enabled" "no multi-user.target.wants link"

# Upgrade keeps quarantine records and edited conffiles; removal and purge never drop records.
rec=/var/lib/virtsec/quarantine/5e1ab000-0000-4000-8000-000000000005.json
echo '{"uuid":"5e1ab000-0000-4000-8000-000000000005","actions":["isolate"],"reason":"r","since":1,"by":"t"}' > "$root$rec"
echo "# edited" >> "$root/etc/virtsec/virtsecd.toml"
out=$(chroot "$root" dpkg -i --force-confold /tmp/virtsec.deb 2>&1)
if [ -f "$root$rec" ] && grep -q "# edited" "$root/etc/virtsec/virtsecd.toml"; then
    ok "upgrade keeps quarantine records and the edited configuration" "$(echo "$out" | grep -o 'keeps [0-9]* quarantine record(s)' | head -1)"
else
    notok "upgrade keeps state" "$out"
fi
out=$(chroot "$root" dpkg -r virtsec 2>&1)
[ -f "$root$rec" ] && grep -q "quarantined" <<<"$out" \
    && ok "removal keeps quarantine records and says the kernel rules stay" || notok "removal keeps records" "$out"
out=$(chroot "$root" dpkg -P virtsec 2>&1)
[ -f "$root$rec" ] && [ ! -d "$root/var/log/virtsec" ] \
    && ok "purge removes logs but keeps quarantine records, and says so" "$(echo "$out" | grep -o 'purge keeps[^:]*' | head -1)" \
    || notok "purge keeps quarantine records" "$out"
finish
