//! virtio-vsock with hybrid vsock on the host.

pub mod muxer;
pub mod packet;
