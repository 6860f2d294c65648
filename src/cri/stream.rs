//! The streaming server: Exec and Attach answer with a URL here, and the
//! client (the kubelet's proxy, kubectl, a test) opens it as a WebSocket
//! speaking the Kubernetes channel protocol (`v5.channel.k8s.io` or
//! `v4.channel.k8s.io`): every binary message starts with its channel,
//! 0 stdin, 1 stdout, 2 stderr, 3 the final status, 4 terminal resizes;
//! v5 adds 255 (the client closed a channel, e.g. stdin). PortForward
//! speaks the kubelet's WebSocket port-forward protocol
//! (`v4.channel.k8s.io`): port i has data channel 2i and error channel
//! 2i+1, each opened by the server with the port (2 bytes, little endian);
//! data goes to a TCP connection to the pod IP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;

use super::logs::{self, Stream};
use super::runtime::Runtime;

/// The subprotocols served, most preferred first.
const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// How long a URL stays valid unused (the kubelet's default).
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Frames queued for one stream client (at most 32 KiB each): beyond this
/// the copy waits for the client.
const STREAM_QUEUE_FRAMES: usize = 64;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

#[derive(Clone)]
enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

pub struct StreamServer {
    addr: SocketAddr,
    pending: Mutex<HashMap<String, (Instant, Pending)>>,
}

impl StreamServer {
    pub async fn bind(address: &str) -> anyhow::Result<(Arc<Self>, TcpListener)> {
        use anyhow::Context;
        let listener =
            TcpListener::bind(address).await.with_context(|| format!("streaming server: listening on {address}"))?;
        let addr = listener.local_addr()?;
        Ok((Arc::new(Self { addr, pending: Mutex::default() }), listener))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, kind: &str, request: Pending) -> String {
        let token = super::runtime::new_id()[..32].to_string();
        let mut pending = self.pending.lock().unwrap();
        pending.retain(|_, (at, _)| at.elapsed() < TOKEN_TTL);
        pending.insert(token.clone(), (Instant::now(), request));
        format!("http://{}/{kind}/{token}", self.addr)
    }

    pub fn exec_url(&self, req: ExecRequest) -> String {
        self.url("exec", Pending::Exec(req))
    }

    pub fn attach_url(&self, req: AttachRequest) -> String {
        self.url("attach", Pending::Attach(req))
    }

    pub fn port_forward_url(&self, req: PortForwardRequest) -> String {
        self.url("portforward", Pending::PortForward(req))
    }

    /// A URL's request, once: tokens are single use.
    fn take(&self, path: &str) -> Option<Pending> {
        let token = path.rsplit('/').next()?;
        let (at, request) = self.pending.lock().unwrap().remove(token)?;
        let kind_matches = match &request {
            Pending::Exec(_) => path.starts_with("/exec/"),
            Pending::Attach(_) => path.starts_with("/attach/"),
            Pending::PortForward(_) => path.starts_with("/portforward/"),
        };
        (at.elapsed() < TOKEN_TTL && kind_matches).then_some(request)
    }

    pub fn serve(self: Arc<Self>, listener: TcpListener, runtime: Arc<Runtime>) {
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { continue };
                let (server, runtime) = (self.clone(), runtime.clone());
                tokio::spawn(async move { server.handle(conn, runtime).await });
            }
        });
    }

    // The handshake callback's error type is tungstenite's (an HTTP response).
    #[allow(clippy::result_large_err)]
    async fn handle(&self, conn: TcpStream, runtime: Arc<Runtime>) {
        let mut request = None;
        let mut protocol = "";
        let mut ports_in_query = Vec::new();
        let accepted = tokio_tungstenite::accept_hdr_async(conn, |req: &Request, mut resp: Response| {
            let reject = |code: StatusCode, msg: &str| {
                let mut r = ErrorResponse::new(Some(msg.to_string()));
                *r.status_mut() = code;
                r
            };
            let offered: Vec<String> = req
                .headers()
                .get_all("Sec-WebSocket-Protocol")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
                .collect();
            let Some(chosen) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    &format!("no supported subprotocol offered (runv cri speaks {})", PROTOCOLS.join(", ")),
                ));
            };
            let Some(pending) = self.take(req.uri().path()) else {
                return Err(reject(StatusCode::NOT_FOUND, "unknown or expired stream URL"));
            };
            // `?port=80&port=81`: what kubectl puts on a port-forward URL.
            ports_in_query = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|kv| kv.strip_prefix("port=")?.parse::<i32>().ok())
                .collect();
            resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
            protocol = chosen;
            request = Some(pending);
            Ok(resp)
        })
        .await;
        let (Ok(ws), Some(request)) = (accepted, request) else { return };
        let v5 = protocol.starts_with("v5.");
        let (sink, source) = ws.split();
        // Bounded: a client that reads slowly slows the copy, not the host.
        let (tx, rx) = mpsc::channel::<Message>(STREAM_QUEUE_FRAMES);
        let writer = tokio::spawn(write_all(sink, rx));
        let kind = match &request {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        };
        super::metrics::METRICS.streams.with_label_values(&[kind]).inc();
        match request {
            Pending::Exec(req) => exec(&runtime, req, &tx, source, v5).await,
            Pending::Attach(req) => attach(&runtime, req, &tx, source, v5).await,
            Pending::PortForward(mut req) => {
                if !ports_in_query.is_empty() {
                    req.port = ports_in_query;
                }
                port_forward(&runtime, req, &tx, source).await
            }
        }
        let _ = tx.send(Message::Close(None)).await;
        drop(tx);
        let _ = writer.await;
    }
}

