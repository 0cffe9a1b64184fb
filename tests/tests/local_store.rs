//! Prefetch into the local store, commit from it with no network, and roll back locally:
//! real binaries, a master publishing by flips, trees compared by the comparator and by
//! `rsync -aHAXcn`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gis_tests::tree::{assert_converged, differences};
use gis_tests::{
    bin, fleet_status, flip, is_root, random_bytes, run_syncd, scratch, wait_until, Builder, LoopExt4, Master, Output,
    Scratch,
};

const WAIT: Duration = Duration::from_secs(30);

fn none() -> Output {
    Output { command: String::new(), code: 0, stdout: String::new(), stderr: String::new() }
}

/// `images/v1` and `images/v2`: v2 changes, adds, removes and renames files, changes a hard-link
/// pair, a symlink and metadata.
fn images(s: &Scratch) -> PathBuf {
    let images = s.dir("images");
    let v1 = images.join("v1");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    Builder::new(&v1)
        .dir("etc", 0o755)
        .file("etc/app.conf", 0o644, b"version = 1\n")
        .file("etc/motd", 0o644, b"hello\n")
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libold.so.1", 0o755, &big)
        .file("usr/lib/libkeep.so", 0o755, b"kept library\n")
        .hardlink("usr/lib/libkeep.so.0", "usr/lib/libkeep.so")
        .symlink("usr/lib/libcur.so", "libold.so.1")
        .dir("bin", 0o755)
        .file("bin/tool", 0o4755, b"#!/bin/sh\necho v1\n")
        // The same content at two paths, each its own inode: a rollback must give each its
        // own inode back (the store keeps both old inodes).
        .dir("usr/share", 0o755)
        .file("usr/share/a.txt", 0o644, b"same in v1\n")
        .file("usr/share/b.txt", 0o640, b"same in v1\n")
        .finish();
    let v2 = images.join("v2");
    let mut big2 = big.clone();
    big2[1000..1100].fill(7);
    Builder::new(&v2)
        .dir("etc", 0o755)
        .file("etc/app.conf", 0o600, b"version = 2\n")
        .file("etc/motd", 0o644, b"hello\n")
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libnew.so.2", 0o755, &big2)
        .file("usr/lib/libkeep.so", 0o755, b"kept library, patched\n")
        .file("usr/lib/libkeep.so.0", 0o755, b"kept library\n")
        .symlink("usr/lib/libcur.so", "libnew.so.2")
        .dir("usr/share", 0o755)
        .file("usr/share/new.txt", 0o644, b"new in v2\n")
        .file("usr/share/a.txt", 0o644, b"a in v2\n")
        .file("usr/share/b.txt", 0o640, b"b in v2\n")
        // New content at three paths, each its own inode with its own mode and xattrs: the
        // prefetch keeps an inode for each, and the commit links all three.
        .file("usr/share/c1.txt", 0o644, b"shared in v2\n")
        .file("usr/share/c2.txt", 0o600, b"shared in v2\n")
        .xattr("usr/share/c2.txt", "user.tag", b"two")
        .file("usr/share/c3.txt", 0o644, b"shared in v2\n")
        .xattr("usr/share/c3.txt", "user.tag", b"three")
        .dir("bin", 0o755)
        .file("bin/tool", 0o4755, b"#!/bin/sh\necho v2\n")
        .finish();
    flip(&images, "v1");
    images
}

fn master(images: &Path, state: &Path) -> Master {
    Master::start_with(&[
        OsStr::new("--images"),
        images.as_os_str(),
        OsStr::new("--state-dir"),
        state.as_os_str(),
        OsStr::new("--poll"),
        OsStr::new("200ms"),
    ])
}

