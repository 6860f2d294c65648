//! The streaming server: Exec, Attach and PortForward answer with a URL
//! here, and the client upgrades it to either transport the kubelet's
//! streaming library serves:
//! - WebSocket (`websocket.rs`): the Kubernetes channel protocols
//!   `v5.channel.k8s.io` and `v4.channel.k8s.io`;
//! - SPDY/3.1 (`spdy.rs`): remotecommand `v4.channel.k8s.io` down to
//!   `channel.k8s.io`, and `portforward.k8s.io`, what kubectl, crictl,
//!   client-go and the kubelet (proxying the apiserver's streams) send.
//!
//! One parser reads the upgrade request; exec and attach then run the same
//! code under both transports (`Session`), so a session behaves the same
//! whichever the client speaks.

mod spdy;
mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::logs::{self, Stream};
use super::runtime::Runtime;

/// How long a URL stays valid unused (the kubelet's default).
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// The most URLs handed out and not yet used or expired (the kubelet's
/// streaming server's maxInFlight): a client calling Exec in a loop fills
/// no more than this; beyond it Exec, Attach and PortForward answer
/// RESOURCE_EXHAUSTED until one is used or expires.
const MAX_PENDING: usize = 1000;
/// And the most bytes their requests may hold together (an Exec's command
/// line is the client's to fill, up to the gRPC message limit each).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// The most connections served at once, sessions and requests still being
/// read alike: each session may queue STREAM_QUEUE_FRAMES items of up to
/// 32 KiB each way, so this bounds what clients can make runv cri hold.
/// Past it a connection is answered 503 and closed.
const MAX_CONNECTIONS: usize = 256;
/// How long the accept loop waits after a failed accept (out of file
/// descriptors, say) before it tries again, rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Items queued between a session and its client, each way (output
/// items hold at most 32 KiB): beyond this the copy waits for the client.
const STREAM_QUEUE_FRAMES: usize = 64;
/// The longest upgrade request head read, and how long it may take.
const MAX_REQUEST_HEAD: usize = 16 << 10;
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }

    /// About what it holds in memory: its encoded size.
    fn size(&self) -> usize {
        use prost::Message;
        match self {
            Pending::Exec(r) => r.encoded_len(),
            Pending::Attach(r) => r.encoded_len(),
            Pending::PortForward(r) => r.encoded_len(),
        }
    }
}

pub struct StreamServer {
    addr: SocketAddr,
    /// Each URL's token: when it was handed out, its request's size
    /// (counted once, against MAX_PENDING_BYTES) and the request.
    pending: Mutex<HashMap<String, (Instant, usize, Pending)>>,
    connections: Arc<tokio::sync::Semaphore>,
}

impl StreamServer {
    pub async fn bind(address: &str) -> anyhow::Result<(Arc<Self>, TcpListener)> {
        use anyhow::Context;
        let listener =
            TcpListener::bind(address).await.with_context(|| format!("streaming server: listening on {address}"))?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        Ok((Arc::new(Self { addr, pending: Mutex::default(), connections }), listener))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, request: Pending) -> Result<String, tonic::Status> {
        let token = super::runtime::new_id()[..32].to_string();
        let kind = request.kind();
        let mut pending = self.pending.lock().unwrap();
        pending.retain(|_, (at, _, _)| at.elapsed() < TOKEN_TTL);
        let held: usize = pending.values().map(|(_, size, _)| size).sum();
        let size = request.size();
        if pending.len() >= MAX_PENDING || held + size > MAX_PENDING_BYTES {
            return Err(tonic::Status::resource_exhausted(format!(
                "{kind}: {} streaming URLs ({} KiB of requests) are handed out and not yet used \
                 (at most {MAX_PENDING}, {} KiB); use one or wait for one to expire ({} s after it \
                 was handed out)",
                pending.len(),
                held >> 10,
                MAX_PENDING_BYTES >> 10,
                TOKEN_TTL.as_secs()
            )));
        }
        pending.insert(token.clone(), (Instant::now(), size, request));
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }

    pub fn exec_url(&self, req: ExecRequest) -> Result<String, tonic::Status> {
        self.url(Pending::Exec(req))
    }

    pub fn attach_url(&self, req: AttachRequest) -> Result<String, tonic::Status> {
        self.url(Pending::Attach(req))
    }

    pub fn port_forward_url(&self, req: PortForwardRequest) -> Result<String, tonic::Status> {
        self.url(Pending::PortForward(req))
    }

