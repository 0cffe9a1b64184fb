#!/usr/bin/env bash
# Large files as content-defined chunks (issue 25, part 4): the bytes an upgrade of one 256 MiB
# file moves, next to rsync's delta transfer of the same change.
#
# Corpus: one file of 256 MiB of seeded pseudo-random bytes (incompressible, so neither tool
# gains from compression); v2 inserts 10 KiB at 1 MiB and overwrites 1 MiB in the middle:
# 1,058,816 changed bytes. The image holds only that file.
#
# syncd: release binaries; syncmaster serves IMAGES/current (v1, then v2) with
# `--object-store s3://bkt/lf --chunk-threshold 16MiB` against s3s-fs on loopback. Each run
# starts the host as a copy of v1 and times `syncd sync` to v2. Bytes: the summary's chunk and
# index bytes from the store, and, measured outside syncd, the bytes s3s-fs wrote to its
# sockets during the pass (/proc/PID/io wchar: HTTP headers and bodies) and syncd's own socket
# reads (/proc/PID/io rchar less the file reads is not separable, so not used).
# rsync: a daemon on loopback serving v2, `rsync -a --no-whole-file --stats` into a copy of v1
# (the delta algorithm; -z would not help on random data): Total bytes received, Literal data.
# Each run also times a cold host (v2 into an empty dir): every chunk from the store, then the
# whole object from the master (`--object-store none`).
#
# Usage: bench/largefile.sh [RUNS]  (default 3). Needs s3s-fs (see README, Tests), rsync,
# python3, and `cargo build --release --bins` (CARGO_TARGET_DIR is honoured). Writes its raw
# output to a new file per run, bench/results/<UTC stamp>-largefile.md (or appends it to
# RESULTS when set). Scratch: $LARGEFILE_SCRATCH (default /var/tmp/gis-largefile), removed at
# the end.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-target}/${PROFILE:-release}
# The file size in MiB (the check is 256; smaller only to try the script).
MIB=${LARGEFILE_MIB:-256}
S=${LARGEFILE_SCRATCH:-/var/tmp/gis-largefile}
OUT=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
export PATH="$PATH:$HOME/.cargo/bin"
command -v s3s-fs >/dev/null || { echo "needs s3s-fs: cargo install s3s-fs --version 0.14.1 --features binary --locked" >&2; exit 2; }
[ -x "$TARGET/syncd" ] && [ -x "$TARGET/syncmaster" ] || { echo "needs cargo build --release --bins ($TARGET)" >&2; exit 2; }

rm -rf "$S"; mkdir -p "$S"/images/v1 "$S"/images/v2 "$S"/s3/bkt
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$S"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

python3 - "$S/images" "$MIB" <<'EOF'
import random, sys
d = sys.argv[1]
r = random.Random(25)
old = b"".join(r.randbytes(1 << 20) for _ in range(int(sys.argv[2])))
open(f"{d}/v1/big.img", "wb").write(old)
r = random.Random(26)
new = old[:1 << 20] + r.randbytes(10 << 10) + old[1 << 20:]
mid = len(new) // 2
new = new[:mid] + r.randbytes(1 << 20) + new[mid + (1 << 20):]
open(f"{d}/v2/big.img", "wb").write(new)
EOF
touch -d @1700000000 "$S"/images/v1/big.img "$S"/images/v2/big.img
CHANGED=$(( (1 << 20) + (10 << 10) ))

# The S3 server.
S3PORT=$(free_port)
s3s-fs --host 127.0.0.1 --port "$S3PORT" --access-key bench --secret-key bench-secret "$S/s3" >/dev/null 2>&1 &
S3PID=$!; PIDS+=("$S3PID")
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$S3PORT") 2>/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3PORT AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench \
    AWS_SECRET_ACCESS_KEY=bench-secret AWS_ALLOW_HTTP=true

# The master: v1 uploaded before it listens, then v2.
ln -sfn v1 "$S/images/current"
"$TARGET/syncmaster" serve --insecure --listen 127.0.0.1:0 --images "$S/images" --state-dir "$S/mstate" \
    --poll 200ms --object-store s3://bkt/lf --chunk-threshold 16MiB --cache-level 3 \
    >"$S/master.out" 2>"$S/master.err" &
