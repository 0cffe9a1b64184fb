//! The host inventory (`--hosts FILE`): groups with exclusion lists and context data, and hosts
//! that belong to groups and may have a list and data of their own. Like NetBox config
//! contexts, a host's effective configuration is everyone's (`[vars]`), then its groups' in
//! order, then its own.
//!
//! ```toml
//! [vars]
//! dns = { servers = ["10.0.0.53"] }
//!
//! [groups.base]
//! exclude = ["/etc/resolv.conf", "/etc/ssh/ssh_host_*"]
//! vars = { ntp = "ntp.example.net" }
//!
//! [hosts.web01]
//! groups = ["base"]
//! exclude = ["/srv/local/"]
//! vars = { ip = "10.0.1.11" }
//! ```
//!
//! Tables merge key by key, deeper tables too; any other value (a string, a number, an array)
//! set by a later level replaces the earlier one. `[render]` and `[templates]` say which files
//! of the image are rendered per host from this data ([`crate::render`]).

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
    vars: toml::Table,
    #[serde(default)]
    groups: BTreeMap<String, GroupDef>,
    #[serde(default)]
    hosts: BTreeMap<String, HostDef>,
    rollout: Option<Spanned<policy::RolloutDef>>,
    render: Option<RenderDef>,
    #[serde(default)]
    templates: BTreeMap<String, Spanned<TemplateDef>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupDef {
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    vars: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDef {
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    vars: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RenderDef {
    /// A directory of the image: each `NAME.j2` file beneath it renders the path `/NAME`.
    templates_dir: Option<String>,
}

/// `[templates."/etc/hosts"]`: one rendered path, its template and what the render gets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateDef {
    /// The template's path in the image; optional for a path whose template is in
    /// `templates_dir` (this table then only sets options).
    pub source: Option<String>,
    /// Octal permission bits of the rendered file (default: the template file's).
    pub mode: Option<String>,
    /// Owner and group ids of the rendered file (default: the template file's).
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// The rendered file's xattrs, name → value (default: the template file's); set, they
    /// replace the template's all together (`{}` for none).
    pub xattrs: Option<BTreeMap<String, String>>,
    /// A command run on the master on each render before it is served; `%s` is the rendered
    /// file's path (in a temp dir). A non-zero exit refuses the render for that host.
    #[serde(default)]
    pub validate: Vec<String>,
    /// Serve a render under half the size of the host's previous one (refused by default).
    #[serde(default)]
    pub allow_shrink: bool,
}

/// One host's context data: the merged table, and for every key (dotted, leaves only) the
/// level that set it.
#[derive(Debug, Default, Clone)]
pub struct HostVars {
    pub vars: toml::Table,
    pub sources: BTreeMap<String, String>,
}

/// One host as the inventory resolves it.
#[derive(Debug, Default)]
struct HostEntry {
    groups: Vec<String>,
    lists: Vec<PatternList>,
    vars: HostVars,
}

/// What the inventory says is rendered: `[render]` and `[templates]`, with the line of each
/// template's table.
#[derive(Debug, Default, Clone)]
pub struct RenderConfig {
    pub templates_dir: Option<String>,
    /// Target path (as written, absolute) → its table and the table's line.
    pub templates: BTreeMap<String, (TemplateDef, usize)>,
}

/// A validated inventory: every host's effective exclusion lists and context data, resolved
/// at load time.
#[derive(Debug, Default)]
pub struct Inventory {
    /// The file it was read from, as shown in messages.
    pub path: String,
    hosts: BTreeMap<String, HostEntry>,
    /// `[rollout]`, validated against the hosts and groups; `None` without the table.
    pub policy: Option<policy::Policy>,
    pub render: RenderConfig,
}

/// A key no level of `vars` may set: templates get the host's name and groups under it.
pub const RESERVED_VAR: &str = "host";

/// Merges `over` into `into`, key by key (tables recursively; anything else replaces), and
/// records `source` for every leaf `over` sets, under its dotted key below `prefix`.
fn merge(
    into: &mut toml::Table,
    over: &toml::Table,
    source: &str,
    prefix: &str,
    sources: &mut BTreeMap<String, String>,
) {
    for (k, v) in over {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => merge(mine, theirs, source, &key, sources),
            _ => {
                // A replaced table's leaves are gone: so are their sources.
                let below = format!("{key}.");
                sources.retain(|s, _| !s.starts_with(&below));
                into.insert(k.clone(), v.clone());
                record(v, source, &key, sources);
            }
        }
    }
}

