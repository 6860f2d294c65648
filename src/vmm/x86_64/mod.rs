//! x86_64 vCPU and memory setup for boot: page tables, GDT, segment and
//! control registers, general registers, FPU, MSRs, CPUID, LAPIC, and the
//! MP table.

pub mod gdt;
pub mod mptable;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::devices::virtio::Mem;
use super::layout::*;
use gdt::{kvm_segment_from_gdt, GDT_LONG_MODE, GDT_PVH};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("writing boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("{0}")]
    Other(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |source| SetupError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, `rbx` = hvm_start_info (PVH).
    Pvh,
    /// 64-bit long mode with identity page tables, `rsi` = boot_params.
    Long,
    /// Real mode at `cs:ip` (tiny guests only).
    Real,
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
pub fn write_page_tables(mem: &Mem) -> Result<(), SetupError> {
    let pd_count = IDENTITY_MAPPED >> 30;
    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries map 2 MiB pages.
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    for i in 0..pd_count {
        let pd = PD_ADDR + i * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_ADDR + i * 8))?;
        for j in 0..512u64 {
            let addr = ((i * 512) + j) << 21;
            mem.write_obj(addr | 0x83, GuestAddress(pd + j * 8))?;
        }
    }
    Ok(())
}

/// Writes the GDT and an empty IDT, and the segment and control registers
/// for `mode`, into `sregs`.
pub fn setup_sregs(mem: &Mem, sregs: &mut kvm_sregs, mode: EntryMode) -> Result<(), SetupError> {
    if mode == EntryMode::Real {
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
            seg.base = 0;
            seg.selector = 0;
        }
        return Ok(());
    }
    let table = if mode == EntryMode::Pvh { GDT_PVH } else { GDT_LONG_MODE };
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = kvm_segment_from_gdt(table[1], 1);
    let data = kvm_segment_from_gdt(table[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(table[3], 3);
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
        }
        EntryMode::Long => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Real => unreachable!(),
    }
    Ok(())
}

/// Registers for entering at `entry`: PVH passes the start info in `rbx`,
/// the 64-bit protocol the zero page in `rsi` and a stack.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, rip: entry, ..Default::default() };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_ADDR,
        EntryMode::Long => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Real => {}
    }
    regs
}

/// Sets up one vCPU to enter the guest at `entry`.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &Mem,
    id: u8,
    vcpus: u8,
    mode: EntryMode,
    entry: u64,
) -> Result<(), SetupError> {
    vcpu.set_cpuid2(&cpuid(kvm, id, vcpus)?).map_err(kvm_err("setting CPUID"))?;
    vcpu.set_msrs(&boot_msrs()?).map_err(kvm_err("setting the boot MSRs"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("reading segment registers"))?;
    setup_sregs(mem, &mut sregs, mode)?;
    vcpu.set_sregs(&sregs).map_err(kvm_err("setting segment registers"))?;
    vcpu.set_regs(&boot_regs(mode, entry)).map_err(kvm_err("setting registers"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err("setting the FPU"))?;
    set_lint(vcpu)?;
    Ok(())
}

/// The host's CPUID as KVM supports it, with this vCPU's APIC id, the
/// hypervisor bit, and the topology of `vcpus` single-thread cores.
pub fn cpuid(kvm: &Kvm, id: u8, vcpus: u8) -> Result<CpuId, SetupError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("reading supported CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(vcpus) << 16);
                // ECX[31]: running under a hypervisor.
                e.ecx |= 1 << 31;
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count is valid
                }
            }
            0xb => {
                // x2APIC id of this vCPU.
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The MSRs a booting kernel expects (Firecracker's set): syscall MSRs
/// cleared, fast strings on, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Result<Msrs, SetupError> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ])
    .map_err(|e| SetupError::Other(format!("building the MSR list: {e:?}")))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 as ExtINT (the PIC's line), LINT1 as NMI, as on a PC.
fn set_lint(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("reading the LAPIC"))?;
    let set = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("setting the LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        for i in 0..4u64 {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPT_ADDR + i * 8)).unwrap();
            assert_eq!(pdpte, (PD_ADDR + i * 0x1000) | 3);
        }
        let first: u64 = m.read_obj(GuestAddress(PD_ADDR)).unwrap();
        assert_eq!(first, 0x83);
        // The last 2 MiB page below 4 GiB.
        let last: u64 = m.read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8)).unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_64_bit_code() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, &mut sregs, EntryMode::Long).unwrap();
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.l, sregs.cs.selector, sregs.ds.selector), (1, 8, 16));
        let gdt1: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, GDT_LONG_MODE[1]);
    }

    #[test]
    fn pvh_sregs_are_flat_protected_mode_without_paging() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&m, &mut sregs, EntryMode::Pvh).unwrap();
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.limit), (1, 0, 0xffff_ffff));
        let regs = boot_regs(EntryMode::Pvh, 0x100_0000);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0000, PVH_INFO_ADDR, 2));
        let regs = boot_regs(EntryMode::Long, 0x100_0000);
        assert_eq!((regs.rsi, regs.rsp), (ZERO_PAGE_ADDR, BOOT_STACK_POINTER));
    }

    #[test]
    fn the_boot_msr_list_builds() {
        assert_eq!(boot_msrs().unwrap().as_slice().len(), 11);
    }
}
