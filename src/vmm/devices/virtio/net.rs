//! virtio-net on a tap (virtio 1.1, 5.1): one rx and one tx queue in front
//! of a tap queue the VMM inherits, already bridged to the pod's interface
//! by the host (`crate::network`).
//!
//! Offloads: the host opens the tap with a vnet header (`IFF_VNET_HDR`),
//! whose layout is the 12-byte `virtio_net_hdr_v1` in front of every guest
//! frame, so checksum offload and TCP segmentation (TSO) both ways pass
//! through as the header says: the guest may hand over a 64 KiB TCP
//! segment with its checksum left to do, which the host kernel segments
//! (or, on a local path, never needs to), and the tap may hand the guest
//! such segments once the guest acked it can take them (`TUNSETOFFLOAD`).
//! A guest header asking for an offload the guest did not negotiate is
//! dropped here; the host kernel checks the rest of it (the tap's
//! `virtio_net_hdr_to_skb`), as it does for QEMU and vhost-net. On a tap
//! without a vnet header, no offloads are offered: every frame is one
//! Ethernet frame and the header the guest sees is zeros (num_buffers 1).
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

/// The device takes frames with a partial checksum (the guest's tx).
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The guest takes frames with a partial checksum (its rx).
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// What a vnet-header tap lets the device offer.
const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;
/// The device has a MAC address in its config space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The config space has a link status.
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1` (VERSION_1 always has `num_buffers`).
pub const NET_HDR_SIZE: usize = 12;
/// `virtio_net_hdr.flags`: the checksum from csum_start is left to do.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type` values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// The largest frame taken from either side: a TCP segment of 64 KiB
/// (the most Linux hands a device, with or without offloads) and its
/// Ethernet header, a VLAN tag included.
pub const MAX_FRAME: usize = 65536 + 18;

/// TUNSETOFFLOAD, TUNSETVNETHDRSZ and TUNGETIFF (linux/if_tun.h).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// What travels on the tap descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// Bare Ethernet frames: no offloads.
    Raw,
    /// `virtio_net_hdr_v1` and the frame; `tap`: the descriptor is a real
    /// tap, whose offloads are set with TUNSETOFFLOAD (else a test's
    /// datagram socket).
    VnetHdr { tap: bool },
}

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
    wire: Wire,
    /// The features the guest acked.
    acked: u64,
    rx_limit: Option<TokenBucket>,
    tx_limit: Option<TokenBucket>,
    /// When the tx bucket lets the next guest frame go.
    tx_blocked_until: Option<Instant>,
}

pub struct Net {
    mac: Mac,
    limits: RateLimits,
    wire: Wire,
    tap: Arc<File>,
    active: Arc<Mutex<Option<Active>>>,
    counters: Arc<NetCounters>,
    worker: DeviceWorker,
}

impl Net {
    /// A NIC with `mac` on `tap`, a tap queue (or, in tests, anything that
    /// keeps message boundaries, carrying bare frames); it is made
    /// non-blocking. A tap opened with a vnet header gets its header size
    /// set to `NET_HDR_SIZE` and the device offers offloads.
    pub fn new(tap: File, mac: Mac, limits: RateLimits) -> std::io::Result<Self> {
        let wire = match tap_flags(&tap) {
            Ok(flags) if flags & libc::IFF_VNET_HDR != 0 => {
                let size = NET_HDR_SIZE as libc::c_int;
                // SAFETY: TUNSETVNETHDRSZ reads an int we own.
                if unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Wire::VnetHdr { tap: true }
            }
            _ => Wire::Raw,
        };
        Self::on_wire(tap, mac, limits, wire)
    }

    /// A NIC whose descriptor carries `virtio_net_hdr_v1` and the frame
    /// without being a tap (tests and fuzzing: the offload path with a
    /// datagram socket for a tap).
    pub fn with_vnet_header(file: File, mac: Mac, limits: RateLimits) -> std::io::Result<Self> {
        Self::on_wire(file, mac, limits, Wire::VnetHdr { tap: false })
    }

