//! The host inventory (`--hosts FILE`): groups with exclusion lists, and hosts that belong to
//! groups and may have a list of their own. Like netbox config contexts, a host's effective
//! configuration is its groups' in order, then its own.
//!
//! ```toml
//! [groups.base]
//! exclude = ["/etc/hostname", "/etc/resolv.conf", "/etc/ssh/ssh_host_*"]
//!
//! [hosts.web01]
//! groups = ["base"]
//! exclude = ["/srv/local/"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use exclusions::{Exclusions, PatternList};

use crate::policy;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    groups: BTreeMap<String, GroupDef>,
    #[serde(default)]
    hosts: BTreeMap<String, HostDef>,
    rollout: Option<Spanned<policy::RolloutDef>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupDef {
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDef {
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
}

/// A validated inventory: every host's effective exclusion lists, resolved at load time.
#[derive(Debug, Default)]
pub struct Inventory {
    hosts: BTreeMap<String, Vec<PatternList>>,
    /// `[rollout]`, validated against the hosts and groups; `None` without the table.
    pub policy: Option<policy::Policy>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error(
        "{path}:{line}: host {host} names unknown group {group:?} (hint: define [groups.{group}] or fix the name)"
    )]
    UnknownGroup { path: String, line: usize, host: String, group: String },
    /// A refusal of `[rollout]`: the message names the key and the value.
    #[error("{path}:{line}: {message}")]
    Policy { path: String, line: usize, message: String },
    #[error(transparent)]
    Pattern(#[from] exclusions::ExclusionError),
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: shown.clone(), source })?;
        Inventory::parse(&shown, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Inventory, InventoryError> {
        let file: File = toml::from_str(text)
            .map_err(|e| InventoryError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let list = |source: String, pats: &[Spanned<String>]| PatternList {
            source,
            patterns: pats.iter().map(|p| (line_of(p.span()), p.get_ref().clone())).collect(),
        };
        let groups: BTreeMap<&String, PatternList> =
            file.groups.iter().map(|(name, g)| (name, list(format!("{path} [groups.{name}]"), &g.exclude))).collect();
        // Every list must compile on its own, so a bad pattern is reported at start-up with its
        // line, not when some host first connects.
        for l in groups.values() {
            Exclusions::compile([l])?;
        }
        let mut hosts = BTreeMap::new();
        for (name, h) in &file.hosts {
            let mut lists = Vec::new();
            for g in &h.groups {
                let group = groups.get(g.get_ref()).ok_or_else(|| InventoryError::UnknownGroup {
                    path: path.to_owned(),
                    line: line_of(g.span()),
                    host: name.clone(),
                    group: g.get_ref().clone(),
                })?;
                lists.push(group.clone());
            }
            let own = list(format!("{path} [hosts.{name}]"), &h.exclude);
            Exclusions::compile([&own])?;
            lists.push(own);
            lists.retain(|l| !l.patterns.is_empty());
            hosts.insert(name.clone(), lists);
        }
        let policy = match &file.rollout {
            None => None,
            Some(r) => {
                let names: Vec<String> = file.hosts.keys().cloned().collect();
                let mut members: BTreeMap<String, Vec<String>> =
                    file.groups.keys().map(|g| (g.clone(), Vec::new())).collect();
                // Hosts in name order, so each group's members are too.
                for (name, h) in &file.hosts {
                    for g in &h.groups {
                        let m = members.get_mut(g.get_ref()).expect("groups were checked above");
                        if !m.contains(name) {
                            m.push(name.clone());
                        }
                    }
                }
                let members = policy::Members { hosts: &names, groups: &members };
                let p = policy::build(path, r.get_ref(), r.span(), &line_of, &members)
                    .map_err(|e| InventoryError::Policy { path: path.to_owned(), line: e.line, message: e.message })?;
                Some(p)
            }
        };
        Ok(Inventory { hosts, policy })
    }

    /// The exclusion lists the master sends `host`, in precedence order. A host the inventory
    /// does not name gets none.
    pub fn lists_for(&self, host: &str) -> &[PatternList] {
        self.hosts.get(host).map_or(&[], Vec::as_slice)
    }

    /// Every host name, sorted.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INV: &str = r#"
[groups.base]
exclude = ["/etc/hostname", "/etc/resolv.conf"]

[groups.web]
exclude = [
  "/etc/nginx/sites-enabled/",
]

[hosts.web01]
groups = ["base", "web"]
exclude = ["!/etc/resolv.conf"]

[hosts.db01]
groups = ["base"]
"#;

    #[test]
    fn effective_lists_are_groups_in_order_then_the_host() {
        let inv = Inventory::parse("hosts.toml", INV).unwrap();
        let l = inv.lists_for("web01");
        let sources: Vec<&str> = l.iter().map(|l| l.source.as_str()).collect();
        assert_eq!(sources, ["hosts.toml [groups.base]", "hosts.toml [groups.web]", "hosts.toml [hosts.web01]"]);
        assert_eq!(l[1].patterns, [(7, "/etc/nginx/sites-enabled/".to_owned())]);
        assert_eq!(inv.lists_for("db01").len(), 1);
        assert!(inv.lists_for("stranger").is_empty());
    }

    #[test]
    fn a_host_reads_only_its_own_lists() {
        let inv = Inventory::parse("hosts.toml", INV).unwrap();
        assert!(!inv.lists_for("db01").iter().any(|l| l.source.contains("web")));
    }

    #[test]
    fn unknown_group_names_file_line_host_and_group() {
        let err = Inventory::parse("hosts.toml", "[hosts.a]\ngroups = [\"nope\"]\n").unwrap_err().to_string();
        assert!(err.starts_with("hosts.toml:2: host a names unknown group \"nope\""), "{err}");
    }

    #[test]
    fn bad_pattern_names_its_line() {
        let err = Inventory::parse("hosts.toml", "[groups.g]\nexclude = [\n \"/ok\",\n \"/etc/[bad\",\n]\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("hosts.toml [groups.g]:4: invalid exclusion pattern \"/etc/[bad\""), "{err}");
    }

    #[test]
    fn the_shipped_example_inventory_is_valid() {
        let inv = Inventory::parse("contrib/hosts.toml", include_str!("../../contrib/hosts.toml")).unwrap();
        assert_eq!(inv.host_count(), 6);
        assert_eq!(inv.hosts(), ["db01", "db02", "web01", "web02", "web03", "web04"]);
        let p = inv.policy.as_ref().expect("the example has a rollout policy");
        assert_eq!(p.source, "contrib/hosts.toml");
        assert_eq!((p.timeout, p.max_failures, p.window.as_ref()), (std::time::Duration::from_secs(1800), 1, None));
        let names: Vec<&str> = p.waves.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["canary", "early", "rest"]);
        let sizes: Vec<usize> = p.assign(&inv.hosts(), 1).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 2, 3]);
    }

    #[test]
    fn an_inventory_without_rollout_has_no_policy() {
        assert!(Inventory::parse("hosts.toml", INV).unwrap().policy.is_none());
    }

    #[test]
    fn rollout_refusals_use_the_inventory_error_style() {
        let text = format!("{INV}\n[[rollout.wave]]\nname = \"early\"\npercent = 150\n");
        let err = Inventory::parse("hosts.toml", &text).unwrap_err();
        assert!(matches!(err, InventoryError::Policy { line: 19, .. }), "{err:?}");
        assert!(
            err.to_string().starts_with("hosts.toml:19: wave \"early\": percent 150 is outside 0-100 (hint: "),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Inventory::parse("hosts.toml", "[groups.g]\nexclud = []\n").unwrap_err().to_string();
        assert!(err.contains("exclud"), "{err}");
    }
}