async fn write_all(
    mut sink: futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<TcpStream>, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    while let Some(m) = rx.recv().await {
        let close = matches!(m, Message::Close(_));
        if sink.send(m).await.is_err() || close {
            break;
        }
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// The final status on the error channel (a Kubernetes `Status` object).
fn status_frame(exit: Result<i32, String>) -> Message {
    let status = match exit {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => serde_json::json!({"metadata": {}, "status": "Failure", "message": message}),
    };
    frame(ERROR, status.to_string().as_bytes())
}

/// What the client sent: stdin data, a resize, or the end of stdin.
enum Input {
    Stdin(Vec<u8>),
    Resize(u32, u32),
    CloseStdin,
    Gone,
}

fn parse_input(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>, v5: bool) -> Option<Input> {
    let data = match m {
        Some(Ok(Message::Binary(d))) => d.to_vec(),
        Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Some(Input::Gone),
        Some(Ok(_)) => return None,
    };
    match data.split_first() {
        Some((&STDIN, rest)) => Some(Input::Stdin(rest.to_vec())),
        Some((&RESIZE, rest)) => {
            let size: serde_json::Value = serde_json::from_slice(rest).ok()?;
            Some(Input::Resize(size["Width"].as_u64()? as u32, size["Height"].as_u64()? as u32))
        }
        Some((&CLOSE, [STDIN, ..])) if v5 => Some(Input::CloseStdin),
        _ => None,
    }
}

async fn exec(
    runtime: &Runtime,
    req: ExecRequest,
    tx: &mpsc::Sender<Message>,
    mut source: futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
    v5: bool,
) {
    let mut session = match runtime.exec(&req.container_id, &req.cmd, req.tty, req.stdin).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(status_frame(Err(e.message().to_string()))).await;
            return;
        }
    };
    let (finish_tx, finish_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    for (channel, rx, wanted) in
        [(STDOUT, session.stdout.take(), req.stdout), (STDERR, session.stderr.take(), req.stderr)]
    {
        if let Some(rx) = rx {
            let tx = tx.clone();
            pumps.push(logs::pump(rx, finish_rx.clone(), move |d: Vec<u8>| {
                let tx = tx.clone();
                async move {
                    if wanted {
                        let _ = tx.send(frame(channel, &d)).await;
                    }
                }
            }));
        }
    }
    let mut stdin = session.stdin.take();
    let exit = {
        let wait = session.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                r = &mut wait => break r,
                m = source.next() => match parse_input(m, v5) {
                    Some(Input::Stdin(d)) => {
                        if let Some(s) = stdin.as_mut() {
                            let _ = s.write_all(&d).await;
                        }
                    }
                    Some(Input::Resize(w, h)) => session.resize(w, h).await,
                    Some(Input::CloseStdin) => {
                        // The shim drains the FIFO first; our end stays
                        // open until then, or the pipe's data would go.
                        session.close_stdin().await;
                        stdin = None;
                    }
                    Some(Input::Gone) => {
                        // The client left: the process goes too.
                        session.kill().await;
                        let _ = tokio::time::timeout(Duration::from_secs(10), session.wait()).await;
                        break Err(tonic::Status::cancelled("the client closed the stream"));
                    }
                    None => {}
                },
            }
        }
    };
    finish_tx.send_replace(true);
    for p in pumps {
        let _ = p.await;
    }
    drop(stdin);
    session.close().await;
    let _ = tx.send(status_frame(exit.map_err(|e| e.message().to_string()))).await;
}

