//! Path validation: whatever `RelPath` accepts stays beneath the root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifest::RelPath;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = RelPath::new(data) else { return };
    let b = p.as_bytes();
    assert!(!b.is_empty() && b[0] != b'/' && !b.contains(&0));
    assert!(b.len() <= manifest::MAX_PATH);
    let mut depth = 0usize;
    for c in p.components() {
        assert!(!c.is_empty() && c != b"." && c != b"..", "component {c:?} of {b:?}");
        assert!(c.len() <= manifest::MAX_NAME);
        depth += 1;
    }
    assert_eq!(depth, p.depth());
    // The parent chain ends at the root and each step stays within.
    let mut cur = p.clone();
    while let Some(parent) = cur.parent() {
        assert!(cur.is_within(&parent));
        cur = parent;
    }
    // Escaped display never contains a raw newline or NUL (it is printed in itemized lines).
    let shown = p.to_string();
    assert!(!shown.contains('\n') && !shown.contains('\0'));
});
