//! The virtio-vsock device (virtio 1.1, 5.10): rx, tx and event queues in
//! front of the hybrid-vsock muxer. Guest packets are handled when the
//! guest notifies the tx queue; a worker thread polls the host sockets and
//! fills the rx queue as data and guest buffers allow.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::muxer::{Interest, Muxer, MAX_PKT_DATA};
use super::packet::{Header, HEADER_SIZE};
use crate::vmm::devices::virtio::worker::{DeviceWorker, WorkerSignals};
use crate::vmm::devices::virtio::{read_config_space, ActivateError, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;

struct Active {
    mem: Mem,
    rx: Queue,
    tx: Queue,
    _events: Queue,
    interrupt: Interrupt,
}

struct Shared {
    muxer: Muxer,
    active: Option<Active>,
}

pub struct Vsock {
    cid: u64,
    shared: Arc<Mutex<Shared>>,
    worker: DeviceWorker,
}

impl Vsock {
    /// A vsock device for guest `cid` whose host side is the Unix socket
    /// `uds` (and `<uds>_<port>` for guest-initiated connections).
    pub fn new(cid: u64, uds: &Path) -> std::io::Result<Self> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("guest CID {cid} is reserved or too large (3 to 2^32-1)"),
            ));
        }
        let muxer = Muxer::new(cid, uds)?;
        Ok(Self { cid, shared: Arc::new(Mutex::new(Shared { muxer, active: None })), worker: DeviceWorker::new()? })
    }

    fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handles every packet the guest queued for sending.
fn process_tx(s: &mut Shared) {
    let Some(a) = s.active.as_mut() else { return };
    let mem = a.mem.clone();
    let mut chains = Vec::new();
    if let Ok(iter) = a.tx.iter(&mem) {
        chains.extend(iter);
    }
    if chains.is_empty() {
        return;
    }
    for chain in chains {
        let head = chain.head_index();
        if let Ok(mut reader) = Reader::new(&mem, chain) {
            let mut hb = [0u8; HEADER_SIZE];
            if reader.read_exact(&mut hb).is_ok() {
                let h = Header::parse(&hb);
                let len = (h.len as usize).min(reader.available_bytes()).min(MAX_PKT_DATA);
                let mut data = vec![0u8; len];
                if reader.read_exact(&mut data).is_ok() {
                    s.muxer.recv_from_guest(h, &data);
                }
            }
        }
        let a = s.active.as_mut().expect("active");
        let _ = a.tx.add_used(&mem, head, 0);
    }
    s.active.as_ref().expect("active").interrupt.signal_used_queue();
}

/// Moves packets for the guest into rx buffers while there are both.
fn fill_rx(s: &mut Shared) {
    let Some(a) = s.active.as_mut() else { return };
    let mem = a.mem.clone();
    let mut delivered = false;
    while s.muxer.has_rx() {
        let a = s.active.as_mut().expect("active");
        let Some(chain) = a.rx.pop_descriptor_chain(&mem) else { break };
        let head = chain.head_index();
        let used = match Writer::new(&mem, chain) {
            Ok(mut w) if w.available_bytes() >= HEADER_SIZE => {
                let room = w.available_bytes() - HEADER_SIZE;
                match s.muxer.next_rx(room) {
                    Some((h, data)) => {
                        if w.write_all(&h.to_bytes()).is_ok() && w.write_all(&data).is_ok() {
                            (HEADER_SIZE + data.len()) as u32
                        } else {
                            0
                        }
                    }
                    None => {
                        // Nothing after all: give the buffer back.
                        s.active.as_mut().expect("active").rx.go_to_previous_position();
                        break;
                    }
                }
            }
            // A buffer too small for a header, or outside guest memory.
            _ => 0,
        };
        let a = s.active.as_mut().expect("active");
        let _ = a.rx.add_used(&mem, head, used);
        delivered = true;
    }
    if delivered {
        s.active.as_ref().expect("active").interrupt.signal_used_queue();
    }
}

