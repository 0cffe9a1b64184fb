//! Per-host files rendered from the inventory (issue 29): an inventory with a group and three
//! hosts, templates for `/etc/hostname`, `/etc/hosts` and an sshd drop-in, a signed master, and
//! real `syncd` hosts. Each host ends with its own files (the tree comparator and
//! `rsync -aHAXcn` against a per-host expected tree), a hand edit is drift and is repaired, a
//! vars edit reloaded with SIGHUP fires the drop-in's trigger on exactly the host whose render
//! changed, and a missing variable fails one host's pass (naming the template, line and key)
//! while the others converge and it keeps its old files.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gis_tests::{assert_converged, bin, build_fixture, run_syncd, scratch, wait_until, Master, Output, Scratch};

const HOSTS: [&str; 3] = ["web01", "web02", "db01"];
const TEMPLATES: &str = "usr/share/golden/templates";
const DROPIN: &str = "etc/ssh/sshd_config.d/10-listen.conf";

/// The fixture plus the three templates (mode 0644) and the directories they render into.
fn image(s: &Scratch) -> PathBuf {
    let img = s.dir("img");
    build_fixture(&img);
    for d in ["etc/ssh", "etc/ssh/sshd_config.d", "usr/share/golden", TEMPLATES, &format!("{TEMPLATES}/etc")] {
        let p = img.join(d);
        if !p.exists() {
            fs::create_dir(&p).unwrap();
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::create_dir_all(img.join(format!("{TEMPLATES}/etc/ssh/sshd_config.d"))).unwrap();
    fs::write(img.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    for (name, text) in [
        ("etc/hostname.j2", "{{ host.name }}\n"),
        ("etc/hosts.j2", "127.0.0.1 localhost\n{{ ip }} {{ host.name }}.{{ domain }} {{ host.name }}\n"),
        (
            "etc/ssh/sshd_config.d/10-listen.conf.j2",
            "# rendered for {{ host.name }} ({{ host.groups | join(\",\") }})\nPort {{ sshd.port }}\nListenAddress {{ ip }}\n",
        ),
    ] {
        let p = img.join(TEMPLATES).join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    img
}

fn inventory(web02_port: u32, db01_ip: Option<&str>) -> String {
    inventory_validating(web02_port, db01_ip, "^Port [0-9]")
}

/// The inventory, with the drop-in validated by `grep -q PATTERN`.
fn inventory_validating(web02_port: u32, db01_ip: Option<&str>, pattern: &str) -> String {
    let db01 = db01_ip.map_or(String::new(), |ip| format!("vars = {{ ip = \"{ip}\" }}\n"));
    format!(
        r#"[vars]
domain = "example.net"
sshd = {{ port = 22 }}

[render]
templates_dir = "/{TEMPLATES}"

[templates."/{DROPIN}"]
mode = "0600"
xattrs = {{ "user.rendered-by" = "syncmaster" }}
validate = ["grep", "-q", "{pattern}", "%s"]

[groups.web]
vars = {{ sshd = {{ port = 2222 }} }}

[hosts.web01]
groups = ["web"]
vars = {{ ip = "10.0.0.11" }}

[hosts.web02]
groups = ["web"]
vars = {{ ip = "10.0.0.12", sshd = {{ port = {web02_port} }} }}

[hosts.db01]
{db01}"#
    )
}

/// What `host` should end with: the image with its three rendered files, each with the
/// template's owner and mtime, mode 0644 (the drop-in 0600, from the inventory).
fn expected(s: &Scratch, img: &Path, host: &str, ip: &str, port: u32, groups: &str) -> PathBuf {
    let exp = s.join(format!("expected-{host}"));
    let _ = fs::remove_dir_all(&exp);
    gis_tests::cp_a(img, &exp);
    for (target, text, mode) in [
        ("etc/hostname", format!("{host}\n"), 0o644),
        ("etc/hosts", format!("127.0.0.1 localhost\n{ip} {host}.example.net {host}\n"), 0o644),
        (DROPIN, format!("# rendered for {host} ({groups})\nPort {port}\nListenAddress {ip}\n"), 0o600),
    ] {
        let p = exp.join(target);
        // A new inode: nothing of the image's file (xattrs) carries over.
        let _ = fs::remove_file(&p);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        if target == DROPIN {
            rustix::fs::setxattr(&p, "user.rendered-by", b"syncmaster", rustix::fs::XattrFlags::empty()).unwrap();
        }
        let template = img.join(TEMPLATES).join(format!("{target}.j2"));
        let ok = Command::new("touch").arg("-h").arg("-r").arg(&template).arg(&p).status().unwrap();
        assert!(ok.success());
    }
    // The writes above moved the directories' mtimes: put the image's back.
    for d in ["etc", "etc/ssh/sshd_config.d"] {
        let ok = Command::new("touch").arg("-h").arg("-r").arg(img.join(d)).arg(exp.join(d)).status().unwrap();
        assert!(ok.success());
    }
    exp
}

struct Host {
    name: &'static str,
    root: PathBuf,
    config: PathBuf,
    fired: PathBuf,
}

impl Host {
    fn new(s: &Scratch, name: &'static str, public_key: &str) -> Host {
        let root = s.dir(&format!("root-{name}"));
        let fired = s.join(format!("fired-{name}"));
        let config = s.join(format!("syncd-{name}.toml"));
        let toml = format!(
            "state_dir = {:?}\ntrusted_keys = [{public_key:?}]\n\n[[trigger]]\nname = \"reload-sshd\"\nwatch = [\"/etc/ssh/sshd_config.d/*\"]\nrun = [\"sh\", \"-c\", \"echo fired >> {}\"]\n",
            s.join(format!("state-{name}")),
            fired.display()
        );
        fs::write(&config, toml).unwrap();
        Host { name, root, config, fired }
    }

    fn run(&self, master: &Master, cmd: &str) -> Output {
        let args: Vec<&OsStr> = [cmd, "--config"]
            .into_iter()
            .map(OsStr::new)
            .chain([self.config.as_os_str()])
            .chain(["--master", master.url(), "--insecure", "--host-id", self.name, "--root"].map(OsStr::new))
            .chain([self.root.as_os_str()])
            .collect();
        run_syncd(args)
    }

    fn fired(&self) -> usize {
        fs::read_to_string(&self.fired).map(|t| t.lines().count()).unwrap_or(0)
    }
}

/// A master of `img` with a fresh signing key, a state dir and the inventory (web02 on port
/// 2222, db01 with its ip): the master, the public key for the hosts, the inventory's path.
fn signed_master(s: &Scratch, img: &Path) -> (Master, String, PathBuf) {
    let key = s.join("signing.key");
    let out = Command::new(bin("syncmaster")).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let hosts_toml = s.join("hosts.toml");
    fs::write(&hosts_toml, inventory(2222, Some("10.0.0.21"))).unwrap();
    let state = s.dir("master-state");
    let master = Master::start_with(&[
        OsStr::new("--image"),
        img.as_os_str(),
        OsStr::new("--hosts"),
        hosts_toml.as_os_str(),
        OsStr::new("--signing-key"),
        key.as_os_str(),
        OsStr::new("--state-dir"),
        state.as_os_str(),
    ]);
    (master, public, hosts_toml)
}

fn hup(master: &Master) {
    let before = master.stderr().matches("inventory reloaded").count();
    let ok = Command::new("kill").args(["-HUP", &master.pid().to_string()]).status().unwrap();
    assert!(ok.success());
    assert!(
        wait_until(Duration::from_secs(20), || master.stderr().matches("inventory reloaded").count() > before),
        "the master did not reload its inventory:\n{}",
        master.stderr()
    );
}

#[test]
fn each_host_gets_its_own_files_and_a_missing_variable_fails_only_its_host() {
    let s = scratch();
    let img = image(&s);
    let (master, public, hosts_toml) = signed_master(&s, &img);
    let hosts: Vec<Host> = HOSTS.iter().map(|h| Host::new(&s, h, &public)).collect();
    let facts = |h: &str, web02_port: u32| match h {
        "web01" => ("10.0.0.11", 2222, "web"),
        "web02" => ("10.0.0.12", web02_port, "web"),
        _ => ("10.0.0.21", 22, ""),
    };

    // 1. Every host converges to the image with its own rendered files, signed for it.
    for h in &hosts {
        let out = h.run(&master, "sync");
        out.expect_code(0, &[&h.root]);
        out.check(
            out.stdout.contains(&format!("etc/hosts  (rendered from /{TEMPLATES}/etc/hosts.j2)")),
            "the itemized line does not say the file is rendered",
            &[],
        );
        let (ip, port, groups) = facts(h.name, 2222);
        assert_converged(&expected(&s, &img, h.name, ip, port, groups), &h.root, &out);
        assert_eq!(h.fired(), 1, "{}: the drop-in's trigger fires once on the first pass", h.name);
    }

    // `explain` says which paths are rendered for the host, and from what.
    let args: Vec<&OsStr> =
        ["explain", "--master", master.url(), "--insecure", "--host-id", "web02", "/etc/hosts", "/etc/motd"]
            .into_iter()
            .map(OsStr::new)
            .collect();
    let explain = run_syncd(args);
    explain.check(
        explain
            .stdout
            .contains(&format!("/etc/hosts: rendered for this host by the master from /{TEMPLATES}/etc/hosts.j2")),
        "explain does not say /etc/hosts is rendered",
        &[],
    );
    explain.check(!explain.stdout.contains("/etc/motd: rendered"), "explain calls an image file rendered", &[]);

    // 2. A hand edit of /etc/hosts is drift, named as rendered, and the next pass repairs it.
    let web01 = &hosts[0];
    fs::write(web01.root.join("etc/hosts"), "127.0.0.1 localhost\n10.9.9.9 web01\n").unwrap();
    let drift = web01.run(&master, "drift");
    drift.check(drift.code == 4, "drift exits 4 (changed) for a hand-edited rendered file", &[]);
    drift.check(
        drift.stdout.contains(&format!("etc/hosts  (content; rendered from /{TEMPLATES}/etc/hosts.j2)"))
            || drift.stdout.contains(&format!("rendered from /{TEMPLATES}/etc/hosts.j2)")),
        "drift does not show the edited rendered file",
        &[],
    );
    let out = web01.run(&master, "sync");
    out.expect_code(0, &[&web01.root]);
    assert_converged(&expected(&s, &img, "web01", "10.0.0.11", 2222, "web"), &web01.root, &out);
    assert_eq!(web01.fired(), 1, "repairing /etc/hosts fires nothing watching the drop-in");

    // 3. A vars edit (web02's port), reloaded with SIGHUP: only web02's drop-in changes, so its
    // trigger fires there and nowhere else; the new render is a newer serial of the same version.
    fs::write(&hosts_toml, inventory(2200, Some("10.0.0.21"))).unwrap();
    hup(&master);
    for h in &hosts {
        let out = h.run(&master, "sync");
        out.expect_code(0, &[&h.root]);
        let (ip, port, groups) = facts(h.name, 2200);
        assert_converged(&expected(&s, &img, h.name, ip, port, groups), &h.root, &out);
    }
    let fired: Vec<usize> = hosts.iter().map(Host::fired).collect();
    assert_eq!(fired, [1, 2, 1], "the trigger fires on exactly the host whose render changed");

    // 4. db01 loses its ip: its render fails, naming template, line and key; it keeps its
    // files; the others converge.
    fs::write(&hosts_toml, inventory(2200, None)).unwrap();
    hup(&master);
    let db01 = &hosts[2];
    let sentinel = gis_tests::Sentinel::take(&db01.root);
    let out = db01.run(&master, "sync");
    out.expect_code(13, &[&db01.root]);
    out.check(
        out.stderr.contains(&format!("template /{TEMPLATES}/etc/hosts.j2:2: undefined variable `ip`")),
        "the error does not name the template, its line and the key",
        &[],
    );
    sentinel.assert_unchanged("the host whose render failed");
    assert_eq!(
        fs::read_to_string(db01.root.join("etc/hosts")).unwrap(),
        "127.0.0.1 localhost\n10.0.0.21 db01.example.net db01\n"
    );
    for h in &hosts[..2] {
        let out = h.run(&master, "sync");
        out.expect_code(0, &[&h.root]);
    }
    // `syncd status` shows the failed pass and why.
    let status = db01.run(&master, "status");
    status.expect_code(0, &[]);
    status.check(
        status.stdout.contains("last pass:  render-failed") && status.stdout.contains("undefined variable `ip`"),
        "syncd status does not show the failed render",
        &[],
    );
    // The master logged it for that host, and got the failing pass's report.
    assert!(master.stderr().contains("host db01: template"), "{}", master.stderr());
    let drift = db01.run(&master, "drift");
    drift.check(drift.code == 22, "drift exits 22 when the master cannot render this host's files", &[]);

    // 5. A validation command that refuses the render (runs on the master, before serving).
    fs::write(&hosts_toml, inventory_validating(2200, Some("10.0.0.21"), "^Port 9")).unwrap();
    hup(&master);
    let out = web01.run(&master, "sync");
    out.expect_code(13, &[&web01.root]);
    out.check(out.stderr.contains("validate `grep -q ^Port 9 %s` refused the render"), "the refusal is not named", &[]);
    assert_eq!(
        fs::read_to_string(web01.root.join(DROPIN)).unwrap(),
        "# rendered for web01 (web)\nPort 2222\nListenAddress 10.0.0.11\n"
    );
}

#[test]
fn vars_names_the_source_of_every_key_and_bad_templates_are_refused_at_start() {
    let s = scratch();
    let img = image(&s);
    let hosts_toml = s.join("hosts.toml");
    fs::write(&hosts_toml, inventory(2200, Some("10.0.0.21"))).unwrap();
    let out =
        Command::new(bin("syncmaster")).arg("vars").arg("--hosts").arg(&hosts_toml).arg("web02").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for (key, source) in [
        ("domain = \"example.net\"", "# [vars]"),
        ("ip = \"10.0.0.12\"", "# [hosts.web02.vars]"),
        ("sshd.port = 2200", "# [hosts.web02.vars]"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(key) && l.trim_end().ends_with(source)),
            "{key} from {source}:\n{text}"
        );
    }
    let json = Command::new(bin("syncmaster"))
        .arg("vars")
        .arg("--hosts")
        .arg(&hosts_toml)
        .args(["web01", "--format", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["sources"]["sshd.port"], "[groups.web.vars]");
    assert_eq!(v["vars"]["sshd"]["port"], 2222);
    let unknown =
        Command::new(bin("syncmaster")).arg("vars").arg("--hosts").arg(&hosts_toml).arg("nope").output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("names no host \"nope\""));

    // A template that does not compile refuses the start, naming the file and line.
    fs::write(img.join(TEMPLATES).join("etc/hosts.j2"), "127.0.0.1 localhost\n{% if ip %}\n{{ ip }}\n").unwrap();
    let serve = |extra: &str| {
        let mut inv = inventory(2200, Some("10.0.0.21"));
        inv.push_str(extra);
        fs::write(&hosts_toml, inv).unwrap();
        Command::new(bin("syncmaster"))
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--image"])
            .arg(&img)
            .arg("--hosts")
            .arg(&hosts_toml)
            .output()
            .unwrap()
    };
    let out = serve("");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("/{TEMPLATES}/etc/hosts.j2:3:"))
            || err.contains(&format!("/{TEMPLATES}/etc/hosts.j2:2:")),
        "{err}"
    );
    fs::write(img.join(TEMPLATES).join("etc/hosts.j2"), "{{ ip }}\n").unwrap();

    // Two templates for one path, and a target outside any directory of the image.
    let out = serve("\n[templates.\"/etc/hosts\"]\nsource = \"/etc/hostname\"\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("two templates for /etc/hosts"), "{err}");
    let out = serve("\n[templates.\"/nowhere/file\"]\nsource = \"/etc/hostname\"\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no directory /nowhere"), "{err}");
    let out = serve("\n[templates.\"/etc/../../x\"]\nsource = \"/etc/hostname\"\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a path beneath the root"), "{err}");
}

