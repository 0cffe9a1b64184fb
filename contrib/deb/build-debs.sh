#!/usr/bin/env bash
# Builds the syncd and syncmaster .deb packages with cargo-deb (cargo install cargo-deb):
# binaries, systemd units, example configs under /etc, man pages (clap_mangen) and shell
# completions (clap_complete), generated from the binaries' own clap definitions.
#
#   contrib/deb/build-debs.sh [OUT_DIR]          # release build; packages in OUT_DIR (default target/debian)
#   PROFILE=dev NO_BUILD=1 contrib/deb/build-debs.sh OUT_DIR   # package the binaries already in target/debug (tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-release}
out=${1:-target/debian}
target=${CARGO_TARGET_DIR:-target}
case "$profile" in dev) dir="$target/debug" ;; *) dir="$target/$profile" ;; esac
cargo_deb=${CARGO_DEB:-cargo-deb}
command -v "$cargo_deb" >/dev/null || { echo "build-debs.sh: $cargo_deb not found (hint: cargo install cargo-deb --version ^3 --locked)" >&2; exit 2; }

if [ -z "${NO_BUILD:-}" ]; then
    cargo build --profile "$profile" --locked -p syncd -p syncmaster --bins
fi
mkdir -p "$out"
for bin in syncd syncmaster; do
    # cargo-deb reads assets under target/release/ from the profile's directory in use.
    rm -rf "$dir/assets/$bin"
    "$dir/$bin" generate-assets "$dir/assets/$bin"
    gzip -9n "$dir/assets/$bin/man/"*.1   # Debian policy: man pages compressed
    "$cargo_deb" -p "$bin" --no-build --profile "$profile" --output "$out" --fast -q
done
ls "$out"/*.deb
