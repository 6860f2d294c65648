//! SPDY/3.1 framing, the server's half, as the Kubernetes streaming
//! clients speak it (moby/spdystream under client-go's remotecommand and
//! portforward, kubectl, crictl, and the kubelet proxying the apiserver's
//! streams): control and data frames, header blocks compressed with one
//! zlib stream per direction primed with the SPDY/3 dictionary.
//!
//! Those clients neither send nor honour flow control (WINDOW_UPDATE,
//! SETTINGS), so neither does this side; what bounds memory is the caps
//! below and the callers' bounded queues. Every length read here comes
//! from a client and is checked before anything is allocated for it.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

include!("spdy_dictionary.rs");

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// Bytes of a frame's header: both kinds have 8.
const FRAME_HEADER: usize = 8;

/// RST_STREAM status: the frame broke the protocol.
pub const PROTOCOL_ERROR: u32 = 1;
/// RST_STREAM status: the stream was refused before any processing.
pub const REFUSED_STREAM: u32 = 3;

/// Largest control frame read: a header block the kubelet's clients send
/// is well under 1 KiB.
pub const MAX_CONTROL_FRAME: usize = 64 << 10;
/// Largest data frame read (SPDY allows 16 MiB; the clients write at most
/// 32 KiB at a time).
pub const MAX_DATA_FRAME: usize = 1 << 20;
/// Most bytes a header block may inflate to, and most headers in it.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
const MAX_HEADERS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("SPDY {kind} frame of {len} bytes (at most {max})")]
    TooLarge { kind: &'static str, len: usize, max: usize },
    #[error("SPDY version {0} (only 3 is spoken)")]
    Version(u16),
    #[error("SPDY {0}")]
    Malformed(&'static str),
    #[error("SPDY header block: {0}")]
    HeaderBlock(String),
}

/// A stream's headers: lower-case names; a value with NULs is several.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl<const N: usize> From<[(&str, &str); N]> for Headers {
    fn from(pairs: [(&str, &str); N]) -> Self {
        Headers(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
    }
}

/// What a client sends that a server acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A new stream; `fin`: the client will send nothing on it.
    SynStream {
        id: u32,
        headers: Headers,
        fin: bool,
    },
    /// A new stream whose id is not odd and above every earlier one, as a
    /// client's must be: it is to be reset with `PROTOCOL_ERROR`.
    BadStreamId {
        id: u32,
    },
    Data {
        id: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Reset {
        id: u32,
        status: u32,
    },
    Ping(u32),
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY, NOOP: nothing to do.
    Ignored,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads frames from bytes: the client-to-server header zlib stream lives
/// here, so one decoder serves one connection, in order.
pub struct Decoder {
    inflate: Decompress,
    /// The client's last stream id.
    last_stream: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Self { inflate: Decompress::new(true), last_stream: 0 }
    }
}

impl Decoder {
    /// The frame at the start of `buf` and the bytes it took; `None` while
    /// `buf` holds only part of one.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < FRAME_HEADER {
            return Ok(None);
        }
        let first = be32(buf);
        let (flags, len) = (buf[4], (be32(&buf[4..]) & 0x00ff_ffff) as usize);
        let control = first & 0x8000_0000 != 0;
        let (kind, max) = if control { ("control", MAX_CONTROL_FRAME) } else { ("data", MAX_DATA_FRAME) };
        if len > max {
            return Err(FrameError::TooLarge { kind, len, max });
        }
        if buf.len() < FRAME_HEADER + len {
            return Ok(None);
        }
        let body = &buf[FRAME_HEADER..FRAME_HEADER + len];
        let fin = flags & FLAG_FIN != 0;
        let frame = if !control {
            Frame::Data { id: first & 0x7fff_ffff, data: body.to_vec(), fin }
        } else {
            let version = ((first >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            let stream_id = |at: usize| -> Result<u32, FrameError> {
                let id = body.get(at..at + 4).map(be32).ok_or(FrameError::Malformed("control frame too short"))?;
                match id & 0x7fff_ffff {
                    0 => Err(FrameError::Malformed("stream id 0")),
                    id => Ok(id),
                }
            };
            match (first & 0xffff) as u16 {
                SYN_STREAM => {
                    let id = stream_id(0)?;
                    // id, associated id, priority and slot: 10 bytes.
                    let block = body.get(10..).ok_or(FrameError::Malformed("SYN_STREAM too short"))?;
                    // Inflated either way: the block advances the zlib stream.
                    let headers = parse_header_block(&self.inflate(block)?)?;
                    if id % 2 == 0 || id <= self.last_stream {
                        Frame::BadStreamId { id }
                    } else {
                        self.last_stream = id;
                        Frame::SynStream { id, headers, fin }
                    }
                }
                RST_STREAM if len == 8 => Frame::Reset { id: stream_id(0)?, status: be32(&body[4..]) },
                PING if len == 4 => Frame::Ping(be32(body)),
                GOAWAY => Frame::GoAway,
                RST_STREAM | PING => return Err(FrameError::Malformed("control frame of the wrong length")),
                SYN_REPLY | 8 /* HEADERS */ => {
                    // Their blocks still advance the shared zlib stream.
                    let block = body.get(4..).ok_or(FrameError::Malformed("header frame too short"))?;
                    self.inflate(block)?;
                    Frame::Ignored
                }
                _ => Frame::Ignored,
            }
        };
        Ok(Some((frame, FRAME_HEADER + len)))
    }

    /// One header block through the connection's zlib stream, which the
    /// client primed with the SPDY dictionary.
    fn inflate(&mut self, mut block: &[u8]) -> Result<Vec<u8>, FrameError> {
        let too_big = || FrameError::HeaderBlock(format!("inflates past {MAX_HEADER_BLOCK} bytes"));
        let mut out = Vec::with_capacity(4096);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(too_big());
                }
                out.reserve_exact(out.len().min(MAX_HEADER_BLOCK - out.len()));
            }
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let result = self.inflate.decompress_vec(block, &mut out, FlushDecompress::Sync);
            let consumed = (self.inflate.total_in() - in_before) as usize;
            block = &block[consumed..];
            match result {
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(DICTIONARY).map_err(|e| FrameError::HeaderBlock(e.to_string()))?;
                }
                Err(e) => return Err(FrameError::HeaderBlock(e.to_string())),
                Ok(flate2::Status::StreamEnd) => {
                    return Err(FrameError::HeaderBlock("the client ended its zlib stream".into()))
                }
                // Everything in and room left over: the block is all out.
                Ok(_) if block.is_empty() && out.len() < out.capacity() => return Ok(out),
                Ok(_) if consumed == 0 && out.len() == out_before && out.len() < out.capacity() => {
                    return Err(FrameError::HeaderBlock("zlib made no progress".into()))
                }
                Ok(_) => {}
            }
        }
    }
}

