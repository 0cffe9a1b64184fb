#!/usr/bin/env python3
"""Generate a deterministic synthetic root-like image for the fleet benchmark.

Usage: gen-image.py DEST [SMALL [MEDIUM [SEED]]]      (defaults: 3000 100 1)

DEST must not exist. Everything is a pure function of (SMALL, MEDIUM, SEED):
  - SMALL regular files of 0..8192 bytes (uniform), spread over 60 directories
    (usr/share/s00..s59), like the many small files of a Debian root;
  - MEDIUM files of 64 KiB..320 KiB (uniform) under usr/lib/m00..m09, every other one
    compressible text (base64 of random bytes, ~25 % smaller under zstd) and the rest
    random bytes (incompressible, like compressed data and many binaries);
  - one symlink per directory (`latest` -> its first file), and one hard-linked pair;
  - modes 0644 (files) and 0755 (dirs), owner = the invoking user, every mtime
    2024-01-01T00:00:00Z.
With the defaults: 3,101 files, about 12 MiB of small files plus about 19 MiB of medium
ones (about 31 MiB). Prints a one-line summary (files, bytes) on stdout.
"""
import base64
import os
import random
import sys

MTIME_NS = 1704067200 * 10**9  # 2024-01-01T00:00:00Z


def main():
    if not 2 <= len(sys.argv) <= 5:
        sys.exit(__doc__)
    dest = sys.argv[1]
    small = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    medium = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    if os.path.lexists(dest):
        sys.exit(f"gen-image.py: {dest} exists; remove it or pick another DEST")
    rng = random.Random(seed)
    pool = base64.encodebytes(rng.randbytes(3 << 20))  # text, 76-char lines
    files = bytes_total = 0
    dirs = []

    def put(path, data):
        nonlocal files, bytes_total
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
        files += 1
        bytes_total += len(data)

    def mkdir(path):
        os.makedirs(path, mode=0o755)
        dirs.append(path)

    mkdir(dest)
    for sub in ("usr", "usr/share", "usr/lib"):
        mkdir(os.path.join(dest, sub))
    for i in range(small):
        d = os.path.join(dest, "usr/share", f"s{i % 60:02d}")
        if not os.path.isdir(d):
            mkdir(d)
        size = rng.randint(0, 8192)
        off = rng.randrange(0, len(pool) - 8192)
        put(os.path.join(d, f"f{i:05d}"), f"s{i} {seed}\n".encode()[:size] + pool[off : off + max(0, size - 16)])
    for i in range(medium):
        d = os.path.join(dest, "usr/lib", f"m{i % 10:02d}")
        if not os.path.isdir(d):
            mkdir(d)
        size = rng.randint(64 << 10, 320 << 10)
        if i % 2 == 0:
            off = rng.randrange(0, len(pool) - size)
            data = pool[off : off + size]
        else:
            data = rng.randbytes(size)
        put(os.path.join(d, f"lib{i:04d}.so"), data)
    for d in dirs[4:]:
        first = sorted(os.listdir(d))[0]
        os.symlink(first, os.path.join(d, "latest"))
        os.utime(os.path.join(d, "latest"), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.link(os.path.join(dest, "usr/share/s00/f00000"), os.path.join(dest, "usr/share/s00/hardlink"))
    for d in reversed(dirs):
        os.utime(d, ns=(MTIME_NS, MTIME_NS))
    print(f"{files} files, {bytes_total} bytes")


if __name__ == "__main__":
    main()
