//! The SPDY/3.1 transport, as the kubelet's streaming server speaks it
//! (k8s.io/apimachinery's httpstream and the kubelet's remotecommand and
//! portforward handlers), over runv's own framing (`crate::cri::spdy`).
//!
//! The client names its protocols in `X-Stream-Protocol-Version` and opens
//! every stream itself, each with a `streamType` header:
//! - exec and attach (`v4.channel.k8s.io` .. `channel.k8s.io`): `error`,
//!   then `stdin`, `stdout`, `stderr` as the request asked (no stderr with
//!   a tty) and, from v3, `resize` with a tty; the session starts once all
//!   are open (within 30 s). The final status goes on the error stream: a
//!   Kubernetes `Status` in v4, the failure's text in v1 to v3.
//! - port forwarding (`portforward.k8s.io`): a `data` and an `error`
//!   stream per forwarded connection, paired by their `requestID` header
//!   and naming the pod's port in `port`; each pair is one connection to
//!   `localhost:<port>` in the pod, which is its VM; it ends when the pod's
//!   side closes (the data stream's FIN) or the client resets a stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{
    failure_message, refuse, status_json, Head, Input, Output, Pending, Session, StreamServer, STREAM_QUEUE_FRAMES,
};
use crate::cri::runtime::Runtime;
use crate::cri::spdy::{self as frames, Frame, FrameReader, Out};

/// The remotecommand protocols served (the kubelet's, for SPDY).
const REMOTECOMMAND: &[&str] = &["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"];
const PORTFORWARD: &[&str] = &["portforward.k8s.io"];
/// How long a client has to open a session's streams, or the second
/// stream of a forwarded connection (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Forwarded connections open at once on one SPDY connection.
const MAX_FORWARDS: usize = 128;
/// The most bytes of an unfinished resize message kept.
const MAX_RESIZE_MESSAGE: usize = 4 << 10;
/// How long the client has to close its side after the last frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

type Reader = FrameReader<OwnedReadHalf>;

pub(super) async fn serve(
    server: &StreamServer,
    mut conn: TcpStream,
    head: Head,
    read_ahead: Vec<u8>,
    runtime: Arc<Runtime>,
) {
    let supported = if head.path.starts_with("/portforward/") { PORTFORWARD } else { REMOTECOMMAND };
    let offered = head.values("x-stream-protocol-version");
    // No header at all: a client from before negotiation, which speaks v1.
    let protocol = match offered.iter().find(|o| supported.contains(&o.as_str())) {
        Some(p) => p.clone(),
        None if offered.is_empty() => String::new(),
        None => {
            let accepted: Vec<_> = supported.iter().map(|p| ("X-Accepted-Stream-Protocol-Versions", *p)).collect();
            let why = format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {supported:?}"
            );
            return refuse(&mut conn, 403, &accepted, &why).await;
        }
    };
    let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
    if !protocol.is_empty() {
        headers.push(("X-Stream-Protocol-Version", protocol.as_str()));
    }
    let Some(request) = server.upgrade(&mut conn, &head.path, &headers).await else { return };
    let (read, write) = conn.into_split();
    let mut reader = FrameReader::new(read, read_ahead);
    let (out, writer) = frames::spawn_writer(write);
    let reader = match request {
        Pending::PortForward(req) => {
            port_forward(&runtime, &req.pod_sandbox_id, &mut reader, &out).await;
            Some(reader)
        }
        request => remote_command(&runtime, request, &protocol, reader, &out).await,
    };
    let _ = out.send(Out::GoAway).await;
    drop(out);
    let _ = writer.await;
    // Read until the client closes, so bytes it sent last cannot turn our
    // close into a reset that loses what it has not read yet.
    if let Some(mut reader) = reader {
        let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Ok(Some(_)) = reader.next().await {} }).await;
    }
}

/// A session's streams, by type.
#[derive(Default, Clone, Copy)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Streams {
    fn slot(&mut self, stream_type: &str) -> Option<&mut Option<u32>> {
        Some(match stream_type {
            "error" => &mut self.error,
            "stdin" => &mut self.stdin,
            "stdout" => &mut self.stdout,
            "stderr" => &mut self.stderr,
            "resize" => &mut self.resize,
            _ => return None,
        })
    }

    fn all(&self) -> impl Iterator<Item = u32> {
        [self.error, self.stdin, self.stdout, self.stderr, self.resize].into_iter().flatten()
    }
}

