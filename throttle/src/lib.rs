//! Byte-rate limits for disk reads, disk writes and fetches, plus the process's I/O class.
//!
//! A [`Limiter`] is a GCRA bucket from `governor` whose cells are bytes. Callers charge it
//! for the bytes they move, in pieces no larger than its burst, and sleep when it says so.
//! One limiter is shared by every thread doing that kind of I/O (the hashing pool, the
//! apply thread, the fetch task), so the limit holds for the process as a whole.
//!
//! The burst is a tenth of a second of traffic (at least 64 KiB), so a rate sampled over a
//! few seconds sits on the configured figure instead of running a second ahead.

use std::io::{self, Read};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// The smallest burst: one read or write buffer's worth, so a single call never waits twice.
const MIN_BURST: u64 = 64 * 1024;

/// Governor keeps the interval between cells in whole nanoseconds, which is too coarse for
/// one-byte cells at disk speeds (47.68 ns rounds to 47 at 20 MiB/s: 1.5% fast). A cell is
/// therefore at least 1 KiB and large enough for an interval of 10 µs or more, where the
/// rounding costs under 0.01%.
fn cell_size(rate: u64) -> u64 {
    (rate / 100_000).next_power_of_two().max(1024)
}

/// A byte-rate bucket on any `governor` clock (tests use `FakeRelativeClock`).
pub struct Bucket<C: Clock = DefaultClock> {
    gcra: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    /// Bytes per cell.
    cell: u64,
    /// Burst, in cells.
    burst: u32,
    rate: u64,
    /// Bytes charged so far; cells are taken each time this crosses a multiple of `cell`,
    /// so odd-sized charges are neither rounded up nor lost.
    charged: AtomicU64,
    waited_ns: AtomicU64,
}

impl<C: Clock> Bucket<C> {
    /// A bucket passing `rate` bytes a second (`rate` > 0), on `clock`.
    pub fn with_clock(rate: u64, clock: C) -> Self {
        let rate = rate.max(1);
        let cell = cell_size(rate);
        let period =
            Duration::from_nanos((cell as u128 * 1_000_000_000 / rate as u128).clamp(1, u64::MAX as u128) as u64);
        let burst = ((rate / 10).max(MIN_BURST) / cell).clamp(1, u64::from(u32::MAX)) as u32;
        let quota = Quota::with_period(period)
            .expect("period is at least 1 ns")
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 64 KiB"));
        Bucket {
            gcra: RateLimiter::direct_with_clock(quota, clock),
            cell,
            burst,
            rate,
            charged: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }

    /// Charges `n` bytes, calling `sleep` with each wait the bucket asks for. Returns the
    /// total time asked for.
    pub fn charge_with(&self, n: u64, mut sleep: impl FnMut(Duration)) -> Duration {
        let mut waited = Duration::ZERO;
        for piece in self.pieces(self.cells(n)) {
            while let Some(d) = self.try_piece(piece) {
                waited += d;
                sleep(d);
            }
        }
        self.record(waited);
        waited
    }

    /// Accounts `n` more bytes; returns how many whole cells they complete.
    fn cells(&self, n: u64) -> u64 {
        let before = self.charged.fetch_add(n, Ordering::Relaxed);
        (before + n) / self.cell - before / self.cell
    }

    /// `n` cells split into pieces the bucket can grant at once.
    fn pieces(&self, n: u64) -> impl Iterator<Item = NonZeroU32> {
        let burst = u64::from(self.burst);
        (0..n.div_ceil(burst)).map(move |i| {
            let piece = (n - i * burst).min(burst) as u32;
            NonZeroU32::new(piece).expect("pieces are never empty")
        })
    }

    /// Takes `piece` from the bucket, or says how long to wait before trying again.
    fn try_piece(&self, piece: NonZeroU32) -> Option<Duration> {
        match self.gcra.check_n(piece) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(self.gcra.clock().now()).max(Duration::from_micros(1))),
            Err(_) => unreachable!("pieces never exceed the burst"),
        }
    }

    fn record(&self, waited: Duration) {
        self.waited_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The configured rate in bytes a second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The largest piece charged without a wait after an idle spell.
    pub fn burst(&self) -> u64 {
        u64::from(self.burst) * self.cell
    }
}

/// Charges made through any limiter of this process, limited or not: a sign of I/O progress
/// (syncd's watchdog pings while it moves; see `syncd::notify`).
static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// The count of charges so far (see [`ACTIVITY`]).
pub fn activity() -> u64 {
    ACTIVITY.load(Ordering::Relaxed)
}

/// A shared byte-rate limit, or none. Cloning shares the bucket.
#[derive(Clone, Default)]
pub struct Limiter {
    bucket: Option<Arc<Bucket>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.bucket {
            None => write!(f, "Limiter(unlimited)"),
            Some(b) => write!(f, "Limiter({} B/s)", b.rate),
        }
    }
}

