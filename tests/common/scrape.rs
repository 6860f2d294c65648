//! Reading a Prometheus endpoint as a scraper does: GET over plain HTTP,
//! samples picked out of the text format, `promtool check metrics`.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The body of `GET path` on `addr` (HTTP/1.0, read to the end).
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "GET {path}: {head}");
    body.to_string()
}

/// The value of the first sample of `series` (a name with its labels, as
/// printed) in a scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels` (`key="value"` as printed), and how many there were.
pub fn samples(scrape: &str, name: &str, labels: &[&str]) -> (f64, usize) {
    let found: Vec<f64> = scrape
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (found.iter().sum(), found.len())
}

/// The `http://ADDRESS/metrics` address a server printed in `log`.
pub fn metrics_address(log: &str) -> Option<String> {
    let at = log.find("metrics on http://")? + "metrics on http://".len();
    Some(log[at..].split('/').next()?.to_string())
}

/// Fails unless Debian's `promtool check metrics` accepts `scrape`.
pub fn promtool_check(scrape: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    promtool.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{scrape}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}
