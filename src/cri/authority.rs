//! Every gRPC client gets an answer, whatever `:authority` it sends.
//!
//! Clients of a Unix socket disagree on the HTTP/2 `:authority`: grpc-go
//! before 1.5x (crictl and critest 1.26, kubelet 1.26's remote runtime)
//! sends the socket path, grpc-core (Python grpcio, grpc-java's netty)
//! sends it percent-encoded, newer grpc-go sends `localhost`. h2, under
//! tonic, parses `:authority` as a URI authority and resets the stream with
//! PROTOCOL_ERROR when it is not one (hyperium/h2#487), so the first two
//! kinds of client never get an answer.
//!
//! [`accept_any_authority`] sits between the socket and tonic. It passes
//! every frame through as it came, except header blocks: those it decodes
//! with h2's own HPACK codec (the `unstable` feature exposes it), replaces
//! an `:authority` that is not a URI authority with `localhost`, and encodes
//! again with a codec of its own toward tonic. Responses go back byte for
//! byte. A connection whose bytes are not HTTP/2 is closed, with a log line
//! naming what was wrong; others are not affected.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use h2::frame::{BytesStr, Frame, Headers};
use h2::Codec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const KIND_HEADERS: u8 = 0x1;
const KIND_PUSH_PROMISE: u8 = 0x5;
const KIND_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
/// The largest frame a client may send: tonic's server keeps HTTP/2's
/// default SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 1 << 14;
/// The largest header block (HEADERS and its CONTINUATIONs, compressed)
/// this relay holds; a CRI request's headers take well under 1 KiB.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What stands in for an `:authority` h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";

/// Relays `client` to the returned stream (hand that to tonic), rewriting
/// any `:authority` h2 would refuse. The relay ends when either side closes.
pub fn accept_any_authority<C>(client: C) -> DuplexStream
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(4 * MAX_FRAME);
    tokio::spawn(async move {
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let (mut server_rx, mut server_tx) = tokio::io::split(ours);
        let requests = async {
            let result = forward_requests(&mut client_rx, &mut server_tx).await;
            let _ = server_tx.shutdown().await;
            result
        };
        let responses = tokio::io::copy(&mut server_rx, &mut client_tx);
        tokio::pin!(requests, responses);
        tokio::select! {
            result = &mut requests => match result {
                // The client is done sending; its answers still come back.
                Ok(()) => { let _ = responses.await; }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!("CRI connection closed: {e}")
                }
                // The client went away (a reset, a broken pipe): nothing to say.
                Err(e) => tracing::debug!("CRI connection ended: {e}"),
            },
            _ = &mut responses => {}
        }
    });
    theirs
}

/// Copies the client's frames to the server, header blocks rewritten.
async fn forward_requests<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    if !read_or_eof(from, &mut preface).await? {
        return Ok(());
    }
    if &preface != PREFACE {
        return Err(invalid("the client did not open with the HTTP/2 preface (is it an HTTP/1 or TLS client?)"));
    }
    to.write_all(&preface).await?;
    let mut splitter = FrameSplitter::default();
    let mut buf = BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER);
    loop {
        while let Some(out) = splitter.next(&mut buf)? {
            to.write_all(&out).await?;
        }
        if from.read_buf(&mut buf).await? == 0 {
            return if buf.is_empty() && splitter.block.is_empty() {
                Ok(())
            } else {
                Err(invalid("the client closed the connection in the middle of a frame"))
            };
        }
    }
}

/// Reads exactly `buf`; false at a clean end of stream before any byte.
async fn read_or_eof<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = from.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(false) } else { Err(invalid("the client closed the connection mid-preface")) };
        }
        filled += n;
    }
    Ok(true)
}

/// Cuts the client's byte stream into frames; header blocks come out
/// rewritten, every other frame as it came.
#[derive(Default)]
pub struct FrameSplitter {
    /// The HEADERS and CONTINUATION frames of a block not yet ended.
    block: BytesMut,
    rewriter: Rewriter,
}

