//! Trigger definitions from the host's local syncd config. Never from the master: a master
//! must not be able to run commands on hosts.

use std::path::Path;
use std::time::Duration;

use exclusions::{Exclusions, PatternList};
use manifest::RelPath;
use serde::Deserialize;

/// What kind of change a trigger reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A path the host did not have.
    Create,
    /// New content (or, for a symlink or device, a new target or number).
    Content,
    /// Owner, mode, xattrs or mtime only.
    Metadata,
    Delete,
    /// A different kind of entry (file to directory, …). Matched by `content`.
    Type,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Content => "content",
            ChangeKind::Metadata => "metadata",
            ChangeKind::Delete => "delete",
            ChangeKind::Type => "type",
        }
    }
}

/// A trigger as written in the config, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerDef {
    pub name: Option<String>,
    pub watch: Option<Vec<String>>,
    /// Kept loose so that a string instead of an argv list gets a precise error.
    pub run: Option<toml::Value>,
    pub timeout: Option<String>,
    pub on: Option<Vec<String>>,
}

/// A validated trigger.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub watch: Exclusions,
    pub watch_text: Vec<String>,
    pub run: Vec<String>,
    pub timeout: Duration,
    pub on: Vec<ChangeKind>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A bad `[[trigger]]` or `[[health]]` table, named by its kind, its name (or `#N`, its
/// position, when it has none) and the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?}: key `{key}`: {message}")]
pub struct ConfigError {
    /// `trigger` or `health check`.
    pub what: &'static str,
    pub name: String,
    pub key: &'static str,
    pub message: String,
}

impl Trigger {
    /// Whether this trigger watches `path` for a change of `kind`.
    pub fn matches(&self, path: &RelPath, is_dir: bool, kind: ChangeKind) -> bool {
        let kind = if kind == ChangeKind::Type { ChangeKind::Content } else { kind };
        self.on.contains(&kind) && self.watch.is_excluded(path, is_dir)
    }
}

/// Validates trigger definitions, in config order. `source` names the config file in errors.
pub fn validate(defs: &[TriggerDef], source: &str) -> Result<Vec<Trigger>, ConfigError> {
    let mut out: Vec<Trigger> = Vec::new();
    for (i, d) in defs.iter().enumerate() {
        let label = d.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
        let err = |key, message: String| ConfigError { what: "trigger", name: label.clone(), key, message };
        let name = check_name(&d.name, out.iter().map(|t| t.name.as_str()), "trigger").map_err(|m| err("name", m))?;
        let watch_text = d
            .watch
            .clone()
            .filter(|w| !w.is_empty())
            .ok_or_else(|| err("watch", "must list at least one pattern".into()))?;
        let list = PatternList {
            source: format!("{source} trigger {name:?} watch"),
            patterns: watch_text.iter().enumerate().map(|(i, p)| (i + 1, p.clone())).collect(),
        };
        let watch = Exclusions::compile([&list]).map_err(|e| err("watch", e.to_string()))?;
        let run = check_run(&d.run, "[\"systemctl\", \"reload\", \"ssh\"]").map_err(|m| err("run", m))?;
        let timeout = check_timeout(&d.timeout).map_err(|m| err("timeout", m))?;
        let on = match &d.on {
            None => vec![ChangeKind::Create, ChangeKind::Content, ChangeKind::Metadata, ChangeKind::Delete],
            Some(list) if list.is_empty() => {
                return Err(err("on", "must name at least one of content, metadata, create, delete".into()))
            }
            Some(list) => list
                .iter()
                .map(|s| match s.as_str() {
                    "create" => Ok(ChangeKind::Create),
                    "content" => Ok(ChangeKind::Content),
                    "metadata" => Ok(ChangeKind::Metadata),
                    "delete" => Ok(ChangeKind::Delete),
                    other => Err(err(
                        "on",
                        format!("unknown change kind {other:?} (expected content, metadata, create, delete)"),
                    )),
                })
                .collect::<Result<_, _>>()?,
        };
        out.push(Trigger { name, watch, watch_text, run, timeout, on });
    }
    Ok(out)
}

/// A table's `name`: present, not blank, and not used by an earlier table of its kind
/// (`earlier`). Shared by `[[trigger]]` and `[[health]]`.
pub(crate) fn check_name<'a>(
    name: &Option<String>,
    mut earlier: impl Iterator<Item = &'a str>,
    what: &str,
) -> Result<String, String> {
    let name = name.clone().filter(|n| !n.trim().is_empty()).ok_or_else(|| "is missing or empty".to_owned())?;
    if earlier.any(|n| n == name) {
        return Err(format!("is used by an earlier {what}; names must be unique"));
    }
    Ok(name)
}

