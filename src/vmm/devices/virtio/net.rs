//! virtio-net on a tap (virtio 1.1, 5.1): one rx and one tx queue in front
//! of a tap queue the VMM inherits, already bridged to the pod's interface
//! by the host (`crate::network`). No offloads are offered, so every frame
//! is one Ethernet frame of at most the link's MTU and the 12-byte
//! `virtio_net_hdr_v1` in front of it is all zeros (num_buffers 1).
//!
//! The guest's frames are written to the tap when it notifies the tx queue
//! (on the vCPU thread); a worker thread reads the tap and fills rx buffers
//! as the guest posts them, holding at most one frame while it waits for a
//! buffer, so a guest that posts none only stops its own receive path. A
//! malformed chain is completed with nothing done; a frame that fits no
//! buffer is dropped and counted; nothing a guest does stops the VMM.
//!
//! Each direction may be rate limited (`RateLimits`, a token bucket each):
//! a guest frame over the tx limit stays in its queue, and a tap frame
//! over the rx limit waits in the worker, until the bucket refills; the
//! worker wakes for both when it does.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};

use super::worker::{DeviceWorker, WorkerSignals};
use super::{ActivateError, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::devices::rate_limiter::TokenBucket;

pub const VIRTIO_ID_NET: u32 = 1;
const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;

/// The device has a MAC address in its config space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The config space has a link status.
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const NET_HDR_SIZE: usize = 12;
/// The largest frame taken from either side: a tap never carries more
/// than 64 KiB, and without offloads a frame is at most the MTU anyway.
pub const MAX_FRAME: usize = 65535;

/// A MAC address, as `02:42:0a:00:00:05`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a MAC address (six hex pairs separated by ':')");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("'{s}' is a multicast MAC address; a NIC needs a unicast one"));
        }
        Ok(Mac(mac))
    }
}

/// Frames and drops, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Guest frames not sent: malformed chains, oversized or runt frames,
    /// tap write errors.
    pub tx_dropped: AtomicU64,
    /// Tap frames that fit no rx buffer the guest posted.
    pub rx_dropped: AtomicU64,
    /// Times a frame waited for its direction's rate limit.
    pub tx_throttled: AtomicU64,
    pub rx_throttled: AtomicU64,
}

/// Most bytes a second each way (frames without their virtio header);
/// `None`: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub rx: Option<u64>,
    pub tx: Option<u64>,
}

struct Active {
    mem: Mem,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
    rx_limit: Option<TokenBucket>,
    tx_limit: Option<TokenBucket>,
    /// When the tx bucket lets the next guest frame go.
    tx_blocked_until: Option<Instant>,
}

pub struct Net {
    mac: Mac,
    limits: RateLimits,
    tap: Arc<File>,
    active: Arc<Mutex<Option<Active>>>,
    counters: Arc<NetCounters>,
    worker: DeviceWorker,
}