impl FrameSplitter {
    /// The next complete output from the front of `buf` (consumed), or
    /// None when `buf` holds no complete frame yet.
    pub fn next(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        loop {
            if buf.len() < FRAME_HEADER {
                return Ok(None);
            }
            let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            let (kind, flags) = (buf[3], buf[4]);
            if len > MAX_FRAME {
                return Err(invalid(format!(
                    "a frame of {len} bytes (type {kind:#x}) is over the {MAX_FRAME} the server allows"
                )));
            }
            if buf.len() < FRAME_HEADER + len {
                buf.reserve(FRAME_HEADER + len - buf.len());
                return Ok(None);
            }
            let frame = buf.split_to(FRAME_HEADER + len);
            match kind {
                KIND_HEADERS | KIND_CONTINUATION => {
                    if (kind == KIND_HEADERS) != self.block.is_empty() {
                        return Err(invalid(if kind == KIND_HEADERS {
                            "a HEADERS frame inside another header block"
                        } else {
                            "a CONTINUATION frame outside a header block"
                        }));
                    }
                    if self.block.len() + frame.len() > MAX_HEADER_BLOCK {
                        return Err(invalid(format!("a header block over {MAX_HEADER_BLOCK} bytes")));
                    }
                    self.block.unsplit(frame);
                    if flags & FLAG_END_HEADERS != 0 {
                        let block = self.block.split();
                        return self.rewriter.rewrite(block).map(Some);
                    }
                }
                KIND_PUSH_PROMISE => return Err(invalid("a PUSH_PROMISE frame from a client")),
                _ if !self.block.is_empty() => {
                    return Err(invalid(format!("a frame of type {kind:#x} inside a header block")));
                }
                _ => return Ok(Some(frame.freeze())),
            }
        }
    }
}

/// h2's HPACK codecs: one decodes the client's header blocks (its dynamic
/// table follows the client's encoder), one encodes what tonic reads (its
/// table follows tonic's decoder).
struct Rewriter {
    decoder: Codec<Memory, Bytes>,
    encoder: Codec<Memory, Bytes>,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = Codec::new(Memory::default());
        decoder.set_max_recv_frame_size(MAX_FRAME);
        Rewriter { decoder, encoder: Codec::new(Memory::default()) }
    }
}

impl Rewriter {
    /// One whole header block (its frames, as sent) in, the same headers
    /// out as one block of h2's encoding.
    fn rewrite(&mut self, block: BytesMut) -> io::Result<Bytes> {
        self.decoder.get_mut().input.unsplit(block);
        let frame = match self.decoder.next().now_or_never() {
            Some(Some(Ok(frame))) => frame,
            Some(Some(Err(e))) => return Err(invalid(format!("a header block HTTP/2 cannot read: {e}"))),
            _ => return Err(invalid("an incomplete header block")),
        };
        let Frame::Headers(headers) = frame else {
            return Err(invalid("a header block that is not HEADERS"));
        };
        if headers.is_over_size() {
            return Err(invalid("a header list over HTTP/2's size limit"));
        }
        let (stream, end_stream) = (headers.stream_id(), headers.is_end_stream());
        let (mut pseudo, fields) = headers.into_parts();
        if pseudo.authority.as_ref().is_some_and(|a| http::uri::Authority::try_from(a.as_bytes()).is_err()) {
            pseudo.authority = Some(BytesStr::try_from(Bytes::from_static(LOCALHOST)).expect("ASCII"));
        }
        // A new frame: the old one's PADDED and PRIORITY flags describe
        // bytes the decoder removed.
        let mut out = Headers::new(stream, pseudo, fields);
        if end_stream {
            out.set_end_stream();
        }
        match self.encoder.send(Frame::Headers(out)).now_or_never() {
            Some(Ok(())) => Ok(self.encoder.get_mut().output.split().freeze()),
            Some(Err(e)) => Err(invalid(format!("re-encoding a header block: {e}"))),
            None => Err(invalid("re-encoding a header block did not finish")),
        }
    }
}

/// In-memory I/O for the codecs: reads drain `input` (an empty one is the
/// end of the stream, never a wait), writes append to `output`.
#[derive(Default)]
struct Memory {
    input: BytesMut,
    output: BytesMut,
}

