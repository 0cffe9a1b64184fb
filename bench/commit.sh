#!/usr/bin/env bash
# commit.sh: how long the switch takes. Times `syncd commit` alone (after `syncd prefetch` has
# fetched the upgrade into the local store), a whole `syncd sync` of the same upgrade, and
# `rsync -aHAX --numeric-ids --delete` doing it two ways: from an rsync daemon on loopback (as
# bench/sync-vs-rsync.sh runs it, the way a fleet would use rsync) and from a local copy of the
# new tree (no network at all), alternated in one run, and then `syncd rollback`. Reports
# medians and the ratios from the same run.
#
# Upgrade: bullseye-minbase → bookworm-minbase (bench/corpora.sh). Each timed run starts from a
# fresh `cp -a` of bullseye and a fresh state dir, on the same filesystem.
#
# Env: RUNS=5, CORPORA=/var/tmp/gis-corpora, SCRATCH=/var/tmp/gis-commit,
#      SYNCD / SYNCMASTER (default target/release/{syncd,syncmaster}),
#      SYNCD_B (a second syncd build, say the previous commit's: its commit is timed in the same
#      runs, alternating with SYNCD's which goes first, and the report adds its row and the
#      ratio; same master, same corpora),
#      RESULTS (a dated section is appended; default: a new file per run,
#      bench/results/<UTC stamp>-commit.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
SCRATCH=${SCRATCH:-/var/tmp/gis-commit}
SYNCD=${SYNCD:-target/release/syncd}
SYNCMASTER=${SYNCMASTER:-target/release/syncmaster}
SYNCD_B=${SYNCD_B:-}
RESULTS=${RESULTS:-}   # default: a new file under bench/results/, named when the report is written
OLD=$CORPORA/bullseye-minbase
NEW=$CORPORA/bookworm-minbase
for t in "$OLD" "$NEW" "$SYNCD" "$SYNCMASTER"; do
  [ -e "$t" ] || { echo "commit.sh: $t is missing (run bench/corpora.sh, cargo build --release)" >&2; exit 2; }
