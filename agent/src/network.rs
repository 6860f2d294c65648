//! The pod network in the guest: each interface the host bridged in arrives
//! as a virtio-net NIC with the pod interface's MAC; it is renamed, given
//! the MTU and addresses, brought up, and the routes and static neighbours
//! follow. Everything is checked before anything is changed.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use runv_proto::agent::SetupNetworkRequest;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("no guest network interface has MAC {mac} (for {name})")]
    NoSuchNic { name: String, mac: String },
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

fn invalid(msg: String) -> NetworkError {
    NetworkError::Invalid(msg)
}

/// Limits that keep a bad request from doing much work.
const MAX_INTERFACES: usize = 16;
const MAX_ADDRESSES: usize = 64;
const MAX_ROUTES: usize = 256;
const MAX_NEIGHBORS: usize = 256;

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn parse_ip(text: &str, what: &str) -> Result<IpAddr, NetworkError> {
    text.parse().map_err(|_| invalid(format!("{what}: '{text}' is not an IP address")))
}

fn check_prefix(ip: &IpAddr, len: u32, what: &str) -> Result<u8, NetworkError> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(invalid(format!("{what}: prefix length {len} is over {max}")));
    }
    Ok(len as u8)
}

fn check_name(name: &str) -> Result<(), NetworkError> {
    // IFNAMSIZ is 16 with the terminating NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0', ':']) || name == "." || name == ".." {
        return Err(invalid(format!("interface name '{name}' is not a valid Linux interface name")));
    }
    Ok(())
}

/// One route, checked.
struct RouteSpec {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    device: String,
    scope: u8,
    ipv6: bool,
}

/// Validates the whole request; nothing is changed when it is refused.
fn check(req: &SetupNetworkRequest) -> Result<Vec<RouteSpec>, NetworkError> {
    if req.interfaces.len() > MAX_INTERFACES || req.routes.len() > MAX_ROUTES || req.neighbors.len() > MAX_NEIGHBORS {
        return Err(invalid(format!(
            "too many entries ({} interfaces, {} routes, {} neighbours; at most {MAX_INTERFACES}, {MAX_ROUTES}, {MAX_NEIGHBORS})",
            req.interfaces.len(),
            req.routes.len(),
            req.neighbors.len()
        )));
    }
    let mut names = Vec::new();
    for i in &req.interfaces {
        check_name(&i.name)?;
        if names.contains(&i.name.as_str()) {
            return Err(invalid(format!("interface {} is listed twice", i.name)));
        }
        names.push(&i.name);
        parse_mac(&i.mac).ok_or_else(|| invalid(format!("interface {}: '{}' is not a MAC address", i.name, i.mac)))?;
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid(format!("interface {}: MTU {} is out of range (68-65535)", i.name, i.mtu)));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!("interface {}: more than {MAX_ADDRESSES} addresses", i.name)));
        }
        for a in &i.addresses {
            let ip = parse_ip(&a.address, &format!("interface {} address", i.name))?;
            check_prefix(&ip, a.prefix_len, &format!("interface {} address {}", i.name, a.address))?;
        }
    }
    let known = |device: &str, what: &str| {
        if names.contains(&device) {
            Ok(())
        } else {
            Err(invalid(format!("{what}: device '{device}' is not one of the interfaces")))
        }
    };
    let mut routes = Vec::new();
    for r in &req.routes {
        let what = format!("route to '{}'", if r.destination.is_empty() { "default" } else { &r.destination });
        known(&r.device, &what)?;
        let destination = if r.destination.is_empty() {
            None
        } else {
            let (ip, len) = r
                .destination
                .split_once('/')
                .ok_or_else(|| invalid(format!("{what}: the destination needs a prefix length (a.b.c.d/n)")))?;
            let ip = parse_ip(ip, &what)?;
            let len = len.parse::<u32>().map_err(|_| invalid(format!("{what}: bad prefix length '{len}'")))?;
            Some((ip, check_prefix(&ip, len, &what)?))
        };
        let gateway = (!r.gateway.is_empty()).then(|| parse_ip(&r.gateway, &what)).transpose()?;
        let source = (!r.source.is_empty()).then(|| parse_ip(&r.source, &what)).transpose()?;
        for ip in destination.map(|d| d.0).iter().chain(&gateway).chain(&source) {
            if ip.is_ipv6() != r.ipv6 {
                return Err(invalid(format!("{what}: {ip} does not match the route's IP version")));
            }
        }
        if r.scope > 255 {
            return Err(invalid(format!("{what}: scope {} is out of range", r.scope)));
        }
        routes.push(RouteSpec {
            destination,
            gateway,
            source,
            device: r.device.clone(),
            scope: r.scope as u8,
            ipv6: r.ipv6,
        });
    }
    for n in &req.neighbors {
        known(&n.device, &format!("neighbour {}", n.address))?;
        parse_ip(&n.address, "neighbour")?;
        parse_mac(&n.mac)
            .ok_or_else(|| invalid(format!("neighbour {}: '{}' is not a MAC address", n.address, n.mac)))?;
    }
    Ok(routes)
}

