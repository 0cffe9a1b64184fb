//! Large files as content-defined chunks (issue 25, part 4): the master's side.
//!
//! A file of at least the chunk threshold is read once, cut with FastCDC
//! ([`objstore::chunks::cut`]); each chunk the store lacks is encoded like any object (zstd,
//! or raw when incompressible) and put create-only under `objects/` by its own hash, and once
//! every chunk is in and the file still hashes to its manifest hash, its chunk index is put,
//! create-only, at `chunks/<ab>/<file hash>.idx`. A file whose index is present is skipped (a
//! restart puts nothing twice); one whose upload stopped half-way finds its chunks present
//! and puts only the rest. The file is not stored whole: hosts rebuild it from chunks, and the
//! master's `FetchObjects` still serves it whole.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use futures_util::stream::{StreamExt, TryStreamExt};
use manifest::{Hash, RelPath};
use object_store::path::Path as StorePath;
use objstore::chunks::{self, ChunkRef, Index, Params};

use super::{ObjectStoreTarget, Summary};
use crate::image::Image;

impl ObjectStoreTarget {
    /// The key of the chunk index of the file whose hash is `hash`.
    pub fn index_key(&self, hash: &Hash) -> StorePath {
        chunks::index_key(&self.objects, &hash.to_hex())
    }