impl Limiter {
    /// No limit.
    pub fn unlimited() -> Self {
        Limiter::default()
    }

    /// `rate` bytes a second; 0 means no limit.
    pub fn per_second(rate: u64) -> Self {
        if rate == 0 {
            return Limiter::default();
        }
        Limiter { bucket: Some(Arc::new(Bucket::with_clock(rate, DefaultClock::default()))) }
    }

    pub fn is_limited(&self) -> bool {
        self.bucket.is_some()
    }

    /// Charges `n` bytes, blocking this thread while over the rate.
    pub fn charge(&self, n: u64) {
        ACTIVITY.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &self.bucket {
            b.charge_with(n, std::thread::sleep);
        }
    }

    /// Charges `n` bytes, sleeping on the tokio timer while over the rate.
    pub async fn charge_async(&self, n: u64) {
        ACTIVITY.fetch_add(1, Ordering::Relaxed);
        let Some(b) = &self.bucket else { return };
        let mut waited = Duration::ZERO;
        for piece in b.pieces(b.cells(n)) {
            while let Some(d) = b.try_piece(piece) {
                waited += d;
                tokio::time::sleep(d).await;
            }
        }
        b.record(waited);
    }

    /// Total bytes charged and total time spent waiting so far.
    pub fn totals(&self) -> (u64, Duration) {
        match &self.bucket {
            None => (0, Duration::ZERO),
            Some(b) => (b.charged.load(Ordering::Relaxed), Duration::from_nanos(b.waited_ns.load(Ordering::Relaxed))),
        }
    }
}

/// The kernel moves file data in pages: a 100-byte file costs a 4 KiB page of disk I/O (and
/// counts as such in `/proc/PID/io`). Disk limits charge whole pages so the limit holds for
/// trees of small files too.
pub const PAGE: u64 = 4096;

/// `n` bytes rounded up to whole pages.
pub fn pages(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

/// A reader whose every read is charged to a limiter, in whole pages.
pub struct Throttled<'l, R> {
    inner: R,
    limiter: &'l Limiter,
}

impl<'l, R> Throttled<'l, R> {
    pub fn new(inner: R, limiter: &'l Limiter) -> Self {
        Throttled { inner, limiter }
    }
}

impl<R: Read> Read for Throttled<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.limiter.charge(pages(n as u64));
        Ok(n)
    }
}

/// The limits a process runs under, one per kind of I/O.
#[derive(Clone, Debug, Default)]
pub struct Throttle {
    /// Disk reads: hashing and local copies.
    pub read: Limiter,
    /// Disk writes: staged content.
    pub write: Limiter,
    /// Object bytes received from the master.
    pub net: Limiter,
}

impl Throttle {
    pub fn new(read: u64, write: u64, net: u64) -> Self {
        Throttle { read: Limiter::per_second(read), write: Limiter::per_second(write), net: Limiter::per_second(net) }
    }
}

/// `"20MiB"`, `"512KiB"`, `"1.5GiB"`, `"10MB"`, `"20M"` (binary, like rsync's `--bwlimit`),
/// or a bare number of bytes; an optional `/s` is allowed. `0` means unlimited.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{s:?} is not a byte count: unknown unit {unit:?} (hint: \"20MiB\", \"512KiB\", 0 for unlimited)"
            ))
        }
    };
    let n: f64 =
        num.parse().map_err(|_| format!("{s:?} is not a byte count (hint: \"20MiB\", \"512KiB\", 0 for unlimited)"))?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > u64::MAX as f64 / 2.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((n * mult as f64).round() as u64)
}

/// The Linux I/O scheduling class for the whole process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPriority {
    /// Disk time only when nobody else wants it (`ionice -c3`).
    Idle,
    /// The normal class (`ionice -c2`), at priority 7 (the lowest within it).
    BestEffort,
}

impl std::str::FromStr for IoPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(IoPriority::Idle),
            "best-effort" => Ok(IoPriority::BestEffort),
            _ => Err(format!("{s:?} is not an I/O priority (use \"idle\" or \"best-effort\")")),
        }
    }
}

/// Sets the calling thread's I/O class and nice level. Call it before any other thread starts:
/// threads inherit both, so the whole process (and the triggers it runs) gets them.
pub fn set_process_priority(io: Option<IoPriority>, nice: Option<i32>) -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    if let Some(p) = io {
        let value = match p {
            IoPriority::Idle => 3 << IOPRIO_CLASS_SHIFT,
            IoPriority::BestEffort => (2 << IOPRIO_CLASS_SHIFT) | 7,
        };
        // SAFETY: ioprio_set takes three integers and touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("cannot set the I/O priority to {p:?}: {e}")));
        }
    }
    if let Some(n) = nice {
        if !(-20..=19).contains(&n) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("nice {n} is outside -20..=19")));
        }
        // SAFETY: setpriority takes integers only.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("cannot set nice {n}: {e}")));
        }
    }
    Ok(())
}

