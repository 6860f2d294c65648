//! Pod networking end to end through containerd's CRI plugin: CNI's bridge
//! and host-local plugins (Debian's containernetworking-plugins) set up each
//! pod's network namespace; runv bridges it into the VM. The host, runv pods
//! and a runc pod reach one another by pod IP, the guest has the pod's DNS
//! settings, and nothing of the network is left after the pods are removed.
//!
//! Run alone with `cargo test --release -p containerd-shim-runv-v2 --test network`.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{container_config, cri_client, netns_names, networked_pod_config, ready, Containerd, CNI_BIN_DIR};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

/// 10.<SUBNET>.0.0/24 on bridge runvbr<SUBNET>.
const SUBNET: u8 = 247;

struct Pod {
    id: String,
    container: String,
    ip: String,
}

/// A pod whose one container serves `hello from <name>` over HTTP on 8080.
async fn serving_pod(
    cri: &mut RuntimeServiceClient<Channel>,
    ctd: &Containerd,
    name: &str,
    handler: &str,
    dns: DnsConfig,
) -> Pod {
    let log_dir = ctd.dir.path().join("logs").join(name);
    std::fs::create_dir_all(&log_dir).unwrap();
    let config = networked_pod_config(name, &log_dir, dns);
    let id = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", ctd.log()))
        .into_inner()
        .pod_sandbox_id;
    // A second server on the pod's loopback only, for PortForward.
    let script = format!(
        "mkdir -p /tmp/www /tmp/local && echo hello from {name} > /tmp/www/index.html \
         && echo hello from {name} on localhost > /tmp/local/index.html && httpd -p 127.0.0.1:8081 -h /tmp/local \
         && exec httpd -f -p 8080 -h /tmp/www"
    );
    let container = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: id.clone(),
            config: Some(container_config("web", &["sh", "-c", &script])),
            sandbox_config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", ctd.log()))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: container.clone() })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", ctd.log()));
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(ip.starts_with(&format!("10.{SUBNET}.0.")), "{name}: pod IP {ip:?}");
    Pod { id, container, ip }
}

async fn exec(cri: &mut RuntimeServiceClient<Channel>, container: &str, cmd: &str) -> (i32, String) {
    let r = cri
        .exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd}: {e}"))
        .into_inner();
    (r.exit_code, format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr)))
}

/// `GET /` from the host, retried while the server comes up.
fn http_get_from_host(ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match std::net::TcpStream::connect_timeout(&format!("{ip}:8080").parse().unwrap(), Duration::from_secs(3)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("hello from") {
                    return body;
                }
                last = body;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no HTTP answer from {ip}:8080: {last}");
}

/// `GET /` from inside one pod to another with busybox nc (its static wget
/// looks the port up through NSS, which a static glibc cannot load), retried
/// while the server starts.
async fn http_get_in_pod(cri: &mut RuntimeServiceClient<Channel>, from: &Pod, to: &Pod) -> String {
    let cmd = format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8080) && \
         case \"$out\" in *hello*) echo \"$out\"; exit 0;; esac; sleep 1; done; echo \"$out\"; exit 1",
        to.ip
    );
    let (code, out) = exec(cri, &from.container, &cmd).await;
    assert_eq!(code, 0, "{} -> {}: {out}", from.ip, to.ip);
    out
}

