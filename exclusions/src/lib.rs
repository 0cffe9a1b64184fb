//! Exclusion lists: the paths a host keeps to itself.
//!
//! The syntax and semantics are gitignore's, which sysadmins already know, matched by git's own
//! algorithm (`wildmatch`, as ported by gitoxide's `gix-glob`, and read line by line as
//! `gix-ignore` reads a `.gitignore`), and tested against `git check-ignore`:
//! - one pattern per line; a UTF-8 BOM is skipped; blank lines and lines starting with `#` are
//!   ignored (`\#` escapes); trailing spaces are trimmed unless escaped (`\ `), tabs are not;
//! - a pattern with a `/` at the start or in the middle is anchored at the root; one without
//!   matches a name at any depth;
//! - a trailing `/` matches directories only;
//! - `*`, `?` and `[…]` never match `/`, negated classes (`[!x]`, `[^x]`) included; `**`
//!   does (`a/**/b`, `**/x`, `dir/**`); POSIX classes (`[[:upper:]]`) work; braces are literal;
//! - `!` re-includes (`\!` escapes); the last matching rule wins;
//! - an excluded directory excludes its whole subtree, and nothing beneath it can be re-included.
//!
//! Refused, where git would silently match nothing: a pattern that is empty or names the root
//! (`/`, `!`), one with a `.` or `..` component, one with a `[` that is never closed; and, since
//! lists travel as UTF-8 text (TOML, gRPC strings), a line that is not UTF-8.
//!
//! Rules from several sources are concatenated in precedence order, so a later source (a local
//! file) overrides an earlier one (the master's group lists). Every rule remembers where it came
//! from, so [`Exclusions::explain`] can name the source, line and pattern.

use std::fmt;
use std::path::Path;

use gix_glob::pattern::{Case, Mode};
use gix_glob::{wildmatch, Pattern};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use manifest::RelPath;

/// Where a rule came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// A file path, or an inventory entry such as `hosts.toml [groups.web]`.
    pub source: String,
    /// 1-based line number within the source.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.line)
    }
}

/// One parsed rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The pattern as written, `!` and trailing `/` included.
    pub text: String,
    pub origin: Origin,
    pub negated: bool,
    pub dir_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExclusionError {
    #[error("{origin}: invalid exclusion pattern {pattern:?}: {reason} (hint: fix or remove the line; syncd refuses to sync with a broken list)")]
    BadPattern { origin: Origin, pattern: String, reason: String },
    #[error("cannot read exclusion list {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: the line is not valid UTF-8 (hint: exclusion lists are UTF-8 text; write the name with wildcards, such as `?` for each byte that is not UTF-8)")]
    NotUtf8 { origin: Origin },
}

/// A compiled, ordered list of rules from any number of sources.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    rules: Vec<Rule>,
    /// One per rule, in the same order.
    patterns: Vec<Pattern>,
    /// The rules whose pattern is only literal characters, `*` and `?` (most lists), matched
    /// all at once: for those globset with a literal separator is exactly git. Rule index of
    /// each glob.
    simple: GlobSet,
    simple_rules: Vec<usize>,
    /// The others (brackets, `**`, escapes, …), matched one by one by git's wildmatch.
    complex: Vec<usize>,
}

/// The verdict for one path, with the rule that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No rule matches.
    Included,
    /// The last matching rule is a `!` rule.
    Reincluded(&'a Rule),
    /// Excluded by a rule matching the path itself.
    Excluded(&'a Rule),
    /// Excluded because an ancestor directory is.
    ExcludedParent(RelPath, &'a Rule),
}

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        self.text == other.text && self.origin == other.origin
    }
}
impl Eq for Rule {}

impl Verdict<'_> {
    pub fn is_excluded(&self) -> bool {
        matches!(self, Verdict::Excluded(_) | Verdict::ExcludedParent(..))
    }
}

impl fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Included => f.write_str("not excluded (no rule matches)"),
            Verdict::Reincluded(r) => write!(f, "not excluded: re-included by {}: {}", r.origin, r.text),
            Verdict::Excluded(r) => write!(f, "excluded by {}: {}", r.origin, r.text),
            Verdict::ExcludedParent(p, r) => {
                write!(f, "excluded: its directory /{p} is excluded by {}: {}", r.origin, r.text)
            }
        }
    }
}

