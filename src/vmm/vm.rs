//! One KVM virtual machine: guest memory (a shared memfd, so vhost-user
//! backends can map it), the in-kernel IRQ chip and PIT, the port and MMIO
//! buses with their devices, the kernel loaded with its initramfs and
//! command line, and one thread per vCPU running until the guest resets or
//! shuts down, or the VM is stopped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::devices::i8042::{self, I8042};
use super::devices::serial::{self, Serial};
use super::devices::virtio::mmio::{cmdline_entry, MmioTransport};
use super::devices::virtio::{Interrupt, Mem, VirtioDevice};
use super::devices::{Bus, BusDevice, WriteOutcome};
use super::layout::{self, *};
use super::x86_64::{self, mptable, EntryMode};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM {what}: {source}")]
    KvmCall { what: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Setup(#[from] x86_64::SetupError),
    #[error("{0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("loading the kernel {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("initramfs {path}: {reason}")]
    Initramfs { path: String, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("devices: {0}")]
    Devices(String),
    #[error("vCPU count {0} is out of range (1 to {max})", max = mptable::MAX_VCPUS)]
    Vcpus(u8),
}

fn setup_err(msg: String) -> VmError {
    VmError::Setup(x86_64::SetupError::Other(msg))
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset the machine (i8042, reboot): how runv guests stop.
    Reset,
    /// A triple fault or a KVM shutdown exit.
    Shutdown,
    /// Stopped from outside.
    Stopped,
    /// KVM could not go on: the reason and where the vCPU was.
    Failed(String),
}

/// The smallest and largest guest memory accepted.
pub const MIN_MEMORY: u64 = 1 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;

pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    mem: Mem,
    pio: Bus,
    mmio: Bus,
    vcpus: u8,
    next_device: u64,
    next_irq: u32,
    /// `virtio_mmio.device=` entries for the kernel command line.
    device_cmdline: Vec<String>,
    entry: Option<(EntryMode, u64)>,
}

/// The kernel and initramfs, opened before the VMM gives up its access to
/// the host's files.
pub struct BootFiles {
    pub kernel: (PathBuf, File),
    pub initramfs: Option<(PathBuf, File)>,
}

impl BootFiles {
    pub fn open(kernel: &Path, initramfs: Option<&Path>) -> Result<Self, VmError> {
        let kernel_file = File::open(kernel)
            .map_err(|e| VmError::Kernel { path: kernel.display().to_string(), reason: e.to_string() })?;
        let initramfs = match initramfs {
            Some(path) => Some((
                path.to_path_buf(),
                File::open(path)
                    .map_err(|e| VmError::Initramfs { path: path.display().to_string(), reason: e.to_string() })?,
            )),
            None => None,
        };
        Ok(Self { kernel: (kernel.to_path_buf(), kernel_file), initramfs })
    }
}

