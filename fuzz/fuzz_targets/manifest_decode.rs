//! Arbitrary bytes as a stream of length-delimited `ManifestMessage`s, fed to the same
//! assembler syncd uses. It may refuse anything; it must never panic, hang or allocate
//! without bound, and whatever it accepts must pass validation again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manifest::wire::ManifestAssembler;
use prost::Message;
use proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut asm = ManifestAssembler::default();
    while !buf.is_empty() {
        let Ok(msg) = pb::ManifestMessage::decode_length_delimited(&mut buf) else { return };
        if asm.push(msg).is_err() {
            return;
        }
    }
    if let Ok((m, _sig)) = asm.finish_signed() {
        m.validate().expect("an accepted manifest validates");
        for e in &m.entries {
            assert!(!e.path.as_bytes().is_empty());
            assert!(e.path.components().all(|c| c != b".." && c != b"." && !c.is_empty()));
        }
    }
});