/// Applies `req` to the network namespace the agent runs in.
pub async fn setup(req: &SetupNetworkRequest) -> Result<(), NetworkError> {
    let routes = check(req)?;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = apply(&handle, req, &routes).await;
    connection.abort();
    result
}

/// Brings the loopback up: every pod has `localhost`, with a pod network
/// or without one (a hostNetwork pod's VM has nothing else).
pub async fn loopback_up() -> Result<(), NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = loopback_up_with(&handle).await.map(drop);
    connection.abort();
    result
}

/// Brings the loopback up; returns every link.
async fn loopback_up_with(handle: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(nl("listing links"))?;
    for link in links.iter().filter(|l| l.header.flags.contains(LinkFlags::Loopback)) {
        set_link(handle, LinkUnspec::new_with_index(link.header.index).up().build(), "bringing lo up").await?;
    }
    Ok(links)
}

async fn apply(handle: &Handle, req: &SetupNetworkRequest, routes: &[RouteSpec]) -> Result<(), NetworkError> {
    let links = loopback_up_with(handle).await?;
    let mut by_mac: HashMap<[u8; 6], u32> = HashMap::new();
    for link in &links {
        for a in &link.attributes {
            if let LinkAttribute::Address(mac) = a {
                if let Ok(mac) = <[u8; 6]>::try_from(mac.as_slice()) {
                    by_mac.insert(mac, link.header.index);
                }
            }
        }
    }
    let mut index_of: HashMap<&str, u32> = HashMap::new();
    for i in &req.interfaces {
        let mac = parse_mac(&i.mac).expect("checked");
        let index =
            *by_mac.get(&mac).ok_or_else(|| NetworkError::NoSuchNic { name: i.name.clone(), mac: i.mac.clone() })?;
        let what = format!("configuring {}", i.name);
        // Renaming needs the link down.
        set_link(handle, LinkUnspec::new_with_index(index).down().build(), &what).await?;
        let mut msg = LinkUnspec::new_with_index(index).name(i.name.clone());
        if i.mtu != 0 {
            msg = msg.mtu(i.mtu);
        }
        set_link(handle, msg.build(), &what).await?;
        for a in &i.addresses {
            let ip: IpAddr = a.address.parse().expect("checked");
            handle
                .address()
                .add(index, ip, a.prefix_len as u8)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding {}/{} to {}", a.address, a.prefix_len, i.name)))?;
        }
        set_link(handle, LinkUnspec::new_with_index(index).up().build(), &what).await?;
        index_of.insert(&i.name, index);
    }
    for r in routes {
        let index = index_of[r.device.as_str()];
        let what = match r.destination {
            Some((ip, len)) => format!("adding the route to {ip}/{len}"),
            None => "adding the default route".to_string(),
        };
        let mut builder = RouteMessageBuilder::<IpAddr>::new().output_interface(index).scope(RouteScope::from(r.scope));
        if let Some((ip, len)) = r.destination {
            builder = builder.destination_prefix(ip, len).map_err(|e| invalid(format!("{what}: {e}")))?;
        } else if r.ipv6 {
            builder = builder
                .destination_prefix(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
                .map_err(|e| invalid(format!("{what}: {e}")))?;
        } else {
            builder = builder
                .destination_prefix(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
                .map_err(|e| invalid(format!("{what}: {e}")))?;
        }
        if let Some(gw) = r.gateway {
            builder = builder.gateway(gw).map_err(|e| invalid(format!("{what}: {e}")))?;
        }
        if let Some(src) = r.source {
            builder = builder.pref_source(src).map_err(|e| invalid(format!("{what}: {e}")))?;
        }
        handle.route().add(builder.build()).replace().execute().await.map_err(nl(what))?;
    }
    for n in &req.neighbors {
        let index = index_of[n.device.as_str()];
        let ip: IpAddr = n.address.parse().expect("checked");
        let mac = parse_mac(&n.mac).expect("checked");
        handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding neighbour {}", n.address)))?;
    }
    Ok(())
}

async fn set_link(handle: &Handle, msg: LinkMessage, what: &str) -> Result<(), NetworkError> {
    handle.link().set(msg).execute().await.map_err(nl(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_proto::agent::{Interface, IpAddress, Neighbor, Route};

    fn good() -> SetupNetworkRequest {
        let mut req = SetupNetworkRequest::new();
        req.interfaces.push(Interface {
            name: "eth0".into(),
            mac: "02:42:0a:00:00:05".into(),
            mtu: 1450,
            addresses: vec![IpAddress { address: "10.0.0.5".into(), prefix_len: 24, ..Default::default() }],
            ..Default::default()
        });
        req.routes.push(Route { gateway: "10.0.0.1".into(), device: "eth0".into(), ..Default::default() });
        req.neighbors.push(Neighbor {
            address: "10.0.0.9".into(),
            mac: "02:00:00:00:00:09".into(),
            device: "eth0".into(),
            ..Default::default()
        });
        req
    }

    fn refused(req: SetupNetworkRequest, text: &str) {
        match check(&req) {
            Err(e) => assert!(e.to_string().contains(text), "'{e}' lacks '{text}'"),
            Ok(_) => panic!("accepted a request that should mention '{text}'"),
        }
    }

    #[test]
    fn a_good_request_passes_and_macs_parse() {
        let routes = check(&good()).unwrap();
        assert_eq!(routes.len(), 1);
        assert!(routes[0].destination.is_none());
        assert_eq!(parse_mac("02:42:0A:00:00:05"), Some([2, 0x42, 10, 0, 0, 5]));
        for bad in ["", "02:42:0a:00:00", "02:42:0a:00:00:05:06", "0:42:0a:00:00:05", "zz:42:0a:00:00:05"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut r = good();
        r.interfaces[0].mac = "nope".into();
        refused(r, "'nope' is not a MAC address");
        let mut r = good();
        r.interfaces[0].name = "a-name-far-too-long".into();
        refused(r, "not a valid Linux interface name");
        let mut r = good();
        r.interfaces[0].addresses[0].prefix_len = 33;
        refused(r, "prefix length 33 is over 32");
        let mut r = good();
        r.interfaces[0].addresses[0].address = "10.0.0.300".into();
        refused(r, "'10.0.0.300' is not an IP address");
        let mut r = good();
        r.interfaces[0].mtu = 10;
        refused(r, "MTU 10 is out of range");
        let mut r = good();
        r.routes[0].device = "eth9".into();
        refused(r, "device 'eth9' is not one of the interfaces");
        let mut r = good();
        r.routes[0].destination = "10.1.0.0".into();
        refused(r, "needs a prefix length");
        let mut r = good();
        r.routes[0].gateway = "fd00::1".into();
        refused(r, "does not match the route's IP version");
        let mut r = good();
        r.neighbors[0].mac = "02:00".into();
        refused(r, "is not a MAC address");
        let mut r = good();
        r.interfaces.push(r.interfaces[0].clone());
        refused(r, "listed twice");
        let mut r = good();
        r.routes = vec![Route::default(); MAX_ROUTES + 1];
        refused(r, "too many entries");
    }
}
