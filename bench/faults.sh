#!/usr/bin/env bash
# faults.sh: fault injection on real Debian roots (issue 22): a failed upgrade must leave the
# host usable, a hung master must not hang syncd, two syncd runs must not race.
#
# Usage: bench/faults.sh [CASE...]   (default: all)
#   enospc-refused   bullseye minbase on a 280 MB ext4 with 34 MB free, upgraded to bookworm
#                    minbase: refused up front (exit 7), the root untouched and chroot-able;
#                    after the filesystem grows (resize2fs), a rerun converges
#   enospc-staging   the same upgrade with room for it, but the disk is filled behind syncd's
#                    back once it has started staging: rolled back (exit 7), root untouched
#   sigkill          the upgrade killed with SIGKILL at random points, ROUNDS times (default
#                    30): no torn file, temp data never over one pass's worth, then a pass
#                    converges and leaves no temp entry; chroot works, dpkg --verify is clean
#   concurrent       two `syncd sync` on one root at once: one refuses (exit 8) naming the
#                    other's pid; with --wait it queues; the root converges, no leftovers
#   hung-master      a listener that accepts and never replies, and a master frozen with
#                    SIGSTOP mid-transfer: `sync` exits 3 within its deadline, `run` exits 0
#                    within 5 s of SIGTERM
#
# Needs root, the corpora (bench/corpora.sh bullseye-minbase bookworm-minbase), a release
# build (cargo build --release), e2fsprogs, util-linux, rsync, b3sum is not needed.
# Env: CORPORA=/var/tmp/gis-corpora, SCRATCH=/var/tmp/gis-faults, ROUNDS=30,
#      SYNCD/SYNCMASTER (default target/release/… of this checkout).
# Prints one PASS/FAIL line per check and exits 1 if any failed.
set -uo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
SCRATCH=${SCRATCH:-/var/tmp/gis-faults}
ROUNDS=${ROUNDS:-30}
SYNCD=${SYNCD:-$REPO/target/release/syncd}
SYNCMASTER=${SYNCMASTER:-$REPO/target/release/syncmaster}
OLD=$CORPORA/bullseye-minbase
NEW=$CORPORA/bookworm-minbase

