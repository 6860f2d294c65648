//! The host side of pod networking against real network namespaces: a veth
//! pair as CNI's bridge plugin makes it, the tap and the tc redirects runv
//! adds, traffic crossing them, what the guest is told, and teardown.
//! Needs root (netns, veth, tc); skips with a printed reason otherwise.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use runv::network::{detach_leftovers, NetworkError, PodNetwork};

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !ip {
        eprintln!("SKIP {test}: needs root and iproute2 (network namespaces, veth, tc)");
    }
    root && ip
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod network namespace with eth0 on a veth whose peer is on the host,
/// addressed like the bridge plugin does (10.X.0.2/24, gateway 10.X.0.1).
struct Pod {
    name: String,
    host_if: String,
}

impl Pod {
    fn new(tag: &str, subnet: u8) -> Self {
        let id = std::process::id() % 100_000;
        let pod = Pod { name: format!("runv-test-{tag}-{id}"), host_if: format!("rv{tag}{id}") };
        let (n, h, s) = (&pod.name, &pod.host_if, subnet);
        sh(&format!(
            "ip netns add {n} && ip link add {h} type veth peer name eth0 netns {n} && \
             ip addr add 10.{s}.0.1/24 dev {h} && ip link set {h} up && \
             ip -n {n} link set eth0 address 02:42:0a:{s:02x}:00:02 mtu 1400 up && \
             ip -n {n} addr add 10.{s}.0.2/24 dev eth0 && \
             ip -n {n} route add default via 10.{s}.0.1 && \
             ip -n {n} route add 192.168.{s}.0/24 via 10.{s}.0.1 dev eth0 && \
             ip -n {n} neigh add 10.{s}.0.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent"
        ));
        pod
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn exec(&self, cmd: &str) -> String {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}

#[test]
fn a_veth_is_bridged_to_a_tap_both_ways_and_the_guest_is_told_its_config() {
    if !root_or_skip("a_veth_is_bridged_to_a_tap_both_ways_and_the_guest_is_told_its_config") {
        return;
    }
    let pod = Pod::new("a", 251);
    let network = PodNetwork::attach(&pod.path()).unwrap();

    assert_eq!(network.devices.len(), 1);
    let dev = &network.devices[0];
    assert_eq!(
        (dev.interface.as_str(), dev.tap_name.as_str(), dev.mac.as_str()),
        ("eth0", "tap0_runv", "02:42:0a:fb:00:02")
    );
    let links = pod.exec("ip -o link show");
    assert!(links.contains("tap0_runv") && links.contains("mtu 1400"), "{links}");
    for dev in ["eth0", "tap0_runv"] {
        let filters = pod.exec(&format!("tc filter show dev {dev} ingress"));
        assert!(filters.contains("protocol all") && filters.contains("mirred"), "{dev}: {filters}");
        let other = if dev == "eth0" { "tap0_runv" } else { "eth0" };
        assert!(filters.contains(&format!("Redirect to device {other}")), "{dev}: {filters}");
    }

    // What the agent gets: the interface, its address, the routes that are
    // not the kernel's own, the permanent neighbour.
    let g = &network.guest;
    assert_eq!(g.interfaces.len(), 1);
    assert_eq!(
        (g.interfaces[0].name.as_str(), g.interfaces[0].mac.as_str(), g.interfaces[0].mtu),
        ("eth0", "02:42:0a:fb:00:02", 1400)
    );
    let addrs: Vec<_> = g.interfaces[0].addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
    assert_eq!(addrs, ["10.251.0.2/24"]);
    let routes: Vec<_> = g.routes.iter().map(|r| format!("{}|{}|{}", r.destination, r.gateway, r.device)).collect();
    assert!(routes.contains(&"|10.251.0.1|eth0".to_string()), "{routes:?}");
    assert!(routes.contains(&"192.168.251.0/24|10.251.0.1|eth0".to_string()), "{routes:?}");
    assert!(
        !routes.iter().any(|r| r.starts_with("10.251.0.0/24")),
        "the kernel's subnet route is the guest's own: {routes:?}"
    );
    let neigh: Vec<_> = g.neighbors.iter().map(|n| format!("{} {} {}", n.address, n.mac, n.device)).collect();
    assert_eq!(neigh, ["10.251.0.9 02:00:00:00:00:09 eth0"]);

    // The tap carries a vnet header (offloads for either VMM):
    // `virtio_net_hdr`, 10 bytes until a VMM sets its own size.
    let fd = dev.tap.as_raw_fd();
    let mut ifreq = [0u8; 40];
    // SAFETY: TUNGETIFF writes a struct ifreq, which `ifreq` can hold.
    assert_eq!(unsafe { libc::ioctl(fd, 0x8004_54d2, ifreq.as_mut_ptr()) }, 0);
    let flags = i32::from(i16::from_ne_bytes([ifreq[16], ifreq[17]]));
    assert_eq!(
        flags & (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
    );

    // Traffic from the host to the pod IP comes out of the tap (the ARP
    // request for 10.251.0.2), and a frame written to the tap leaves by eth0.
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.send_to(b"hello", "10.251.0.2:9").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    let arp = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(frame) = read_frame(fd, left) else { panic!("no ARP request reached the tap; saw {seen:02x?}") };
        // Other frames (IPv6 router solicitations, MLD) may come first.
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
            break frame;
        }
        seen.push(frame);
    };
    assert_eq!(&arp[38..42], &[10, 251, 0, 2], "asking for the pod IP: {arp:02x?}");
    let before = rx_packets(&pod.host_if);
    let mut reply = vec![0u8; VNET_HDR];
    reply.extend_from_slice(&[0xffu8; 6]);
    reply.extend_from_slice(&[0x02, 0x42, 0x0a, 0xfb, 0x00, 0x02, 0x88, 0xb5]);
    reply.resize(VNET_HDR + 60, 0);
    // SAFETY: writing a buffer we own to the tap descriptor.
    let n = unsafe { libc::write(fd, reply.as_ptr().cast(), reply.len()) };
    assert_eq!(n, reply.len() as isize);
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx_packets(&pod.host_if) > before, "the frame did not reach the host side of the veth");