/// `syncd CMD --root ROOT --state-dir STATE --host-id e2e-host --insecure [--master URL] EXTRA`.
fn syncd(cmd: &str, master: Option<&Master>, root: &Path, state: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new(cmd),
        OsStr::new("--root"),
        root.as_os_str(),
        OsStr::new("--state-dir"),
        state.as_os_str(),
        OsStr::new("--host-id"),
        OsStr::new("e2e-host"),
        OsStr::new("--insecure"),
    ];
    if let Some(m) = master {
        args.extend([OsStr::new("--master"), OsStr::new(m.url())]);
    }
    args.extend(extra.iter().map(OsStr::new));
    run_syncd(args)
}

/// Regular files of `root` whose link count is not their image file's: a root file must never
/// share its inode with the local store (the next scan would replace it again).
fn shared_inodes(img: &Path, root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().to_owned();
            let want = std::fs::symlink_metadata(img.join(&rel)).map_or(1, |m| m.nlink());
            let got = e.metadata().unwrap().nlink();
            (got != want).then(|| format!("{} has {got} links, the image's {want}", rel.display()))
        })
        .collect()
}

fn temp_entries(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".syncd-"))
        .map(|e| e.into_path())
        .collect()
}

/// A host at v1 (synced once, so the store keeps v1 as current), with v2 published.
fn host_at_v1_with_v2_published(s: &Scratch) -> (PathBuf, Master, PathBuf, PathBuf) {
    let images = images(s);
    let m = master(&images, &s.dir("mstate"));
    let (root, state) = (s.dir("root"), s.join("state"));
    syncd("sync", Some(&m), &root, &state, &[]).expect_code(0, &[&root]);
    assert_converged(&images.join("v1"), &root, &syncd("status", None, &root, &state, &[]));
    flip(&images, "v2");
    assert!(wait_until(WAIT, || fleet_status(m.url())["image_version"] == 2), "{}", m.stderr());
    (images, m, root, state)
}

