#!/usr/bin/env bash
# sync-vs-rsync.sh: wall-time benchmark of `syncd sync` against
# `rsync -aHAX --numeric-ids --delete` from an rsync daemon, on real root trees.
#
# Usage: bench/sync-vs-rsync.sh [SCENARIO...]     (default: cold upgrade)
#   cold     image bookworm-big, host dir starts empty
#   upgrade  image bookworm-minbase, host dir starts as a fresh copy of bullseye-minbase
#
# Corpora come from bench/corpora.sh (run it first). Needs root, rsync, util-linux.
#
# Env:
#   RUNS=5            timed runs per tool per scenario (after one untimed warm-up each)
#   CORPORA=/var/tmp/gis-corpora   where corpora.sh put the trees
#   SCRATCH=/var/tmp/gis-bench     scratch space (host dirs, configs, logs); the
#                     per-invocation work dir is removed on exit, logs are kept in
#                     $SCRATCH/logs
#   SYNCD, SYNCMASTER binaries (default /work/main/target/release/{syncd,syncmaster})
#   SKIP_SYNCD=1      benchmark only the rsync side (syncd/syncmaster not needed)
#   VERIFY=once       fidelity check (rsync -aHAXcn --delete -i IMAGE/ DEST/) after the
#                     first timed run of each tool per scenario; `all` = after every
#                     timed run, `none` = never
#   SYNC_AFTER=0      1 = include a `sync` (flush to disk) in each timed region
#   MASTER_TIMEOUT=900  seconds to wait for syncmaster's `listening on` line
#   TOOL_TIMEOUT=1800   a timed rsync/syncd run is killed after this many seconds
#                     (counts as a failed run, exit 124); SIGTERM to this script takes
#                     effect once the current run ends, Ctrl-C at once
#   RESULTS=bench/RESULTS.md   markdown file the dated result section is appended to
#
# Timing: warm page cache (no cache dropping). Each run starts from a freshly
# prepared host dir (untimed, followed by an untimed `sync`). Tools alternate,
# and which tool goes first alternates per iteration. syncmaster is started
# (and finishes its scan) before any timing, once per scenario; likewise one
# rsync daemon per scenario.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNS=${RUNS:-5}
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench}
SYNCD=${SYNCD:-/work/main/target/release/syncd}
SYNCMASTER=${SYNCMASTER:-/work/main/target/release/syncmaster}
SKIP_SYNCD=${SKIP_SYNCD:-0}
VERIFY=${VERIFY:-once}
SYNC_AFTER=${SYNC_AFTER:-0}
MASTER_TIMEOUT=${MASTER_TIMEOUT:-900}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-1800}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}

die() { echo "sync-vs-rsync: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
case $VERIFY in once|all|none) ;; *) die "VERIFY must be once|all|none" ;; esac
[ "$(id -u)" -eq 0 ] || die "must run as root (trees contain root-owned files, devices, caps)"
command -v rsync >/dev/null || die "rsync missing: apt-get install -y rsync"
if [ "$SKIP_SYNCD" != 1 ]; then
    [ -x "$SYNCD" ] || die "syncd not found at $SYNCD (cargo build --release, set SYNCD, or SKIP_SYNCD=1)"
    [ -x "$SYNCMASTER" ] || die "syncmaster not found at $SYNCMASTER (set SYNCMASTER, or SKIP_SYNCD=1)"
fi

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(cold upgrade)

# scenario -> image corpus, host start corpus ("" = empty dir)
scenario_image() { case $1 in cold) echo bookworm-big ;; upgrade) echo bookworm-minbase ;; *) return 1 ;; esac; }
scenario_base()  { case $1 in cold) echo "" ;; upgrade) echo bullseye-minbase ;; *) return 1 ;; esac; }
need_corpus() {
    [ -d "$CORPORA/$1" ] && [ -e "$CORPORA/$1.done" ] ||
        die "corpus $1 missing under $CORPORA: run bench/corpora.sh $1"
}
for s in "${scenarios[@]}"; do
    scenario_image "$s" >/dev/null || die "unknown scenario '$s' (known: cold upgrade)"
    need_corpus "$(scenario_image "$s")"
    b=$(scenario_base "$s"); [ -z "$b" ] || need_corpus "$b"
done

