//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! learns its CPUs, the IOAPIC and the ISA IRQ routing. Written into the
//! EBDA, where Linux scans for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::super::devices::virtio::Mem;
use super::super::layout::{EBDA_START, MPTABLE_ADDR};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags, as Firecracker reports.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
/// What fits before the end of the EBDA's first KiB.
pub const MAX_VCPUS: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table supports 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    #[error("writing the MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The floating pointer and the configuration table for `vcpus` CPUs, to
/// be placed at `addr`.
pub fn build(addr: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 }]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC pin i, conforming polarity and trigger.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 ExtINT and LINT1 NMI on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUNV    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((addr + 16) as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0);
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `vcpus` into the EBDA.
pub fn write(mem: &Mem, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(MPTABLE_ADDR, vcpus)?;
    debug_assert!(MPTABLE_ADDR + bytes.len() as u64 <= EBDA_START + 0x400);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn the_table_checks_out_and_lists_every_cpu() {
        for vcpus in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(MPTABLE_ADDR, vcpus).unwrap();
            assert!(t.len() <= 0x400, "{vcpus} vCPUs: {} bytes", t.len());
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64, MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let cpus: Vec<_> = table[44..].chunks(20).take(vcpus as usize).map(|e| (e[0], e[1], e[3])).collect();
            assert_eq!(cpus[0], (0, 0, 3));
            assert!(cpus[1..].iter().enumerate().all(|(i, c)| *c == (0, i as u8 + 1, 1)));
        }
        assert!(matches!(build(MPTABLE_ADDR, 0), Err(MpTableError::VcpuCount(0))));
        assert!(build(MPTABLE_ADDR, MAX_VCPUS + 1).is_err());
    }
}
