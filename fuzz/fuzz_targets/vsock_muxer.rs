//! The hybrid-vsock muxer fed guest packets: any header (ops, ports,
//! lengths, credit figures) with any payload, in any order, then drained
//! towards the guest. It must not panic, and what it queues for the guest
//! stays bounded. Input: packets of a 44-byte header, a payload length
//! byte and that many payload bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runv::vmm::devices::virtio::vsock::muxer::Muxer;
use runv::vmm::devices::virtio::vsock::packet::{Header, HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // Guest connections to port 1024 find a listener; others are refused.
    let _listener = std::os::unix::net::UnixListener::bind(format!("{}_1024", uds.display())).unwrap();
    let mut muxer = Muxer::new(3, &uds).unwrap();
    let mut rest = data;
    while rest.len() > HEADER_SIZE {
        let header = Header::parse(rest[..HEADER_SIZE].try_into().unwrap());
        let len = usize::from(rest[HEADER_SIZE]).min(rest.len() - HEADER_SIZE - 1);
        let payload = &rest[HEADER_SIZE + 1..HEADER_SIZE + 1 + len];
        muxer.recv_from_guest(header, payload);
        rest = &rest[HEADER_SIZE + 1 + len..];
        // Drain part of what the guest is owed, as rx buffers allow.
        if let Some((h, d)) = muxer.next_rx(usize::from(rest.first().copied().unwrap_or(0)) * 16) {
            assert!(d.len() <= h.len as usize || h.len == 0 || d.is_empty());
        }
    }
    while muxer.next_rx(4096).is_some() {}
    muxer.reset_all();
});