/// The remotecommand version: 4 for `v4.channel.k8s.io`, 1 for
/// `channel.k8s.io` or none.
fn version_of(protocol: &str) -> u8 {
    protocol.strip_prefix('v').and_then(|p| p.split('.').next()).and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Exec or attach: waits for the client's streams, then runs the session;
/// returns the reader when the connection is still open.
async fn remote_command(
    runtime: &Runtime,
    request: Pending,
    protocol: &str,
    mut reader: Reader,
    out: &mpsc::Sender<Out>,
) -> Option<Reader> {
    let version = version_of(protocol);
    let (stdin, stdout, stderr, tty) = match &request {
        Pending::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        Pending::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        Pending::PortForward(_) => unreachable!(),
    };
    let expected = 1 + [stdin, stdout, stderr && !tty, tty && version >= 3].iter().filter(|w| **w).count();
    let mut streams = Streams::default();
    let mut opened = 0;
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while opened < expected {
        let frame = match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Ok(Some(frame))) => frame,
            Ok(Err(e)) => {
                tracing::info!("streaming: {} session: {e}", request.kind());
                return None;
            }
            Ok(Ok(None)) => return None,
            Err(_) => {
                tracing::info!(
                    "streaming: {} session: the client opened {opened} of {expected} streams in {} s",
                    request.kind(),
                    STREAM_CREATION_TIMEOUT.as_secs()
                );
                return Some(reader);
            }
        };
        match frame {
            Frame::BadStreamId { id } => {
                let _ = out.send(Out::Reset { id, status: frames::PROTOCOL_ERROR }).await;
            }
            Frame::SynStream { id, headers, .. } => {
                let stream_type = headers.get("streamtype").unwrap_or_default().to_string();
                match streams.slot(&stream_type) {
                    Some(slot) => {
                        *slot = Some(id);
                        opened += 1;
                        let _ = out.send(Out::Reply { id, refuse: false }).await;
                    }
                    None => {
                        tracing::info!("streaming: refusing a stream of type {stream_type:?}");
                        let _ = out.send(Out::Reply { id, refuse: true }).await;
                    }
                }
            }
            Frame::Ping(id) => {
                let _ = out.send(Out::Ping(id)).await;
            }
            Frame::GoAway => return None,
            Frame::Data { .. } | Frame::Reset { .. } | Frame::Ignored => {}
        }
    }
    let (session, output, input) = Session::new();
    let reading = tokio::spawn(read_input(reader, streams, input, out.clone()));
    let relay = tokio::spawn(relay_output(output, streams, out.clone(), version));
    super::run_session(runtime, request, session).await;
    let _ = relay.await;
    reading.await.ok().flatten()
}

/// The client's frames as session input; returns the reader once the
/// session is over (the input queue closed), `None` once the client left.
async fn read_input(
    mut reader: Reader,
    streams: Streams,
    input: mpsc::Sender<Input>,
    out: mpsc::Sender<Out>,
) -> Option<Reader> {
    let mut resize = Vec::new();
    loop {
        let frame = tokio::select! {
            f = reader.next() => f,
            _ = input.closed() => return Some(reader),
        };
        let items = match frame {
            Ok(Some(Frame::Data { id, data, fin })) if Some(id) == streams.stdin => {
                let mut items = Vec::new();
                if !data.is_empty() {
                    items.push(Input::Stdin(data));
                }
                if fin {
                    items.push(Input::CloseStdin);
                }
                items
            }
            Ok(Some(Frame::Data { id, data, .. })) if Some(id) == streams.resize => {
                resize.extend_from_slice(&data);
                terminal_sizes(&mut resize).into_iter().map(|(w, h)| Input::Resize(w, h)).collect()
            }
            Ok(Some(Frame::Reset { id, .. })) if Some(id) == streams.stdin => vec![Input::CloseStdin],
            Ok(Some(Frame::SynStream { id, .. } | Frame::BadStreamId { id })) => {
                // Every stream of a session is open before it starts.
                let _ = out.send(Out::Reset { id, status: frames::REFUSED_STREAM }).await;
                continue;
            }
            Ok(Some(Frame::Ping(id))) => {
                let _ = out.send(Out::Ping(id)).await;
                continue;
            }
            Ok(Some(Frame::GoAway)) | Ok(None) | Err(_) => {
                let _ = input.send(Input::Gone).await;
                return None;
            }
            Ok(Some(_)) => continue,
        };
        for item in items {
            if input.send(item).await.is_err() {
                return Some(reader);
            }
        }
    }
}