PIDS+=("$!")
for _ in $(seq 600); do grep -q '^listening on' "$S/master.out" && break; sleep 0.2; done
MASTER=http://$(sed -n 's/^listening on //p' "$S/master.out")
ln -sfn v2 "$S/images/current.new" && mv -T "$S/images/current.new" "$S/images/current"
for _ in $(seq 600); do
    grep -q 'object store: version 2 uploaded' "$S/master.err" && grep -q 'published a new version' "$S/master.err" && break
    sleep 0.2
done
UPLOAD_LINES=$(grep -o 'object store: version [0-9].*' "$S/master.err" | sed 's/\x1b\[[0-9;]*m//g')
IDX_BYTES=$(find "$S/s3/bkt/lf/chunks" -name '*.idx' -printf '%s ')

# The rsync daemon, serving v2.
RPORT=$(free_port)
cat >"$S/rsyncd.conf" <<EOF
use chroot = no
[img]
path = $S/images/v2
read only = yes
uid = root
gid = root
EOF
rsync --daemon --no-detach --config="$S/rsyncd.conf" --port="$RPORT" --address=127.0.0.1 &
PIDS+=("$!")
sleep 0.5

wchar() { awk '/^wchar/ {print $2}' "/proc/$1/io"; }
declare -a SY_STORE SY_IDX SY_S3W SY_T RS_RECV RS_LIT RS_T COLD_STORE COLD_MASTER
# cold_run NAME EXTRA...: wall seconds of syncd syncing v2 into an empty host.
cold_run() {
    local name=$1; shift
    rm -rf "$S/cold" "$S/cstate"; mkdir "$S/cold"
    local t0 t1; t0=$(date +%s.%N)
    "$TARGET/syncd" sync --master "$MASTER" --root "$S/cold" --host-id bench --insecure --state-dir "$S/cstate" "$@" \
        >"$S/cold.out" 2>"$S/cold.err"
    t1=$(date +%s.%N)
    cmp "$S/cold/big.img" "$S/images/v2/big.img"
    echo "cold $name: $(grep 'converged to image' "$S/cold.out" "$S/cold.err" | tail -1)" >&2
    awk "BEGIN {print $t1 - $t0}"
}
for run in $(seq "$RUNS"); do
    rm -rf "$S/host" "$S/state"; cp -a "$S/images/v1" "$S/host"
    before=$(wchar "$S3PID"); t0=$(date +%s.%N)
    "$TARGET/syncd" sync --master "$MASTER" --root "$S/host" --host-id bench --insecure --state-dir "$S/state" \
        >"$S/syncd.out" 2>"$S/syncd.err"
    t1=$(date +%s.%N); after=$(wchar "$S3PID")
    summary=$(grep 'converged to image' "$S/syncd.out" "$S/syncd.err" | tail -1)
    echo "syncd run $run: $summary"
    cmp "$S/host/big.img" "$S/images/v2/big.img"
    [ -z "$(rsync -aHAXcn --delete -i "$S/images/v2/" "$S/host/" | grep -v '^\.d..t...... \./$' || true)" ] || { echo "syncd: host differs" >&2; exit 1; }
    read -r st ix < <(python3 - "$summary" <<'EOF'
import re, sys
s = sys.argv[1]
u = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
m = re.search(r"fetched \(([\d.]+) (\w+) from the store, ([\d.]+) (\w+) of chunk indexes\)", s)
print(int(float(m[1]) * u[m[2]]), int(float(m[3]) * u[m[4]]))
EOF
)
    SY_STORE+=("$st"); SY_IDX+=("$ix"); SY_S3W+=($((after - before))); SY_T+=("$(awk "BEGIN {print $t1 - $t0}")")

    rm -rf "$S/rhost"; cp -a "$S/images/v1" "$S/rhost"
    t0=$(date +%s.%N)
    rsync -a --no-whole-file --stats "rsync://127.0.0.1:$RPORT/img/" "$S/rhost/" >"$S/rsync.out"
    t1=$(date +%s.%N)
    cmp "$S/rhost/big.img" "$S/images/v2/big.img"
    RS_RECV+=("$(sed -n 's/^Total bytes received: //p' "$S/rsync.out" | tr -d ,)")
    RS_LIT+=("$(sed -n 's/^Literal data: \([0-9,]*\) bytes/\1/p' "$S/rsync.out" | tr -d ,)")
    RS_T+=("$(awk "BEGIN {print $t1 - $t0}")")
    echo "rsync run $run: received ${RS_RECV[-1]}, literal ${RS_LIT[-1]}"

    # A cold host: every chunk from the store, against the whole object from the master.
    COLD_STORE+=("$(cold_run "store (chunks)")")
    COLD_MASTER+=("$(cold_run "master (whole)" --object-store none)")
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
m_store=$(median "${SY_STORE[@]}"); m_idx=$(median "${SY_IDX[@]}"); m_s3w=$(median "${SY_S3W[@]}"); m_syt=$(median "${SY_T[@]}")
m_cs=$(median "${COLD_STORE[@]}"); m_cm=$(median "${COLD_MASTER[@]}")
m_recv=$(median "${RS_RECV[@]}"); m_lit=$(median "${RS_LIT[@]}"); m_rst=$(median "${RS_T[@]}")
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
# Before the report starts appending to $OUT (which would make the tree look dirty).
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
# shellcheck source=bench/lib.sh
[ -n "$OUT" ] || { source bench/lib.sh; OUT=$(new_results bench largefile); }
{
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M:%S UTC'): one $MIB MiB file, 10 KiB inserted near the start + 1 MiB changed in the middle"
    echo
    echo "- machine: $(nproc) cores, kernel $(uname -r); scratch on $(findmnt -n -o FSTYPE -T "$S" 2>/dev/null || echo '?'); source rev: $REV"
    echo "- corpus: $MIB MiB seeded pseudo-random (Python random.Random(25)); changed bytes: $CHANGED"
    echo "- syncd (${PROFILE:-release} build): \`syncd sync\` from a copy of v1 to v2; master \`--object-store s3://bkt/lf --chunk-threshold 16MiB --cache-level 3\`, s3s-fs 0.14.1 on loopback"
    echo "- rsync: $(rsync --version | head -1); daemon on loopback, \`rsync -a --no-whole-file --stats\` into a copy of v1"
    echo "- master upload: $UPLOAD_LINES" | tr '\n' ' '; echo
    echo "- runs: $RUNS"
    echo
    echo "| measure | median | raw | / changed bytes |"
    echo "|---|---:|---|---:|"
    echo "| syncd: chunk bytes GET from the store (its summary, rounded to 0.1 MiB) | $m_store | ${SY_STORE[*]} | $(ratio "$m_store" "$CHANGED") |"
    echo "| syncd: chunk index bytes GET (summary, rounded to 0.1 KiB) | $m_idx | ${SY_IDX[*]} | $(ratio "$m_idx" "$CHANGED") |"
    echo "| syncd: chunks + index | $((m_store + m_idx)) | | $(ratio "$((m_store + m_idx))" "$CHANGED") |"
    echo "| s3s-fs: bytes written to its sockets during the pass (HTTP headers + bodies) | $m_s3w | ${SY_S3W[*]} | $(ratio "$m_s3w" "$CHANGED") |"
    echo "| rsync: Total bytes received | $m_recv | ${RS_RECV[*]} | $(ratio "$m_recv" "$CHANGED") |"
    echo "| rsync: Literal data | $m_lit | ${RS_LIT[*]} | $(ratio "$m_lit" "$CHANGED") |"
    echo "| syncd wall s | $m_syt | ${SY_T[*]} | |"
    echo "| rsync wall s | $m_rst | ${RS_T[*]} | |"
    echo "| cold host, syncd wall s: every chunk from the store | $m_cs | ${COLD_STORE[*]} | |"
    echo "| cold host, syncd wall s: the whole object from the master (\`--object-store none\`) | $m_cm | ${COLD_MASTER[*]} | |"
    echo
    echo "- syncd (chunks + index) / rsync (total received): $(ratio "$((m_store + m_idx))" "$m_recv"); s3s-fs socket bytes / rsync total received: $(ratio "$m_s3w" "$m_recv")"
    echo "- goal (issue 25): chunks <= 2 x changed bytes + the index: $([ "$m_store" -le $((2 * CHANGED)) ] && echo met || echo NOT met)"
    echo "- chunk indexes in the store (v1, v2): ${IDX_BYTES:-?}bytes"
} | tee -a "$OUT"
