#!/usr/bin/env bash
# Build and cache the golden-image sync benchmark corpora: real Debian root trees
# (debootstrap) and one synthetic many-small-files tree.
#
# Usage: bench/corpora.sh [NAME...]      (default: all corpora, files-1m last)
#   NAMES: bookworm-minbase bullseye-minbase trixie-minbase bookworm-big files-1m
#   files-1m: 1,000,000 small regular files (1000 dirs x 1000 files, sizes 0..4096 bytes,
#             content and metadata deterministic), made by bench/gen-files.py, no
#             debootstrap; about 2 GB of content, 3.9 GB on disk (du, ext4); built in ~1.5 min
#
# Env:
#   CORPORA  output directory (default /var/tmp/gis-corpora)
#   MIRROR   Debian mirror       (default http://deb.debian.org/debian)
#
# Each corpus is built into $CORPORA/NAME.tmp with debootstrap, then renamed to
# $CORPORA/NAME; a marker file $CORPORA/NAME.done (outside the tree, so it is not
# part of the image) records success, and a corpus with a marker is skipped.
# Rebuild one with: rm -rf "$CORPORA/NAME" "$CORPORA/NAME.done"; bench/corpora.sh NAME
# Needs root and: apt-get install -y debootstrap libcap2-bin (files-1m needs only python3)
set -euo pipefail

CORPORA=${CORPORA:-/var/tmp/gis-corpora}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ALL=(bookworm-minbase bullseye-minbase trixie-minbase bookworm-big files-1m)
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIG_INCLUDE=systemd,openssh-server,python3,perl,gcc,g++,git,vim,curl,iproute2,iputils-ping,sudo,rsyslog,cron,nginx

die() { echo "corpora.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"

mkdir -p "$CORPORA/.debcache"

# Unmount anything debootstrap may have left mounted under a (failed) build dir.
umount_under() {
    local dir=$1 m
    command -v findmnt >/dev/null || return 0
    findmnt -rn -o TARGET | awk -v d="$dir/" 'index($0, d) == 1' | sort -r |
        while read -r m; do umount -l "$m" || true; done
}

# build_synthetic NAME TMP LOG: generate a synthetic corpus into TMP, check its file count
build_synthetic() {
    local name=$1 tmp=$2 log=$3 want n
    case $name in
        files-1m) want=1000000 ;;
        *) die "no generator for $name" ;;
    esac
    command -v python3 >/dev/null || die "python3 missing"
    if ! python3 "$BENCH_DIR/gen-files.py" "$tmp" 1000 1000 1 >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "== $name: FAILED (full log: $log; partial tree left in $tmp)" >&2
        return 1
    fi
    n=$(find "$tmp" -type f | wc -l)
    if [ "$n" -ne "$want" ]; then
        echo "== $name: FAILED: $n regular files, expected $want (tree left in $tmp)" >&2
        return 1
    fi
    sync
}

build() {
    local name=$1 suite args=()
    local dest="$CORPORA/$name" tmp="$CORPORA/$name.tmp" done="$CORPORA/$name.done"
    case "$name" in
        bookworm-minbase) suite=bookworm ;;
        bullseye-minbase) suite=bullseye ;;
        trixie-minbase)   suite=trixie ;;
        bookworm-big)     suite=bookworm; args+=("--include=$BIG_INCLUDE") ;;
        files-1m)         suite="" ;;
        *) die "unknown corpus '$name' (known: ${ALL[*]})" ;;
    esac
    if [ -e "$done" ] && [ -d "$dest" ]; then
        echo "== $name: cached at $dest"
        return 0
    fi
    echo "== $name: building (${suite:-synthetic}) into $tmp"
    if [ -e "$tmp" ]; then umount_under "$tmp"; rm -rf --one-file-system "$tmp"; fi
    if [ -e "$dest" ]; then umount_under "$dest"; rm -rf --one-file-system "$dest"; fi
    local t0=$SECONDS log="$CORPORA/$name.log"
    if [ -z "$suite" ]; then
        build_synthetic "$name" "$tmp" "$log" || return 1
        mv -T "$tmp" "$dest"
        date -u +%FT%TZ >"$done"
        echo "== $name: done in $((SECONDS - t0))s: $(du -sh "$dest" | cut -f1), $(find "$dest" | wc -l) entries"
        return 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install -y debootstrap"
    if ! debootstrap --variant=minbase "${args[@]}" --cache-dir="$CORPORA/.debcache" \
            "$suite" "$tmp" "$MIRROR" >"$log" 2>&1; then
        umount_under "$tmp"
        tail -n 30 "$log" >&2
        echo "== $name: FAILED (full log: $log; partial tree left in $tmp)" >&2
        return 1
    fi
    umount_under "$tmp"
    mv -T "$tmp" "$dest"
    date -u +%FT%TZ >"$done"
    echo "== $name: done in $((SECONDS - t0))s: $(du -sh "$dest" | cut -f1), $(find "$dest" | wc -l) entries"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")
rc=0
for n in "${names[@]}"; do build "$n" || rc=1; done

for n in "${names[@]}"; do
    d="$CORPORA/$n"
    [ -d "$d" ] && [ -e "$d.done" ] || continue
    if [ -e "$d/usr/bin/ping" ] && command -v getcap >/dev/null; then
        echo "   $n: getcap usr/bin/ping: $(getcap "$d/usr/bin/ping" | awk '{print $2}')"
    fi
done
exit $rc
