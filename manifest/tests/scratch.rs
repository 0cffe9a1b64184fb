//! The per-thread read buffer that hashing and copying share.

use manifest::scan::{hash_reader, with_scratch, SCRATCH};

#[test]
fn hashing_through_the_shared_buffer_matches_blake3_at_every_boundary() {
    for len in [0, 1, SCRATCH - 1, SCRATCH, SCRATCH + 1, 3 * SCRATCH + 7] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        // Leave garbage in the buffer from an earlier use: it must not leak into the next.
        with_scratch(|b| b.fill(0xa5));
        let (hash, n) = hash_reader(&data[..]).unwrap();
        assert_eq!(n, len as u64, "length of a {len}-byte stream");
        assert_eq!(hash.0, *blake3::hash(&data).as_bytes(), "hash of a {len}-byte stream");
    }
}

#[test]
fn a_nested_call_gets_a_buffer_of_its_own() {
    with_scratch(|outer| {
        outer.fill(1);
        let (_, n) = hash_reader(&[2u8; 1000][..]).unwrap();
        assert_eq!(n, 1000);
        with_scratch(|inner| {
            assert_eq!(inner.len(), SCRATCH);
            inner.fill(3);
        });
        assert!(outer.iter().all(|&b| b == 1), "a nested use overwrote the outer buffer");
    });
}
