//! Pod networking on the host, in Kata's tc-filter model: the CNI plugins set
//! up the pod's network namespace as for any pod; for every interface they
//! created there, runv adds a tap in the same namespace, redirects traffic
//! both ways between the interface and the tap (tc ingress qdisc + u32
//! filter with a mirred egress redirect), and hands the tap to the VM as a
//! virtio-net device whose MAC is the interface's. The interface's MTU,
//! addresses, routes and static neighbours go to the agent, which configures
//! the guest NIC the same way.
//!
//! Everything happens on a thread that entered the pod's namespace, so the
//! host's own network is never touched. The taps are not persistent: they
//! vanish with the last descriptor (the VM's), and [`PodNetwork`]'s drop
//! removes them and the filters on every path.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use runv_proto::agent::{Interface, IpAddress, Neighbor, Route, SetupNetworkRequest};

/// Suffix of the taps runv creates (`tap0_runv`), as Kata's `_kata`.
pub const TAP_SUFFIX: &str = "_runv";

/// The tc parent of an ingress qdisc (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// `protocol all` as the kernel wants it in tcm_info: ETH_P_ALL in network
/// byte order.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: std::io::Error },
    #[error(
        "interface {name} in the pod network namespace is of type {kind}, which runv cannot carry into the VM (it bridges veth, macvlan and ipvlan interfaces)"
    )]
    Unsupported { name: String, kind: String },
    #[error("interface {name} in the pod network namespace has no MAC address")]
    NoMac { name: String },
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("creating tap {name}: {source}")]
    Tap { name: String, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// One tap handed to the VM.
#[derive(Debug)]
pub struct NetDevice {
    /// The tap's queue; the VM process inherits it.
    pub tap: OwnedFd,
    pub tap_name: String,
    /// The guest NIC's MAC: the pod interface's own.
    pub mac: String,
    /// The pod interface the tap is paired with.
    pub interface: String,
}

/// The pod network as bridged into one VM. Dropping it removes the taps and
/// filters it added.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    pub devices: Vec<NetDevice>,
    /// What the agent needs to configure the guest the same way.
    pub guest: SetupNetworkRequest,
    detached: bool,
}

impl PodNetwork {
    /// Bridges every interface of the pod network namespace at `netns` into
    /// taps for the VM. On error nothing it added is left.
    pub fn attach(netns: &Path) -> Result<Self, NetworkError> {
        let (devices, guest) = in_netns(netns, |handle| async move { attach(&handle).await })?;
        Ok(Self { netns: netns.to_path_buf(), devices, guest, detached: false })
    }

    /// `interface tap` pairs, one per line, for [`detach_leftovers`].
    pub fn record(&self) -> String {
        let mut out = format!("{}\n", self.netns.display());
        for d in &self.devices {
            out.push_str(&format!("{} {}\n", d.interface, d.tap_name));
        }
        out
    }

    /// Removes the filters and taps (best effort: a namespace that is gone
    /// took them with it).
    pub fn detach(mut self) {
        self.detach_now();
    }

    fn detach_now(&mut self) {
        if self.detached {
            return;
        }
        self.detached = true;
        let pairs: Vec<(String, String)> =
            self.devices.iter().map(|d| (d.interface.clone(), d.tap_name.clone())).collect();
        // Close our tap descriptors first: the VM holds its own.
        self.devices.clear();
        detach_pairs(&self.netns, &pairs);
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.detach_now();
    }
}

/// Undoes what [`PodNetwork::record`] describes, for a process cleaning up
/// after one that died.
pub fn detach_leftovers(record: &str) {
    let mut lines = record.lines();
    let Some(netns) = lines.next().filter(|l| !l.trim().is_empty()) else { return };
    let pairs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(' '))
        .map(|(i, t)| (i.trim().to_string(), t.trim().to_string()))
        .filter(|(_, t)| t.ends_with(TAP_SUFFIX))
        .collect();
    detach_pairs(Path::new(netns.trim()), &pairs);
}