fn worker(shared: Arc<Mutex<Shared>>, signals: WorkerSignals) {
    crate::vmm::seccomp::enter(crate::vmm::seccomp::Role::VsockWorker);
    while !signals.stopping() {
        let interests = Vsock::lock(&shared).muxer.interests();
        let mut fds: Vec<libc::pollfd> = interests
            .iter()
            .map(|(fd, i)| {
                let events = match i {
                    Interest::Conn { read, write, .. } => {
                        (if *read { libc::POLLIN } else { 0 }) | (if *write { libc::POLLOUT } else { 0 })
                    }
                    _ => libc::POLLIN,
                };
                libc::pollfd { fd: *fd, events, revents: 0 }
            })
            .collect();
        fds.push(libc::pollfd { fd: signals.wake_fd(), events: libc::POLLIN, revents: 0 });
        // SAFETY: polling descriptors that stay open while we hold their
        // owners' list (the muxer only closes them under the lock, and a
        // closed one just reports POLLNVAL).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            continue;
        }
        signals.consume();
        let mut s = Vsock::lock(&shared);
        for (pfd, (_, interest)) in fds.iter().zip(&interests) {
            if pfd.revents == 0 {
                continue;
            }
            match *interest {
                Interest::Listener => s.muxer.accept(),
                Interest::Pending(fd) => s.muxer.pending_readable(fd),
                Interest::Conn { key, .. } => {
                    if pfd.revents & libc::POLLOUT != 0 {
                        s.muxer.conn_writable(key);
                    }
                    if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                        s.muxer.conn_readable(key);
                    }
                }
            }
        }
        fill_rx(&mut s);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid: le64 at 0.
        let cid = self.cid.to_le_bytes();
        read_config_space(&cid, offset, data);
    }

    fn activate(&mut self, mem: Mem, queues: Vec<Queue>, interrupt: Interrupt, _: u64) -> Result<(), ActivateError> {
        let mut q = queues.into_iter();
        let (Some(rx), Some(tx), Some(events)) = (q.next(), q.next(), q.next()) else {
            return Err(ActivateError::Device("vsock needs its rx, tx and event queues".into()));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError::BadQueue(if rx.ready() { 1 } else { 0 }));
        }
        Self::lock(&self.shared).active = Some(Active { mem, rx, tx, _events: events, interrupt });
        let shared = self.shared.clone();
        self.worker
            .start("vsock", move |signals| worker(shared, signals))
            .map_err(|e| ActivateError::Device(format!("starting the vsock worker: {e}")))
    }

    fn notify(&mut self, queue: u16) {
        {
            let mut s = Self::lock(&self.shared);
            if queue == TX {
                process_tx(&mut s);
            }
            if queue == TX || queue == RX {
                fill_rx(&mut s);
            }
        }
        // The worker polls again with what changed.
        self.worker.wake();
    }

    fn reset(&mut self) {
        self.worker.stop();
        let mut s = Self::lock(&self.shared);
        s.muxer.reset_all();
        s.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::*;
    use super::*;
    use crate::vmm::devices::virtio::test_util::{desc, wait_for, F_NEXT, F_WRITE};
    use std::os::unix::net::{UnixListener, UnixStream};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const CID: u64 = 3;

    fn mem() -> Mem {
        crate::vmm::devices::virtio::test_util::mem(0x40_0000)
    }

    struct Rig<'a> {
        mem: &'a Mem,
        rx: MockSplitQueue<'a, Mem>,
        tx: MockSplitQueue<'a, Mem>,
        dev: Vsock,
        irq: Interrupt,
        tx_slots: u16,
    }

    /// rx buffers at 0x10_0000 + i * 0x1_0000, tx packets at 0x20_0000.
    fn rig<'a>(mem: &'a Mem, uds: &Path, rx_buffers: u16) -> Rig<'a> {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
        let bufs: Vec<_> =
            (0..rx_buffers).map(|i| desc(0x10_0000 + u64::from(i) * 0x1_0000, 0x1000, F_WRITE, 0)).collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = Vsock::new(CID, uds).unwrap();
        let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap(), ev.create_queue().unwrap()];
        dev.activate(mem.clone(), queues, irq.clone(), 0).unwrap();
        Rig { mem, rx, tx, dev, irq, tx_slots: 0 }
    }

    impl Rig<'_> {
        fn send(&mut self, h: Header, data: &[u8]) {
            let addr = 0x20_0000 + u64::from(self.tx_slots) * 0x1_0000;
            self.mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
            self.mem.write_slice(data, GuestAddress(addr + 0x100)).unwrap();
            // The mock stores `next` as given: absolute indices.
            let first = self.tx_slots * 2;
            let chain =
                [desc(addr, HEADER_SIZE as u32, F_NEXT, first + 1), desc(addr + 0x100, data.len() as u32, 0, 0)];
            self.tx.add_desc_chains(&chain, self.tx_slots * 2).unwrap();
            self.tx_slots += 1;
            self.dev.notify(TX);
        }

        /// The packets the device put in rx buffers so far.
        fn received(&self) -> Vec<(Header, Vec<u8>)> {
            let used = self.rx.used();
            let n = used.idx().load();
            (0..n)
                .map(|i| used.ring().ref_at(i as usize).unwrap().load())
                // Buffers returned empty (too small to hold a packet).
                .filter(|e| e.len() as usize >= HEADER_SIZE)
                .map(|e| {
                    let addr = 0x10_0000 + u64::from(e.id()) * 0x1_0000;
                    let mut hb = [0u8; HEADER_SIZE];
                    self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
                    let h = Header::parse(&hb);
                    let mut data = vec![0u8; e.len() as usize - HEADER_SIZE];
                    self.mem.read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64)).unwrap();
                    (h, data)
                })
                .collect()
        }

        fn wait_received(&self, n: usize) -> Vec<(Header, Vec<u8>)> {
            wait_for(n, || self.received())
        }
    }

    fn guest(src_port: u32, dst_port: u32, op: u16) -> Header {
        super::super::packet::from_guest(CID, src_port, dst_port, op)
    }

    #[test]
    fn the_config_space_holds_the_guest_cid_and_bad_cids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(42, &dir.path().join("v.sock")).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 42);
        assert!(Vsock::new(2, &dir.path().join("w.sock")).is_err());
    }

    #[test]
    fn a_guest_connection_through_the_queues_reaches_the_host_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
        let m = mem();
        let mut r = rig(&m, &uds, 8);
        r.send(guest(4000, 1025, OP_REQUEST), &[]);
        let (mut host, _) = listener.accept().unwrap();
        let got = r.wait_received(1);
        assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RESPONSE, 4000));
        assert!(r.irq.status() & 1 == 1);
        let mut rw = guest(4000, 1025, OP_RW);
        rw.len = 4;
        r.send(rw, b"ping");
        let mut b = [0u8; 4];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        host.write_all(b"pong").unwrap();
        let got = r.wait_received(2);
        assert_eq!((got[1].0.op, got[1].1.as_slice()), (OP_RW, &b"pong"[..]));
    }

    #[test]
    fn a_host_connect_is_announced_to_the_guest_by_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let m = mem();
        let mut r = rig(&m, &uds, 8);
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        let got = r.wait_received(1);
        assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_REQUEST, 1024));
        let local = got[0].0.src_port;
        r.send(guest(1024, local, OP_RESPONSE), &[]);
        let mut line = [0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {local}\n"));
    }

    #[test]
    fn malformed_tx_chains_and_tiny_rx_buffers_do_no_harm() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let m = mem();
        let mut r = rig(&m, &uds, 0);
        // A header outside guest memory, and one cut short.
        r.tx.add_desc_chains(&[desc(0x1000_0000, HEADER_SIZE as u32, 0, 0)], 0).unwrap();
        r.tx.add_desc_chains(&[desc(0x20_0000, 10, 0, 0)], 1).unwrap();
        r.tx_slots = 1;
        r.dev.notify(TX);
        assert_eq!(r.tx.used().idx().load(), 2);
        // A packet for nobody makes an RST, which only fits a real buffer.
        r.send(guest(1, 2, OP_RW), b"x");
        r.rx.add_desc_chains(&[desc(0x10_0000, 8, F_WRITE, 0)], 0).unwrap();
        r.dev.notify(RX);
        let used = r.rx.used();
        assert_eq!(used.idx().load(), 1);
        assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 0);
        r.rx.add_desc_chains(&[desc(0x11_0000, 0x1000, F_WRITE, 0)], 1).unwrap();
        r.dev.notify(RX);
        let got = r.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RST);
        r.dev.reset();
    }
}
