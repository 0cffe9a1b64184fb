//! `syncd sync`'s progress bar: shown on a terminal (a pseudo-terminal from util-linux's
//! `script`), never with `-q` or off a terminal, and the itemized lines and summary are the
//! same either way.

use std::path::Path;
use std::process::Command;

use gis_tests::{bin, random_bytes, run_syncd, scratch, Builder, Master};

/// `syncd sync ARGS` with stderr on a pseudo-terminal (stdout to `out`): the terminal's
/// transcript, escape sequences stripped.
fn on_a_terminal(args: &[&str], out: &Path, transcript: &Path) -> String {
    let cmd = format!(
        "{} sync {} > {}",
        bin("syncd").display(),
        args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" "),
        out.display()
    );
    let st = Command::new("script")
        .args(["-q", "-e", "-c", &cmd])
        .arg(transcript)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("this test needs script(1) (hint: apt-get install util-linux): {e}"));
    assert!(st.success(), "{cmd}: {st}");
    let raw = String::from_utf8_lossy(&std::fs::read(transcript).unwrap()).into_owned();
    // CSI sequences out, carriage returns as line breaks.
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        text.push(if c == '\r' { '\n' } else { c });
    }
    text
}

#[test]
fn a_terminal_shows_the_bar_and_quiet_or_off_a_terminal_do_not_and_the_report_is_the_same() {
    let s = scratch();
    let img = s.dir("img");
    let mut b = Builder::new(&img);
    b.dir("data", 0o755);
    // Incompressible content, fetched at 1 MiB/s: the pass takes about 2 s, many frames of the
    // bar (which redraws every 100 ms).
    for i in 0..12 {
        b.file(format!("data/f{i}"), 0o644, &random_bytes(i as u64, 170_000));
    }
    b.finish();
    let m = Master::start(&img);
    let common = |root: &Path| {
        vec![
            "--insecure".to_owned(),
            "--master".into(),
            m.url().into(),
            "--host-id".into(),
            "h1".into(),
            "--root".into(),
            root.display().to_string(),
            "--net-bytes-per-sec".into(),
            "1MiB".into(),
        ]
    };

    // On a terminal: the bar, then the summary; stdout carries the itemized lines only.
    let root = s.dir("tty");
    let args = common(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tty = on_a_terminal(&args, &s.join("tty.out"), &s.join("tty.typescript"));
    // Frames with the planned totals, and some with objects already fetched.
    let moving = tty.lines().any(|l| {
        // 12 × 170,000 bytes planned.
        l.contains("ETA") && l.contains("/1.95 MiB") && l.contains("/12, files") && !l.contains("objects 0/12")
    });
    assert!(moving, "no moving progress bar on a terminal:\n{tty}");
    assert!(tty.contains("syncd: converged to image v1"), "{tty}");
    let lines: Vec<&str> = tty.lines().collect();
    let last_bar = lines.iter().rposition(|l| l.contains("ETA")).unwrap();
    let summary = lines.iter().rposition(|l| l.contains("syncd: converged")).unwrap();
    assert!(last_bar < summary, "the bar was not cleared before the summary:\n{tty}");
    let tty_lines = std::fs::read_to_string(s.join("tty.out")).unwrap();

    // Off a terminal: the same itemized lines, and nothing but log lines and the summary on stderr.
    let root = s.dir("pipe");
    let mut args = vec!["sync".to_owned()];
    args.extend(common(&root));
    let out = run_syncd(args.iter().map(String::as_str));
    out.expect_code(0, &[&root]);
    assert_eq!(out.stdout, tty_lines, "the itemized lines differ between a terminal and a pipe");
    assert!(!out.stderr.contains("ETA"), "a progress bar off a terminal:\n{}", out.stderr);

    // -q on a terminal: no bar.
    let root = s.dir("quiet");
    let mut args = common(&root);
    args.push("-q".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let quiet = on_a_terminal(&args, &s.join("quiet.out"), &s.join("quiet.typescript"));
    assert!(!quiet.contains("ETA"), "a progress bar with -q:\n{quiet}");
    assert!(quiet.contains("syncd: converged to image v1"), "{quiet}");
    assert_eq!(std::fs::read_to_string(s.join("quiet.out")).unwrap(), "");
}
