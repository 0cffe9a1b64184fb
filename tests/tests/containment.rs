//! Containment of failure (issue 22): a pass that cannot finish never leaves the host broken.
//!
//! - a pass that does not fit is refused up front, and a disk that fills up while staging rolls
//!   back to the old tree, exactly (on a real loop-mounted ext4);
//! - in batches, a full disk stops staging and nothing destructive follows;
//! - one bad object holds back the symlink that points to it and every deletion;
//! - SIGKILL at random points never tears a file, never leaves more than one pass's worth of
//!   temp data, and the next pass resumes from what the killed one staged;
//! - a second syncd on the same root is refused (exit 8) or, with `--wait`, queues.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gis_tests::{
    assert_converged, bin, random_bytes, require_root, run_syncd, scratch, sync, wait_until, Builder, KillOnDrop,
    LoopExt4, Master, Output,
};

/// Files of the two releases: (path, size, seed) where the content differs between them.
const CHANGED: usize = 40;

/// An old and a new release of a small "root": a library behind a symlink that the new
/// release retargets to a new file (libfoo.so.6 -> 6.2, then -> 6.4; 6.2 is gone in the new
/// one), `CHANGED` files with new content, files only the old one has, and new files.
fn releases(old: &Path, new: &Path, file_size: usize) {
    for (top, v) in [(old, 1u64), (new, 2u64)] {
        let mut b = Builder::new(top);
        b.dir("usr", 0o755).dir("usr/lib", 0o755).dir("usr/bin", 0o755).dir("etc", 0o755);
        let lib = if v == 1 { "libfoo.so.6.2" } else { "libfoo.so.6.4" };
        b.file(format!("usr/lib/{lib}"), 0o644, &random_bytes(100 + v, 2 * file_size));
        b.symlink("usr/lib/libfoo.so.6", lib);
        b.file("usr/bin/tool", 0o755, &random_bytes(200 + v, file_size));
        b.file("etc/stable.conf", 0o644, b"the same in both releases\n");
        for i in 0..CHANGED {
            b.file(format!("usr/lib/mod{i:03}.so"), 0o644, &random_bytes(1000 * v + i as u64, file_size));
        }
        if v == 1 {
            b.dir("usr/lib/old-only", 0o755);
            for i in 0..5 {
                b.file(format!("usr/lib/old-only/f{i}"), 0o644, &random_bytes(5000 + i, 4096));
            }
        } else {
            b.dir("usr/share", 0o755);
            for i in 0..5 {
                b.file(format!("usr/share/new{i}"), 0o644, &random_bytes(6000 + i, file_size));
            }
        }
        b.finish();
    }
}

/// Every regular file under `root` (syncd's temp names aside) holds its old or its new
/// content, and every symlink there resolves inside the root; returns the bytes in temp files.
#[track_caller]
fn assert_not_torn(root: &Path, old: &Path, new: &Path, context: &str) -> u64 {
    let mut temp_bytes = 0;
    for e in walkdir::WalkDir::new(root).into_iter().map(|e| e.unwrap()) {
        let rel = e.path().strip_prefix(root).unwrap();
        let name = e.file_name().to_string_lossy();
        if name.starts_with(".syncd-") {
            if e.file_type().is_file() {
                temp_bytes += e.metadata().unwrap().len();
            }
            continue;
        }
        if rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with(".syncd-")) {
            continue;
        }
        if e.file_type().is_file() {
            let got = std::fs::read(e.path()).unwrap();
            let matches = |top: &Path| std::fs::read(top.join(rel)).is_ok_and(|c| c == got);
            assert!(
                matches(old) || matches(new),
                "{context}: {} is torn: its content is neither the old nor the new release's",
                rel.display()
            );
        }
        if e.file_type().is_symlink() {
            let target = std::fs::read_link(e.path()).unwrap();
            let resolved = e.path().parent().unwrap().join(&target);
            assert!(
                resolved.exists(),
                "{context}: symlink {} -> {} dangles (its target is missing: a library a binary needs)",
                rel.display(),
                target.display()
            );
        }
    }
    temp_bytes
}

fn temp_names(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".syncd-"))
        .map(|e| e.path().to_owned())
        .collect()
}

