//! The guest console, bounded. Whatever the guest writes to its serial
//! port (root in the guest can write as fast as the port goes) lands in a
//! pipe the VM process inherits; a thread here copies it into
//! `console.log`, and when that file reaches half the cap it becomes
//! `console.log.1` (replacing the previous one), so the sandbox's console
//! never holds more than `console_log_max_kib` on the host, and the newest
//! lines, the ones errors quote, are always kept.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct ConsoleLog {
    write_end: Option<OwnedFd>,
}

impl ConsoleLog {
    /// Creates the pipe and starts copying into `path` (mode 0600).
    pub fn start(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let file = open_log(path)?;
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("console-log".into())
            .spawn(move || copy_rotating(File::from(read_end), file, &path, max_bytes))?;
        Ok(Self { write_end: Some(write_end) })
    }

    /// The fd the VM process inherits as its console.
    pub fn write_fd(&self) -> Option<RawFd> {
        self.write_end.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Drops our copy of the write end once the VM process has its own, so
    /// the copy ends when the VM does.
    pub fn close_write_end(&mut self) {
        self.write_end = None;
    }
}

fn open_log(path: &Path) -> std::io::Result<File> {
    File::options().create(true).write(true).truncate(true).mode(0o600).open(path)
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

fn copy_rotating(mut from: impl Read, mut file: File, path: &Path, max_bytes: u64) {
    let half = (max_bytes / 2).max(4096);
    let mut written = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if written + n as u64 > half {
            let _ = std::fs::rename(path, rotated(path));
            match open_log(path) {
                Ok(f) => file = f,
                Err(_) => return,
            }
            written = 0;
        }
        if file.write_all(&buf[..n]).is_err() {
            return;
        }
        written += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_console_flood_stays_within_the_cap() {
        println!("ATTACK a console flood (unit): tried");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = ConsoleLog::start(&path, 64 * 1024).unwrap();
        let mut w = File::from(console.write_end.as_ref().unwrap().try_clone().unwrap());
        console.close_write_end();
        for i in 0..100_000 {
            writeln!(w, "line {i:06} from a guest that never stops").unwrap();
        }
        writeln!(w, "the last line").unwrap();
        drop(w);
        // The copy ends at EOF; wait for the last line to land.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&path).unwrap_or_default().contains("the last line") {
            assert!(std::time::Instant::now() < deadline, "the console copy did not finish");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let total = std::fs::metadata(&path).unwrap().len() + std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(total <= 64 * 1024, "{total} bytes kept, 4 MiB written");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        println!("ATTACK a console flood (unit): held");
    }
}