/// An inflated header block: a count, then each name and value with its
/// 32-bit length.
fn parse_header_block(b: &[u8]) -> Result<Headers, FrameError> {
    let bad = |what: &str| FrameError::HeaderBlock(what.to_string());
    let mut at = 0usize;
    let next = |at: &mut usize| -> Result<String, FrameError> {
        let len = b.get(*at..*at + 4).map(be32).ok_or_else(|| bad("truncated"))? as usize;
        let s = b.get(*at + 4..(*at + 4).saturating_add(len)).ok_or_else(|| bad("truncated"))?;
        *at += 4 + len;
        String::from_utf8(s.to_vec()).map_err(|_| bad("a name or value is not UTF-8"))
    };
    let count = b.get(..4).map(be32).ok_or_else(|| bad("truncated"))? as usize;
    if count > MAX_HEADERS {
        return Err(FrameError::HeaderBlock(format!("{count} headers (at most {MAX_HEADERS})")));
    }
    at += 4;
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = next(&mut at)?;
        let value = next(&mut at)?;
        if name.is_empty() || name.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(FrameError::HeaderBlock(format!("header name {name:?} is empty or not lower case")));
        }
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_string()));
        }
    }
    Ok(Headers(headers))
}

/// Writes frames: the server-to-client header zlib stream lives here.
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::best(), true);
        deflate.set_dictionary(DICTIONARY).expect("priming zlib with the SPDY dictionary");
        Self { deflate }
    }
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER + body.len());
    f.extend_from_slice(&(0x8000_0000u32 | (VERSION as u32) << 16 | kind as u32).to_be_bytes());
    f.extend_from_slice(&((flags as u32) << 24 | body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

impl Encoder {
    fn header_block(&mut self, headers: &Headers) -> Vec<u8> {
        let mut plain = (headers.0.len() as u32).to_be_bytes().to_vec();
        for (n, v) in &headers.0 {
            for s in [n, v] {
                plain.extend_from_slice(&(s.len() as u32).to_be_bytes());
                plain.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = &plain[..];
        loop {
            let before = self.deflate.total_in();
            self.deflate.compress_vec(input, &mut out, FlushCompress::Sync).expect("deflating a header block");
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete when it left room in the output.
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }

    /// The answer to a client's SYN_STREAM, with no headers (as the
    /// kubelet's); `fin` refuses the stream.
    pub fn syn_reply(&mut self, id: u32, fin: bool) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend(self.header_block(&Headers::default()));
        control(SYN_REPLY, if fin { FLAG_FIN } else { 0 }, &body)
    }

    /// A new stream, as a client opens one (tests).
    #[cfg(test)]
    pub fn syn_stream(&mut self, id: u32, headers: &Headers, fin: bool) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend(self.header_block(headers));
        control(SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &body)
    }

    pub fn data(id: u32, data: &[u8], fin: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(FRAME_HEADER + data.len());
        f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(&((if fin { FLAG_FIN } else { 0 } as u32) << 24 | data.len() as u32).to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    pub fn reset(id: u32, status: u32) -> Vec<u8> {
        control(RST_STREAM, 0, &[id.to_be_bytes(), status.to_be_bytes()].concat())
    }

    pub fn ping(id: u32) -> Vec<u8> {
        control(PING, 0, &id.to_be_bytes())
    }

    pub fn go_away(last_stream: u32) -> Vec<u8> {
        control(GOAWAY, 0, &[last_stream.to_be_bytes(), 0u32.to_be_bytes()].concat())
    }
}

/// Reads a connection's frames.
pub struct FrameReader<R> {
    conn: R,
    buf: Vec<u8>,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `read_ahead`: bytes already read past the HTTP upgrade request.
    pub fn new(conn: R, read_ahead: Vec<u8>) -> Self {
        Self { conn, buf: read_ahead, decoder: Decoder::default() }
    }

    /// The next frame; `None` when the client closed the connection.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some((frame, used)) = self.decoder.decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 << 10];
            match self.conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// What the server writes, in order, through one writer task.
#[derive(Debug)]
pub enum Out {
    Reply {
        id: u32,
        refuse: bool,
    },
    Data {
        id: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Reset {
        id: u32,
        status: u32,
    },
    Ping(u32),
    /// The last frame: GOAWAY, then the write side closes.
    GoAway,
}

/// Frames queued for one connection before a sender waits.
const WRITE_QUEUE: usize = 64;

/// Starts the task that writes a connection's frames; it ends after
/// `Out::GoAway`, when every sender is gone, or when a write fails.
pub fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut conn: W,
) -> (mpsc::Sender<Out>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Out>(WRITE_QUEUE);
    let task = tokio::spawn(async move {
        let mut encoder = Encoder::default();
        let mut last_reply = 0;
        while let Some(out) = rx.recv().await {
            let bytes = match out {
                Out::Reply { id, refuse } => {
                    last_reply = last_reply.max(id);
                    encoder.syn_reply(id, refuse)
                }
                Out::Data { id, data, fin } => Encoder::data(id, &data, fin),
                Out::Reset { id, status } => Encoder::reset(id, status),
                Out::Ping(id) => Encoder::ping(id),
                Out::GoAway => {
                    let _ = conn.write_all(&Encoder::go_away(last_reply)).await;
                    break;
                }
            };
            if conn.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = conn.shutdown().await;
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        // Its length and Adler-32, as every SPDY/3 peer primes zlib with.
        assert_eq!(DICTIONARY.len(), 1423);
        let mut d = Compress::new(Compression::best(), true);
        assert_eq!(d.set_dictionary(DICTIONARY).unwrap(), 0xe3c6a7c2);
    }

    #[test]
    fn frames_round_trip_through_one_zlib_stream_per_direction() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let mut wire = Vec::new();
        for id in [1u32, 3, 5] {
            let port = id.to_string();
            wire.extend(enc.syn_stream(id, &Headers::from([("streamtype", "data"), ("port", &port)]), id == 5));
        }
        wire.extend(Encoder::data(3, b"GET /", true));
        wire.extend(Encoder::ping(7));
        wire.extend(Encoder::reset(1, 5));
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some((f, used)) = dec.decode(&wire[at..]).unwrap() {
            frames.push(f);
            at += used;
        }
        assert_eq!(at, wire.len());
        assert_eq!(frames.len(), 6);
        let Frame::SynStream { id: 3, headers, fin: false } = &frames[1] else { panic!("{:?}", frames[1]) };
        assert_eq!((headers.get("streamtype"), headers.get("port")), (Some("data"), Some("3")));
        assert!(matches!(frames[2], Frame::SynStream { id: 5, fin: true, .. }));
        assert_eq!(frames[3], Frame::Data { id: 3, data: b"GET /".to_vec(), fin: true });
        assert_eq!(frames[4], Frame::Ping(7));
        assert_eq!(frames[5], Frame::Reset { id: 1, status: 5 });
        // Stream ids must be odd and rise.
        for (id, ok) in [(7, true), (7, false), (5, false), (10, false), (9, true)] {
            let f = enc.syn_stream(id, &Headers::from([("streamtype", "error")]), false);
            let frame = dec.decode(&f).unwrap().unwrap().0;
            assert_eq!(matches!(frame, Frame::SynStream { .. }), ok, "{id}: {frame:?}");
            assert_eq!(matches!(frame, Frame::BadStreamId { .. }), !ok, "{id}: {frame:?}");
        }
        // A frame cut short is not a frame yet.
        let one = Encoder::data(9, b"abc", false);
        assert_eq!(dec.decode(&one[..one.len() - 1]).unwrap(), None);
    }

    #[test]
    fn frames_another_zlib_compressed_are_read() {
        // The fuzz seeds, written by CPython's zlib (C zlib), the first
        // byte being the fuzz target's cut.
        let seed = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/spdy_frames/exec"));
        let (mut dec, mut at, mut frames) = (Decoder::default(), 1, Vec::new());
        while let Some((f, used)) = dec.decode(&seed[at..]).unwrap() {
            frames.push(f);
            at += used;
        }
        assert_eq!(at, seed.len());
        let types: Vec<_> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::SynStream { headers, .. } => headers.get("streamtype"),
                _ => None,
            })
            .collect();
        assert_eq!(types, ["error", "stdin", "stdout", "resize"]);
        assert_eq!(frames[4], Frame::Data { id: 3, data: b"hello\n".to_vec(), fin: true });
        assert_eq!(frames[6], Frame::Ping(1));
    }

    #[test]
    fn attack_oversized_frames_are_refused_before_allocation() {
        println!("ATTACK SPDY frames past the caps: tried");
        let mut dec = Decoder::default();
        let data = [0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        assert!(matches!(dec.decode(&data), Err(FrameError::TooLarge { kind: "data", .. })));
        let ctl = [0x80, 3, 0, 1, 0, 0x10, 0, 0];
        assert!(matches!(dec.decode(&ctl), Err(FrameError::TooLarge { kind: "control", .. })));
        // A header block that inflates to megabytes (zeros compress 1000:1).
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(DICTIONARY).unwrap();
        let mut block = Vec::with_capacity(64 << 10);
        z.compress_vec(&vec![0u8; 8 << 20], &mut block, FlushCompress::Sync).unwrap();
        assert!(block.len() < MAX_CONTROL_FRAME - 10, "{}", block.len());
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 6]);
        body.extend(block);
        let err = dec.decode(&control(SYN_STREAM, 0, &body)).unwrap_err();
        assert!(matches!(err, FrameError::HeaderBlock(ref m) if m.contains("inflates past")), "{err}");
        // Counts and lengths inside a block that point past it.
        assert!(parse_header_block(&[0, 0, 0, 200]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0]).is_err());
        println!("ATTACK SPDY frames past the caps: held");
    }

    #[test]
    fn other_versions_and_stream_zero_are_refused() {
        let mut dec = Decoder::default();
        assert_eq!(dec.decode(&control(PING, 0, &[0, 0, 0, 1])[..]).unwrap().unwrap().0, Frame::Ping(1));
        let mut v2 = control(PING, 0, &[0, 0, 0, 1]);
        v2[1] = 2;
        assert_eq!(dec.decode(&v2), Err(FrameError::Version(2)));
        assert!(dec.decode(&Encoder::reset(0, 1)).is_err());
        assert_eq!(dec.decode(&control(9, 0, &[0; 8])).unwrap().unwrap().0, Frame::Ignored);
    }
}
