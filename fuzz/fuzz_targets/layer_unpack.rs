//! The image layer unpacker on any tar stream: names, types, links,
//! whiteouts, PAX and GNU records. It must not panic, write outside the
//! destination, or go past its caps. Input: the (uncompressed) layer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runv::image::{unpack_layer, ImageLimits};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("layer");
    std::fs::create_dir(&dest).unwrap();
    let limits = ImageLimits { max_layer_bytes: 1 << 20, max_unpacked_bytes: 4 << 20, max_entries: 256, max_layers: 1 };
    let _ = unpack_layer(data, &dest, &limits);
    // Nothing may appear beside the destination.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, ["layer"], "the unpacker wrote outside its destination");
});