    /// A URL's request, once: tokens are single use.
    fn take(&self, path: &str) -> Option<Pending> {
        let token = path.rsplit('/').next()?;
        let (at, _, request) = self.pending.lock().unwrap().remove(token)?;
        let kind_matches =
            path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(k, _)| k) == Some(request.kind());
        (at.elapsed() < TOKEN_TTL && kind_matches).then_some(request)
    }

    pub fn serve(self: Arc<Self>, listener: TcpListener, runtime: Arc<Runtime>) {
        tokio::spawn(async move {
            loop {
                let conn = match listener.accept().await {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        tracing::warn!("streaming server: accepting a connection: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Some(permit) = self.admit() else {
                    tokio::spawn(turn_away(conn));
                    continue;
                };
                let (server, runtime) = (self.clone(), runtime.clone());
                tokio::spawn(async move {
                    server.handle(conn, runtime).await;
                    drop(permit);
                });
            }
        });
    }

    /// A place for one more connection, while fewer than MAX_CONNECTIONS
    /// are served.
    fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    async fn handle(&self, mut conn: TcpStream, runtime: Arc<Runtime>) {
        let (head, read_ahead) = match tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read_head(&mut conn)).await {
            Ok(Ok(request)) => request,
            Ok(Err(why)) => return refuse(&mut conn, 400, &[], &why).await,
            Err(_) => return,
        };
        match head.header("upgrade").map(str::to_ascii_lowercase).as_deref() {
            Some("websocket") => websocket::serve(self, conn, head, read_ahead, runtime).await,
            Some("spdy/3.1") => spdy::serve(self, conn, head, read_ahead, runtime).await,
            _ => {
                let why = "runv cri's streaming server speaks WebSocket and SPDY/3.1: upgrade to one of them";
                refuse(&mut conn, 400, &[], why).await
            }
        }
    }
}

/// An upgrade request's head.
struct Head {
    path: String,
    query: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, over repeated headers and comma lists.
    fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(',').map(|p| p.trim().to_string()))
            .filter(|p| !p.is_empty())
            .collect()
    }

    /// `?port=80&port=81`: what kubectl puts on a port-forward URL.
    fn ports(&self) -> Vec<i32> {
        self.query.split('&').filter_map(|kv| kv.strip_prefix("port=")?.parse().ok()).collect()
    }
}

/// Answers a connection past MAX_CONNECTIONS with 503 and closes it.
async fn turn_away(mut conn: TcpStream) {
    let why = format!("runv cri's streaming server is serving {MAX_CONNECTIONS} connections, its most; try again");
    let _ = tokio::time::timeout(Duration::from_secs(1), refuse(&mut conn, 503, &[], &why)).await;
}

