//! Port forwarding into the pod, as the CRI means it: a connection to
//! `localhost:<port>` in the pod's network namespace, which in a runv pod
//! is the guest's own (the VM is the pod's network namespace). The host
//! (`runv cri`'s PortForward, the shim for containerd's) opens a stream to
//! vsock port `guest::PORT_FORWARD_VSOCK_PORT`, sends the TCP port as one
//! line, and gets `guest::PORT_FORWARD_OK` or `error: <why>`; after OK the
//! stream is the TCP connection, both ways, until either end closes.
//!
//! Only the host may connect; each side's bytes are only relayed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept, bind, getpeername, listen, setsockopt, shutdown, socket, sockopt, AddressFamily, Backlog, Shutdown,
    SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;
use runv_proto::guest;

/// Most forwarded connections at once; one more is refused, saying so.
pub const MAX_CONNECTIONS: usize = 256;
/// How long the host has to send the port, and a dial has to succeed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line (a port is at most 5 digits).
const MAX_LINE: usize = 16;

/// Listens on the port-forward vsock port and serves each connection on
/// threads of its own, forever.
pub fn serve() -> Result<()> {
    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("vsock socket")?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, guest::PORT_FORWARD_VSOCK_PORT))
        .context("binding the port-forward port")?;
    listen(&fd, Backlog::new(64).expect("small backlog")).context("listening")?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("port-forward".into()).spawn(move || loop {
        let Ok(conn) = accept(fd.as_raw_fd()) else { continue };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(conn) };
        let active = active.clone();
        let _ = std::thread::Builder::new().name("port-forward-conn".into()).spawn(move || {
            if let Err(e) = session(conn, &active) {
                eprintln!("runv-agent: port forward: {e:#}");
            }
        });
    })?;
    Ok(())
}

/// Releases a connection slot when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn session(conn: OwnedFd, active: &AtomicUsize) -> Result<()> {
    let peer = getpeername::<VsockAddr>(conn.as_raw_fd()).context("peer address")?;
    if peer.cid() != libc::VMADDR_CID_HOST {
        bail!("refused a connection from CID {}: only the host may connect", peer.cid());
    }
    let mut host = std::fs::File::from(conn);
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        let _ =
            host.write_all(format!("error: more than {MAX_CONNECTIONS} forwarded connections at once\n").as_bytes());
        return Ok(());
    }
    let _slot = Slot(active);
    let port = match read_request(&host) {
        Ok(port) => port,
        Err(e) => {
            let _ = host.write_all(format!("error: {e:#}\n").as_bytes());
            return Ok(());
        }
    };
    let pod = match dial_localhost(port) {
        Ok(pod) => pod,
        Err(e) => {
            host.write_all(format!("error: {e}\n").as_bytes()).context("answering the host")?;
            return Ok(());
        }
    };
    host.write_all(guest::PORT_FORWARD_OK.as_bytes()).context("answering the host")?;
    relay(host, pod)
}

/// The port the host asks for: one line of digits, 1 to 65535.
pub fn parse_request(line: &[u8]) -> Result<u16> {
    let text = std::str::from_utf8(line).context("the request is not text")?.trim_end_matches('\n');
    match text.parse::<u16>() {
        Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => bail!("{text:?} is not a TCP port (1-65535)"),
    }
}

fn read_request(host: &std::fs::File) -> Result<u16> {
    set_read_timeout(host, Some(HANDSHAKE_TIMEOUT))?;
    // A byte at a time: what follows the newline is the client's data.
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        match (&*host).read(&mut byte) {
            Ok(0) => bail!("the host closed before naming a port"),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_LINE => line.push(byte[0]),
            Ok(_) => bail!("a request line longer than {MAX_LINE} bytes"),
            Err(e) => return Err(e).context("reading the port"),
        }
    }
    set_read_timeout(host, None)?;
    parse_request(&line)
}

fn set_read_timeout(f: &std::fs::File, timeout: Option<Duration>) -> Result<()> {
    // Zero: no timeout.
    let secs = timeout.map_or(0, |t| t.as_secs() as libc::time_t);
    setsockopt(f, sockopt::ReceiveTimeout, &TimeVal::new(secs, 0)).context("setting a read timeout")
}

/// `localhost:<port>`: IPv4 first, then IPv6, as containerd dials it.
pub fn dial_localhost(port: u16) -> std::result::Result<TcpStream, String> {
    let mut why = Vec::new();
    for addr in [SocketAddr::from(([127, 0, 0, 1], port)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))] {
        match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => why.push(format!("{addr}: {e}")),
        }
    }
    Err(format!("connecting to localhost:{port} in the pod: {}", why.join("; ")))
}

/// Copies both ways until the pod's end closes its side; then the whole
/// connection closes. The host's vsock transports carry only whole closes
/// (vhost-device-vsock drops a half-close), so a half-close here would
/// leave the host waiting; containerd too ends a forward when the pod's
/// side ends.
fn relay(host: std::fs::File, pod: TcpStream) -> Result<()> {
    let (mut host_read, mut pod_write) = (host.try_clone()?, pod.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut host_read, &mut pod_write);
        let _ = pod_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut pod_read, mut host_write) = (pod, host);
    let _ = std::io::copy(&mut pod_read, &mut host_write);
    // Also ends the upstream copy's read.
    let _ = shutdown(host_write.as_raw_fd(), Shutdown::Both);
    let _ = upstream.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_one_port() {
        assert_eq!(parse_request(b"8080").unwrap(), 8080);
        assert_eq!(parse_request(b"65535").unwrap(), 65535);
        for bad in [&b"0"[..], b"65536", b"-1", b"+80", b"80 ", b"", b"\xff"] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_closed_port_is_named() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = unused.local_addr().unwrap().port();
        drop(unused);
        let e = dial_localhost(port).unwrap_err();
        assert!(e.contains(&format!("localhost:{port}")) && e.contains("refused"), "{e}");
    }
}
