#!/usr/bin/env bash
# nochange.sh: cost of a pass that finds nothing to do, on a host already converged to IMAGE.
# Alternates, per round: the stat-walk floor (`find ROOT -printf '%s %T@ %m %U %G\n'`),
# `syncd sync` with its host index warm (--state-dir), and `rsync -aHAX --numeric-ids --delete`
# from an rsync daemon on loopback. Prints medians and ratios; appends to bench/RESULTS.md.
#
# Env: CORPORA (default /var/tmp/gis-corpora), IMAGE (default bookworm-big), RUNS (default 7),
#      SCRATCH (default /var/tmp/gis-bench), SYNCD, SYNCMASTER (default target/release/…).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CORPORA=${CORPORA:-/var/tmp/gis-corpora}
IMAGE_NAME=${IMAGE:-bookworm-big}
image=$CORPORA/$IMAGE_NAME
RUNS=${RUNS:-7}
SCRATCH=${SCRATCH:-/var/tmp/gis-bench}
SYNCD=${SYNCD:-$here/../target/release/syncd}
SYNCMASTER=${SYNCMASTER:-$here/../target/release/syncmaster}
[ -d "$image" ] || { echo "no corpus at $image (run bench/corpora.sh $IMAGE_NAME)" >&2; exit 1; }

work=$(mktemp -d "$SCRATCH/nochange.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
root=$work/root state=$work/state

"$SYNCMASTER" serve --image "$image" --listen 127.0.0.1:0 >"$work/m.out" 2>"$work/m.err" & pids+=($!)
for _ in $(seq 600); do grep -q '^listening on ' "$work/m.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/m.out")
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
cat >"$work/rsyncd.conf" <<CONF
uid = root
gid = root
use chroot = no
numeric ids = yes
[img]
path = $image
read only = yes
CONF
rsync --daemon --no-detach --config="$work/rsyncd.conf" --address=127.0.0.1 --port="$port" & pids+=($!)
sleep 0.5

mkdir -p "$root"
"$SYNCD" sync -q --master "http://$addr" --root "$root" --state-dir "$state"          # converge
"$SYNCD" sync -q --master "http://$addr" --root "$root" --state-dir "$state" 2>/dev/null  # warm the index
rsync -aHAX --numeric-ids --delete "rsync://127.0.0.1:$port/img/" "$root/"               # warm rsync

t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
f=() s=() r=()
for i in $(seq "$RUNS"); do
    f+=("$(t find "$root" -printf '%s %T@ %m %U %G\n')")
    s+=("$(t "$SYNCD" sync -q --master "http://$addr" --root "$root" --state-dir "$state")")
    r+=("$(t rsync -aHAX --numeric-ids --delete "rsync://127.0.0.1:$port/img/" "$root/")")
    echo "round $i: find ${f[-1]}s  syncd ${s[-1]}s  rsync ${r[-1]}s" >&2
done
mf=$(printf '%s\n' "${f[@]}" | median); ms=$(printf '%s\n' "${s[@]}" | median); mr=$(printf '%s\n' "${r[@]}" | median)
entries=$(find "$image" | wc -l)
report=$(cat <<MD

## $(date -u '+%Y-%m-%d %H:%M:%S UTC') no-change pass ($IMAGE_NAME, $entries entries, $RUNS rounds, alternated)

- machine: $(nproc) cores, kernel $(uname -r); scratch on $(stat -f -c %T "$SCRATCH"); page cache warm; syncd host index warm
- commands: \`find ROOT -printf '%s %T@ %m %U %G\n'\`; \`syncd sync -q --master URL --root ROOT --state-dir STATE\`; \`rsync -aHAX --numeric-ids --delete rsync://127.0.0.1:PORT/img/ ROOT/\`

| tool | median s | vs find | syncd vs it |
|---|---:|---:|---:|
| find (stat walk) | $mf | 1.00 | $(echo "scale=2; $ms / $mf" | bc) |
| syncd | $ms | $(echo "scale=2; $ms / $mf" | bc) | 1.00 |
| rsync daemon | $mr | $(echo "scale=2; $mr / $mf" | bc) | $(echo "scale=2; $ms / $mr" | bc) |

- raw: find [${f[*]}]; syncd [${s[*]}]; rsync [${r[*]}]
MD
)
echo "$report"
echo "$report" >>"$here/RESULTS.md"