#[test]
fn prefetch_changes_nothing_then_commit_needs_no_master_and_rollback_goes_back_exactly() {
    let s = scratch();
    let (images, m, root, state) = host_at_v1_with_v2_published(&s);
    let (v1, v2) = (images.join("v1"), images.join("v2"));

    let out = syncd("prefetch", Some(&m), &root, &state, &[]);
    out.expect_code(0, &[&root]);
    assert!(out.stderr.contains("prefetched image v2"), "{}", out.stderr);
    assert!(differences(&v1, &root).is_empty(), "a prefetch changed the root: {:?}", differences(&v1, &root));
    assert!(temp_entries(&root).is_empty(), "{:?}", temp_entries(&root));
    let st = syncd("status", None, &root, &state, &["--format", "json"]);
    st.expect_code(0, &[&root]);
    let j: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(j["current"]["version"], 1, "{}", st.stdout);
    assert_eq!(j["prefetched"]["version"], 2, "{}", st.stdout);
    assert_eq!(j["prefetched"]["complete"], true, "{}", st.stdout);
    assert!(j["store_own_bytes"].as_u64().unwrap() > 0, "{}", st.stdout);
    // Only root may reach the store: it keeps old setuid programs for a rollback.
    let store_dir = std::path::PathBuf::from(j["store"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&store_dir).unwrap().permissions().mode() & 0o777, 0o700);

    // An xattr set on every store object after the prefetch (its ctime changes) must not
    // reach the root: the commit reads back what it cannot vouch for.
    let objects = store_dir.join("objects");
    for e in std::fs::read_dir(&objects).unwrap() {
        rustix::fs::setxattr(e.unwrap().path(), "user.stray", b"x", rustix::fs::XattrFlags::empty()).unwrap();
    }

    // The commit reads nothing from the network: the master is gone.
    drop(m);
    let out = syncd("commit", None, &root, &state, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);
    assert!(out.stderr.contains("copied 0 locally"), "the commit copied content the store had: {}", out.stderr);
    assert!(temp_entries(&root).is_empty());
    assert!(shared_inodes(&v2, &root).is_empty(), "{:?}", shared_inodes(&v2, &root));
    let st = syncd("status", None, &root, &state, &["--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(
        (j["current"]["version"].as_u64(), j["previous"]["version"].as_u64()),
        (Some(2), Some(1)),
        "{}",
        st.stdout
    );
    assert!(j["prefetched"].is_null(), "{}", st.stdout);

    // Rollback, still with no master: v1 exactly, by the comparator and by rsync.
    let out = syncd("rollback", None, &root, &state, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    assert!(temp_entries(&root).is_empty());
    assert!(shared_inodes(&v1, &root).is_empty(), "{:?}", shared_inodes(&v1, &root));
    // A second rollback has nothing to go back to: a clear error, nothing changed.
    let out = syncd("rollback", None, &root, &state, &[]);
    out.expect_code(10, &[&root]);
    assert!(out.stderr.contains("no previous version to roll back to"), "{}", out.stderr);
    assert_converged(&v1, &root, &out);
}

#[test]
fn a_commit_with_nothing_prefetched_and_a_damaged_store_object_are_refused_without_change() {
    let s = scratch();
    let (images, m, root, state) = host_at_v1_with_v2_published(&s);
    let v1 = images.join("v1");
    let out = syncd("commit", None, &root, &state, &[]);
    out.expect_code(10, &[&root]);
    assert!(out.stderr.contains("nothing is prefetched"), "{}", out.stderr);

    syncd("prefetch", Some(&m), &root, &state, &[]).expect_code(0, &[&root]);
    // Damage one object in place (same size, same mtime): its stamp still matches, so the
    // damage must be caught by the inode check... it is not (same inode): rewrite it as a new
    // inode instead, which the stamp catches, and the object is hashed, refused and removed.
    let objects = s
        .join("state")
        .read_dir()
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("store-"))
        .unwrap()
        .path()
        .join("objects");
    let victim = objects
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|c| c == b"version = 2\n"))
        .expect("the prefetched app.conf is in the store");
    let tmp = objects.join("x");
    std::fs::write(&tmp, b"version = X\n").unwrap();
    std::fs::rename(&tmp, &victim).unwrap();
    drop(m);
    let out = syncd("commit", None, &root, &state, &[]);
    out.expect_code(10, &[&root]);
    assert!(
        out.stderr.contains("lacks the content of 1 files") && out.stderr.contains("/etc/app.conf"),
        "{}",
        out.stderr
    );
    assert!(differences(&v1, &root).is_empty(), "{:?}", differences(&v1, &root));
    assert!(!victim.exists(), "the damaged object was left in the store");
}