/// Reads the request head; returns it with any bytes read past it.
async fn read_head(conn: &mut TcpStream) -> Result<(Head, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let headers = req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let head = Head { path: path.to_string(), query: query.to_string(), headers };
                return Ok((head, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(format!("request head longer than {MAX_REQUEST_HEAD} bytes")),
            Err(e) => return Err(format!("malformed HTTP request: {e}")),
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("the connection closed inside the request head".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An HTTP error answer, and the connection closes.
async fn refuse(conn: &mut TcpStream, code: u16, headers: &[(&str, &str)], why: &str) {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        why.len() + 1
    );
    for (n, v) in headers {
        resp.push_str(&format!("{n}: {v}\r\n"));
    }
    resp.push_str(&format!("\r\n{why}\n"));
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
}

impl StreamServer {
    /// The request of the URL at `path`, once the `101 Switching
    /// Protocols` answer with `headers` is written; an unknown or expired
    /// URL is answered 404.
    async fn upgrade(&self, conn: &mut TcpStream, path: &str, headers: &[(&str, &str)]) -> Option<Pending> {
        let Some(request) = self.take(path) else {
            refuse(conn, 404, &[], "unknown or expired stream URL").await;
            return None;
        };
        let mut resp = String::from("HTTP/1.1 101 Switching Protocols\r\n");
        for (n, v) in headers {
            resp.push_str(&format!("{n}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        conn.write_all(resp.as_bytes()).await.ok()?;
        super::metrics::METRICS.streams.with_label_values(&[request.kind()]).inc();
        Some(request)
    }
}

/// What an exec or attach session sends its client.
enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last item: the exit code, or why the session failed.
    Status(Result<i32, String>),
}

/// What the client sent: stdin data, a resize, or the end of stdin.
#[derive(Debug)]
enum Input {
    Stdin(Vec<u8>),
    Resize(u32, u32),
    CloseStdin,
    Gone,
}

/// An exec or attach session's two queues, which a transport fills and
/// drains.
struct Session {
    output: mpsc::Sender<Output>,
    input: mpsc::Receiver<Input>,
}

impl Session {
    /// A session and the transport's ends of its queues.
    fn new() -> (Self, mpsc::Receiver<Output>, mpsc::Sender<Input>) {
        let (output, output_rx) = mpsc::channel(STREAM_QUEUE_FRAMES);
        let (input_tx, input) = mpsc::channel(STREAM_QUEUE_FRAMES);
        (Self { output, input }, output_rx, input_tx)
    }

    /// The next input; a closed queue is a client that left.
    async fn next_input(&mut self) -> Input {
        self.input.recv().await.unwrap_or(Input::Gone)
    }

    async fn send(&self, output: Output) {
        let _ = self.output.send(output).await;
    }
}

/// What failed, as the final status says it; `None` for a success.
fn failure_message(exit: &Result<i32, String>) -> Option<String> {
    match exit {
        Ok(0) => None,
        Ok(code) => Some(format!("command terminated with non-zero exit code: {code}")),
        Err(message) => Some(message.clone()),
    }
}

/// The final status as a Kubernetes `Status` object (the kubelet's).
fn status_json(exit: &Result<i32, String>) -> serde_json::Value {
    match (exit, failure_message(exit)) {
        (_, None) => serde_json::json!({"metadata": {}, "status": "Success"}),
        (Ok(code), Some(message)) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        (Err(_), Some(message)) => serde_json::json!({"metadata": {}, "status": "Failure", "message": message}),
    }
}

/// A terminal size as the clients send it: `{"Width":80,"Height":24}`.
fn terminal_size(v: &serde_json::Value) -> Option<(u32, u32)> {
    Some((u32::try_from(v["Width"].as_u64()?).ok()?, u32::try_from(v["Height"].as_u64()?).ok()?))
}

/// Runs an exec or attach request over `session`.
async fn run_session(runtime: &Runtime, request: Pending, session: Session) {
    match request {
        Pending::Exec(req) => exec(runtime, req, session).await,
        Pending::Attach(req) => attach(runtime, req, session).await,
        Pending::PortForward(_) => unreachable!("port forwarding is no exec or attach session"),
    }
}

async fn exec(runtime: &Runtime, req: ExecRequest, mut client: Session) {
    let mut session = match runtime.exec(&req.container_id, &req.cmd, req.tty, req.stdin).await {
        Ok(s) => s,
        Err(e) => return client.send(Output::Status(Err(e.message().to_string()))).await,
    };
    let (finish_tx, finish_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    for (is_stdout, rx, wanted) in
        [(true, session.stdout.take(), req.stdout), (false, session.stderr.take(), req.stderr)]
    {
        if let Some(rx) = rx {
            let output = client.output.clone();
            pumps.push(logs::pump(rx, finish_rx.clone(), move |d: Vec<u8>| {
                let output = output.clone();
                async move {
                    if wanted {
                        let _ = output.send(if is_stdout { Output::Stdout(d) } else { Output::Stderr(d) }).await;
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
                input = client.next_input() => match input {
                    Input::Stdin(d) => {
                        if let Some(s) = stdin.as_mut() {
                            let _ = s.write_all(&d).await;
                        }
                    }
                    Input::Resize(w, h) => session.resize(w, h).await,
                    Input::CloseStdin => {
                        // The shim drains the FIFO first; our end stays
                        // open until then, or the pipe's data would go.
                        session.close_stdin().await;
                        stdin = None;
                    }
                    Input::Gone => {
                        // The client left: the process goes too.
                        session.kill().await;
                        let _ = tokio::time::timeout(Duration::from_secs(10), session.wait()).await;
                        break Err(tonic::Status::cancelled("the client closed the stream"));
                    }
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
    client.send(Output::Status(exit.map_err(|e| e.message().to_string()))).await;
}

async fn attach(runtime: &Runtime, req: AttachRequest, mut client: Session) {
    let (mut output, stdin_path, mut finished) = match runtime.attach(&req.container_id).await {
        Ok(a) => a,
        Err(e) => return client.send(Output::Status(Err(e.message().to_string()))).await,
    };
    let mut stdin = match (&stdin_path, req.stdin) {
        (Some(p), true) => tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(p).ok(),
        _ => None,
    };
    let of = |s: Stream, d: Vec<u8>| if s == Stream::Stdout { Output::Stdout(d) } else { Output::Stderr(d) };
    loop {
        tokio::select! {
            o = output.recv() => match o {
                Ok((s, d)) if (s == Stream::Stdout && req.stdout) || (s == Stream::Stderr && req.stderr) => {
                    client.send(of(s, d)).await
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = async { let _ = finished.wait_for(|f| *f).await; } => {
                // The container exited: what it wrote last, then the end.
                while let Ok((s, d)) = output.try_recv() {
                    client.send(of(s, d)).await;
                }
                break;
            }
            input = client.next_input() => match input {
                Input::Stdin(d) => {
                    if let Some(s) = stdin.as_mut() {
                        let _ = s.write_all(&d).await;
                    }
                }
                Input::CloseStdin => stdin = None,
                Input::Gone => return,
                Input::Resize(..) => {}
            },
        }
    }
    client.send(Output::Status(Ok(0))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_status_carries_the_exit_code() {
        let v = status_json(&Ok(3));
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert_eq!(status_json(&Ok(0))["status"], "Success");
        assert_eq!(status_json(&Err("gone".into()))["message"], "gone");
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_typed() {
        let (server, _listener) = StreamServer::bind("127.0.0.1:0").await.unwrap();
        let url = server.exec_url(ExecRequest { container_id: "c".into(), ..Default::default() }).unwrap();
        let path = url.split_once(&server.addr().to_string()).unwrap().1.to_string();
        assert!(server.take(&path.replace("/exec/", "/attach/")).is_none());
        let url = server.exec_url(ExecRequest { container_id: "c".into(), ..Default::default() }).unwrap();
        let path = url.split_once(&server.addr().to_string()).unwrap().1.to_string();
        assert!(matches!(server.take(&path), Some(Pending::Exec(r)) if r.container_id == "c"));
        assert!(server.take(&path).is_none());
    }

    /// A client that calls Exec in a loop and never connects fills at most
    /// MAX_PENDING URLs; then it is told why, and a URL used or expired
    /// makes room again.
    #[tokio::test]
    async fn attack_a_client_handed_urls_it_never_uses_fills_no_more_than_the_cap() {
        println!("ATTACK a CRI client calling Exec in a loop without connecting: tried");
        let (server, _listener) = StreamServer::bind("127.0.0.1:0").await.unwrap();
        let exec = || ExecRequest { container_id: "c".into(), cmd: vec!["x".repeat(1 << 10)], ..Default::default() };
        let urls: Vec<String> = (0..MAX_PENDING).map(|_| server.exec_url(exec()).unwrap()).collect();
        let refused = server.exec_url(exec()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().starts_with("exec: 1000 streaming URLs ("), "{}", refused.message());
        let refused = server.port_forward_url(PortForwardRequest::default()).unwrap_err();
        assert!(refused.message().starts_with("portforward: "), "{}", refused.message());
        assert_eq!(server.pending.lock().unwrap().len(), MAX_PENDING);
        // One used makes room for one.
        let path = urls[0].split_once(&server.addr().to_string()).unwrap().1.to_string();
        assert!(server.take(&path).is_some());
        server.attach_url(AttachRequest::default()).unwrap();
        assert!(server.exec_url(exec()).is_err());
        // Expired ones make room for all.
        for (at, _, _) in server.pending.lock().unwrap().values_mut() {
            *at -= TOKEN_TTL;
        }
        server.exec_url(exec()).unwrap();
        assert_eq!(server.pending.lock().unwrap().len(), 1);
        // Fewer but larger requests meet the byte cap first.
        let big = || ExecRequest { container_id: "c".into(), cmd: vec!["x".repeat(4 << 20)], ..Default::default() };
        while server.exec_url(big()).is_ok() {}
        let held: usize = server.pending.lock().unwrap().values().map(|(_, _, p)| p.size()).sum();
        assert!(held <= MAX_PENDING_BYTES && server.pending.lock().unwrap().len() < 20, "{held} bytes held");
        println!("ATTACK a CRI client calling Exec in a loop without connecting: held");
    }

    /// A client that opens connections and holds them gets MAX_CONNECTIONS
    /// served; the next is answered 503 and closed, and a place freed is
    /// taken again.
    #[tokio::test]
    async fn attack_connections_past_the_cap_are_turned_away() {
        println!("ATTACK a streaming client holding connections open: tried");
        let (server, listener) = StreamServer::bind("127.0.0.1:0").await.unwrap();
        let held: Vec<_> = (0..MAX_CONNECTIONS).map(|_| server.admit().expect("a place")).collect();
        assert!(server.admit().is_none());
        let mut client = TcpStream::connect(server.addr()).await.unwrap();
        let (conn, _) = listener.accept().await.unwrap();
        turn_away(conn).await;
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.ends_with("serving 256 connections, its most; try again\n"), "{answer}");
        drop(held);
        assert!(server.admit().is_some());
        println!("ATTACK a streaming client holding connections open: held");
    }

    #[test]
    fn a_request_head_gives_every_protocol_offered() {
        let head = Head {
            path: "/exec/t".into(),
            query: "port=80&port=x&port=81".into(),
            headers: vec![
                ("x-stream-protocol-version".into(), "v4.channel.k8s.io".into()),
                ("x-stream-protocol-version".into(), "v3.channel.k8s.io, channel.k8s.io".into()),
            ],
        };
        assert_eq!(
            head.values("x-stream-protocol-version"),
            ["v4.channel.k8s.io", "v3.channel.k8s.io", "channel.k8s.io"]
        );
        assert_eq!(head.ports(), [80, 81]);
        assert_eq!(terminal_size(&serde_json::json!({"Width": 80, "Height": 24})), Some((80, 24)));
        assert_eq!(terminal_size(&serde_json::json!({"Width": -1, "Height": 24})), None);
    }
}
