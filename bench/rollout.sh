#!/usr/bin/env bash
# rollout.sh: the cost of a fleet rollout on real Debian roots: the master's RSS and CPU over a
# HOSTS-host rollout (default 12), and the time from publish to the last host succeeding.
#
# Usage: [HOSTS=12] [ROUNDS=3] [CANARY_SOAK=10s] [SOAK=5s] bench/rollout.sh
#
# Setup (untimed): under SCRATCH, IMAGES/v1 = a copy of bookworm-minbase, IMAGES/v2 = a copy of
# trixie-minbase, IMAGES/current -> v1. One
#   syncmaster serve --images IMAGES --hosts hosts.toml --state-dir STATE --listen 127.0.0.1:0
#                    --insecure --poll 200ms
# and HOSTS `syncd run --insecure --config hostNN/syncd.toml` daemons, each with its own (empty)
# root, state dir and host id, announce_jitter 0s, reconcile_interval 5m (reconciles add no
# noise), max_backoff 1s, and one [[health]] check, `/usr/bin/test -x ROOT/bin/sh` (argv, no
# shell), so health gating is part of the measurement. The policy (printed in the report): one
# canary host (soak CANARY_SOAK), then 25 % of the rest, max_concurrent 3, soak SOAK, then the
# rest, max_concurrent 3; timeout 10m, max_failures 1. The script waits until every host
# converged to v1 (`syncmaster status --format json`) and the master logged `object cache ready`
# for v1.
#
# Then ROUNDS rounds. Round 1 flips current -> v2 (bookworm -> trixie); round 2 flips it back to
# v1, which the master publishes as a new version (a new rollout of the bookworm tree: a
# trixie -> bookworm downgrade as a new version number); round 3 trixie again, and so on. Each
# round:
#   - waits until the master is quiet (the object cache of the current version is ready);
#   - reads the master's utime+stime (/proc/PID/stat, ticks / CLK_TCK), its VmHWM, and the
#     syncd daemons' utime+stime+cutime+cstime; flips `current` (wall-clock ms noted: publish);
#   - polls `syncmaster rollout status --format json` until the new version's rollout is
#     `completed` (FAIL with diagnostics on halted/aborted/superseded or after ROLLOUT_TIMEOUT);
#   - reads CPU and memory again (master VmHWM and VmRSS), then the event log
#     (`syncmaster rollout log --format json`) and computes: publish -> the master's publish
#     event, -> first grant, -> last `succeeded`, -> `completed`; the most hosts in progress at
#     once (grant +1, converged/failed -1); per wave its pass time (wave started -> every host
#     converged) and soak time (-> wave done);
#   - waits for the new version's object cache (`object cache ready` in the master's log) and
#     reads the master's CPU once more: the publish's full cost, cache included;
#   - checks every host root against the published tree with
#     `rsync -aHAXcn --numeric-ids --delete -i TREE/ ROOT/` (must print nothing).
# Prints a summary (each round, medians over all rounds and per direction) and appends a dated
# section to RESULTS. Exits 1 if a rollout did not complete or a root differs; 2 on bad setup.
#
# Needs root (the trees hold root-owned files, device nodes, setuid binaries), the corpora
# (bench/corpora.sh bookworm-minbase trixie-minbase), a release build (cargo build --release
# --bins), rsync and python3. Disk: the two images plus HOSTS roots of ~210 MB each (12 hosts:
# about 3.2 GB).
#
# Env:
#   HOSTS=12               syncd daemons (at least 3)
#   ROUNDS=3               publishes measured (alternating trixie, bookworm, trixie, ...)
#   CANARY_SOAK=10s        soak of the canary wave
#   SOAK=5s                soak of the 25 % wave (the last wave has none)
#   CACHE_LEVEL=           passed as --cache-level when set (0: no object cache); unset: the
#                          master's default (19)
#   CORPORA=/var/tmp/gis-corpora
#   SCRATCH=/var/tmp/gis-rollout   removed at the start and at the end (unless KEEP=1)
#   KEEP=0                 1: keep SCRATCH (roots, logs, state) after the run
#   SYNCD, SYNCMASTER      binaries (default: release builds of this checkout, in
#                          $CARGO_TARGET_DIR/release if that is set, else target/release)
#   CONVERGE_TIMEOUT=900   seconds for the fleet's first convergence (12 cold syncs)
#   ROLLOUT_TIMEOUT=900    seconds for one rollout to complete
#   CACHE_TIMEOUT=900      seconds to wait for an `object cache ready` line
#   RESULTS=bench/results/<UTC stamp>-rollout.md   markdown file the dated section is
#                          appended to (by default a new file per run)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
REPO=$(cd "$here/.." && pwd)
HOSTS=${HOSTS:-12}
ROUNDS=${ROUNDS:-3}
CANARY_SOAK=${CANARY_SOAK:-10s}
SOAK=${SOAK:-5s}
CACHE_LEVEL=${CACHE_LEVEL:-}
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
SCRATCH=${SCRATCH:-/var/tmp/gis-rollout}
KEEP=${KEEP:-0}
target_dir=${CARGO_TARGET_DIR:-$REPO/target}
SYNCD=${SYNCD:-$target_dir/release/syncd}
SYNCMASTER=${SYNCMASTER:-$target_dir/release/syncmaster}
CONVERGE_TIMEOUT=${CONVERGE_TIMEOUT:-900}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-900}
CACHE_TIMEOUT=${CACHE_TIMEOUT:-900}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
OLD=$CORPORA/bookworm-minbase
NEW=$CORPORA/trixie-minbase
# Paths as the report shows them: relative to the checkout where they lie in it, else the file
# name only (reports hold no absolute paths of this machine).
shown() {
    case $1 in
        "$REPO"/*) echo "${1#"$REPO"/}" ;;
        "$target_dir"/*) echo "\$CARGO_TARGET_DIR/${1#"$target_dir"/}" ;;
        *) echo "${1##*/}" ;;
    esac
}
outside() { local p; for p; do [[ $p == "$REPO"/* || $p == "$target_dir"/* ]] || return 0; done; return 1; }

die() { echo "rollout.sh: $*" >&2; exit 2; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $HOSTS =~ ^[0-9]+$ ]] && [ "$HOSTS" -ge 3 ] || die "HOSTS must be an integer >= 3"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[ "$(id -u)" -eq 0 ] || die "must run as root (the trees hold root-owned files, devices, setuid binaries)"
for d in "$OLD" "$NEW"; do [ -d "$d" ] || die "missing corpus $d (run bench/corpora.sh bookworm-minbase trixie-minbase)"; done
[ -x "$SYNCD" ] || die "syncd not found at $SYNCD (cargo build --release --bins, or set SYNCD)"
[ -x "$SYNCMASTER" ] || die "syncmaster not found at $SYNCMASTER (or set SYNCMASTER)"
for c in rsync python3 getconf; do command -v $c >/dev/null || die "$c missing"; done
HZ=$(getconf CLK_TCK)

IMAGES=$SCRATCH/images
LOGS=$SCRATCH/logs
MASTER_PID=""
SYNCD_PIDS=()
cleanup() {
    for p in "${SYNCD_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    [ -z "$MASTER_PID" ] || kill "$MASTER_PID" 2>/dev/null
    for p in "${SYNCD_PIDS[@]}" $MASTER_PID; do wait "$p" 2>/dev/null; done
    if [ "$KEEP" = 1 ]; then log "kept $SCRATCH"; else rm -rf --one-file-system "$SCRATCH"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf --one-file-system "$SCRATCH"
mkdir -p "$IMAGES" "$LOGS" || die "cannot create $SCRATCH"
log "copying the images (v1 = bookworm-minbase, v2 = trixie-minbase)"
cp -a "$OLD" "$IMAGES/v1" && cp -a "$NEW" "$IMAGES/v2" || die "cannot copy the corpora"
ln -s v1 "$IMAGES/current"
publish() { ln -sfn "$1" "$IMAGES/current.new" && mv -T "$IMAGES/current.new" "$IMAGES/current"; }

hostname_of() { printf 'host%02d' "$1"; }
POLICY=$(cat <<EOF
[rollout]
timeout = "10m"
max_failures = 1

[[rollout.wave]]
name = "canary"
hosts = ["$(hostname_of 1)"]
soak = "$CANARY_SOAK"

[[rollout.wave]]
name = "early"
percent = 25
max_concurrent = 3
soak = "$SOAK"

[[rollout.wave]]
name = "rest"
percent = 100
max_concurrent = 3
EOF
)
{
    for i in $(seq "$HOSTS"); do echo "[hosts.$(hostname_of "$i")]"; done
    echo
    echo "$POLICY"
} >"$SCRATCH/hosts.toml"

MASTER_FLAGS=(--listen 127.0.0.1:0 --insecure --poll 200ms)
[ -z "$CACHE_LEVEL" ] || MASTER_FLAGS+=(--cache-level "$CACHE_LEVEL")
"$SYNCMASTER" serve --images "$IMAGES" --hosts "$SCRATCH/hosts.toml" --state-dir "$SCRATCH/master-state" \
    "${MASTER_FLAGS[@]}" >"$LOGS/master.out" 2>"$LOGS/master.log" &
MASTER_PID=$!
t_start=$(date +%s%3N)
for _ in $(seq 600); do grep -q '^listening on ' "$LOGS/master.out" 2>/dev/null && break; kill -0 "$MASTER_PID" 2>/dev/null || break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$LOGS/master.out")
[ -n "$addr" ] || { tail -20 "$LOGS/master.log" >&2; die "syncmaster did not start"; }
URL=http://$addr
log "syncmaster (pid $MASTER_PID) listening on $addr after $(( $(date +%s%3N) - t_start )) ms"

for i in $(seq "$HOSTS"); do
    h=$(hostname_of "$i") d=$SCRATCH/$(hostname_of "$i")
    mkdir -p "$d/root"
    cat >"$d/syncd.toml" <<EOF
master = "$URL"
root = "$d/root"
host_id = "$h"
state_dir = "$d/state"
announce_jitter = "0s"
reconcile_interval = "5m"
reconcile_jitter = "0s"
max_backoff = "1s"

[[health]]
name = "sh"
run = ["/usr/bin/test", "-x", "$d/root/bin/sh"]
timeout = "30s"
EOF
    "$SYNCD" run --insecure --config "$d/syncd.toml" 2>"$LOGS/$h.log" &
    SYNCD_PIDS+=($!)
done
log "$HOSTS syncd daemons started; waiting for the fleet to converge to v1 (cold syncs)"

sm() { "$SYNCMASTER" "$@" --master "$URL" --insecure; }
# fleet_at VERSION: exit 0 when every one of HOSTS hosts is converged on VERSION
fleet_at() {
    sm status --format json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin); want, n = int(sys.argv[1]), int(sys.argv[2])
h = s.get("hosts", [])
ok = len(h) == n and all(x.get("converged") and x.get("current_version") == want for x in h)
sys.exit(0 if ok else 1)' "$1" "$HOSTS"
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; } # utime+stime
cpu_ticks_all() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat" 2>/dev/null || echo 0; } # + reaped children
syncd_ticks() { local t=0 p; for p in "${SYNCD_PIDS[@]}"; do t=$((t + $(cpu_ticks_all "$p"))); done; echo $t; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# cache_ready VERSION: the `secs` of the master's `object cache ready` line for VERSION, if any
cache_ready() {
    sed 's/\x1b\[[0-9;]*m//g' "$LOGS/master.log" | grep 'object cache ready' | grep -E "version=$1( |$)" |
        sed -n 's/.*secs=\([0-9.]*\).*/\1/p' | tail -n1 | awk 'NF { printf "%.1f\n", $1 }'
}
wait_cache() { # wait_cache VERSION: prints the fill's secs, or "none" (cache off) / "timeout"
    local s
    if [ "${CACHE_LEVEL:-19}" = 0 ]; then echo none; return; fi
    for _ in $(seq $((CACHE_TIMEOUT * 5))); do
        s=$(cache_ready "$1"); [ -z "$s" ] || { echo "$s"; return; }
        sleep 0.2
    done
    echo timeout
}
assert_alive() {
    kill -0 "$MASTER_PID" 2>/dev/null || { tail -30 "$LOGS/master.log" >&2; echo "FAIL: syncmaster died" >&2; exit 1; }
}

t0=$(date +%s%3N)
ok=0
for _ in $(seq $((CONVERGE_TIMEOUT * 2))); do
    fleet_at 1 && { ok=1; break; }
    assert_alive
    sleep 0.5
done
if [ $ok != 1 ]; then sm status >&2; tail -20 "$LOGS/master.log" >&2; echo "FAIL: the fleet did not converge to v1 within ${CONVERGE_TIMEOUT}s" >&2; exit 1; fi
setup_converge_s=$(python3 -c "print(f'{($(date +%s%3N) - $t0) / 1000:.1f}')")
log "fleet converged to v1 in ${setup_converge_s}s; waiting for v1's object cache"
setup_cache=$(wait_cache 1)
setup_hwm=$(status_kib "$MASTER_PID" VmHWM) setup_rss=$(status_kib "$MASTER_PID" VmRSS)
setup_cpu_ticks=$(cpu_ticks "$MASTER_PID")
log "v1 object cache: ${setup_cache}s; master VmHWM $setup_hwm KiB, VmRSS $setup_rss KiB, CPU $setup_cpu_ticks ticks so far"

ROUNDS_FILE=$SCRATCH/rounds.jsonl
: >"$ROUNDS_FILE"
failed=0
version=1
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then tree=v2 dir="bookworm -> trixie (upgrade)"; else tree=v1 dir="trixie -> bookworm (downgrade as a new version)"; fi
    prev=$version
    last_id=$(sm rollout log --format json 2>/dev/null | tail -n1 | python3 -c 'import json,sys; l=sys.stdin.read().strip(); print(json.loads(l)["id"] if l else 0)')
    assert_alive
    m_before=$(cpu_ticks "$MASTER_PID") s_before=$(syncd_ticks)
    hwm_before=$(status_kib "$MASTER_PID" VmHWM) rss_before=$(status_kib "$MASTER_PID" VmRSS)
    log "round $r: publishing $tree ($dir)"
    t_pub=$(date +%s%3N)
    publish "$tree"
    state="" rid=""
    deadline=$(( $(date +%s) + ROLLOUT_TIMEOUT ))
    while :; do
        js=$(sm rollout status --format json 2>/dev/null)
        read -r v rid state <<<"$(python3 -c '
import json, sys
try:
    r = json.loads(sys.stdin.read()).get("rollout") or {}
    print(r.get("version", 0), r.get("id", 0), r.get("state", "-"))
except Exception:
    print(0, 0, "-")' <<<"$js")"
        if [ "${v:-0}" -gt "$prev" ]; then
            case $state in
                completed) break ;;
                halted|aborted|superseded) break ;;
            esac
        fi
        [ "$(date +%s)" -lt "$deadline" ] || { state=timeout; break; }
        assert_alive
        sleep 0.2
    done
    t_seen=$(date +%s%3N)
    m_after=$(cpu_ticks "$MASTER_PID") s_after=$(syncd_ticks)
    hwm_after=$(status_kib "$MASTER_PID" VmHWM) rss_after=$(status_kib "$MASTER_PID" VmRSS)
    if [ "$state" != completed ]; then
        echo "FAIL: round $r: the rollout of $tree is $state (rollout #$rid, v$v)" >&2
        sm rollout status >&2; sm status >&2
        sm rollout log --after "$last_id" >&2
        tail -30 "$LOGS/master.log" >&2
        exit 1
    fi
    version=$v
    log "round $r: rollout #$rid of v$version completed, seen after $(( t_seen - t_pub )) ms; waiting for v$version's object cache"
    cache_s=$(wait_cache "$version")
    m_cache=$(cpu_ticks "$MASTER_PID") hwm_cache=$(status_kib "$MASTER_PID" VmHWM)
    sm rollout log --after "$last_id" --format json >"$LOGS/events-$r.jsonl" 2>"$LOGS/events-$r.err"
    # every host's root against the published tree
    checked=0 bad=0
    for i in $(seq "$HOSTS"); do
        h=$(hostname_of "$i")
        out=$(rsync -aHAXcn --numeric-ids --delete -i "$IMAGES/$tree/" "$SCRATCH/$h/root/" 2>&1)
        checked=$((checked + 1))
        if [ -n "$out" ]; then
            bad=$((bad + 1)); echo "FAIL: round $r: $h differs from $tree:" >&2; echo "$out" | head -20 >&2
        fi
    done
    [ $bad = 0 ] || failed=1
    log "round $r: $checked host roots checked against $tree, $bad differ"
    python3 - "$LOGS/events-$r.jsonl" >>"$ROUNDS_FILE" <<PY
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rid, ver, t_pub, HZ = $rid, $version, $t_pub, $HZ
mine = [e for e in ev if e.get("rollout") == rid]
def first(kind, pred=lambda e: True):
    xs = [e["at_unix_ms"] for e in ev if e["kind"] == kind and pred(e)]
    return min(xs) if xs else None
