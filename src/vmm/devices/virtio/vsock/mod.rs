//! virtio-vsock with hybrid vsock on the host.

pub mod device;
pub mod muxer;
pub mod packet;
