//! `syncd drift` and exclusions end to end: the report lists exactly the non-excluded drift,
//! agrees with what `syncd sync` then does, and the three exclusion sources combine in order.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use gis_tests::{converged_host, run_syncd, scratch, sync, Builder, Master, Output};

fn drift(master: &Master, root: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = ["drift", "--insecure", "--master", master.url(), "--root"].map(OsStr::new).to_vec();
    args.push(root.as_os_str());
    args.extend(["--host-id", "web01", "--format", "json"].map(OsStr::new));
    args.extend(extra.iter().map(OsStr::new));
    run_syncd(args)
}

fn sync_as(master: &Master, root: &Path, host: &str, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = ["sync", "--insecure", "--master", master.url(), "--root"].map(OsStr::new).to_vec();
    args.push(root.as_os_str());
    args.extend([OsStr::new("--host-id"), OsStr::new(host)]);
    args.extend(extra.iter().map(OsStr::new));
    run_syncd(args)
}

/// path -> (status, what)
fn entries(out: &Output) -> BTreeMap<String, (String, Vec<String>)> {
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", out.report(&[])));
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let what = e["what"]
                .as_array()
                .map(|w| w.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            (e["path"].as_str().unwrap().to_owned(), (e["status"].as_str().unwrap().to_owned(), what))
        })
        .collect()
}

#[test]
fn drift_lists_exactly_the_non_excluded_mutations_and_sync_agrees() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img)
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"golden\n")
        .file("etc/resolv.conf", 0o644, b"nameserver 10.0.0.1\n")
        .file("etc/motd", 0o644, b"hello\n")
        .file("etc/issue", 0o644, b"Debian\n")
        .file("etc/shells", 0o644, b"/bin/sh\n")
        .file("etc/profile", 0o644, b"umask 022\n")
        .symlink("etc/mtab", "../proc/self/mounts")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", 0o755, b"#!/bin/sh\n");
    let root = s.dir("root");
    let excl = s.join("exclude");
    fs::write(&excl, "# per-host files\n/etc/hostname\n/etc/resolv.conf\n").unwrap();
    let master = Master::start(&img);
    converged_host(&master, &img, &root);

    let r = |p: &str| root.join(p);
    fs::write(r("etc/motd"), b"edited\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(r("usr/bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(r("etc/shells")).unwrap();
    fs::write(r("etc/extra"), b"x\n").unwrap();
    fs::remove_file(r("etc/profile")).unwrap();
    std::os::unix::fs::symlink("/tmp", r("etc/profile")).unwrap();
    fs::remove_file(r("etc/mtab")).unwrap();
    std::os::unix::fs::symlink("/proc/mounts", r("etc/mtab")).unwrap();
    fs::write(r("etc/hostname"), b"mine\n").unwrap();
    fs::remove_file(r("etc/resolv.conf")).unwrap();

    let out = drift(&master, &root, &["--exclude-from", excl.to_str().unwrap()]);
    out.expect_code(7, &[&root]);
    let got = entries(&out);
    let want: BTreeMap<String, (String, Vec<String>)> = [
        ("/etc", "changed", vec!["mtime"]),
        ("/etc/extra", "extra", vec![]),
        ("/etc/motd", "changed", vec!["content", "mtime"]),
        ("/etc/mtab", "changed", vec!["mtime", "target"]),
        ("/etc/profile", "changed", vec!["type"]),
        ("/etc/shells", "missing", vec![]),
        ("/usr/bin/tool", "changed", vec!["mode"]),
    ]
    .into_iter()
    .map(|(p, st, w)| (p.to_owned(), (st.to_owned(), w.into_iter().map(str::to_owned).collect())))
    .collect();
    assert_eq!(got, want, "{}", out.report(&[]));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["summary"]["excluded"], 2);
    assert_eq!(v["host_id"], "web01");

    // The real run changes exactly what drift reported.
    let done = sync(&master, &root, &["--exclude-from", excl.to_str().unwrap()]);
    done.expect_code(0, &[&root]);
    let synced: Vec<String> =
        done.lines().iter().map(|l| format!("/{}", l[12..].split(' ').next().unwrap().trim_end_matches('/'))).collect();
    let reported: Vec<String> = got.keys().cloned().collect();
    assert_eq!(synced, reported, "drift and sync disagree\n{}", done.report(&[]));
    assert_eq!(fs::read(r("etc/hostname")).unwrap(), b"mine\n", "an excluded file was overwritten");
    assert!(!r("etc/resolv.conf").exists(), "an excluded file was recreated");
    drift(&master, &root, &["--exclude-from", excl.to_str().unwrap()]).expect_code(0, &[&root]);
}

#[test]
fn the_three_sources_combine_in_order_group_host_local() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img)
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"image\n")
        .file("etc/b", 0o644, b"image\n")
        .file("etc/c", 0o644, b"image\n")
        .file("etc/d", 0o644, b"image\n");
    let inv = s.join("hosts.toml");
    // group: a, b, c excluded; host: re-includes b; local: re-includes c and excludes d.
    fs::write(&inv, "[groups.base]\nexclude = [\"/etc/a\", \"/etc/b\", \"/etc/c\"]\n\n[hosts.web01]\ngroups = [\"base\"]\nexclude = [\"!/etc/b\"]\n").unwrap();
    let local = s.join("local-exclude");
    fs::write(&local, "!/etc/c\n/etc/d\n").unwrap();
    let master = Master::start_with(&[OsStr::new("--image"), img.as_os_str(), OsStr::new("--hosts"), inv.as_os_str()]);
    let root = s.dir("root");
    for f in ["a", "b", "c", "d"] {
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc").join(f), b"host\n").unwrap();
    }
    let out = sync_as(&master, &root, "web01", &["--exclude-from", local.to_str().unwrap()]);
    out.expect_code(0, &[&root]);
    let content = |f: &str| fs::read_to_string(root.join("etc").join(f)).unwrap();
    assert_eq!(content("a"), "host\n", "excluded by the group");
    assert_eq!(content("b"), "image\n", "the host's list overrides its group");
    assert_eq!(content("c"), "image\n", "a local file overrides the master's lists");
    assert_eq!(content("d"), "host\n", "excluded by the local file");

    // Another host does not get web01's lists.
    let other = s.dir("other");
    sync_as(&master, &other, "db01", &[]).expect_code(0, &[&other]);
    assert!(other.join("etc/a").exists(), "a host outside the inventory got web01's exclusions");

    let explain = run_syncd([
        "explain",
        "--insecure",
        "--master",
        master.url(),
        "--host-id",
        "web01",
        "--exclude-from",
        local.to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
        "/etc/a",
        "/etc/c",
    ]);
    explain.expect_code(0, &[]);
    assert!(
        explain.stdout.contains("/etc/a: excluded by master:") && explain.stdout.contains("[groups.base]:2: /etc/a"),
        "{}",
        explain.stdout
    );
    assert!(
        explain.stdout.contains("/etc/c: not excluded: re-included by")
            && explain.stdout.contains("local-exclude:1: !/etc/c"),
        "{}",
        explain.stdout
    );
}