def last(kind):
    xs = [e["at_unix_ms"] for e in mine if e["kind"] == kind]
    return max(xs) if xs else None
pub_ev = first("publish", lambda e: e.get("version") == ver)
cur = peak = 0
for e in mine:
    if e["kind"] == "grant": cur += 1
    elif e["kind"] in ("converged", "failed"): cur -= 1
    peak = max(peak, cur)
waves = {}
for e in mine:
    w = e.get("wave")
    if w is None or w < 0: continue
    d = waves.setdefault(w, {"name": "", "hosts": 0})
    k, t = e["kind"], e["at_unix_ms"]
    if k == "wave-started": d["start"] = t; d["name"] = e["detail"]
    elif k == "grant":
        d["hosts"] += 1; d.setdefault("first_grant", t)
    elif k == "converged": d["last_converged"] = t
    elif k == "wave-soaking": d["soaking"] = t
    elif k == "wave-done": d["done"] = t; d["name"] = d["name"] or e["detail"]
started = first("rollout-started", lambda e: e.get("rollout") == rid)
if 0 in waves and "start" not in waves[0]: waves[0]["start"] = started
wl = []
for w in sorted(waves):
    d = waves[w]
    s = d.get("start") or d.get("first_grant")
    wl.append({"wave": w, "name": d["name"], "hosts": d["hosts"],
               "pass_ms": (d["soaking"] - s) if s and d.get("soaking") else None,
               "soak_ms": (d["done"] - d["soaking"]) if d.get("soaking") and d.get("done") else None,
               "total_ms": (d["done"] - s) if s and d.get("done") else None})