impl AsyncRead for Memory {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.input.len().min(buf.remaining());
        buf.put_slice(&this.input[..n]);
        this.input.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Memory {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().output.put_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's header block for a gRPC call, encoded by h2's codec
    /// (its `:authority` forced to `authority`).
    fn request_block(client: &mut Codec<Memory, Bytes>, stream: u32, authority: &[u8]) -> BytesMut {
        let request = http::Request::post("http://localhost/runtime.v1.RuntimeService/Version")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let (parts, _) = request.into_parts();
        let mut pseudo = h2::frame::Pseudo::request(parts.method, parts.uri, None);
        pseudo.authority = Some(BytesStr::try_from(Bytes::copy_from_slice(authority)).unwrap());
        let frame = Headers::new(stream.into(), pseudo, parts.headers);
        client.send(Frame::Headers(frame)).now_or_never().unwrap().unwrap();
        client.get_mut().output.split()
    }

    fn decode(server: &mut Codec<Memory, Bytes>, bytes: &[u8]) -> Headers {
        server.get_mut().input.extend_from_slice(bytes);
        match server.next().now_or_never() {
            Some(Some(Ok(Frame::Headers(h)))) => h,
            other => panic!("not a HEADERS frame: {other:?}"),
        }
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_rest_passes_as_sent() {
        let mut client = Codec::new(Memory::default());
        let mut server = Codec::new(Memory::default());
        let mut splitter = FrameSplitter::default();
        let settings = Bytes::from_static(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // The same client connection: h2 would refuse the first two.
        for (stream, authority, expected) in [
            (1, &b"/run/runv/cri.sock"[..], &b"localhost"[..]),
            (3, b"run%2Frunv%2Fcri.sock", b"localhost"),
            (5, b"localhost", b"localhost"),
            (7, b"127.0.0.1:10010", b"127.0.0.1:10010"),
        ] {
            let mut buf = BytesMut::from(&settings[..]);
            buf.unsplit(request_block(&mut client, stream, authority));
            assert_eq!(splitter.next(&mut buf).unwrap().unwrap(), settings);
            let out = splitter.next(&mut buf).unwrap().unwrap();
            assert!(buf.is_empty() && splitter.next(&mut buf).unwrap().is_none());
            let headers = decode(&mut server, &out);
            assert_eq!(u32::from(headers.stream_id()), stream);
            let (pseudo, fields) = headers.into_parts();
            assert_eq!(pseudo.authority.as_deref().map(str::as_bytes), Some(expected));
            assert_eq!(pseudo.path.as_deref(), Some("/runtime.v1.RuntimeService/Version"));
            assert_eq!(fields["content-type"], "application/grpc");
        }
    }

    #[test]
    fn frames_arrive_in_any_pieces() {
        let mut client = Codec::new(Memory::default());
        let block = request_block(&mut client, 1, b"/a/b.sock");
        let mut splitter = FrameSplitter::default();
        let mut buf = BytesMut::new();
        let mut outputs = Vec::new();
        for byte in block.iter() {
            buf.put_u8(*byte);
            while let Some(out) = splitter.next(&mut buf).unwrap() {
                outputs.push(out);
            }
        }
        assert_eq!(outputs.len(), 1);
    }

    #[test]
    fn what_is_not_http2_is_refused_by_name() {
        let err = |bytes: &[u8]| FrameSplitter::default().next(&mut BytesMut::from(bytes)).unwrap_err().to_string();
        assert!(
            err(&[0, 0, 0, 9, 0, 0, 0, 0, 1]).contains("CONTINUATION frame outside"),
            "{}",
            err(&[0, 0, 0, 9, 0, 0, 0, 0, 1])
        );
        assert!(err(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]).contains("over the 16384"));
        assert!(err(&[0, 0, 0, 5, 4, 0, 0, 0, 1]).contains("PUSH_PROMISE"));
        // A HEADERS frame whose block is not HPACK.
        assert!(err(&[0, 0, 1, 1, 4, 0, 0, 0, 1, 0xff]).contains("cannot read"));
        // A header block interrupted by a DATA frame.
        assert!(err(&[0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]).contains("inside a header block"));
    }

    #[tokio::test]
    async fn a_client_that_speaks_no_http2_is_closed() {
        let (client, mut peer) = tokio::io::duplex(1024);
        let mut server = accept_any_authority(client);
        peer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "tonic's side got {got:?}");
    }
}
