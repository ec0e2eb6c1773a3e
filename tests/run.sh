#!/usr/bin/env bash
# virtsec's test command: what CI runs (.ci/run calls this) and what a developer runs.
# As root it installs the Debian packages the tests need; then formatting and lint checks,
# the lab scenario, the unit and integration tests, and the real-Xen harness
# (tests/xen-e2e/run.sh: Xen 4.17 under QEMU, about 1 minute with a warm image cache,
# 3 from cold). XEN_E2E=skip skips the last stage, loudly. Layers: docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v xenstore-read >/dev/null 2>&1 || missing+=(xenstore-utils)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
# Hyperscan (runtime library only: virtsec loads it with dlopen); the matcher differential
# and parity tests must not skip it here.
[ -e /usr/lib/x86_64-linux-gnu/libhs.so.5 ] || missing+=(libhyperscan5)
export VIRTSEC_REQUIRE_HYPERSCAN=1
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "tests need: ${missing[*]} (sudo apt-get install ${missing[*]}, or run this script as root)" >&2
        exit 1
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings
echo "== build"
cargo build --locked --bins
if [ "$(id -u)" -eq 0 ]; then
    echo "== virtsec lab (default scenario: namespaces, bridge, traffic, the whole service)"
    ./target/debug/virtsec lab --run-dir "$(mktemp -d)/lab"
else
    echo "== virtsec lab --scenario xenstore (the default scenario needs root)"
    ./target/debug/virtsec lab --scenario xenstore --run-dir "$(mktemp -d)/lab"
fi
echo "== cargo test"
cargo test --locked

if [ "${FUZZ:-run}" = skip ]; then
    echo "== fuzz SKIPPED because FUZZ=skip" >&2
else
    echo "== fuzz (every target, ${FUZZ_RUNS:-20000} runs each; nightly-style: FUZZ_RUNS=10000000 fuzz/run.sh)"
    FUZZ_RUNS=${FUZZ_RUNS:-20000} fuzz/run.sh
fi

if [ "$(id -u)" -eq 0 ]; then
    echo "== packages (.deb into a debootstrapped Debian 12 chroot, lintian, .rpm)"
    tests/packaging/run.sh
else
    echo "== packages SKIPPED: building and installing them in a chroot needs root" >&2
fi

if [ "${XEN_E2E:-run}" = skip ]; then
    echo "== xen-e2e SKIPPED because XEN_E2E=skip: nothing was checked against a real Xen host" >&2
elif [ "$(id -u)" -ne 0 ]; then
    echo "== xen-e2e SKIPPED: the real-Xen harness needs root (debootstrap, chroot); run: sudo tests/run.sh" >&2
else
    echo "== xen-e2e (Xen 4.17 + dom0 + PV guests under QEMU)"
    tests/xen-e2e/run.sh
fi