rel = lambda t: (t - t_pub) if t is not None else None
print(json.dumps({
    "round": $r, "direction": "$dir", "tree": "$tree", "from": $prev, "version": ver, "rollout": rid,
    "publish_event_ms": rel(pub_ev), "first_grant_ms": rel(first("grant", lambda e: e.get("rollout") == rid)),
    "last_succeeded_ms": rel(last("succeeded")), "completed_ms": rel(last("completed")),
    "seen_completed_ms": $t_seen - t_pub, "peak_in_progress": peak,
    "grants": sum(1 for e in mine if e["kind"] == "grant"), "failures": sum(1 for e in mine if e["kind"] == "failed"),
    "waves": wl,
    "master_cpu_s": ($m_after - $m_before) / HZ, "master_cpu_cache_s": ($m_cache - $m_before) / HZ,
    "syncd_cpu_s": ($s_after - $s_before) / HZ,
    "hwm_before_kib": $hwm_before, "rss_before_kib": $rss_before, "hwm_after_kib": $hwm_after,
    "rss_after_kib": $rss_after, "hwm_cache_kib": $hwm_cache, "cache_s": "$cache_s",
    "checked": $checked, "differ": $bad}))
f = lambda ms: "-" if ms is None else f"{ms / 1000:.1f}s"
print(f"round $r ($dir): v$prev -> v{ver}: first grant {f(rel(first('grant', lambda e: e.get('rollout') == rid)))}, "
      f"last succeeded {f(rel(last('succeeded')))}, completed {f(rel(last('completed')))}; peak in progress {peak}; "
      f"master CPU {($m_after - $m_before) / HZ:.2f}s ({($m_cache - $m_before) / HZ:.2f}s to cache ready), "
      f"VmHWM {$hwm_before // 1024} -> {$hwm_after // 1024} MiB; syncd CPU {($s_after - $s_before) / HZ:.2f}s", file=sys.stderr)
