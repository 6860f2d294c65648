//! SetupNetwork against the agent on the host, in its own network namespace:
//! a veth stands in for the guest NIC the host bridged in.

mod common;

use std::process::Command;

use common::{code_of, ctx, root_or_skip, HostAgent};
use runv_proto::agent::*;

/// Runs `ip ARGS` in the agent's network namespace.
fn ip(agent: &HostAgent, args: &str) -> String {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(agent.child.id().to_string())
        .arg("-n")
        .arg("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn request() -> SetupNetworkRequest {
    SetupNetworkRequest {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: "02:42:0a:09:00:05".into(),
            mtu: 1400,
            addresses: vec![
                IpAddress { address: "10.9.0.5".into(), prefix_len: 24, ..Default::default() },
                IpAddress { address: "fd00:9::5".into(), prefix_len: 64, ..Default::default() },
            ],
            ..Default::default()
        }],
        routes: vec![
            Route { gateway: "10.9.0.1".into(), device: "eth0".into(), ..Default::default() },
            Route {
                destination: "192.168.9.0/24".into(),
                gateway: "10.9.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            Route { gateway: "fd00:9::1".into(), device: "eth0".into(), ipv6: true, ..Default::default() },
        ],
        neighbors: vec![Neighbor {
            address: "10.9.0.9".into(),
            mac: "02:00:00:00:00:09".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_nic_with_the_pod_mac_gets_the_pod_interface_config() {
    if !root_or_skip("the_nic_with_the_pod_mac_gets_the_pod_interface_config") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;
    // The "guest NIC": one end of a veth with the pod interface's MAC.
    ip(&agent, "link add nic7 type veth peer name peer7");
    ip(&agent, "link set nic7 address 02:42:0a:09:00:05");
    ip(&agent, "link set peer7 up");

    c.setup_network(ctx(), &request()).await.unwrap();

    let lo = ip(&agent, "-o link show lo");
    assert!(lo.contains("UP"), "{lo}");
    let link = ip(&agent, "-o link show eth0");
    assert!(link.contains("mtu 1400") && link.contains(",UP") && link.contains("02:42:0a:09:00:05"), "{link}");
    let addrs = ip(&agent, "-o addr show eth0");
    assert!(addrs.contains("inet 10.9.0.5/24") && addrs.contains("inet6 fd00:9::5/64"), "{addrs}");
    let routes = ip(&agent, "route show");
    assert!(routes.contains("default via 10.9.0.1 dev eth0"), "{routes}");
    assert!(routes.contains("192.168.9.0/24 via 10.9.0.1 dev eth0"), "{routes}");
    let routes6 = ip(&agent, "-6 route show");
    assert!(routes6.contains("default via fd00:9::1 dev eth0"), "{routes6}");
    let neigh = ip(&agent, "neigh show dev eth0");
    assert!(neigh.contains("10.9.0.9 lladdr 02:00:00:00:00:09 PERMANENT"), "{neigh}");

    // Applying the same configuration again (a retried call) succeeds.
    c.setup_network(ctx(), &request()).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn bad_network_requests_are_refused_and_the_agent_keeps_serving() {
    if !root_or_skip("bad_network_requests_are_refused_and_the_agent_keeps_serving") {
        return;
    }
    let agent = HostAgent::start();
    let c = agent.client().await;

    let (code, msg) = code_of(c.setup_network(ctx(), &request()).await);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("no guest network interface has MAC 02:42:0a:09:00:05"), "{msg}");

    let mut bad = request();
    bad.interfaces[0].addresses[0].address = "10.9.0.500".into();
    let (code, msg) = code_of(c.setup_network(ctx(), &bad).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("'10.9.0.500' is not an IP address"), "{msg}");

    let mut bad = request();
    bad.routes[1].device = "wlan9".into();
    let (code, msg) = code_of(c.setup_network(ctx(), &bad).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("device 'wlan9' is not one of the interfaces"), "{msg}");

    // Nothing was changed by the refused calls, and the agent still serves.
    let links = ip(&agent, "-o link show");
    assert!(!links.contains("eth0"), "{links}");
    c.health(ctx(), &HealthRequest::new()).await.unwrap();
}
