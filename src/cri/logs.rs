//! A container's output: read from the FIFOs the shim writes, written to
//! the kubelet's log file in the CRI log format
//! (`<RFC 3339 nanoseconds> <stream> <P|F> <text>`), and handed to attached
//! clients.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, watch};

/// A line longer than this is cut into partial (`P`) entries.
const MAX_LINE: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The CRI log file of one container.
struct LogFile {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    partial: [Vec<u8>; 2],
}

impl LogFile {
    fn open(path: Option<PathBuf>) -> Self {
        let file = path.as_ref().and_then(|p| open_log(p).map_err(|e| tracing::warn!("{}: {e}", p.display())).ok());
        Self { path, file, partial: [Vec::new(), Vec::new()] }
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(p) = &self.path {
            self.file = Some(open_log(p)?);
        }
        Ok(())
    }

    fn entry(&mut self, stream: Stream, tag: char, text: &[u8]) {
        let Some(f) = self.file.as_mut() else { return };
        let mut line = format!("{} {} {tag} ", timestamp(), stream.name()).into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        let _ = f.write_all(&line);
    }

    fn write(&mut self, stream: Stream, data: &[u8]) {
        let i = stream as usize;
        let mut buf = std::mem::take(&mut self.partial[i]);
        buf.extend_from_slice(data);
        let mut rest = buf.as_slice();
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            let line = rest[..n].strip_suffix(b"\r").unwrap_or(&rest[..n]);
            self.entry(stream, 'F', line);
            rest = &rest[n + 1..];
        }
        while rest.len() > MAX_LINE {
            self.entry(stream, 'P', &rest[..MAX_LINE]);
            rest = &rest[MAX_LINE..];
        }
        self.partial[i] = rest.to_vec();
    }

    /// The stream ended: what is left becomes a last full line.
    fn flush(&mut self, stream: Stream) {
        let rest = std::mem::take(&mut self.partial[stream as usize]);
        if !rest.is_empty() {
            self.entry(stream, 'F', &rest);
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Now, in RFC 3339 with nanoseconds, UTC.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Copies a FIFO opened read-write (which never reports its end) into
/// `sink` until `finish` turns true, then takes what the pipe still holds:
/// the shim writes all of a process's output before it reports the exit.
/// The sink is awaited before the next read: a slow consumer (a stream
/// client) holds the pipe back, and so the process, instead of queueing.
pub fn pump<F, Fut>(
    mut rx: pipe::Receiver,
    mut finish: watch::Receiver<bool>,
    mut sink: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                r = rx.read(&mut buf) => match r {
                    Ok(n) if n > 0 => sink(buf[..n].to_vec()).await,
                    _ => break,
                },
                _ = async { let _ = finish.wait_for(|f| *f).await; } => {
                    while let Ok(n) = rx.try_read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        sink(buf[..n].to_vec()).await;
                    }
                    break;
                }
            }
        }
    })
}

/// Opens a FIFO for reading without waiting for a writer.
pub fn open_fifo_reader(path: &Path) -> std::io::Result<pipe::Receiver> {
    pipe::OpenOptions::new().read_write(true).open_receiver(path)
}

/// The copier of one container's output.
#[derive(Clone)]
pub struct Output {
    log: Arc<Mutex<LogFile>>,
    attach: broadcast::Sender<(Stream, Vec<u8>)>,
    finish: watch::Sender<bool>,
    done: watch::Receiver<usize>,
    streams: usize,
}

impl Output {
    /// Starts copying the FIFOs (stderr absent for a terminal) into the
    /// log file at `log_path`. The FIFOs are opened read-write, so opening
    /// never waits for the shim and a restarted reader finds what the
    /// pipe buffered.
    pub fn start(stdout: &Path, stderr: Option<&Path>, log_path: Option<PathBuf>) -> std::io::Result<Self> {
        let log = Arc::new(Mutex::new(LogFile::open(log_path)));
        let (attach, _) = broadcast::channel(64);
        let (finish, _) = watch::channel(false);
        let (done_tx, done) = watch::channel(0usize);
        let done_tx = Arc::new(done_tx);
        let mut pipes = vec![(Stream::Stdout, open_fifo_reader(stdout)?)];
        if let Some(e) = stderr {
            pipes.push((Stream::Stderr, open_fifo_reader(e)?));
        }
        let streams = pipes.len();
        for (stream, rx) in pipes {
            let (sink_log, attach, done) = (log.clone(), attach.clone(), done_tx.clone());
            let sink = move |data: Vec<u8>| {
                sink_log.lock().unwrap().write(stream, &data);
                let _ = attach.send((stream, data));
                std::future::ready(())
            };
            let pumped = pump(rx, finish.subscribe(), sink);
            let log = log.clone();
            tokio::spawn(async move {
                let _ = pumped.await;
                log.lock().unwrap().flush(stream);
                done.send_modify(|d| *d += 1);
            });
        }
        Ok(Self { log, attach, finish, done, streams })
    }

    /// Output as it arrives, for an attached client.
    pub fn subscribe(&self) -> broadcast::Receiver<(Stream, Vec<u8>)> {
        self.attach.subscribe()
    }

    /// Turns true once the process has exited.
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.finish.subscribe()
    }

    /// Reopens the log file (after the kubelet rotated it).
    pub fn reopen(&self) -> std::io::Result<()> {
        self.log.lock().unwrap().reopen()
    }

    /// The process exited: copies what is left, then stops.
    pub async fn finish(&self) {
        self.finish.send_replace(true);
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d >= self.streams).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_cri_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let mut log = LogFile::open(Some(path.clone()));
        log.write(Stream::Stdout, b"one\ntw");
        log.write(Stream::Stderr, b"err\r\n");
        log.write(Stream::Stdout, b"o\n");
        log.write(Stream::Stdout, &vec![b'x'; MAX_LINE + 3]);
        log.flush(Stream::Stdout);
        let text = std::fs::read_to_string(&path).unwrap();
        let entries: Vec<(&str, &str, &str)> = text
            .lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let ts = f.next().unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 30, "timestamp {ts}");
                (f.next().unwrap(), f.next().unwrap(), f.next().unwrap_or(""))
            })
            .collect();
        assert_eq!(entries[0], ("stdout", "F", "one"));
        assert_eq!(entries[1], ("stderr", "F", "err"));
        assert_eq!(entries[2], ("stdout", "F", "two"));
        assert_eq!(entries[3].1, "P");
        assert_eq!(entries[3].2.len(), MAX_LINE);
        assert_eq!(entries[4], ("stdout", "F", "xxx"));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = timestamp();
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], "T");
        assert!(t.starts_with("20"));
    }
}
