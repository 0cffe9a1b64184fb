//! The host's filesystem, beneath the root, never following a symlink: [`root`] opens paths
//! component by component from a directory handle (`openat` with `O_NOFOLLOW`), and [`fsops`]
//! is every operation a pass performs there (verified writes, metadata, renames, links,
//! deletes, temp names). [`files`] is the read-only view of it the network code gets (delta
//! bases, chunk seeds). Nothing here knows about manifests' plans or the network.

pub mod files;
pub mod fsops;
pub mod root;
