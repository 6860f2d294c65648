//! The 8250 UART at 0x3f8 (vm-superio's model): the guest console. Output
//! goes to a writer (the sandbox's console log, stdout, or nowhere when the
//! console is off for speed); interrupts reach the guest through an irqfd.

use std::io::Write;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, WriteOutcome};

/// Eight registers.
pub const PORT_COUNT: u64 = 8;

/// Raises the serial IRQ by signalling its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct Serial<W: Write + Send> {
    uart: Uart<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> Serial<W> {
    pub fn new(irq: EventFd, out: W) -> Self {
        Self { uart: Uart::new(IrqTrigger(irq), out) }
    }

    pub fn writer(&self) -> &W {
        self.uart.writer()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < PORT_COUNT {
            data[0] = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        if data.len() == 1 && offset < PORT_COUNT {
            // A console that cannot be written (a full disk) must not stop
            // the guest.
            let _ = self.uart.write(offset as u8, data[0]);
        }
        WriteOutcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_writer_and_odd_sizes_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Vec::new());
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        s.write(0, b"xy");
        s.write(99, b"z");
        assert_eq!(s.writer(), b"ok\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        let mut wide = [0xffu8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    #[test]
    fn an_enabled_transmit_interrupt_signals_the_irqfd() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), std::io::sink());
        // IER: THR-empty interrupt on; then a byte.
        s.write(1, &[0x02]);
        s.write(0, b"a");
        assert!(irq.read().unwrap() >= 1);
    }
}