/// A list of patterns not yet compiled, with their origins: what a master sends a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatternList {
    pub source: String,
    /// (line, pattern text)
    pub patterns: Vec<(usize, String)>,
}

impl PatternList {
    /// Parses the text of an exclusion file as git reads a `.gitignore`: a leading BOM is
    /// skipped, a CR before a line's LF dropped, unescaped trailing spaces trimmed (an escaped
    /// one kept, with its backslash, as git keeps it), comments and blank lines skipped.
    pub fn parse(source: &str, text: &str) -> PatternList {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let patterns = text
            .split('\n')
            .enumerate()
            .filter_map(|(i, l)| {
                let l = trim_trailing_spaces(l.strip_suffix('\r').unwrap_or(l));
                (!l.is_empty() && !l.starts_with('#')).then(|| (i + 1, l.to_owned()))
            })
            .collect();
        PatternList { source: source.to_owned(), patterns }
    }

    pub fn read(path: &Path) -> Result<PatternList, ExclusionError> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ExclusionError::Read { path: source.clone(), source: e })?;
        match String::from_utf8(bytes) {
            Ok(text) => Ok(PatternList::parse(&source, &text)),
            Err(e) => {
                let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
                Err(ExclusionError::NotUtf8 { origin: Origin { source, line } })
            }
        }
    }
}

/// Git's `trim_trailing_spaces` (dir.c): trailing spaces go, unless escaped by a backslash
/// (which then stays with its space); a line ending in a lone backslash is kept whole. Tabs
/// are not spaces here.
fn trim_trailing_spaces(l: &str) -> &str {
    let b = l.as_bytes();
    let (mut i, mut cut) = (0, None);
    while i < b.len() {
        match b[i] {
            b' ' => {
                cut.get_or_insert(i);
            }
            b'\\' => {
                cut = None;
                i += 1;
            }
            _ => cut = None,
        }
        i += 1;
    }
    &l[..cut.unwrap_or(b.len())]
}

impl Exclusions {
    /// Compiles lists in precedence order (later lists win over earlier ones). Any invalid
    /// pattern fails the whole set: guessing could delete a host's network config.
    pub fn compile<'a>(lists: impl IntoIterator<Item = &'a PatternList>) -> Result<Exclusions, ExclusionError> {
        let mut rules = Vec::new();
        let mut patterns = Vec::new();
        let (mut builder, mut simple_rules, mut complex) = (GlobSetBuilder::new(), Vec::new(), Vec::new());
        for list in lists {
            for (line, text) in &list.patterns {
                let origin = Origin { source: list.source.clone(), line: *line };
                let (rule, pattern) = parse_rule(text, origin.clone())?;
                match simple_glob(&pattern) {
                    Some(glob) => {
                        let glob = GlobBuilder::new(&glob).literal_separator(true).build().map_err(|e| {
                            ExclusionError::BadPattern { origin, pattern: text.clone(), reason: e.kind().to_string() }
                        })?;
                        builder.add(glob);
                        simple_rules.push(rules.len());
                    }
                    None => complex.push(rules.len()),
                }
                patterns.push(pattern);
                rules.push(rule);
            }
        }
        let simple = builder.build().map_err(|e| ExclusionError::BadPattern {
            origin: Origin { source: "(all lists)".into(), line: 0 },
            pattern: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Exclusions { rules, patterns, simple, simple_rules, complex })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The last rule matching `path` itself, ignoring its ancestors. Callers that walk a tree
    /// top-down (and so never look beneath an excluded directory) need only this.
    pub fn matches_self(&self, path: &RelPath, is_dir: bool) -> Verdict<'_> {
        if self.rules.is_empty() {
            return Verdict::Included;
        }
        // As git: the last rule that matches decides (a directory-only rule matches no file).
        let mut last = None;
        if !self.simple_rules.is_empty() {
            last = self
                .simple
                .matches(path.as_path())
                .into_iter()
                .map(|g| self.simple_rules[g])
                .filter(|&r| is_dir || !self.rules[r].dir_only)
                .max();
        }
        let bytes = path.as_bytes();
        let basename = bytes.iter().rposition(|&c| c == b'/').map(|p| p + 1);
        for &r in self.complex.iter().rev() {
            if last.is_some_and(|l| l > r) {
                break;
            }
            let hit = self.patterns[r].matches_repo_relative_path(
                bytes.into(),
                basename,
                Some(is_dir),
                Case::Sensitive,
                wildmatch::Mode::NO_MATCH_SLASH_LITERAL,
            );
            if hit {
                last = Some(r);
                break;
            }
        }
        match last.map(|i| &self.rules[i]) {
            None => Verdict::Included,
            Some(r) if r.negated => Verdict::Reincluded(r),
            Some(r) => Verdict::Excluded(r),
        }
    }

    /// The full verdict for `path`, ancestors included: an excluded directory excludes its
    /// whole subtree.
    pub fn explain(&self, path: &RelPath, is_dir: bool) -> Verdict<'_> {
        let bytes = path.as_bytes();
        for (i, &c) in bytes.iter().enumerate() {
            if c == b'/' {
                let ancestor = RelPath::new(&bytes[..i]).expect("a prefix of a valid path is valid");
                if let Verdict::Excluded(r) = self.matches_self(&ancestor, true) {
                    return Verdict::ExcludedParent(ancestor, r);
                }
            }
        }
        self.matches_self(path, is_dir)
    }

    pub fn is_excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        self.explain(path, is_dir).is_excluded()
    }
}