/// The complete `{"Width":..,"Height":..}` objects at the start of `buf`,
/// which keeps what follows them (a message cut across frames).
fn terminal_sizes(buf: &mut Vec<u8>) -> Vec<(u32, u32)> {
    let mut sizes = Vec::new();
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    let mut used = 0;
    loop {
        match values.next() {
            Some(Ok(v)) => {
                used = values.byte_offset();
                sizes.extend(super::terminal_size(&v));
            }
            Some(Err(e)) if e.is_eof() => break,
            // Not JSON: nothing after it can be trusted to line up.
            Some(Err(_)) => {
                used = buf.len();
                break;
            }
            None => break,
        }
    }
    buf.drain(..used);
    if buf.len() > MAX_RESIZE_MESSAGE {
        buf.clear();
    }
    sizes
}

/// A session's output as data frames on the client's streams; at its end,
/// every stream closes (FIN).
async fn relay_output(mut output: mpsc::Receiver<Output>, streams: Streams, out: mpsc::Sender<Out>, version: u8) {
    while let Some(o) = output.recv().await {
        let (id, data) = match o {
            Output::Stdout(d) => (streams.stdout, d),
            Output::Stderr(d) => (streams.stderr, d),
            Output::Status(exit) if version >= 4 => (streams.error, status_json(&exit).to_string().into_bytes()),
            // v1 to v3 carry only a failure's message, and nothing on success.
            Output::Status(exit) => match failure_message(&exit) {
                Some(message) => (streams.error, message.into_bytes()),
                None => continue,
            },
        };
        if let Some(id) = id {
            if out.send(Out::Data { id, data, fin: false }).await.is_err() {
                return;
            }
        }
    }
    for id in streams.all() {
        let _ = out.send(Out::Data { id, data: Vec::new(), fin: true }).await;
    }
}

/// One forwarded connection's streams while the client opens them.
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
    since: Instant,
}

/// What the client sends on a forwarded connection's data stream: data,
/// or its end (`None`); a closed queue is a reset.
type ToPod = mpsc::Sender<Option<Vec<u8>>>;

/// Port forwarding: pairs the client's streams into connections to the
/// pod until the client leaves.
async fn port_forward(runtime: &Runtime, pod_id: &str, reader: &mut Reader, out: &mpsc::Sender<Out>) {
    let socket = runtime.pod_vsock_socket(pod_id).await.map_err(|e| e.message().to_string());
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards: HashMap<u32, ToPod> = HashMap::new();
    let (done_tx, mut done) = mpsc::channel::<u32>(MAX_FORWARDS);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let frame = tokio::select! {
            f = reader.next() => f,
            Some(id) = done.recv() => {
                forwards.remove(&id);
                continue;
            }
            _ = tick.tick() => {
                expire(&mut pairs, out).await;
                continue;
            }
        };
        match frame {
            Ok(Some(Frame::BadStreamId { id })) => {
                let _ = out.send(Out::Reset { id, status: frames::PROTOCOL_ERROR }).await;
            }
            Ok(Some(Frame::SynStream { id, headers, .. })) => {
                let stream_type = headers.get("streamtype").unwrap_or_default();
                let port = headers.get("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0);
                let (Some(port), "data" | "error") = (port, stream_type) else {
                    tracing::info!(
                        "streaming: port-forward stream refused: port {:?}, streamType {stream_type:?}",
                        headers.get("port")
                    );
                    let _ = out.send(Out::Reply { id, refuse: true }).await;
                    continue;
                };
                // Clients before requestID: the error stream's id, and the
                // data stream's less 2 (the kubelet's guess too).
                let request = headers
                    .get("requestid")
                    .map(str::to_string)
                    .unwrap_or_else(|| if stream_type == "error" { id } else { id.saturating_sub(2) }.to_string());
                let pair = pairs.get(&request);
                let taken =
                    pair.is_some_and(|p| if stream_type == "data" { p.data.is_some() } else { p.error.is_some() });
                if taken || (pair.is_none() && pairs.len() + forwards.len() >= MAX_FORWARDS) {
                    let _ = out.send(Out::Reset { id, status: frames::REFUSED_STREAM }).await;
                    continue;
                }
                let _ = out.send(Out::Reply { id, refuse: false }).await;
                let pair = pairs.entry(request.clone()).or_insert(Pair {
                    port,
                    error: None,
                    data: None,
                    since: Instant::now(),
                });
                *(if stream_type == "data" { &mut pair.data } else { &mut pair.error }) = Some(id);
                if let (Some(error), Some(data)) = (pair.error, pair.data) {
                    let port = pair.port;
                    pairs.remove(&request);
                    let (to_pod, from_client) = mpsc::channel(STREAM_QUEUE_FRAMES);
                    forwards.insert(data, to_pod);
                    let socket = socket.clone();
                    let (out, done, pod_id) = (out.clone(), done_tx.clone(), pod_id.to_string());
                    tokio::spawn(async move {
                        forward(socket, &pod_id, port, error, data, from_client, &out).await;
                        let _ = done.send(data).await;
                    });
                }
            }
            Ok(Some(Frame::Data { id, data, fin })) => {
                if let Some(to_pod) = forwards.get(&id) {
                    if !data.is_empty() && to_pod.send(Some(data)).await.is_err() {
                        forwards.remove(&id);
                    } else if fin {
                        let _ = to_pod.send(None).await;
                    }
                }
            }
            Ok(Some(Frame::Reset { id, .. })) => {
                forwards.remove(&id);
            }
            Ok(Some(Frame::Ping(id))) => {
                let _ = out.send(Out::Ping(id)).await;
            }
            Ok(Some(Frame::Ignored)) => {}
            Ok(Some(Frame::GoAway)) | Ok(None) => break,
            Err(e) => {
                tracing::info!("streaming: port forward to pod {pod_id}: {e}");
                break;
            }
        }
    }
    // The forwards still running see their queues close and end.
}

