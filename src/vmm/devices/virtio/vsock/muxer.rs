//! Hybrid vsock, the host side (Firecracker's protocol): the guest's
//! stream connections become Unix stream connections on the host.
//!
//! - Host-initiated: a host process connects to the Unix socket `uds`,
//!   writes `CONNECT <port>\n`; the guest is sent a REQUEST to that port,
//!   and once it answers, the host reads `OK <local port>\n` and the stream
//!   is open.
//! - Guest-initiated: a guest connection to host port P is connected to the
//!   Unix socket `<uds>_P`.
//!
//! Data moves under virtio-vsock credit flow control both ways: the guest
//! is never sent more than it has room for, and it is told how much the
//! host side has consumed. A misbehaving guest gets its connection reset;
//! it never blocks or crashes the VMM. The socket files are the owner's to
//! remove (the confined VMM may not unlink).

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::packet::*;

/// Receive buffer the host side offers per connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about consumed credit once this much was forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Most payload per packet to the guest.
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connections a guest may hold open at once.
const MAX_CONNECTIONS: usize = 1024;
/// Control packets owed to the guest. Each connection needs a few at most;
/// past this the guest is not reading its rx queue while sending garbage,
/// and resets (advisory) are dropped instead of growing host memory.
pub const MAX_CONTROL: usize = 2 * MAX_CONNECTIONS + 64;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// We told the guest the host side is gone; waiting for its RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest-to-host bytes not yet written to the host stream.
    pending_out: Vec<u8>,
    /// Host data to read (the poll said so).
    readable: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes of guest data written to the host.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    credit_update_due: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            pending_out: Vec::new(),
            readable: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            credit_update_due: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending_out.is_empty() {
            match self.stream.write(&self.pending_out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending_out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        Ok(())
    }
}