fn parse_rule(text: &str, origin: Origin) -> Result<(Rule, Pattern), ExclusionError> {
    let bad = |reason: &str| ExclusionError::BadPattern {
        origin: origin.clone(),
        pattern: text.to_owned(),
        reason: reason.to_owned(),
    };
    // The pattern proper: no `!`, no trailing `/`, no leading `/` (git's own parse, below,
    // reads the same three from the text as written).
    let negated = text.starts_with('!');
    let body = if negated { &text[1..] } else { text };
    let body = body.strip_suffix('/').unwrap_or(body).trim_start_matches('/');
    if body.is_empty() {
        return Err(bad("the pattern is empty or names the root itself; exclude paths beneath it instead"));
    }
    if body.contains('\0') {
        return Err(bad("the pattern contains a NUL byte"));
    }
    if body.split('/').any(|c| c == "." || c == "..") {
        return Err(bad("'.' and '..' components are not allowed (git would match nothing)"));
    }
    if unclosed_bracket(body.as_bytes()) {
        return Err(bad("a '[' is never closed (git would match nothing; write '\\[' for a literal bracket)"));
    }
    let pattern = Pattern::from_bytes(text.as_bytes()).ok_or_else(|| bad("the pattern is empty"))?;
    let rule = Rule {
        text: text.to_owned(),
        origin,
        negated: pattern.is_negative(),
        dir_only: pattern.mode.contains(Mode::MUST_BE_DIR),
    };
    Ok((rule, pattern))
}

/// The globset form of a pattern made only of plain characters, `*` (never two in a row) and
/// `?`, where globset with a literal separator and git agree exactly; `None` for any other.
fn simple_glob(p: &Pattern) -> Option<String> {
    let text = std::str::from_utf8(&p.text).ok()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-+@%~:,=/ ".contains(c) || !c.is_ascii();
    if text.is_empty() || text.contains("**") || !text.chars().all(|c| plain(c) || c == '*' || c == '?') {
        return None;
    }
    // git's parse took the leading `/` off an anchored pattern; one without any `/` matches a
    // name at any depth.
    Some(match (p.mode.contains(Mode::NO_SUB_DIR), p.mode.contains(Mode::ABSOLUTE)) {
        (true, false) => format!("**/{text}"),
        _ => text.to_owned(),
    })
}