fn host_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runv_pods_are_on_the_pod_network_with_the_host_each_other_and_runc_pods() {
    let test = "runv_pods_are_on_the_pod_network_with_the_host_each_other_and_runc_pods";
    if !ready(test) {
        return;
    }
    if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
        eprintln!("SKIP {test}: needs the CNI plugins in {CNI_BIN_DIR} (Debian containernetworking-plugins)");
        return;
    }
    let netns_before = netns_names();
    let ctd = Containerd::start_with_network("", SUBNET);
    let mut cri = cri_client(&ctd.socket()).await;
    let dns = DnsConfig {
        servers: vec![format!("10.{SUBNET}.0.53")],
        searches: vec!["svc.runv.test".into()],
        options: vec!["ndots:2".into()],
    };

    let a = serving_pod(&mut cri, &ctd, "runv-a", "runv", dns.clone()).await;
    let b = serving_pod(&mut cri, &ctd, "runv-b", "runv", dns.clone()).await;
    let c = serving_pod(&mut cri, &ctd, "runc-c", "runc", dns.clone()).await;

    // The guest NIC carries the pod IP, under the pod's interface name.
    let (code, addrs) = exec(&mut cri, &a.container, "ip -o -4 addr show").await;
    assert_eq!(code, 0, "{addrs}");
    assert!(
        addrs.contains(&format!("eth0    inet {}/24", a.ip)) || addrs.contains(&format!("eth0 inet {}/24", a.ip)),
        "{addrs}"
    );
    let (_, routes) = exec(&mut cri, &a.container, "ip route").await;
    assert!(routes.contains(&format!("default via 10.{SUBNET}.0.1 dev eth0")), "{routes}");

    // The host reaches the runv pods by their IPs.
    assert!(http_get_from_host(&a.ip).contains("hello from runv-a"));
    assert!(http_get_from_host(&b.ip).contains("hello from runv-b"));
    // runv pods reach each other, and runc and runv pods reach each other.
    assert!(http_get_in_pod(&mut cri, &a, &b).await.contains("hello from runv-b"));
    assert!(http_get_in_pod(&mut cri, &b, &a).await.contains("hello from runv-a"));
    assert!(http_get_in_pod(&mut cri, &a, &c).await.contains("hello from runc-c"));
    assert!(http_get_in_pod(&mut cri, &c, &a).await.contains("hello from runv-a"));

    // containerd's PortForward dials localhost in the pod's network
    // namespace: for a runv pod the shim carries that into the VM, where
    // the loopback-only server answers, as it does in the runc pod.
    for pod in [&a, &c] {
        let name = if pod.id == a.id { "runv-a" } else { "runc-c" };
        let body = port_forward_get(&mut cri, &pod.id, 8081).await;
        assert!(body.contains(&format!("hello from {name} on localhost")), "{name}: {body}");
    }

    // The pod's DNS settings are what the guest's containers resolve with.
    let (_, resolv) = exec(&mut cri, &a.container, "cat /etc/resolv.conf").await;
    for line in [format!("nameserver 10.{SUBNET}.0.53"), "search svc.runv.test".into(), "options ndots:2".into()] {
        assert!(resolv.lines().any(|l| l.trim() == line), "resolv.conf lacks '{line}': {resolv}");
    }

    for pod in [&a, &b, &c] {
        cri.stop_container(StopContainerRequest { container_id: pod.container.clone(), timeout: 2 })
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {e}"));
        cri.remove_container(RemoveContainerRequest { container_id: pod.container.clone() }).await.unwrap();
        cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", ctd.log()));
        cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.id.clone() }).await.unwrap();
    }
    ctd.assert_clean();
    // No network namespace, veth or tap of the pods is left on the host.
    assert_eq!(netns_names(), netns_before, "network namespaces left");
    let bridge = ctd.bridge.clone().unwrap();
    let ports: Vec<_> =
        std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")).into_iter().flatten().flatten().collect();
    assert!(ports.is_empty(), "veths still on {bridge}: {ports:?}");
    let taps: Vec<_> = host_links().into_iter().filter(|l| l.ends_with("_runv")).collect();
    assert!(taps.is_empty(), "taps on the host: {taps:?}");
}

/// GET / through containerd's PortForward to `port` of pod `id`, over its
/// streaming server's WebSocket protocol (`v4.channel.k8s.io`: per port a
/// data and an error channel, each opening with the port); the response.
async fn port_forward_get(cri: &mut RuntimeServiceClient<Channel>, id: &str, port: i32) -> String {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let url = cri
        .port_forward(PortForwardRequest { pod_sandbox_id: id.into(), port: vec![port] })
        .await
        .unwrap_or_else(|e| panic!("PortForward: {e}"))
        .into_inner()
        .url;
    let url = format!("{}?port={port}", url.replacen("http://", "ws://", 1));
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let (mut tx, mut rx) = ws.split();
    let mut data = Vec::new();
    let mut seen = [false, false];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.next()).await.expect("the port-forward stream stalled") {
            Some(Ok(Message::Binary(b))) => match b.split_first() {
                // The first message of each channel is its port.
                Some((&ch @ (0 | 1), rest)) if !seen[ch as usize] => {
                    assert_eq!(rest, &(port as u16).to_le_bytes());
                    seen[ch as usize] = true;
                    if seen == [true, true] {
                        tx.send(Message::Binary([&[0u8][..], b"GET / HTTP/1.0\r\n\r\n"].concat().into()))
                            .await
                            .unwrap();
                    }
                }
                Some((0, rest)) => data.extend_from_slice(rest),
                Some((1, rest)) if !rest.is_empty() => panic!("port-forward error: {}", String::from_utf8_lossy(rest)),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("port-forward stream: {e}"),
        }
        // HTTP/1.0: the server closes after the body; so does the stream.
        if String::from_utf8_lossy(&data).contains("on localhost\n") {
            break;
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    String::from_utf8_lossy(&data).into_owned()
}
