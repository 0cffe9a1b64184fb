//! What a pass has done so far, for `syncd sync`'s progress bar on a terminal: counters the
//! pass bumps (planned, fetched, staged) and the bar that shows them (indicatif), drawn on
//! stderr while the pass runs and cleared before its report. Off a terminal, or with `-q`, there
//! is no bar and the output is as it always was.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

struct Counters {
    planned_objects: AtomicU64,
    planned_bytes: AtomicU64,
    planned_changes: AtomicU64,
    fetched_objects: AtomicU64,
    fetched_bytes: AtomicU64,
    staged: AtomicU64,
    steps: AtomicU64,
}

static NOW: Counters = Counters {
    planned_objects: AtomicU64::new(0),
    planned_bytes: AtomicU64::new(0),
    planned_changes: AtomicU64::new(0),
    fetched_objects: AtomicU64::new(0),
    fetched_bytes: AtomicU64::new(0),
    staged: AtomicU64::new(0),
    steps: AtomicU64::new(0),
};

/// The pass planned `objects` to fetch (`bytes` of content) and `files` to write (every entry
/// but directories that needs a new inode).
pub fn planned(objects: u64, bytes: u64, files: u64) {
    NOW.planned_objects.store(objects, Relaxed);
    NOW.planned_bytes.store(bytes, Relaxed);
    NOW.planned_changes.store(files, Relaxed);
}

/// An object of `bytes` arrived.
pub fn fetched(bytes: u64) {
    NOW.fetched_objects.fetch_add(1, Relaxed);
    NOW.fetched_bytes.fetch_add(bytes, Relaxed);
}

/// A file (or symlink, node, hard link) was staged: written, verified, given its metadata.
pub fn staged() {
    NOW.staged.fetch_add(1, Relaxed);
}

/// The apply takes up its next change.
pub fn step() {
    NOW.steps.fetch_add(1, Relaxed);
}

/// A count that grows while a pass works: changes taken up, objects received, and disk and
/// network I/O charged to the throttles (hashing a large tree moves only that). Its value means
/// nothing; that it moved does (systemd's watchdog, [`crate::notify`]).
pub fn moves() -> u64 {
    NOW.steps.load(Relaxed).wrapping_add(NOW.fetched_objects.load(Relaxed)).wrapping_add(throttle::activity())
}

/// The bar, drawn on stderr every 100 ms by a thread of its own until [`Bar::finish`].
pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bar {
    pub fn start() -> Bar {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} [{bar:20}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} · {msg}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                while !flag.load(Relaxed) {
                    let planned = NOW.planned_bytes.load(Relaxed);
                    if planned > 0 {
                        bar.set_length(planned);
                    }
                    bar.set_position(NOW.fetched_bytes.load(Relaxed));
                    bar.set_message(format!(
                        "objects {}/{}, files {}/{}",
                        NOW.fetched_objects.load(Relaxed),
                        NOW.planned_objects.load(Relaxed),
                        NOW.staged.load(Relaxed),
                        NOW.planned_changes.load(Relaxed)
                    ));
                    bar.tick();
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            })
            .ok();
        Bar { stop, thread }
    }

    /// Stops drawing and clears the bar, so the report that follows is as without it.
    pub fn finish(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Time summed over the calls it wraps (one thread's).
#[derive(Default)]
pub struct Stopwatch(std::cell::Cell<std::time::Duration>);

impl Stopwatch {
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let r = f();
        self.0.set(self.0.get() + t.elapsed());
        r
    }

    pub fn secs(&self) -> f64 {
        self.0.get().as_secs_f64()
    }
}
