#!/usr/bin/env bash
# packs.sh: a cold `syncd sync` of a real root through an S3 server (s3s-fs on loopback),
# objects read loose (one GET each) against objects read from packs (coalesced range GETs),
# with a cold `rsync -aHAX` from an rsync daemon as the anchor, alternated in the same runs.
#
# Usage: bench/packs.sh            (writes a report to a new file per run,
#                                   bench/results/<UTC stamp>-packs.md, or appends it to RESULTS)
#        SCENARIO=upgrade bench/packs.sh
#
# SCENARIO=cold (default): CORPUS into an empty directory.
# Phase "loose": syncmaster serves CORPUS with --pack-max-object 0 (loose objects only).
# Phase "packs": the same master restarted on the same store prefix with packs on: it puts
# only the packs and the index (its loose objects are there), so the store holds both, and the
# report gives the storage each takes.
#
# SCENARIO=upgrade: the host starts as a copy of FROM, the master published FROM as v1 and then
# CORPUS as v2 (so v2's packs hold only the objects new in v2, in path order, as in a fleet);
# each phase has its own master and store prefix, stored encodings at --zstd-level 3.
#
# Env:
#   CORPUS=/var/tmp/gis-corpora/bookworm-minbase   (bench/corpora.sh builds it)
#   FROM=/var/tmp/gis-corpora/bullseye-minbase     the host's starting tree (upgrade)
#   RUNS=3             timed runs per tool per phase
#   SCRATCH=/var/tmp/gis-bench-packs   store, roots and logs (removed at the end, logs kept)
#   SYNCD, SYNCMASTER  binaries (default target/release/{syncd,syncmaster}, or $CARGO_TARGET_DIR)
#   S3S_FS             the s3s-fs binary (default: on PATH or ~/.cargo/bin)
#   PACK_FLAGS=""      extra master flags for the packs phase, e.g. "--pack-size 16MiB"
# Needs root (the roots keep owners), rsync, s3s-fs 0.14.1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/.." && pwd)
CORPUS=${CORPUS:-/var/tmp/gis-corpora/bookworm-minbase}
RUNS=${RUNS:-3}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench-packs}
TGT=${CARGO_TARGET_DIR:-$TOP/target}
SYNCD=${SYNCD:-$TGT/release/syncd}
SYNCMASTER=${SYNCMASTER:-$TGT/release/syncmaster}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
PACK_FLAGS=${PACK_FLAGS:-}
SCENARIO=${SCENARIO:-cold}
FROM=${FROM:-/var/tmp/gis-corpora/bullseye-minbase}
LEVEL=19; [ "$SCENARIO" = upgrade ] && LEVEL=3
OUT=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written

die() { echo "packs.sh: $*" >&2; exit 1; }
[ -d "$CORPUS" ] || die "no corpus at $CORPUS (hint: bench/corpora.sh)"
[ -x "$SYNCD" ] && [ -x "$SYNCMASTER" ] || die "build first: cargo build --release --bins"
[ -x "$S3S_FS" ] || die "no s3s-fs (hint: cargo install s3s-fs --version 0.14.1 --features binary --locked)"

rm -rf "$SCRATCH"; mkdir -p "$SCRATCH"/{s3/bench,logs}
LOGS=$SCRATCH/logs
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$SCRATCH/s3" "$SCRATCH"/root-*; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

S3_PORT=$(free_port)
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key bench --secret-key bench-secret "$SCRATCH/s3" >"$LOGS/s3s-fs.log" 2>&1 &
S3_PID=$!; PIDS+=("$S3_PID")
wait_port "$S3_PORT" || die "s3s-fs did not listen on $S3_PORT"
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench \
    AWS_SECRET_ACCESS_KEY=bench-secret AWS_ALLOW_HTTP=true

RSYNC_PORT=$(free_port)
cat >"$SCRATCH/rsyncd.conf" <<CONF
[img]
    path = $CORPUS
    read only = yes
    uid = root
    gid = root
    use chroot = no
    numeric ids = yes
CONF
rsync --daemon --no-detach --config="$SCRATCH/rsyncd.conf" --address=127.0.0.1 --port="$RSYNC_PORT" >"$LOGS/rsyncd.log" 2>&1 &
PIDS+=("$!")
wait_port "$RSYNC_PORT" || die "rsync daemon did not listen"

