//! Wire headers. Fields are byte arrays (alignment 1, so any packet offset is valid) and
//! accessors return words *as stored*: checksum arithmetic needs no byte swapping, and
//! `be16`/`set_be16` convert where a number is compared or computed.

/// Ethernet header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

/// 802.1Q tag following the MAC addresses (TPID is `EthHdr::proto`).
#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// The first 8 bytes of TCP and UDP headers share ports at the same offsets; TCP's full
/// header adds the rest.
#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

/// UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// ICMP header (the 4 bytes after the checksum depend on the type).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;

/// ARP for IPv4 over Ethernet.
#[repr(C)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

pub const ARPOP_REQUEST: u16 = 1;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IP_MF: u16 = 0x2000;
pub const IP_DF: u16 = 0x4000;
pub const IP_OFFMASK: u16 = 0x1fff;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ICMP_PROT_UNREACH: u8 = 2;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// A 16-bit word as stored in the packet.
#[inline(always)]
pub fn w16(b: [u8; 2]) -> u16 {
    u16::from_ne_bytes(b)
}

/// A 32-bit word as stored in the packet.
#[inline(always)]
pub fn w32(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

/// A big-endian 16-bit number.
#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Bytes of a big-endian 16-bit number.
#[inline(always)]
pub fn to_be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

/// Returns a pointer to a `T` at `off` bytes into the packet if it lies entirely before
/// `end`. Every header access goes through here: it is the bounds check the verifier needs.
#[inline(always)]
pub fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*mut T> {
    let start = data + off;
    if start + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start as *mut T)
}