impl Net {
    /// A NIC with `mac` on `tap`, which must be a tap queue (or, in tests,
    /// anything that keeps message boundaries) opened without a vnet
    /// header; it is made non-blocking.
    pub fn new(tap: File, mac: Mac, limits: RateLimits) -> std::io::Result<Self> {
        set_nonblocking(&tap)?;
        Ok(Self {
            mac,
            limits,
            tap: Arc::new(tap),
            active: Arc::default(),
            counters: Arc::default(),
            worker: DeviceWorker::new()?,
        })
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn lock(active: &Mutex<Option<Active>>) -> std::sync::MutexGuard<'_, Option<Active>> {
        active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the guest queued; when the tx limit holds a frame back,
    /// the worker sends it later.
    fn process_tx(&self) {
        let mut guard = Self::lock(&self.active);
        let Some(a) = guard.as_mut() else { return };
        if a.tx_blocked_until.is_some() {
            return;
        }
        send_frames(a, &self.tap, &self.counters);
        if a.tx_blocked_until.is_some() {
            self.worker.wake();
        }
    }
}

/// Sends every frame the guest queued, up to the tx limit: a frame over it
/// goes back to the queue and `tx_blocked_until` says until when.
fn send_frames(a: &mut Active, tap: &File, counters: &NetCounters) {
    let mem = a.mem.clone();
    let mut frame = Vec::with_capacity(2048);
    let mut used = false;
    while let Some(chain) = a.tx.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        frame.clear();
        let sent = match Reader::new(&mem, chain) {
            Ok(mut reader) => {
                let len = reader.available_bytes();
                if let Some(bucket) = a.tx_limit.as_mut().filter(|_| len > NET_HDR_SIZE) {
                    let (bytes, now) = ((len - NET_HDR_SIZE) as u64, Instant::now());
                    if !bucket.take(bytes, now) {
                        a.tx.go_to_previous_position();
                        a.tx_blocked_until = Some(now + bucket.wait_for(bytes, now));
                        counters.tx_throttled.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                (NET_HDR_SIZE + 14..=NET_HDR_SIZE + MAX_FRAME).contains(&len)
                    && {
                        frame.resize(len, 0);
                        reader.read_exact(&mut frame).is_ok()
                    }
                    && (&*tap).write(&frame[NET_HDR_SIZE..]).is_ok()
            }
            Err(_) => false,
        };
        let counter = if sent { &counters.tx_frames } else { &counters.tx_dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = a.tx.add_used(&mem, head, 0);
        used = true;
    }
    if used {
        a.interrupt.signal_used_queue();
    }
}

fn set_nonblocking(f: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `frame` in the next rx buffer. Returns false when the guest has
/// posted none (the frame waits); a buffer too small for it gets nothing
/// and the frame is dropped.
fn deliver(a: &mut Active, frame: &[u8], counters: &NetCounters) -> bool {
    let mem = a.mem.clone();
    let Some(chain) = a.rx.pop_descriptor_chain(&mem) else { return false };
    let head = chain.head_index();
    let used = match Writer::new(&mem, chain) {
        Ok(mut w) if w.available_bytes() >= NET_HDR_SIZE + frame.len() => {
            let mut hdr = [0u8; NET_HDR_SIZE];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            if w.write_all(&hdr).is_ok() && w.write_all(frame).is_ok() {
                counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                (NET_HDR_SIZE + frame.len()) as u32
            } else {
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                0
            }
        }
        _ => {
            counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            0
        }
    };
    let _ = a.rx.add_used(&mem, head, used);
    true
}

fn rx_worker(tap: Arc<File>, active: Arc<Mutex<Option<Active>>>, counters: Arc<NetCounters>, signals: WorkerSignals) {
    crate::vmm::seccomp::enter(crate::vmm::seccomp::Role::NetWorker);
    let mut buf = vec![0u8; MAX_FRAME];
    // A frame read from the tap that waits for an rx buffer or the rx
    // limit, and whether its tokens are taken.
    let mut pending: Option<(usize, bool)> = None;
    let mut rx_blocked_until: Option<Instant> = None;
    while !signals.stopping() {
        // Only ask for tap frames when there is room to hold one: a guest
        // that posts no buffers leaves them queued in the tap (which drops
        // past its own queue length), not in this process.
        let tap_events = if pending.is_none() { libc::POLLIN } else { 0 };
        let mut fds = [
            libc::pollfd { fd: tap.as_raw_fd(), events: tap_events, revents: 0 },
            libc::pollfd { fd: signals.wake_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let tx_blocked_until = Net::lock(&active).as_ref().and_then(|a| a.tx_blocked_until);
        let timeout = poll_timeout([rx_blocked_until, tx_blocked_until], Instant::now());
        // SAFETY: polling two descriptors this thread's owners keep open.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) } < 0 {
            continue;
        }
        signals.consume();
        let mut guard = Net::lock(&active);
        let Some(a) = guard.as_mut() else { continue };
        let now = Instant::now();
        if a.tx_blocked_until.is_some_and(|t| t <= now) {
            a.tx_blocked_until = None;
            send_frames(a, &tap, &counters);
        }
        if rx_blocked_until.is_some_and(|t| t > now) {
            continue;
        }
        rx_blocked_until = None;
        let mut delivered = false;
        loop {
            let (len, mut paid) = match pending.take() {
                Some(p) => p,
                None => match (&*tap).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => (n, false),
                },
            };
            if let Some(bucket) = a.rx_limit.as_mut().filter(|_| !paid) {
                let now = Instant::now();
                if !bucket.take(len as u64, now) {
                    counters.rx_throttled.fetch_add(1, Ordering::Relaxed);
                    rx_blocked_until = Some(now + bucket.wait_for(len as u64, now));
                    pending = Some((len, false));
                    break;
                }
                paid = true;
            }
            if !deliver(a, &buf[..len], &counters) {
                pending = Some((len, paid));
                break;
            }
            delivered = true;
        }
        if delivered {
            a.interrupt.signal_used_queue();
        }
    }
}

/// Milliseconds until the earliest of `deadlines` (rounded up), at most
/// a second.
fn poll_timeout(deadlines: [Option<Instant>; 2], now: Instant) -> i32 {
    let wait = deadlines.iter().flatten().map(|t| t.saturating_duration_since(now)).min();
    let wait = wait.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
    wait.as_micros().div_ceil(1000) as i32
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (le16).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mem: Mem, queues: Vec<Queue>, interrupt: Interrupt, _: u64) -> Result<(), ActivateError> {
        let mut q = queues.into_iter();
        let (Some(rx), Some(tx)) = (q.next(), q.next()) else {
            return Err(ActivateError::Device("virtio-net needs its rx and tx queues".into()));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError::BadQueue(if rx.ready() { 1 } else { 0 }));
        }
        let now = Instant::now();
        *Self::lock(&self.active) = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            rx_limit: self.limits.rx.map(|rate| TokenBucket::new(rate, now)),
            tx_limit: self.limits.tx.map(|rate| TokenBucket::new(rate, now)),
            tx_blocked_until: None,
        });
        let (tap, active, counters) = (self.tap.clone(), self.active.clone(), self.counters.clone());
        self.worker
            .start("net-rx", move |signals| rx_worker(tap, active, counters, signals))
            .map_err(|e| ActivateError::Device(format!("starting the virtio-net worker: {e}")))
    }