MASTER_PID=""
start_master() {  # start_master NAME FLAGS...: sets MASTER_PID, MASTER_URL
    local name=$1; shift
    local out=$LOGS/master-$name.out err=$LOGS/master-$name.err
    local src=(--image "$CORPUS") prefix=gis
    if [ "$SCENARIO" = upgrade ]; then
        prefix=gis-$name
        mkdir -p "$SCRATCH/images-$name" "$SCRATCH/mstate-$name"
        ln -sfn "$FROM" "$SCRATCH/images-$name/v1"; ln -sfn "$CORPUS" "$SCRATCH/images-$name/v2"
        ln -sfn v1 "$SCRATCH/images-$name/current"
        src=(--images "$SCRATCH/images-$name" --state-dir "$SCRATCH/mstate-$name" --poll 500ms)
    fi
    "$SYNCMASTER" serve "${src[@]}" --listen 127.0.0.1:0 --insecure \
        --object-store "s3://bench/$prefix" --cache-level 0 --zstd-level "$LEVEL" "$@" >"$out" 2>"$err" &
    MASTER_PID=$!; PIDS+=("$MASTER_PID")
    local t0=$SECONDS
    until grep -q "listening on" "$out"; do
        kill -0 "$MASTER_PID" 2>/dev/null || die "syncmaster exited (see $err)"
        [ $((SECONDS - t0)) -lt 1800 ] || die "syncmaster not ready after 30 min"
        sleep 0.5
    done
    MASTER_URL=http://$(sed -n 's/^listening on //p' "$out" | head -1)
    if [ "$SCENARIO" = upgrade ]; then
        ln -sfn v2 "$SCRATCH/images-$name/current.new" && mv -T "$SCRATCH/images-$name/current.new" "$SCRATCH/images-$name/current"
        until grep -q "published a new version" "$err"; do
            kill -0 "$MASTER_PID" 2>/dev/null || die "syncmaster exited (see $err)"
            [ $((SECONDS - t0)) -lt 1800 ] || die "v2 not published after 30 min"
            sleep 0.5
        done
    fi
    echo "master $name ready in $((SECONDS - t0)) s: $(grep -o 'object store: version .*' "$err" | tr '\n' ' ')" >&2
}
stop_master() { kill "$MASTER_PID"; wait "$MASTER_PID" 2>/dev/null || true; }

lo_bytes() { awk -F: '{ gsub(/ /, "", $1) } $1 == "lo" { split($2, a, " "); print a[1]; exit }' /proc/net/dev; }
now() { date +%s.%N; }

# run TOOL PHASE I: one cold run into an empty root; appends a row to $ROWS.
ROWS=$SCRATCH/rows.tsv
: >"$ROWS"
run() {
    local tool=$1 phase=$2 i=$3 root=$SCRATCH/root-$1-$2-$3 log=$LOGS/$1-$2-$3.log t0 t1 lo0 lo1
    rm -rf "$root"
    if [ "$SCENARIO" = upgrade ]; then cp -a "$FROM" "$root"; else mkdir -p "$root"; fi
    sync
    lo0=$(lo_bytes); t0=$(now)
    if [ "$tool" = rsync ]; then
        rsync -aHAX --numeric-ids --delete "rsync://127.0.0.1:$RSYNC_PORT/img/" "$root/" >"$log" 2>&1
    else
        "$SYNCD" sync --master "$MASTER_URL" --root "$root" --host-id bench --insecure >"$log" 2>&1
    fi
    t1=$(now); lo1=$(lo_bytes)
    local diffs=-
    if [ "$i" = 1 ]; then
        diffs=$(rsync -aHAXcn --delete -i --numeric-ids "$CORPUS/" "$root/" | wc -l)
    fi
    local summary gets mib store packed master
    summary=$(grep -h "syncd: converged" "$log" || true)
    gets=$(sed -n 's/.*(\([0-9]*\) GETs.*/\1/p' <<<"$summary"); gets=${gets:--}
    mib=$(sed -n 's/.* GETs, \([0-9.]* [KMG]*i*B\) read.*/\1/p' <<<"$summary"); mib=${mib:--}
    store=$(sed -n 's/.*: \([0-9]*\) from the object store.*/\1/p' <<<"$summary"); store=${store:--}
    packed=$(sed -n 's/.*, \([0-9]*\) objects cut from packs.*/\1/p' <<<"$summary"); packed=${packed:--}
    master=$(sed -n 's/.*, \([0-9]*\) from the master.*/\1/p' <<<"$summary"); master=${master:--}
    printf '%s\t%s\t%s\t%.2f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$tool" "$i" "$(echo "$t1 - $t0" | bc)" \
        "$gets" "$mib" "$store" "$packed" "$master" "$((lo1 - lo0))" "$diffs" >>"$ROWS"
    tail -1 "$ROWS" >&2
    rm -rf "$root"
}