impl Vm {
    /// A VM with `vcpus` vCPUs and `mem_bytes` of RAM, no devices yet.
    pub fn new(vcpus: u8, mem_bytes: u64) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > mptable::MAX_VCPUS {
            return Err(VmError::Vcpus(vcpus));
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem_bytes) || mem_bytes % 4096 != 0 {
            return Err(VmError::Memory(format!(
                "{mem_bytes} bytes is not a whole number of pages between 1 MiB and 1 TiB"
            )));
        }
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
        let mem = shared_memory(mem_bytes)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for the VM's whole life (the
            // memory object outlives the VM file descriptor's users).
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm_call("registering guest memory"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDR).map_err(kvm_call("setting the TSS address"))?;
        fd.create_irq_chip().map_err(kvm_call("creating the IRQ chip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_call("creating the PIT"))?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            mem,
            pio: Bus::default(),
            mmio: Bus::default(),
            vcpus,
            next_device: MMIO_GAP_START,
            next_irq: FIRST_DEVICE_IRQ,
            device_cmdline: Vec::new(),
            entry: None,
        })
    }

    pub fn memory(&self) -> &Mem {
        &self.mem
    }

    fn irqfd(&self, irq: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Devices(format!("eventfd: {e}")))?;
        self.fd.register_irqfd(&evt, irq).map_err(kvm_call("registering an irqfd"))?;
        Ok(evt)
    }

    /// The 8250 console at 0x3f8, IRQ 4, writing to `out`.
    pub fn add_serial(&mut self, out: Box<dyn Write + Send>) -> Result<(), VmError> {
        let evt = self.irqfd(SERIAL_IRQ)?;
        let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Serial::new(evt, out)));
        self.pio.insert(SERIAL_PORT.into(), serial::PORT_COUNT, dev).map_err(|e| VmError::Devices(e.to_string()))
    }

    /// The i8042 reset line at 0x60..0x64.
    pub fn add_i8042(&mut self) -> Result<(), VmError> {
        let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042));
        self.pio.insert(I8042_PORT.into(), i8042::PORT_COUNT, dev).map_err(|e| VmError::Devices(e.to_string()))
    }

    /// A device on the port bus (tests use it for debug ports).
    pub fn add_pio_device(&mut self, port: u16, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), VmError> {
        self.pio.insert(port.into(), len, dev).map_err(|e| VmError::Devices(e.to_string()))
    }

    /// A device on the MMIO bus at an address of the caller's choosing.
    pub fn add_mmio_device(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Result<(), VmError> {
        self.mmio.insert(base, len, dev).map_err(|e| VmError::Devices(e.to_string()))
    }

    /// A virtio device behind a virtio-mmio window in the MMIO gap with
    /// an IRQ of its own; returns the window's base.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<u64, VmError> {
        if self.next_irq > LAST_DEVICE_IRQ {
            return Err(VmError::Devices("no IRQ left for another virtio device".into()));
        }
        let (base, irq) = (self.next_device, self.next_irq);
        let interrupt = Interrupt::new(self.irqfd(irq)?);
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt);
        self.add_mmio_device(base, MMIO_DEVICE_SIZE, Arc::new(Mutex::new(transport)))?;
        self.device_cmdline.push(cmdline_entry(base, MMIO_DEVICE_SIZE, irq));
        self.next_device += MMIO_DEVICE_SIZE;
        self.next_irq += 1;
        Ok(base)
    }

    /// Loads an uncompressed ELF `vmlinux` (PVH entry when its note is
    /// there, else the 64-bit boot protocol), the initramfs, and the command
    /// line with the devices' entries appended; writes the MP table.
    pub fn load_kernel(&mut self, files: BootFiles, cmdline: &str) -> Result<(), VmError> {
        let BootFiles { kernel: (kernel, mut file), initramfs } = files;
        let kernel_err = |reason: String| VmError::Kernel { path: kernel.display().to_string(), reason };
        let loaded = Elf::load(&self.mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| kernel_err(format!("{e} (runv boots an uncompressed ELF vmlinux)")))?;

        let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmError::Cmdline(e.to_string()))?;
        line.insert_str(cmdline).map_err(|e| VmError::Cmdline(e.to_string()))?;
        for entry in &self.device_cmdline {
            line.insert_str(entry).map_err(|e| VmError::Cmdline(e.to_string()))?;
        }
        load_cmdline(&self.mem, GuestAddress(CMDLINE_ADDR), &line).map_err(|e| VmError::Cmdline(e.to_string()))?;
        let cmdline_len = line.as_cstring().map(|c| c.as_bytes_with_nul().len()).unwrap_or(0);

        let low_end = self.mem.iter().next().map(|r| r.len()).unwrap_or(0);
        let initrd = match initramfs {
            Some((path, file)) => Some(self.load_initramfs(&path, file, loaded.kernel_end, low_end)?),
            None => None,
        };
        mptable::write(&self.mem, self.vcpus)?;
        let ram = layout::ram_regions(self.mem.iter().map(|r| r.len()).sum());
        match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => {
                self.write_pvh_info(&ram, initrd)?;
                self.entry = Some((EntryMode::Pvh, entry.raw_value()));
            }
            _ => {
                self.write_zero_page(&ram, initrd, cmdline_len)?;
                self.entry = Some((EntryMode::Long, loaded.kernel_load.raw_value()));
            }
        }
        Ok(())
    }

    /// Places the initramfs page-aligned at the top of low RAM.
    fn load_initramfs(
        &self,
        path: &Path,
        mut file: File,
        kernel_end: u64,
        low_end: u64,
    ) -> Result<(u64, u64), VmError> {
        let err = |reason: String| VmError::Initramfs { path: path.display().to_string(), reason };
        let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let addr = low_end.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel_end).ok_or_else(|| {
            err(format!("{size} bytes do not fit in guest memory above the kernel; give the VM more memory"))
        })?;
        self.mem
            .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
            .map_err(|e| err(e.to_string()))?;
        Ok((addr, size))
    }

    fn e820(ram: &[(u64, u64)]) -> Vec<(u64, u64)> {
        // Low memory stops at the EBDA; the rest of each region is RAM
        // from 1 MiB on.
        let mut out = vec![(0, EBDA_START)];
        for &(start, len) in ram {
            let start = start.max(HIMEM_START);
            let end = if start < MMIO_GAP_START { len.min(MMIO_GAP_START) } else { start + len };
            if end > start {
                out.push((start, end - start));
            }
        }
        out
    }

    fn write_pvh_info(&self, ram: &[(u64, u64)], initrd: Option<(u64, u64)>) -> Result<(), VmError> {
        const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
        const E820_RAM: u32 = 1;
        let memmap: Vec<hvm_memmap_table_entry> = Self::e820(ram)
            .into_iter()
            .map(|(addr, size)| hvm_memmap_table_entry { addr, size, type_: E820_RAM, reserved: 0 })
            .collect();
        let info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC_VALUE,
            version: 1,
            cmdline_paddr: CMDLINE_ADDR,
            memmap_paddr: MEMMAP_ADDR,
            memmap_entries: memmap.len() as u32,
            nr_modules: u32::from(initrd.is_some()),
            modlist_paddr: if initrd.is_some() { PVH_MODLIST_ADDR } else { 0 },
            ..Default::default()
        };
        let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
        if let Some((paddr, size)) = initrd {
            let module = hvm_modlist_entry { paddr, size, ..Default::default() };
            params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST_ADDR));
        }
        params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_ADDR));
        PvhBootConfigurator::write_bootparams::<Mem>(&params, &self.mem).map_err(|e| setup_err(e.to_string()))
    }

    fn write_zero_page(
        &self,
        ram: &[(u64, u64)],
        initrd: Option<(u64, u64)>,
        cmdline_len: usize,
    ) -> Result<(), VmError> {
        use linux_loader::configurator::linux::LinuxBootConfigurator;
        use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
        let mut params = boot_params::default();
        params.hdr.type_of_loader = 0xff;
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
        params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        params.hdr.cmdline_size = cmdline_len as u32;
        if let Some((addr, size)) = initrd {
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }
        for (i, (addr, size)) in Self::e820(ram).into_iter().enumerate() {
            params.e820_table[i] = boot_e820_entry { addr, size, r#type: 1 };
            params.e820_entries = i as u8 + 1;
        }
        LinuxBootConfigurator::write_bootparams::<Mem>(
            &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
            &self.mem,
        )
        .map_err(|e| setup_err(e.to_string()))
    }

    /// Enters tiny guests at `entry` in `mode` instead of a kernel.
    pub fn set_entry(&mut self, mode: EntryMode, entry: u64) {
        self.entry = Some((mode, entry));
    }

    /// Runs the VM until it ends. `stop`, set from outside, ends it too.
    pub fn run(self, stop: Arc<AtomicBool>) -> Result<VmExitReason, VmError> {
        let (mode, entry) = self.entry.ok_or_else(|| setup_err("no kernel or entry point set".to_string()))?;
        let mut vcpus = Vec::new();
        for id in 0..self.vcpus {
            let vcpu = self.fd.create_vcpu(u64::from(id)).map_err(kvm_call("creating a vCPU"))?;
            x86_64::setup_vcpu(&self.kvm, &vcpu, &self.mem, id, self.vcpus, mode, entry)?;
            if id > 0 && mode != EntryMode::Real {
                // Application processors wait for the boot CPU's INIT/SIPI.
                let mut mp = vcpu.get_mp_state().map_err(kvm_call("reading the MP state"))?;
                mp.mp_state = kvm_bindings::KVM_MP_STATE_UNINITIALIZED;
                vcpu.set_mp_state(mp).map_err(kvm_call("setting the MP state"))?;
            }
            vcpus.push(vcpu);
        }
        install_kick_handler();
        let (tx, rx) = std::sync::mpsc::channel::<VmExitReason>();
        let mut threads = Vec::new();
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let (pio, mmio, tx, stop) = (self.pio.clone(), self.mmio.clone(), tx.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    super::seccomp::enter(super::seccomp::Role::Vcpu);
                    let reason = run_vcpu(id, vcpu, &pio, &mmio, &stop);
                    let _ = tx.send(reason);
                })
                .map_err(|e| setup_err(format!("starting a vCPU thread: {e}")))?;
            threads.push(t);
        }
        drop(tx);
        super::seccomp::enter(super::seccomp::Role::Main);
        // The first vCPU to stop decides; then the others are kicked out of
        // KVM_RUN until they see `stop`.
        let reason = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(reason) => break reason,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => {
                    break VmExitReason::Stopped;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break VmExitReason::Stopped,
            }
        };
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            use std::os::unix::thread::JoinHandleExt;
            while !t.is_finished() {
                // SAFETY: signalling a thread we started, whose handler
                // does nothing; it only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = t.join();
        }
        Ok(reason)
    }
}

fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

fn install_kick_handler() {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installing a handler that does nothing, without SA_RESTART,
    // so a blocked KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
}

/// One vCPU's run loop: port and MMIO exits go to the buses. How the
/// guest ended goes to stderr (the VMM's log), with where this vCPU was:
/// a clean reboot and a guest that crashed into a triple fault both end
/// the VM with status 0, and only RIP tells them apart.
fn run_vcpu(id: usize, mut vcpu: VcpuFd, pio: &Bus, mmio: &Bus, stop: &AtomicBool) -> VmExitReason {
    let ended = |vcpu: &VcpuFd, how: &str, reason: VmExitReason| {
        eprintln!("runv vmm: vcpu{id}: {}", describe_stop(vcpu, how));
        reason
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            return VmExitReason::Stopped;
        }
        let outcome = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port.into(), data);
                WriteOutcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => pio.write(port.into(), data),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
                WriteOutcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
            Ok(VcpuExit::Hlt) => return ended(&vcpu, "halted", VmExitReason::Shutdown),
            Ok(VcpuExit::Shutdown) => {
                return ended(&vcpu, "shutdown exit (a triple fault: reboot=t, or a crash)", VmExitReason::Shutdown)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ended(&vcpu, "reset event", VmExitReason::Reset),
                    _ => ended(&vcpu, &format!("system event {kind}"), VmExitReason::Shutdown),
                };
            }
            Ok(VcpuExit::InternalError) => return VmExitReason::Failed(describe_stop(&vcpu, "KVM internal error")),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExitReason::Failed(format!("KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"));
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                return VmExitReason::Failed(describe_stop(&vcpu, &what));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => WriteOutcome::Continue,
            Err(e) => return VmExitReason::Failed(format!("KVM_RUN: {e}")),
        };
        if outcome == WriteOutcome::Reset {
            return ended(&vcpu, "reset through the i8042", VmExitReason::Reset);
        }
    }
}

