# Helpers shared by the benchmark scripts (sourced, not run).

# scratch_fs DIR: the filesystem type DIR is on and, for a loop device, how it is backed: a
# buffered loop device (the default) copies every written block once more into the backing
# file's page cache; direct I/O does not, like a real disk.
scratch_fs() {
    local dir=$1 fstype src dio
    fstype=$(findmnt -n -o FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")
    src=$(findmnt -n -o SOURCE -T "$dir" 2>/dev/null || true)
    if [[ $src == /dev/loop* ]]; then
        dio=$(cat "/sys/block/${src#/dev/}/loop/dio" 2>/dev/null || echo "?")
        fstype="$fstype (loop device $src, direct I/O: $([ "$dio" = 1 ] && echo on || echo off))"
    fi
    echo "$fstype"
}