/// The calling thread's I/O priority as the kernel reports it: (class, data).
pub fn current_io_priority() -> io::Result<(i32, i32)> {
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(((r >> 13) as i32, (r & 0x1fff) as i32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    const MIB: u64 = 1 << 20;

    /// Charges `total` bytes in `piece`-sized calls on a fake clock that advances only when
    /// the bucket asks to wait; returns the fake time that passed.
    fn run(rate: u64, total: u64, piece: u64) -> Duration {
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(rate, clock.clone());
        let mut left = total;
        let mut elapsed = Duration::ZERO;
        while left > 0 {
            let n = left.min(piece);
            b.charge_with(n, |d| {
                clock.advance(d);
                elapsed += d;
            });
            left -= n;
        }
        elapsed
    }

    #[test]
    fn holds_the_rate_over_time() {
        // 200 MiB at 20 MiB/s: 10 s less the one burst the empty bucket grants up front.
        for piece in [4096, 256 * 1024, 3 * MIB] {
            let t = run(20 * MIB, 200 * MIB, piece).as_secs_f64();
            let burst = (20 * MIB / 10) as f64 / (20 * MIB) as f64;
            assert!((t - (10.0 - burst)).abs() < 0.01, "piece {piece}: took {t} s");
        }
    }

    #[test]
    fn pieces_larger_than_the_burst_are_split() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(MIB, clock.clone());
        assert!(b.burst().abs_diff(MIB / 10) < 1024, "{}", b.burst());
        let waited = b.charge_with(5 * MIB, |d| clock.advance(d));
        let expect = 5.0 - b.burst() as f64 / MIB as f64;
        assert!((waited.as_secs_f64() - expect).abs() < 0.01, "{waited:?}");
    }

    #[test]
    fn idle_time_is_not_banked_beyond_the_burst() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(10 * MIB, clock.clone());
        clock.advance(Duration::from_secs(60));
        // A minute idle buys one burst (1 MiB), not 600 MiB.
        let waited = b.charge_with(11 * MIB, |d| clock.advance(d));
        assert!((waited.as_secs_f64() - 1.0).abs() < 0.01, "{waited:?}");
    }

    #[test]
    fn small_rates_and_odd_sizes_are_exact() {
        // 1000 B/s in 999-byte charges: fractions of a cell carry over, nothing is rounded.
        let total = 10 * MIN_BURST;
        let t = run(1000, total, 999).as_secs_f64();
        let expect = (total - MIN_BURST) as f64 / 1000.0;
        assert!((t - expect).abs() / expect < 0.01, "{t} vs {expect}");
    }

    #[test]
    fn fast_rates_are_exact() {
        // 2 GiB/s: a byte-per-cell bucket would round its interval to 0 ns and never wait.
        let clock = FakeRelativeClock::default();
        let b = Bucket::with_clock(2 << 30, clock.clone());
        let t = b.charge_with(20 << 30, |d| clock.advance(d)).as_secs_f64();
        let expect = 10.0 - b.burst() as f64 / (2u64 << 30) as f64;
        assert!((t - expect).abs() < 0.01, "{t} vs {expect}");
    }

    #[test]
    fn unlimited_never_waits() {
        let l = Limiter::per_second(0);
        assert!(!l.is_limited());
        l.charge(u64::MAX);
        assert_eq!(l.totals(), (0, Duration::ZERO));
    }

    #[test]
    fn disk_charges_are_whole_pages() {
        assert_eq!(pages(0), 0);
        assert_eq!(pages(1), 4096);
        assert_eq!(pages(4096), 4096);
        assert_eq!(pages(256 * 1024 + 1), 256 * 1024 + 4096);
    }

    #[test]
    fn byte_units() {
        assert_eq!(parse_bytes("20MiB").unwrap(), 20 * MIB);
        assert_eq!(parse_bytes("20M").unwrap(), 20 * MIB);
        assert_eq!(parse_bytes("20 MiB/s").unwrap(), 20 * MIB);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 * (1 << 29));
        assert_eq!(parse_bytes("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        for bad in ["", "fast", "20 parsecs", "-1MiB", "1e400"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn io_priority_names() {
        assert_eq!("idle".parse::<IoPriority>().unwrap(), IoPriority::Idle);
        assert_eq!("best-effort".parse::<IoPriority>().unwrap(), IoPriority::BestEffort);
        assert!("realtime".parse::<IoPriority>().unwrap_err().contains("idle"));
    }

    #[test]
    fn idle_class_is_applied_to_the_thread() {
        // A fresh thread, so the test runner's threads keep their class.
        std::thread::spawn(|| {
            set_process_priority(Some(IoPriority::Idle), None).unwrap();
            assert_eq!(current_io_priority().unwrap().0, 3);
            // A thread started afterwards inherits it.
            let child = std::thread::spawn(|| current_io_priority().unwrap().0).join().unwrap();
            assert_eq!(child, 3);
        })
        .join()
        .unwrap();
    }
}
