//! containerd's PortForward in a runv pod. containerd's CRI plugin dials
//! `localhost:<port>` inside the pod's network namespace on the node, but
//! the pod's processes live in its VM. The shim listens on that
//! namespace's loopback, and one iptables rule in the namespace's own nat
//! table (nothing of the node's changes; the rule goes with the namespace)
//! redirects every TCP connection to 127.0.0.1 there to the listener. Each
//! connection is carried over vsock to the agent, which dials
//! `localhost:<original port>` in the guest (`runv::sandbox::port_forward`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Most forwarded connections at once (the agent's own cap).
const MAX_CONNECTIONS: usize = 256;

/// The listener's task; dropping it stops forwarding.
pub struct Forwarder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts forwarding loopback connections in network namespace `netns`
/// to the guest behind `vsock_socket`.
pub fn start(netns: &Path, vsock_socket: PathBuf) -> Result<Forwarder> {
    let listener = listen_in(netns)?;
    let port = listener.local_addr()?.port();
    // `! --dport`: a connection to the listener itself is not redirected.
    let port_arg = port.to_string();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables", "-w", "5", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1"])
        .args(["!", "--dport", &port_arg, "-j", "REDIRECT", "--to-ports", &port_arg])
        .output()
        .context("running iptables in the pod's network namespace")?;
    if !out.status.success() {
        bail!("iptables in the pod's network namespace: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let listener = TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                log::warn!("port forward: more than {MAX_CONNECTIONS} connections at once; one refused");
                continue;
            };
            let vsock_socket = vsock_socket.clone();
            tokio::spawn(async move {
                if let Err(e) = forward(conn, &vsock_socket, port).await {
                    log::warn!("port forward: {e:#}");
                }
                drop(permit);
            });
        }
    });
    Ok(Forwarder { task })
}

/// A loopback listener made inside `netns` (on a thread of its own, whose
/// namespace change ends with it; the socket stays in the namespace).
fn listen_in(netns: &Path) -> Result<std::net::TcpListener> {
    let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the pod's network namespace")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("listening on the pod's loopback")?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread entering the pod's network namespace panicked"))?
}

async fn forward(mut conn: TcpStream, vsock_socket: &Path, own_port: u16) -> Result<()> {
    let port = original_port(&conn)?;
    if port == own_port {
        bail!("a connection straight to the forwarder's port {own_port}");
    }
    let mut guest = runv::sandbox::port_forward::connect(vsock_socket, port)
        .await
        .map_err(|e| anyhow::anyhow!("localhost:{port} in the pod: {e}"))?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
    Ok(())
}

/// The port a redirected connection was made to (`SO_ORIGINAL_DST`).
fn original_port(conn: &TcpStream) -> Result<u16> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: SO_ORIGINAL_DST writes at most `len` bytes into `addr`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("reading the connection's original port");
    }
    Ok(u16::from_be(addr.sin_port))
}
