//! `runv cri`'s streaming server through SPDY/3.1, the transport kubectl,
//! crictl, client-go and the kubelet's proxy speak: exec and attach with
//! each remotecommand protocol version (v4's `Status`, v1 to v3's text,
//! a terminal resized over the resize stream), a refused negotiation,
//! port forwarding with concurrent connections on one SPDY connection to
//! a server bound to the pod's loopback, a refused stream and a port with
//! no listener; and hostile clients (an oversized frame, a header block
//! that inflates to megabytes, garbage after the upgrade) that get their
//! connection closed while the server keeps serving.
//!
//! The client is moby/spdystream (Debian's
//! golang-github-docker-spdystream-dev, built with Debian's Go at test
//! time: tests/clients/spdy), the library under client-go and the kubelet.
//! Needs root, the installed guest, docker-registry, Go and spdystream
//! (scripts/test.sh installs them); skips with a printed reason otherwise.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::registry::registry_or_skip;
use common::registry_and_server;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

/// Runs the client; panics with what it said when it fails.
fn spdy(client: &Path, args: &[&str]) -> serde_json::Value {
    common::spdy::run(client, args).unwrap_or_else(|e| panic!("{e}"))
}

fn container(name: &str, image: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(ImageSpec { image: image.into(), ..Default::default() }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

async fn exec_url(rt: &mut RuntimeServiceClient<Channel>, id: &str, script: &str, stdin: bool, tty: bool) -> String {
    rt.exec(ExecRequest {
        container_id: id.into(),
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    })
    .await
    .unwrap()
    .into_inner()
    .url
}

/// The upgrade a SPDY client sends, by hand; returns the connection after
/// the 101.
fn raw_upgrade(url: &str) -> std::net::TcpStream {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        conn,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).unwrap(),
            1,
            "the upgrade answer ended early: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    conn
}

/// Whether the server closes `conn` (reads reach EOF or a reset) within
/// 20 s of what was sent.
fn closed_by_server(mut conn: std::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spdy_clients_exec_attach_and_port_forward_through_runv_cri() {
    let test = "spdy_clients_exec_attach_and_port_forward_through_runv_cri";
    if !common::e2e_ready(test) || !registry_or_skip(test) {
        return;
    }
    let Some(client) = common::spdy::client_or_skip(test) else { return };
    let (_reg, cri, app) = registry_and_server().await;
    let channel = cri.channel().await;
    common::cri::pull(&channel, &app).await;
    let mut rt = RuntimeServiceClient::new(channel);
    let pod_config = common::cri::pod_config("spdy", "default", &cri.dir.path().join("pod-logs"));
    let pod = common::cri::run_pod(&mut rt, &cri, &pod_config).await;
    let web = "mkdir -p /www /lo && echo hello from the pod > /www/index.html && \
               echo hello from localhost > /lo/index.html && httpd -p 8080 -h /www && \
               exec httpd -f -p 127.0.0.1:8081 -h /lo";
    let web = common::cri::start_container(&mut rt, &cri, &pod, &pod_config, container("web", &app, web)).await;

    // v4 (what kubectl offers first): stdin, stdout, stderr, and the exit
    // code in a Status on the error stream.
    let url = exec_url(&mut rt, &web, "read line; echo got $line; echo bye >&2; exit 5", true, false).await;
    let r = spdy(&client, &["exec", &url, "-stdin", "ping\n"]);
    assert_eq!(r["protocol"], "v4.channel.k8s.io", "{r}");
    assert_eq!((r["stdout"].as_str(), r["stderr"].as_str()), (Some("got ping\n"), Some("bye\n")), "{r}");
    let status: serde_json::Value = serde_json::from_str(r["error"].as_str().unwrap()).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "5", "{status}");
    // A URL is good once.
    let again = spdy(&client, &["exec", &url]);
    assert_eq!(again["status"], 404, "{again}");

    // v2: the failure as text; a client from before negotiation (v1): a
    // success writes nothing on the error stream.
    let url = exec_url(&mut rt, &web, "echo two; exit 3", false, false).await;
    let r = spdy(&client, &["exec", &url, "-protocols", "v2.channel.k8s.io"]);
    assert_eq!((r["protocol"].as_str(), r["stdout"].as_str()), (Some("v2.channel.k8s.io"), Some("two\n")), "{r}");
    assert_eq!(r["error"], "command terminated with non-zero exit code: 3", "{r}");
    let url = exec_url(&mut rt, &web, "echo one", false, false).await;
    let r = spdy(&client, &["exec", &url, "-protocols", ""]);
    assert_eq!(
        (r["protocol"].as_str(), r["stdout"].as_str(), r["error"].as_str()),
        (Some(""), Some("one\n"), Some("")),
        "{r}"
    );

    // A terminal, resized over the resize stream (v3 and up).
    let url = exec_url(&mut rt, &web, "sleep 1; stty size", false, true).await;
    let r = spdy(&client, &["exec", &url, "-tty", "-resize", "100x30"]);
    assert_eq!(r["stdout"].as_str().map(str::trim), Some("30 100"), "{r}");
    assert!(r["error"].as_str().unwrap().contains("Success"), "{r}");

    // No protocol in common: 403 naming what the server accepts.
    let url = exec_url(&mut rt, &web, "true", false, false).await;
    let r = spdy(&client, &["exec", &url, "-protocols", "v9.channel.k8s.io"]);
    assert_eq!(r["status"], 403, "{r}");
    assert!(r["accepted"].as_array().unwrap().iter().any(|p| p == "v4.channel.k8s.io"), "{r}");

    // Attach: stdin in, the container's output back, its end ends it.
    let echo = ContainerConfig { stdin: true, ..container("echo", &app, "read line; echo got $line") };
    let echo = common::cri::start_container(&mut rt, &cri, &pod, &pod_config, echo).await;
    let url = rt
        .attach(AttachRequest { container_id: echo.clone(), stdin: true, tty: false, stdout: true, stderr: true })
        .await
        .unwrap()
        .into_inner()
        .url;
    let r = spdy(&client, &["exec", &url, "-stdin", "marco\n"]);
    assert_eq!(r["stdout"], "got marco\n", "{r}");

    // Port forwarding: three connections at once on one SPDY connection,
    // to a server bound to the pod's loopback only; a stream without a
    // usable port is refused; a port with no listener is an error.
    let pf = |rt: &mut RuntimeServiceClient<Channel>| {
        let mut rt = rt.clone();
        let pod = pod.clone();
        async move {
            rt.port_forward(PortForwardRequest { pod_sandbox_id: pod, port: vec![8081] })
                .await
                .unwrap()
                .into_inner()
                .url
        }
    };
    let url = pf(&mut rt).await;
    let r = spdy(&client, &["portforward", &url, "-port", "8081", "-connections", "3", "-bad-port", "0"]);
    assert_eq!(r["protocol"], "portforward.k8s.io", "{r}");
    for (data, error) in r["data"].as_array().unwrap().iter().zip(r["errors"].as_array().unwrap()) {
        assert!(data.as_str().unwrap().contains("hello from localhost"), "{r}");
        assert_eq!(error, "", "{r}");
    }
    assert_eq!(r["rejected"]["0"], "closed after 0 bytes", "{r}");
    let url = pf(&mut rt).await;
    let r = spdy(&client, &["portforward", &url, "-port", "9"]);
    assert_eq!(r["data"][0], "", "{r}");
    assert!(r["errors"][0].as_str().unwrap().contains("error forwarding port 9 to pod"), "{r}");

    // Hostile clients: each loses its connection; the server serves on.
    println!("ATTACK SPDY client: oversized frame, inflating header block, garbage: tried");
    let url = exec_url(&mut rt, &web, "true", false, false).await;
    let mut conn = raw_upgrade(&url);
    conn.write_all(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed_by_server(conn), "a 16 MiB data frame kept the connection");
    let url = exec_url(&mut rt, &web, "true", false, false).await;
    let mut conn = raw_upgrade(&url);
    let mut bomb = Vec::new();
    {
        use flate2::{Compress, Compression, FlushCompress};
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(runv::cri::spdy::DICTIONARY).unwrap();
        let mut block = Vec::with_capacity(64 << 10);
        z.compress_vec(&vec![0u8; 16 << 20], &mut block, FlushCompress::Sync).unwrap();
        let body = [&1u32.to_be_bytes()[..], &[0; 6], &block].concat();
        bomb.extend_from_slice(&[0x80, 3, 0, 1]);
        bomb.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bomb.extend_from_slice(&body);
    }
    conn.write_all(&bomb).unwrap();
    assert!(closed_by_server(conn), "a header block inflating to 16 MiB kept the connection");
    let url = exec_url(&mut rt, &web, "true", false, false).await;
    let mut conn = raw_upgrade(&url);
    conn.write_all(b"GET / HTTP/1.1\r\n\r\nnot spdy at all").unwrap();
    assert!(closed_by_server(conn), "garbage kept the connection");
    let url = exec_url(&mut rt, &web, "echo still serving", false, false).await;
    let r = spdy(&client, &["exec", &url]);
    assert_eq!(r["stdout"], "still serving\n", "{r}");
    println!("ATTACK SPDY client: oversized frame, inflating header block, garbage: held");

    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}\n{}", cri.log());
}