start_master loose --pack-max-object 0
for i in $(seq "$RUNS"); do run rsync loose "$i"; run syncd loose "$i"; done
stop_master

# shellcheck disable=SC2086
start_master packs $PACK_FLAGS
for i in $(seq "$RUNS"); do run rsync packs "$i"; run syncd packs "$i"; done
stop_master
# The store of the packs phase (for cold, the same prefix as the loose phase).
P=$SCRATCH/s3/bench/gis; [ "$SCENARIO" = upgrade ] && P=$SCRATCH/s3/bench/gis-packs
OBJ_BYTES=$(du -sb "$P/objects" | cut -f1)
OBJ_COUNT=$(find "$P/objects" -type f | wc -l)
PACK_BYTES=$(du -sb --exclude=index "$P/packs" | cut -f1)
PACK_COUNT=$(find "$P/packs" -maxdepth 1 -name '*.pack' | wc -l)
IDX_BYTES=$(du -sb "$P/packs/index" | cut -f1)
IDX_COUNT=$(find "$P/packs/index" -name '*.idx' | wc -l)
SMALL=$(find "$CORPUS" -type f -size -1024k | wc -l)

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# shellcheck source=bench/lib.sh
[ -n "$OUT" ] || { source "$HERE/lib.sh"; OUT=$(new_results "$HERE" packs); }
col() { awk -F'\t' -v p="$1" -v t="$2" -v c="$3" '$1 == p && $2 == t { print $c }' "$ROWS" | median; }
{
    echo
    echo "## packs.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Corpus: $(basename "$CORPUS") ($(find "$CORPUS" -type f | wc -l) files, $SMALL under 1 MiB, $(du -sh "$CORPUS" | cut -f1)); scenario $SCENARIO:"
    if [ "$SCENARIO" = upgrade ]; then
        echo "host starts as $(basename "$FROM"), master published it as v1 then the corpus as v2;"
    else
        echo "cold sync into an empty directory;"
    fi
    echo "store s3s-fs on loopback; $(nproc) cores; RUNS=$RUNS; master --cache-level 0 --zstd-level $LEVEL"
    echo "(stored encodings at level $LEVEL); packs phase flags: defaults${PACK_FLAGS:+ plus $PACK_FLAGS}."
    echo "syncd commit $(git -C "$TOP" rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo
    echo "| phase | tool | run | wall s | GETs | store read | objects from store | from packs | from master | loopback bytes | rsync -aHAXcn diffs |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 }' "$ROWS"
    echo
    echo "Medians (ratio: syncd wall / rsync wall of the same phase):"
    echo
    echo "| phase | rsync wall s | syncd wall s | ratio | syncd GETs | syncd loopback MiB | rsync loopback MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for p in loose packs; do
        r=$(col "$p" rsync 4); s=$(col "$p" syncd 4)
        printf '| %s | %s | %s | %.2f | %s | %.1f | %.1f |\n' "$p" "$r" "$s" "$(echo "$s / $r" | bc -l)" "$(col "$p" syncd 5)" \
            "$(echo "$(col "$p" syncd 10) / 1048576" | bc -l)" "$(echo "$(col "$p" rsync 10) / 1048576" | bc -l)"
    done
    echo
    echo "Store: objects/ $OBJ_COUNT loose objects, $OBJ_BYTES bytes; packs/ $PACK_COUNT packs, $PACK_BYTES bytes, $IDX_COUNT index(es)"
    echo "(+$(echo "scale=1; 100 * $PACK_BYTES / $OBJ_BYTES" | bc)% over the loose objects); indexes $IDX_BYTES bytes."
} | tee -a "$OUT"
