#!/usr/bin/env bash
# Builds virtsec's .deb (cargo-deb) and .rpm (cargo-generate-rpm) into target/packaging/.
# Package contents and maintainer-script behaviour: docs/admin-guide.md; metadata: Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version "^3"
command -v cargo-generate-rpm >/dev/null 2>&1 || cargo install cargo-generate-rpm --locked --version "^0.21"
cargo build --release --locked --bins
out=target/packaging
mkdir -p "$out"
# Stripped copies for the .rpm (cargo-deb strips its own).
mkdir -p "$out/bin"
for b in virtsecd virtsec; do strip -o "$out/bin/$b" "target/release/$b"; done
gzip -9n -c packaging/man/virtsecd.8 > "$out/virtsecd.8.gz"
gzip -9n -c packaging/man/virtsec.1 > "$out/virtsec.1.gz"
cargo deb --no-build --strip --output "$out/" >/dev/null
cargo generate-rpm --output "$out/" >/dev/null
ls "$out"/*.deb "$out"/*.rpm
