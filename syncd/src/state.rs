//! syncd's state directory (`--state-dir`, default `/var/lib/syncd`): every file syncd keeps
//! there, and its name, in one place. One host may converge several roots, so each root's
//! files carry a short key of its path ([`root_key`]); the trigger journal is shared.

use std::path::{Path, PathBuf};

/// A short, stable key for `root`, naming its files in the state dir.
pub fn root_key(root: &Path) -> String {
    blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex()[..16].to_owned()
}

/// The state dir as seen by the passes over one root.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
    key: String,
}

impl StateDir {
    pub fn new(dir: &Path, root: &Path) -> StateDir {
        StateDir { dir: dir.to_owned(), key: root_key(root) }
    }

    /// The directory itself: the trigger journal (`pending-triggers.json`, see the `triggers`
    /// crate) lives here, shared by every root.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, prefix: &str, suffix: &str) -> PathBuf {
        self.dir.join(format!("{prefix}-{}{suffix}", self.key))
    }

    /// The host index: what each inode of the root hashed to ([`manifest::hash_index`]).
    pub fn host_index(&self) -> PathBuf {
        self.file("host-index", ".bin")
    }

    /// The last manifest received ([`crate::mcache`]).
    pub fn manifest_cache(&self) -> PathBuf {
        self.file("manifest", ".bin")
    }

    /// The walk of a root that matched its image ([`crate::unchanged`]).
    pub fn unchanged(&self) -> PathBuf {
        self.file("unchanged", ".bin")
    }

    /// The highest version applied, against rollback attacks ([`crate::trust`]).
    pub fn applied_version(&self) -> PathBuf {
        self.file("applied-version", ".json")
    }

    /// The version the root last converged to, and its health verdict ([`crate::health`]).
    pub fn converged_version(&self) -> PathBuf {
        self.file("converged-version", ".json")
    }

    /// The local content store ([`crate::store`]).
    pub fn store(&self) -> PathBuf {
        self.file("store", "")
    }

    /// The last pass's outcome, for `syncd status` ([`crate::last_pass`]).
    pub fn last_pass(&self) -> PathBuf {
        self.file("last-pass", ".json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_root_has_its_own_files_and_the_names_stay_as_they_were() {
        let a = StateDir::new(Path::new("/var/lib/syncd"), Path::new("/"));
        let b = StateDir::new(Path::new("/var/lib/syncd"), Path::new("/srv/root"));
        assert_ne!(a.host_index(), b.host_index());
        // The names existing hosts already have on disk.
        let k = root_key(Path::new("/"));
        assert_eq!(a.host_index(), Path::new(&format!("/var/lib/syncd/host-index-{k}.bin")));
        assert_eq!(a.manifest_cache(), Path::new(&format!("/var/lib/syncd/manifest-{k}.bin")));
        assert_eq!(a.unchanged(), Path::new(&format!("/var/lib/syncd/unchanged-{k}.bin")));
        assert_eq!(a.applied_version(), Path::new(&format!("/var/lib/syncd/applied-version-{k}.json")));
        assert_eq!(a.converged_version(), Path::new(&format!("/var/lib/syncd/converged-version-{k}.json")));
        assert_eq!(a.last_pass(), Path::new(&format!("/var/lib/syncd/last-pass-{k}.json")));
        assert_eq!(a.store(), Path::new(&format!("/var/lib/syncd/store-{k}")));
        assert_eq!(a.dir(), Path::new("/var/lib/syncd"));
    }
}