#[test]
fn a_health_check_that_keeps_failing_rolls_back_within_the_grace_and_the_master_sees_rolled_back() {
    let s = scratch();
    let images = images(&s);
    let m = master(&images, &s.dir("mstate"));
    let (root, state) = (s.dir("root"), s.join("state"));
    // Fails whenever the root holds v2's app.conf.
    let check = format!("! grep -q 'version = 2' {}/etc/app.conf", root.display());
    let cfg = s.join("syncd.toml");
    std::fs::write(
        &cfg,
        format!(
            "master = {:?}\nroot = {:?}\nhost_id = \"e2e-host\"\nstate_dir = {:?}\nhealth_grace = \"2s\"\nreconcile_interval = \"1h\"\nannounce_jitter = \"0s\"\n\n[[health]]\nname = \"app\"\nrun = [\"/bin/sh\", \"-c\", {check:?}]\ntimeout = \"5s\"\n",
            m.url(),
            root,
            state
        ),
    )
    .unwrap();
    let log = s.join("syncd.log");
    let _d = gis_tests::spawn_syncd_run(&cfg, std::fs::File::create(&log).unwrap());
    let result = || fleet_status(m.url())["hosts"].as_array().and_then(|h| h.first().cloned()).unwrap_or_default();
    assert!(
        wait_until(WAIT, || result()["last_pass"]["result"] == "converged"
            && result()["last_pass"]["image_version"] == 1),
        "{}\n{}",
        result(),
        std::fs::read_to_string(&log).unwrap()
    );
    assert_converged(&images.join("v1"), &root, &none());
    let t = std::time::Instant::now();
    flip(&images, "v2");
    assert!(
        wait_until(WAIT, || result()["last_pass"]["result"] == "rolled-back"),
        "{}\n{}",
        result(),
        std::fs::read_to_string(&log).unwrap()
    );
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "rolled back after {took:?}");
    assert_converged(&images.join("v1"), &root, &none());
    // No loop: the version is not taken again while the master targets it.
    std::thread::sleep(Duration::from_secs(3));
    assert_converged(&images.join("v1"), &root, &none());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches("rolling back locally").count(), 1, "{logged}");
    let st = syncd("status", None, &root, &state, &["--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    assert_eq!(j["refused"]["version"], 2, "{}", st.stdout);
}

#[test]
fn a_bad_commit_window_is_refused_at_start_naming_the_key() {
    let s = scratch();
    let cfg = s.join("syncd.toml");
    std::fs::write(
        &cfg,
        "master = \"http://127.0.0.1:1\"\napply = \"window\"\ncommit_window = [\"Sat 02:00-04:00 Mars/Olympus\"]\n",
    )
    .unwrap();
    let out = run_syncd(["run", "--insecure", "--config", cfg.to_str().unwrap()]);
    out.expect_code(2, &[]);
    assert!(out.stderr.contains("commit_window: unknown time zone \"Mars/Olympus\""), "{}", out.stderr);
    std::fs::write(&cfg, "master = \"http://127.0.0.1:1\"\napply = \"later\"\n").unwrap();
    let out = run_syncd(["run", "--insecure", "--config", cfg.to_str().unwrap()]);
    out.expect_code(2, &[]);
    assert!(out.stderr.contains("config key apply: unknown value \"later\""), "{}", out.stderr);
}

/// Many files for the crash test: v2 changes every file of v1, adds and removes some.
fn many(s: &Scratch) -> PathBuf {
    let images = s.dir("images");
    for (v, range) in [("v1", 0..1500u32), ("v2", 200..1700u32)] {
        let dir = images.join(v);
        let mut b = Builder::new(&dir);
        for d in 0..17 {
            b.dir(format!("d{d}"), 0o755);
        }
        for i in range {
            b.file(
                format!("d{}/f{i}", i / 100),
                0o644,
                format!("{v} file {i}\n").repeat(1 + (i as usize % 7) * 50).as_bytes(),
            );
        }
        b.finish();
    }
    flip(&images, "v1");
    images
}

#[test]
fn a_commit_killed_at_random_points_leaves_old_or_new_and_the_next_commit_completes_it() {
    let s = scratch();
    let images = many(&s);
    let (v1, v2) = (images.join("v1"), images.join("v2"));
    let m = master(&images, &s.dir("mstate"));
    let (root, state) = (s.dir("root"), s.join("state"));
    syncd("sync", Some(&m), &root, &state, &["-q"]).expect_code(0, &[&root]);
    flip(&images, "v2");
    assert!(wait_until(WAIT, || fleet_status(m.url())["image_version"] == 2), "{}", m.stderr());
    let mut killed_mid_commit = 0;
    for (round, delay_ms) in [5u64, 20, 40, 70, 110, 160, 220, 300].into_iter().enumerate() {
        syncd("prefetch", Some(&m), &root, &state, &[]).expect_code(0, &[&root]);
        let mut child = std::process::Command::new(bin("syncd"))
            .args(["commit", "-q", "--insecure", "--host-id", "e2e-host", "--root"])
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // Every file is old or new whole: content of one of the two versions at every path.
        for e in walkdir::WalkDir::new(&root).into_iter().filter_map(|e| e.ok()).filter(|e| e.file_type().is_file()) {
            let rel = e.path().strip_prefix(&root).unwrap();
            let name = rel.file_name().unwrap().to_string_lossy();
            if name.starts_with(".syncd-") {
                continue;
            }
            let got = std::fs::read(e.path()).unwrap();
            let ok = [&v1, &v2].iter().any(|v| std::fs::read(v.join(rel)).is_ok_and(|c| c == got));
            assert!(ok, "round {round}: {} is neither v1's nor v2's", rel.display());
        }
        if status.code().is_none() && (!differences(&v1, &root).is_empty() || !temp_entries(&root).is_empty()) {
            killed_mid_commit += 1;
        }
        // The next commit completes the switch: v2 exactly, no temp entries, no shared inode.
        let out = syncd("commit", None, &root, &state, &["-q"]);
        if out.code == 10 {
            // The killed commit had finished: nothing is prefetched any more.
            assert!(out.stderr.contains("nothing is prefetched"), "round {round}: {}", out.stderr);
        } else {
            out.expect_code(0, &[&root]);
        }
        assert_converged(&v2, &root, &out);
        assert!(temp_entries(&root).is_empty(), "round {round}: {:?}", temp_entries(&root));
        assert!(shared_inodes(&v2, &root).is_empty(), "round {round}: {:?}", shared_inodes(&v2, &root));
        // A pass against the master finds nothing to do.
        let again = syncd("sync", Some(&m), &root, &state, &["-q"]);
        again.expect_code(0, &[&root]);
        assert!(
            again.summary().contains("created 0, updated 0, deleted 0") || again.summary().contains("unchanged since"),
            "round {round}: {}",
            again.summary()
        );
        // Back to v1 for the next round.
        syncd("rollback", None, &root, &state, &["-q"]).expect_code(0, &[&root]);
        assert_converged(&v1, &root, &none());
    }
    eprintln!("{killed_mid_commit} of 8 kills landed in the middle of a commit");
    assert!(killed_mid_commit > 0, "no kill landed in the middle of a commit: the test proved nothing");
}

#[test]
fn a_prefetch_that_does_not_fit_is_refused_before_writing_anything() {
    if !is_root() {
        eprintln!("skipped: needs root (a loop-mounted ext4)");
        return;
    }
    let s = scratch();
    let images = s.dir("images");
    Builder::new(&images.join("v1")).dir("etc", 0o755).file("etc/a", 0o644, b"one\n").finish();
    Builder::new(&images.join("v2"))
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"two\n")
        .file("etc/big", 0o644, &random_bytes(7, 24 << 20))
        .finish();
    flip(&images, "v1");
    let m = master(&images, &s.dir("mstate"));
    let mnt = s.dir("mnt");
    let fs = LoopExt4::new(&s.join("disk.img"), &mnt, 64);
    let (root, state) = (mnt.join("root"), mnt.join("state"));
    std::fs::create_dir(&root).unwrap();
    syncd("sync", Some(&m), &root, &state, &["-q"]).expect_code(0, &[&root]);
    flip(&images, "v2");
    assert!(wait_until(WAIT, || fleet_status(m.url())["image_version"] == 2), "{}", m.stderr());
    fs.fill(&mnt.join("ballast"), 20 << 20);
    let out = syncd("prefetch", Some(&m), &root, &state, &[]);
    out.expect_code(7, &[&root]);
    assert!(
        out.stderr.contains("not enough free space in the local store") && out.stderr.contains("to prefetch image v2"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("nothing was written to the root"), "{}", out.stderr);
    assert!(differences(&images.join("v1"), &root).is_empty());
    let objects: Vec<_> = std::fs::read_dir(
        state
            .join(
                std::fs::read_dir(&state)
                    .unwrap()
                    .flatten()
                    .find(|e| e.file_name().to_string_lossy().starts_with("store-"))
                    .unwrap()
                    .file_name(),
            )
            .join("objects"),
    )
    .unwrap()
    .collect();
    assert!(objects.is_empty(), "{objects:?}");
    // With room, the same prefetch and its commit go through.
    std::fs::remove_file(mnt.join("ballast")).unwrap();
    syncd("prefetch", Some(&m), &root, &state, &[]).expect_code(0, &[&root]);
    syncd("commit", None, &root, &state, &["-q"]).expect_code(0, &[&root]);
    assert_converged(&images.join("v2"), &root, &none());
}

/// `syncd run` config for the window tests.
fn window_config(s: &Scratch, m: &Master, root: &Path, state: &Path, window: &str) -> PathBuf {
    let cfg = s.join(format!("syncd-{}.toml", window.len()));
    std::fs::write(
        &cfg,
        format!(
            "master = {:?}\nroot = {:?}\nhost_id = \"e2e-host\"\nstate_dir = {:?}\nreconcile_interval = \"1s\"\nreconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\napply = \"window\"\ncommit_window = [{window:?}]\n",
            m.url(),
            root,
            state
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn with_apply_window_the_daemon_prefetches_reconciles_the_current_version_and_commits_when_the_window_opens() {
    let s = scratch();
    let images = images(&s);
    let (v1, v2) = (images.join("v1"), images.join("v2"));
    let m = master(&images, &s.dir("mstate"));
    let (root, state) = (s.dir("root"), s.join("state"));
    syncd("sync", Some(&m), &root, &state, &["-q"]).expect_code(0, &[&root]);
    // A window the day after tomorrow (UTC): closed for the whole test.
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][((days + 2 + 3) % 7) as usize];
    let closed = format!("{day} 03:00-04:00");
    let log = s.join("syncd.log");
    let cfg = window_config(&s, &m, &root, &state, &closed);
    let daemon = gis_tests::spawn_syncd_run(&cfg, std::fs::File::create(&log).unwrap());
    let status = || {
        let st = run_syncd(["status", "--config", cfg.to_str().unwrap(), "--format", "json"]);
        serde_json::from_str::<serde_json::Value>(&st.stdout).unwrap_or_default()
    };
    flip(&images, "v2");
    assert!(
        wait_until(WAIT, || status()["prefetched"]["complete"] == true && status()["prefetched"]["version"] == 2),
        "{}\n{}",
        status(),
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(status()["next_window"].as_str().is_some_and(|t| !t.is_empty()), "{}", status());
    assert_eq!(status()["commit_windows"][0], closed.as_str(), "{}", status());
    // Nothing in the root changes, and the current version is still reconciled: drift is repaired.
    std::fs::write(root.join("etc/motd"), b"hand edit\n").unwrap();
    assert!(
        wait_until(WAIT, || std::fs::read(root.join("etc/motd")).is_ok_and(|c| c == b"hello\n")),
        "drift was not repaired while the version waits: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_converged(&v1, &root, &none());
    drop(daemon);
    // The window opens (a daemon whose window is open now): the prefetched version is committed.
    let _daemon = gis_tests::spawn_syncd_run(
        &window_config(&s, &m, &root, &state, "daily 00:00-24:00"),
        std::fs::File::create(s.join("syncd2.log")).unwrap(),
    );
    assert!(
        wait_until(WAIT, || differences(&v2, &root).is_empty()),
        "{:?}\n{}",
        differences(&v2, &root),
        std::fs::read_to_string(s.join("syncd2.log")).unwrap()
    );
    let host = || fleet_status(m.url())["hosts"].as_array().and_then(|h| h.first().cloned()).unwrap_or_default();
    assert!(
        wait_until(WAIT, || host()["last_pass"]["result"] == "converged" && host()["last_pass"]["image_version"] == 2),
        "{}",
        host()
    );
    assert_converged(&v2, &root, &none());
    assert!(shared_inodes(&v2, &root).is_empty(), "{:?}", shared_inodes(&v2, &root));
}
