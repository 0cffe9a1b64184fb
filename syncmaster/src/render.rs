//! Per-host files rendered from the inventory's context data (README, Per-host files).
//!
//! A template is a regular file of the image: each `NAME.j2` beneath `[render] templates_dir`
//! renders the path `/NAME`, and `[templates."/PATH"]` names one anywhere in the image (or sets
//! options for one in the directory). It is rendered for each host with minijinja, undefined
//! variables being errors, from the host's merged `vars` plus `host.name` and `host.groups`.
//!
//! What a host is served is the image's manifest with each rendered file laid over it
//! ([`manifest::Manifest::overlay`]): an ordinary regular file whose entry (hash, size, owner,
//! mode, xattrs, mtime) comes from the render and the template file's metadata, overridden by
//! the inventory. The entries travel in the manifest header; the identity the master signs is
//! that of the image with them in place, and the signature binds the host's name and the render
//! serial ([`manifest::trust::RenderBinding`]). The content is served by hash like any object,
//! from memory, and never uploaded to the object store.
//!
//! Guards: a template that does not compile, a target outside the root, not a plain file in
//! the image or without its parent directory, and two templates for one path refuse the image
//! (at start, or its publish). For one host, a missing variable, a target the host's exclusion
//! lists exclude, a `validate` command that fails, or a render under half the size of the one
//! served before (without `allow_shrink`) refuse that host's manifest: its pass fails, naming
//! the template, the line and the key, and it keeps its files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use manifest::{Entry, Hash, Kind, RelPath};

use crate::image::Image;
use crate::inventory::{HostVars, Inventory, RenderConfig, TemplateDef};

/// How long a `validate` command may run.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);
/// A render is "much smaller" than the one served before below this fraction of its size …
const SHRINK_FRACTION: u64 = 2;
/// … if that one had at least this many bytes (a tiny file may halve for good reasons).
const SHRINK_MIN: u64 = 64;

// --- `syncmaster vars` --------------------------------------------------------------------

/// Every leaf of `t`, dotted, in key order.
fn leaves<'a>(t: &'a toml::Table, prefix: &str, out: &mut Vec<(String, &'a toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(inner) if !inner.is_empty() => leaves(inner, &key, out),
            _ => out.push((key, v)),
        }
    }
}

/// `syncmaster vars HOST`: one `key = value  # source` line per leaf.
pub fn vars_text(host: &str, groups: &[String], v: &HostVars) -> String {
    let mut out = format!("# {host}: groups {}\n", if groups.is_empty() { "(none)".into() } else { groups.join(", ") });
    let mut all = Vec::new();
    leaves(&v.vars, "", &mut all);
    let width = all.iter().map(|(k, val)| k.len() + val.to_string().len() + 3).max().unwrap_or(0).min(72);
    for (k, val) in all {
        let line = format!("{k} = {val}");
        let src = v.sources.get(&k).map_or("?", String::as_str);
        out.push_str(&format!("{line:<width$}  # {src}\n"));
    }
    out
}

/// `syncmaster vars HOST --format json`: the merged table and each leaf's source.
pub fn vars_json(host: &str, groups: &[String], v: &HostVars) -> String {
    serde_json::json!({ "host": host, "groups": groups, "vars": v.vars, "sources": v.sources }).to_string()
}

// --- Errors --------------------------------------------------------------------------------

/// Why templates, or one host's render, cannot be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    /// The image's templates cannot be used (for any host): `file` is the template or the
    /// inventory, `line` its line.
    #[error("{file}:{line}: {message}")]
    Template { file: String, line: usize, message: String },
    /// One host's render failed.
    #[error("host {host}: template {template}:{line}: {message}")]
    Host { host: String, template: String, line: usize, message: String },
}

// --- Templates of one image ----------------------------------------------------------------

/// One template: where it renders, its file in the image, and its options.
struct Template {
    target: RelPath,
    /// The template's path in the image, as shown (`/usr/share/…/hosts.j2`).
    shown: String,
    /// The template file's entry: the rendered file's metadata unless the inventory sets it.
    entry: Entry,
    def: TemplateDef,
}

/// The compiled templates of one image.
pub struct Templates {
    env: minijinja::Environment<'static>,
    list: Vec<Template>,
}

