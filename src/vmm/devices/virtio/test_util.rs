//! What the device tests share: a small guest memory, descriptors as a
//! driver writes them, and a wait for what a worker thread delivers.

use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::GuestAddress;

use super::Mem;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// `size` bytes of guest memory from address 0.
pub fn mem(size: usize) -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A split-queue descriptor (the mock queue stores `next` as given).
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Polls `got` until it holds at least `n` items or 5 s pass; returns
/// what it last held.
pub fn wait_for<T>(n: usize, got: impl Fn() -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let items = got();
        if items.len() >= n || Instant::now() > deadline {
            return items;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
