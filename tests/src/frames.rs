//! Building and checking Ethernet/IPv4 frames with an independent implementation
//! (etherparse): expected frames are built by it, checksums and all, so comparing bytes
//! checks ballast's incremental checksum updates.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, bail};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, LinkExtHeader, NetHeaders,
    PacketHeaders, SingleVlanHeader, TcpHeader, TransportHeader, UdpHeader, VlanId, VlanPcp,
};

/// The transport part of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp(TcpHeader),
    /// UDP; `no_checksum` sends checksum 0.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Send a zero checksum ("no checksum").
        no_checksum: bool,
    },
    /// ICMP.
    Icmp(Icmpv4Type),
    /// Another IP protocol, payload only.
    Other(u8),
}

/// A frame description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Source MAC.
    pub smac: [u8; 6],
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// 802.1Q VLAN id.
    pub vlan: Option<u16>,
    /// IPv4 header (lengths, protocol and checksum are filled in by `bytes`).
    pub ip: Ipv4Header,
    /// Transport header.
    pub l4: L4,
    /// Payload after the transport header.
    pub payload: Vec<u8>,
}

impl Frame {
    fn base(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, src.octets(), dst.octets()).expect("valid header");
        ip.identification = 0x1234;
        ip.dont_fragment = true;
        Self {
            smac: [0x02, 0, 0, 0, 0xaa, 0x01],
            dmac: [0x02, 0, 0, 0, 0xaa, 0x02],
            vlan: None,
            ip,
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP SYN.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        let mut h = TcpHeader::new(src.port(), dst.port(), 1000, 64240);
        h.syn = true;
        Self::base(*src.ip(), *dst.ip(), L4::Tcp(h))
    }

    /// A UDP datagram.
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self::base(*src.ip(), *dst.ip(), L4::Udp { sport: src.port(), dport: dst.port(), no_checksum: false })
    }

    /// An ICMP message.
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, kind: Icmpv4Type) -> Self {
        Self::base(src, dst, L4::Icmp(kind))
    }

    /// Sets the MAC addresses.
    pub fn macs(mut self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        self.smac = smac;
        self.dmac = dmac;
        self
    }

    /// Sets the VLAN tag.
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ip.time_to_live = ttl;
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// Changes the TCP header.
    pub fn tcp_header(mut self, f: impl FnOnce(&mut TcpHeader)) -> Self {
        if let L4::Tcp(h) = &mut self.l4 {
            f(h);
        }
        self
    }

    /// Rewrites addresses and ports (what a NAT should do), keeping everything else.
    pub fn tuple(mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        self.ip.source = src.ip().octets();
        self.ip.destination = dst.ip().octets();
        match &mut self.l4 {
            L4::Tcp(h) => {
                h.source_port = src.port();
                h.destination_port = dst.port();
            }
            L4::Udp { sport, dport, .. } => {
                *sport = src.port();
                *dport = dst.port();
            }
            _ => {}
        }
        self
    }

    /// Serializes, computing lengths and checksums independently of ballast.
    pub fn bytes(&self) -> Vec<u8> {
        let mut ip = self.ip.clone();
        let (l4_bytes, proto): (Vec<u8>, IpNumber) = match &self.l4 {
            L4::Tcp(h) => {
                let mut ip_tmp = ip.clone();
                ip_tmp.protocol = IpNumber::TCP;
                let mut h = h.clone();
                h.checksum = h.calc_checksum_ipv4(&ip_tmp, &self.payload).expect("checksum");
                (h.to_bytes().to_vec(), IpNumber::TCP)
            }
            L4::Udp { sport, dport, no_checksum } => {
                let h = if *no_checksum {
                    UdpHeader::without_ipv4_checksum(*sport, *dport, self.payload.len()).expect("udp")
                } else {
                    let mut ip_tmp = ip.clone();
                    ip_tmp.protocol = IpNumber::UDP;
                    UdpHeader::with_ipv4_checksum(*sport, *dport, &ip_tmp, &self.payload).expect("udp")
                };
                (h.to_bytes().to_vec(), IpNumber::UDP)
            }
            L4::Icmp(t) => (Icmpv4Header::with_checksum(t.clone(), &self.payload).to_bytes().to_vec(), IpNumber::ICMP),
            L4::Other(p) => (Vec::new(), IpNumber(*p)),
        };
        ip.protocol = proto;
        ip.set_payload_len(l4_bytes.len() + self.payload.len()).expect("length");
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::new();
        match self.vlan {
            None => out.extend(
                Ethernet2Header { source: self.smac, destination: self.dmac, ether_type: EtherType::IPV4 }.to_bytes(),
            ),
            Some(id) => {
                out.extend(
                    Ethernet2Header {
                        source: self.smac,
                        destination: self.dmac,
                        ether_type: EtherType::VLAN_TAGGED_FRAME,
                    }
                    .to_bytes(),
                );
                out.extend(
                    SingleVlanHeader {
                        pcp: VlanPcp::ZERO,
                        drop_eligible_indicator: false,
                        vlan_id: VlanId::try_new(id).expect("vlan id"),
                        ether_type: EtherType::IPV4,
                    }
                    .to_bytes(),
                );
            }
        }
        out.extend(ip.to_bytes());
        out.extend(l4_bytes);
        out.extend(&self.payload);
        out
    }
}

