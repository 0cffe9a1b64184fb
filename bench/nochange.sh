#!/usr/bin/env bash
# nochange.sh: cost of a pass that finds nothing to do, on a host already converged to IMAGE.
#
# Usage: [IMAGE=bookworm-big|files-1m|...] [RUNS=7] bench/nochange.sh
#
# Setup (untimed): start `syncmaster serve` and an rsync daemon on loopback, converge a
# host root with syncd (cold sync, reported for information), run syncd once more to
# warm its host index (--state-dir), run rsync once to warm its side, then check that
# the root matches the image. Then, per round, runs each of these once, rotating which
# goes first:
#   - the stat-walk floor  `find ROOT -printf '%s %T@ %m %U %G\n'` (output to /dev/null)
#   - `syncd sync -q --master URL --root ROOT --state-dir STATE`
#   - `rsync -aHAX --numeric-ids --delete rsync://127.0.0.1:PORT/img/ ROOT/`
# Every run goes through bench/measure.py (wall time, lo RX bytes, peak RSS, CPU).
# Server CPU per round: syncmaster's own utime+stime (/proc/PID/stat, clock ticks)
# just before and after each syncd run; for rsync, the daemon's cutime+cstime (CPU of
# the per-client children it forked and reaped) before and after each rsync run, read
# once the daemon has no children left. Totals are divided by the number of rounds.
# Prints medians, ratios and the issue's targets; appends the section to RESULTS.
# syncmaster/syncd builds whose --help lists --insecure (TLS builds) get --insecure.
#
# Env:
#   IMAGE=bookworm-big   corpus name under CORPORA (e.g. files-1m: bench/corpora.sh files-1m)
#   RUNS=7               rounds
#   CORPORA=/var/tmp/gis-corpora
#   SCRATCH=/var/tmp/gis-bench     the host root and state dir live in a temp dir here,
#                        removed on exit; logs go to $SCRATCH/logs
#   SYNCD, SYNCMASTER    binaries (default target/release/{syncd,syncmaster} of this checkout)
#   VERIFY=1             after setup, `rsync -aHAXn --numeric-ids --delete -i IMAGE/ ROOT/`
#                        must list nothing but `./` (2 = with -c, full checksums; 0 = skip)
#   MASTER_TIMEOUT=900   seconds to wait for syncmaster's `listening on` line
#   TOOL_TIMEOUT=3600    a single run (including the setup sync) is killed after this
#   RESULTS=bench/results/<UTC stamp>-nochange.md   markdown file the dated section is
#                        appended to (by default a new file per run)
#   WALK_ONLY=1          1: syncd passes run as deployed, so a pass after one that found the
#                        host matching stops after the walk (the unchanged-host record);
#                        0: the record is removed (untimed) before every syncd run, so each
#                        pass loads the manifest, merges the host index and plans
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
IMAGE_NAME=${IMAGE:-bookworm-big}
image=$CORPORA/$IMAGE_NAME
RUNS=${RUNS:-7}
WALK_ONLY=${WALK_ONLY:-1}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SYNCD=${SYNCD:-$REPO/target/release/syncd}
SYNCMASTER=${SYNCMASTER:-$REPO/target/release/syncmaster}
# Paths as the report shows them: relative to the checkout where they lie in it, else the file
# name only (reports hold no absolute paths of this machine).
shown() { case $1 in "$REPO"/*) echo "${1#"$REPO"/}" ;; *) echo "${1##*/}" ;; esac; }
outside() { local p; for p; do [[ $p == "$REPO"/* ]] || return 0; done; return 1; }
VERIFY=${VERIFY:-1}
MASTER_TIMEOUT=${MASTER_TIMEOUT:-900}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-3600}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
MEASURE=$here/measure.py

die() { echo "nochange: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
case $VERIFY in 0|1|2) ;; *) die "VERIFY must be 0, 1 or 2" ;; esac
[ "$(id -u)" -eq 0 ] || die "must run as root (trees contain root-owned files, devices, caps)"
[ -d "$image" ] || die "no corpus at $image (run bench/corpora.sh $IMAGE_NAME)"
[ -x "$SYNCD" ] || die "syncd not found at $SYNCD (cargo build --release, or set SYNCD)"
[ -x "$SYNCMASTER" ] || die "syncmaster not found at $SYNCMASTER (or set SYNCMASTER)"
for c in rsync python3 pgrep getconf ss; do command -v $c >/dev/null || die "$c missing"; done
PY=$(python3 -c 'import sys; print(sys.executable)')
# Builds with TLS refuse plain TCP unless told --insecure (plain TCP, like the rsync
# daemon); older builds do not know the flag. Pass it only where --help lists it.
MASTER_FLAGS=() SYNCD_FLAGS=()
h=$("$SYNCMASTER" serve --help 2>&1 || true); [[ $h != *--insecure* ]] || MASTER_FLAGS=(--insecure)
h=$("$SYNCD" sync --help 2>&1 || true); [[ $h != *--insecure* ]] || SYNCD_FLAGS=(--insecure)
HZ=$(getconf CLK_TCK)
RSS_METHOD="GNU time \`%M\` (wait4 ru_maxrss)"
[ -x "${GNU_TIME:-/usr/bin/time}" ] ||
    RSS_METHOD="getrusage(RUSAGE_CHILDREN) in measure.py (no GNU time: figures include a ~10-15 MiB floor from the forking Python process)"
case $IMAGE_NAME in bookworm-big) RSS_TARGET=64 ;; files-1m) RSS_TARGET=300 ;; *) RSS_TARGET="" ;; esac

mkdir -p "$SCRATCH" "$SCRATCH/logs"
LOGS=$SCRATCH/logs
work=$(mktemp -d "$SCRATCH/nochange.XXXXXX")
root=$work/root state=$work/state
MASTER_PID="" DAEMON_PID=""
stop_pid() {  # TERM, wait up to 5s, then KILL
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$DAEMON_PID"; stop_pid "$MASTER_PID"
    [ -d "$work" ] && rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { tr ' ' '\n' | awk NF | sort -g | awk -v f="${1:-%.3f}" '{ a[NR] = $1 } END {
    if (NR == 0) { print "n/a"; exit }
    if (NR % 2) printf f, a[(NR + 1) / 2]; else printf f, (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# div A B [FORMAT] -> A/B (n/a unless both are numbers and B > 0)
div() { awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf f, a / b; else print "n/a" }'; }
# met VALUE le|ge TARGET -> yes / **no** / n/a, or - without a target
met() {
    [ -n "$3" ] || { echo "-"; return; }
    awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { if (v !~ /^[0-9.]+$/) print "n/a";
        else if ((op == "le" && v + 0 <= t + 0) || (op == "ge" && v + 0 >= t + 0)) print "yes"; else print "**no**" }'
}
kib2mib() { awk -v k="$1" 'BEGIN { if (k ~ /^[0-9.]+$/) printf "%.1f", k / 1024; else print k }'; }
# ticks PID self|children -> utime+stime or cutime+cstime of PID, in clock ticks
ticks() {
    sed 's/^.*) //' "/proc/$1/stat" | awk -v w="$2" '{ print (w == "self") ? $12 + $13 : $14 + $15 }'
}
# wait until PID has no child processes (zombies included) left, at most 10 s
wait_no_children() {
    local i
    for i in $(seq 500); do pgrep -P "$1" >/dev/null || return 0; sleep 0.02; done
    log "warning: pid $1 still has children after 10 s; its CPU figure for this round may be short"
}
# measure LOG CMD... -> "wall_s rx_bytes maxrss_kib cpu_s rc method" (exit status: CMD's)
measure() { local out=$1; shift; "$PY" "$MEASURE" --log "$out" --timeout "$TOOL_TIMEOUT" -- "$@"; }

# ---- setup (untimed) ----
t0=$(now)
"$SYNCMASTER" serve "${MASTER_FLAGS[@]}" --image "$image" --listen 127.0.0.1:0 >"$work/m.out" 2>"$LOGS/nochange-syncmaster.err" &
MASTER_PID=$!
deadline=$((SECONDS + MASTER_TIMEOUT))
until grep -q '^listening on ' "$work/m.out"; do
    kill -0 "$MASTER_PID" 2>/dev/null || { tail -n 20 "$LOGS/nochange-syncmaster.err" >&2; die "syncmaster exited before listening"; }
    [ $SECONDS -lt $deadline ] || die "syncmaster not listening after ${MASTER_TIMEOUT}s"
    sleep 0.05
done
addr=$(sed -n 's/^listening on //p' "$work/m.out" | head -n 1)
scan=$(elapsed "$t0" "$(now)")
log "syncmaster pid $MASTER_PID ready at $addr after ${scan}s"
# Builds with an object cache compress every object once, in the background, after the
# scan: wait for it, so it does not compete with the timed rounds for the two cores.
if [[ $("$SYNCMASTER" serve --help 2>&1 || true) == *--cache-level* ]]; then
    until grep -q 'object cache ready' "$LOGS/nochange-syncmaster.err"; do
        kill -0 "$MASTER_PID" 2>/dev/null || die "syncmaster exited while filling its object cache"
        [ $SECONDS -lt $deadline ] || die "syncmaster's object cache not ready after ${MASTER_TIMEOUT}s"
        sleep 0.1
    done
    log "syncmaster object cache ready after $(elapsed "$t0" "$(now)")s"
fi

cat >"$work/rsyncd.conf" <<CONF
log file = $LOGS/nochange-rsyncd.log
uid = root
gid = root
use chroot = no
numeric ids = yes
[img]
path = $image
read only = yes
hosts allow = 127.0.0.1
CONF
for attempt in 1 2 3 4 5; do
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rsync --daemon --no-detach --config="$work/rsyncd.conf" --address=127.0.0.1 --port="$port" \
        >>"$LOGS/nochange-rsyncd.out" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 100); do
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        ss -Htln "sport = :$port" | grep -q . && break 2
        sleep 0.1
    done
    stop_pid "$DAEMON_PID"; DAEMON_PID=""
done
[ -n "$DAEMON_PID" ] || die "rsync daemon failed to start (see $LOGS/nochange-rsyncd.*)"
log "rsync daemon pid $DAEMON_PID on port $port"

url="http://$addr" rurl="rsync://127.0.0.1:$port/img/"
SYNCD_CMD=("$SYNCD" sync "${SYNCD_FLAGS[@]}" -q --master "$url" --root "$root" --state-dir "$state")
RSYNC_CMD=(rsync -aHAX --numeric-ids --delete "$rurl" "$root/")
FIND_CMD=(find "$root" -printf '%s %T@ %m %U %G\n')

mkdir -p "$root"
log "setup: converging $root with syncd (cold sync of $IMAGE_NAME) ..."
setup_sync=$(measure "$LOGS/nochange-setup-syncd.log" "$SYNCD" sync "${SYNCD_FLAGS[@]}" --master "$url" --root "$root" --state-dir "$state") ||
    die "setup syncd failed: $setup_sync (see $LOGS/nochange-setup-syncd.log)"
setup_summary=$(grep -m1 'converged to' "$LOGS/nochange-setup-syncd.log" | sed 's/^syncd: //' || true)
log "setup syncd: $setup_sync; $setup_summary"
setup_index=$(measure "$work/warm.log" "${SYNCD_CMD[@]}") || die "index-warming syncd failed: $setup_index"
log "setup syncd (warms the index): $setup_index"
setup_rsync=$(measure "$LOGS/nochange-setup-rsync.log" "${RSYNC_CMD[@]}") || die "warming rsync failed: $setup_rsync"
log "setup rsync: $setup_rsync"
fidelity="not checked (VERIFY=0)"
if [ "$VERIFY" != 0 ]; then
    vflags=-aHAXn; [ "$VERIFY" != 2 ] || vflags=-aHAXcn
    bad=$(rsync "$vflags" --numeric-ids --delete -i "$image/" "$root/" 2>&1 | grep -v -E '^[^ ]+ \./$' | grep -v '^$' || true)
    if [ -n "$bad" ]; then
        printf '%s\n' "$bad" >"$LOGS/nochange-verify.txt"
        echo "!!!!!!!! FAIL: root differs from the image in $(printf '%s\n' "$bad" | wc -l) entries (see $LOGS/nochange-verify.txt)" >&2
        fidelity="**FAIL** ($(printf '%s\n' "$bad" | wc -l) entries differ, \`rsync $vflags\`)"
    else
        fidelity="OK (\`rsync $vflags --numeric-ids --delete -i IMAGE/ ROOT/\` lists only \`./\`)"
        log "fidelity $fidelity"
    fi
fi

# ---- rounds ----
declare -A T RX RSS CPU RAWT
m_ticks="" d_ticks="" m_total=0 d_total=0 fails=0
tools=(find syncd rsync)
for i in $(seq "$RUNS"); do
    rot=$(( (i - 1) % 3 ))
    order=("${tools[@]:$rot}" "${tools[@]:0:$rot}")
    msg="round $i/$RUNS:"
    for t in "${order[@]}"; do
        rc=0
        case $t in
            find)  res=$(measure /dev/null "${FIND_CMD[@]}") || rc=$? ;;
            syncd) [ "$WALK_ONLY" != 0 ] || rm -f "$state"/unchanged-*.bin
                   a=$(ticks "$MASTER_PID" self)
                   res=$(measure "$work/syncd.out" "${SYNCD_CMD[@]}") || rc=$?
                   b=$(ticks "$MASTER_PID" self)
                   m_ticks+=" $((b - a))"; m_total=$((m_total + b - a))
                   cat "$work/syncd.out" >>"$LOGS/nochange-syncd.log" ;;
            rsync) wait_no_children "$DAEMON_PID"; a=$(ticks "$DAEMON_PID" children)
                   res=$(measure "$work/rsync.out" "${RSYNC_CMD[@]}") || rc=$?
                   wait_no_children "$DAEMON_PID"; b=$(ticks "$DAEMON_PID" children)
                   d_ticks+=" $((b - a))"; d_total=$((d_total + b - a))
                   cat "$work/rsync.out" >>"$LOGS/nochange-rsync.log" ;;
        esac
        read -r tt rx rss cpu _ _ <<<"${res:-n/a n/a n/a n/a}" || true
        RAWT[$t]+=" $tt$([ $rc -eq 0 ] || echo "(exit$rc)")"
        if [ $rc -eq 0 ]; then
            T[$t]+=" $tt"; RX[$t]+=" $rx"; RSS[$t]+=" $rss"; CPU[$t]+=" $cpu"
        else
            echo "!!!!!!!! FAIL: round $i: $t exited $rc" >&2; fails=$((fails + 1))
        fi
        msg+="  $t ${tt}s ${rss}KiB"
    done
    log "$msg  (master +${m_ticks##* } ticks, rsync daemon children +${d_ticks##* } ticks)"
done

# ---- report ----
med() { local -n arr=$1; echo "${arr[$2]:-}" | median "${3:-%.3f}"; }
mf=$(med T find); ms=$(med T syncd); mr=$(med T rsync)
rss_s=$(kib2mib "$(med RSS syncd %.0f)")
speedup=$(div "$mr" "$ms"); vs_find=$(div "$ms" "$mf")
# server CPU per round, in ms (ticks * 1000 / HZ / RUNS)
m_ms=$(div "$((m_total * 1000))" "$((HZ * RUNS))" %.1f); d_ms=$(div "$((d_total * 1000))" "$((HZ * RUNS))" %.1f)
cpu_ratio=$(div "$m_total" "$d_total" %.4f)
cpu_inv=$(div "$d_total" "$m_total" %.0f)
entries=$(find "$image" | wc -l)
fstype=$(scratch_fs "$SCRATCH")
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
rev=$(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$here/.." diff --quiet HEAD 2>/dev/null || rev+=" (dirty tree)"
f4() { set -- $1; echo "wall ${1}s, peak RSS $(kib2mib "$3") MiB, CPU ${4}s"; }
report=$(cat <<MD
## $(date -u '+%Y-%m-%d %H:%M:%S UTC') no-change pass ($IMAGE_NAME, $entries entries, $RUNS rounds, alternated)

- machine: $(nproc) cores, kernel $(uname -r), CPU: ${cpu_model:-unknown}, RAM $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo); scratch on $fstype; page cache warm; syncd host index warm; WALK_ONLY=$WALK_ONLY ($([ "$WALK_ONLY" != 0 ] && echo "timed passes may stop after the walk: the unchanged-host record" || echo "the unchanged-host record removed before each pass: full passes")); source rev: $rev
- rsync: $(rsync --version | head -n1 | sed 's/  */ /g'); CLK_TCK $HZ
- setup (untimed): master scan ${scan}s; cold \`syncd sync\` into the empty root: $(f4 "$setup_sync") ($setup_summary); index-warming syncd pass: $(f4 "$setup_index"); warming rsync pass: $(f4 "$setup_rsync"); fidelity: $fidelity
- commands (each round runs all three once, rotating which goes first; each through \`bench/measure.py\`):
  - find: \`find ROOT -printf '%s %T@ %m %U %G\n'\` (to /dev/null)
  - syncd: \`$(shown "$SYNCD") sync ${SYNCD_FLAGS[*]:+${SYNCD_FLAGS[*]} }-q --master http://127.0.0.1:PORT --root ROOT --state-dir STATE\` (master: \`$(shown "$SYNCMASTER") serve ${MASTER_FLAGS[*]:+${MASTER_FLAGS[*]} }--image IMAGE --listen 127.0.0.1:0\`)$(! outside "$SYNCD" "$SYNCMASTER" || echo "; binaries outside this checkout are shown by their file name only")
  - rsync: \`rsync -aHAX --numeric-ids --delete rsync://127.0.0.1:PORT/img/ ROOT/\` (daemon: \`rsync --daemon --no-detach\`, module \`img\` read only, uid/gid root, no chroot, numeric ids)
- measurement: wall = monotonic clock from fork to reap; peak RSS = $RSS_METHOD (rsync: the larger of its two client processes); lo RX = growth of the \`lo\` RX byte counter across the run (both directions, headers included, host-wide); server CPU = syncmaster's utime+stime from /proc/PID/stat read just before and after each syncd run, and the rsync daemon's cutime+cstime (its reaped per-client children) read before and after each rsync run once it has no children left; total ticks / rounds, resolution 1 tick = $((1000 / HZ)) ms

| tool | median s | vs find | rsync / tool | median peak RSS MiB | median client CPU s | server CPU ms per round | median lo RX B |
|---|---:|---:|---:|---:|---:|---:|---:|
| find (stat walk) | $mf | 1.00 | $(div "$mr" "$mf") | $(kib2mib "$(med RSS find %.0f)") | $(med CPU find %.2f) | - | - |
| syncd | $ms | $vs_find | $speedup | $rss_s | $(med CPU syncd %.2f) | $m_ms (syncmaster, $m_total ticks total) | $(med RX syncd %.0f) |
| rsync daemon | $mr | $(div "$mr" "$mf") | 1.00 | $(kib2mib "$(med RSS rsync %.0f)") | $(med CPU rsync %.2f) | $d_ms (daemon children, $d_total ticks total) | $(med RX rsync %.0f) |

| target | measured | target | met |
|---|---:|---:|---|
| syncd at least 4x faster than rsync (rsync/syncd wall) | $speedup | ≥ 4 | $(met "$speedup" ge 4) |
| syncd at most 2x the stat walk (syncd/find wall) | $vs_find | ≤ 2 | $(met "$vs_find" le 2) |
| master CPU per client round, syncmaster / rsync daemon | $cpu_ratio ($([ "$cpu_inv" = n/a ] && echo "n/a" || echo "1/$cpu_inv")) | ≤ 0.02 (1/50) | $(met "$cpu_ratio" le 0.02) |
| syncd peak RSS per round (median) | $rss_s MiB | $([ -n "$RSS_TARGET" ] && echo "≤ $RSS_TARGET MiB" || echo "- (targets: bookworm-big 64, files-1m 300)") | $(met "$rss_s" le "$RSS_TARGET") |

- raw wall s: find [${RAWT[find]# }]; syncd [${RAWT[syncd]# }]; rsync [${RAWT[rsync]# }]
- raw peak RSS KiB: find [${RSS[find]# }]; syncd [${RSS[syncd]# }]; rsync [${RSS[rsync]# }]
- raw server CPU ticks per round: syncmaster [${m_ticks# }]; rsync daemon children [${d_ticks# }]
- raw lo RX B: syncd [${RX[syncd]# }]; rsync [${RX[rsync]# }]
MD
)
echo
echo "$report"
[ -n "$RESULTS" ] || RESULTS=$(new_results "$here" nochange)
printf '\n%s\n' "$report" >>"$RESULTS"
log "appended to $RESULTS; logs in $LOGS"
[ "$fails" -eq 0 ] && [[ $fidelity != *FAIL* ]] || { echo "!!!!!!!! FAIL: some runs failed or the root did not match (see above)" >&2; exit 1; }