fn detach_pairs(netns: &Path, pairs: &[(String, String)]) {
    if pairs.is_empty() {
        return;
    }
    let pairs = pairs.to_vec();
    let result = in_netns(netns, |handle| async move {
        for (interface, tap) in &pairs {
            for name in [interface, tap] {
                if let Some(index) = link_index(&handle, name).await? {
                    // Deleting the ingress qdisc deletes its filters.
                    let _ = del_ingress(&handle, index).await;
                }
            }
            if let Some(index) = link_index(&handle, tap).await? {
                handle.link().del(index).execute().await.map_err(nl(format!("deleting tap {tap}")))?;
            }
        }
        Ok(())
    });
    match result {
        // The namespace is gone, and everything in it.
        Err(NetworkError::Netns { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("removing the pod network's taps in {}: {e}", netns.display()),
        Ok(()) => {}
    }
}

/// Runs `f` with a netlink handle on a thread inside the network namespace
/// at `netns`.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let ns = File::open(netns).map_err(|source| NetworkError::Netns { path: netns.to_path_buf(), source })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // Only this thread changes namespace, and it ends afterwards.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::Netns { path: netns.to_path_buf(), source: std::io::Error::from(e) })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetworkError::Other(format!("netlink runtime: {e}")))?;
            rt.block_on(async move {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|e| NetworkError::Other(format!("netlink socket: {e}")))?;
                tokio::spawn(connection);
                f(handle).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(NetworkError::Other("the netlink thread panicked".into())))
    })
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // No such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// A link of the pod namespace that the VM takes over.
struct PodLink {
    index: u32,
    name: String,
    mac: String,
    mtu: u32,
}

async fn attach(handle: &Handle) -> Result<(Vec<NetDevice>, SetupNetworkRequest), NetworkError> {
    let links: Vec<LinkMessage> =
        handle.link().get().execute().try_collect().await.map_err(nl("listing the pod's interfaces"))?;
    let mut carried = Vec::new();
    for link in &links {
        let name = link_name(link);
        if link.header.flags.contains(LinkFlags::Loopback) || name.ends_with(TAP_SUFFIX) {
            continue;
        }
        let kind = link_kind(link);
        if !matches!(kind, Some(InfoKind::Veth | InfoKind::MacVlan | InfoKind::IpVlan)) {
            let kind = kind.map(|k| format!("{k:?}").to_lowercase()).unwrap_or_else(|| "physical device".into());
            return Err(NetworkError::Unsupported { name, kind });
        }
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) if mac.len() == 6 => Some(format_mac(mac)),
                _ => None,
            })
            .ok_or_else(|| NetworkError::NoMac { name: name.clone() })?;
        let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None });
        carried.push(PodLink { index: link.header.index, name, mac, mtu: mtu.unwrap_or(1500) });
    }
    let guest = guest_config(handle, &carried).await?;
    let mut devices = Vec::new();
    let mut result = Ok(());
    for (i, link) in carried.iter().enumerate() {
        match bridge(handle, link, i).await {
            Ok(device) => devices.push(device),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = result {
        // Undo what was bridged so far, and the tap that failed, if any.
        for (i, link) in carried.iter().enumerate().take(devices.len() + 1) {
            let _ = del_ingress(handle, link.index).await;
            if let Ok(Some(tap)) = link_index(handle, &tap_name(i)).await {
                let _ = handle.link().del(tap).execute().await;
            }
        }
        return Err(e);
    }
    Ok((devices, guest))
}

/// `tc qdisc del dev X ingress`: the qdisc and its filters.
async fn del_ingress(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let mut req = handle.clone().qdisc().del(index as i32);
    let msg = req.message_mut();
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(INGRESS_PARENT);
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    req.execute().await
}

fn tap_name(i: usize) -> String {
    format!("tap{i}{TAP_SUFFIX}")
}

/// Creates the tap for `link` and redirects traffic both ways.
async fn bridge(handle: &Handle, link: &PodLink, i: usize) -> Result<NetDevice, NetworkError> {
    let name = tap_name(i);
    let tap = open_tap(&name).map_err(|source| NetworkError::Tap { name: name.clone(), source })?;
    let tap_index =
        link_index(handle, &name).await?.ok_or_else(|| NetworkError::Other(format!("tap {name} vanished")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap_index).mtu(link.mtu).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {name} up")))?;
    for (from, to, what) in [(link.index, tap_index, &link.name), (tap_index, link.index, &name)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(nl(format!("adding an ingress qdisc to {what}")))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(nl(format!("building the redirect filter of {what}")))?
            .execute()
            .await
            .map_err(nl(format!("adding the redirect filter to {what}")))?;
    }
    Ok(NetDevice { tap, tap_name: name, mac: link.mac.clone(), interface: link.name.clone() })
}

/// Opens a new (non-persistent) tap named `name` in the thread's network
/// namespace; the descriptor is the tap's queue.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let fd = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    // struct ifreq: the name, then a short of flags.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    // A vnet header on every frame: checksum and segmentation offloads
    // between the guest and the host kernel (both VMMs use it).
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is
    // large enough to hold; the descriptor is ours.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// MTU, addresses, routes and permanent neighbours of the carried links, as
/// the agent applies them.
async fn guest_config(handle: &Handle, links: &[PodLink]) -> Result<SetupNetworkRequest, NetworkError> {
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    let mut req = SetupNetworkRequest::new();
    for link in links {
        let mut iface =
            Interface { name: link.name.clone(), mac: link.mac.clone(), mtu: link.mtu, ..Default::default() };
        let mut addresses = handle.address().get().set_link_index_filter(link.index).execute();
        while let Some(msg) =
            addresses.try_next().await.map_err(nl(format!("listing the addresses of {}", link.name)))?
        {
            let Some(address) = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }) else {
                continue;
            };
            // The guest derives its own link-local address from the same MAC.
            if matches!(address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
                continue;
            }
            iface.addresses.push(IpAddress {
                address: address.to_string(),
                prefix_len: msg.header.prefix_len.into(),
                ..Default::default()
            });
        }
        req.interfaces.push(iface);
    }
    for (ipv6, filter) in [
        (false, RouteMessageBuilder::<Ipv4Addr>::new().build()),
        (true, RouteMessageBuilder::<Ipv6Addr>::new().build()),
    ] {
        let routes: Vec<RouteMessage> =
            handle.route().get(filter).execute().try_collect().await.map_err(nl("listing the pod's routes"))?;
        let mut wanted: Vec<Route> = routes.iter().filter_map(|r| guest_route(r, ipv6, &names)).collect();
        // Routes to a link before those through a gateway on it.
        wanted.sort_by_key(|r| !r.gateway.is_empty());
        req.routes.extend(wanted);
    }
    let neighbours: Vec<_> =
        handle.neighbours().get().execute().try_collect().await.map_err(nl("listing the pod's neighbours"))?;
    for n in neighbours {
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(device) = names.get(&n.header.ifindex) else { continue };
        let address = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(v4.to_string()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(v6.to_string()),
            _ => None,
        });
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => Some(format_mac(mac)),
            _ => None,
        });
        if let (Some(address), Some(mac)) = (address, mac) {
            req.neighbors.push(Neighbor { address, mac, device: device.to_string(), ..Default::default() });
        }
    }
    Ok(req)
}

