//! A file is never written in place: a running binary and a mapped file survive their
//! replacement, and old descriptors keep reading the old content.
//!
//! One test in its own binary: exec'ing a just-written file races with forks from other
//! test threads (ETXTBSY), which this keeps away.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gis_tests::{assert_converged, random_bytes, scratch, sync, Builder, KillOnDrop, Master};

/// A read-only shared mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File) -> Mapping {
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a fresh read-only mapping of an open file; nothing else aliases it.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap failed: {}", std::io::Error::last_os_error());
        Mapping { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Starts `path`, retrying while another thread's fork still holds a write descriptor to it.
fn spawn_retrying(path: &Path, arg: &str) -> KillOnDrop {
    for _ in 0..50 {
        match Command::new(path).arg(arg).stdin(Stdio::null()).spawn() {
            Ok(c) => return KillOnDrop(c),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot start {}: {e}", path.display()),
        }
    }
    panic!("{} stayed busy (ETXTBSY)", path.display());
}

/// The state letter in /proc/PID/stat, or `None` if there is no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

#[test]
fn running_binary_and_mapped_file_survive_replacement() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let new_bin = fs::read("/bin/true").expect("/bin/true");
    let old_bin = fs::read("/bin/sleep").expect("/bin/sleep");
    let old_lib = random_bytes(40, 300_000);
    let new_lib = random_bytes(41, 300_000);
    Builder::new(&img)
        .dir("usr/bin", 0o755)
        .mode("usr", 0o755)
        .file("usr/bin/sleeper", 0o755, &new_bin)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libdata.so", 0o644, &new_lib)
        .finish();
    Builder::new(&root)
        .dir("usr/bin", 0o755)
        .file("usr/bin/sleeper", 0o755, &old_bin)
        .dir("usr/lib", 0o755)
        .file("usr/lib/libdata.so", 0o644, &old_lib)
        .finish();
    let bin_path = root.join("usr/bin/sleeper");
    let lib_path = root.join("usr/lib/libdata.so");
    let bin_ino = fs::metadata(&bin_path).unwrap().ino();
    let lib_ino = fs::metadata(&lib_path).unwrap().ino();

    let mut sleeper = spawn_retrying(&bin_path, "30");
    let pid = sleeper.0.id();
    let lib = File::open(&lib_path).unwrap();
    let mapping = Mapping::new(&lib);
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);

    out.check(sleeper.0.try_wait().unwrap().is_none(), "the running binary exited during the sync", &[&root]);
    let state = proc_state(pid);
    out.check(matches!(state, Some(c) if c != 'Z'), format!("the running binary is gone: state {state:?}"), &[&root]);
    out.check(mapping.bytes() == old_lib, "the mapped file's old content changed under the mapping", &[&root]);
    let mut buf = vec![0u8; old_lib.len()];
    lib.read_exact_at(&mut buf, 0).unwrap();
    out.check(buf == old_lib, "an open descriptor no longer reads the old content", &[&root]);
    out.check(fs::read(&bin_path).unwrap() == new_bin, "the binary's path does not hold the new content", &[&root]);
    out.check(fs::read(&lib_path).unwrap() == new_lib, "the library's path does not hold the new content", &[&root]);
    out.check(fs::metadata(&bin_path).unwrap().ino() != bin_ino, "the running binary was written in place", &[&root]);
    out.check(fs::metadata(&lib_path).unwrap().ino() != lib_ino, "the mapped file was written in place", &[&root]);
    drop(sleeper);
}