impl Templates {
    /// Finds and compiles every template of `image` that `cfg` names. `inventory` is the
    /// inventory's path, for messages.
    pub fn load(image: &Image, cfg: &RenderConfig, inventory: &str) -> Result<Templates, RenderError> {
        let m = &image.manifest;
        let refuse =
            |file: &str, line: usize, message: String| RenderError::Template { file: file.into(), line, message };
        // Target (absolute, as written) → (template path in the image, where it was named, line).
        let mut found: BTreeMap<String, (RelPath, String, usize)> = BTreeMap::new();
        if let Some(dir) = &cfg.templates_dir {
            let line = 1;
            let rel = RelPath::new(dir.trim_start_matches('/')).map_err(|e| {
                refuse(inventory, line, format!("[render] templates_dir {dir:?} is not a path beneath the root: {e}"))
            })?;
            match m.get(&rel) {
                Some(e) if e.kind == Kind::Dir => {}
                _ => {
                    return Err(refuse(
                        inventory,
                        line,
                        format!("[render] templates_dir {dir:?} is not a directory in image v{}", m.version),
                    ))
                }
            }
            let prefix = format!("{rel}/");
            for e in m.entries.iter().filter(|e| e.path.is_within(&rel) && e.path != rel) {
                let path = e.path.to_string();
                let Some(name) = path.strip_prefix(&prefix).and_then(|n| n.strip_suffix(".j2")) else { continue };
                if e.kind != Kind::File || name.is_empty() {
                    continue;
                }
                found.insert(format!("/{name}"), (e.path.clone(), format!("[render] templates_dir {dir:?}"), line));
            }
        }
        for (target, (def, line)) in &cfg.templates {
            let named = format!("[templates.{target:?}] ({inventory}:{line})");
            match (&def.source, found.get(target)) {
                (Some(src), Some((other, how, _))) if other.to_string() != src.trim_start_matches('/') => {
                    return Err(refuse(
                        inventory,
                        *line,
                        format!("two templates for {target}: /{other} from {how}, and {src} from {named} (hint: drop one)"),
                    ));
                }
                (Some(src), _) => {
                    let rel = RelPath::new(src.trim_start_matches('/')).map_err(|e| {
                        refuse(inventory, *line, format!("{named}: source {src:?} is not a path beneath the root: {e}"))
                    })?;
                    found.insert(target.clone(), (rel, named, *line));
                }
                (None, Some(_)) => {}
                (None, None) => {
                    return Err(refuse(
                        inventory,
                        *line,
                        format!("{named} names no source, and templates_dir has no template for {target} (hint: add {}.j2 there, or source = \"…\")", target.trim_start_matches('/')),
                    ))
                }
            }
        }
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        // A config file's last newline is kept (Jinja drops it by default).
        env.set_keep_trailing_newline(true);
        let mut list = Vec::new();
        for (target, (src, named, line)) in found {
            let shown = format!("/{src}");
            if !target.starts_with('/') {
                return Err(refuse(inventory, line, format!("{named}: target {target:?} must be an absolute path")));
            }
            let rel = RelPath::new(target.trim_start_matches('/')).map_err(|e| {
                refuse(inventory, line, format!("{named}: target {target:?} is not a path beneath the root: {e}"))
            })?;
            if let Some(parent) = rel.parent() {
                if !m.get(&parent).is_some_and(|e| e.kind == Kind::Dir) {
                    return Err(refuse(
                        inventory,
                        line,
                        format!("{named}: image v{} has no directory /{parent} to render {target} into", m.version),
                    ));
                }
            }
            if let Some(e) = m.get(&rel) {
                if e.kind != Kind::File || e.link_group != 0 {
                    return Err(refuse(
                        inventory,
                        line,
                        format!("{named}: {target} is not a plain regular file in image v{} (a directory, a link or a hard-linked file cannot be rendered)", m.version),
                    ));
                }
            }
            let entry = match m.get(&src) {
                Some(e) if e.kind == Kind::File => e.clone(),
                _ => {
                    return Err(refuse(
                        inventory,
                        line,
                        format!("{named}: template {shown} is not a regular file in image v{}", m.version),
                    ))
                }
            };
            let text = read_template(&image.root, &src, &entry).map_err(|e| refuse(&shown, 1, e))?;
            env.add_template_owned(shown.clone(), text).map_err(|e| {
                refuse(&shown, e.line().unwrap_or(1), e.detail().map_or_else(|| e.kind().to_string(), str::to_owned))
            })?;
            let def = cfg.templates.get(&target).map(|(d, _)| d.clone()).unwrap_or_default();
            list.push(Template { target: rel, shown, entry, def });
        }
        Ok(Templates { env, list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Renders every template for `host`: the files, sorted by path.
    pub fn render_host(&self, inv: &Inventory, host: &str) -> Result<Vec<Rendered>, RenderError> {
        let vars = inv.vars_for(host).cloned().unwrap_or_default();
        let groups = inv.groups_of(host).to_vec();
        let mut ctx: BTreeMap<String, minijinja::Value> =
            vars.vars.iter().map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v))).collect();
        ctx.insert(
            crate::inventory::RESERVED_VAR.into(),
            minijinja::context! { name => host, groups => groups.clone() },
        );
        let rules = exclusions::Exclusions::compile(inv.lists_for(host)).ok();
        let mut out = Vec::new();
        for t in &self.list {
            let fail = |line: usize, message: String| RenderError::Host {
                host: host.into(),
                template: t.shown.clone(),
                line,
                message,
            };
            if let Some(r) = &rules {
                if r.is_excluded(&t.target, false) {
                    return Err(fail(1, format!("it renders /{}, which this host's exclusion lists exclude (hint: drop the exclusion, or the template)", t.target)));
                }
            }
            let tmpl = self.env.get_template(&t.shown).expect("added at load");
            let text = tmpl.render(&ctx).map_err(|e| {
                let line = e.line().unwrap_or(1);
                let message = match e.kind() {
                    minijinja::ErrorKind::UndefinedError => match missing_var(&tmpl, &vars.vars) {
                        Some(key) => format!("undefined variable `{key}` (hint: set it in [vars], a group's vars or [hosts.{host}.vars])"),
                        None => "undefined value (an attribute or item the data does not have)".to_owned(),
                    },
                    _ => e.detail().map_or_else(|| e.kind().to_string(), str::to_owned),
                };
                fail(line, message)
            })?;
            if !t.def.validate.is_empty() {
                validate(&t.def.validate, &t.target, text.as_bytes()).map_err(|m| fail(1, m))?;
            }
            let content = Bytes::from(text.into_bytes());
            let hash = Hash::of(&content);
            let mut meta = t.entry.meta.clone();
            if let Some(m) = &t.def.mode {
                meta.mode = u32::from_str_radix(m.trim_start_matches("0o"), 8).expect("checked at load");
            }
            meta.uid = t.def.owner.unwrap_or(meta.uid);
            meta.gid = t.def.group.unwrap_or(meta.gid);
            if let Some(x) = &t.def.xattrs {
                meta.xattrs = x
                    .iter()
                    .map(|(k, v)| manifest::Xattr { name: k.as_bytes().to_vec(), value: v.as_bytes().to_vec() })
                    .collect();
            }
            let entry = Entry {
                path: t.target.clone(),
                kind: Kind::File,
                meta,
                size: content.len() as u64,
                hash: Some(hash),
                target: None,
                rdev: 0,
                link_group: 0,
                sparse: false,
            };
            out.push(Rendered { entry, template: t.shown.clone(), content, allow_shrink: t.def.allow_shrink });
        }
        out.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        Ok(out)
    }
}