/// What the worker polls for one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Listener,
    /// A host stream that has not said `CONNECT` yet.
    Pending(RawFd),
    /// (readable wanted, writable wanted)
    Conn {
        key: (u32, u32),
        read: bool,
        write: bool,
    },
}

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    conns: BTreeMap<(u32, u32), Conn>,
    pending: BTreeMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Control packets for the guest, in order.
    control: VecDeque<Header>,
    next_local_port: u32,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            uds: uds.to_path_buf(),
            listener,
            conns: BTreeMap::new(),
            pending: BTreeMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    fn reply(&self, key: (u32, u32), op: u16, flags: u32, conn: Option<&Conn>) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: conn.map(|c| c.fwd_cnt).unwrap_or(0),
        }
    }

    /// Queues a control packet; false (nothing queued) when the queue is full.
    fn push_control(&mut self, h: Header) -> bool {
        if self.control.len() >= MAX_CONTROL {
            return false;
        }
        self.control.push_back(h);
        true
    }

    fn reset(&mut self, key: (u32, u32)) {
        self.conns.remove(&key);
        let rst = self.reply(key, OP_RST, 0, None);
        self.push_control(rst);
    }

    /// A packet the guest sent (the tx queue).
    pub fn recv_from_guest(&mut self, h: Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Not for us, or a forged source: dropped.
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            self.reset(key);
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key, &h),
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => {
                    c.state = State::Established;
                    let line = format!("OK {}\n", key.0);
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        self.reset(key);
                    }
                }
                _ => self.reset(key),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key).filter(|c| c.state != State::Connecting) else {
                    self.reset(key);
                    return;
                };
                if c.state == State::Closing {
                    return;
                }
                // The guest may only send what it was given credit for.
                if c.pending_out.len() + data.len() > CONN_BUF_ALLOC as usize {
                    self.reset(key);
                    return;
                }
                c.pending_out.extend_from_slice(data);
                if c.flush().is_err() {
                    self.close_from_host(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.credit_update_due = true;
                }
            }
            OP_SHUTDOWN => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                match self.conns.get_mut(&key) {
                    Some(c) if h.flags & both == both => {
                        // Deliver what is buffered, then the connection ends.
                        let _ = c.flush();
                        self.reset(key);
                    }
                    Some(c) if h.flags & SHUTDOWN_SEND != 0 => {
                        let _ = c.flush();
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                    Some(_) => {}
                    None => self.reset(key),
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            _ => self.reset(key),
        }
    }

    fn guest_connect(&mut self, key: (u32, u32), h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reset(key);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), key.0));
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                let resp = self.reply(key, OP_RESPONSE, 0, Some(&conn));
                if self.push_control(resp) {
                    self.conns.insert(key, conn);
                }
            }
            Err(_) => self.reset(key),
        }
    }

    /// The host side went away: tell the guest (it answers with RST).
    fn close_from_host(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.state = State::Closing;
            c.readable = false;
            let h = self.reply(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, None);
            if !self.push_control(h) {
                self.conns.remove(&key);
            }
        }
    }

    /// Accepts host connections waiting on the listener.
    pub fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() && self.pending.len() < MAX_CONNECTIONS {
                self.pending.insert(stream.as_raw_fd(), (stream, Vec::new()));
            }
        }
    }

    /// Reads the `CONNECT <port>` line of a new host connection.
    pub fn pending_readable(&mut self, fd: RawFd) {
        let Some((stream, line)) = self.pending.get_mut(&fd) else { return };
        let mut b = [0u8; MAX_CONNECT_LINE];
        let n = match stream.read(&mut b) {
            Ok(0) => {
                self.pending.remove(&fd);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => {
                self.pending.remove(&fd);
                return;
            }
        };
        line.extend_from_slice(&b[..n]);
        let Some(end) = line.iter().position(|&c| c == b'\n') else {
            if line.len() >= MAX_CONNECT_LINE {
                self.pending.remove(&fd);
            }
            return;
        };
        let (stream, line) = self.pending.remove(&fd).expect("present");
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .and_then(|l| l.trim().strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            // Not the protocol: closed.
            return;
        };
        // Bytes after the line would be data before the connection exists.
        if end + 1 != line.len() || self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut local = self.next_local_port;
        while self.conns.keys().any(|k| k.0 == local) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local, port);
        let conn = Conn::new(stream, State::Connecting);
        let req = self.reply(key, OP_REQUEST, 0, Some(&conn));
        // No room to announce it: the host stream is closed (dropped here).
        if self.push_control(req) {
            self.conns.insert(key, conn);
        }
    }

    pub fn conn_readable(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.readable = true;
        }
    }

    pub fn conn_writable(&mut self, key: (u32, u32)) {
        let failed = self.conns.get_mut(&key).is_some_and(|c| c.flush().is_err());
        if failed {
            self.close_from_host(key);
        }
    }

    /// The descriptors the worker should poll, and for what.
    pub fn interests(&self) -> Vec<(RawFd, Interest)> {
        let mut out = vec![(self.listener.as_raw_fd(), Interest::Listener)];
        out.extend(self.pending.keys().map(|&fd| (fd, Interest::Pending(fd))));
        for (&key, c) in &self.conns {
            let read = c.state == State::Established && !c.readable && c.peer_credit() > 0;
            let write = !c.pending_out.is_empty();
            if read || write {
                out.push((c.stream.as_raw_fd(), Interest::Conn { key, read, write }));
            }
        }
        out
    }

    /// Whether a packet for the guest may be ready.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.credit_update_due || (c.state == State::Established && c.readable && c.peer_credit() > 0))
    }

    /// The next packet for the guest, with at most `max_data` payload.
    pub fn next_rx(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            let c = self.conns.get_mut(&key).expect("listed");
            if c.state == State::Established && c.readable {
                let room = (c.peer_credit() as usize).min(max_data).min(MAX_PKT_DATA);
                if room > 0 {
                    let mut buf = vec![0u8; room];
                    match c.stream.read(&mut buf) {
                        Ok(0) => {
                            self.close_from_host(key);
                            return self.control.pop_front().map(|h| (h, Vec::new()));
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                            c.last_fwd_cnt_sent = c.fwd_cnt;
                            c.credit_update_due = false;
                            let mut h = self.reply(key, OP_RW, 0, self.conns.get(&key));
                            h.len = n as u32;
                            return Some((h, buf));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            self.close_from_host(key);
                            return self.control.pop_front().map(|h| (h, Vec::new()));
                        }
                    }
                }
            }
            let c = self.conns.get_mut(&key).expect("listed");
            if c.credit_update_due {
                c.credit_update_due = false;
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let h = self.reply(key, OP_CREDIT_UPDATE, 0, self.conns.get(&key));
                return Some((h, Vec::new()));
            }
        }
        None
    }

    /// Drops every connection (device reset).
    pub fn reset_all(&mut self) {
        self.conns.clear();
        self.pending.clear();
        self.control.clear();
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    const GUEST: u64 = 3;

    fn from_guest(src_port: u32, dst_port: u32, op: u16) -> Header {
        super::super::packet::from_guest(GUEST, src_port, dst_port, op)
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        std::iter::from_fn(|| m.next_rx(MAX_PKT_DATA)).collect()
    }

    /// Marks every connection readable as the worker's poll would.
    fn poll(m: &mut Muxer) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        for (_, i) in m.interests() {
            match i {
                Interest::Listener => m.accept(),
                Interest::Pending(fd) => m.pending_readable(fd),
                Interest::Conn { key, read: true, .. } => m.conn_readable(key),
                Interest::Conn { key, write: true, .. } => m.conn_writable(key),
                _ => {}
            }
        }
    }

    #[test]
    fn a_host_connect_becomes_a_guest_request_and_data_flows_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(GUEST, &uds).unwrap();
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        poll(&mut m);
        poll(&mut m);
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid, req.src_cid), (OP_REQUEST, 1024, GUEST, HOST_CID));
        let local = req.src_port;
        m.recv_from_guest(from_guest(1024, local, OP_RESPONSE), &[]);
        let mut lines = BufReader::new(host.try_clone().unwrap());
        let mut line = String::new();
        lines.read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {local}\n"));

        // Guest -> host.
        let mut rw = from_guest(1024, local, OP_RW);
        rw.len = 5;
        m.recv_from_guest(rw, b"hello");
        let mut got = [0u8; 5];
        lines.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Host -> guest, within the guest's credit.
        host.write_all(b"world").unwrap();
        poll(&mut m);
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 1);
        assert_eq!((pkts[0].0.op, pkts[0].0.len, pkts[0].1.as_slice()), (OP_RW, 5, &b"world"[..]));
        assert_eq!(pkts[0].0.fwd_cnt, 5);

        // The host goes away: the guest is told, and answers RST.
        drop(lines);
        drop(host);
        poll(&mut m);
        let pkts = drain(&mut m);
        assert_eq!(pkts.iter().map(|p| p.0.op).collect::<Vec<_>>(), [OP_SHUTDOWN]);
        m.recv_from_guest(from_guest(1024, local, OP_RST), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn a_guest_connect_reaches_the_port_socket_or_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(GUEST, &uds).unwrap();
        let port_listener = UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
        m.recv_from_guest(from_guest(5000, 1025, OP_REQUEST), &[]);
        let (mut accepted, _) = port_listener.accept().unwrap();
        let pkts = drain(&mut m);
        assert_eq!((pkts[0].0.op, pkts[0].0.src_port, pkts[0].0.dst_port), (OP_RESPONSE, 1025, 5000));
        let mut rw = from_guest(5000, 1025, OP_RW);
        rw.len = 3;
        m.recv_from_guest(rw, b"hi!");
        let mut got = [0u8; 3];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi!");
        // Nobody listens on 1026: reset.
        m.recv_from_guest(from_guest(5001, 1026, OP_REQUEST), &[]);
        let pkts = drain(&mut m);
        assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_RST, 5001));
    }

    #[test]
    fn credit_limits_what_the_guest_is_sent_and_updates_release_more() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(GUEST, &uds).unwrap();
        let port_listener = UnixListener::bind(format!("{}_7", uds.display())).unwrap();
        let mut req = from_guest(9, 7, OP_REQUEST);
        req.buf_alloc = 4;
        m.recv_from_guest(req, &[]);
        let (mut host, _) = port_listener.accept().unwrap();
        drain(&mut m);
        host.write_all(b"abcdefgh").unwrap();
        poll(&mut m);
        let pkts = drain(&mut m);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].1, b"abcd");
        // No credit left: the connection is not even polled for reading.
        poll(&mut m);
        assert!(drain(&mut m).is_empty());
        assert!(!m.interests().iter().any(|(_, i)| matches!(i, Interest::Conn { read: true, .. })));
        // The guest consumed 4 bytes.
        let mut update = from_guest(9, 7, OP_CREDIT_UPDATE);
        update.buf_alloc = 4;
        update.fwd_cnt = 4;
        m.recv_from_guest(update, &[]);
        poll(&mut m);
        let pkts = drain(&mut m);
        assert_eq!(pkts[0].1, b"efgh");
        // A credit request is answered with our counters.
        let mut creq = from_guest(9, 7, OP_CREDIT_REQUEST);
        creq.buf_alloc = 4;
        creq.fwd_cnt = 8;
        m.recv_from_guest(creq, &[]);
        let pkts = drain(&mut m);
        assert_eq!((pkts[0].0.op, pkts[0].0.buf_alloc), (OP_CREDIT_UPDATE, CONN_BUF_ALLOC));
    }

    #[test]
    fn attack_vsock_garbage_flood_cannot_grow_the_control_queue() {
        println!("ATTACK a vsock packet flood with the rx queue never read: tried");
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(GUEST, &uds).unwrap();
        for port in 0..100_000u32 {
            let mut rw = from_guest(1, port, OP_RW);
            rw.len = 1;
            m.recv_from_guest(rw, b"x");
        }
        assert_eq!(m.control.len(), MAX_CONTROL, "bounded");
        // Once the guest reads again, the device still works.
        drain(&mut m);
        let port_listener = UnixListener::bind(format!("{}_8", uds.display())).unwrap();
        m.recv_from_guest(from_guest(10, 8, OP_REQUEST), &[]);
        let (_host, _) = port_listener.accept().unwrap();
        let ops: Vec<_> = drain(&mut m).iter().map(|p| p.0.op).collect();
        assert_eq!(ops, [OP_RESPONSE]);
        println!("ATTACK a vsock packet flood with the rx queue never read: held");
    }

    #[test]
    fn bad_guests_get_resets_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut m = Muxer::new(GUEST, &uds).unwrap();
        // Data for a connection that does not exist.
        let mut rw = from_guest(1, 2, OP_RW);
        rw.len = 1;
        m.recv_from_guest(rw, b"x");
        // An unknown op, a datagram type.
        m.recv_from_guest(from_guest(1, 3, 99), &[]);
        let mut dgram = from_guest(1, 4, OP_REQUEST);
        dgram.kind = 2;
        m.recv_from_guest(dgram, &[]);
        // A forged source CID is dropped silently.
        let mut forged = from_guest(1, 5, OP_REQUEST);
        forged.src_cid = 7;
        m.recv_from_guest(forged, &[]);
        let ops: Vec<_> = drain(&mut m).iter().map(|p| (p.0.op, p.0.src_port)).collect();
        assert_eq!(ops, [(OP_RST, 2), (OP_RST, 3), (OP_RST, 4)]);

        // More data than the credit it was given: reset.
        let port_listener = UnixListener::bind(format!("{}_8", uds.display())).unwrap();
        m.recv_from_guest(from_guest(10, 8, OP_REQUEST), &[]);
        let (_host, _) = port_listener.accept().unwrap();
        drain(&mut m);
        let big = vec![0u8; CONN_BUF_ALLOC as usize + 1];
        let mut rw = from_guest(10, 8, OP_RW);
        rw.len = big.len() as u32;
        m.recv_from_guest(rw, &big);
        assert_eq!(m.connection_count(), 0);

        // Host side garbage instead of CONNECT: closed, no request.
        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(b"HELLO there\n").unwrap();
        poll(&mut m);
        poll(&mut m);
        assert!(drain(&mut m).iter().all(|p| p.0.op != OP_REQUEST));
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }
}
