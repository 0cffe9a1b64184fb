//! The .deb packages (`contrib/deb/build-debs.sh`, cargo-deb): built from this build's
//! binaries, installed with dpkg into a fresh debootstrap'd Debian bookworm minbase (with
//! man-db and systemd, as on a real host), where `syncd --version`, `man -w syncd` and the
//! shell completions work, the example configs are conffiles, the units are installed but not
//! enabled and pass `systemd-analyze verify --root`, and a purge leaves nothing behind.
//!
//! Needs root (debootstrap, chroot), debootstrap, dpkg-dev and cargo-deb, and the Debian
//! mirror (`GIS_DEBIAN_MIRROR`, default `http://deb.debian.org/debian`); `.ci/run` installs
//! them. Downloaded packages are cached in `target/debootstrap-cache`.

use std::path::{Path, PathBuf};
use std::process::Command;

use gis_tests::{is_root, scratch};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_chroot(root: &Path, args: &[&str]) -> String {
    run(Command::new("chroot").arg(root).args(args).env("LC_ALL", "C").env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
}

/// cargo-deb on PATH or where `cargo install` puts it.
fn cargo_deb() -> PathBuf {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/cargo-deb");
    if Command::new("cargo-deb").arg("--version").output().is_ok_and(|o| o.status.success()) {
        PathBuf::from("cargo-deb")
    } else if home.exists() {
        home
    } else {
        panic!("this test needs cargo-deb (hint: cargo install cargo-deb --version 3.8.0 --locked)");
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn the_debs_install_into_a_fresh_bookworm_with_man_pages_completions_and_verified_units() {
    if !is_root() {
        eprintln!("SKIPPED: debootstrap and chroot need root");
        return;
    }
    let deb_tool = cargo_deb();
    assert!(
        Command::new("debootstrap").arg("--version").output().is_ok(),
        "this test needs debootstrap (hint: apt-get install debootstrap)"
    );
    let s = scratch();

    // The packages, from the binaries this test run uses.
    let out_dir = s.dir("debs");
    let bin_dir = gis_tests::bin("syncd").parent().unwrap().to_path_buf();
    let target = bin_dir.parent().unwrap();
    run(Command::new(workspace().join("contrib/deb/build-debs.sh"))
        .arg(&out_dir)
        .env("PROFILE", "dev")
        .env("NO_BUILD", "1")
        .env("CARGO_DEB", &deb_tool)
        .env("CARGO_TARGET_DIR", target));
    let deb = |name: &str| out_dir.join(format!("{name}_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")));
    for name in ["syncd", "syncmaster"] {
        let files = run(Command::new("dpkg-deb").arg("--contents").arg(deb(name)));
        for want in [
            format!("./usr/bin/{name}"),
            format!("./usr/lib/systemd/system/{name}.service"),
            format!("./usr/share/man/man1/{name}.1.gz"),
            format!("./usr/share/bash-completion/completions/{name}"),
            format!("./usr/share/zsh/vendor-completions/_{name}"),
            format!("./usr/share/fish/vendor_completions.d/{name}.fish"),
            format!("./usr/share/doc/{name}/copyright"),
        ] {
            assert!(files.lines().any(|l| l.ends_with(&want)), "{name}: no {want} in\n{files}");
        }
        assert!(!files.contains("generate-assets"), "the hidden subcommand got a page: {files}");
        let depends = run(Command::new("dpkg-deb").arg("--field").arg(deb(name)).arg("Depends"));
        assert!(depends.contains("libc6"), "{name}: Depends: {depends}");
    }

    // A fresh bookworm minbase, as a host would have it: man-db and systemd.
    let root = s.join("bookworm");
    let cache = workspace().join("target/debootstrap-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mirror = std::env::var("GIS_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=man-db,systemd"])
        .arg(format!("--cache-dir={}", cache.display()))
        .arg("bookworm")
        .arg(&root)
        .arg(&mirror));
    for name in ["syncd", "syncmaster"] {
        std::fs::copy(deb(name), root.join(format!("tmp/{name}.deb"))).unwrap();
    }
    in_chroot(&root, &["dpkg", "-i", "/tmp/syncd.deb", "/tmp/syncmaster.deb"]);

    // The binaries run there.
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(in_chroot(&root, &["syncd", "--version"]).trim(), format!("syncd {v}"));
    assert_eq!(in_chroot(&root, &["syncmaster", "--version"]).trim(), format!("syncmaster {v}"));
    // man finds every page, and they render with the real flags.
    assert_eq!(in_chroot(&root, &["man", "-w", "syncd"]).trim(), "/usr/share/man/man1/syncd.1.gz");
    for page in ["syncd-sync", "syncd-run", "syncd-drift", "syncmaster", "syncmaster-serve", "syncmaster-rollout-abort"]
    {
        in_chroot(&root, &["man", "-w", page]);
    }
    let sync = in_chroot(&root, &["env", "MANWIDTH=100", "man", "-P", "cat", "syncd-sync"]);
    assert!(sync.contains("--dry-run") && sync.contains("--allow-downgrade"), "{sync}");
    let top = in_chroot(&root, &["env", "MANWIDTH=100", "man", "-P", "cat", "syncd"]);
    assert!(top.contains("Exit codes") && top.contains("another syncd holds this root"), "{top}");
    let serve = in_chroot(&root, &["env", "MANWIDTH=100", "man", "-P", "cat", "syncmaster-serve"]);
    assert!(serve.contains("--http-listen") && serve.contains("--metrics-listen"), "{serve}");
    // bash loads the completion and completes subcommands.
    let complete = in_chroot(
        &root,
        &[
            "bash",
            "-c",
            "source /usr/share/bash-completion/completions/syncd && complete -p syncd && \
             COMP_WORDS=(syncd dr) COMP_CWORD=1 COMP_LINE='syncd dr' COMP_POINT=8 && _syncd syncd dr syncd && \
             printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
    );
    assert!(complete.contains("-F _syncd syncd") && complete.lines().any(|l| l == "drift"), "{complete}");

    // The example configs are conffiles, kept across upgrades and removals.
    let conffiles = in_chroot(&root, &["dpkg-query", "--control-show", "syncd", "conffiles"]);
    assert!(conffiles.contains("/etc/syncd/syncd.toml") && conffiles.contains("/etc/syncd/exclude"), "{conffiles}");
    let conffiles = in_chroot(&root, &["dpkg-query", "--control-show", "syncmaster", "conffiles"]);
    assert!(conffiles.contains("/etc/syncmaster/hosts.toml"), "{conffiles}");

    // The units: installed, not enabled (syncd must not start on an unconfigured host), and
    // valid to systemd, both to the host's systemd-analyze over --root and to the chroot's
    // own (which also finds the man pages their Documentation= names).
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/syncd.service").exists());
    let units = ["/usr/lib/systemd/system/syncd.service", "/usr/lib/systemd/system/syncmaster.service"];
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .expect("this test needs systemd-analyze (hint: apt-get install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify --root:\n{err}");
    let mut verify = vec!["systemd-analyze", "verify"];
    verify.extend(units);
    in_chroot(&root, &verify);

    // A purge takes it all away again.
    in_chroot(&root, &["dpkg", "--purge", "syncd", "syncmaster"]);
    for gone in ["usr/bin/syncd", "usr/bin/syncmaster", "etc/syncd/syncd.toml", "usr/share/man/man1/syncd.1.gz"] {
        assert!(!root.join(gone).exists(), "{gone} is still there after a purge");
    }
}
