#!/usr/bin/env python3
"""Run one command and measure it: wall time, loopback bytes, peak RSS, CPU.

Usage: measure.py [--log FILE] [--timeout SECS] [--sync] [--iface IF] -- CMD [ARG...]

Prints one line on stdout:
    wall_s rx_bytes maxrss_kib cpu_s rc method
and exits with CMD's exit status (124 if it was killed by --timeout, like timeout(1)).

  wall_s      monotonic seconds from just before the fork of CMD to just after it was
              reaped (plus os.sync() when --sync is given). Python start-up and the
              counter reads are outside this window.
  rx_bytes    growth of the RX byte counter of IF (default lo) in /proc/net/dev, read
              just before the fork and just after the reap (after --sync). On loopback
              every byte sent by anyone on the host is also received on lo, so this is
              the traffic of both directions of every loopback connection during the run,
              IP/TCP headers included, and any unrelated loopback traffic as well.
  maxrss_kib  peak resident set (ru_maxrss, KiB) of the largest single process among CMD
              and the descendants it reaped (for rsync: the larger of its generator and
              receiver processes, not their sum). CMD is started through GNU time
              (/usr/bin/time -f %M, override with $GNU_TIME), a small C program that
              reports wait4()'s ru_maxrss for CMD. It is not read with
              getrusage(RUSAGE_CHILDREN) here directly, because Linux folds the pre-exec
              address space of a child forked (or vforked) from this Python process into
              the child's ru_maxrss, which would put a ~10-15 MiB floor under every
              figure. Without GNU time it falls back to exactly that (method "rusage").
  cpu_s       user+system CPU seconds of CMD and its reaped descendants.
  rc          CMD's exit status (128+N if killed by signal N).
  method      "gnu-time" or "rusage" (see maxrss_kib).

CMD runs in its own process group. Its stdout and stderr go to FILE (truncated), or are
inherited without --log. On --timeout expiry the group gets SIGTERM, then SIGKILL 10 s
later; on SIGINT (Ctrl-C) the group gets SIGTERM and this exits 130.
"""
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time


def rx_bytes(iface):
    with open("/proc/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == iface:
                return int(rest.split()[0])
    raise SystemExit(f"measure.py: interface {iface} not in /proc/net/dev")


def main():
    args = sys.argv[1:]
    log = None
    timeout = None
    do_sync = False
    iface = "lo"
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--log":
            log = args.pop(0)
        elif opt == "--timeout":
            timeout = float(args.pop(0))
        elif opt == "--sync":
            do_sync = True
        elif opt == "--iface":
            iface = args.pop(0)
        else:
            raise SystemExit(f"measure.py: unknown option {opt}\n{__doc__}")
    if not args or len(args) < 2:
        raise SystemExit(__doc__)
    cmd = args[1:]

    gnu_time = os.environ.get("GNU_TIME", "/usr/bin/time")
    rfd = None
    if os.access(gnu_time, os.X_OK):
        method = "gnu-time"
        rfd, rpath = tempfile.mkstemp(prefix="measure.", suffix=".rss")
        os.close(rfd)
        # %M: max RSS in KiB; %U %S: user and system CPU seconds (all from wait4)
        cmd = [gnu_time, "-o", rpath, "-f", "%M %U %S", "--"] + cmd
    else:
        method = "rusage"

    out = open(log, "wb") if log else None

    def stop(p):
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue

    rx0 = rx_bytes(iface)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                         start_new_session=True)
    # A blocking wait, with the timeout on a timer thread: Popen.wait(timeout=...) polls with
    # sleeps that grow to 50 ms, which rounded short runs up to the next poll (every run of
    # a 75 ms `find` measured 0.114 s).
    timed_out = threading.Event()

    def expire():
        timed_out.set()
        stop(p)

    timer = threading.Timer(timeout, expire) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        stop(p)
        sys.exit(130)
    t_reaped = time.monotonic()
    if timer:
        timer.cancel()
    if timed_out.is_set():
        rc = 124
    if do_sync:
        os.sync()
    t1 = time.monotonic() if do_sync else t_reaped
    rx1 = rx_bytes(iface)
    if out:
        out.close()
    if rc < 0:
        rc = 128 - rc
    maxrss = cpu = None
    if rfd is not None:
        try:
            with open(rpath) as f:
                # GNU time prefixes "Command exited with non-zero status N" or
                # "Command terminated by signal N"; the format line is the last one
                last = f.read().strip().splitlines()[-1].split()
            maxrss, cpu = int(last[0]), float(last[1]) + float(last[2])
        except (OSError, IndexError, ValueError):
            pass
        finally:
            os.unlink(rpath)
    if maxrss is None:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        maxrss, cpu, method = ru.ru_maxrss, ru.ru_utime + ru.ru_stime, "rusage"
    print(f"{t1 - t0:.3f} {rx1 - rx0} {maxrss} {cpu:.3f} {rc} {method}")
    sys.exit(rc if rc < 256 else 1)


if __name__ == "__main__":
    main()