    network.detach();
    let links = pod.exec("ip -o link show");
    assert!(!links.contains("tap0_runv"), "{links}");
    let qdiscs = pod.exec("tc qdisc show dev eth0");
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

/// The tap's vnet header before a VMM sets its size: `virtio_net_hdr`.
const VNET_HDR: usize = 10;

/// The next frame from the tap, without its vnet header.
fn read_frame(fd: i32, timeout: Duration) -> Option<Vec<u8>> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd we own.
    if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } != 1 {
        return None;
    }
    let mut buf = vec![0u8; 2048];
    // SAFETY: reading into a buffer we own.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n > VNET_HDR as isize).then(|| buf[VNET_HDR..n as usize].to_vec())
}

fn rx_packets(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/rx_packets")).unwrap().trim().parse().unwrap()
}

#[test]
fn an_interface_the_model_cannot_carry_is_refused_and_nothing_is_left() {
    if !root_or_skip("an_interface_the_model_cannot_carry_is_refused_and_nothing_is_left") {
        return;
    }
    let pod = Pod::new("b", 252);
    pod.exec("ip link add br7 type bridge");
    let err = PodNetwork::attach(&pod.path()).unwrap_err();
    assert!(matches!(err, NetworkError::Unsupported { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("br7") && msg.contains("type bridge"), "{msg}");
    let links = pod.exec("ip -o link show");
    assert!(!links.contains("_runv"), "{links}");
    assert!(!pod.exec("tc qdisc show dev eth0").contains("ingress"));
}

#[test]
fn a_missing_netns_is_a_clear_error() {
    if !root_or_skip("a_missing_netns_is_a_clear_error") {
        return;
    }
    let err = PodNetwork::attach(std::path::Path::new("/run/netns/runv-no-such-netns")).unwrap_err();
    assert!(err.to_string().contains("network namespace /run/netns/runv-no-such-netns"), "{err}");
}

#[test]
fn leftovers_of_a_dead_process_are_removed_from_its_record() {
    if !root_or_skip("leftovers_of_a_dead_process_are_removed_from_its_record") {
        return;
    }
    let pod = Pod::new("c", 253);
    let network = PodNetwork::attach(&pod.path()).unwrap();
    let record = network.record();
    // As if the process died: its descriptors stay open here, so the tap
    // and the filters stay too, until the record is used.
    std::mem::forget(network);
    assert!(pod.exec("ip -o link show").contains("tap0_runv"));
    detach_leftovers(&record);
    assert!(!pod.exec("ip -o link show").contains("tap0_runv"));
    assert!(!pod.exec("tc qdisc show dev eth0").contains("ingress"));
    // A record whose namespace is gone is nothing to do.
    drop(pod);
    detach_leftovers(&record);
}