async fn attach(
    runtime: &Runtime,
    req: AttachRequest,
    tx: &mpsc::Sender<Message>,
    mut source: futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
    v5: bool,
) {
    let (mut output, stdin_path, mut finished) = match runtime.attach(&req.container_id).await {
        Ok(a) => a,
        Err(e) => {
            let _ = tx.send(status_frame(Err(e.message().to_string()))).await;
            return;
        }
    };
    let mut stdin = match (&stdin_path, req.stdin) {
        (Some(p), true) => tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(p).ok(),
        _ => None,
    };
    loop {
        tokio::select! {
            o = output.recv() => match o {
                Ok((Stream::Stdout, d)) if req.stdout => { let _ = tx.send(frame(STDOUT, &d)).await; }
                Ok((Stream::Stderr, d)) if req.stderr => { let _ = tx.send(frame(STDERR, &d)).await; }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = async { let _ = finished.wait_for(|f| *f).await; } => {
                // The container exited: what it wrote last, then the end.
                while let Ok((s, d)) = output.try_recv() {
                    let channel = if s == Stream::Stdout { STDOUT } else { STDERR };
                    let _ = tx.send(frame(channel, &d)).await;
                }
                break;
            }
            m = source.next() => match parse_input(m, v5) {
                Some(Input::Stdin(d)) => {
                    if let Some(s) = stdin.as_mut() {
                        let _ = s.write_all(&d).await;
                    }
                }
                Some(Input::CloseStdin) => stdin = None,
                Some(Input::Gone) => return,
                Some(Input::Resize(..)) | None => {}
            },
        }
    }
    let _ = tx.send(status_frame(Ok(0))).await;
}

async fn port_forward(
    runtime: &Runtime,
    req: PortForwardRequest,
    tx: &mpsc::Sender<Message>,
    mut source: futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
) {
    let socket = match runtime.pod_vsock_socket(&req.pod_sandbox_id).await {
        Ok(socket) => socket,
        Err(e) => {
            let _ = tx.send(frame(1, e.message().as_bytes())).await;
            return;
        }
    };
    if req.port.is_empty() || req.port.len() > 127 || req.port.iter().any(|p| !(1..=65535).contains(p)) {
        let _ = tx.send(frame(1, format!("bad ports {:?}", req.port).as_bytes())).await;
        return;
    }
    let mut writers = Vec::new();
    for (i, port) in req.port.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let port_bytes = (*port as u16).to_le_bytes();
        let _ = tx.send(frame(data, &port_bytes)).await;
        let _ = tx.send(frame(error, &port_bytes)).await;
        // localhost:<port> in the pod, which is its VM.
        match crate::sandbox::port_forward::connect(&socket, *port as u16).await {
            Ok(conn) => {
                let (mut read, write) = conn.into_split();
                let tx = tx.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = read.read(&mut buf).await {
                        if n == 0 || tx.send(frame(data, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                });
                writers.push(Some(write));
            }
            Err(why) => {
                let _ = tx.send(frame(error, format!("port {port} in the pod: {why}").as_bytes())).await;
                writers.push(None);
            }
        }
    }
    while let Some(m) = source.next().await {
        match m {
            Ok(Message::Binary(b)) => {
                let Some((&channel, data)) = b.split_first() else { continue };
                if channel % 2 == 0 {
                    if let Some(Some(w)) = writers.get_mut(channel as usize / 2) {
                        if w.write_all(data).await.is_err() {
                            writers[channel as usize / 2] = None;
                        }
                    }
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_read_by_channel() {
        let bin = |v: &[u8]| Some(Ok(Message::Binary(v.to_vec().into())));
        assert!(matches!(parse_input(bin(&[0, b'h', b'i']), true), Some(Input::Stdin(d)) if d == b"hi"));
        assert!(matches!(parse_input(bin(b"\x04{\"Width\":80,\"Height\":24}"), true), Some(Input::Resize(80, 24))));
        assert!(matches!(parse_input(bin(&[255, 0]), true), Some(Input::CloseStdin)));
        assert!(parse_input(bin(&[255, 0]), false).is_none());
        assert!(parse_input(bin(&[4, b'{']), true).is_none());
        assert!(matches!(parse_input(None, true), Some(Input::Gone)));
    }

    #[test]
    fn the_final_status_carries_the_exit_code() {
        let Message::Binary(b) = status_frame(Ok(3)) else { panic!() };
        assert_eq!(b[0], ERROR);
        let v: serde_json::Value = serde_json::from_slice(&b[1..]).unwrap();
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let Message::Binary(b) = status_frame(Ok(0)) else { panic!() };
        assert!(String::from_utf8_lossy(&b[1..]).contains("Success"));
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_typed() {
        let (server, _listener) = StreamServer::bind("127.0.0.1:0").await.unwrap();
        let url = server.exec_url(ExecRequest { container_id: "c".into(), ..Default::default() });
        let path = url.split_once(&server.addr().to_string()).unwrap().1.to_string();
        assert!(server.take(&path.replace("/exec/", "/attach/")).is_none());
        let url = server.exec_url(ExecRequest { container_id: "c".into(), ..Default::default() });
        let path = url.split_once(&server.addr().to_string()).unwrap().1.to_string();
        assert!(matches!(server.take(&path), Some(Pending::Exec(r)) if r.container_id == "c"));
        assert!(server.take(&path).is_none());
    }
}
