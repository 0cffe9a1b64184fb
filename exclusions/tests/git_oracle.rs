//! Exclusion lists against git itself: random pattern lists (fixed seed) over a real tree of
//! awkward names, each path's deciding rule compared with what `git check-ignore -v -n`
//! reports. Lists this crate refuses (documented in its docs) are counted, not compared.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use exclusions::{Exclusions, PatternList, Verdict};
use manifest::RelPath;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Names that bracket, brace, space, case and escape rules treat differently.
const NAMES: &[&str] =
    &["a", "b", "ab", "A", "x.log", "a]b", "{a,b}", "a b", "a\tb", "#c", "!d", "é", "abc", "b.a", "etc", "[x]", "a*"];

const TOKENS: &[&str] = &[
    "a",
    "b",
    "A",
    "ab",
    "x",
    ".log",
    "c",
    "é",
    "*",
    "*",
    "?",
    "**",
    "[ab]",
    "[!a]",
    "[^b]",
    "[a-c]",
    "[]a]",
    "[!]a]",
    "[[:upper:]]",
    "[[:space:]]",
    "[[:alpha:]]",
    "[[:digit:]]",
    "{a,b}",
    "{",
    "}",
    "\\*",
    "\\[",
    "\\a",
    "]",
    " ",
    "#",
    "!",
    "[a-]",
    "[!a-b]",
];

fn random_pattern(rng: &mut StdRng) -> String {
    let mut p = String::new();
    match rng.random_range(0..10) {
        0 => p.push('!'),
        1 => p.push('/'),
        2 => p.push_str("\\!"),
        3 => p.push_str("\\#"),
        _ => {}
    }
    for i in 0..rng.random_range(1..4) {
        if i > 0 && rng.random_bool(0.4) {
            p.push('/');
        }
        for _ in 0..rng.random_range(1..3) {
            p.push_str(TOKENS[rng.random_range(0..TOKENS.len())]);
        }
    }
    match rng.random_range(0..10) {
        0 => p.push('/'),
        1 => p.push(' '),
        2 => p.push_str("\\ "),
        3 => p.push('\t'),
        _ => {}
    }
    p
}

/// A tree of every 1- and 2-level combination of a few names, some as directories.
fn tree(top: &Path) -> Vec<(String, bool)> {
    let mut paths = Vec::new();
    for (i, a) in NAMES.iter().enumerate() {
        if i % 3 == 0 {
            std::fs::write(top.join(a), b"f").unwrap();
            paths.push((a.to_string(), false));
            continue;
        }
        std::fs::create_dir(top.join(a)).unwrap();
        paths.push((a.to_string(), true));
        for (j, b) in NAMES.iter().enumerate().filter(|(j, _)| (i + j) % 4 != 0) {
            let p = format!("{a}/{b}");
            if j % 5 == 0 {
                std::fs::create_dir(top.join(&p)).unwrap();
                std::fs::write(top.join(&p).join("x.log"), b"f").unwrap();
                paths.push((p.clone(), true));
                paths.push((format!("{p}/x.log"), false));
            } else {
                std::fs::write(top.join(&p), b"f").unwrap();
                paths.push((p, false));
            }
        }
    }
    paths
}

/// git's deciding line for each path (None: no pattern matches).
fn git_lines(repo: &Path, paths: &[(String, bool)]) -> Vec<Option<usize>> {
    let mut child = Command::new("git")
        .args(["check-ignore", "--no-index", "-v", "-n", "-z", "--stdin"])
        .current_dir(repo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git check-ignore");
    {
        let mut stdin = child.stdin.take().unwrap();
        for (p, _) in paths {
            stdin.write_all(p.as_bytes()).unwrap();
            stdin.write_all(b"\0").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    // -z -v: source NUL line NUL pattern NUL path NUL, per path.
    let fields: Vec<&[u8]> = out.stdout.split(|&b| b == 0).collect();
    fields
        .chunks(4)
        .filter(|c| c.len() == 4)
        .map(|c| std::str::from_utf8(c[1]).ok().and_then(|l| l.parse().ok()))
        .collect()
}

#[test]
fn exclusion_lists_decide_as_git_check_ignore_does() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("skipped: git is not installed (apt-get install git; CI installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    assert!(Command::new("git").args(["init", "-q"]).current_dir(repo).status().unwrap().success());
    let paths = tree(repo);
    let exclude = repo.join(".git/info/exclude");
    let mut rng = StdRng::seed_from_u64(22_23);
    let (mut compared, mut refused, mut disagreements) = (0usize, 0usize, Vec::new());
    for round in 0..600 {
        let lines: Vec<String> = (0..rng.random_range(1..6)).map(|_| random_pattern(&mut rng)).collect();
        let text = if round % 7 == 0 { format!("\u{feff}{}\n", lines.join("\n")) } else { lines.join("\n") + "\n" };
        let list = PatternList::parse("exclude", &text);
        let ex = match Exclusions::compile([&list]) {
            Ok(ex) => ex,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        std::fs::write(&exclude, &text).unwrap();
        let git = git_lines(repo, &paths);
        assert_eq!(git.len(), paths.len(), "git check-ignore answered for every path");
        for ((p, is_dir), want) in paths.iter().zip(git) {
            let ours = match ex.explain(&RelPath::new(p).unwrap(), *is_dir) {
                Verdict::Included => None,
                Verdict::Reincluded(r) | Verdict::Excluded(r) | Verdict::ExcludedParent(_, r) => Some(r.origin.line),
            };
            compared += 1;
            if ours != want && disagreements.len() < 20 {
                disagreements
                    .push(format!("list {text:?}: path {p:?} (dir: {is_dir}): git line {want:?}, ours {ours:?}"));
            }
        }
    }
    eprintln!("{compared} path verdicts compared with git, {refused} lists refused");
    assert!(disagreements.is_empty(), "disagreements with git check-ignore:\n{}", disagreements.join("\n"));
    assert!(refused < 60, "too many lists refused ({refused} of 600): the generator or the refusals are off");
}
