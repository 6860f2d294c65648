//! The agent's request decoding path: protobuf messages and the OCI JSON
//! they carry, checked before anything acts on them. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((kind, bytes)) = data.split_first() {
        runv_agent::decode_request(*kind, bytes);
    }
});
