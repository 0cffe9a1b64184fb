#!/usr/bin/env bash
# throttle.sh: does syncd hold its configured I/O rates? Samples the kernel's own per-process
# counters while syncd works on a real root and judges each 10 s window against the limit.
#
# Usage: bench/throttle.sh [CHECK...]     (default: write read net)
#   write  cold sync of IMAGE into an empty dir with --write-bytes-per-sec RATE;
#          samples write_bytes in /proc/PID/io
#   read   full re-hash of the converged root (syncd drift, no host index, page cache
#          dropped first) with --read-bytes-per-sec RATE; samples read_bytes in /proc/PID/io
#   net    cold sync with --net-bytes-per-sec RATE; samples the loopback RX byte counter
#          (/proc/net/dev, lo), which counts every byte the master sends
#
# A window passes when its rate is within TOLERANCE percent of RATE. The first window (start-up:
# manifest, walk) and the last, partial one are shown but not judged.
#
# Env: CORPORA (default /var/tmp/gis-corpora), IMAGE (default bookworm-big), RATE (default
#      20MiB), WINDOW (seconds, default 10), TOLERANCE (percent, default 10),
#      SCRATCH (default /var/tmp/gis-bench), SYNCD, SYNCMASTER (default target/release/…),
#      RESULTS (default: a new file per run, bench/results/<UTC stamp>-throttle.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
IMAGE_NAME=${IMAGE:-bookworm-big}
image=$CORPORA/$IMAGE_NAME
RATE=${RATE:-20MiB}
WINDOW=${WINDOW:-10}
TOLERANCE=${TOLERANCE:-10}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench}
SYNCD=${SYNCD:-$here/../target/release/syncd}
SYNCMASTER=${SYNCMASTER:-$here/../target/release/syncmaster}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
die() { echo "throttle.sh: $*" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, root-owned trees)"
[ -d "$image" ] || die "no corpus at $image (run bench/corpora.sh $IMAGE_NAME)"
[ -x "$SYNCD" ] && [ -x "$SYNCMASTER" ] || die "build first: cargo build --release (or set SYNCD/SYNCMASTER)"
checks=("$@"); [ ${#checks[@]} -gt 0 ] || checks=(write read net)
rate_bytes=$(python3 - "$RATE" <<'PY'
import re, sys
m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B?)?\s*", sys.argv[1])
mult = {None: 1, "K": 1024, "KiB": 1024, "M": 1 << 20, "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30,
        "KB": 1000, "MB": 10**6, "GB": 10**9}
print(int(float(m.group(1)) * mult[m.group(2)]))
PY
)

mkdir -p "$SCRATCH"
work=$(mktemp -d "$SCRATCH/throttle.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf --one-file-system "$work"; }
trap cleanup EXIT

"$SYNCMASTER" serve --insecure --image "$image" --listen 127.0.0.1:0 >"$work/m.out" 2>"$work/m.err" & pids+=($!)
for _ in $(seq 3000); do grep -q '^listening on ' "$work/m.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/m.out")
[ -n "$addr" ] || die "syncmaster did not start (see $work/m.err)"
# The master's object cache (compress once, in the background): let it finish first, so its
# CPU use does not overlap the sampled windows.
if [[ $("$SYNCMASTER" serve --help 2>&1 || true) == *--cache-level* ]]; then
    for _ in $(seq 6000); do grep -q 'object cache ready' "$work/m.err" && break; sleep 0.1; done
fi

lo_rx() { awk '$1 == "lo:" { print $2 }' /proc/net/dev; }
counter() {  # counter KIND PID
    case $1 in
        write) awk '/^write_bytes:/ { print $2 }' "/proc/$2/io" 2>/dev/null ;;
        read) awk '/^read_bytes:/ { print $2 }' "/proc/$2/io" 2>/dev/null ;;
        net) lo_rx ;;
    esac
}

# sample KIND PID: prints one rate (bytes/s) per window while PID lives; the last may be partial
sample() {
    local kind=$1 pid=$2 prev now t0 t1 v
    prev=$(counter "$kind" "$pid"); t0=$(date +%s.%N)
    while kill -0 "$pid" 2>/dev/null; do
        while kill -0 "$pid" 2>/dev/null &&
            awk -v s="$t0" -v n="$(date +%s.%N)" -v w="$WINDOW" 'BEGIN { exit !(n - s < w) }'; do sleep 0.1; done
        v=$(counter "$kind" "$pid" || true)
        [ -n "$v" ] || break  # exited between the check and the read
        now=$v; t1=$(date +%s.%N)
        awk -v a="$prev" -v b="$now" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.0f %.2f\n", (b - a) / (e - s), e - s }'
        prev=$now; t0=$t1
    done
}