    /// The file hashes with a chunk index in the store.
    async fn indexed(&self) -> anyhow::Result<HashSet<Hash>> {
        let dir = chunks::index_dir(&self.objects);
        let mut out = HashSet::new();
        let mut list = self.store.list(Some(&dir));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| anyhow::anyhow!("cannot list {dir} in {}: {e}", self.url))?;
            let name = meta.location.filename().unwrap_or_default();
            if let Some(h) = name.strip_suffix(".idx").and_then(Hash::from_hex) {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Stores each file of `large` as chunks and an index, counting into `s`.
    pub(super) async fn upload_large(
        &self,
        image: &Arc<Image>,
        large: Vec<(Hash, RelPath, u64)>,
        present: &HashMap<Hash, u64>,
        s: &mut Summary,
    ) -> anyhow::Result<()> {
        if large.is_empty() {
            return Ok(());
        }
        let indexed = self.indexed().await?;
        // Chunks put by this upload (shared by several files or versions: put once).
        let mut put: HashSet<Hash> = HashSet::new();
        for (hash, rel, size) in large {
            s.chunked += 1;
            if indexed.contains(&hash) {
                s.present += 1;
                continue;
            }
            let (index, chunks_put, bytes) = self.upload_file(image, &rel, size, hash, present, &mut put).await?;
            let body = index.encode();
            let len = body.len() as u64;
            s.chunks += index.chunks.len() as u64;
            s.chunks_uploaded += chunks_put;
            s.bytes += bytes;
            // After every chunk: a host that finds the index finds its chunks.
            if self.put_once(&self.index_key(&hash), body).await? {
                s.uploaded += 1;
                s.bytes += len;
            } else {
                s.present += 1;
            }
            tracing::info!(
                path = %rel,
                size,
                chunks = index.chunks.len(),
                chunks_put,
                "object store: {} stored as chunks",
                hash
            );
        }
        Ok(())
    }

    /// Cuts one file into chunks, puts those the store lacks, and returns its index (the file
    /// checked against `hash` as it was read), the chunks put and their bytes.
    async fn upload_file(
        &self,
        image: &Arc<Image>,
        rel: &RelPath,
        size: u64,
        hash: Hash,
        present: &HashMap<Hash, u64>,
        put: &mut HashSet<Hash>,
    ) -> anyhow::Result<(Index, u64, u64)> {
        let path = image.root.join(rel.as_path());
        let params = Params::DEFAULT;
        // The cutter runs ahead of the puts by at most this many chunks.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Hash, Vec<u8>)>(self.concurrency * 2);
        let cut_path = path.clone();
        let cutter = tokio::task::spawn_blocking(move || -> std::io::Result<Index> {
            let file = manifest::scan::open_nofollow(&cut_path)?;
            let mut whole = blake3::Hasher::new();
            let mut total = 0u64;
            let mut refs = Vec::new();
            chunks::cut(file.take(size + 1), params, |_, data| {
                let h = Hash::of(&data);
                whole.update(&data);
                total += data.len() as u64;
                refs.push(ChunkRef { hash: h.0, len: data.len() as u32 });
                tx.blocking_send((h, data)).map_err(|_| std::io::Error::other("the upload stopped"))
            })?;
            if total != size || Hash(*whole.finalize().as_bytes()) != hash {
                return Err(std::io::Error::other(format!(
                    "{} changed since the image was scanned",
                    cut_path.display()
                )));
            }
            Ok(Index { params, size, file: hash.0, chunks: refs })
        });
        let level = self.level;
        let (chunks_put, bytes) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
        let puts = futures_util::stream::poll_fn(|cx| rx.poll_recv(cx))
            .filter(|(h, _)| std::future::ready(!present.contains_key(h) && put.insert(*h)))
            .map(|(h, data)| {
                let (chunks_put, bytes) = (&chunks_put, &bytes);
                async move {
                    let (raw, body) = tokio::task::spawn_blocking(move || super::encode_bytes(data, level)).await??;
                    let len = body.len() as u64;
                    if self.put_once(&self.key(&h, raw), body).await? {
                        chunks_put.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<()>();
        // A failed put ends `puts`, dropping the receiver: the cutter then stops too.
        let (cut, puts) = tokio::join!(cutter, puts);
        puts?;
        let index = cut?.map_err(|e| anyhow::anyhow!("cannot chunk {}: {e}", path.display()))?;
        Ok((index, chunks_put.into_inner(), bytes.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_file_is_stored_as_chunks_and_an_index_once() {
        let img = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let mut big = vec![0u8; 3 << 20];
        blake3::Hasher::new().finalize_xof().fill(&mut big);
        std::fs::write(img.path().join("big"), &big).unwrap();
        std::fs::write(img.path().join("small"), b"small file").unwrap();
        let url = format!("file://{}/", store_dir.path().display());
        let t = ObjectStoreTarget::new(&url, 4, 3).unwrap().with_chunk_threshold(1 << 20);
        let v1 = Arc::new(Image::scan(img.path(), 1).unwrap());
        let s = t.upload(&v1, None).await.unwrap();
        assert_eq!((s.objects, s.uploaded, s.chunked), (2, 2, 1), "{s:?}");
        assert!(s.chunks > 10 && s.chunks_uploaded == s.chunks, "{s:?}");
        let h = Hash::of(&big);
        // Not stored whole; the index lists chunks that are all in the store and make the file.
        assert!(!store_dir.path().join(t.key(&h, true).as_ref()).exists());
        let idx = std::fs::read(store_dir.path().join(t.index_key(&h).as_ref())).unwrap();
        let idx = Index::parse(&idx, &h.0, big.len() as u64).unwrap();
        let mut rebuilt = Vec::new();
        for c in &idx.chunks {
            let c = Hash(c.hash);
            let raw = store_dir.path().join(t.key(&c, true).as_ref());
            let data = std::fs::read(&raw).unwrap_or_else(|e| panic!("{}: {e}", raw.display()));
            assert_eq!(Hash::of(&data), c);
            rebuilt.extend_from_slice(&data);
        }
        assert_eq!(rebuilt, big);
        // A restart puts nothing.
        let s = t.upload(&v1, None).await.unwrap();
        assert_eq!((s.uploaded, s.present, s.bytes, s.chunks_uploaded), (0, 2, 0, 0), "{s:?}");
        // 10 KiB inserted near the start: a few new chunks, not the file.
        big.splice(70_000..70_000, vec![7u8; 10 << 10]);
        std::fs::write(img.path().join("big"), &big).unwrap();
        let s = t.upload(&Arc::new(Image::scan(img.path(), 2).unwrap()), None).await.unwrap();
        assert_eq!((s.uploaded, s.chunked), (1, 1), "{s:?}");
        assert!(s.chunks_uploaded <= 4 && s.bytes < 1 << 20, "{s:?}");
    }
}