/// Starts `syncd sync` in the background.
fn spawn_sync(master: &Master, root: &Path, extra: &[&str]) -> Child {
    let mut args: Vec<&OsStr> = ["sync", "-q", "--master", master.url(), "--root"].map(OsStr::new).to_vec();
    args.push(root.as_os_str());
    args.extend(["--host-id", "e2e-host", "--insecure"].map(OsStr::new));
    args.extend(extra.iter().map(OsStr::new));
    Command::new(bin("syncd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run syncd")
}

/// Waits for a background syncd, at most `limit`, and collects what it printed.
fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().expect("wait"));
    let start = Instant::now();
    while !waiter.is_finished() {
        if start.elapsed() > limit {
            // SAFETY: our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap();
    Output {
        command: format!("syncd sync (pid {pid})"),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A root in a small ext4 that holds the old release and then `room` MiB of new content.
struct SmallDisk {
    old: PathBuf,
    new: PathBuf,
    root: PathBuf,
    ballast: PathBuf,
    fs: LoopExt4,
    master: Master,
    // Last: removed after the filesystem is unmounted.
    _s: gis_tests::Scratch,
}

impl SmallDisk {
    /// Removes the ballast, then a pass (with `extra` flags) must converge to the new release.
    #[track_caller]
    fn make_room_and_converge(&self, extra: &[&str]) {
        std::fs::remove_file(&self.ballast).unwrap();
        let out = sync(&self.master, &self.root, extra);
        out.expect_code(0, &[&self.root]);
        assert_converged(&self.new, &self.root, &out);
    }
}

fn small_disk(mib: u64, file_size: usize) -> SmallDisk {
    let s = scratch();
    let (old, new, mnt) = (s.dir("old"), s.dir("new"), s.dir("mnt"));
    releases(&old, &new, file_size);
    let fs = LoopExt4::new(&s.join("disk.img"), &mnt, mib);
    let root = mnt.join("root");
    std::fs::create_dir(&root).unwrap();
    let first = Master::start(&old);
    sync(&first, &root, &[]).expect_code(0, &[&root]);
    drop(first);
    let master = Master::start_version(&new, 2);
    SmallDisk { old, new, root, ballast: mnt.join("ballast"), fs, master, _s: s }
}

#[test]
fn a_pass_that_does_not_fit_is_refused_up_front_and_changes_nothing() {
    require_root!();
    // About 4 MiB of old release on 48 MiB; the new content (~10 MiB) plus the margin does not
    // fit once the disk is filled to 12 MiB free.
    let d = small_disk(48, 200 << 10);
    d.fs.fill(&d.ballast, 12 << 20);
    let out = sync(&d.master, &d.root, &[]);
    out.expect_code(7, &[&d.root]);
    out.check(
        out.stderr.contains("not enough free space") && out.stderr.contains("nothing was changed"),
        "the refusal does not say what it needs and that nothing changed",
        &[&d.root],
    );
    assert_converged(&d.old, &d.root, &out);

    d.make_room_and_converge(&[]);
}

#[test]
fn a_disk_that_fills_up_while_staging_rolls_back_to_the_old_tree() {
    require_root!();
    let d = small_disk(64, 200 << 10);
    // Slow enough that the disk can be filled behind syncd's back while it stages.
    let child = spawn_sync(&d.master, &d.root, &["--write-bytes-per-sec", "2MiB"]);
    let staging = wait_until(Duration::from_secs(20), || !temp_names(&d.root).is_empty());
    d.fs.fill(&d.ballast, 0);
    let out = finish(child, Duration::from_secs(60));
    out.check(staging, "syncd never started staging", &[&d.root]);
    out.expect_code(7, &[&d.root]);
    out.check(out.stderr.contains("rolled back"), "the summary does not say the pass was rolled back", &[&d.root]);
    out.check(temp_names(&d.root).is_empty(), "temp entries were left behind", &[&d.root]);
    // Old release, whole: content, metadata, directory mtimes, and rsync agrees.
    assert_converged(&d.old, &d.root, &out);

    d.make_room_and_converge(&[]);
}

#[test]
fn in_batches_a_full_disk_stops_staging_and_nothing_destructive_follows() {
    require_root!();
    let d = small_disk(48, 200 << 10);
    d.fs.fill(&d.ballast, 5 << 20);
    let out = sync(&d.master, &d.root, &["--staging", "batches"]);
    out.expect_code(1, &[&d.root]);
    out.check(out.stderr.contains("staging stopped"), "no line says why staging stopped", &[&d.root]);
    assert_not_torn(&d.root, &d.old, &d.new, "after ENOSPC in batches");
    out.check(temp_names(&d.root).is_empty(), "temp entries were left behind", &[&d.root]);
    for kept in ["usr/lib/libfoo.so.6.2", "usr/lib/old-only/f0"] {
        out.check(d.root.join(kept).exists(), format!("{kept} was deleted after a failure"), &[&d.root]);
    }

    d.make_room_and_converge(&["--staging", "batches"]);
}

#[test]
fn an_object_that_fails_holds_back_the_symlink_to_it_and_every_deletion() {
    for staging in ["whole", "batches"] {
        let s = scratch();
        let (old, new, root) = (s.dir("old"), s.dir("new"), s.dir("root"));
        releases(&old, &new, 16 << 10);
        let first = Master::start(&old);
        sync(&first, &root, &[]).expect_code(0, &[&root]);
        drop(first);
        // No object cache: the master reads each object when it is asked for, and finds that
        // the new library no longer has the content its manifest says.
        let v = std::ffi::OsString::from("2");
        let master = Master::start_with(&[
            OsStr::new("--image"),
            new.as_os_str(),
            OsStr::new("--image-version"),
            &v,
            OsStr::new("--cache-level"),
            OsStr::new("0"),
        ]);
        let lib = new.join("usr/lib/libfoo.so.6.4");
        let mut bad = std::fs::read(&lib).unwrap();
        bad[0] ^= 0xff;
        std::fs::write(&lib, &bad).unwrap();

        let out = sync(&master, &root, &["--staging", staging]);
        out.expect_code(1, &[&root]);
        out.check(
            out.stderr.contains("usr/lib/libfoo.so.6.4"),
            format!("{staging}: the failed object is not named"),
            &[&root],
        );
        out.check(
            out.stderr.contains("held back: the symlink's target usr/lib/libfoo.so.6.4"),
            format!("{staging}: the symlink to it is not reported as held back"),
            &[&root],
        );
        let link = std::fs::read_link(root.join("usr/lib/libfoo.so.6")).unwrap();
        out.check(link == Path::new("libfoo.so.6.2"), format!("{staging}: the symlink was retargeted"), &[&root]);
        for kept in ["usr/lib/libfoo.so.6.2", "usr/lib/old-only/f0"] {
            out.check(root.join(kept).exists(), format!("{staging}: {kept} was deleted after a failure"), &[&root]);
        }
        // The rest of the new release is in.
        for i in 0..CHANGED {
            let p = format!("usr/lib/mod{i:03}.so");
            let same = std::fs::read(root.join(&p)).unwrap() == std::fs::read(new.join(&p)).unwrap();
            out.check(same, format!("{staging}: {p} was not brought in"), &[&root]);
        }
        assert_not_torn(&root, &old, &new, staging);
        out.check(temp_names(&root).is_empty(), format!("{staging}: temp entries were left"), &[&root]);
    }
}

/// Bytes of the files under `top` whose content `other` does not have anywhere.
fn content_unique_to(top: &Path, other: &Path) -> u64 {
    let files = |t: &Path| -> Vec<Vec<u8>> {
        walkdir::WalkDir::new(t)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect()
    };
    let theirs: std::collections::HashSet<Vec<u8>> = files(other).into_iter().collect();
    files(top).into_iter().filter(|c| !theirs.contains(c)).map(|c| c.len() as u64).sum()
}

#[test]
fn sigkill_at_random_points_never_tears_a_file_and_the_next_pass_resumes() {
    let s = scratch();
    let (old, new, root) = (s.dir("old"), s.dir("new"), s.dir("root"));
    releases(&old, &new, 96 << 10);
    let old_master = Master::start(&old);
    sync(&old_master, &root, &[]).expect_code(0, &[&root]);
    let new_master = Master::start_version(&new, 2);
    // One pass's worth, either way: the content one release has and the other lacks.
    let one_pass = content_unique_to(&new, &old).max(content_unique_to(&old, &new));

    // A crash loop: the same upgrade killed again and again at a random point of a pass that
    // takes about five seconds at this rate (before it started, staging, commit, deletes), then
    // a deliberate downgrade killed the same way.
    let mut rng = rand::rng();
    let mut most_temp = 0;
    let mut kills: Vec<(u64, i32)> = Vec::new();
    for round in 0..16 {
        let (master, extra): (&Master, &[&str]) = match round / 8 {
            0 => (&new_master, &["--write-bytes-per-sec", "1MiB"]),
            _ => (&old_master, &["--write-bytes-per-sec", "1MiB", "--allow-downgrade"]),
        };
        let child = spawn_sync(master, &root, extra);
        let after = rand::Rng::random_range(&mut rng, 0..3000u64);
        std::thread::sleep(Duration::from_millis(after));
        let mut child = KillOnDrop(child);
        let _ = child.0.kill();
        let status = child.0.wait().unwrap();
        kills.push((after, status.code().unwrap_or(-9)));
        let temp = assert_not_torn(&root, &old, &new, &format!("round {round}, killed after {after} ms"));
        most_temp = most_temp.max(temp);
        assert!(
            temp <= one_pass,
            "round {round}: {temp} bytes of temp files after a kill at {after} ms, more than one pass's worth ({one_pass}); kills so far (ms, exit): {kills:?}"
        );
    }
    let out = sync(&new_master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&new, &root, &out);
    out.check(temp_names(&root).is_empty(), "temp entries were left after the final pass", &[&root]);
    eprintln!("kills (ms, exit): {kills:?}; most temp data after a kill: {most_temp} of {one_pass} bytes");
}

#[test]
fn a_pass_killed_after_staging_is_resumed_without_fetching_again() {
    let s = scratch();
    let (old, new, root) = (s.dir("old"), s.dir("new"), s.dir("root"));
    releases(&old, &new, 96 << 10);
    let first = Master::start(&old);
    sync(&first, &root, &[]).expect_code(0, &[&root]);
    drop(first);
    let master = Master::start_version(&new, 2);

    let child = KillOnDrop(spawn_sync(&master, &root, &["--write-bytes-per-sec", "2MiB"]));
    let staged_some = wait_until(Duration::from_secs(30), || temp_names(&root).len() >= 20);
    drop(child);
    assert!(staged_some, "syncd never staged 20 files");
    let left = temp_names(&root).len();

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&new, &root, &out);
    let reused = out
        .summary()
        .split("from an interrupted pass: ")
        .nth(1)
        .and_then(|t| t.split(' ').next()?.parse::<usize>().ok());
    out.check(
        reused.is_some_and(|n| n >= 19 && n <= left),
        format!("the pass after the kill did not reuse what it staged ({left} temp files were left)"),
        &[&root],
    );
    out.check(temp_names(&root).is_empty(), "temp entries were left", &[&root]);
}

#[test]
fn a_second_syncd_on_the_same_root_is_refused_or_queues_with_wait() {
    let s = scratch();
    let (old, new, root) = (s.dir("old"), s.dir("new"), s.dir("root"));
    releases(&old, &new, 64 << 10);
    let first = Master::start(&old);
    sync(&first, &root, &[]).expect_code(0, &[&root]);
    drop(first);
    let master = Master::start_version(&new, 2);

    let holder = spawn_sync(&master, &root, &["--write-bytes-per-sec", "1MiB"]);
    let pid = holder.id();
    let started = wait_until(Duration::from_secs(30), || !temp_names(&root).is_empty());
    let refused = sync(&master, &root, &[]);
    let queued = spawn_sync(&master, &root, &["--wait"]);
    let first_out = finish(holder, Duration::from_secs(60));
    let queued_out = finish(queued, Duration::from_secs(60));

    refused.check(started, "the first syncd never started staging", &[&root]);
    refused.expect_code(8, &[&root]);
    refused.check(
        refused.stderr.contains(&format!("another syncd (pid {pid}) is converging")),
        "the refusal does not name the holder's pid",
        &[&root],
    );
    first_out.expect_code(0, &[&root]);
    queued_out.expect_code(0, &[&root]);
    assert_converged(&new, &root, &queued_out);
    queued_out.check(temp_names(&root).is_empty(), "temp entries were left", &[&root]);
    // A dry run is a reader: it does not wait behind nothing and changes nothing.
    let dry = run_syncd(
        ["sync", "--dry-run", "--master", master.url(), "--root"]
            .map(OsStr::new)
            .into_iter()
            .chain([root.as_os_str(), OsStr::new("--insecure")]),
    );
    dry.expect_code(0, &[&root]);
}
