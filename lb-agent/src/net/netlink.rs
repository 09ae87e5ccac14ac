//! Reading and changing interfaces, addresses and routes through rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressProtocol, CacheInfo},
        link::{InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
        route::{RouteAddress, RouteAttribute},
    },
};

use super::{IfAddr, Lifetime, Link, RouteTo, route_watch::RouteGeneration};

/// Address protocol (`IFA_PROTO`) marking addresses ballast added: `ip -d addr` shows
/// `proto 186`. Kernel-assigned values are 0-3; 186 (0xba) is ours.
pub const ADDRESS_PROTOCOL: u8 = 0xba;

/// A netlink failure, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Connect(std::io::Error),
    /// The interface does not exist.
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    /// A request failed.
    #[error("netlink: {what}: {source}")]
    Request {
        /// What was requested.
        what: String,
        /// Cause.
        source: rtnetlink::Error,
    },
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Request { what, source }
}

/// A netlink connection (its driver runs on the current tokio runtime).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// Moved by [`super::route_watch::follow`] when routes change, if someone follows them.
    generation: RouteGeneration,
}

impl Netlink {
    /// Opens the connection.
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle, generation: RouteGeneration::default() })
    }

    /// The same connection, reporting `generation` as its routes' generation.
    pub fn with_generation(self, generation: RouteGeneration) -> Self {
        Self { generation, ..self }
    }

    /// The routes' generation while someone follows the kernel's changes (see
    /// [`RouteGeneration::current`]).
    pub fn route_generation(&self) -> Option<u64> {
        self.generation.current()
    }

    /// Every interface.
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(request("list links"))?;
        Ok(msgs.iter().map(to_link).collect())
    }

    /// The interface called `name`.
    pub async fn link_by_name(&self, name: &str) -> Result<Link, NetError> {
        let mut stream = self.handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(m)) => Ok(to_link(&m)),
            Ok(None) => Err(NetError::NoSuchInterface(name.into())),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(NetError::NoSuchInterface(name.into()))
            }
            Err(e) => Err(request(format!("get link {name}"))(e)),
        }
    }

    /// Every IPv4 address on the node.
    pub async fn addresses(&self) -> Result<Vec<IfAddr>, NetError> {
        let msgs: Vec<AddressMessage> =
            self.handle.address().get().execute().try_collect().await.map_err(request("list addresses"))?;
        Ok(msgs.iter().filter_map(to_ifaddr).collect())
    }

    /// Adds `addr/32` to interface `index`, marked as ballast's, with `lifetime`; an
    /// existing one is replaced, which renews its lifetime.
    pub async fn set_address(&self, index: u32, addr: Ipv4Addr, lifetime: Lifetime) -> Result<(), NetError> {
        let mut req = self.handle.address().add(index, IpAddr::V4(addr), 32).replace();
        let attrs = &mut req.message_mut().attributes;
        attrs.push(AddressAttribute::Protocol(AddressProtocol::from(ADDRESS_PROTOCOL)));
        if let Lifetime::Seconds(secs) = lifetime {
            // Preferred = valid: the address is usable as a source until it goes.
            let mut ci = CacheInfo::default();
            ci.ifa_valid = secs;
            ci.ifa_preferred = secs;
            attrs.push(AddressAttribute::CacheInfo(ci));
        }
        req.execute().await.map_err(request(format!("add {addr}/32 to ifindex {index}")))
    }

    /// Removes `addr/prefix` from interface `index`.
    pub async fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(addr)));
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            // Already gone (someone removed it): the goal is reached.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => Ok(()),
            Err(e) => Err(request(format!("remove {addr}/{prefix} from ifindex {index}"))(e)),
        }
    }

    /// The route the kernel uses to reach `dst` (`ip route get`), or `None` if unreachable.
    pub async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>, NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32).build();
        let mut stream = self.handle.route().get(msg).execute();
        let route = match stream.try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(rtnetlink::Error::NetlinkError(e))
                if [-libc::ENETUNREACH, -libc::EHOSTUNREACH, -libc::EINVAL].contains(&e.raw_code()) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(request(format!("route get {dst}"))(e)),
        };
        let mut oif = None;
        let mut prefsrc = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => prefsrc = Some(*ip),
                _ => {}
            }
        }
        Ok(oif.map(|oif| RouteTo { oif, prefsrc }))
    }
}

pub(crate) fn to_link(m: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut parent = None;
    let mut vlan_id = None;
    let mut is_vlan = false;
    let mut veth = false;
    let mut xdp_prog = None;
    let mut mac = None;
    let mut mtu = 0;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Link(p) => parent = Some(*p),
            LinkAttribute::Xdp(x) => {
                xdp_prog = x
                    .iter()
                    .find_map(|a| if let LinkXdp::ProgId(id) = a { Some(*id).filter(|i| *i != 0) } else { None });
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vlan) => is_vlan = true,
                        LinkInfo::Kind(InfoKind::Veth) => veth = true,
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            vlan_id = v.iter().find_map(|x| if let InfoVlan::Id(id) = x { Some(*id) } else { None });
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let vlan = match (is_vlan, parent, vlan_id) {
        (true, Some(p), Some(id)) => Some((p, id)),
        _ => None,
    };
    Link {
        index: m.header.index,
        name,
        vlan,
        up: m.header.flags.contains(LinkFlags::Up),
        lower_up: m.header.flags.contains(LinkFlags::LowerUp),
        mac,
        loopback: m.header.flags.contains(LinkFlags::Loopback),
        veth,
        xdp_prog,
        mtu,
    }
}

pub(crate) fn to_ifaddr(m: &AddressMessage) -> Option<IfAddr> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut addr = None;
    let mut ours = false;
    let mut lifetime = Lifetime::Forever;
    for a in &m.attributes {
        match a {
            // The kernel reports the remaining lifetime; all ones means permanent.
            AddressAttribute::CacheInfo(ci) if ci.ifa_valid != u32::MAX => lifetime = Lifetime::Seconds(ci.ifa_valid),
            AddressAttribute::Local(IpAddr::V4(ip)) => addr = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) if addr.is_none() => addr = Some(*ip),
            AddressAttribute::Protocol(p) => ours = u8::from(*p) == ADDRESS_PROTOCOL,
            _ => {}
        }
    }
    Some(IfAddr {
        index: m.header.index,
        addr: addr?,
        prefix: m.header.prefix_len,
        ours,
        secondary: m.header.flags.contains(AddressHeaderFlags::Secondary),
        lifetime,
    })
}