/// Whether `p` has a bracket expression that never closes, read as git's wildmatch reads one:
/// `!` or `^` may open it, a `]` right after the opening is literal, `[:name:]` is a class.
fn unclosed_bracket(p: &[u8]) -> bool {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' => i += 2,
            b'[' => {
                let mut j = i + 1;
                if matches!(p.get(j), Some(b'!' | b'^')) {
                    j += 1;
                }
                if p.get(j) == Some(&b']') {
                    j += 1;
                }
                loop {
                    match p.get(j) {
                        None => return true,
                        Some(b'\\') => j += 2,
                        Some(b'[') if p.get(j + 1) == Some(&b':') => {
                            j = match p[j + 2..].windows(2).position(|w| w == b":]") {
                                Some(k) => j + 2 + k + 2,
                                None => j + 1,
                            };
                        }
                        Some(b']') => break,
                        Some(_) => j += 1,
                    }
                }
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    false
}

/// Lists on the wire: the master sends each host its own inventory lists with its manifest
/// (`ManifestHeader.exclusions`). Both directions live here, once.
pub mod wire {
    use proto::v1 as pb;

    use crate::PatternList;

    /// A list as the master sends it.
    pub fn to_wire(l: &PatternList) -> pb::ExclusionList {
        pb::ExclusionList {
            source: l.source.clone(),
            patterns: l
                .patterns
                .iter()
                .map(|(line, text)| pb::Pattern { text: text.clone(), line: *line as u32 })
                .collect(),
        }
    }

    /// A list as the host receives it; its source says it came from the master.
    pub fn from_wire(l: &pb::ExclusionList) -> PatternList {
        PatternList {
            source: format!("master: {}", l.source),
            patterns: l.patterns.iter().map(|p| (p.line as usize, p.text.clone())).collect(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_list_keeps_its_patterns_and_lines_across_the_wire() {
            let l = PatternList::parse("hosts.toml: group web", "# keep\n/etc/hostname\n\n!/etc/hosts\n");
            let back = from_wire(&to_wire(&l));
            assert_eq!(back.patterns, l.patterns);
            assert_eq!(back.source, "master: hosts.toml: group web");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(lines: &str) -> Exclusions {
        Exclusions::compile([&PatternList::parse("test", lines)]).unwrap()
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn leading_slash_anchors_at_the_root() {
        let e = ex("/etc/hostname\n");
        assert!(e.is_excluded(&p("etc/hostname"), false));
        assert!(!e.is_excluded(&p("srv/etc/hostname"), false));
    }

    #[test]
    fn a_middle_slash_anchors_too() {
        let e = ex("etc/resolv.conf\n");
        assert!(e.is_excluded(&p("etc/resolv.conf"), false));
        assert!(!e.is_excluded(&p("x/etc/resolv.conf"), false));
    }

    #[test]
    fn a_bare_name_matches_at_any_depth() {
        let e = ex("*.log\n");
        assert!(e.is_excluded(&p("a.log"), false));
        assert!(e.is_excluded(&p("var/log/syslog/a.log"), false));
        assert!(!e.is_excluded(&p("var/log/a.logx"), false));
    }

    #[test]
    fn trailing_slash_matches_directories_only() {
        let e = ex("cache/\n");
        assert!(e.is_excluded(&p("var/cache"), true));
        assert!(!e.is_excluded(&p("var/cache"), false));
        assert!(e.is_excluded(&p("var/cache/apt/x"), false), "the subtree of an excluded dir");
    }

    #[test]
    fn star_does_not_cross_slash_but_double_star_does() {
        let e = ex("/etc/*.conf\n/usr/**/secret\n");
        assert!(e.is_excluded(&p("etc/a.conf"), false));
        assert!(!e.is_excluded(&p("etc/sub/a.conf"), false));
        assert!(e.is_excluded(&p("usr/secret"), false));
        assert!(e.is_excluded(&p("usr/a/b/c/secret"), false));
    }

    #[test]
    fn bang_reincludes_and_last_match_wins() {
        let e = ex("/etc/ssh/ssh_host_*\n!/etc/ssh/ssh_host_ed25519_key.pub\n");
        assert!(e.is_excluded(&p("etc/ssh/ssh_host_rsa_key"), false));
        assert!(!e.is_excluded(&p("etc/ssh/ssh_host_ed25519_key.pub"), false));
        let e = ex("!/etc/x\n/etc/x\n");
        assert!(e.is_excluded(&p("etc/x"), false), "a later rule wins");
    }

    #[test]
    fn nothing_beneath_an_excluded_directory_can_be_reincluded() {
        let e = ex("/etc/network/\n!/etc/network/interfaces\n");
        let v = e.explain(&p("etc/network/interfaces"), false);
        assert!(matches!(v, Verdict::ExcludedParent(ref d, _) if d.to_string() == "etc/network"), "{v}");
    }

    #[test]
    fn comments_blanks_and_escapes() {
        let e = ex("# a comment\n\n\\#hash\n\\!bang\n");
        assert_eq!(e.rules().len(), 2);
        assert!(e.is_excluded(&p("#hash"), false));
        assert!(e.is_excluded(&p("!bang"), false));
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let group = PatternList::parse("group web", "/etc/motd\n");
        let local = PatternList::parse("/etc/syncd/exclude", "!/etc/motd\n");
        let e = Exclusions::compile([&group, &local]).unwrap();
        let v = e.explain(&p("etc/motd"), false);
        assert_eq!(v.to_string(), "not excluded: re-included by /etc/syncd/exclude:1: !/etc/motd");
    }

    #[test]
    fn explain_names_source_line_and_pattern() {
        let e = Exclusions::compile([&PatternList::parse("/etc/syncd/exclude", "# keys\n\n/etc/ssh/ssh_host_*\n")])
            .unwrap();
        let v = e.explain(&p("etc/ssh/ssh_host_rsa_key"), false);
        assert_eq!(v.to_string(), "excluded by /etc/syncd/exclude:3: /etc/ssh/ssh_host_*");
    }

    #[test]
    fn git_forms_globset_got_wrong() {
        // A negated class never matches `/`.
        let e = ex("/etc[!x]*\na[^y]b\n");
        assert!(e.is_excluded(&p("etcd"), false));
        assert!(!e.is_excluded(&p("etc/passwd"), false));
        assert!(!e.is_excluded(&p("deep/a/b"), false));
        // Braces are literal characters, and an unbalanced one is fine.
        let e = ex("/{a,b}\nx}\n");
        assert!(e.is_excluded(&p("{a,b}"), false));
        assert!(!e.is_excluded(&p("a"), false));
        assert!(e.is_excluded(&p("d/x}"), false));
        // POSIX classes.
        let e = ex("/[[:upper:]]*\n/[[:space:]]*\n");
        assert!(e.is_excluded(&p("Makefile"), false));
        assert!(!e.is_excluded(&p("makefile"), false));
        assert!(!e.is_excluded(&p("a]b"), false));
        assert!(e.is_excluded(&p(" lead"), false));
    }

    #[test]
    fn lines_are_read_as_git_reads_them() {
        // A BOM is skipped; a trailing tab is part of the pattern; an escaped trailing space
        // stays (with its backslash, as git keeps it), an unescaped one goes.
        let l = PatternList::parse("x", "\u{feff}/bom\n/tab\t\n/trail\\ \n/plain   \n");
        let texts: Vec<&str> = l.patterns.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["/bom", "/tab\t", "/trail\\ ", "/plain"]);
        let e = Exclusions::compile([&l]).unwrap();
        assert!(e.is_excluded(&p("bom"), false));
        assert!(e.is_excluded(&p("tab\t"), false) && !e.is_excluded(&p("tab"), false));
        assert!(e.is_excluded(&p("trail "), false) && !e.is_excluded(&p("trail"), false));
        assert!(e.is_excluded(&p("plain"), false));
    }

    #[test]
    fn a_list_that_is_not_utf8_is_refused_naming_the_line() {
        let dir = std::env::temp_dir().join(format!("gis-excl-{}", std::process::id()));
        std::fs::write(&dir, b"/ok\n# fine\n/bad\xff\n").unwrap();
        let err = PatternList::read(&dir).unwrap_err().to_string();
        let _ = std::fs::remove_file(&dir);
        assert!(err.contains(":3: the line is not valid UTF-8"), "{err}");
    }

    #[test]
    fn invalid_patterns_name_the_file_line_and_pattern() {
        for bad in ["/etc/[x", "/", "!", "a/../b"] {
            let err =
                Exclusions::compile([&PatternList::parse("/etc/syncd/exclude", &format!("# c\n{bad}\n"))]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("/etc/syncd/exclude:2: invalid exclusion pattern"), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }
}
