#!/usr/bin/env bash
# sync-vs-rsync.sh: benchmark of `syncd sync` against `rsync -aHAX --numeric-ids --delete`
# from an rsync daemon, on real root trees: wall time, bytes on the wire, client peak RSS.
#
# Usage: bench/sync-vs-rsync.sh [SCENARIO...]   (default: cold upgrade-bookworm upgrade-trixie)
#   cold              image bookworm-big, host dir starts empty
#   upgrade-bookworm  image bookworm-minbase, host dir starts as a fresh copy of
#                     bullseye-minbase (alias: upgrade)
#   upgrade-trixie    image trixie-minbase, host dir starts as a fresh copy of bookworm-minbase
#
# Corpora come from bench/corpora.sh (run it first). Needs root, rsync, python3, util-linux;
# GNU time (/usr/bin/time, package `time`) for exact peak RSS (see bench/measure.py).
#
# Env:
#   RUNS=5            timed runs per tool per scenario (after one untimed warm-up each)
#   RSYNC_Z=upgrades  scenarios that also get the compressed-rsync series, one
#                     `rsync -aHAX --numeric-ids --delete -z --stats` run per iteration
#                     from a freshly prepared host dir (its own series; not part of the
#                     rsync wall-time median): upgrades | all | none
#   CORPORA=/var/tmp/gis-corpora   where corpora.sh put the trees
#   SCRATCH=/var/tmp/gis-bench     scratch space (host dirs, configs, logs); the
#                     per-invocation work dir is removed on exit, logs are kept in
#                     $SCRATCH/logs
#   SYNCD, SYNCMASTER binaries (default target/release/{syncd,syncmaster} of this checkout)
#   SYNCD_B=""        a second syncd build (say, the previous commit's) run as a third tool
#                     against the same master, alternated with the others in the same runs;
#                     the report adds an A/B table (syncd / SYNCD_B), so a change is measured
#                     before and after in one run
#   SYNCD_B_ARGS=""   extra `syncd sync` flags for the SYNCD_B tool only (SYNCD_B may be the same
#                     binary as SYNCD: then the A/B compares two settings, e.g.
#                     SYNCD_B_ARGS="--object-store-solid false")
#   OBJECT_STORE=0    1 = the master uploads to an s3s-fs server on loopback
#                     (`--object-store s3://bench/fleet`, s3s-fs 0.14.1 on PATH or in
#                     ~/.cargo/bin) and hosts fetch objects from it; the loopback counter then
#                     counts the host's GETs from the store as well as its manifest traffic.
#                     On a shared machine, run the script in a network namespace of its own so
#                     the counter sees only this benchmark:
#                     unshare -n bash -c 'ip link set lo up && bench/sync-vs-rsync.sh ...'
#   MASTER_EXTRA=""   extra `syncmaster serve` flags, e.g. "--cache-level 0" (per-request
#                     compression only) or "--zstd-level 1"
#   DELTAS=1          upgrade scenarios: the master has published the host's release (v1)
#                     before the image (v2), so it holds deltas of v2 against v1 (the fleet
#                     case); DELTAS=0 serves the image alone (every changed file whole)
#   SKIP_SYNCD=1      benchmark only the rsync side (syncd/syncmaster not needed)
#   VERIFY=once       fidelity check (rsync -aHAXcn --delete -i IMAGE/ DEST/) after the
#                     first timed run of each tool per scenario; `all` = after every
#                     timed run, `none` = never
#   SYNC_AFTER=0      1 = include a `sync` (flush to disk) in each timed region
#   MASTER_TIMEOUT=900  seconds to wait for syncmaster's `listening on` line
#   TOOL_TIMEOUT=1800   a timed rsync/syncd run is killed after this many seconds
#                     (counts as a failed run, exit 124); SIGTERM to this script takes
#                     effect once the current run ends, Ctrl-C at once
#   RESULTS=bench/results/<UTC stamp>-sync-vs-rsync.md   markdown file the dated result
#                     section is appended to (by default a new file per run)
#
# syncmaster/syncd builds whose --help lists --insecure (TLS builds) get --insecure (plain
# TCP, like the rsync daemon); the report shows the exact commands.
#
# Timing: warm page cache (no cache dropping). Each run starts from a freshly
# prepared host dir (untimed, followed by an untimed `sync`). Tools alternate,
# and which tool goes first alternates per iteration; the rsync -z run comes last in
# each iteration. syncmaster is started (and finishes its scan) before any timing,
# once per scenario; likewise one rsync daemon per scenario.
#
# Per run, bench/measure.py records: wall time (monotonic clock from fork to reap of
# the client), bytes on the wire (growth of the RX byte counter of `lo` in
# /proc/net/dev across the run: both directions of the loopback connection, IP/TCP
# headers included, and any unrelated loopback traffic on the host), the client's peak
# RSS (ru_maxrss via GNU time: syncd's process; for rsync the larger of its generator
# and receiver processes, not their sum) and its CPU time. For syncd the summary line's
# "(X on the wire)" figure, and for rsync -z its "Total bytes received", are also kept.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
RUNS=${RUNS:-5}
RSYNC_Z=${RSYNC_Z:-upgrades}
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench}
REPO=$(cd "$BENCH_DIR/.." && pwd)
SYNCD=${SYNCD:-$REPO/target/release/syncd}
SYNCMASTER=${SYNCMASTER:-$REPO/target/release/syncmaster}
SYNCD_B=${SYNCD_B:-}
SYNCD_B_ARGS=${SYNCD_B_ARGS:-}
OBJECT_STORE=${OBJECT_STORE:-0}
# Paths as the report shows them: relative to the checkout where they lie in it, else the file
# name only (reports hold no absolute paths of this machine).
shown() { case $1 in "$REPO"/*) echo "${1#"$REPO"/}" ;; *) echo "${1##*/}" ;; esac; }
outside() { local p; for p; do [ -z "$p" ] || [[ $p == "$REPO"/* ]] || return 0; done; return 1; }
MASTER_EXTRA=${MASTER_EXTRA:-}
DELTAS=${DELTAS:-1}
SKIP_SYNCD=${SKIP_SYNCD:-0}
VERIFY=${VERIFY:-once}
SYNC_AFTER=${SYNC_AFTER:-0}
MASTER_TIMEOUT=${MASTER_TIMEOUT:-900}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-1800}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
MEASURE=$BENCH_DIR/measure.py

die() { echo "sync-vs-rsync: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
case $VERIFY in once|all|none) ;; *) die "VERIFY must be once|all|none" ;; esac
case $RSYNC_Z in upgrades|all|none) ;; *) die "RSYNC_Z must be upgrades|all|none" ;; esac
[ "$(id -u)" -eq 0 ] || die "must run as root (trees contain root-owned files, devices, caps)"
command -v rsync >/dev/null || die "rsync missing: apt-get install -y rsync"
command -v python3 >/dev/null || die "python3 missing"
# the interpreter itself, not a version-manager shim (its start-up is outside the timed
# window anyway, but a shim adds a shell and ~0.1 s per run)
PY=$(python3 -c 'import sys; print(sys.executable)')
[ -r "$MEASURE" ] || die "missing $MEASURE"
grep -q '^ *lo:' /proc/net/dev || die "no loopback interface in /proc/net/dev"
MASTER_FLAGS=() SYNCD_FLAGS=()
if [ "$SKIP_SYNCD" != 1 ]; then
    [ -x "$SYNCD" ] || die "syncd not found at $SYNCD (cargo build --release, set SYNCD, or SKIP_SYNCD=1)"
    [ -x "$SYNCMASTER" ] || die "syncmaster not found at $SYNCMASTER (set SYNCMASTER, or SKIP_SYNCD=1)"
    # Builds with TLS refuse plain TCP unless told --insecure (plain TCP, like the rsync
    # daemon); older builds do not know the flag. Pass it only where --help lists it.
    h=$("$SYNCMASTER" serve --help 2>&1 || true); [[ $h != *--insecure* ]] || MASTER_FLAGS=(--insecure)
    # Builds with an object cache: wait for it (unless MASTER_EXTRA turns it off).
    CACHE_FLAG=""
    [[ $h != *--cache-level* || " $MASTER_EXTRA " == *" --cache-level 0 "* ]] || CACHE_FLAG=1
    # shellcheck disable=SC2206
    MASTER_FLAGS+=($MASTER_EXTRA)
    h=$("$SYNCD" sync --help 2>&1 || true); [[ $h != *--insecure* ]] || SYNCD_FLAGS=(--insecure)
    [ -z "$SYNCD_B" ] || [ -x "$SYNCD_B" ] || die "SYNCD_B: no executable at $SYNCD_B"
fi
RSS_METHOD="GNU time \`%M\` (wait4 ru_maxrss of the client)"
[ -x "${GNU_TIME:-/usr/bin/time}" ] ||
    RSS_METHOD="getrusage(RUSAGE_CHILDREN) in measure.py (no GNU time: figures include a ~10-15 MiB floor from the forking Python process)"

KNOWN="cold upgrade-bookworm upgrade-trixie (alias: upgrade = upgrade-bookworm)"
scenarios=()
for s in "${@:-cold upgrade-bookworm upgrade-trixie}"; do
    for s in $s; do
        [ "$s" != upgrade ] || s=upgrade-bookworm
        case " ${scenarios[*]} " in *" $s "*) ;; *) scenarios+=("$s") ;; esac
    done
done

# scenario -> image corpus, host start corpus ("" = empty dir)
scenario_image() {
    case $1 in cold) echo bookworm-big ;; upgrade-bookworm) echo bookworm-minbase ;;
        upgrade-trixie) echo trixie-minbase ;; *) return 1 ;; esac
}
scenario_base() {
    case $1 in cold) echo "" ;; upgrade-bookworm) echo bullseye-minbase ;;
        upgrade-trixie) echo bookworm-minbase ;; *) return 1 ;; esac
}
# targets (issue): syncd/rsync wall time; syncd/rsync -z wire bytes; syncd peak RSS MiB
target_wall()  { case $1 in cold) echo 1.0 ;; upgrade-*) echo 0.7 ;; esac; }
target_bytes() { case $1 in upgrade-*) echo 0.9 ;; esac; }
target_rss()   { case $1 in cold) echo 64 ;; esac; }
want_z() { [ "$RSYNC_Z" = all ] || { [ "$RSYNC_Z" = upgrades ] && [[ $1 == upgrade-* ]]; }; }
need_corpus() {
    [ -d "$CORPORA/$1" ] && [ -e "$CORPORA/$1.done" ] ||
        die "corpus $1 missing under $CORPORA: run bench/corpora.sh $1"
}
for s in "${scenarios[@]}"; do
    scenario_image "$s" >/dev/null || die "unknown scenario '$s' (known: $KNOWN)"
    need_corpus "$(scenario_image "$s")"
    b=$(scenario_base "$s"); [ -z "$b" ] || need_corpus "$b"
done

mkdir -p "$SCRATCH" "$SCRATCH/logs"
WORK=$(mktemp -d "$SCRATCH/run.XXXXXX")
LOGS="$SCRATCH/logs"
DAEMON_PID="" MASTER_PID="" S3_PID=""

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
    stop_pid "$S3_PID"; S3_PID=""
    [ -n "${WORK:-}" ] && [ -d "$WORK" ] && rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# median [PRINTF-FORMAT] < numbers (spaces or newlines) -> median, or n/a if none
median() { tr ' ' '\n' | awk NF | sort -g | awk -v f="${1:-%.3f}" '{ a[NR] = $1 } END {
    if (NR == 0) { print "n/a"; exit }
    if (NR % 2) printf f, a[(NR + 1) / 2]; else printf f, (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# ratio A B -> B/A with 2 decimals (n/a unless both are numbers and A > 0)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && a + 0 > 0) printf "%.2f", b / a; else print "n/a" }'; }
# met VALUE TARGET -> yes / **no** (VALUE <= TARGET), n/a, or - when there is no target
met() {
    [ -n "$2" ] || { echo "-"; return; }
    awk -v v="$1" -v t="$2" 'BEGIN { if (v !~ /^[0-9.]+$/) print "n/a"; else if (v + 0 <= t + 0) print "yes"; else print "**no**" }'
}
tgt() { if [ -n "$1" ]; then echo "≤ $1${2:-}"; else echo "-"; fi; }  # TARGET [UNIT] -> "≤ T" or -
mib() { awk -v b="$1" 'BEGIN { if (b ~ /^[0-9.]+$/) printf "%.2f", b / 1048576; else print b }'; }  # bytes
kib2mib() { awk -v k="$1" 'BEGIN { if (k ~ /^[0-9.]+$/) printf "%.1f", k / 1024; else print k }'; }
lo_rx() { awk -F: '{ gsub(/ /, "", $1) } $1 == "lo" { split($2, a, " "); print a[1]; exit }' /proc/net/dev; }

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

# start_s3 NAME -> an s3s-fs server on loopback with an empty bucket `bench`, its AWS variables
# exported (for the master and syncd alike); sets S3_PID
start_s3() {
    local name=$1 exe port dir="$WORK/s3-$1"
    exe=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
    [ -x "$exe" ] || die "s3s-fs missing: cargo install s3s-fs --version 0.14.1 --features binary --locked"
    rm -rf "$dir"; mkdir -p "$dir/bench"
    port=$(random_port)
    "$exe" --host 127.0.0.1 --port "$port" --access-key bench-access --secret-key bench-secret "$dir" \
        >"$LOGS/s3s-fs-$name.log" 2>&1 &
    S3_PID=$!
    wait_tcp "$port" "$S3_PID" || die "s3s-fs did not start (see $LOGS/s3s-fs-$name.log)"
    export AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true
    log "s3s-fs pid $S3_PID serving $dir on 127.0.0.1:$port"
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

# start_master IMAGE NAME [PREV] -> sets MASTER_PID, MASTER_ADDR, MASTER_SCAN
# With PREV (upgrade scenarios, unless DELTAS=0): the master serves an images dir whose
# `current` first points at PREV (published as v1, the release the hosts run), then at IMAGE
# (v2), as a fleet master that has served the hosts' release before; its object cache then
# holds deltas of v2 against v1. Timing starts once v2's cache is ready.
start_master() {
    local image=$1 name=$2 prev=${3:-} t0 line
    local out="$LOGS/syncmaster-$name.out"
    : >"$out"
    t0=$(now)
    local source=(--image "$image")
    if [ -n "$prev" ]; then
        local images="$WORK/images-$name"
        rm -rf "$images" "$WORK/master-state-$name"; mkdir -p "$images"
        ln -s "$prev" "$images/current"
        source=(--images "$images" --state-dir "$WORK/master-state-$name" --poll 200ms)
    fi
    if [ "$OBJECT_STORE" = 1 ]; then
        start_s3 "$name"
        source+=(--object-store s3://bench/fleet)
    fi
    MASTER_SOURCE="${source[*]}"
    "$SYNCMASTER" serve "${MASTER_FLAGS[@]}" "${source[@]}" --listen 127.0.0.1:0 >"$out" 2>"$LOGS/syncmaster-$name.err" &
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
    # Builds with an object cache compress every object once after the scan, in the
    # background; timing starts once that is done (the steady state every later host sees).
    MASTER_CACHE=n/a
    if [ -n "$CACHE_FLAG" ]; then
        until grep -q 'object cache ready' "$LOGS/syncmaster-$name.err"; do
            kill -0 "$MASTER_PID" 2>/dev/null || die "syncmaster exited while filling its object cache"
            [ $SECONDS -lt $deadline ] || die "syncmaster's object cache not ready after ${MASTER_TIMEOUT}s"
            sleep 0.1
        done
        if [ -n "$prev" ]; then
            ln -sfn "$image" "$WORK/images-$name/current.new"
            mv -T "$WORK/images-$name/current.new" "$WORK/images-$name/current"
            until grep 'object cache ready' "$LOGS/syncmaster-$name.err" | grep -q 'version=2 '; do
                kill -0 "$MASTER_PID" 2>/dev/null || die "syncmaster exited while filling its object cache"
                [ $SECONDS -lt $deadline ] || die "syncmaster's object cache of v2 not ready after ${MASTER_TIMEOUT}s"
                sleep 0.1
            done
        fi
        MASTER_CACHE=$(elapsed "$t0" "$(now)")
        log "syncmaster object cache ready after ${MASTER_CACHE}s: $(grep 'object cache ready' "$LOGS/syncmaster-$name.err" | tail -n 1 | sed 's/.*ready //')"
    elif [ -n "$prev" ]; then
        die "DELTAS needs a syncmaster with an object cache (drop --cache-level 0, or set DELTAS=0)"
    fi
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

# run_tool TOOL DEST OUTFILE -> prints measure.py's line "wall_s rx_bytes maxrss_kib cpu_s rc
# method"; the tool's output goes to OUTFILE; exit status is the tool's
run_tool() {
    local tool=$1 dest=$2 out=$3 cmd=() m=(--log "$3" --timeout "$TOOL_TIMEOUT")
    case $tool in
        rsync)  cmd=(rsync -aHAX --numeric-ids --delete "$RSYNC_URL" "$dest/") ;;
        rsyncz) cmd=(rsync -aHAX --numeric-ids --delete -z --stats "$RSYNC_URL" "$dest/") ;;
        syncd)  cmd=("$SYNCD" sync "${SYNCD_FLAGS[@]}" --master "http://$MASTER_ADDR" --root "$dest") ;;
        # shellcheck disable=SC2206
        syncdb) cmd=("$SYNCD_B" sync "${SYNCD_FLAGS[@]}" --master "http://$MASTER_ADDR" --root "$dest" $SYNCD_B_ARGS) ;;
    esac
    [ "$SYNC_AFTER" != 1 ] || m+=(--sync)
    "$PY" "$MEASURE" "${m[@]}" -- "${cmd[@]}"
}

# syncd_wire FILE -> bytes of the last summary line's "(X UNIT on the wire)", or n/a
syncd_wire() {
    sed -n 's/.*(\([0-9.]*\) \([KMGT]*i*B\) on the wire).*/\1 \2/p' "$1" | tail -n 1 | awk '
        { m = ($2 == "B") ? 1 : ($2 == "KiB") ? 2^10 : ($2 == "MiB") ? 2^20 : ($2 == "GiB") ? 2^30 : ($2 == "TiB") ? 2^40 : 0
          if (m) { printf "%.0f", $1 * m; found = 1 } }
        END { if (!found) print "n/a" }'
}
# rsync_received FILE -> rsync --stats "Total bytes received" (digit grouping removed), or n/a
rsync_received() {
    local v
    v=$(sed -n 's/^Total bytes received: *\([0-9][0-9,.]*\).*/\1/p' "$1" | tail -n 1 | tr -d ',.')
    echo "${v:-n/a}"
}

corpus_info() { printf '%s (%s, %s entries)' "$1" "$(du -sh "$CORPORA/$1" | cut -f1)" "$(find "$CORPORA/$1" | wc -l)"; }

# Per scenario:tool series. Only runs whose tool exited 0 enter T RX RSS CPU XB (the
# medians); RAW* show every timed run, failed ones marked (exitN).
declare -A T RX RSS CPU XB RAWT RAWRX RAWRSS RAWXB FID SCAN FAILS
ANY_FAIL=0

run_scenario() {
    local s=$1 image base dest tools t i label rc res tt rx rss cpu rrc method k xb
    image="$CORPORA/$(scenario_image "$s")"
    base=$(scenario_base "$s"); [ -z "$base" ] || base="$CORPORA/$base"
    dest="$WORK/host-$s"
    local fid="" fails=0 out="$WORK/run.out"
    declare -A verified=()

    log "=== scenario $s: image $image, host start ${base:-<empty>}, $RUNS runs$(want_z "$s" && echo ", plus rsync -z series")"
    start_rsyncd "$image" "$s"
    tools=(rsync)
    if [ "$SKIP_SYNCD" != 1 ]; then
        local prev=""; [ "$DELTAS" = 0 ] || prev=$base
        start_master "$image" "$s" "$prev"; tools+=(syncd); SCAN[$s]="$MASTER_SCAN / $MASTER_CACHE"
        [ -z "$SYNCD_B" ] || tools+=(syncdb)
    fi

    for t in "${tools[@]}"; do
        prepare "$dest" "$base"
        rc=0; res=$(run_tool "$t" "$dest" "$out") || rc=$?
        cat "$out" >>"$LOGS/$t-$s.log"
        if [ $rc -eq 0 ]; then
            log "warm-up $t: ${res%% *}s"
        else
            echo "!!!!!!!! FAIL: warm-up $t exited $rc (see $LOGS/$t-$s.log)" >&2; fails=$((fails + 1))
        fi
    done

    for i in $(seq "$RUNS"); do
        # Each tool goes first in turn.
        local n=${#tools[@]} j order=()
        for j in $(seq 0 $((n - 1))); do order+=("${tools[$(( (i - 1 + j) % n ))]}"); done
        ! want_z "$s" || order+=(rsyncz)
        for t in "${order[@]}"; do
            k="$s:$t"
            prepare "$dest" "$base"
            rc=0; res=$(run_tool "$t" "$dest" "$out") || rc=$?
            cat "$out" >>"$LOGS/$t-$s.log"
            read -r tt rx rss cpu rrc method <<<"${res:-n/a n/a n/a n/a $rc none}" || true
            [ "$rc" -ne 0 ] || [ "${rrc:-0}" = 0 ] || rc=$rrc
            case $t in
                syncd|syncdb) xb=$(syncd_wire "$out") ;;
                rsyncz) xb=$(rsync_received "$out") ;;
                *)      xb="" ;;
            esac
            if [ $rc -ne 0 ]; then
                echo "!!!!!!!! FAIL: $s run $i: $t exited $rc (see $LOGS/$t-$s.log)" >&2
                fails=$((fails + 1))
            fi
            log "$s run $i/$RUNS $t: ${tt}s, lo RX $rx B, peak RSS $rss KiB, CPU ${cpu}s${xb:+, self-reported $xb B}"
            RAWT[$k]+=" $tt$([ $rc -eq 0 ] || echo "(exit$rc)")"
            RAWRX[$k]+=" $rx"; RAWRSS[$k]+=" $rss"; [ -z "$xb" ] || RAWXB[$k]+=" $xb"
            if [ $rc -eq 0 ]; then
                T[$k]+=" $tt"; RX[$k]+=" $rx"; RSS[$k]+=" $rss"; CPU[$k]+=" $cpu"
                [ -z "$xb" ] || XB[$k]+=" $xb"
            fi
            if [ "$VERIFY" = all ] || { [ "$VERIFY" = once ] && [ -z "${verified[$t]:-}" ]; }; then
                verified[$t]=1; label="$s-$t-run$i"
                if verify "$image" "$dest" "$label"; then fid+="$t:OK "; else fid+="$t:FAIL(run$i) "; ANY_FAIL=1; fi
            fi
        done
    done

    stop_pid "$DAEMON_PID"; DAEMON_PID=""
    stop_pid "$MASTER_PID"; MASTER_PID=""
    if [ -n "${S3_PID:-}" ]; then
        log "object store: $(du -sb "$WORK/s3-$s/bench/fleet/objects" 2>/dev/null | cut -f1) B of objects, $(du -sb "$WORK/s3-$s/bench/fleet/deltas" 2>/dev/null | cut -f1) B of deltas, $(du -sb "$WORK/s3-$s/bench/fleet/solid" 2>/dev/null | cut -f1) B of solid delta"
        stop_pid "$S3_PID"; S3_PID=""; rm -rf "$WORK/s3-$s"
    fi
    rm -rf --one-file-system "$dest"

    FID[$s]=$(echo "${fid:-not checked}" | sed 's/ *$//')
    FAILS[$s]=$fails
    [ $fails -eq 0 ] || ANY_FAIL=1
}