#[test]
fn a_reloaded_inventory_is_pushed_to_a_running_daemon() {
    let s = scratch();
    let img = image(&s);
    let hosts_toml = s.join("hosts.toml");
    fs::write(&hosts_toml, inventory(2222, Some("10.0.0.21"))).unwrap();
    let master =
        Master::start_with(&[OsStr::new("--image"), img.as_os_str(), OsStr::new("--hosts"), hosts_toml.as_os_str()]);
    let root = s.dir("root");
    let cfg = s.join("syncd.toml");
    // A reconcile an hour away: only the master's push can bring the new render in time.
    fs::write(
        &cfg,
        format!(
            "master = {:?}\nroot = {root:?}\nhost_id = \"web02\"\nstate_dir = {:?}\nreconcile_interval = \"1h\"\nreconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\n",
            master.url(),
            s.join("state")
        ),
    )
    .unwrap();
    let _daemon = gis_tests::spawn_syncd_run(&cfg, fs::File::create(s.join("syncd.log")).unwrap());
    let dropin = root.join(DROPIN);
    let port = |want: &str| fs::read_to_string(&dropin).is_ok_and(|t| t.contains(want));
    assert!(
        wait_until(Duration::from_secs(30), || port("Port 2222")),
        "the daemon never converged:\n{}",
        fs::read_to_string(s.join("syncd.log")).unwrap_or_default()
    );
    fs::write(&hosts_toml, inventory(2200, Some("10.0.0.21"))).unwrap();
    hup(&master);
    assert!(
        wait_until(Duration::from_secs(30), || port("Port 2200")),
        "the new render was not pushed to the daemon:\n{}",
        fs::read_to_string(s.join("syncd.log")).unwrap_or_default()
    );
    let (ip, groups) = ("10.0.0.12", "web");
    let exp = expected(&s, &img, "web02", ip, 2200, groups);
    assert!(gis_tests::differences(&exp, &root).is_empty(), "{:?}", gis_tests::differences(&exp, &root));
}

