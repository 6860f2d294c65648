//! The built-in VMM under this machine's real KVM, with tiny guests whose
//! machine code is written here: the vCPU run loop, port and MMIO exits,
//! serial output, the long-mode setup the boot code produces, the i8042
//! reset ending the VM, and a guest driving a virtio-mmio device's
//! registers. Skips with a printed reason where /dev/kvm is absent.

mod common;

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use common::kvm_or_skip;
use runv::vmm::devices::virtio::block::Block;
use runv::vmm::devices::{BusDevice, WriteOutcome};
use runv::vmm::layout::MMIO_GAP_START;
use runv::vmm::vm::{Vm, VmExitReason};
use runv::vmm::x86_64::EntryMode;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x1000;

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// (offset, bytes) of each write.
type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Records what the guest writes; reads return `answer`.
#[derive(Clone, Default)]
struct Recorder {
    writes: Writes,
    answer: u32,
}

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let a = self.answer.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = a.get(i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        WriteOutcome::Continue
    }
}

/// A 2 MiB VM with serial and i8042, the code at 0x1000.
fn vm(code: &[u8]) -> (Vm, SharedBuf) {
    let mut vm = Vm::new(1, 2 << 20).unwrap();
    let out = SharedBuf::default();
    vm.add_serial(Box::new(out.clone())).unwrap();
    vm.add_i8042().unwrap();
    vm.memory().write_slice(code, GuestAddress(CODE)).unwrap();
    (vm, out)
}

fn run(vm: Vm) -> VmExitReason {
    vm.run(Arc::new(AtomicBool::new(false))).unwrap()
}

/// mov al, 0xfe; out 0x64, al: the i8042 reset.
const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];

#[test]
fn a_real_mode_guest_prints_on_the_serial_port_and_resets() {
    if !kvm_or_skip("a_real_mode_guest_prints_on_the_serial_port_and_resets") {
        return;
    }
    let mut code = vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'H', 0xee, // mov al, 'H'; out dx, al
        0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
    ];
    code.extend_from_slice(&RESET);
    code.push(0xf4); // hlt (never reached)
    let (mut vm, out) = vm(&code);
    vm.set_entry(EntryMode::Real, CODE);
    assert_eq!(run(vm), VmExitReason::Reset);
    assert_eq!(&*out.0.lock().unwrap(), b"Hi");
}

#[test]
fn port_reads_and_writes_reach_a_device() {
    if !kvm_or_skip("port_reads_and_writes_reach_a_device") {
        return;
    }
    let mut code = vec![
        0xba, 0x00, 0x05, // mov dx, 0x500
        0xec, // in al, dx
        0xfe, 0xc0, // inc al
        0xee, // out dx, al
    ];
    code.extend_from_slice(&RESET);
    let (mut vm, _) = vm(&code);
    let dev = Recorder { answer: 0x2a, ..Default::default() };
    vm.add_pio_device(0x500, 4, Arc::new(Mutex::new(dev.clone()))).unwrap();
    vm.set_entry(EntryMode::Real, CODE);
    assert_eq!(run(vm), VmExitReason::Reset);
    assert_eq!(*dev.writes.lock().unwrap(), vec![(0, vec![0x2b])]);
}

#[test]
fn a_long_mode_guest_set_up_by_the_boot_code_reaches_mmio_beyond_its_ram() {
    if !kvm_or_skip("a_long_mode_guest_set_up_by_the_boot_code_reaches_mmio_beyond_its_ram") {
        return;
    }
    let mut code = vec![
        0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov rax, 0xd0000000
        0x8b, 0x18, // mov ebx, [rax]
        0x89, 0x58, 0x04, // mov [rax+4], ebx
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'L', 0xee, // mov al, 'L'; out dx, al
    ];
    code.extend_from_slice(&RESET);
    let (mut vm, out) = vm(&code);
    let dev = Recorder { answer: 0x1122_3344, ..Default::default() };
    vm.add_mmio_device(0xd000_0000, 0x1000, Arc::new(Mutex::new(dev.clone()))).unwrap();
    vm.set_entry(EntryMode::Long, CODE);
    assert_eq!(run(vm), VmExitReason::Reset);
    // Only 64-bit code with the identity map up to 4 GiB gets here.
    assert_eq!(&*out.0.lock().unwrap(), b"L");
    assert_eq!(*dev.writes.lock().unwrap(), vec![(4, 0x1122_3344u32.to_le_bytes().to_vec())]);
}

#[test]
fn a_guest_drives_the_registers_of_a_virtio_mmio_device() {
    if !kvm_or_skip("a_guest_drives_the_registers_of_a_virtio_mmio_device") {
        return;
    }
    let mut code = vec![
        0x48, 0xbe, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00, 0x00, 0x00, // mov rsi, 0xc0000000
        0x66, 0xba, 0x00, 0x05, // mov dx, 0x500
        0x8b, 0x06, 0xef, // mov eax, [rsi] (magic); out dx, eax
        0x8b, 0x46, 0x04, 0xef, // version
        0x8b, 0x46, 0x08, 0xef, // device id
        0xc7, 0x46, 0x70, 0x03, 0x00, 0x00, 0x00, // mov dword [rsi+0x70], ACKNOWLEDGE|DRIVER
        0x8b, 0x46, 0x70, 0xef, // status
        0x48, 0x8b, 0x86, 0x00, 0x01, 0x00, 0x00, // mov rax, [rsi+0x100] (capacity)
        0xef, // out dx, eax
    ];
    code.extend_from_slice(&RESET);
    let (mut vm, _) = vm(&code);
    let dev = Recorder::default();
    vm.add_pio_device(0x500, 4, Arc::new(Mutex::new(dev.clone()))).unwrap();
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(8 * 512).unwrap();
    let base = vm.add_virtio(Box::new(Block::open(image.path(), true, "tiny").unwrap())).unwrap();
    assert_eq!(base, MMIO_GAP_START);
    vm.set_entry(EntryMode::Long, CODE);
    assert_eq!(run(vm), VmExitReason::Reset);
    let seen: Vec<u32> =
        dev.writes.lock().unwrap().iter().map(|(_, d)| u32::from_le_bytes(d.as_slice().try_into().unwrap())).collect();
    assert_eq!(seen, [0x7472_6976, 2, 2, 3, 8]);
}

#[test]
fn a_triple_fault_ends_the_vm_as_a_shutdown() {
    if !kvm_or_skip("a_triple_fault_ends_the_vm_as_a_shutdown") {
        return;
    }
    // Long mode with an empty IDT: ud2 faults, then double and triple.
    // (int3 is what this nested KVM cannot emulate.)
    let (mut vm, _) = vm(&[0x0f, 0x0b]);
    vm.set_entry(EntryMode::Long, CODE);
    assert_eq!(run(vm), VmExitReason::Shutdown);
}

#[test]
fn a_stop_from_outside_ends_a_spinning_guest() {
    if !kvm_or_skip("a_stop_from_outside_ends_a_spinning_guest") {
        return;
    }
    let (mut vm, _) = vm(&[0xeb, 0xfe]); // jmp $
    vm.set_entry(EntryMode::Real, CODE);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert_eq!(vm.run(stop).unwrap(), VmExitReason::Stopped);
}

#[test]
fn bad_sizes_are_refused() {
    if !kvm_or_skip("bad_sizes_are_refused") {
        return;
    }
    assert!(Vm::new(0, 2 << 20).is_err());
    assert!(Vm::new(1, 1000).is_err());
    let e = Vm::new(200, 2 << 20).err().unwrap().to_string();
    assert!(e.contains("vCPU count 200"), "{e}");
}