/// A table's `run`: a non-empty argv list of strings whose command can be found. It is kept
/// as a loose TOML value until here so that a string (which a reader may expect a shell to
/// split) gets this precise error rather than serde's generic one. `example` is an argv for
/// the hint.
pub(crate) fn check_run(run: &Option<toml::Value>, example: &str) -> Result<Vec<String>, String> {
    let run = match run {
        None => return Err(format!("is missing (hint: run = {example})")),
        Some(toml::Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "every element of the argv list must be a string".to_owned())?,
        Some(_) => return Err(
            "must be a non-empty argv list, not a string: there is no implicit shell (hint: [\"sh\", \"-c\", \"...\"])"
                .into(),
        ),
    };
    if find_command(&run[0]).is_none() {
        return Err(format!("command {:?} is not an executable file or on PATH", run[0]));
    }
    Ok(run)
}

/// A table's `timeout`: a duration above zero, [`DEFAULT_TIMEOUT`] when not given.
pub(crate) fn check_timeout(timeout: &Option<String>) -> Result<Duration, String> {
    match timeout {
        None => Ok(DEFAULT_TIMEOUT),
        Some(t) => match manifest::units::parse_duration(t)? {
            d if d.is_zero() => Err("must be greater than zero".into()),
            d => Ok(d),
        },
    }
}

/// Resolves a command like `execvp` would.
pub fn find_command(cmd: &str) -> Option<std::path::PathBuf> {
    let is_exec = |p: &Path| {
        rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok() && p.metadata().is_ok_and(|m| m.is_file())
    };
    if cmd.contains('/') {
        let p = Path::new(cmd);
        return is_exec(p).then(|| p.to_owned());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| is_exec(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<Trigger>, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            trigger: Vec<TriggerDef>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        validate(&f.trigger, "syncd.toml")
    }

    #[test]
    fn a_full_trigger_parses_with_defaults() {
        let t = parse("[[trigger]]\nname = \"ssh\"\nwatch = [\"/etc/ssh/**\"]\nrun = [\"true\"]\n").unwrap();
        assert_eq!(t[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(t[0].on.len(), 4);
        let p = RelPath::new("etc/ssh/sshd_config").unwrap();
        assert!(t[0].matches(&p, false, ChangeKind::Content));
        assert!(t[0].matches(&p, false, ChangeKind::Type));
        assert!(!t[0].matches(&RelPath::new("etc/passwd").unwrap(), false, ChangeKind::Content));
    }

    #[test]
    fn on_limits_the_change_kinds() {
        let t = parse(
            "[[trigger]]\nname = \"x\"\nwatch = [\"*.conf\"]\nrun = [\"true\"]\non = [\"delete\"]\ntimeout = \"2s\"\n",
        )
        .unwrap();
        let p = RelPath::new("a.conf").unwrap();
        assert!(t[0].matches(&p, false, ChangeKind::Delete));
        assert!(!t[0].matches(&p, false, ChangeKind::Content));
        assert_eq!(t[0].timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_input_names_the_trigger_and_the_key() {
        let cases = [
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x\"]\nrun = \"systemctl reload ssh\"\n", "trigger \"a\": key `run`: must be a non-empty argv list"),
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x[\"]\nrun = [\"true\"]\n", "trigger \"a\": key `watch`:"),
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x\"]\nrun = [\"no-such-command-gis\"]\n", "trigger \"a\": key `run`: command \"no-such-command-gis\""),
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x\"]\nrun = [\"true\"]\n[[trigger]]\nname = \"a\"\nwatch = [\"/y\"]\nrun = [\"true\"]\n", "trigger \"a\": key `name`: is used by an earlier trigger"),
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x\"]\nrun = [\"true\"]\ntimeout = \"soon\"\n", "trigger \"a\": key `timeout`"),
            ("[[trigger]]\nname = \"a\"\nwatch = [\"/x\"]\nrun = [\"true\"]\non = [\"touch\"]\n", "trigger \"a\": key `on`: unknown change kind \"touch\""),
            ("[[trigger]]\nwatch = [\"/x\"]\nrun = [\"true\"]\n", "trigger \"#1\": key `name`"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}\n  wanted: {want}");
        }
    }
}
