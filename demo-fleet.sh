#!/usr/bin/env bash
# Fleet demo on built-in defaults: one syncmaster and HOSTS (default 5) `syncd run` daemons on
# loopback, each with its own root, state dir and host id, under a rollout policy of one canary,
# then 50 %, then the rest. It rolls out a good version through the canary and both waves, then
# a bad one (its health check fails on the canary) that halts after the canary, then aborts it:
# the canary goes back to the previous tree. `syncmaster rollout status` is printed at each
# step. Needs only cargo (and runs as any user).
set -euo pipefail
cd "$(dirname "$0")"

hosts=${HOSTS:-5}
[ "$hosts" -ge 3 ] || { echo "HOSTS must be at least 3" >&2; exit 2; }
echo "==> building (release)"
cargo build --release --quiet --bins
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/gis-fleet.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

images=$work/images
version() { # version N STATUS: a small tree whose app status the health check reads
    local v=$images/v$1
    mkdir -p "$v"/{etc/app,usr/bin}
    echo "Golden Linux, version $1" >"$v/etc/motd"
    echo "$2" >"$v/etc/app/status"
    printf '#!/bin/sh\necho hello from version %s\n' "$1" >"$v/usr/bin/hello" && chmod 755 "$v/usr/bin/hello"
    ln -s ../usr/bin/hello "$v/etc/hello-link"
}
publish() { ln -sfn "v$1" "$images/current.new" && mv -T "$images/current.new" "$images/current"; }
version 1 ok
version 2 ok
version 3 broken
publish 1

{
    echo "[groups.canary]"
    for i in $(seq "$hosts"); do
        if [ "$i" = 1 ]; then echo "[hosts.host$i]"; echo 'groups = ["canary"]'; else echo "[hosts.host$i]"; fi
    done
    cat <<'EOF'

[rollout]
timeout = "60s"        # granted, and no successful report within this: a failure
max_failures = 1       # the first failure halts the rollout

[[rollout.wave]]
name = "canary"
groups = ["canary"]
soak = "5s"            # the canary must stay up and converged this long

[[rollout.wave]]
name = "early"
percent = 50
max_concurrent = 2
soak = "2s"

[[rollout.wave]]
name = "rest"
percent = 100
max_concurrent = 2
EOF
} >"$work/hosts.toml"
echo "==> inventory and rollout policy ($work/hosts.toml):"
sed -n '/^\[rollout\]/,$p' "$work/hosts.toml"

"$bin/syncmaster" keygen --out "$work/signing.key" >/dev/null 2>&1
trusted=$(cat "$work/signing.key.pub")
"$bin/syncmaster" serve --images "$images" --hosts "$work/hosts.toml" --state-dir "$work/master-state" \
    --listen 127.0.0.1:0 --insecure --signing-key "$work/signing.key" --poll 200ms --cache-level 0 \
    >"$work/master.out" 2>"$work/master.log" &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening on ' "$work/master.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/master.out")
[ -n "$addr" ] || { cat "$work/master.log"; echo "syncmaster did not start" >&2; exit 1; }
master=http://$addr
echo "==> syncmaster listening on $addr"

for i in $(seq "$hosts"); do
    h=host$i
    mkdir -p "$work/$h/root"
    cat >"$work/$h/syncd.toml" <<EOF
master = "$master"
root = "$work/$h/root"
host_id = "$h"
state_dir = "$work/$h/state"
trusted_keys = ["$trusted"]
announce_jitter = "0s"
reconcile_interval = "5s"
reconcile_jitter = "0s"
max_backoff = "1s"

# Runs after a pass that moved this host to a new version; a failure halts the rollout.
[[health]]
name = "app"
run = ["/bin/sh", "-c", "read s < $work/$h/root/etc/app/status; [ \"\$s\" = ok ] || { echo \"app: status is \$s\"; exit 1; }"]
timeout = "10s"
EOF
    "$bin/syncd" run --insecure --config "$work/$h/syncd.toml" 2>"$work/$h/syncd.log" &
    pids+=($!)
done
echo "==> $hosts syncd daemons started (host1 is the canary)"

rollout() { "$bin/syncmaster" rollout "$@" --master "$master" --insecure; }
status() { "$bin/syncmaster" status --master "$master" --insecure; }
wait_state() { # wait_state VERSION STATE: the rollout status's first line says "-> vN, STATE"
    local want="-> v$1, $(echo "$2" | tr a-z A-Z)"
    for _ in $(seq 600); do
        rollout status | grep -qF -- "$want" && return 0
        sleep 0.2
    done
    echo "timed out waiting for the rollout of v$1 to be $2" >&2
    rollout status >&2; tail -20 "$work/master.log" >&2
    exit 1
}
wait_converged() { # every host converged (to its target)
    for _ in $(seq 600); do
        [ "$(status | tail -1 | sed -n 's/^\([0-9]*\) hosts: \([0-9]*\) converged.*/\1 \2/p')" = "$hosts $hosts" ] && return 0
        sleep 0.2
    done
    echo "timed out waiting for the fleet to converge" >&2; status >&2; exit 1
}

wait_converged
echo; echo "==> v1 is the first version: every host converged to it"
status

echo; echo "==> publishing v2 (good): canary first, then the waves"
publish 2
wait_state 2 running
sleep 1
rollout status
wait_state 2 completed
echo; echo "==> v2 rolled out"
rollout status
status

echo; echo "==> publishing v3 (bad: its health check fails)"
publish 3
wait_state 3 halted
rollout status
echo "==> host1: $(cat "$work/host1/root/etc/app/status"), others: $(cat "$work/host2/root/etc/app/status") (only the canary took v3)"

echo; echo "==> syncmaster rollout abort: the canary goes back to v2's tree (re-published under a new number)"
rollout abort --reason "v3 breaks the app"
wait_converged
status
if command -v rsync >/dev/null; then
    diff=$(rsync -aHAXcn --delete -i "$images/v2/" "$work/host1/root/")
    [ -z "$diff" ] && echo "==> rsync -aHAXcn --delete finds no difference between v2 and the canary's root"
fi
echo; echo "==> the event log"
rollout log