/// A main-table unicast route of a carried link that the guest kernel will
/// not create by itself.
fn guest_route(r: &RouteMessage, ipv6: bool, names: &HashMap<u32, &str>) -> Option<Route> {
    if r.header.table != RouteHeader::RT_TABLE_MAIN
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut route = Route { ipv6, scope: u8::from(r.header.scope).into(), ..Default::default() };
    let mut destination = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(index) => route.device = names.get(index)?.to_string(),
            RouteAttribute::Destination(d) => destination = route_address(d),
            RouteAttribute::Gateway(g) => route.gateway = route_address(g).unwrap_or_default(),
            RouteAttribute::PrefSource(s) => route.source = route_address(s).unwrap_or_default(),
            _ => {}
        }
    }
    if route.device.is_empty() {
        return None;
    }
    if let Some(d) = destination {
        if ipv6 && (d.starts_with("fe80:") || d.starts_with("ff")) {
            return None;
        }
        route.destination = format!("{d}/{}", r.header.destination_prefix_length);
    }
    Some(route)
}

fn route_address(a: &RouteAddress) -> Option<String> {
    match a {
        RouteAddress::Inet(v4) => Some(v4.to_string()),
        RouteAddress::Inet6(v6) => Some(v6.to_string()),
        _ => None,
    }
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
        .unwrap_or_else(|| format!("#{}", link.header.index))
}

fn link_kind(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