declare -A VERDICT TABLE
run_check() {
    local kind=$1
    local root=$work/root-$kind args=() pid rows n i ok=1 judged=0
    case $kind in
        write) rm -rf --one-file-system "$root"; mkdir "$root"; sync
               args=(sync -q --insecure --master "http://$addr" --root "$root" --write-bytes-per-sec "$RATE") ;;
        read) if [ ! -d "$root" ]; then mkdir "$root"; "$SYNCD" sync -q --insecure --master "http://$addr" --root "$root" 2>/dev/null; fi
              sync; echo 3 >/proc/sys/vm/drop_caches
              args=(drift --insecure --master "http://$addr" --root "$root" --read-bytes-per-sec "$RATE") ;;
        net) rm -rf --one-file-system "$root"; mkdir "$root"; sync
             args=(sync -q --insecure --master "http://$addr" --root "$root" --net-bytes-per-sec "$RATE") ;;
    esac
    echo "== $kind: syncd ${args[*]}" >&2
    "$SYNCD" "${args[@]}" >/dev/null 2>"$work/$kind.err" & pid=$!; pids+=($pid)
    rows=$(sample "$kind" "$pid")
    wait "$pid" || true
    n=$(printf '%s\n' "$rows" | awk NF | wc -l)
    local table="| window | seconds | MiB/s | vs limit | judged |\n|---:|---:|---:|---:|---|\n"
    i=0
    while read -r r secs; do
        [ -n "$r" ] || continue
        i=$((i + 1))
        local dev judge
        dev=$(awk -v r="$r" -v l="$rate_bytes" 'BEGIN { printf "%+.1f%%", (r - l) * 100 / l }')
        if [ "$i" -eq 1 ] || [ "$i" -eq "$n" ]; then judge="no ($([ "$i" -eq 1 ] && echo start-up || echo last, partial))"
        else
            judged=$((judged + 1))
            if awk -v r="$r" -v l="$rate_bytes" -v t="$TOLERANCE" 'BEGIN { exit !((r - l) * 100 / l <= t && (l - r) * 100 / l <= t) }'
            then judge=pass; else judge=FAIL; ok=0; fi
        fi
        table+="| $i | $secs | $(awk -v r="$r" 'BEGIN { printf "%.2f", r / 1048576 }') | $dev | $judge |\n"
        echo "   window $i: $(awk -v r="$r" 'BEGIN { printf "%.2f", r / 1048576 }') MiB/s ($dev) $judge" >&2
    done <<<"$rows"
    [ "$judged" -gt 0 ] || ok=0
    VERDICT[$kind]=$([ $ok -eq 1 ] && echo "PASS ($judged windows within ±$TOLERANCE%)" || echo "FAIL ($judged judged windows)")
    TABLE[$kind]=$table
    tail -n 1 "$work/$kind.err" >&2
}
for c in "${checks[@]}"; do run_check "$c"; done

report=$(
    echo
    echo "## $(date -u '+%Y-%m-%d %H:%M:%S UTC') throttling: $RATE on $IMAGE_NAME"
    echo
    echo "- machine: $(nproc) cores, kernel $(uname -r); scratch on $(scratch_fs "$SCRATCH"); rev $(git -C "$here/.." rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- command: \`RATE=$RATE WINDOW=$WINDOW bench/throttle.sh ${checks[*]}\`; windows of ${WINDOW}s; the first and the last window are not judged"
    for c in "${checks[@]}"; do
        echo
        case $c in
            write) echo "### write: cold sync with \`--write-bytes-per-sec $RATE\`, sampling \`write_bytes\` in /proc/PID/io" ;;
            read) echo "### read: full re-hash (\`syncd drift\`, no index, caches dropped) with \`--read-bytes-per-sec $RATE\`, sampling \`read_bytes\`" ;;
            net) echo "### net: cold sync with \`--net-bytes-per-sec $RATE\`, sampling the lo RX byte counter" ;;
        esac
        echo
        echo "verdict: ${VERDICT[$c]}"
        echo
        printf '%b' "${TABLE[$c]}"
    done
)
echo "$report"
[ -n "$RESULTS" ] || RESULTS=$(new_results "$here" throttle)
echo "$report" >>"$RESULTS"
