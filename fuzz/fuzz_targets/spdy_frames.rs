//! The bytes a streaming client sends `runv cri` after a SPDY/3.1 upgrade
//! (src/cri/spdy.rs): frames, with header blocks through the connection's
//! zlib stream. Any input either comes out as frames or is refused with an
//! error, never a panic, and never more than the caps allow. The input is
//! fed in two pieces, cut where its first byte says, so partial frames are
//! exercised too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runv::cri::spdy::{Decoder, Frame, MAX_CONTROL_FRAME, MAX_DATA_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = usize::from(cut).min(data.len());
    let mut decoder = Decoder::default();
    let mut buf = Vec::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&buf) {
                Ok(Some((frame, used))) => {
                    assert!(used <= buf.len() && used >= 8);
                    assert!(used <= 8 + MAX_CONTROL_FRAME.max(MAX_DATA_FRAME));
                    if let Frame::SynStream { headers, .. } = &frame {
                        let _ = headers.get("streamtype");
                    }
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