done
command -v rsync >/dev/null || { echo "commit.sh: rsync is not installed" >&2; exit 2; }
mkdir -p "$SCRATCH"
work=$(mktemp -d "$SCRATCH/run.XXXXXX")
cleanup() { for p in "$work"/*.pid; do [ -e "$p" ] && kill "$(cat "$p")" 2>/dev/null; done; rm -rf "$work"; }
trap cleanup EXIT

start_master() { # LOG ARGS... -> prints the URL
  local log=$1; shift
  "$SYNCMASTER" serve --insecure --listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  echo $! > "$log.pid"   # (this runs in a command substitution's subshell: no variable survives)
  for _ in $(seq 1 600); do
    url=$(grep -o 'listening on [^ ]*' "$log" | head -1 | awk '{print $3}') || true
    [ -n "$url" ] && { echo "http://$url"; return; }
    sleep 0.5
  done
  echo "commit.sh: the master did not start (see $log)" >&2; exit 1
}

# Master A serves the old release (the host's current version); master B has published the old
# release, then the new one (so it holds deltas of the new against the old, as a fleet master does).
mkdir -p "$work/images"
ln -s "$OLD" "$work/images/v1"
ln -s v1 "$work/images/current"
A=$(start_master "$work/a.log" --image "$OLD")
B=$(start_master "$work/b.log" --images "$work/images" --state-dir "$work/mstate" --poll 200ms)
ln -sfn "$NEW" "$work/images/v2"
ln -s v2 "$work/images/current.new" && mv -T "$work/images/current.new" "$work/images/current"
for _ in $(seq 1 1200); do
  "$SYNCMASTER" status --master "$B" --insecure --format json 2>/dev/null | grep -q '"image_version": 2' && break
  sleep 0.5
done
# A master compresses every object of a new version once, in the background, on every core:
# timing starts once both are done (the steady state), as in sync-vs-rsync.sh.
wait_cache() { # LOG PATTERN
  for _ in $(seq 1 3600); do grep 'object cache ready' "$1" | grep -q "$2" && return; sleep 0.5; done
  echo "commit.sh: no 'object cache ready' ($2) in $1" >&2; exit 1
}
wait_cache "$work/a.log" 'version=1 '
wait_cache "$work/b.log" 'version=2 '

# An rsync daemon serving the new tree, as bench/sync-vs-rsync.sh starts it.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/rsyncd.conf" <<CONF
log file = $work/rsyncd.log
[img]
    path = $NEW
    read only = yes
    uid = root
    gid = root
    use chroot = no
    numeric ids = yes
    hosts allow = 127.0.0.1
CONF
rsync --daemon --no-detach --config="$work/rsyncd.conf" --address=127.0.0.1 --port="$port" >"$work/rsyncd.out" 2>&1 &
echo $! > "$work/rsyncd.pid"
for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
RSYNC_URL="rsync://127.0.0.1:$port/img/"

now() { date +%s.%N; }
fresh() { rm -rf "$work/host" "$work/state"; cp -a "$OLD" "$work/host"; sync; }
sd() { "$SYNCD" "$@" --root "$work/host" --state-dir "$work/state" --host-id bench --insecure; }
# A commit by the build BIN alone, from a fresh host that recorded its release and prefetched:
# prints its seconds.
commit_with() { # BIN
  fresh
  "$1" sync -q --master "$A" --root "$work/host" --state-dir "$work/state" --host-id bench --insecure >/dev/null 2>&1
  "$1" prefetch --master "$B" --root "$work/host" --state-dir "$work/state" --host-id bench --insecure \
    2>"$work/prefetch-b.log" || { cat "$work/prefetch-b.log" >&2; exit 1; }
  sync
  local t0 t1
  t0=$(now)
  "$1" commit -q --root "$work/host" --state-dir "$work/state" --host-id bench --insecure 2>"$work/commit-b.log" \
    || { cat "$work/commit-b.log" >&2; exit 1; }
  t1=$(now)
  echo "$t1 - $t0" | bc
}

commit_t=(); sync_t=(); rsync_t=(); rsyncd_t=(); rollback_t=(); commit_b_t=()
for i in $(seq 1 "$RUNS"); do
  # SYNCD_B's commit: before SYNCD's in even runs, after it (below) in odd ones.
  if [ -n "$SYNCD_B" ] && [ $((i % 2)) = 0 ]; then commit_b_t+=("$(commit_with "$SYNCD_B")"); fi
  # commit: the host first records its release (a pass that changes nothing), then prefetches.
  fresh
  sd sync -q --master "$A" >/dev/null 2>&1
  sd prefetch --master "$B" 2>"$work/prefetch.log" || { cat "$work/prefetch.log" >&2; exit 1; }
  sync
  t0=$(now); sd commit -q 2>"$work/commit.log" || { cat "$work/commit.log" >&2; exit 1; }; t1=$(now)
  commit_t+=("$(echo "$t1 - $t0" | bc)")
  if [ "$i" = 1 ]; then
    rsync -aHAXcn --numeric-ids --delete -i "$NEW/" "$work/host/" > "$work/verify-commit" || true
    [ -s "$work/verify-commit" ] && { echo "commit.sh: the commit left differences:" >&2; head "$work/verify-commit" >&2; exit 1; }
  fi
  sync
  t0=$(now); sd rollback -q 2>"$work/rollback.log" || { cat "$work/rollback.log" >&2; exit 1; }; t1=$(now)
  rollback_t+=("$(echo "$t1 - $t0" | bc)")
  if [ "$i" = 1 ]; then
    rsync -aHAXcn --numeric-ids --delete -i "$OLD/" "$work/host/" > "$work/verify-rollback" || true
    [ -s "$work/verify-rollback" ] && { echo "commit.sh: the rollback left differences:" >&2; head "$work/verify-rollback" >&2; exit 1; }
  fi
  if [ -n "$SYNCD_B" ] && [ $((i % 2)) = 1 ]; then commit_b_t+=("$(commit_with "$SYNCD_B")"); fi
  # a whole sync of the same upgrade, and rsync, alternating which goes first
  for tool in $( [ $((i % 2)) = 1 ] && echo "sync rsyncd rsync" || echo "rsync rsyncd sync" ); do
    fresh
    if [ "$tool" = sync ]; then
      t0=$(now); sd sync -q --master "$B" >/dev/null 2>"$work/sync.log" || { cat "$work/sync.log" >&2; exit 1; }; t1=$(now)
      sync_t+=("$(echo "$t1 - $t0" | bc)")
    elif [ "$tool" = rsyncd ]; then
      t0=$(now); rsync -aHAX --numeric-ids --delete "$RSYNC_URL" "$work/host/"; t1=$(now)
      rsyncd_t+=("$(echo "$t1 - $t0" | bc)")
    else
      t0=$(now); rsync -aHAX --numeric-ids --delete "$NEW/" "$work/host/"; t1=$(now)
      rsync_t+=("$(echo "$t1 - $t0" | bc)")
    fi
  done
  echo "run $i: commit ${commit_t[-1]} s, rollback ${rollback_t[-1]} s, sync ${sync_t[-1]} s, rsync daemon ${rsyncd_t[-1]} s, rsync local ${rsync_t[-1]} s" >&2
done

report=$(python3 - "${commit_t[*]}" "${rollback_t[*]}" "${sync_t[*]}" "${rsync_t[*]}" "${rsyncd_t[*]}" "${commit_b_t[*]}" <<'PY'
import statistics, sys
c, rb, s, r, rd, cb = ([float(x) for x in a.split()] for a in sys.argv[1:7])
m = statistics.median
print(f"| syncd commit (after prefetch) | {m(c):.3f} s | {', '.join(f'{x:.3f}' for x in c)} |")
print(f"| syncd rollback (no master) | {m(rb):.3f} s | {', '.join(f'{x:.3f}' for x in rb)} |")
print(f"| syncd sync, whole upgrade | {m(s):.3f} s | {', '.join(f'{x:.3f}' for x in s)} |")
print(f"| rsync -aHAX from an rsync daemon on loopback | {m(rd):.3f} s | {', '.join(f'{x:.3f}' for x in rd)} |")
print(f"| rsync -aHAX, local copy | {m(r):.3f} s | {', '.join(f'{x:.3f}' for x in r)} |")
if cb:
    print(f"| syncd commit, SYNCD_B (same runs, alternating) | {m(cb):.3f} s | {', '.join(f'{x:.3f}' for x in cb)} |")
print()
print(f"commit / sync = {m(c)/m(s):.2f} (goal ≤ 0.3); commit / rsync (daemon) = {m(c)/m(rd):.2f}, commit / rsync (local) = {m(c)/m(r):.2f} (goal ≤ 0.2); rollback / commit = {m(rb)/m(c):.2f} (goal ≤ 1)")
if cb:
    print(f"commit / commit of SYNCD_B = {m(c)/m(cb):.2f}")
PY
)
echo "$report"
# shellcheck source=bench/lib.sh
[ -n "$RESULTS" ] || { source bench/lib.sh; RESULTS=$(new_results bench commit); }
{
  echo
  echo "## commit.sh, $(date -u +%Y-%m-%d), rev $(git rev-parse --short HEAD), $RUNS runs, bullseye→bookworm minbase"
  echo
  echo "| what | median | runs |"
  echo "|---|---:|---|"
  echo "$report"
} >> "$RESULTS"
