#!/usr/bin/env bash
# Demo on built-in defaults: builds a sample golden tree and a drifted host root in a temp
# dir, starts syncmaster on loopback (a free port), shows the plan (dry run), converges the
# host, shows that a second pass has nothing to do, and proves nothing outside the root was
# touched. Needs only cargo; run as root to include device nodes, setuid and ownership.
set -euo pipefail
cd "$(dirname "$0")"

echo "==> building (release)"
cargo build --release --quiet --bins
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/gis-demo.XXXXXX")
master_pid=
cleanup() {
    [ -n "$master_pid" ] && kill "$master_pid" 2>/dev/null && wait "$master_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

img=$work/golden host=$work/host outside=$work/outside
mkdir -p "$img"/{etc/ssh,usr/bin,usr/lib,var/tmp} "$host"/{etc,usr/bin} "$outside"

echo "==> golden image in $img"
echo "Welcome to the golden image." >"$img/etc/motd"
printf 'Port 22\nPermitRootLogin no\n' >"$img/etc/ssh/sshd_config"
printf 'PRETTY_NAME="Golden Linux 1"\n' >"$img/usr/lib/os-release"
ln -s ../usr/lib/os-release "$img/etc/os-release"
cp /bin/true "$img/usr/bin/hello"
ln "$img/usr/bin/hello" "$img/usr/bin/hello-again"
mkfifo "$img/var/initctl"
chmod 1777 "$img/var/tmp"
if [ "$(id -u)" = 0 ]; then
    cp /bin/true "$img/usr/bin/suid-tool" && chmod 4755 "$img/usr/bin/suid-tool"
    mknod "$img/null" c 1 3
    chown 0:0 -R "$img"
fi

echo "==> drifted host root in $host"
echo "edited by hand" >"$host/etc/motd"
echo "stale" >"$host/etc/old.conf"
cp "$img/usr/bin/hello" "$host/usr/bin/hello-moved"   # moved content: copied locally, not fetched
echo "do not touch" >"$outside/sshd_config"
ln -s "$outside" "$host/etc/ssh"                       # a planted symlink leading outside the root
before=$(find "$outside" -printf '%p %s %T@ %m\n' | sort | sha256sum)

# Signed versions: the master signs each manifest, the host accepts only its key. The transport
# is plain TCP on loopback here (--insecure); a fleet uses mTLS (README, Trust).
"$bin/syncmaster" keygen --out "$work/signing.key" >/dev/null 2>&1
trusted=$(cat "$work/signing.key.pub")
echo "==> master signing key: $trusted"
"$bin/syncmaster" serve --image "$img" --listen 127.0.0.1:0 --insecure --signing-key "$work/signing.key" \
    >"$work/master.out" 2>"$work/master.log" &
master_pid=$!
for _ in $(seq 100); do grep -q '^listening on ' "$work/master.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/master.out")
[ -n "$addr" ] || { cat "$work/master.log"; echo "syncmaster did not start" >&2; exit 1; }
echo "==> syncmaster listening on $addr"

echo; echo "==> syncd sync --dry-run (changes nothing)"
syncd=("$bin/syncd" sync --master "http://$addr" --root "$host" --insecure --trusted-key "$trusted" --state-dir "$work/state")
"${syncd[@]}" --dry-run
echo; echo "==> syncd sync"
"${syncd[@]}"
echo; echo "==> syncd sync again: nothing left to do"
"${syncd[@]}"

after=$(find "$outside" -printf '%p %s %T@ %m\n' | sort | sha256sum)
[ "$before" = "$after" ] && echo "==> outside the root: untouched (the planted symlink was replaced, not followed)"
if command -v rsync >/dev/null; then
    diff=$(rsync -aHAXcn --numeric-ids --delete -i "$img/" "$host/")
    [ -z "$diff" ] && echo "==> rsync -aHAXcn --numeric-ids --delete finds no difference between image and host"
fi