/// Parsed view of a frame, for assertions and readable failure messages.
#[derive(Debug)]
pub struct Parsed {
    /// Source MAC.
    pub smac: [u8; 6],
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// VLAN id.
    pub vlan: Option<u16>,
    /// IPv4 header.
    pub ip: Ipv4Header,
    /// Transport header.
    pub l4: Option<TransportHeader>,
    /// Payload after the transport header.
    pub payload: Vec<u8>,
}

/// Parses a frame with etherparse and verifies every checksum it carries.
pub fn parse(bytes: &[u8]) -> Result<Parsed> {
    let h = PacketHeaders::from_ethernet_slice(bytes).context("etherparse rejected the frame")?;
    let eth = h.link.clone().and_then(|l| l.ethernet2()).context("no Ethernet header")?;
    let vlan = h.link_exts.iter().find_map(|e| match e {
        LinkExtHeader::Vlan(v) => Some(v.vlan_id.value()),
        _ => None,
    });
    let Some(NetHeaders::Ipv4(ip, _)) = h.net.clone() else { bail!("not IPv4") };
    let payload = h.payload.slice().to_vec();
    if ip.header_checksum != ip.calc_header_checksum() {
        bail!("bad IPv4 header checksum {:#06x}, expected {:#06x}", ip.header_checksum, ip.calc_header_checksum());
    }
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            let c = t.calc_checksum_ipv4(&ip, &payload)?;
            if c != t.checksum {
                bail!("bad TCP checksum {:#06x}, expected {c:#06x}", t.checksum);
            }
        }
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => {
            let c = u.calc_checksum_ipv4(&ip, &payload)?;
            if c != u.checksum {
                bail!("bad UDP checksum {:#06x}, expected {c:#06x}", u.checksum);
            }
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let mut copy = i.clone();
            copy.update_checksum(&payload);
            if copy.checksum != i.checksum {
                bail!("bad ICMP checksum {:#06x}, expected {:#06x}", i.checksum, copy.checksum);
            }
        }
        _ => {}
    }
    Ok(Parsed { smac: eth.source, dmac: eth.destination, vlan, ip, l4: h.transport, payload })
}

/// Asserts two frames are byte-identical, showing both parsed on failure.
#[track_caller]
pub fn assert_frame(actual: &[u8], expected: &[u8]) {
    if actual != expected {
        panic!(
            "frames differ\n  actual:   {:?}\n  expected: {:?}\n  actual bytes:   {actual:02x?}\n  expected bytes: {expected:02x?}",
            parse(actual),
            parse(expected)
        );
    }
}

/// An ARP frame for IPv4 over Ethernet: `op` 1 (request, broadcast) or 2 (reply, to
/// `target_mac`), from `smac`/`sender`, about `target`, optionally 802.1Q-tagged.
pub fn arp(
    op: u16,
    smac: [u8; 6],
    sender: Ipv4Addr,
    target_mac: [u8; 6],
    target: Ipv4Addr,
    vlan: Option<u16>,
) -> Vec<u8> {
    let dmac = if op == 1 { [0xff; 6] } else { target_mac };
    let arp = etherparse::ArpEthIpv4Packet {
        operation: etherparse::ArpOperation(op),
        sender_mac: smac,
        sender_ipv4: sender.octets(),
        target_mac: if op == 1 { [0; 6] } else { target_mac },
        target_ipv4: target.octets(),
    };
    let mut out = Vec::new();
    match vlan {
        Some(id) => {
            out.extend(
                Ethernet2Header { source: smac, destination: dmac, ether_type: EtherType::VLAN_TAGGED_FRAME }
                    .to_bytes(),
            );
            let tag = SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(id).expect("VLAN id"),
                ether_type: EtherType::ARP,
            };
            out.extend(tag.to_bytes());
        }
        None => out.extend(Ethernet2Header { source: smac, destination: dmac, ether_type: EtherType::ARP }.to_bytes()),
    }
    out.extend(arp.to_bytes());
    out
}
