//! virtio over MMIO: the transport (`mmio`), the device trait it drives, and
//! the devices (`block`, `fs`, `net`, `vsock`).

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_util;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type Mem = vm_memory::GuestMemoryMmap<()>;

/// VIRTIO_F_VERSION_1: modern devices only (vhost-user needs them too).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Answers a driver's read of a device's configuration space: `data` from
/// `config` at `offset`, bytes past its end (the MMIO window is wider than
/// any device's space) as 0.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).ok();
    for (i, b) in data.iter_mut().enumerate() {
        *b = start.and_then(|o| o.checked_add(i)).and_then(|j| config.get(j)).copied().unwrap_or(0);
    }
}

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status the guest reads from the
/// transport, and the irqfd that raises its IRQ.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: Arc::default(), irqfd: Arc::new(irqfd) }
    }

    /// Tells the guest a queue's used ring moved.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid (addresses outside guest memory, or a bad size)")]
    BadQueue(usize),
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_*: 1 net, 2 block, 19 vsock, 26 fs.
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver is ready: the device takes the queues.
    fn activate(
        &mut self,
        mem: Mem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver notified `queue`.
    fn notify(&mut self, queue: u16);
    /// The driver reset the device: drop the queues and any state.
    fn reset(&mut self);
}

#[cfg(test)]
mod config_space_tests {
    use super::read_config_space;

    #[test]
    fn a_config_read_past_the_space_reads_zeros() {
        let mut data = [0xff; 4];
        read_config_space(&[1, 2, 3], 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        read_config_space(&[1, 2, 3], u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
