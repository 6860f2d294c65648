//! Where things go in guest physical memory (x86_64), as Firecracker lays
//! it out: boot structures in the first 64 KiB, the kernel at 1 MiB, the
//! MMIO gap in the last GiB below 4 GiB.

/// The GDT the boot code installs.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map, or the zero page (boot_params) of the 64-bit protocol.
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for long mode: PML4, PDPT, and four page
/// directories of 2 MiB pages (the first 4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// How much the boot page tables map (the kernel builds its own).
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// The MP table (more than one vCPU), in the EBDA.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of the low RAM region the e820 map reports (EBDA and BIOS area above).
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Where the kernel is loaded (and high memory starts).
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO gap: 3 GiB to 4 GiB holds no RAM; devices live at its start.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio device windows, one page each, from the gap's start.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The TSS KVM needs on Intel (three pages just below 4 GiB, in the gap).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// First IRQ for virtio-mmio devices (4 is the serial port's).
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// The IOAPIC has 24 pins.
pub const LAST_DEVICE_IRQ: u32 = 23;
/// Legacy ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;

/// The RAM regions of a guest of `mem_size` bytes: below the MMIO gap,
/// and the rest from 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_regions(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
    }
}