die() { echo "faults.sh: $*" >&2; exit 2; }
log() { echo "[$(date +%T)] $*" >&2; }
FAILED=0
check() { # check NAME CONDITION-EXIT-STATUS DETAIL
    if [ "$2" -eq 0 ]; then echo "PASS $1${3:+: $3}"; else echo "FAIL $1${3:+: $3}"; FAILED=1; fi
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
for d in "$OLD" "$NEW"; do [ -d "$d" ] || die "missing corpus $d (run bench/corpora.sh bullseye-minbase bookworm-minbase)"; done
[ -x "$SYNCD" ] && [ -x "$SYNCMASTER" ] || die "build first: cargo build --release"

mkdir -p "$SCRATCH"
WORK=$(mktemp -d "$SCRATCH/run.XXXXXX")
MNT=$WORK/mnt IMG=$WORK/disk.img
MASTER_PID=""
cleanup() {
    [ -z "$MASTER_PID" ] || { kill -CONT "$MASTER_PID" 2>/dev/null; kill "$MASTER_PID" 2>/dev/null; wait "$MASTER_PID" 2>/dev/null; }
    umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

# start_master IMAGE [EXTRA...] -> sets MASTER_PID, URL
start_master() {
    local image=$1; shift
    "$SYNCMASTER" serve --insecure --image "$image" --image-version "${VERSION:-2}" --listen 127.0.0.1:0 "$@" \
        >"$WORK/master.out" 2>"$WORK/master.err" &
    MASTER_PID=$!
    for _ in $(seq 600); do grep -q '^listening on' "$WORK/master.out" 2>/dev/null && break; sleep 0.1; done
    URL="http://$(sed -n 's/^listening on //p' "$WORK/master.out")"
    [ "$URL" != "http://" ] || die "syncmaster did not start: $(cat "$WORK/master.err")"
}
stop_master() { [ -z "$MASTER_PID" ] || { kill -CONT "$MASTER_PID" 2>/dev/null; kill "$MASTER_PID"; wait "$MASTER_PID" 2>/dev/null; MASTER_PID=""; }; }

# disk MIB: a fresh ext4 of MIB MiB at $MNT holding a copy of the old release at $MNT/root
disk() {
    umount "$MNT" 2>/dev/null; rm -f "$IMG"; mkdir -p "$MNT"
    truncate -s "${1}M" "$IMG" && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$IMG" && mount -o loop "$IMG" "$MNT" || die "cannot make the loop filesystem"
    cp -a "$OLD" "$MNT/root" || die "the old release does not fit in ${1} MiB"
    sync
}
free_mib() { df -m --output=avail "$MNT" | tail -n1 | tr -d ' '; }
# fill_to MIB: a ballast file outside the root until only MIB MiB are free (for non-root)
fill_to() {
    local want=$1 have; have=$(free_mib)
    [ "$have" -le "$want" ] || fallocate -l "$(( (have - want) ))M" "$MNT/ballast"
}
# `syncd sync` on the root; in the background, run the binary itself ("${SYNC[@]}" … &), so
# that $! is syncd's pid and a kill reaches it, not a subshell.
syncd_sync() { "$SYNCD" sync --insecure -q --master "$URL" --root "$MNT/root" --state-dir "$WORK/state" "$@"; }
sync_cmd() { SYNC=("$SYNCD" sync --insecure -q --master "$URL" --root "$MNT/root" --state-dir "$WORK/state"); }
usable() { chroot "$MNT/root" /bin/bash -c true 2>"$WORK/chroot.err"; }
same_as() { # same_as TREE: rsync sees no difference (./ aside)
    local out; out=$(rsync -aHAXcn --numeric-ids --delete -i "$1/" "$MNT/root/" | grep -v -E '^[^ ]+ \./$')
    [ -z "$out" ] || { echo "$out" | head -n 5 >&2; return 1; }
}
temps() { find "$MNT/root" -xdev -name '.syncd-*' | wc -l; }

case_enospc_refused() {
    log "enospc-refused: bullseye on 280 MB, 34 MB free, to bookworm"
    disk 280; fill_to 34
    start_master "$NEW"
    local rc=0; syncd_sync 2>"$WORK/sync.err" || rc=$?
    check "enospc-refused: exit 7" $([ $rc -eq 7 ]; echo $?) "exit $rc; $(grep -o 'it needs [^;]*' "$WORK/sync.err" | head -n1)"
    usable; check "enospc-refused: chroot ROOT /bin/bash -c true" $? "$(head -c 200 "$WORK/chroot.err")"
    same_as "$OLD"; check "enospc-refused: root is the old release, untouched (rsync -aHAXcn)" $?
    log "growing the filesystem to 600 MB (offline resize2fs: online resizing is refused in some sandboxes) and rerunning"
    umount "$MNT" && truncate -s 600M "$IMG" && e2fsck -f -p "$IMG" >/dev/null && resize2fs "$IMG" >/dev/null 2>&1 && mount -o loop "$IMG" "$MNT" || die "cannot grow the filesystem"
    rc=0; syncd_sync 2>"$WORK/sync.err" || rc=$?
    check "enospc-refused: rerun after growing converges" $([ $rc -eq 0 ]; echo $?) "exit $rc: $(tail -n1 "$WORK/sync.err")"
    usable; check "enospc-refused: chroot after the upgrade" $?
    same_as "$NEW"; check "enospc-refused: root is the new release (rsync -aHAXcn)" $?
    stop_master
}

case_enospc_staging() {
    log "enospc-staging: room for the upgrade, then the disk fills while syncd stages"
    disk 600
    start_master "$NEW"
    sync_cmd; "${SYNC[@]}" --write-bytes-per-sec 40MiB 2>"$WORK/sync.err" &
    local pid=$! rc=0
    for _ in $(seq 200); do [ "$(temps)" -eq 0 ] || break; sleep 0.05; done
    dd if=/dev/zero of="$MNT/ballast" bs=1M status=none 2>/dev/null
    wait $pid || rc=$?
    check "enospc-staging: exit 7 (rolled back)" $([ $rc -eq 7 ]; echo $?) "exit $rc: $(tail -n1 "$WORK/sync.err")"
    usable; check "enospc-staging: chroot ROOT /bin/bash -c true" $? "$(head -c 200 "$WORK/chroot.err")"
    same_as "$OLD"; check "enospc-staging: root is the old release, untouched, directory mtimes included" $?
    check "enospc-staging: no temp entries left" "$(temps)" "$(temps) left"
    rm -f "$MNT/ballast"
    rc=0; syncd_sync 2>"$WORK/sync.err" || rc=$?
    check "enospc-staging: rerun with room converges" $([ $rc -eq 0 ]; echo $?) "exit $rc"
    same_as "$NEW"; check "enospc-staging: root is the new release" $?
    stop_master
}

case_sigkill() {
    log "sigkill: $ROUNDS kills at random points of the upgrade"
    disk 600
    start_master "$NEW"
    # One pass's worth: the bytes of every file of the new release whose content the old lacks.
    local one_pass torn=0 over=0 most=0 r after t pid
    one_pass=$(python3 - "$OLD" "$NEW" <<'EOF'
import hashlib, os, sys
def files(top):
    for d, _, fs in os.walk(top):
        for f in fs:
            p = os.path.join(d, f)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p
old = {hashlib.sha256(open(p, 'rb').read()).digest() for p in files(sys.argv[1])}
print(sum(os.path.getsize(p) for p in files(sys.argv[2]) if hashlib.sha256(open(p, 'rb').read()).digest() not in old))
EOF
)
    for r in $(seq "$ROUNDS"); do
        after=$(( RANDOM % 1500 ))
        sync_cmd; "${SYNC[@]}" --write-bytes-per-sec 100MiB 2>>"$WORK/sigkill.err" & pid=$!
        sleep "$(printf '0.%03d' "$after")"; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        # torn: a regular file whose content is neither release's at its path
        t=$(python3 - "$MNT/root" "$OLD" "$NEW" <<'EOF'
import os, sys
root, old, new = sys.argv[1:]
torn, temp = 0, 0
for d, dirs, fs in os.walk(root):
    dirs[:] = [x for x in dirs if not x.startswith('.syncd-')]
    for f in fs:
        p = os.path.join(d, f)
        if f.startswith('.syncd-'):
            temp += os.lstat(p).st_size if os.path.isfile(p) and not os.path.islink(p) else 0
            continue
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        rel = os.path.relpath(p, root)
        got = open(p, 'rb').read()
        ok = False
        for top in (old, new):
            q = os.path.join(top, rel)
            if os.path.isfile(q) and not os.path.islink(q) and open(q, 'rb').read() == got:
                ok = True
        torn += not ok
print(torn, temp)
EOF
)
        torn=$((torn + ${t%% *})); most=$(( ${t##* } > most ? ${t##* } : most ))
        [ "${t##* }" -le "$one_pass" ] || over=$((over + 1))
    done
    check "sigkill: 0 torn files over $ROUNDS kills" $([ $torn -eq 0 ]; echo $?) "$torn torn"
    check "sigkill: temp data never over one pass's worth" $([ $over -eq 0 ]; echo $?) "most $most of $one_pass bytes"
    local rc=0 t0; t0=$(date +%s.%N)
    syncd_sync 2>"$WORK/sync.err" || rc=$?
    check "sigkill: the final pass converges" $([ $rc -eq 0 ]; echo $?) "exit $rc in $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s: $(tail -n1 "$WORK/sync.err" | cut -c1-300)"
    check "sigkill: no temp entries left" "$(temps)"
    same_as "$NEW"; check "sigkill: root is the new release (rsync -aHAXcn)" $?
    usable; check "sigkill: chroot works" $?
    if command -v dpkg >/dev/null; then
        local v; v=$(dpkg --verify --root="$MNT/root" 2>&1 | grep -v '^??5??????   /' | head -n 5)
        check "sigkill: dpkg --verify --root is clean" $([ -z "$v" ]; echo $?) "$v"
    fi
    # Recovery time: a pass after a kill late in staging, against a clean pass, same upgrade.
    local clean rec reused
    disk 600; t0=$(date +%s.%N); syncd_sync 2>/dev/null; clean=$(echo "$(date +%s.%N) - $t0" | bc)
    disk 600
    sync_cmd; "${SYNC[@]}" --write-bytes-per-sec 100MiB 2>/dev/null & pid=$!
    for _ in $(seq 400); do [ "$(temps)" -lt 3000 ] || break; sleep 0.02; done
    kill -9 $pid; wait $pid 2>/dev/null
    local left; left=$(temps)
    t0=$(date +%s.%N); syncd_sync 2>"$WORK/sync.err"; rec=$(echo "$(date +%s.%N) - $t0" | bc)
    reused=$(grep -o 'from an interrupted pass: [0-9]* staged files reused, [0-9]* leftovers removed' "$WORK/sync.err")
    check "sigkill: the first pass after a kill (${left} temp files left) is not much slower than a clean pass" \
        $([ "$(echo "$rec < 1.5 * $clean + 0.5" | bc)" = 1 ]; echo $?) "clean ${clean:0:5} s, after the kill ${rec:0:5} s; ${reused:-nothing reused}"
    stop_master
}

case_concurrent() {
    log "concurrent: two syncd sync on one root"
    disk 600
    start_master "$NEW"
    "$SYNCD" sync --insecure -q --master "$URL" --root "$MNT/root" --state-dir "$WORK/state" --write-bytes-per-sec 20MiB 2>"$WORK/a.err" &
    local a=$! rca=0 rcb=0 rcc=0
    for _ in $(seq 200); do [ "$(temps)" -eq 0 ] || break; sleep 0.05; done
    syncd_sync 2>"$WORK/b.err" || rcb=$?
    check "concurrent: the second run refuses with exit 8, naming the holder" $([ $rcb -eq 8 ] && grep -q "pid $a" "$WORK/b.err"; echo $?) "exit $rcb: $(grep -v WARN "$WORK/b.err" | head -n1 | cut -c1-200)"
    syncd_sync --wait 2>"$WORK/c.err" || rcc=$?
    wait $a || rca=$?
    check "concurrent: holder and --wait both exit 0" $([ $rca -eq 0 ] && [ $rcc -eq 0 ]; echo $?) "exits $rca, $rcc"
    check "concurrent: no temp entries left" "$(temps)"
    same_as "$NEW"; check "concurrent: root converged" $?
    stop_master
}

case_hung_master() {
    log "hung-master: a silent listener, and a master frozen mid-transfer"
    mkdir -p "$WORK/host"
    python3 -c '
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
conns = []
end = time.time() + 120
while time.time() < end:
    s.settimeout(1)
    try: conns.append(s.accept()[0])
    except OSError: pass
' >"$WORK/silent.port" &
    local silent=$! port t0 rc
    for _ in $(seq 50); do [ -s "$WORK/silent.port" ] && break; sleep 0.1; done
    port=$(cat "$WORK/silent.port")
    t0=$(date +%s.%N); rc=0
    "$SYNCD" sync --insecure -q --master "http://127.0.0.1:$port" --root "$WORK/host" --state-dir "$WORK/state" 2>"$WORK/h.err" || rc=$?
    check "hung-master: sync against a silent listener exits 3" $([ $rc -eq 3 ]; echo $?) "exit $rc after $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s: $(tail -n1 "$WORK/h.err" | cut -c1-200)"
    "$SYNCD" run --insecure --master "http://127.0.0.1:$port" --root "$WORK/host" --state-dir "$WORK/state" 2>"$WORK/r.err" & local d=$!
    sleep 2; t0=$(date +%s.%N); kill -TERM $d; rc=0; wait $d || rc=$?
    check "hung-master: run exits 0 within 5 s of SIGTERM (silent listener)" $([ $rc -eq 0 ] && [ "$(echo "$(date +%s.%N) - $t0 < 5" | bc)" = 1 ]; echo $?) "exit $rc after $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
    kill $silent 2>/dev/null
    disk 600
    start_master "$NEW"
    sync_cmd; "${SYNC[@]}" --net-bytes-per-sec 20MiB 2>"$WORK/s.err" & local p=$!
    for _ in $(seq 200); do [ "$(temps)" -eq 0 ] || break; sleep 0.05; done
    kill -STOP "$MASTER_PID"; t0=$(date +%s.%N); rc=0; wait $p || rc=$?
    check "hung-master: sync against a SIGSTOPped master exits 3" $([ $rc -eq 3 ]; echo $?) "exit $rc after $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
    usable; check "hung-master: root still usable" $?
    "$SYNCD" run --insecure --master "$URL" --root "$MNT/root" --state-dir "$WORK/state" 2>"$WORK/r2.err" & d=$!
    sleep 2; t0=$(date +%s.%N); kill -TERM $d; rc=0; wait $d || rc=$?
    check "hung-master: run exits 0 within 5 s of SIGTERM (frozen master)" $([ $rc -eq 0 ] && [ "$(echo "$(date +%s.%N) - $t0 < 5" | bc)" = 1 ]; echo $?) "exit $rc after $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-5) s"
    stop_master
}

for c in "${@:-enospc-refused enospc-staging sigkill concurrent hung-master}"; do
    for c in $c; do "case_${c//-/_}"; done
done
exit $FAILED
