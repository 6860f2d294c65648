//! Devices of the built-in VMM and the buses the vCPUs dispatch port and
//! MMIO exits on.

pub mod i8042;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Continue,
    /// The guest asked for a reset (i8042 0xFE); runv guests reset to stop.
    Reset,
}

/// A device on the port or the MMIO bus. `offset` is from the device's
/// base; accesses are 1, 2, 4 or 8 bytes. A device never panics on what a
/// guest does: bad offsets and sizes read as zeros and writes are ignored.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome;
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices by address range.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), OverlapError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(OverlapError { base, len })?;
        let overlaps = self.devices.range(..end).next_back().is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(OverlapError { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Reads from the device at `addr`; false when none is there (the
    /// buffer then reads as all ones, like an empty ISA bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to nothing are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> WriteOutcome {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => dev.lock().unwrap_or_else(|e| e.into_inner()).write(offset, data),
            None => WriteOutcome::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
            self.0.push((offset, data.to_vec()));
            WriteOutcome::Continue
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset_and_nothing_else() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        // Straddling the end, or outside: nothing there.
        assert!(!bus.read(0x10f, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        bus.write(0x10e, &[1, 2]);
        bus.write(0x110, &[9]);
        assert_eq!(dev.lock().unwrap().0, vec![(0xe, vec![1, 2])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x110, 0x10, dev).unwrap();
    }
}
