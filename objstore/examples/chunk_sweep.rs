//! Which FastCDC chunk sizes meet issue 25's goal for large files: for a file of `MIB` MiB
//! (default 256) of seeded pseudo-random bytes, v2 inserts 10 KiB at 1 MiB and overwrites 1 MiB
//! in the middle; for each (min, avg, max), prints the bytes of v2's chunks that v1 lacks, the
//! chunk index, and their sum against the changed bytes. Used for docs/large-files.md:
//! `cargo run --release -p objstore --example chunk_sweep [MIB]`.

use std::collections::HashSet;

use objstore::chunks::{cut, Params};

/// `len` pseudo-random bytes from `seed` (blake3's XOF).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut v);
    v
}

fn chunks(data: &[u8], p: Params) -> Vec<([u8; 32], usize)> {
    let mut out = Vec::new();
    cut(data, p, |_, d| {
        out.push((*blake3::hash(&d).as_bytes(), d.len()));
        Ok(())
    })
    .unwrap();
    out
}

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(256, |a| a.parse().expect("MIB"));
    let old = bytes(25, mib << 20);
    let mut new = old.clone();
    new.splice(1 << 20..1 << 20, bytes(26, 10 << 10));
    let mid = new.len() / 2;
    new[mid..mid + (1 << 20)].copy_from_slice(&bytes(27, 1 << 20));
    let changed = (1usize << 20) + (10 << 10);
    println!("file {mib} MiB, changed {changed} bytes");
    println!("| min / avg / max KiB | chunks | new chunk bytes | × changed | index bytes | (new + index) × changed |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (min, avg, max) in [(4, 16, 64), (8, 32, 128), (16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let p = Params { min: min << 10, avg: avg << 10, max: max << 10 };
        let have: HashSet<_> = chunks(&old, p).into_iter().map(|(h, _)| h).collect();
        let new_chunks = chunks(&new, p);
        let mut seen = HashSet::new();
        let fetch: usize =
            new_chunks.iter().filter(|(h, _)| !have.contains(h) && seen.insert(*h)).map(|(_, l)| l).sum();
        let index = 64 + 36 * new_chunks.len();
        println!(
            "| {min} / {avg} / {max} | {} | {fetch} | {:.2} | {index} | {:.2} |",
            new_chunks.len(),
            fetch as f64 / changed as f64,
            (fetch + index) as f64 / changed as f64
        );
    }
}
