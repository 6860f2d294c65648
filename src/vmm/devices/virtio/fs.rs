//! virtio-fs through a vhost-user backend (virtiofsd): the VMM only keeps
//! the virtio-mmio registers and the config space (tag, queue count); the
//! queues are handed to the backend, which maps guest memory (a shared
//! memfd) and serves FUSE requests itself. Guest notifications become
//! writes to the backend's kick eventfds; the backend's call eventfds are
//! relayed to the guest's interrupt (virtio-mmio needs the interrupt
//! status bit set, so they cannot go to KVM directly).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_FS: u32 = 26;
const QUEUE_SIZE: u16 = 1024;
/// One high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
const TAG_LEN: usize = 36;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag '{0}' must be 1 to 36 bytes")]
    Tag(String),
    #[error("vhost-user backend {path}: {what}: {source}")]
    Backend { path: String, what: &'static str, source: vhost::Error },
}

pub struct VhostUserFs {
    frontend: Frontend,
    socket: String,
    tag: String,
    backend_features: u64,
    acked_protocol: bool,
    relay: Option<(JoinHandle<()>, Arc<AtomicBool>, Arc<EventFd>)>,
    kicks: Vec<EventFd>,
}

impl VhostUserFs {
    /// Connects to the backend at `socket` and learns its features; the
    /// guest sees a virtio-fs device with `tag`.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let path = socket.display().to_string();
        let err = |what| {
            let path = path.clone();
            move |source| FsError::Backend { path, what, source }
        };
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(err("connecting"))?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let mut acked_protocol = false;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend.get_protocol_features().map_err(err("GET_PROTOCOL_FEATURES"))?;
            // Nothing beyond the basics: replies are synchronous anyway.
            frontend
                .set_protocol_features(offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG))
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            acked_protocol = true;
        }
        Ok(Self {
            frontend,
            socket: path,
            tag: tag.into(),
            backend_features,
            acked_protocol,
            relay: None,
            kicks: Vec::new(),
        })
    }

    fn setup(&mut self, mem: &Mem, queues: &[Queue], acked: u64) -> Result<Vec<EventFd>, ActivateError> {
        let mut features = acked & self.backend_features;
        if self.acked_protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend.set_features(features).map_err(|e| self.err("SET_FEATURES", e))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err("describing guest memory (it must be file-backed)", e))?;
        self.frontend.set_mem_table(&regions).map_err(|e| self.err("SET_MEM_TABLE", e))?;
        let host = |addr: u64| -> Result<u64, ActivateError> {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|e| ActivateError::Device(format!("queue address {addr:#x}: {e}")))
        };
        let mut calls = Vec::new();
        self.kicks.clear();
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError::Device(format!("eventfd: {e}")))?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError::Device(format!("eventfd: {e}")))?;
            self.frontend.set_vring_num(i, q.size()).map_err(|e| self.err("SET_VRING_NUM", e))?;
            self.frontend.set_vring_addr(i, &config).map_err(|e| self.err("SET_VRING_ADDR", e))?;
            self.frontend.set_vring_base(i, 0).map_err(|e| self.err("SET_VRING_BASE", e))?;
            self.frontend.set_vring_call(i, &call).map_err(|e| self.err("SET_VRING_CALL", e))?;
            self.frontend.set_vring_kick(i, &kick).map_err(|e| self.err("SET_VRING_KICK", e))?;
            if self.acked_protocol {
                self.frontend.set_vring_enable(i, true).map_err(|e| self.err("SET_VRING_ENABLE", e))?;
            }
            calls.push(call);
            self.kicks.push(kick);
        }
        Ok(calls)
    }

    fn err(&self, what: &str, e: vhost::Error) -> ActivateError {
        ActivateError::Device(format!("vhost-user backend {}: {what}: {e}", self.socket))
    }

    fn stop_relay(&mut self) {
        if let Some((thread, stop, wake)) = self.relay.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = wake.write(1);
            let _ = thread.join();
        }
    }
}

/// Forwards the backend's "used buffers" signals to the guest interrupt.
fn relay(calls: Vec<EventFd>, wake: Arc<EventFd>, stop: Arc<AtomicBool>, interrupt: Interrupt) {
    crate::vmm::seccomp::enter(crate::vmm::seccomp::Role::FsIrq);
    while !stop.load(Ordering::SeqCst) {
        let mut fds: Vec<libc::pollfd> =
            calls.iter().map(|c| libc::pollfd { fd: c.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        fds.push(libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        // SAFETY: polling eventfds this thread owns.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } <= 0 {
            continue;
        }
        let mut signalled = false;
        for (pfd, call) in fds.iter().zip(&calls) {
            if pfd.revents & libc::POLLIN != 0 && call.read().is_ok() {
                signalled = true;
            }
        }
        if signalled {
            interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        // What the guest may negotiate: what the backend offers of the
        // virtio features this transport carries.
        VIRTIO_F_VERSION_1 & self.backend_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        super::read_config_space(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: Mem,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked: u64,
    ) -> Result<(), ActivateError> {
        let calls = self.setup(&mem, &queues, acked)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError::Device(format!("eventfd: {e}")))?);
        let (s, w) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("virtiofs-irq".into())
            .spawn(move || relay(calls, w, s, interrupt))
            .map_err(|e| ActivateError::Device(format!("starting the interrupt relay: {e}")))?;
        self.relay = Some((thread, stop, wake));
        Ok(())
    }

    fn notify(&mut self, queue: u16) {
        if let Some(kick) = self.kicks.get(queue as usize) {
            let _ = kick.write(1);
        }
    }

    fn reset(&mut self) {
        self.stop_relay();
        self.kicks.clear();
        let _ = self.frontend.reset_owner();
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        self.stop_relay();
    }
}
