#!/usr/bin/env bash
# fleet.sh: HOSTS (default 200) concurrent cold `syncd sync` processes against one master, once
# with the objects served by the master and once from an S3 server (s3s-fs): the master's peak
# RSS, CPU seconds and bytes sent, the S3 server's CPU, the wall time until every host has
# converged, and failures.
#
# Usage: [HOSTS=200] [ROUNDS=3] [MODES="master store"] [SAMPLE=20] bench/fleet.sh
#
# Setup (untimed):
#   - IMAGE: by default a generated tree (bench/gen-image.py: 3,100 files, about 31 MiB, small
#     text files, medium text and random files, symlinks, a hard link); or any tree (IMAGE=DIR,
#     e.g. a debootstrap root).
#   - The master runs in a network namespace of its own, joined to this one by a veth pair
#     (10.201.0.1 there, 10.201.0.2 here), so the bytes it sends are counted on their own: the
#     RX counter of the veth on this side is exactly the master's traffic to the hosts (and to
#     the S3 server, which is done before the hosts start). The hosts and the S3 server are in
#     this namespace; a host's GETs go to 10.201.0.2 over the loopback path, never the veth.
#   - `syncmaster serve --image IMAGE --listen 10.201.0.1:0 --insecure --state-dir ...`, plus in
#     mode `store` `--object-store s3://fleet/img` against `s3s-fs` on 10.201.0.2 (fresh data
#     dir per mode). The script waits until the master is quiet: `object cache ready` (and in
#     store mode the upload summary line).
#   - The hosts' roots are on a tmpfs (ROOTS_SIZE, default HOSTS x 1.5 x the image + 512 MiB),
#     emptied before each round; each host has its own empty state dir (a cold host).
# Each round reads the master's and the S3 server's utime+stime (/proc/PID/stat) and the veth
# counters, starts HOSTS `syncd sync --insecure -q` processes at once (host ids h001..), waits
# for all, and reads them again. Wall time is from the first start to the last exit. A host
# fails when it exits non-zero. Then SAMPLE hosts chosen at random (SAMPLE=all: every host) are
# checked with `rsync -aHAXcn --numeric-ids --delete IMAGE/ ROOT/` (must print nothing).
# The master's CPU before the first round (scan, upload, object cache) is reported apart.
# The master's peak RSS is its VmHWM after the round (one master per mode, so it covers the
# scan, the cache or upload, and every round so far).
#
# Prints a table per mode, medians over the rounds, the ratio of the master's CPU per host with
# the store to without, and appends a dated section to RESULTS (default: a new file per run,
# bench/results/<UTC stamp>-fleet.md).
# Exits 1 if a host failed or a checked root differs, 2 on bad setup.
#
# Needs root (netns, tmpfs), iproute2, rsync, python3, a release build (cargo build --release
# --bins), and for mode `store` s3s-fs (`cargo install s3s-fs --version 0.14.1 --features
# binary --locked`). Memory: the tmpfs (200 x 31 MiB x 1.5 = about 9.5 GiB at most, about
# 6 GiB used) plus about 30 MiB per syncd.
#
# Env:
#   HOSTS=200   ROUNDS=3   MODES="master store"   SAMPLE=20
#   IMAGE=          a tree to serve instead of the generated one
#   SCRATCH=/var/tmp/gis-fleet   removed at the start and at the end (unless KEEP=1)
#   SYNCD, SYNCMASTER   binaries (default: release builds in $CARGO_TARGET_DIR or target/)
#   S3S_FS          the s3s-fs binary (default: on PATH, else ~/.cargo/bin/s3s-fs)
#   TIMEOUT=900     seconds for one round
#   RESULTS=bench/results/<UTC stamp>-fleet.md   (by default a new file per run)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$here/.." && pwd)
HOSTS=${HOSTS:-200}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-master store}
SAMPLE=${SAMPLE:-20}
IMAGE=${IMAGE:-}
SCRATCH=${SCRATCH:-/var/tmp/gis-fleet}
KEEP=${KEEP:-0}
TIMEOUT=${TIMEOUT:-900}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
target_dir=${CARGO_TARGET_DIR:-$REPO/target}
SYNCD=${SYNCD:-$target_dir/release/syncd}
SYNCMASTER=${SYNCMASTER:-$target_dir/release/syncmaster}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
NS=gisfleet$$
VETH=gisf$$
MASTER_IP=10.201.0.1
HERE_IP=10.201.0.2