/// Where the vCPU stopped, for an error message (RIP and the instruction
/// bytes resolve the stop against System.map in seconds).
fn describe_stop(vcpu: &VcpuFd, what: &str) -> String {
    match vcpu.get_regs() {
        // AMD's KVM reinitialises the vCPU on a shutdown intercept (the
        // VMCB is undefined after one), so the registers read back are the
        // reset state, not where the guest faulted.
        Ok(r) if r.rip == RESET_RIP => {
            format!("{what}; the vCPU reads back in its reset state (rip {RESET_RIP:#x}), so where it faulted is lost")
        }
        Ok(r) => format!("{what} at rip {:#x} (rflags {:#x})", r.rip, r.rflags),
        Err(_) => what.to_string(),
    }
}

/// The instruction pointer of an x86 vCPU after RESET or INIT (with CS's
/// base at 0xffff0000). The guest never runs there: the VMM enters the
/// kernel in 64-bit mode.
const RESET_RIP: u64 = 0xfff0;

/// Guest RAM backed by one memfd, mapped shared (vhost-user backends map
/// it too), laid out around the MMIO gap.
pub fn shared_memory(mem_bytes: u64) -> Result<Mem, VmError> {
    let fd = nix::sys::memfd::memfd_create(c"runv-guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| VmError::Memory(format!("memfd_create: {e}")))?;
    let file = Arc::new(File::from(fd));
    file.set_len(mem_bytes).map_err(|e| VmError::Memory(format!("sizing guest memory: {e}")))?;
    let mut offset = 0;
    let ranges: Vec<_> = layout::ram_regions(mem_bytes)
        .into_iter()
        .map(|(start, len)| {
            let r = (GuestAddress(start), len as usize, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len;
            r
        })
        .collect();
    Mem::from_ranges_with_files(ranges).map_err(|e| VmError::Memory(e.to_string()))
}