/// `syncd sync` of `root` as `host` against `url`, trusting `public`.
fn sync_as(url: &str, host: &str, root: &Path, state: &Path, public: &str) -> Output {
    let args: Vec<&OsStr> =
        ["sync", "--master", url, "--insecure", "--host-id", host, "--trusted-key", public, "--root"]
            .into_iter()
            .map(OsStr::new)
            .chain([root.as_os_str(), OsStr::new("--state-dir"), state.as_os_str()])
            .collect();
    run_syncd(args)
}

#[test]
fn a_render_for_another_host_or_altered_is_refused() {
    let s = scratch();
    let img = image(&s);
    let (master, public, _) = signed_master(&s, &img);
    // web01's manifest, signed for web01 by the real master.
    let captured = gis_tests::capture_manifest(master.url(), "web01");
    let honest = gis_tests::fake::Image::scan(&img, 1);
    let header = |msgs: &mut Vec<proto::v1::ManifestMessage>| -> proto::v1::ManifestHeader {
        match msgs[0].msg.take() {
            Some(proto::v1::manifest_message::Msg::Header(h)) => h,
            _ => panic!("the first message is not a header"),
        }
    };
    let root = s.dir("root");
    let state = s.dir("state");
    let sentinel = gis_tests::Sentinel::take(&root);
    let refused = |msgs: Vec<proto::v1::ManifestMessage>, host: &str, why: &str| {
        let fake = gis_tests::fake::FakeMaster::start(msgs, honest.honest());
        let out = sync_as(fake.url(), host, &root, &state, &public);
        out.expect_code(4, &[&root]);
        out.check(out.stderr.contains(why), format!("the refusal does not say {why:?}"), &[]);
        sentinel.assert_unchanged(why);
    };

    // Replayed to another host: refused by name, nothing written.
    refused(captured.clone(), "web02", "offers files rendered for host \"web01\", and this host is \"web02\"");

    // Relabelled for web02: the signature no longer verifies.
    let mut msgs = captured.clone();
    let mut h = header(&mut msgs);
    h.rendered_for = "web02".into();
    msgs[0].msg = Some(proto::v1::manifest_message::Msg::Header(h));
    refused(msgs, "web02", "signature does not verify");

    // A rendered file's content swapped (its hash and size) under the same signature: the
    // entries no longer hash to the signed identity.
    let mut msgs = captured.clone();
    let mut h = header(&mut msgs);
    let evil = b"10.6.6.6 web01\n";
    let i = h.rendered.iter().position(|e| e.path.as_ref() == b"etc/hosts").expect("etc/hosts is rendered");
    h.rendered[i].hash = bytes::Bytes::copy_from_slice(&manifest::Hash::of(evil).0);
    h.rendered[i].size = evil.len() as u64;
    msgs[0].msg = Some(proto::v1::manifest_message::Msg::Header(h));
    refused(msgs, "web01", "identity");

    // The genuine one goes through.
    let fake_objects = {
        let rendered = captured.clone();
        let mut content = honest.content.clone();
        if let Some(proto::v1::manifest_message::Msg::Header(h)) = &rendered[0].msg {
            for (e, _) in h.rendered.iter().zip(&h.rendered_templates) {
                let text = fs::read(
                    expected(&s, &img, "web01", "10.0.0.11", 2222, "web")
                        .join(String::from_utf8_lossy(&e.path).as_ref()),
                )
                .unwrap();
                content.insert(manifest::Hash::of(&text), text);
            }
        }
        move |h: &manifest::Hash| {
            let data = content.get(h).cloned().unwrap_or_default();
            gis_tests::fake::Reply::Raw { size: data.len() as u64, data }
        }
    };
    let fake = gis_tests::fake::FakeMaster::start(captured, fake_objects);
    let out = sync_as(fake.url(), "web01", &root, &state, &public);
    out.expect_code(0, &[&root]);
    assert_converged(&expected(&s, &img, "web01", "10.0.0.11", 2222, "web"), &root, &out);
}
