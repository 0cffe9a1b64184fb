#!/usr/bin/env python3
"""Generate a deterministic synthetic tree of many small regular files.

Usage: gen-files.py DEST [DIRS [FILES_PER_DIR [SEED]]]      (defaults: 1000 1000 1)

DEST must not exist. It gets DIRS directories d000..d999 (zero padded to the width of
DIRS-1), each with FILES_PER_DIR regular files f000..f999. Everything is a pure function of
(DIRS, FILES_PER_DIR, SEED), so two builds are byte-for-byte identical, metadata included:
  - file sizes: uniform pseudo-random in 0..4096 bytes (inclusive)
  - file content: a header line "<dir>/<file> <seed>\\n" followed by a slice of a fixed
    1 MiB pool of base64 text (random bytes, base64 encoded, 76-char lines, so it
    compresses roughly like text, ~25%), cut to the file's size; slice offsets are
    pseudo-random. Files shorter than the header are a truncated header.
  - modes 0644 (files) and 0755 (dirs), owner = the invoking user (root for the bench)
  - every mtime (files, dirs, DEST itself) is 2024-01-01T00:00:00Z
Prints a one-line summary (files, bytes, seconds) on stdout.
"""
import base64
import os
import random
import sys
import time

MTIME_NS = 1704067200 * 10**9  # 2024-01-01T00:00:00Z
MAX_SIZE = 4096
POOL_BYTES = 1 << 20


def main():
    if not 2 <= len(sys.argv) <= 5:
        sys.exit(__doc__)
    dest = sys.argv[1]
    ndirs = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    nfiles = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    if os.path.lexists(dest):
        sys.exit(f"gen-files.py: {dest} already exists")

    os.umask(0o022)
    rng = random.Random(seed)
    raw = base64.encodebytes(rng.randbytes(POOL_BYTES * 3 // 4 + 4096))
    pool = raw[:POOL_BYTES + MAX_SIZE]
    dwidth = len(str(max(ndirs - 1, 0)))
    fwidth = len(str(max(nfiles - 1, 0)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    times = (MTIME_NS, MTIME_NS)
    t0 = time.monotonic()
    total = count = 0

    os.mkdir(dest, 0o755)
    for d in range(ndirs):
        dname = f"d{d:0{dwidth}d}"
        dpath = os.path.join(dest, dname)
        os.mkdir(dpath, 0o755)
        dfd = os.open(dpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for f in range(nfiles):
                fname = f"f{f:0{fwidth}d}"
                size = rng.randint(0, MAX_SIZE)
                off = rng.randrange(POOL_BYTES)
                head = f"{dname}/{fname} {seed}\n".encode()
                data = (head + pool[off:off + size])[:size]
                fd = os.open(fname, flags, 0o644, dir_fd=dfd)
                try:
                    if data:
                        os.write(fd, data)
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
                total += size
                count += 1
            os.utime(dfd, ns=times)
        finally:
            os.close(dfd)
        if (d + 1) % 100 == 0:
            print(f"  {d + 1}/{ndirs} dirs, {count} files, {time.monotonic() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    os.utime(dest, ns=times)
    print(f"{count} files, {total} bytes of content, {ndirs} dirs, seed {seed}, "
          f"{time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
