//! The part of the i8042 keyboard controller a microVM needs: the CPU reset
//! line. Writing 0xFE to the command port (0x64) resets the machine, which
//! the VMM turns into the end of the VM.

use super::{BusDevice, WriteOutcome};

/// Ports 0x60..=0x64 (data at 0, command/status at 4).
pub const PORT_COUNT: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            WriteOutcome::Reset
        } else {
            WriteOutcome::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let mut dev = I8042;
        assert_eq!(dev.write(4, &[0xfe]), WriteOutcome::Reset);
        assert_eq!(dev.write(4, &[0xad]), WriteOutcome::Continue);
        assert_eq!(dev.write(0, &[0xfe]), WriteOutcome::Continue);
        assert_eq!(dev.write(4, &[]), WriteOutcome::Continue);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