mkdir -p "$SCRATCH" "$SCRATCH/logs"
WORK=$(mktemp -d "$SCRATCH/run.XXXXXX")
LOGS="$SCRATCH/logs"
DAEMON_PID="" MASTER_PID=""

stop_pid() {  # stop_pid PID: TERM, wait up to 5s, then KILL
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$DAEMON_PID"; DAEMON_PID=""
    stop_pid "$MASTER_PID"; MASTER_PID=""
    [ -n "${WORK:-}" ] && [ -d "$WORK" ] && rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { tr ' ' '\n' | awk NF | sort -g | awk '{ a[NR] = $1 } END {
    if (NR == 0) { print "n/a"; exit }
    if (NR % 2) printf "%.3f", a[(NR + 1) / 2]; else printf "%.3f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && a + 0 > 0) printf "%.2f", b / a; else print "n/a" }'; }

port_in_use() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
random_port() {
    local p
    for _ in $(seq 100); do
        p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "no free port found"
}
wait_tcp() {  # wait_tcp PORT PID: until something listens on 127.0.0.1:PORT (PID must stay alive)
    local i
    for i in $(seq 100); do
        kill -0 "$2" 2>/dev/null || return 1
        port_in_use "$1" && return 0
        sleep 0.1
    done
    return 1
}

# start_rsyncd IMAGE NAME -> sets DAEMON_PID, RSYNC_URL
start_rsyncd() {
    local image=$1 name=$2 conf="$WORK/rsyncd-$2.conf" port attempt
    cat >"$conf" <<EOF
log file = $LOGS/rsyncd-$name.log
[img]
    path = $image
    read only = yes
    uid = root
    gid = root
    use chroot = no
    numeric ids = yes
    hosts allow = 127.0.0.1
EOF
    for attempt in 1 2 3 4 5; do
        port=$(random_port) || die "no free port found"
        rsync --daemon --no-detach --config="$conf" --address=127.0.0.1 --port="$port" \
            >>"$LOGS/rsyncd-$name.out" 2>&1 &
        DAEMON_PID=$!
        if wait_tcp "$port" "$DAEMON_PID"; then
            RSYNC_URL="rsync://127.0.0.1:$port/img/"
            log "rsync daemon pid $DAEMON_PID serving $image at $RSYNC_URL"
            return 0
        fi
        stop_pid "$DAEMON_PID"; DAEMON_PID=""
    done
    die "rsync daemon failed to start (see $LOGS/rsyncd-$name.*)"
}

# start_master IMAGE NAME -> sets MASTER_PID, MASTER_ADDR, MASTER_SCAN
start_master() {
    local image=$1 name=$2 t0 line
    local out="$LOGS/syncmaster-$name.out"
    : >"$out"
    t0=$(now)
    "$SYNCMASTER" serve --image "$image" --listen 127.0.0.1:0 >"$out" 2>"$LOGS/syncmaster-$name.err" &
    MASTER_PID=$!
    local deadline=$((SECONDS + MASTER_TIMEOUT))
    while :; do
        line=$(grep -m1 -E '^listening on [0-9.]+:[0-9]+$' "$out" || true)
        [ -z "$line" ] || break
        kill -0 "$MASTER_PID" 2>/dev/null ||
            { tail -n 20 "$LOGS/syncmaster-$name.err" >&2; die "syncmaster exited before listening"; }
        [ $SECONDS -lt $deadline ] ||
            die "syncmaster not listening after ${MASTER_TIMEOUT}s (see $LOGS/syncmaster-$name.err)"
        sleep 0.05
    done
    MASTER_ADDR=${line#listening on }
    MASTER_SCAN=$(elapsed "$t0" "$(now)")
    log "syncmaster pid $MASTER_PID ready at $MASTER_ADDR after ${MASTER_SCAN}s (untimed)"
}

# prepare DEST BASE: recreate host dir (empty, or a copy of BASE), untimed
prepare() {
    local dest=$1 base=$2
    if [ -e "$dest" ]; then rm -rf --one-file-system "$dest"; fi
    if [ -z "$base" ]; then mkdir "$dest"; else cp -a "$base" "$dest"; fi
    sync
}

# verify IMAGE DEST LABEL: prints OK or FAIL; returns 1 on mismatch
verify() {
    local image=$1 dest=$2 label=$3 out bad
    out=$(rsync -aHAXcn --numeric-ids --delete -i "$image/" "$dest/" 2>&1) || true
    bad=$(printf '%s\n' "$out" | grep -v -E '^[^ ]+ \./$' | grep -v '^$' || true)
    if [ -n "$bad" ]; then
        local n; n=$(printf '%s\n' "$bad" | wc -l)
        printf '%s\n' "$bad" >"$LOGS/verify-$label.txt"
        echo "!!!!!!!! FAIL: fidelity check $label: $n differing entries (full list: $LOGS/verify-$label.txt)" >&2
        printf '%s\n' "$bad" | head -n 20 | sed 's/^/!!!!!!!!   /' >&2
        return 1
    fi
    log "fidelity OK: $label"
}

# run_tool TOOL DEST LOGFILE -> prints elapsed seconds; nonzero exit if the tool failed
run_tool() {
    local tool=$1 dest=$2 logf=$3 t0 t1 rc=0
    t0=$(now)
    case $tool in
        rsync) timeout --foreground -k 10 "$TOOL_TIMEOUT" rsync -aHAX --numeric-ids --delete "$RSYNC_URL" "$dest/" >>"$logf" 2>&1 || rc=$? ;;
        syncd) timeout --foreground -k 10 "$TOOL_TIMEOUT" "$SYNCD" sync --master "http://$MASTER_ADDR" --root "$dest" >>"$logf" 2>&1 || rc=$? ;;
    esac
    [ "$SYNC_AFTER" != 1 ] || sync
    t1=$(now)
    elapsed "$t0" "$t1"
    return $rc
}

corpus_info() { printf '%s (%s, %s entries)' "$1" "$(du -sh "$CORPORA/$1" | cut -f1)" "$(find "$CORPORA/$1" | wc -l)"; }

declare -A MED_RSYNC MED_SYNCD RAW_RSYNC RAW_SYNCD FID SCAN FAILS
ANY_FAIL=0

run_scenario() {
    local s=$1 image base dest tools t i tt label rc
    image="$CORPORA/$(scenario_image "$s")"
    base=$(scenario_base "$s"); [ -z "$base" ] || base="$CORPORA/$base"
    dest="$WORK/host-$s"
    local times_rsync="" times_syncd="" raw_rsync="" raw_syncd="" fid="" fails=0
    declare -A verified=()

    log "=== scenario $s: image $image, host start ${base:-<empty>}, $RUNS runs"
    start_rsyncd "$image" "$s"
    tools=(rsync)
    if [ "$SKIP_SYNCD" != 1 ]; then start_master "$image" "$s"; tools+=(syncd); SCAN[$s]=$MASTER_SCAN; fi

    for t in "${tools[@]}"; do
        prepare "$dest" "$base"
        if tt=$(run_tool "$t" "$dest" "$LOGS/$t-$s.log"); then
            log "warm-up $t: ${tt}s"
        else
            echo "!!!!!!!! FAIL: warm-up $t exited non-zero (see $LOGS/$t-$s.log)" >&2; fails=$((fails + 1))
        fi
    done

    for i in $(seq "$RUNS"); do
        local order=("${tools[@]}")
        if [ $((i % 2)) -eq 0 ] && [ ${#tools[@]} -eq 2 ]; then order=(syncd rsync); fi
        for t in "${order[@]}"; do
            prepare "$dest" "$base"
            rc=0; tt=$(run_tool "$t" "$dest" "$LOGS/$t-$s.log") || rc=$?
            if [ $rc -ne 0 ]; then
                echo "!!!!!!!! FAIL: $s run $i: $t exited $rc (see $LOGS/$t-$s.log)" >&2
                fails=$((fails + 1))
            fi
            log "$s run $i/$RUNS $t: ${tt}s"
            # failed runs are shown in the raw list but kept out of the median
            if [ "$t" = rsync ]; then
                raw_rsync+=" $tt$([ $rc -eq 0 ] || echo "(exit$rc)")"; [ $rc -ne 0 ] || times_rsync+=" $tt"
            else
                raw_syncd+=" $tt$([ $rc -eq 0 ] || echo "(exit$rc)")"; [ $rc -ne 0 ] || times_syncd+=" $tt"
            fi
            if [ "$VERIFY" = all ] || { [ "$VERIFY" = once ] && [ -z "${verified[$t]:-}" ]; }; then
                verified[$t]=1; label="$s-$t-run$i"
                if verify "$image" "$dest" "$label"; then fid+="$t:OK "; else fid+="$t:FAIL(run$i) "; ANY_FAIL=1; fi
            fi
        done
    done

    stop_pid "$DAEMON_PID"; DAEMON_PID=""
    stop_pid "$MASTER_PID"; MASTER_PID=""
    rm -rf --one-file-system "$dest"

    MED_RSYNC[$s]=$(echo "$times_rsync" | median)
    RAW_RSYNC[$s]=${raw_rsync# }
    if [ "$SKIP_SYNCD" = 1 ]; then
        MED_SYNCD[$s]="skipped"; RAW_SYNCD[$s]="skipped"
    else
        MED_SYNCD[$s]=$(echo "$times_syncd" | median); RAW_SYNCD[$s]=${raw_syncd# }
    fi
    FID[$s]=$(echo "${fid:-not checked}" | sed 's/ *$//')
    FAILS[$s]=$fails
    [ $fails -eq 0 ] || ANY_FAIL=1
}

for s in "${scenarios[@]}"; do run_scenario "$s"; done

# ---- report ----
fstype=$(findmnt -n -o FSTYPE -T "$SCRATCH" 2>/dev/null || stat -f -c %T "$SCRATCH")
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
rev=$(git -C "$BENCH_DIR/.." rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$BENCH_DIR/.." diff --quiet HEAD 2>/dev/null || rev+=" (dirty tree)"
report=$(
    echo "## $(date -u '+%Y-%m-%d %H:%M:%S UTC')$([ "$SKIP_SYNCD" = 1 ] && echo ' (rsync only, SKIP_SYNCD=1)')"
    echo
    echo "- machine: $(nproc) cores, kernel $(uname -r), CPU: ${cpu:-unknown}"
    echo "- scratch: \`$SCRATCH\` on $fstype; page cache warm, one untimed warm-up per tool; host dir recreated (untimed, then \`sync\`) before every run"
    echo "- runs: $RUNS per tool per scenario, tools alternated; SYNC_AFTER=$SYNC_AFTER; source rev: $rev"
    echo "- rsync: $(rsync --version | head -n1 | sed 's/  */ /g')"
    echo "- commands:"
    echo "  - rsync: \`rsync -aHAX --numeric-ids --delete rsync://127.0.0.1:PORT/img/ DEST/\` (daemon: \`rsync --daemon --no-detach --config=FILE --port=PORT\`, module \`img\` read only, uid/gid root, no chroot, numeric ids)"
    if [ "$SKIP_SYNCD" != 1 ]; then
        echo "  - syncd: \`$SYNCD sync --master http://127.0.0.1:PORT --root DEST\` (master: \`$SYNCMASTER serve --image IMAGE --listen 127.0.0.1:0\`, started and scanned before timing)"
    fi
    echo "  - medians exclude runs whose tool exited non-zero (marked \`(exitN)\` in the raw lists)"
    echo "  - fidelity: \`rsync -aHAXcn --numeric-ids --delete -i IMAGE/ DEST/\` must list nothing but \`./\` (VERIFY=$VERIFY)"
    echo
    echo "| scenario | image | host starts as | rsync median s | syncd median s | syncd/rsync | fidelity | master scan s |"
    echo "|---|---|---|---:|---:|---:|---|---:|"
    for s in "${scenarios[@]}"; do
        b=$(scenario_base "$s")
        f=${FID[$s]}; [ "${FAILS[$s]}" -eq 0 ] || f+=" ; ${FAILS[$s]} tool run(s) FAILED"
        echo "| $s | $(corpus_info "$(scenario_image "$s")") | $([ -n "$b" ] && corpus_info "$b" || echo empty) | ${MED_RSYNC[$s]} | ${MED_SYNCD[$s]} | $(ratio "${MED_RSYNC[$s]}" "${MED_SYNCD[$s]}") | $f | ${SCAN[$s]:-n/a} |"
    done
    echo
    for s in "${scenarios[@]}"; do
        echo "- raw $s: rsync [${RAW_RSYNC[$s]}]; syncd [${RAW_SYNCD[$s]}]"
    done
    echo
)
echo
echo "$report"
printf '%s\n\n' "$report" >>"$RESULTS"
log "appended to $RESULTS; logs in $LOGS"
[ $ANY_FAIL -eq 0 ] || { echo "!!!!!!!! FAIL: some runs or fidelity checks failed (see above)" >&2; exit 1; }
