//! Packs of small objects (issue 25, part 3): the master packs small objects and writes a pack
//! index per version; a cold host reads them as coalesced range GETs, far fewer than objects;
//! a restart packs nothing twice; a damaged or short pack is refused and falls back to the
//! master. Against a real S3 server (s3s-fs, see [`gis_tests::S3Server`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use gis_tests::{assert_converged, random_bytes, scratch, sync_env, Master, S3Server};
use objstore::pack::{Encoding, PackIndex};

/// The number just before `before` in `s`, after the last `after` preceding it.
fn number(s: &str, after: &str, before: &str) -> u64 {
    let i = s.find(before).unwrap_or_else(|| panic!("no {before:?} in {s}"));
    s[..i].rsplit(after).next().unwrap().trim().parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// From the pass summary: (objects from the store, its GETs, objects cut from packs, objects
/// from the master, of those after a store failure).
fn sources(out: &gis_tests::Output) -> (u64, u64, u64, u64, u64) {
    let s = out.summary();
    (
        number(s, ": ", " from the object store"),
        number(s, "(", " GETs"),
        number(s, ", ", " objects cut from packs"),
        number(s, ", ", " from the master"),
        number(s, "(", " after a store failure"),
    )
}

/// An image of `n` small files (a few hundred bytes to a few KB, text and noise) in 30
/// directories, and a 2 MiB file that stays loose.
fn small_files(top: &Path, n: usize) {
    for i in 0..n {
        let dir = top.join(format!("usr/share/d{:02}", i % 30));
        std::fs::create_dir_all(&dir).unwrap();
        let body = if i % 3 == 0 {
            random_bytes(i as u64, 200 + (i * 37) % 3000)
        } else {
            format!("file {i}: {}\n", "some text that compresses ".repeat(1 + i % 150)).into_bytes()
        };
        std::fs::write(dir.join(format!("f{i:05}")), body).unwrap();
    }
    std::fs::write(top.join("usr/large.bin"), random_bytes(99, 2 << 20)).unwrap();
}

/// A master of `img` uploading to `s3://bkt/fleet`, with packs of 256 KiB.
fn start(img: &Path, s3: &S3Server) -> Master {
    let args = [
        OsStr::new("--image"),
        img.as_os_str(),
        OsStr::new("--object-store"),
        OsStr::new("s3://bkt/fleet"),
        OsStr::new("--pack-size"),
        OsStr::new("256KiB"),
    ];
    Master::start_with_env(&args, &s3.env())
}

/// The packs in the store, by file name, with their mtimes.
fn packs(dir: &Path) -> BTreeMap<String, SystemTime> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().modified().unwrap()))
        .collect()
}

/// The one pack index under `dir/index`, and its path.
fn index(dir: &Path) -> (PathBuf, PackIndex) {
    let mut idx: Vec<PathBuf> = std::fs::read_dir(dir.join("index")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(idx.len(), 1, "{idx:?}");
    let p = idx.remove(0);
    let b = std::fs::read(&p).unwrap();
    (p, PackIndex::decode(&b).unwrap())
}

#[test]
fn a_cold_host_reads_thousands_of_small_files_in_few_range_gets() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let img = s.dir("img");
    small_files(&img, 3000);
    let packs_dir = s3.bucket("bkt").join("fleet/packs");
    let master = start(&img, &s3);
    let log = master.stderr();
    assert!(log.contains("packs: 3000 objects indexed (0 in earlier packs)"), "{log}");
    let (_, idx) = index(&packs_dir);
    assert_eq!(idx.len(), 3000);
    assert!(idx.packs().len() >= 4, "{} packs for 3000 objects at 256 KiB", idx.packs().len());
    assert_eq!(packs(&packs_dir).len(), idx.packs().len());

    let root = s.dir("root");
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    eprintln!("cold sync: {}", out.summary());
    let (store, gets, packed, from_master, after) = sources(&out);
    assert_eq!((from_master, after), (0, 0), "{}", out.summary());
    assert_eq!(packed, 3000, "{}", out.summary());
    assert_eq!(store, 3001, "the large file comes loose: {}", out.summary());
    // The index, the large file (.zst tried first, then .raw), and a few ranges per pack.
    assert!(gets <= 3 + 4 * idx.packs().len() as u64, "{gets} GETs for 3001 objects: {}", out.summary());

    // A master restarted after its packs were put but before its index was: the same packs
    // again, none of them put twice.
    let before = packs(&packs_dir);
    let (idx_path, idx_before) = index(&packs_dir);
    drop(master);
    std::fs::remove_file(&idx_path).unwrap();
    let master = start(&img, &s3);
    let log = master.stderr();
    assert!(log.contains(&format!("{} packs, 0 put (0 bytes)", before.len())), "{log}");
    assert_eq!(packs(&packs_dir), before, "a restart rewrote or added packs");
    assert_eq!(index(&packs_dir).1, idx_before);
    // Restarted again with the index there: nothing packed at all.
    drop(master);
    let master = start(&img, &s3);
    assert!(master.stderr().contains("already there"), "{}", master.stderr());
    assert_eq!(packs(&packs_dir), before);
}

#[test]
fn a_damaged_or_short_pack_is_refused_and_fetched_from_the_master() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let img = s.dir("img");
    small_files(&img, 600);
    let packs_dir = s3.bucket("bkt").join("fleet/packs");
    let master = start(&img, &s3);
    let (_, idx) = index(&packs_dir);
    // A raw (noise) file in the middle of a pack gets one byte flipped in place.
    let victim = img.join("usr/share/d03/f00003");
    let content = std::fs::read(&victim).unwrap();
    let loc = idx.get(blake3::hash(&content).as_bytes()).expect("f00003 is packed");
    assert_eq!(loc.encoding, Encoding::Raw);
    let hex = |b: &[u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let pack = packs_dir.join(format!("{}.pack", hex(&loc.pack)));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + 10] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();
    // Another pack loses its second half: the ranges there come up short.
    let other = idx.packs().iter().find(|p| **p != loc.pack).expect("two packs");
    let short = packs_dir.join(format!("{}.pack", hex(other)));
    let len = std::fs::metadata(&short).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&short).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let cut: Vec<_> =
        idx.iter().filter(|(_, l)| l.pack == *other && l.offset + u64::from(l.length) > len / 2).collect();
    assert!(!cut.is_empty());

    let root = s.dir("root");
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    eprintln!("damaged packs: {}", out.summary());
    assert_eq!(std::fs::read(root.join("usr/share/d03/f00003")).unwrap(), content);
    assert!(out.summary().contains("1 refused from the store"), "{}", out.summary());
    let (_, _, _, from_master, after) = sources(&out);
    assert!(after >= cut.len() as u64, "{} objects lie past the cut: {}", cut.len(), out.summary());
    assert_eq!(from_master, after + 1, "{}", out.summary());
    assert!(out.stderr.contains("s3://bkt/fleet") && out.stderr.contains(".pack bytes"), "{}", out.stderr);

    // With fallback off, the same store fails the pass (exit 3) and names the pack.
    let root2 = s.dir("root2");
    let out = sync_env(&master, &root2, &["--object-store-fallback", "false"], &s3.env());
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains(".pack bytes"), "{}", out.stderr);
}