die() { echo "fleet.sh: $*" >&2; exit 2; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $HOSTS =~ ^[1-9][0-9]*$ ]] || die "HOSTS must be a positive integer"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $SAMPLE =~ ^([0-9]+|all)$ ]] || die "SAMPLE must be a number or all"
[ "$(id -u)" -eq 0 ] || die "must run as root (a network namespace and a tmpfs)"
[ -x "$SYNCD" ] || die "syncd not found at $SYNCD (cargo build --release --bins, or set SYNCD)"
[ -x "$SYNCMASTER" ] || die "syncmaster not found at $SYNCMASTER (or set SYNCMASTER)"
for c in ip rsync python3 getconf shuf; do command -v $c >/dev/null || die "$c missing"; done
for m in $MODES; do
    case $m in
        master) ;;
        store) [ -x "$S3S_FS" ] || die "s3s-fs not found (cargo install s3s-fs --version 0.14.1 --features binary --locked, or set S3S_FS)" ;;
        *) die "unknown mode $m (master or store)" ;;
    esac
done
[ -z "$IMAGE" ] || [ -d "$IMAGE" ] || die "IMAGE=$IMAGE is not a directory"
HZ=$(getconf CLK_TCK)
ulimit -n 65536 2>/dev/null || ulimit -n 8192 || true

