//! A device's worker thread: it polls its own descriptors and the wake
//! eventfd, the device wakes it when the guest changed something, and
//! stopping it (on reset and drop) sets its stop flag, wakes it and joins
//! it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// What the worker thread holds: the wake eventfd and the stop flag.
#[derive(Clone)]
pub struct WorkerSignals {
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl WorkerSignals {
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The eventfd to poll (POLLIN) next to the worker's own descriptors.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Consumes pending wake-ups; call after poll returns, before looking
    /// at the device's state, so no later wake-up is lost.
    pub fn consume(&self) {
        let _ = self.wake.read();
    }
}

pub struct DeviceWorker {
    signals: WorkerSignals,
    thread: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    pub fn new() -> std::io::Result<Self> {
        let signals = WorkerSignals { wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?), stop: Arc::default() };
        Ok(Self { signals, thread: None })
    }

    /// Starts `body` on a thread named `name` (a running worker is
    /// stopped first).
    pub fn start(&mut self, name: &str, body: impl FnOnce(WorkerSignals) + Send + 'static) -> std::io::Result<()> {
        self.stop();
        let signals = self.signals.clone();
        self.thread = Some(std::thread::Builder::new().name(name.into()).spawn(move || body(signals))?);
        Ok(())
    }

    pub fn wake(&self) {
        let _ = self.signals.wake.write(1);
    }

    /// Stops the thread and waits for it; it can be started again.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.signals.stop.store(true, Ordering::SeqCst);
        self.wake();
        let _ = thread.join();
        self.signals.stop.store(false, Ordering::SeqCst);
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        self.stop();
    }
}