fn record(v: &toml::Value, source: &str, key: &str, sources: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) if !t.is_empty() => {
            for (k, v) in t {
                record(v, source, &format!("{key}.{k}"), sources);
            }
        }
        _ => {
            sources.insert(key.to_owned(), source.to_owned());
        }
    }
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
    /// Context data or a template table that cannot be used.
    #[error("{path}:{line}: {message}")]
    Render { path: String, line: usize, message: String },
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
        // The line a table header `[NAME]` (or `NAME = {`) is on, for messages about it.
        let line_named =
            |needle: &str| text.lines().position(|l| l.trim_start().starts_with(needle)).map_or(1, |i| i + 1);
        let reserved = |t: &toml::Table, level: &str, needle: String| -> Result<(), InventoryError> {
            match t.contains_key(RESERVED_VAR) {
                true => Err(InventoryError::Render {
                    path: path.to_owned(),
                    line: line_named(&needle),
                    message: format!(
                        "{level} sets {RESERVED_VAR:?}, which is reserved: templates get the host's name and groups as host.name and host.groups (hint: rename the key)"
                    ),
                }),
                false => Ok(()),
            }
        };
        reserved(&file.vars, "[vars]", "[vars]".into())?;
        for (name, g) in &file.groups {
            reserved(&g.vars, &format!("[groups.{name}.vars]"), format!("[groups.{name}"))?;
        }
        for (name, h) in &file.hosts {
            reserved(&h.vars, &format!("[hosts.{name}.vars]"), format!("[hosts.{name}"))?;
        }
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
            let mut vars = HostVars::default();
            merge(&mut vars.vars, &file.vars, "[vars]", "", &mut vars.sources);
            for g in &h.groups {
                let group = groups.get(g.get_ref()).ok_or_else(|| InventoryError::UnknownGroup {
                    path: path.to_owned(),
                    line: line_of(g.span()),
                    host: name.clone(),
                    group: g.get_ref().clone(),
                })?;
                lists.push(group.clone());
                let gvars = &file.groups[g.get_ref()].vars;
                merge(&mut vars.vars, gvars, &format!("[groups.{}.vars]", g.get_ref()), "", &mut vars.sources);
            }
            merge(&mut vars.vars, &h.vars, &format!("[hosts.{name}.vars]"), "", &mut vars.sources);
            let own = list(format!("{path} [hosts.{name}]"), &h.exclude);
            Exclusions::compile([&own])?;
            lists.push(own);
            lists.retain(|l| !l.patterns.is_empty());
            let groups = h.groups.iter().map(|g| g.get_ref().clone()).collect();
            hosts.insert(name.clone(), HostEntry { groups, lists, vars });
        }
        let mut render = RenderConfig {
            templates_dir: file.render.as_ref().and_then(|r| r.templates_dir.clone()),
            templates: BTreeMap::new(),
        };
        for (target, def) in &file.templates {
            let line = line_of(def.span());
            let bad = |message: String| InventoryError::Render { path: path.to_owned(), line, message };
            let def = def.get_ref().clone();
            if let Some(m) = &def.mode {
                match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                    Ok(bits) if bits <= 0o7777 => {}
                    _ => {
                        return Err(bad(format!(
                            "[templates.{target:?}]: mode {m:?} is not octal permission bits (hint: \"0644\")"
                        )))
                    }
                }
            }
            if let Some(bad_name) = def.xattrs.iter().flatten().map(|(k, _)| k).find(|k| {
                !(k.starts_with("user.") || k.starts_with("security.") || k.starts_with("trusted.")) || k.len() > 255
            }) {
                return Err(bad(format!(
                    "[templates.{target:?}]: xattr {bad_name:?} is not a user., security. or trusted. name of at most 255 bytes"
                )));
            }
            if def.source.is_none() && render.templates_dir.is_none() {
                return Err(bad(format!(
                    "[templates.{target:?}] names no source, and there is no [render] templates_dir to find it in (hint: source = \"/path/in/the/image.j2\")"
                )));
            }
            if !def.validate.is_empty() && !def.validate.iter().any(|a| a.contains("%s")) {
                return Err(bad(format!(
                    "[templates.{target:?}]: validate {:?} never names the file (hint: put %s where the rendered file's path goes)",
                    def.validate
                )));
            }
            render.templates.insert(target.clone(), (def, line));
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
        Ok(Inventory { path: path.to_owned(), hosts, policy, render })
    }

    /// The exclusion lists the master sends `host`, in precedence order. A host the inventory
    /// does not name gets none.
    pub fn lists_for(&self, host: &str) -> &[PatternList] {
        self.hosts.get(host).map_or(&[], |h| h.lists.as_slice())
    }

    /// `host`'s context data, merged, with where each key came from; `None` for a host the
    /// inventory does not name.
    pub fn vars_for(&self, host: &str) -> Option<&HostVars> {
        self.hosts.get(host).map(|h| &h.vars)
    }

    /// `host`'s groups, in its order.
    pub fn groups_of(&self, host: &str) -> &[String] {
        self.hosts.get(host).map_or(&[], |h| h.groups.as_slice())
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

    const VARS: &str = r#"
[vars]
domain = "example.net"
dns = { servers = ["10.0.0.53"], search = "example.net" }
sshd = { port = 22 }

[groups.base]
vars = { ntp = "ntp.example.net", sshd = { port = 2222, permit_root = "no" } }

[groups.web]
[groups.web.vars]
dns = { servers = ["10.1.0.53", "10.1.0.54"] }
sshd = { permit_root = "prohibit-password" }

[hosts.web01]
groups = ["base", "web"]
vars = { ip = "10.0.1.11", sshd = { port = 2200 } }

[hosts.web02]
groups = ["web", "base"]
"#;

    #[test]
    fn vars_merge_like_netbox_config_contexts_and_name_their_source() {
        let inv = Inventory::parse("hosts.toml", VARS).unwrap();
        let v = inv.vars_for("web01").unwrap();
        let get = |k: &str| {
            let mut t = &v.vars;
            let parts: Vec<&str> = k.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                t = t[*p].as_table().unwrap();
            }
            t[parts[parts.len() - 1]].clone()
        };
        // Deeper tables merge key by key; arrays and scalars are replaced by later levels.
        assert_eq!(get("dns.servers"), toml::Value::Array(vec!["10.1.0.53".into(), "10.1.0.54".into()]));
        assert_eq!(get("dns.search").as_str(), Some("example.net"));
        assert_eq!(get("sshd.port").as_integer(), Some(2200));
        assert_eq!(get("sshd.permit_root").as_str(), Some("prohibit-password"));
        assert_eq!(v.sources["dns.servers"], "[groups.web.vars]");
        assert_eq!(v.sources["dns.search"], "[vars]");
        assert_eq!(v.sources["sshd.port"], "[hosts.web01.vars]");
        assert_eq!(v.sources["sshd.permit_root"], "[groups.web.vars]");
        assert_eq!(v.sources["ntp"], "[groups.base.vars]");
        assert_eq!(v.sources["ip"], "[hosts.web01.vars]");
        assert_eq!(v.sources.len(), 7, "{:?}", v.sources);
        // Groups in the host's order: web02 lists base last, so base's permit_root wins.
        let w2 = inv.vars_for("web02").unwrap();
        assert_eq!(w2.sources["sshd.permit_root"], "[groups.base.vars]");
        assert_eq!(w2.sources["sshd.port"], "[groups.base.vars]");
        assert_eq!(inv.groups_of("web02"), ["web", "base"]);
        assert!(inv.vars_for("stranger").is_none());
    }

    #[test]
    fn the_reserved_host_key_and_bad_template_tables_are_refused_with_their_line() {
        let e = Inventory::parse("hosts.toml", "[hosts.a]\nvars = { host = \"x\" }\n").unwrap_err().to_string();
        assert!(e.starts_with("hosts.toml:1: [hosts.a.vars] sets \"host\", which is reserved"), "{e}");
        let e =
            Inventory::parse("hosts.toml", "\n[templates.\"/etc/hosts\"]\nmode = \"0644\"\n").unwrap_err().to_string();
        assert!(e.starts_with("hosts.toml:2: [templates.\"/etc/hosts\"] names no source"), "{e}");
        let e = Inventory::parse("hosts.toml", "[templates.\"/etc/x\"]\nsource = \"/t.j2\"\nmode = \"rw\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode \"rw\" is not octal"), "{e}");
        let e = Inventory::parse("hosts.toml", "[templates.\"/etc/x\"]\nsource = \"/t.j2\"\nvalidate = [\"true\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never names the file"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Inventory::parse("hosts.toml", "[groups.g]\nexclud = []\n").unwrap_err().to_string();
        assert!(err.contains("exclud"), "{err}");
    }
}
