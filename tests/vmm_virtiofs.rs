//! The built-in VMM's vhost-user-fs frontend against a real virtiofsd: the
//! handshake, the memory table (the VM's shared memfd), the vrings, and a
//! FUSE_INIT request placed in the request queue as a guest driver would,
//! answered by virtiofsd through guest memory and the interrupt relay.
//! Needs root and virtiofsd; skips with a printed reason otherwise.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runv::vmm::devices::virtio::fs::VhostUserFs;
use runv::vmm::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use runv::vmm::vm::shared_memory;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const FUSE_INIT: u32 = 26;

fn ready(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let virtiofsd = runv::helper::find_program(Path::new("virtiofsd")).is_some();
    if !root || !virtiofsd {
        eprintln!("SKIP {test}: needs root and virtiofsd (scripts/install.sh)");
    }
    root && virtiofsd
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn virtiofsd_answers_fuse_init_through_guest_memory() {
    if !ready("virtiofsd_answers_fuse_init_through_guest_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("fs.sock");
    let _daemon = Daemon(
        Command::new("virtiofsd")
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--cache=never", "--log-level=error"])
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "virtiofsd did not create its socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mem = shared_memory(16 << 20).unwrap();
    let mut fs = VhostUserFs::connect(&socket, "runv").unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_ne!(fs.features() & VIRTIO_F_VERSION_1, 0);
    let mut tag = [0u8; 4];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag, b"runv");
    let mut nqueues = [0u8; 4];
    fs.read_config(36, &mut nqueues);
    assert_eq!(u32::from_le_bytes(nqueues), 1);

    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let request = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    // FUSE_INIT: fuse_in_header (40 bytes) + fuse_init_in (64 bytes), and
    // room for fuse_out_header (16) + fuse_init_out (64).
    let (req_addr, out_addr) = (0x10_0000u64, 0x20_0000u64);
    let mut req = Vec::new();
    req.extend_from_slice(&104u32.to_le_bytes()); // len
    req.extend_from_slice(&FUSE_INIT.to_le_bytes());
    req.extend_from_slice(&1u64.to_le_bytes()); // unique
    req.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    req.extend_from_slice(&7u32.to_le_bytes()); // major
    req.extend_from_slice(&31u32.to_le_bytes()); // minor
    req.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    req.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
    assert_eq!(req.len(), 104);
    mem.write_slice(&req, GuestAddress(req_addr)).unwrap();
    let chain = [
        RawDescriptor::from(SplitDescriptor::new(req_addr, 104, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(out_addr, 80, F_WRITE, 0)),
    ];
    request.add_desc_chains(&chain, 0).unwrap();

    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let queues: Vec<Queue> = vec![hiprio.create_queue().unwrap(), request.create_queue().unwrap()];
    fs.activate(mem.clone(), queues, irq.clone(), VIRTIO_F_VERSION_1).unwrap();
    fs.notify(1);

    let deadline = Instant::now() + Duration::from_secs(10);
    while request.used().idx().load() == 0 {
        assert!(Instant::now() < deadline, "virtiofsd did not answer FUSE_INIT");
        std::thread::sleep(Duration::from_millis(10));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while irq.status() & 1 == 0 {
        assert!(Instant::now() < deadline, "the answer did not raise the interrupt");
        std::thread::sleep(Duration::from_millis(10));
    }
    let used = request.used().ring().ref_at(0).unwrap().load();
    assert!(used.len() >= 16 + 24, "answer length {}", used.len());
    let out: [u8; 24] = mem.read_obj(GuestAddress(out_addr)).unwrap();
    let len = u32::from_le_bytes(out[0..4].try_into().unwrap());
    let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
    let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
    let major = u32::from_le_bytes(out[16..20].try_into().unwrap());
    assert_eq!((error, unique, major), (0, 1, 7), "fuse_out_header len {len}");
    assert_eq!(len, used.len());
    fs.reset();
}

#[test]
fn a_missing_backend_or_bad_tag_is_a_clear_error() {
    if !ready("a_missing_backend_or_bad_tag_is_a_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let err = VhostUserFs::connect(&dir.path().join("nobody.sock"), "runv").err().unwrap().to_string();
    assert!(err.contains("nobody.sock") && err.contains("connecting"), "{err}");
    let err = VhostUserFs::connect(&dir.path().join("x"), &"t".repeat(37)).err().unwrap().to_string();
    assert!(err.contains("1 to 36 bytes"), "{err}");
}