/// Ends the pairs whose second stream did not come in time.
async fn expire(pairs: &mut HashMap<String, Pair>, out: &mpsc::Sender<Out>) {
    let late: Vec<String> =
        pairs.iter().filter(|(_, p)| p.since.elapsed() >= STREAM_CREATION_TIMEOUT).map(|(r, _)| r.clone()).collect();
    for request in late {
        let Some(pair) = pairs.remove(&request) else { continue };
        if let Some(id) = pair.error {
            let why = format!("timed out waiting for the streams of request {request}");
            let _ = out.send(Out::Data { id, data: why.into_bytes(), fin: true }).await;
        }
        if let Some(id) = pair.data {
            let _ = out.send(Out::Data { id, data: Vec::new(), fin: true }).await;
        }
    }
}

/// One forwarded connection: the client's data stream to and from
/// `localhost:<port>` in the pod; a failure is written on the error stream.
async fn forward(
    socket: Result<PathBuf, String>,
    pod_id: &str,
    port: u16,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<Option<Vec<u8>>>,
    out: &mpsc::Sender<Out>,
) {
    let conn = match socket {
        Ok(socket) => crate::sandbox::port_forward::connect(&socket, port).await,
        Err(why) => Err(why),
    };
    let conn = match conn {
        Ok(conn) => conn,
        Err(why) => {
            let why = format!("error forwarding port {port} to pod {pod_id}: {why}");
            let _ = out.send(Out::Data { id: error, data: why.into_bytes(), fin: true }).await;
            let _ = out.send(Out::Data { id: data, data: Vec::new(), fin: true }).await;
            return;
        }
    };
    let (mut from_pod, mut to_pod) = conn.into_split();
    // true: the client finished sending; false: it reset the stream. Its
    // end is not passed on: the vsock transport carries only a whole
    // close, which would lose the pod's answer; the connection ends when
    // the pod's side closes.
    let to_pod = async {
        while let Some(item) = from_client.recv().await {
            match item {
                Some(d) => {
                    if to_pod.write_all(&d).await.is_err() {
                        return true;
                    }
                }
                None => return true,
            }
        }
        false
    };
    let to_client = async {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Out::Data { id: data, data: buf[..n].to_vec(), fin: false }).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.send(Out::Data { id: data, data: Vec::new(), fin: true }).await;
    };
    tokio::pin!(to_client);
    tokio::select! {
        // The pod closed its side: the connection is over, as for runc.
        _ = &mut to_client => {}
        finished = to_pod => if finished { to_client.await },
    }
    let _ = out.send(Out::Data { id: error, data: Vec::new(), fin: true }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_protocol_name() {
        assert_eq!(version_of("v4.channel.k8s.io"), 4);
        assert_eq!(version_of("v3.channel.k8s.io"), 3);
        assert_eq!(version_of("channel.k8s.io"), 1);
        assert_eq!(version_of(""), 1);
    }

    #[test]
    fn resize_messages_are_read_across_frames() {
        let mut buf = b"{\"Width\":80,\"Height\":24}\n{\"Width\":1".to_vec();
        assert_eq!(terminal_sizes(&mut buf), [(80, 24)]);
        buf.extend_from_slice(b"00,\"Height\":30}\n");
        assert_eq!(terminal_sizes(&mut buf), [(100, 30)]);
        assert!(buf.iter().all(|b| b.is_ascii_whitespace()));
        let mut junk = b"not json {\"Width\":1,\"Height\":1}".to_vec();
        assert!(terminal_sizes(&mut junk).is_empty());
        assert!(junk.is_empty());
        let mut endless = vec![b'['; MAX_RESIZE_MESSAGE + 1];
        assert!(terminal_sizes(&mut endless).is_empty());
        assert!(endless.is_empty(), "an unfinished message past the cap is kept");
    }
}
