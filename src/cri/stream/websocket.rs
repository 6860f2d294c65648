//! The WebSocket transport, speaking the Kubernetes channel protocol
//! (`v5.channel.k8s.io` or `v4.channel.k8s.io`): every binary message
//! starts with its channel, 0 stdin, 1 stdout, 2 stderr, 3 the final
//! status, 4 terminal resizes; v5 adds 255 (the client closed a channel,
//! e.g. stdin). PortForward speaks the kubelet's WebSocket port-forward
//! protocol (`v4.channel.k8s.io`): port i has data channel 2i and error
//! channel 2i+1, each opened by the server with the port (2 bytes, little
//! endian); data goes to `localhost:<port>` in the pod, which is its VM.

use std::sync::Arc;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use k8s_cri::v1::PortForwardRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{refuse, status_json, Head, Input, Output, Pending, Session, StreamServer, STREAM_QUEUE_FRAMES};
use crate::cri::runtime::Runtime;

/// The subprotocols served, most preferred first.
const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// The largest message read from a client (stdin, a resize, forwarded
/// data): its own writes are at most 32 KiB.
const MAX_MESSAGE: usize = 1 << 20;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

type Ws = WebSocketStream<TcpStream>;

pub(super) async fn serve(
    server: &StreamServer,
    mut conn: TcpStream,
    head: Head,
    read_ahead: Vec<u8>,
    runtime: Arc<Runtime>,
) {
    let offered = head.values("sec-websocket-protocol");
    let Some(chosen) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        let why = format!("no supported subprotocol offered (runv cri speaks {})", PROTOCOLS.join(", "));
        return refuse(&mut conn, 400, &[], &why).await;
    };
    let (Some(key), Some("13")) = (head.header("sec-websocket-key"), head.header("sec-websocket-version")) else {
        return refuse(
            &mut conn,
            400,
            &[],
            "not a WebSocket handshake: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 are required",
        )
        .await;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.as_str()),
        ("Sec-WebSocket-Protocol", chosen),
    ];
    let Some(request) = server.upgrade(&mut conn, &head.path, &headers).await else { return };
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
    let ws = WebSocketStream::from_partially_read(conn, read_ahead, Role::Server, Some(config)).await;
    let (sink, source) = ws.split();
    // Bounded: a client that reads slowly slows the copy, not the host.
    let (tx, rx) = mpsc::channel::<Message>(STREAM_QUEUE_FRAMES);
    let writer = tokio::spawn(write_all(sink, rx));
    match request {
        Pending::PortForward(mut req) => {
            let ports = head.ports();
            if !ports.is_empty() {
                req.port = ports;
            }
            port_forward(&runtime, req, &tx, source).await
        }
        request => {
            let (session, output, input) = Session::new();
            let reader = tokio::spawn(read_input(source, input, chosen.starts_with("v5.")));
            let relay = tokio::spawn(relay_output(output, tx.clone()));
            super::run_session(&runtime, request, session).await;
            let _ = relay.await;
            reader.abort();
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    drop(tx);
    let _ = writer.await;
}

async fn write_all(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::Receiver<Message>) {
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

/// A session's output as channel messages, until the session ends.
async fn relay_output(mut output: mpsc::Receiver<Output>, tx: mpsc::Sender<Message>) {
    while let Some(o) = output.recv().await {
        let m = match o {
            Output::Stdout(d) => frame(STDOUT, &d),
            Output::Stderr(d) => frame(STDERR, &d),
            Output::Status(exit) => frame(ERROR, status_json(&exit).to_string().as_bytes()),
        };
        if tx.send(m).await.is_err() {
            break;
        }
    }
}

/// The client's messages as session input, until it leaves.
async fn read_input(mut source: SplitStream<Ws>, input: mpsc::Sender<Input>, v5: bool) {
    loop {
        let Some(i) = parse_input(source.next().await, v5) else { continue };
        let gone = matches!(i, Input::Gone);
        if input.send(i).await.is_err() || gone {
            break;
        }
    }
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
            let (w, h) = super::terminal_size(&serde_json::from_slice(rest).ok()?)?;
            Some(Input::Resize(w, h))
        }
        Some((&CLOSE, [STDIN, ..])) if v5 => Some(Input::CloseStdin),
        _ => None,
    }
}

async fn port_forward(
    runtime: &Runtime,
    req: PortForwardRequest,
    tx: &mpsc::Sender<Message>,
    mut source: SplitStream<Ws>,
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
}