# Loopback background: RX growth while nothing of ours runs (the counter is host-wide).
lo0=$(lo_rx); sleep 2; lo1=$(lo_rx)
LO_IDLE=$(( (lo1 - lo0) / 2 ))

for s in "${scenarios[@]}"; do run_scenario "$s"; done
lo0=$(lo_rx); sleep 2; lo1=$(lo_rx)
LO_IDLE_AFTER=$(( (lo1 - lo0) / 2 ))

# ---- report ----
# med SCENARIO TOOL ARRAY [FORMAT] -> median of that series ("skipped" without syncd)
med() {
    local -n arr=$3
    if [ "$2" = syncd ] && [ "$SKIP_SYNCD" = 1 ]; then echo skipped; return; fi
    if [ "$2" = rsyncz ] && ! want_z "$1"; then echo "-"; return; fi
    echo "${arr[$1:$2]:-}" | median "${4:-%.3f}"
}
raw() { local -n arr=$3; local v="${arr[$1:$2]:-}"; echo "${v# }"; }

fstype=$(scratch_fs "$SCRATCH")
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
rev=$(git -C "$BENCH_DIR/.." rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$BENCH_DIR/.." diff --quiet HEAD 2>/dev/null || rev+=" (dirty tree)"
zlist=""; for s in "${scenarios[@]}"; do ! want_z "$s" || zlist+=" $s"; done
report=$(
    echo "## $(date -u '+%Y-%m-%d %H:%M:%S UTC')$([ "$SKIP_SYNCD" = 1 ] && echo ' (rsync only, SKIP_SYNCD=1)')"
    echo
    echo "- machine: $(nproc) cores, kernel $(uname -r), CPU: ${cpu_model:-unknown}, RAM $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "- scratch: on $fstype; page cache warm, one untimed warm-up per tool; host dir recreated (untimed, then \`sync\`) before every run"
    echo "- runs: $RUNS per tool per scenario, tools alternated; SYNC_AFTER=$SYNC_AFTER; source rev: $rev"
    echo "- rsync: $(rsync --version | head -n1 | sed 's/  */ /g')"
    echo "- commands:"
    echo "  - rsync: \`rsync -aHAX --numeric-ids --delete rsync://127.0.0.1:PORT/img/ DEST/\` (daemon: \`rsync --daemon --no-detach --config=FILE --port=PORT\`, module \`img\` read only, uid/gid root, no chroot, numeric ids)"
    if [ -n "$zlist" ]; then
        echo "  - rsync -z (scenarios:$zlist): \`rsync -aHAX --numeric-ids --delete -z --stats rsync://127.0.0.1:PORT/img/ DEST/\`, one run per iteration after the timed pair, from a freshly prepared host dir; a separate series, not in the rsync wall-time median"
    fi
    if [ "$SKIP_SYNCD" != 1 ]; then
        echo "  - syncd: \`$(shown "$SYNCD") sync ${SYNCD_FLAGS[*]:+${SYNCD_FLAGS[*]} }--master http://127.0.0.1:PORT --root DEST\` (master: \`$(shown "$SYNCMASTER") serve ${MASTER_FLAGS[*]:+${MASTER_FLAGS[*]} }--image IMAGE --listen 127.0.0.1:0\`, started and scanned before timing)"
        ! outside "$SYNCD" "$SYNCMASTER" "$SYNCD_B" || echo "  - binaries outside this checkout are shown by their file name only"
        [ "$DELTAS" = 0 ] || echo "  - upgrade scenarios (DELTAS=1): the master is started with \`--images DIR --state-dir STATE --poll 200ms\` instead, DIR/current pointing first at the host's release (published as v1), then at IMAGE (v2); timing starts once v2's object cache (whole frames, and deltas against v1) is ready"
    fi
    echo "  - every client run goes through \`bench/measure.py --log FILE --timeout $TOOL_TIMEOUT$([ "$SYNC_AFTER" != 1 ] || echo ' --sync') -- CMD\`"
    echo "  - medians exclude runs whose tool exited non-zero (marked \`(exitN)\` in the raw lists)"
    echo "  - fidelity: \`rsync -aHAXcn --numeric-ids --delete -i IMAGE/ DEST/\` must list nothing but \`./\` (VERIFY=$VERIFY)"
    echo "- measurement:"
    echo "  - wall: monotonic clock from fork to reap of the client (measure.py)"
    echo "  - wire bytes: growth of the \`lo\` RX byte counter (/proc/net/dev) across the run, the same way for every tool. On loopback every byte sent is also received on \`lo\`, so this is everything the client received plus the request direction (file lists, checksums, acks) and IP/TCP header overhead; it is host-wide, so unrelated loopback traffic counts too (idle background over 2 s before the runs: $LO_IDLE B/s, after: $LO_IDLE_AFTER B/s)"
    echo "  - self-reported bytes, for comparison: syncd's summary \"(X on the wire)\" (rounded to 0.1 of its unit) and rsync -z's \"Total bytes received\" (rsync protocol bytes received by the client, no TCP/IP overhead)"
    echo "  - peak RSS: $RSS_METHOD; for rsync that is the larger of its generator and receiver processes, not their sum; MiB = KiB/1024"
    echo
    echo "### Wall time (median s)"
    echo
    echo "| scenario | image | host starts as | rsync | syncd | syncd/rsync | target | met | rsync -z | fidelity | master scan s / object cache ready s (untimed) |"
    echo "|---|---|---|---:|---:|---:|---:|---|---:|---|---:|"
    for s in "${scenarios[@]}"; do
        b=$(scenario_base "$s")
        f=${FID[$s]}; [ "${FAILS[$s]}" -eq 0 ] || f+=" ; ${FAILS[$s]} tool run(s) FAILED"
        mr=$(med "$s" rsync T); ms=$(med "$s" syncd T); r=$(ratio "$mr" "$ms"); tg=$(target_wall "$s")
        echo "| $s | $(corpus_info "$(scenario_image "$s")") | $([ -n "$b" ] && corpus_info "$b" || echo empty) | $mr | $ms | $r | $(tgt "$tg") | $(met "$r" "$tg") | $(med "$s" rsyncz T) | $f | ${SCAN[$s]:-n/a} |"
    done
    echo
    echo "### Bytes on the wire (median MiB per run; lo RX growth unless noted)"
    echo
    echo "| scenario | rsync | syncd | syncd/rsync | rsync -z | syncd/rsync -z | target | met | rsync -z \"Total bytes received\" | syncd \"on the wire\" | same, syncd/rsync -z |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    for s in "${scenarios[@]}"; do
        rr=$(med "$s" rsync RX %.0f); rs=$(med "$s" syncd RX %.0f); rz=$(med "$s" rsyncz RX %.0f)
        xz=$(med "$s" rsyncz XB %.0f); xs=$(med "$s" syncd XB %.0f)
        r=$(ratio "$rz" "$rs"); tg=$(target_bytes "$s")
        echo "| $s | $(mib "$rr") | $(mib "$rs") | $(ratio "$rr" "$rs") | $(mib "$rz") | $r | $(tgt "$tg") | $(met "$r" "$tg") | $(mib "$xz") | $(mib "$xs") | $(ratio "$xz" "$xs") |"
    done
    echo
    echo "### Client resources (median peak RSS MiB, median CPU s)"
    echo
    echo "| scenario | rsync RSS | rsync CPU | rsync -z RSS | rsync -z CPU | syncd RSS | syncd CPU | syncd RSS target | met |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    for s in "${scenarios[@]}"; do
        ss_=$(kib2mib "$(med "$s" syncd RSS %.0f)"); tg=$(target_rss "$s")
        echo "| $s | $(kib2mib "$(med "$s" rsync RSS %.0f)") | $(med "$s" rsync CPU %.2f) | $(kib2mib "$(med "$s" rsyncz RSS %.0f)") | $(med "$s" rsyncz CPU %.2f) | $ss_ | $(med "$s" syncd CPU %.2f) | $(tgt "$tg" " MiB") | $(met "$ss_" "$tg") |"
    done
    echo
    if [ -n "$SYNCD_B" ]; then
        echo "### A/B: syncd against SYNCD_B (\`$(shown "$SYNCD_B")\`), same master, same runs (median)"
        echo
        [ -z "$SYNCD_B_ARGS" ] || echo "B runs with \`$SYNCD_B_ARGS\`."
        echo
        echo "| scenario | B wall s | syncd wall s | syncd/B | B RSS MiB | syncd RSS MiB | B CPU s | syncd CPU s | B lo RX MiB | B/rsync -z | syncd lo RX MiB | syncd/rsync -z |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for s in "${scenarios[@]}"; do
            mb=$(med "$s" syncdb T); ms=$(med "$s" syncd T)
            rb=$(med "$s" syncdb RX %.0f); rs=$(med "$s" syncd RX %.0f); rz=$(med "$s" rsyncz RX %.0f)
            echo "| $s | $mb | $ms | $(ratio "$mb" "$ms") | $(kib2mib "$(med "$s" syncdb RSS %.0f)") | $(kib2mib "$(med "$s" syncd RSS %.0f)") | $(med "$s" syncdb CPU %.2f) | $(med "$s" syncd CPU %.2f) | $(mib "$rb") | $(ratio "$rz" "$rb") | $(mib "$rs") | $(ratio "$rz" "$rs") |"
        done
        echo
    fi
    echo "Raw numbers, in run order:"
    echo
    for s in "${scenarios[@]}"; do
        for t in rsync syncd syncdb rsyncz; do
            [ -n "$(raw "$s" "$t" RAWT)" ] || continue
            n=$t; [ "$t" != rsyncz ] || n="rsync -z"; [ "$t" != syncdb ] || n="syncd B"
            line="- $s $n: wall s [$(raw "$s" "$t" RAWT)]; lo RX B [$(raw "$s" "$t" RAWRX)]; peak RSS KiB [$(raw "$s" "$t" RAWRSS)]"
            case $t in
                syncd|syncdb) line+="; \"on the wire\" B [$(raw "$s" "$t" RAWXB)]" ;;
                rsyncz) line+="; \"Total bytes received\" B [$(raw "$s" "$t" RAWXB)]" ;;
            esac
            echo "$line"
        done
    done
    echo
)
echo
echo "$report"
[ -n "$RESULTS" ] || RESULTS=$(new_results "$BENCH_DIR" sync-vs-rsync)
printf '%s\n\n' "$report" >>"$RESULTS"
log "appended to $RESULTS; logs in $LOGS"
[ $ANY_FAIL -eq 0 ] || { echo "!!!!!!!! FAIL: some runs or fidelity checks failed (see above)" >&2; exit 1; }