    fn notify(&mut self, queue: u16) {
        match queue {
            TX => self.process_tx(),
            // New rx buffers: the worker delivers a waiting frame.
            RX => self.worker.wake(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.worker.stop();
        *Self::lock(&self.active) = None;
    }
}

/// Whether `fd` is a tap queue without a vnet header, as the VMM needs:
/// the flags TUNGETIFF reports, or why not.
pub fn check_tap(fd: &File) -> Result<(), String> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq, which `ifreq` can hold.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF as _, ifreq.as_mut_ptr()) } < 0 {
        return Err(format!("not a tap queue ({})", std::io::Error::last_os_error()));
    }
    let flags = i32::from(i16::from_ne_bytes([ifreq[16], ifreq[17]]));
    if flags & libc::IFF_TAP == 0 {
        return Err("a tun device, not a tap: virtio-net carries Ethernet frames".into());
    }
    if flags & libc::IFF_VNET_HDR != 0 || flags & libc::IFF_NO_PI == 0 {
        return Err("the tap must be opened with IFF_NO_PI and without IFF_VNET_HDR".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{desc, wait_for, F_NEXT, F_WRITE};
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const MAC: Mac = Mac([0x02, 0x42, 0x0a, 0, 0, 5]);

    fn mem() -> Mem {
        super::super::test_util::mem(0x40_0000)
    }

    /// A datagram socket pair keeps frame boundaries, as a tap does.
    struct Rig<'a> {
        mem: &'a Mem,
        rx: MockSplitQueue<'a, Mem>,
        tx: MockSplitQueue<'a, Mem>,
        dev: Net,
        irq: Interrupt,
        host: UnixDatagram,
    }

    /// rx buffers of `rx_len` bytes at 0x10_0000 + i * 0x1_0000.
    fn rig(mem: &Mem, rx_buffers: u16, rx_len: u32) -> Rig<'_> {
        rig_limited(mem, rx_buffers, rx_len, RateLimits::default())
    }

    fn rig_limited(mem: &Mem, rx_buffers: u16, rx_len: u32, limits: RateLimits) -> Rig<'_> {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let bufs: Vec<_> =
            (0..rx_buffers).map(|i| desc(0x10_0000 + u64::from(i) * 0x1_0000, rx_len, F_WRITE, 0)).collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        let (host, vmm) = UnixDatagram::pair().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut dev = Net::new(File::from(std::os::fd::OwnedFd::from(vmm)), MAC, limits).unwrap();
        dev.activate(mem.clone(), vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()], irq.clone(), 0)
            .unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Rig { mem, rx, tx, dev, irq, host }
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..6].copy_from_slice(&MAC.0);
        f
    }

    impl Rig<'_> {
        /// The (used length, bytes) of every rx buffer used so far.
        fn received(&self) -> Vec<(u32, Vec<u8>)> {
            let used = self.rx.used();
            (0..used.idx().load())
                .map(|i| used.ring().ref_at(i as usize).unwrap().load())
                .map(|e| {
                    let mut data = vec![0u8; e.len() as usize];
                    self.mem.read_slice(&mut data, GuestAddress(0x10_0000 + u64::from(e.id()) * 0x1_0000)).unwrap();
                    (e.len(), data)
                })
                .collect()
        }

        fn wait_received(&self, n: usize) -> Vec<(u32, Vec<u8>)> {
            wait_for(n, || self.received())
        }

        /// Queues `bytes` (header and frame) as one tx chain split over two
        /// descriptors, then notifies.
        fn send(&mut self, slot: u16, bytes: &[u8]) {
            let addr = 0x20_0000 + u64::from(slot) * 0x1_0000;
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            let split = bytes.len().min(NET_HDR_SIZE) as u32;
            let chain = [
                desc(addr, split, F_NEXT, slot * 2 + 1),
                desc(addr + u64::from(split), bytes.len() as u32 - split, 0, 0),
            ];
            self.tx.add_desc_chains(&chain, slot * 2).unwrap();
            self.dev.notify(TX);
        }
    }

    #[test]
    fn the_config_space_holds_the_mac_and_a_link_that_is_up() {
        let (_, vmm) = UnixDatagram::pair().unwrap();
        let dev = Net::new(File::from(std::os::fd::OwnedFd::from(vmm)), MAC, RateLimits::default()).unwrap();
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        assert_eq!(b, [0x02, 0x42, 0x0a, 0, 0, 5, 1, 0]);
        let mut past = [0xffu8; 4];
        dev.read_config(6, &mut past);
        assert_eq!(past, [1, 0, 0, 0]);
        assert_ne!(dev.features() & VIRTIO_NET_F_MAC, 0);
    }

    #[test]
    fn guest_frames_reach_the_tap_without_their_header() {
        let m = mem();
        let mut r = rig(&m, 0, 0);
        let f = frame(1514, 0x5a);
        let mut bytes = vec![0u8; NET_HDR_SIZE];
        bytes.extend_from_slice(&f);
        r.send(0, &bytes);
        let mut got = vec![0u8; 4096];
        let n = r.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(r.tx.used().idx().load(), 1);
        assert_eq!(r.irq.status() & 1, 1);
        assert_eq!(r.dev.counters().tx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tap_frames_fill_rx_buffers_in_order_with_a_zero_header() {
        let m = mem();
        let r = rig(&m, 4, 2048);
        for i in 0..3u8 {
            r.host.send(&frame(60 + usize::from(i), i)).unwrap();
        }
        let got = r.wait_received(3);
        assert_eq!(got.len(), 3);
        for (i, (len, bytes)) in got.iter().enumerate() {
            assert_eq!(*len as usize, NET_HDR_SIZE + 60 + i);
            assert_eq!(&bytes[..NET_HDR_SIZE], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            assert_eq!(&bytes[NET_HDR_SIZE..], &frame(60 + i, i as u8)[..]);
        }
        assert_eq!(r.irq.status() & 1, 1);
    }

    #[test]
    fn a_frame_waits_for_the_guest_to_post_a_buffer() {
        let m = mem();
        let mut r = rig(&m, 0, 0);
        r.host.send(&frame(100, 7)).unwrap();
        r.host.send(&frame(101, 8)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(r.received().is_empty());
        r.rx.add_desc_chains(&[desc(0x10_0000, 2048, F_WRITE, 0), desc(0x11_0000, 2048, F_WRITE, 0)], 0).unwrap();
        r.dev.notify(RX);
        let got = r.wait_received(2);
        assert_eq!(got.iter().map(|g| g.0 as usize).collect::<Vec<_>>(), [NET_HDR_SIZE + 100, NET_HDR_SIZE + 101]);
        assert_eq!(r.dev.counters().rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn malformed_tx_chains_and_small_rx_buffers_drop_only_their_frame() {
        let m = mem();
        let mut r = rig(&m, 2, 64);
        // A chain outside guest memory, a runt (header only), then a good one.
        r.tx.add_desc_chains(&[desc(0x1000_0000, 100, 0, 0)], 0).unwrap();
        r.dev.notify(TX);
        r.send(1, &[0u8; NET_HDR_SIZE + 4]);
        let mut good = vec![0u8; NET_HDR_SIZE];
        good.extend_from_slice(&frame(60, 1));
        r.send(2, &good);
        let mut buf = [0u8; 256];
        assert_eq!(r.host.recv(&mut buf).unwrap(), 60);
        r.host.set_nonblocking(true).unwrap();
        assert!(r.host.recv(&mut buf).is_err(), "only the good frame reaches the tap");
        assert_eq!(r.tx.used().idx().load(), 3);
        let c = r.dev.counters();
        assert_eq!((c.tx_frames.load(Ordering::Relaxed), c.tx_dropped.load(Ordering::Relaxed)), (1, 2));

        // 64-byte buffers: a 100-byte frame is dropped, the next one fits.
        r.host.send(&frame(100, 2)).unwrap();
        r.host.send(&frame(40, 3)).unwrap();
        let got = r.wait_received(2);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, (NET_HDR_SIZE + 40) as u32]);
        assert_eq!(c.rx_dropped.load(Ordering::Relaxed), 1);
        r.dev.reset();
    }

    /// 10 frames of 16 KiB against 256 KiB/s: the 64 KiB burst (4 frames)
    /// goes at once, the other 96 KiB take 0.375 s.
    const LIMIT: u64 = 256 << 10;
    const BIG: usize = 16 << 10;

    #[test]
    fn the_rx_limit_holds_tap_frames_back_until_the_bucket_refills() {
        let m = mem();
        let r = rig_limited(&m, 10, 0x8000, RateLimits { rx: Some(LIMIT), tx: None });
        let started = Instant::now();
        for i in 0..10u8 {
            r.host.send(&frame(BIG, i)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let early = r.received().len();
        assert!(early <= 6, "{early} frames within 0.1 s at 256 KiB/s");
        let got = r.wait_received(10);
        let took = started.elapsed();
        assert_eq!(got.len(), 10);
        assert!(took >= Duration::from_millis(300), "10 frames of 16 KiB in {took:?}");
        assert!(got.iter().enumerate().all(|(i, (len, d))| *len as usize == NET_HDR_SIZE + BIG && d[20] == i as u8));
        assert!(r.dev.counters().rx_throttled.load(Ordering::Relaxed) > 0);
        assert_eq!(r.dev.counters().rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_tx_limit_leaves_guest_frames_queued_until_the_bucket_refills() {
        // 8 frames (the 16-entry queue holds 8 two-descriptor chains): 4
        // at once, 64 KiB more in 0.25 s.
        let m = mem();
        let mut r = rig_limited(&m, 0, 0, RateLimits { rx: None, tx: Some(LIMIT) });
        let started = Instant::now();
        let mut bytes = vec![0u8; NET_HDR_SIZE];
        bytes.extend_from_slice(&frame(BIG, 7));
        for slot in 0..8 {
            r.send(slot, &bytes);
        }
        let at_once = r.tx.used().idx().load();
        assert!((4..=6).contains(&at_once), "{at_once} frames sent at once at 256 KiB/s");
        let mut got = vec![0u8; BIG + 1];
        for _ in 0..8 {
            assert_eq!(r.host.recv(&mut got).unwrap(), BIG);
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "8 frames of 16 KiB in {took:?}");
        assert_eq!(wait_for(8, || vec![(); r.tx.used().idx().load() as usize]).len(), 8);
        let c = r.dev.counters();
        assert_eq!((c.tx_frames.load(Ordering::Relaxed), c.tx_dropped.load(Ordering::Relaxed)), (8, 0));
        assert!(c.tx_throttled.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn macs_parse_or_say_why_not() {
        assert_eq!("02:42:0a:00:00:05".parse::<Mac>().unwrap(), MAC);
        for bad in ["", "02:42:0a:00:00", "02:42:0a:00:00:zz", "02:42:0a:00:00:005", "01:00:5e:00:00:01"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_plain_tap_is_taken() {
        let (_, vmm) = UnixDatagram::pair().unwrap();
        let e = check_tap(&File::from(std::os::fd::OwnedFd::from(vmm))).unwrap_err();
        assert!(e.contains("not a tap"), "{e}");
    }
}
