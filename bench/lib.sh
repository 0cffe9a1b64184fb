# Helpers shared by the benchmark scripts (sourced, not run).

# scratch_fs DIR: the filesystem type DIR is on and whether it is a loop device, and for a loop
# device how it is backed: a buffered loop device (the default) copies every written block once
# more into the backing file's page cache; direct I/O does not, like a real disk. Reports print
# this, never DIR itself (no absolute paths of this machine in bench/results/).
scratch_fs() {
    local dir=$1 fstype src dio
    fstype=$(findmnt -n -o FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")
    src=$(findmnt -n -o SOURCE -T "$dir" 2>/dev/null || true)
    if [[ $src == /dev/loop* ]]; then
        dio=$(cat "/sys/block/${src#/dev/}/loop/dio" 2>/dev/null || echo "?")
        fstype="$fstype (loop device $src, direct I/O: $([ "$dio" = 1 ] && echo on || echo off))"
    else
        fstype="$fstype (not a loop device)"
    fi
    echo "$fstype"
}

# new_results BENCH_DIR NAME: the default RESULTS of a run, a new file
# BENCH_DIR/results/<UTC stamp>-NAME.md (e.g. 2026-12-05T1930Z-sync-vs-rsync.md), never one an
# earlier run wrote (-2, -3, ... when the minute's name is taken).
new_results() {
    local base f n=1
    base="$1/results/$(date -u +%Y-%m-%dT%H%MZ)-$2"
    f=$base.md
    while [ -e "$f" ]; do n=$((n + 1)); f=$base-$n.md; done
    mkdir -p "$1/results"
    echo "$f"
}
