//! Exclusion lists: the paths a host keeps to itself.
//!
//! The syntax and semantics are gitignore's, which sysadmins already know:
//! - one pattern per line; blank lines and lines starting with `#` are ignored (`\#` escapes);
//! - a pattern with a `/` at the start or in the middle is anchored at the root; one without
//!   matches a name at any depth;
//! - a trailing `/` matches directories only;
//! - `*`, `?` and `[…]` never match `/`; `**` does (`a/**/b`, `**/x`, `dir/**`);
//! - `!` re-includes (`\!` escapes); the last matching rule wins;
//! - an excluded directory excludes its whole subtree, and nothing beneath it can be re-included.
//!
//! Rules from several sources are concatenated in precedence order, so a later source (a local
//! file) overrides an earlier one (the master's group lists). Every rule remembers where it came
//! from, so [`Exclusions::explain`] can name the source, line and pattern.

use std::fmt;
use std::path::Path;

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
}

/// A compiled, ordered list of rules from any number of sources.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    rules: Vec<Rule>,
    set: GlobSet,
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
    /// Parses the text of an exclusion file: one pattern per line, comments and blanks skipped.
    pub fn parse(source: &str, text: &str) -> PatternList {
        let patterns = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| {
                let l = l.trim_end();
                (!l.is_empty() && !l.starts_with('#')).then(|| (i + 1, l.to_owned()))
            })
            .collect();
        PatternList { source: source.to_owned(), patterns }
    }

    pub fn read(path: &Path) -> Result<PatternList, ExclusionError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ExclusionError::Read { path: path.display().to_string(), source })?;
        Ok(PatternList::parse(&path.display().to_string(), &text))
    }
}

impl Exclusions {
    /// Compiles lists in precedence order (later lists win over earlier ones). Any invalid
    /// pattern fails the whole set: guessing could delete a host's network config.
    pub fn compile<'a>(lists: impl IntoIterator<Item = &'a PatternList>) -> Result<Exclusions, ExclusionError> {
        let mut rules = Vec::new();
        let mut builder = GlobSetBuilder::new();
        for list in lists {
            for (line, text) in &list.patterns {
                let origin = Origin { source: list.source.clone(), line: *line };
                let (rule, glob) = parse_rule(text, origin)?;
                builder.add(glob);
                rules.push(rule);
            }
        }
        let set = builder.build().map_err(|e| ExclusionError::BadPattern {
            origin: Origin { source: "(all lists)".into(), line: 0 },
            pattern: String::new(),
            reason: e.to_string(),
        })?;
        Ok(Exclusions { rules, set })
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
        let hits = self.set.matches(path.as_path());
        let last = hits.into_iter().rev().map(|i| &self.rules[i]).find(|r| is_dir || !r.dir_only);
        match last {
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

fn parse_rule(text: &str, origin: Origin) -> Result<(Rule, globset::Glob), ExclusionError> {
    let bad = |reason: &str| ExclusionError::BadPattern {
        origin: origin.clone(),
        pattern: text.to_owned(),
        reason: reason.to_owned(),
    };
    let negated = text.starts_with('!');
    // `!` negates; a leading backslash escapes a literal `!` or `#`.
    let p = if negated || text.starts_with("\\!") || text.starts_with("\\#") { &text[1..] } else { text };
    let dir_only = p.ends_with('/');
    let p = p.trim_end_matches('/');
    if p.is_empty() {
        return Err(bad("the pattern is empty"));
    }
    if p.contains('\0') {
        return Err(bad("the pattern contains a NUL byte"));
    }
    // A `/` at the start or in the middle anchors the pattern at the root.
    let anchored = p.contains('/');
    let p = p.trim_start_matches('/');
    if p.is_empty() {
        return Err(bad("the pattern matches the root itself; exclude paths beneath it instead"));
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return Err(bad("'.' and '..' components are not allowed"));
    }
    let full = if anchored { p.to_owned() } else { format!("**/{p}") };
    let glob = GlobBuilder::new(&full)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| bad(&e.kind().to_string()))?;
    Ok((Rule { text: text.to_owned(), origin, negated, dir_only }, glob))
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