/// The first variable `tmpl` uses that the data does not have (dotted), if one can be named.
fn missing_var(tmpl: &minijinja::Template<'_, '_>, vars: &toml::Table) -> Option<String> {
    let mut used: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
    used.sort();
    used.into_iter().find(|key| {
        let mut parts = key.split('.');
        let first = parts.next().unwrap_or_default();
        if first == crate::inventory::RESERVED_VAR {
            return !matches!(parts.next(), None | Some("name" | "groups"));
        }
        let mut at = match vars.get(first) {
            Some(v) => v,
            None => return true,
        };
        for p in parts {
            match at.as_table().and_then(|t| t.get(p)) {
                Some(v) => at = v,
                None => return true,
            }
        }
        false
    })
}

/// Reads a template from the image (no symlink followed) and checks it is what was scanned.
fn read_template(root: &Path, src: &RelPath, entry: &Entry) -> Result<String, String> {
    use std::io::Read;
    let path = root.join(src.as_path());
    let mut bytes = Vec::new();
    manifest::scan::open_nofollow(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read the template: {e}"))?;
    if Some(Hash::of(&bytes)) != entry.hash {
        return Err("the template changed since the image was scanned (hint: publish the image again)".into());
    }
    String::from_utf8(bytes).map_err(|_| "the template is not UTF-8".to_owned())
}

/// Runs `argv` (with `%s` the rendered file, written to a temp dir under the target's file
/// name) and refuses the render on a non-zero exit or a timeout, with the command's output.
fn validate(argv: &[String], target: &RelPath, content: &[u8]) -> Result<(), String> {
    use std::io::Read;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir to validate in: {e}"))?;
    let name = String::from_utf8_lossy(target.file_name()).into_owned();
    let file = dir.path().join(&name);
    std::fs::write(&file, content).map_err(|e| format!("cannot write {} to validate it: {e}", file.display()))?;
    let args: Vec<String> = argv.iter().map(|a| a.replace("%s", &file.to_string_lossy())).collect();
    let shown = argv.join(" ");
    let mut child = std::process::Command::new(&args[0])
        .args(&args[1..])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("validate `{shown}` cannot start: {e}"))?;
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > VALIDATE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("validate `{shown}` did not finish within {}s", VALIDATE_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("validate `{shown}`: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut output = String::new();
    for pipe in [
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut s = String::new();
        let _ = pipe.take(4096).read_to_string(&mut s);
        output.push_str(s.trim());
    }
    Err(format!(
        "validate `{shown}` refused the render ({status}): {}",
        output.replace(&*file.to_string_lossy(), &name)
    ))
}

/// One rendered file.
pub struct Rendered {
    pub entry: Entry,
    pub template: String,
    pub content: Bytes,
    allow_shrink: bool,
}

// --- The master's renders --------------------------------------------------------------------

/// What one host is served on top of an image.
#[derive(Debug)]
pub struct HostRender {
    /// The rendered entries, sorted by path, and each one's template.
    pub entries: Vec<Entry>,
    pub templates: Vec<String>,
    /// The identity of the image with these entries in place (what is signed).
    pub identity: Hash,
    /// The render serial the signature binds.
    pub serial: u64,
}

/// What one host is served on top of one image, or why it cannot be.
type Served = Result<Arc<HostRender>, RenderError>;

struct State {
    inventory: Arc<Inventory>,
    serial: u64,
    /// Per image identity: its templates, or why they cannot be used.
    templates: HashMap<Hash, Arc<Result<Templates, RenderError>>>,
    /// Per (image version, host): what that host is served, or why not.
    hosts: HashMap<(u64, String), Arc<Served>>,
    /// Rendered content by hash: of this serial, and of the one before (for hosts mid-pass).
    objects: HashMap<Hash, Bytes>,
    previous_objects: HashMap<Hash, Bytes>,
    /// A host's identity under a render → the image's identity (for its reports), with the
    /// serial it was rendered under: those of this serial and the one before are kept.
    bases: HashMap<Hash, (Hash, u64)>,
    /// The size of each file last served to each host, for `allow_shrink`.
    sizes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Every host's rendered files, made on first request and kept until the inventory is
/// reloaded or the version leaves.
pub struct Renders {
    state: Mutex<State>,
    /// Where the sizes served are kept across restarts (`render-sizes.json`).
    sizes_file: Option<PathBuf>,
}

/// Unix milliseconds: the serial of the render data loaded now.
fn now_serial() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64).max(1)
}

impl Renders {
    pub fn new(inventory: Arc<Inventory>, state_dir: Option<&Path>) -> Renders {
        let sizes_file = state_dir.map(|d| d.join("render-sizes.json"));
        let sizes = sizes_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Renders {
            state: Mutex::new(State {
                inventory,
                serial: now_serial(),
                templates: HashMap::new(),
                hosts: HashMap::new(),
                objects: HashMap::new(),
                previous_objects: HashMap::new(),
                bases: HashMap::new(),
                sizes,
            }),
            sizes_file,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("renders lock")
    }

    /// The inventory in use (the one loaded last).
    pub fn inventory(&self) -> Arc<Inventory> {
        self.lock().inventory.clone()
    }

    /// The serial of the render data in use (goes up with every reload).
    pub fn serial(&self) -> u64 {
        self.lock().serial
    }

    /// Whether the inventory names any template.
    pub fn active(&self) -> bool {
        let s = self.lock();
        s.inventory.render.templates_dir.is_some() || !s.inventory.render.templates.is_empty()
    }

    /// Takes a reloaded inventory: every host is rendered again, under a higher serial.
    pub fn reload(&self, inventory: Arc<Inventory>) {
        let mut s = self.lock();
        s.inventory = inventory;
        s.serial = now_serial().max(s.serial + 1);
        s.templates.clear();
        s.hosts.clear();
        s.previous_objects = std::mem::take(&mut s.objects);
        let kept_from = s.bases.values().map(|(_, serial)| *serial).filter(|x| *x < s.serial).max().unwrap_or(0);
        s.bases.retain(|_, (_, serial)| *serial >= kept_from);
    }

    /// The templates of `image` (compiled once per image).
    fn templates(&self, image: &Image) -> Arc<Result<Templates, RenderError>> {
        let inventory = {
            let s = self.lock();
            if let Some(t) = s.templates.get(&image.identity) {
                return t.clone();
            }
            s.inventory.clone()
        };
        let t = Arc::new(Templates::load(image, &inventory.render, &inventory.path));
        self.lock().templates.insert(image.identity, t.clone());
        t
    }

    /// Checks that `image`'s templates can be used (at start, and before publishing a version).
    pub fn check_image(&self, image: &Image) -> Result<(), RenderError> {
        if !self.active() {
            return Ok(());
        }
        match &*self.templates(image) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        }
    }

    /// What `host` is served on top of `image`: `None` when nothing is rendered. Blocking (a
    /// render may run validation commands): call it off the async workers.
    pub fn for_host(&self, image: &Image, host: &str) -> Result<Option<Arc<HostRender>>, RenderError> {
        if !self.active() {
            return Ok(None);
        }
        let key = (image.manifest.version, host.to_owned());
        let (inventory, serial, previous) = {
            let s = self.lock();
            if let Some(r) = s.hosts.get(&key) {
                return (**r).clone().map(Some);
            }
            (s.inventory.clone(), s.serial, s.sizes.get(host).cloned().unwrap_or_default())
        };
        let templates = self.templates(image);
        let result = match &*templates {
            Err(e) => Err(e.clone()),
            Ok(t) if t.is_empty() => {
                return Ok(None);
            }
            Ok(t) => t.render_host(&inventory, host).and_then(|files| {
                for f in &files {
                    let path = format!("/{}", f.entry.path);
                    let before = previous.get(&path).copied().unwrap_or(0);
                    if !f.allow_shrink && before >= SHRINK_MIN && f.entry.size * SHRINK_FRACTION < before {
                        return Err(RenderError::Host {
                            host: host.into(),
                            template: f.template.clone(),
                            line: 1,
                            message: format!(
                                "the render of {path} is {} bytes, under half of the {before} bytes served to this host before: refused (hint: allow_shrink = true in [templates.{path:?}] if that is intended)",
                                f.entry.size
                            ),
                        });
                    }
                }
                Ok(files)
            }),
        };
        let mut s = self.lock();
        let result = result.map(|files| {
            let entries: Vec<Entry> = files.iter().map(|f| f.entry.clone()).collect();
            // The image's identity with these in place, without copying its manifest per host.
            let identity = image.manifest.identity_with(&entries);
            for f in &files {
                s.sizes.entry(host.to_owned()).or_default().insert(format!("/{}", f.entry.path), f.entry.size);
                s.objects.insert(f.entry.hash.expect("rendered files are hashed"), f.content.clone());
            }
            s.bases.insert(identity, (image.identity, serial));
            Arc::new(HostRender {
                templates: files.iter().map(|f| f.template.clone()).collect(),
                entries,
                identity,
                serial,
            })
        });
        if let Err(e) = &result {
            tracing::warn!("{e}");
        }
        // A reload while this host rendered: its result is not kept (the next request renders
        // again under the new data).
        if s.serial == serial {
            s.hosts.insert(key, Arc::new(result.clone()));
        }
        let sizes = serde_json::to_vec(&s.sizes).expect("plain map");
        drop(s);
        if let (Ok(_), Some(p)) = (&result, &self.sizes_file) {
            let tmp = p.with_extension("json.tmp");
            if let Err(e) = std::fs::write(&tmp, sizes).and_then(|()| std::fs::rename(&tmp, p)) {
                tracing::warn!("cannot save {}: {e}", p.display());
            }
        }
        result.map(Some)
    }

    /// Renders `image` for every host of the inventory (after a publish or a reload), so a
    /// failing host is logged at once rather than at its next pass.
    pub fn prerender(&self, image: &Image) {
        if !self.active() {
            return;
        }
        let inventory = self.inventory();
        let (mut ok, mut failed) = (0, 0);
        for host in inventory.hosts() {
            match self.for_host(image, &host) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        tracing::info!(version = image.manifest.version, ok, failed, "rendered every host's files");
    }

    /// Rendered content by hash.
    pub fn object(&self, hash: &Hash) -> Option<Bytes> {
        let s = self.lock();
        s.objects.get(hash).or_else(|| s.previous_objects.get(hash)).cloned()
    }

    /// The image identity behind a host's identity under a render, if it is one.
    pub fn image_identity_of(&self, identity: &Hash) -> Option<Hash> {
        self.lock().bases.get(identity).map(|(base, _)| *base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_text_names_each_keys_source() {
        let inv = Inventory::parse(
            "hosts.toml",
            "[vars]\na = 1\n[groups.g]\nvars = { b = { c = \"x\" } }\n[hosts.h]\ngroups = [\"g\"]\nvars = { a = 2 }\n",
        )
        .unwrap();
        let t = vars_text("h", inv.groups_of("h"), inv.vars_for("h").unwrap());
        assert!(t.starts_with("# h: groups g\n"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("a = 2") && l.ends_with("# [hosts.h.vars]")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("b.c = \"x\"") && l.ends_with("# [groups.g.vars]")), "{t}");
    }

    #[test]
    fn a_render_under_half_the_size_served_before_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("img");
        std::fs::create_dir_all(root.join("t")).unwrap();
        std::fs::write(root.join("t/motd.j2"), "{{ text }}\n").unwrap();
        let img = Image::new(&root, manifest::scan_image(&root, 1).unwrap());
        let inv = |text: &str, allow: bool| {
            let toml = format!(
                "[render]\ntemplates_dir = \"/t\"\n[templates.\"/motd\"]\nallow_shrink = {allow}\n[hosts.h]\nvars = {{ text = {text:?} }}\n"
            );
            Arc::new(Inventory::parse("hosts.toml", &toml).unwrap())
        };
        let long = "x".repeat(200);
        let r = Renders::new(inv(&long, false), Some(d.path()));
        let first = r.for_host(&img, "h").unwrap().expect("rendered");
        assert_eq!(first.entries[0].size, 201);
        assert_eq!(r.object(&first.entries[0].hash.unwrap()).unwrap().len(), 201);
        assert_eq!(r.image_identity_of(&first.identity), Some(img.identity));
        r.reload(inv("short", false));
        let e = r.for_host(&img, "h").unwrap_err().to_string();
        assert!(e.contains("under half of the 201 bytes served to this host before"), "{e}");
        // The sizes served are kept in the state dir across restarts.
        let again = Renders::new(inv("short", false), Some(d.path()));
        assert!(again.for_host(&img, "h").is_err());
        r.reload(inv("short", true));
        let shrunk = r.for_host(&img, "h").unwrap().expect("allowed");
        assert_eq!(shrunk.entries[0].size, 6);
        assert!(shrunk.serial > first.serial, "a reload renders under a higher serial");
    }
}
