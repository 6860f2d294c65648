//! The bytes a CRI client sends `runv cri` over HTTP/2, after the preface:
//! frames cut and header blocks rewritten (src/cri/authority.rs). Any
//! input either comes out as frames or is refused with an error, never a
//! panic; the output never holds more than was fed in plus what header
//! re-encoding adds. The input is fed in two pieces, cut where its first
//! byte says, so partial frames are exercised too.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use runv::cri::authority::FrameSplitter;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = usize::from(cut).min(data.len());
    let mut splitter = FrameSplitter::default();
    let mut buf = BytesMut::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match splitter.next(&mut buf) {
                Ok(Some(out)) => assert!(out.len() >= 9, "a frame shorter than its header"),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