PY
done
final_hwm=$(status_kib "$MASTER_PID" VmHWM) final_rss=$(status_kib "$MASTER_PID" VmRSS) final_cpu=$(cpu_ticks "$MASTER_PID")

# ---- report ----
fstype=$(scratch_fs "$SCRATCH")
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- . ':!bench/results/' 2>/dev/null || rev+=" (dirty tree)"
entries_old=$(find "$IMAGES/v1" | wc -l) entries_new=$(find "$IMAGES/v2" | wc -l)
size_old=$(du -sh "$IMAGES/v1" | cut -f1) size_new=$(du -sh "$IMAGES/v2" | cut -f1)
HEADER=$(cat <<MD
## $(date -u '+%Y-%m-%d %H:%M:%S UTC') fleet rollout ($HOSTS hosts, $ROUNDS rounds, bench/rollout.sh)

- machine: $(nproc) cores, kernel $(uname -r), CPU: ${cpu_model:-unknown}, RAM $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo); scratch on $fstype; source rev: $rev; CLK_TCK $HZ; load average (1/5/15 min) at start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg) (anything else running competes with the master and the $HOSTS daemons for the cores)
- images: v1 = bookworm-minbase ($size_old, $entries_old entries), v2 = trixie-minbase ($size_new, $entries_new entries); rounds alternate v1 -> v2 (upgrade) and back to the bookworm tree, published under a new version number
- master: \`$(shown "$SYNCMASTER") serve --images IMAGES --hosts hosts.toml --state-dir STATE ${MASTER_FLAGS[*]}\` (object cache level ${CACHE_LEVEL:-19 (default)}); $HOSTS × \`$(shown "$SYNCD") run --insecure --config hostNN/syncd.toml\` on loopback, each with announce_jitter 0s, reconcile_interval 5m, max_backoff 1s and \`[[health]] run = ["/usr/bin/test", "-x", "ROOT/bin/sh"]\`$(! outside "$SYNCD" "$SYNCMASTER" || echo "; binaries outside this checkout are shown by their file name only")
- setup (untimed): $HOSTS cold syncs of v1 converged in ${setup_converge_s}s; v1's object cache ready after ${setup_cache}s; then master VmHWM $((setup_hwm / 1024)) MiB, VmRSS $((setup_rss / 1024)) MiB, CPU so far $(python3 -c "print(f'{$setup_cpu_ticks / $HZ:.1f}')") s
- measurement: publish = the script's wall clock (ms) just before the \`current\` flip; event times are the master's \`at_unix_ms\` (same clock) from \`syncmaster rollout log --format json\`; "completed seen" = when the script's 0.2 s poll of \`rollout status\` saw it. Master CPU = utime+stime of syncmaster from /proc/PID/stat (±1 tick), from just before the flip to "completed seen", and to its \`object cache ready\` line for the new version (the background pool at nice 10 that compresses the new version's objects and deltas; each round waits for it before the next publish). syncd CPU = the sum over the $HOSTS daemons of utime+stime+cutime+cstime (health checks included), flip to "completed seen". RSS = VmHWM (peak) and VmRSS of syncmaster from /proc/PID/status. Every host root is then checked with \`rsync -aHAXcn --numeric-ids --delete -i TREE/ ROOT/\` (must print nothing)
- policy (hosts.toml):

\`\`\`toml
$POLICY
\`\`\`
MD
)
BODY=$(python3 - "$ROUNDS_FILE" "$final_hwm" "$final_rss" "$final_cpu" "$HZ" <<'PY'
import json, statistics, sys
rounds = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
final_hwm, final_rss, final_cpu, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = lambda ms: "-" if ms is None else f"{ms / 1000:.1f}"
mib = lambda k: f"{k / 1024:.1f}"
out = []
out.append("| round | direction | versions | publish event s | first grant s | last succeeded s | completed s | completed seen s | peak in progress | grants / failures | master CPU s (to completed) | master CPU s (to cache ready) | object cache fill s | master VmHWM MiB before → after → after cache | master VmRSS MiB after | syncd CPU s (sum) | roots identical |")
out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
for d in rounds:
    out.append(f"| {d['round']} | {d['direction']} | v{d['from']} → v{d['version']} (rollout #{d['rollout']}) | {s(d['publish_event_ms'])} | {s(d['first_grant_ms'])} | {s(d['last_succeeded_ms'])} | {s(d['completed_ms'])} | {s(d['seen_completed_ms'])} | {d['peak_in_progress']} | {d['grants']} / {d['failures']} | {d['master_cpu_s']:.2f} | {d['master_cpu_cache_s']:.2f} | {d['cache_s']} | {mib(d['hwm_before_kib'])} → {mib(d['hwm_after_kib'])} → {mib(d['hwm_cache_kib'])} | {mib(d['rss_after_kib'])} | {d['syncd_cpu_s']:.2f} | {d['checked'] - d['differ']}/{d['checked']} |")
out.append("")
out.append("Per wave (s): pass = wave started → every host converged (grants, syncs, health checks); soak = → wave done")
out.append("")
out.append("| round | " + " | ".join(f"{w['name']} ({w['hosts']} host{'' if w['hosts'] == 1 else 's'}) pass / soak" for w in rounds[0]["waves"]) + " | all passes | all soaks |")
out.append("|---:|" + "---:|" * (len(rounds[0]["waves"]) + 2))
for d in rounds:
    passes = sum(w["pass_ms"] or 0 for w in d["waves"]); soaks = sum(w["soak_ms"] or 0 for w in d["waves"])
    d["_passes"], d["_soaks"] = passes, soaks
    out.append(f"| {d['round']} | " + " | ".join(f"{s(w['pass_ms'])} / {s(w['soak_ms'])}" for w in d["waves"]) + f" | {s(passes)} | {s(soaks)} |")
out.append("")
def med(key, rs):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(xs) if xs else None
groups = [("all rounds", rounds)]
for name in sorted({r["direction"] for r in rounds}):
    rs = [r for r in rounds if r["direction"] == name]
    if len(rs) < len(rounds): groups.append((name, rs))
out.append("Medians:")
out.append("")
out.append("| rounds | n | publish → first grant s | → last succeeded s | → completed s | passes s | soaks s | peak in progress | master CPU s (to completed) | master CPU s (to cache ready) | master VmHWM after MiB | syncd CPU s |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rs in groups:
    out.append(f"| {name} | {len(rs)} | {s(med('first_grant_ms', rs))} | {s(med('last_succeeded_ms', rs))} | {s(med('completed_ms', rs))} | {s(med('_passes', rs))} | {s(med('_soaks', rs))} | {med('peak_in_progress', rs)} | {med('master_cpu_s', rs):.2f} | {med('master_cpu_cache_s', rs):.2f} | {mib(med('hwm_after_kib', rs))} | {med('syncd_cpu_s', rs):.2f} |")
out.append("")
out.append(f"- master at the end: VmHWM {mib(final_hwm)} MiB, VmRSS {mib(final_rss)} MiB, CPU {final_cpu / hz:.1f} s since start (setup included)")
ok = all(d["differ"] == 0 for d in rounds)
out.append(f"- fidelity: {sum(d['checked'] for d in rounds)} host roots checked over {len(rounds)} rounds, {'all identical to the published tree' if ok else '**FAIL**: ' + str(sum(d['differ'] for d in rounds)) + ' differ'}")
print("\n".join(out))
PY
)
report="$HEADER

$BODY"
echo
echo "$report"
[ -n "$RESULTS" ] || RESULTS=$(new_results "$here" rollout)
printf '\n%s\n' "$report" >>"$RESULTS"
log "appended to $RESULTS"
[ "$failed" = 0 ] || { echo "FAIL: some host roots differ from the published tree (see above)" >&2; exit 1; }