    fn on_wire(tap: File, mac: Mac, limits: RateLimits, wire: Wire) -> std::io::Result<Self> {
        set_nonblocking(&tap)?;
        Ok(Self {
            mac,
            limits,
            wire,
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
                    && match a.wire {
                        Wire::Raw => (&*tap).write(&frame[NET_HDR_SIZE..]).is_ok(),
                        Wire::VnetHdr { .. } => {
                            header_negotiated(&frame[..NET_HDR_SIZE], a.acked) && (&*tap).write(&frame).is_ok()
                        }
                    }
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

/// Whether a guest's tx header asks only for offloads it negotiated: a
/// partial checksum needs CSUM, a TCP segment HOST_TSO4/6 (and CSUM, as
/// the spec requires); ECN and UDP segments are never offered.
fn header_negotiated(hdr: &[u8], acked: u64) -> bool {
    let (flags, gso) = (hdr[0], hdr[1]);
    let csum_ok = flags & !HDR_F_NEEDS_CSUM == 0 && (flags & HDR_F_NEEDS_CSUM == 0 || acked & VIRTIO_NET_F_CSUM != 0);
    let gso_ok = match gso {
        GSO_NONE => true,
        GSO_TCPV4 => acked & VIRTIO_NET_F_HOST_TSO4 != 0,
        GSO_TCPV6 => acked & VIRTIO_NET_F_HOST_TSO6 != 0,
        _ => false,
    };
    csum_ok && gso_ok && (gso == GSO_NONE || flags & HDR_F_NEEDS_CSUM != 0)
}

/// The tap's TUNSETOFFLOAD flags for what the guest acked it can take.
fn tap_offloads(acked: u64) -> libc::c_uint {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= TUN_F_TSO6;
    }
    f
}

/// The TUNGETIFF flags of `fd`, if it is a tun/tap queue.
fn tap_flags(fd: &File) -> std::io::Result<i32> {
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq, which `ifreq` can hold.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF as _, ifreq.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i32::from(i16::from_ne_bytes([ifreq[16], ifreq[17]])))
}

fn set_nonblocking(f: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `packet` (the header and the frame) in the next rx buffer. Returns
/// false when the guest has posted none (the packet waits); a buffer too
/// small for it gets nothing and the packet is dropped.
fn deliver(a: &mut Active, packet: &[u8], counters: &NetCounters) -> bool {
    let mem = a.mem.clone();
    let Some(chain) = a.rx.pop_descriptor_chain(&mem) else { return false };
    let head = chain.head_index();
    let written = match Writer::new(&mem, chain) {
        Ok(mut w) => w.available_bytes() >= packet.len() && w.write_all(packet).is_ok(),
        Err(_) => false,
    };
    let used = if written {
        counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        packet.len() as u32
    } else {
        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        0
    };
    let _ = a.rx.add_used(&mem, head, used);
    true
}

fn rx_worker(tap: Arc<File>, active: Arc<Mutex<Option<Active>>>, counters: Arc<NetCounters>, signals: WorkerSignals) {
    crate::vmm::seccomp::enter(crate::vmm::seccomp::Role::NetWorker);
    // The header, then the frame: a vnet-header tap fills both (all but
    // num_buffers, which is always 1 here); a bare one the frame alone,
    // behind a zero header.
    let mut buf = vec![0u8; NET_HDR_SIZE + MAX_FRAME];
    buf[10..12].copy_from_slice(&1u16.to_le_bytes());
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
        let start = if a.wire == Wire::Raw { NET_HDR_SIZE } else { 0 };
        loop {
            // `len`: the packet's, the header included.
            let (len, mut paid) = match pending.take() {
                Some(p) => p,
                None => match (&*tap).read(&mut buf[start..]) {
                    Ok(n) if start + n > NET_HDR_SIZE => {
                        buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                        (start + n, false)
                    }
                    Ok(_) | Err(_) => break,
                },
            };
            let frame_len = (len - NET_HDR_SIZE) as u64;
            if let Some(bucket) = a.rx_limit.as_mut().filter(|_| !paid) {
                let now = Instant::now();
                if !bucket.take(frame_len, now) {
                    counters.rx_throttled.fetch_add(1, Ordering::Relaxed);
                    rx_blocked_until = Some(now + bucket.wait_for(frame_len, now));
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
        let base = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
        match self.wire {
            Wire::Raw => base,
            Wire::VnetHdr { .. } => base | OFFLOADS,
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], then status (le16).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        super::read_config_space(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: Mem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked: u64,
    ) -> Result<(), ActivateError> {
        let mut q = queues.into_iter();
        let (Some(rx), Some(tx)) = (q.next(), q.next()) else {
            return Err(ActivateError::Device("virtio-net needs its rx and tx queues".into()));
        };
        if !rx.ready() || !tx.ready() {
            return Err(ActivateError::BadQueue(if rx.ready() { 1 } else { 0 }));
        }
        if self.wire == (Wire::VnetHdr { tap: true }) {
            // What the tap may hand the guest: only what the guest acked.
            let offloads = tap_offloads(acked);
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            if unsafe { libc::ioctl(self.tap.as_raw_fd(), TUNSETOFFLOAD as _, offloads) } < 0 {
                let e = std::io::Error::last_os_error();
                return Err(ActivateError::Device(format!("setting the tap's offloads: {e}")));
            }
        }
        let now = Instant::now();
        *Self::lock(&self.active) = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            wire: self.wire,
            acked,
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

/// Whether `fd` is a tap queue as the VMM needs (IFF_NO_PI; with
/// IFF_VNET_HDR, offloads are offered): the flags TUNGETIFF reports, or
/// why not.
pub fn check_tap(fd: &File) -> Result<(), String> {
    let flags = tap_flags(fd).map_err(|e| format!("not a tap queue ({e})"))?;
    if flags & libc::IFF_TAP == 0 {
        return Err("a tun device, not a tap: virtio-net carries Ethernet frames".into());
    }
    if flags & libc::IFF_NO_PI == 0 {
        return Err("the tap must be opened with IFF_NO_PI".into());
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
        rig_on(mem, rx_buffers, rx_len, limits, None)
    }

    /// As `rig`, on a vnet-header wire, the guest having acked `acked`.
    fn rig_vnet(mem: &Mem, rx_buffers: u16, rx_len: u32, acked: u64) -> Rig<'_> {
        rig_on(mem, rx_buffers, rx_len, RateLimits::default(), Some(acked))
    }

    fn rig_on(mem: &Mem, rx_buffers: u16, rx_len: u32, limits: RateLimits, vnet_acked: Option<u64>) -> Rig<'_> {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let bufs: Vec<_> =
            (0..rx_buffers).map(|i| desc(0x10_0000 + u64::from(i) * 0x1_0000, rx_len, F_WRITE, 0)).collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        let (host, vmm) = UnixDatagram::pair().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let file = File::from(std::os::fd::OwnedFd::from(vmm));
        let mut dev = match vnet_acked {
            None => Net::new(file, MAC, limits).unwrap(),
            Some(_) => Net::with_vnet_header(file, MAC, limits).unwrap(),
        };
        let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        dev.activate(mem.clone(), queues, irq.clone(), vnet_acked.unwrap_or(0)).unwrap();
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

    /// A `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
    /// csum_start, csum_offset (num_buffers 0, as a driver sends it).
    fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso];
        for v in [54u16, gso_size, csum_start, csum_offset, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn on_a_vnet_wire_offloads_are_offered_and_headers_pass_both_ways() {
        let acked = VIRTIO_F_VERSION_1 | OFFLOADS;
        let m = mem();
        let mut r = rig_vnet(&m, 2, 0x1_0000, acked);
        assert_eq!(r.dev.features() & OFFLOADS, OFFLOADS);
        // A 32 KiB TCP segment whose checksum is left to the host.
        let mut packet = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
        packet.extend_from_slice(&frame(32 << 10, 0x11));
        r.send(0, &packet);
        let mut got = vec![0u8; 64 << 10];
        let n = r.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &packet[..], "header and frame reach the tap as the guest wrote them");
        // And the other way: the tap's header (DATA_VALID) reaches the
        // guest with num_buffers 1.
        let mut from_tap = hdr(2, GSO_TCPV4, 1448, 0, 0);
        from_tap.extend_from_slice(&frame(40 << 10, 0x22));
        r.host.send(&from_tap).unwrap();
        let rx = r.wait_received(1);
        let mut want = from_tap.clone();
        want[10] = 1;
        assert_eq!(rx[0].0 as usize, want.len());
        assert_eq!(rx[0].1, want);
    }

    #[test]
    fn a_guest_header_asking_for_what_it_did_not_negotiate_is_dropped() {
        // Checksum offload acked, segmentation not.
        let acked = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM;
        let m = mem();
        let mut r = rig_vnet(&m, 0, 0, acked);
        let f = frame(1514, 0x33);
        let with = |h: Vec<u8>| [h, f.clone()].concat();
        r.send(0, &with(hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16))); // TSO not acked
        r.send(1, &with(hdr(HDR_F_NEEDS_CSUM, 0x80 | GSO_TCPV4, 1448, 34, 16))); // ECN never offered
        r.send(2, &with(hdr(2, GSO_NONE, 0, 0, 0))); // DATA_VALID is the device's
        r.send(3, &with(hdr(0, 3, 1448, 0, 0))); // UDP segmentation never offered
        let good = with(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 34, 16));
        r.send(4, &good);
        let mut got = vec![0u8; 4096];
        let n = r.host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &good[..]);
        r.host.set_nonblocking(true).unwrap();
        assert!(r.host.recv(&mut got).is_err(), "only the negotiated frame reaches the tap");
        let c = r.dev.counters();
        assert_eq!((c.tx_frames.load(Ordering::Relaxed), c.tx_dropped.load(Ordering::Relaxed)), (1, 4));
        assert_eq!(r.tx.used().idx().load(), 5);
    }

    #[test]
    fn the_tap_offloads_follow_what_the_guest_acked() {
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_TSO4), 0, "TSO without checksum offload is nothing");
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
    }

    /// A non-persistent tap in this network namespace (root), with or
    /// without a vnet header; None where taps cannot be made.
    fn real_tap(vnet: bool) -> Option<File> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").ok()?;
        let mut ifreq = [0u8; 40];
        ifreq[..10].copy_from_slice(b"rvnettst%d");
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet {
            flags |= libc::IFF_VNET_HDR;
        }
        ifreq[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes the struct ifreq we own.
        (unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) } == 0).then_some(f)
    }

    #[test]
    fn a_vnet_tap_gets_the_header_size_and_the_acked_offloads_and_a_plain_one_none() {
        let (Some(vnet), Some(plain)) = (real_tap(true), real_tap(false)) else {
            eprintln!("SKIP a_vnet_tap_gets_the_header_size_and_the_acked_offloads_and_a_plain_one_none: cannot make a tap here (needs root and /dev/net/tun)");
            return;
        };
        assert!(check_tap(&vnet).is_ok() && check_tap(&plain).is_ok());
        let fd = vnet.as_raw_fd();
        let mut dev = Net::new(vnet, MAC, RateLimits::default()).unwrap();
        assert_eq!(dev.features() & OFFLOADS, OFFLOADS);
        let mut size: libc::c_int = 0;
        const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
        // SAFETY: TUNGETVNETHDRSZ writes an int we own.
        assert_eq!(unsafe { libc::ioctl(fd, TUNGETVNETHDRSZ as _, &mut size) }, 0);
        assert_eq!(size as usize, NET_HDR_SIZE);
        let m = mem();
        let rx = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let tx = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let acked = VIRTIO_F_VERSION_1 | OFFLOADS;
        dev.activate(m.clone(), vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()], irq, acked)
            .expect("the tap takes the offloads the guest acked");
        dev.reset();
        let dev = Net::new(plain, MAC, RateLimits::default()).unwrap();
        assert_eq!(dev.features() & OFFLOADS, 0, "a tap without a vnet header offers no offloads");
    }

    #[test]
    fn macs_parse_or_say_why_not() {
        assert_eq!("02:42:0a:00:00:05".parse::<Mac>().unwrap(), MAC);
        for bad in ["", "02:42:0a:00:00", "02:42:0a:00:00:zz", "02:42:0a:00:00:005", "01:00:5e:00:00:01"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_tap_is_taken() {
        let (_, vmm) = UnixDatagram::pair().unwrap();
        let e = check_tap(&File::from(std::os::fd::OwnedFd::from(vmm))).unwrap_err();
        assert!(e.contains("not a tap"), "{e}");
    }
}
