//! The SPDY/3.1 streaming client runv did not write the transport of
//! (tests/clients/spdy: moby/spdystream, as client-go and the kubelet use
//! it), built with Debian's Go from Debian's sources: nothing downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;

const SPDYSTREAM: &str = "/usr/share/gocode/src/github.com/moby/spdystream";

/// Builds the client beside this build's `runv`; `None` (printing why
/// `test` skips) when Go or spdystream is missing.
pub fn client_or_skip(test: &str) -> Option<PathBuf> {
    let mut missing = Vec::new();
    if runv::helper::find_program(Path::new("go")).is_none() {
        missing.push("Go (apt-get install golang-go)");
    }
    if !Path::new(SPDYSTREAM).is_dir() {
        missing.push("moby/spdystream (apt-get install golang-github-docker-spdystream-dev)");
    }
    if !missing.is_empty() {
        eprintln!("SKIP {test}: needs {}", missing.join(" and "));
        return None;
    }
    let dir = super::cri::runv_path().parent().unwrap().to_path_buf();
    let bin = dir.join("spdy-client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/spdy/main.go"))
        // GOPATH mode over Debian's Go sources.
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOFLAGS", "")
        .env("GOCACHE", dir.join("go-build"))
        .output()
        .expect("running go build");
    assert!(out.status.success(), "building the SPDY client: {}", String::from_utf8_lossy(&out.stderr));
    Some(bin)
}

/// Runs the client: what it printed, or why it failed.
pub fn run(client: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(client).args(args).output().map_err(|e| format!("running {}: {e}", client.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("spdy-client {args:?}: {}{stdout}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("spdy-client {args:?} printed {stdout:?}: {e}"))
}