MASTER_PID="" S3_PID=""
cleanup() {
    [ -z "$MASTER_PID" ] || kill "$MASTER_PID" 2>/dev/null
    [ -z "$S3_PID" ] || kill "$S3_PID" 2>/dev/null
    wait 2>/dev/null
    mountpoint -q "$SCRATCH/roots" && umount "$SCRATCH/roots"
    ip link del "$VETH" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    if [ "$KEEP" = 1 ]; then log "kept $SCRATCH"; else rm -rf --one-file-system "$SCRATCH"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf --one-file-system "$SCRATCH"
mkdir -p "$SCRATCH/logs" "$SCRATCH/roots" || die "cannot create $SCRATCH"
LOGS=$SCRATCH/logs
if [ -z "$IMAGE" ]; then
    IMAGE=$SCRATCH/image
    image_desc="generated: bench/gen-image.py, $(python3 "$here/gen-image.py" "$IMAGE")" || die "cannot generate the image"
else
    image_desc=$(basename "$IMAGE")   # its name only: reports hold no absolute paths
fi
image_bytes=$(du -sb --apparent-size "$IMAGE" | cut -f1)
content_bytes=$(find "$IMAGE" -type f -links 1 -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
content_bytes=$((content_bytes + $(find "$IMAGE" -type f -links +1 -printf '%i %s\n' | sort -u | awk '{ s += $2 } END { print s + 0 }')))
image_files=$(find "$IMAGE" -type f | wc -l)
log "image: $image_desc; $image_files files, $content_bytes bytes of content"

roots_size=${ROOTS_SIZE:-$(( HOSTS * image_bytes * 3 / 2 + (512 << 20) ))}
mount -t tmpfs -o "size=$roots_size,mode=0755" gis-fleet "$SCRATCH/roots" || die "cannot mount a tmpfs on $SCRATCH/roots"

ip netns add "$NS" || die "cannot create network namespace $NS"
ip link add "$VETH" type veth peer name "${VETH}p" netns "$NS" || die "cannot create veth $VETH"
ip addr add "$HERE_IP/24" dev "$VETH" && ip link set "$VETH" up || die "cannot configure $VETH"
ip netns exec "$NS" sh -c "ip addr add $MASTER_IP/24 dev ${VETH}p && ip link set ${VETH}p up && ip link set lo up" ||
    die "cannot configure the namespace"
veth() { cat "/sys/class/net/$VETH/statistics/$1"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("'"$HERE_IP"'", 0)); print(s.getsockname()[1])'; }
secs() { awk -v t="$1" -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }'; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# wait_log FILE PATTERN SECS PID: until FILE has a line matching PATTERN
wait_log() {
    local i
    for i in $(seq $(($3 * 10))); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

ROWS=$SCRATCH/rows.tsv
: >"$ROWS"
failed_any=0
for mode in $MODES; do
    env_vars=()
    store_flags=()
    if [ "$mode" = store ]; then
        port=$(free_port)
        mkdir -p "$SCRATCH/s3/fleet"
        "$S3S_FS" --host "$HERE_IP" --port "$port" --access-key fleet-access --secret-key fleet-secret \
            "$SCRATCH/s3" >"$LOGS/s3.log" 2>&1 &
        S3_PID=$!
        for _ in $(seq 200); do (exec 3<>"/dev/tcp/$HERE_IP/$port") 2>/dev/null && break; sleep 0.1; done
        env_vars=(AWS_ENDPOINT_URL="http://$HERE_IP:$port" AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=fleet-access
            AWS_SECRET_ACCESS_KEY=fleet-secret AWS_ALLOW_HTTP=true)
        store_flags=(--object-store s3://fleet/img)
    fi
    ip netns exec "$NS" env "${env_vars[@]}" "$SYNCMASTER" serve --image "$IMAGE" --listen "$MASTER_IP:0" --insecure \
        --state-dir "$SCRATCH/master-$mode" "${store_flags[@]}" >"$LOGS/master-$mode.out" 2>"$LOGS/master-$mode.log" &
    MASTER_PID=$!
    wait_log "$LOGS/master-$mode.out" '^listening on ' 600 "$MASTER_PID" ||
        { tail -20 "$LOGS/master-$mode.log" >&2; die "syncmaster ($mode) did not start"; }
    addr=$(sed -n 's/^listening on //p' "$LOGS/master-$mode.out")
    URL=http://$addr
    if [ "$mode" = store ]; then
        wait_log "$LOGS/master-$mode.log" 'object store: version 1 uploaded' 600 "$MASTER_PID" ||
            { tail -20 "$LOGS/master-$mode.log" >&2; die "the master did not upload version 1"; }
    fi
    wait_log "$LOGS/master-$mode.log" 'object cache ready' 900 "$MASTER_PID" ||
        { tail -20 "$LOGS/master-$mode.log" >&2; die "the master's object cache never became ready"; }
    setup_cpu=$(secs "$(cpu_ticks "$MASTER_PID")")
    echo "$mode $setup_cpu" >>"$SCRATCH/setup.txt"
    log "mode $mode: master (pid $MASTER_PID) on $addr, ready after ${setup_cpu}s of CPU (scan, upload, object cache)"

    for round in $(seq "$ROUNDS"); do
        find "$SCRATCH/roots" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system {} +
        rm -rf "$SCRATCH/state"
        for i in $(seq -f '%03g' "$HOSTS"); do mkdir -p "$SCRATCH/roots/h$i" "$SCRATCH/state/h$i"; done
        sync
        m0=$(cpu_ticks "$MASTER_PID") s0=0
        [ -z "$S3_PID" ] || s0=$(cpu_ticks "$S3_PID")
        rx0=$(veth rx_bytes) tx0=$(veth tx_bytes)
        t0=$(date +%s%3N)
        pids=()
        for i in $(seq -f '%03g' "$HOSTS"); do
            env "${env_vars[@]}" timeout "$TIMEOUT" "$SYNCD" sync --insecure -q --master "$URL" --host-id "h$i" \
                --root "$SCRATCH/roots/h$i" --state-dir "$SCRATCH/state/h$i" \
                >"$LOGS/h$i.out" 2>"$LOGS/h$i.log" &
            pids+=($!)
        done
        fails=0 failed_hosts=()
        for k in "${!pids[@]}"; do
            if ! wait "${pids[$k]}"; then
                fails=$((fails + 1))
                failed_hosts+=("h$(printf %03d $((k + 1)))")
            fi
        done
        t1=$(date +%s%3N)
        m1=$(cpu_ticks "$MASTER_PID") s1=0
        [ -z "$S3_PID" ] || s1=$(cpu_ticks "$S3_PID")
        rx1=$(veth rx_bytes) tx1=$(veth tx_bytes)
        hwm=$(hwm_kib "$MASTER_PID")
        # Objects from the store and from the master, summed over the hosts' summary lines.
        read -r from_store from_master < <(cat "$LOGS"/h*.out "$LOGS"/h*.log 2>/dev/null | python3 -c '
import re, sys
st = ma = 0
for line in sys.stdin:
    m = re.search(r"fetched (\d+) objects", line)
    if not m:
        continue
    n = int(m.group(1))
    s = re.search(r": (\d+) from the object store(?: \([^)]*\))?, (\d+) from the master", line)
    if s:
        st += int(s.group(1)); ma += int(s.group(2))
    else:
        ma += n
print(st, ma)')
        # Check a sample of roots against the image.
        if [ "$SAMPLE" = all ]; then check=$(seq -f '%03g' "$HOSTS"); else check=$(seq -f '%03g' "$HOSTS" | shuf -n "$SAMPLE"); fi
        checked=0 differ=0
        for i in $check; do
            checked=$((checked + 1))
            out=$(rsync -aHAXcn --numeric-ids --delete -i "$IMAGE/" "$SCRATCH/roots/h$i/" 2>&1)
            if [ -n "$out" ]; then
                differ=$((differ + 1))
                echo "h$i differs from the image:" >&2
                echo "$out" | head -5 >&2
            fi
        done
        [ "$fails" -eq 0 ] && [ "$differ" -eq 0 ] || failed_any=1
        for h in "${failed_hosts[@]:0:3}"; do echo "$h failed: $(tail -3 "$LOGS/$h.log" | tr '\n' ' ')" >&2; done
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
        mcpu=$(secs $((m1 - m0))) scpu=$(secs $((s1 - s0)))
        sent=$((rx1 - rx0)) got=$((tx1 - tx0))
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$round" "$wall" "$fails" "$mcpu" \
            "$((hwm / 1024))" "$scpu" "$sent" "$got" "$from_store" "$from_master" "$checked" "$differ" >>"$ROWS"
        log "mode $mode round $round: wall ${wall}s, failures $fails, master CPU ${mcpu}s, master peak RSS $((hwm / 1024)) MiB, S3 CPU ${scpu}s, master sent $sent B, objects from store/master $from_store/$from_master, roots checked $checked, differing $differ"
    done
    kill "$MASTER_PID" 2>/dev/null
    wait "$MASTER_PID" 2>/dev/null
    MASTER_PID=""
    if [ -n "$S3_PID" ]; then kill "$S3_PID" 2>/dev/null; wait "$S3_PID" 2>/dev/null; S3_PID=""; fi
done

report() {
    local total=$((HOSTS * content_bytes))
    echo "### fleet.sh, $(date -u +%Y-%m-%d) ($HOSTS hosts, $ROUNDS round(s) per mode)"
    echo
    echo "- machine: $(nproc) cores, $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(sed -n 's/^model name\t: //p' /proc/cpuinfo | head -1); load before: $load_start"
    echo "- image: $image_desc; $image_files files, $content_bytes bytes of content; $HOSTS cold hosts (empty roots on tmpfs, empty state dirs) per round, all started at once"
    echo "- master: \`syncmaster serve --image\`, default cache level, in its own network namespace; mode store adds \`--object-store s3://fleet/img\` (s3s-fs $("$S3S_FS" --version 2>/dev/null | awk '{ print $2 }'))"
    echo "- master sent: bytes received on this side of the master's veth during the round (IP/TCP included); content = hosts x content bytes = $total B"
    echo "- checked: roots compared with rsync -aHAXcn --delete (a random sample when fewer than the hosts)"
    echo
    echo "| mode | round | wall s | failures | master CPU s | master CPU ms/host | master peak RSS MiB | S3 CPU s | master sent MiB | sent/content | objects store/master | checked | differ |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' -v hosts="$HOSTS" -v total="$total" '{
        printf "| %s | %s | %s | %s | %s | %.1f | %s | %s | %.1f | %.2f %% | %s/%s | %s | %s |\n", $1, $2, $3, $4, $5, $5 * 1000 / hosts, $6, $7, $8 / 1048576, $8 * 100 / total, $10, $11, $12, $13
    }' "$ROWS"
    echo
    for mode in $MODES; do
        local w c r s b
        w=$(awk -F'\t' -v m="$mode" '$1 == m { print $3 }' "$ROWS" | median)
        c=$(awk -F'\t' -v m="$mode" '$1 == m { print $5 }' "$ROWS" | median)
        r=$(awk -F'\t' -v m="$mode" '$1 == m { print $6 }' "$ROWS" | sort -g | tail -1)
        s=$(awk -F'\t' -v m="$mode" '$1 == m { print $7 }' "$ROWS" | median)
        b=$(awk -F'\t' -v m="$mode" '$1 == m { print $8 }' "$ROWS" | median)
        echo "- median, mode $mode: wall ${w} s, master CPU ${c} s ($(awk -v c="$c" -v h="$HOSTS" 'BEGIN { printf "%.1f", c * 1000 / h }') ms/host), master peak RSS ${r} MiB, S3 CPU ${s} s, master sent $(awk -v b="$b" -v t="$total" 'BEGIN { printf "%.1f MiB (%.2f %% of the content)", b / 1048576, b * 100 / t }')"
    done
    while read -r m c; do
        echo "- master CPU before the first host, mode $m: $c s (scan$([ "$m" = store ] && echo ", upload"), object cache at level 19)"
    done <"$SCRATCH/setup.txt"
    local cm cs
    cm=$(awk -F'\t' '$1 == "master" { print $5 }' "$ROWS" | median)
    cs=$(awk -F'\t' '$1 == "store" { print $5 }' "$ROWS" | median)
    if [ "$cm" != n/a ] && [ "$cs" != n/a ]; then
        echo "- master CPU with the store / without (medians): $(awk -v a="$cs" -v b="$cm" 'BEGIN { if (b > 0) printf "%.4f (1/%.0f)", a / b, (a > 0 ? b / a : 0); else print "n/a" }') (target: at most 1/50)"
    fi
    echo
}
# shellcheck source=bench/lib.sh
[ -n "$RESULTS" ] || { source "$here/lib.sh"; RESULTS=$(new_results "$here" fleet); }
report | tee -a "$RESULTS"
[ "$failed_any" = 0 ] || { echo "fleet.sh: FAIL: a host failed or a root differs (see above)" >&2; exit 1; }
