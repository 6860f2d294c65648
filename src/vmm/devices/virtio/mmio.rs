//! The virtio-mmio transport (virtio 1.1, 4.2.2, version 2 registers): the
//! register file a guest driver speaks, in front of one `VirtioDevice`. The
//! kernel finds it through `virtio_mmio.device=<size>@<base>:<irq>` on its
//! command line.

use virtio_queue::{Queue, QueueT};

use super::{status, ActivateError, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::devices::{BusDevice, WriteOutcome};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5552_4e56; // "VNRU"
const CONFIG_SPACE: u64 = 0x100;

pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Mem, interrupt: Interrupt) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device.queue_max_sizes().iter().map(|&max| Queue::new(max).expect("a power-of-two queue size")).collect()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queue registers only change before the driver is done.
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Only forward progress through the initialisation steps.
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not served: leave FEATURES_OK unset, which
            // the driver reads back as "features not accepted".
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 && !self.activated {
            if let Err(e) = self.activate() {
                tracing::warn!("virtio device {}: {e}", self.device.device_type());
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue(i));
            }
        }
        let queues = std::mem::take(&mut self.queues);
        self.device.activate(self.mem.clone(), queues, self.interrupt.clone(), self.driver_features)?;
        self.activated = true;
        Ok(())
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            return;
        }
        let value = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => {
                self.device.queue_max_sizes().get(self.queue_sel as usize).copied().unwrap_or(0).into()
            }
            reg::QUEUE_READY => self.queues.get(self.queue_sel as usize).is_some_and(|q| q.ready()).into(),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        if offset >= CONFIG_SPACE {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return WriteOutcome::Continue;
        }
        let Some(v) = read_u32(data) else { return WriteOutcome::Continue };
        let features_phase = self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if features_phase => {
                // Only what the device offers can be accepted.
                let offered = self.device.features();
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | (u64::from(v) & offered),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.queue().into_iter().for_each(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.queue().into_iter().for_each(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.queue().into_iter().for_each(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.queue().into_iter().for_each(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.queue().into_iter().for_each(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY if self.activated && (v as usize) < self.device.queue_max_sizes().len() => {
                self.device.notify(v as u16);
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {}
        }
        WriteOutcome::Continue
    }
}

/// The kernel command-line entry announcing a device window.
pub fn cmdline_entry(base: u64, size: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{irq}", size / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport does to it.
    #[derive(Default, Clone)]
    struct Probe(Arc<Mutex<Vec<String>>>);

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn activate(&mut self, _: Mem, queues: Vec<Queue>, _: Interrupt, f: u64) -> Result<(), ActivateError> {
            self.0.lock().unwrap().push(format!("activate {} queues features {f:#x}", queues.len()));
            Ok(())
        }
        fn notify(&mut self, q: u16) {
            self.0.lock().unwrap().push(format!("notify {q}"));
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().push("reset".into());
        }
    }

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, Probe) {
        let probe = Probe::default();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (MmioTransport::new(Box::new(probe.clone()), mem(), irq), probe)
    }

    fn set_up_queue(t: &mut MmioTransport, sel: u32, base: u64) {
        w(t, reg::QUEUE_SEL, sel);
        w(t, reg::QUEUE_NUM, 8);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn a_driver_brings_the_device_up_the_way_linux_does() {
        let (mut t, probe) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0b101);
        // The driver asks for more than offered: it gets the intersection.
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 0b111);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, reg::STATUS, s);
        assert_eq!(r(&mut t, reg::STATUS), s);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        w(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert!(t.is_activated());
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        w(&mut t, reg::QUEUE_NOTIFY, 7);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE + 3, &mut cfg);
        assert_eq!(cfg, [4, 4]);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(*probe.0.lock().unwrap(), ["activate 2 queues features 0x100000005", "notify 1", "reset"]);
    }

    #[test]
    fn a_legacy_driver_is_refused_features_ok() {
        let (mut t, probe) = transport();
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DRIVER_FEATURES, 0b1);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert!(probe.0.lock().unwrap().is_empty());
    }

    #[test]
    fn queues_outside_guest_memory_fail_activation_without_a_crash() {
        let (mut t, probe) = transport();
        let s = status::ACKNOWLEDGE | status::DRIVER;
        w(&mut t, reg::STATUS, s);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, s | status::FEATURES_OK);
        // Past the end of the 1 MiB of guest memory.
        set_up_queue(&mut t, 0, 0xf_f000);
        w(&mut t, reg::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // A size that is no power of two is ignored by the queue.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 3);
        // Odd accesses and unknown registers do nothing.
        t.write(reg::STATUS, &[1, 2]);
        w(&mut t, 0x0f0, 1);
        let mut odd = [0xffu8; 2];
        t.read(reg::MAGIC, &mut odd);
        assert_eq!(odd, [0, 0]);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(probe.0.lock().unwrap().is_empty());
    }

    #[test]
    fn the_command_line_entry_names_size_base_and_irq() {
        assert_eq!(cmdline_entry(0xc000_0000, 0x1000, 5), "virtio_mmio.device=4K@0xc0000000:5");
    }
}
