//! Gratuitous ARP: tells the segment which MAC address holds an IPv4 address, so hosts,
//! routers and switches switch over at once when an address moves to this node instead
//! of waiting for their ARP entries to go stale.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use etherparse::{ArpEthIpv4Packet, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header, Ethernet2HeaderSlice};

/// Length of the frame sent: the Ethernet minimum (without FCS). ARP itself needs 42
/// bytes; the rest is padding, which some drivers do not add themselves.
pub const FRAME_LEN: usize = 60;

const BROADCAST: [u8; 6] = [0xff; 6];

/// A broadcast ARP request from `mac` (sender address `sender`) for `target`.
pub fn request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; FRAME_LEN] {
    let eth = Ethernet2Header { source: mac, destination: BROADCAST, ether_type: EtherType::ARP };
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: mac,
        sender_ipv4: sender.octets(),
        target_mac: [0; 6],
        target_ipv4: target.octets(),
    };
    let mut frame = [0u8; FRAME_LEN];
    frame[..Ethernet2Header::LEN].copy_from_slice(&eth.to_bytes());
    frame[Ethernet2Header::LEN..Ethernet2Header::LEN + ArpEthIpv4Packet::LEN].copy_from_slice(&arp.to_bytes());
    frame
}

/// An ARP announcement (RFC 5227 §2.3): an ARP request, broadcast, whose sender and target
/// address are both `vip` and whose sender hardware address is `mac`. Linux, other hosts
/// and routers update an existing ARP entry for `vip` from it (a "gratuitous ARP").
pub fn announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; FRAME_LEN] {
    request(mac, vip, vip)
}

/// What [`ask`] counts as an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answers {
    /// Replies and announcements: anyone claiming the address (static mode's check before
    /// it takes one).
    Claims,
    /// Only replies to the request: who answers now. A new owner's gratuitous ARP is not
    /// one, even when it arrives while the old owner's reply is still being collected.
    Replies,
}

/// The MAC address that sent `frame` if it is an ARP reply, or (with [`Answers::Claims`])
/// an announcement, for one of `targets`: (address, MAC).
pub fn answer(frame: &[u8], targets: &BTreeSet<Ipv4Addr>, which: Answers) -> Option<(Ipv4Addr, [u8; 6])> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).ok()?;
    if eth.ether_type() != EtherType::ARP {
        return None;
    }
    let arp = ArpPacketSlice::from_slice(frame.get(Ethernet2Header::LEN..)?).ok()?.to_packet().try_eth_ipv4().ok()?;
    let sender = arp.sender_ipv4_addr();
    let announces =
        which == Answers::Claims && arp.operation == ArpOperation::REQUEST && sender == arp.target_ipv4_addr();
    (targets.contains(&sender) && (arp.operation == ArpOperation::REPLY || announces))
        .then_some((sender, arp.sender_mac))
}

fn link_addr(ifindex: u32) -> io::Result<libc::sockaddr_ll> {
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&BROADCAST);
    Ok(addr)
}

/// A packet socket for ARP on interface `ifindex`; `receive` makes it receive ARP frames
/// (and binds it to the interface), otherwise it only sends.
fn arp_socket(ifindex: u32, receive: bool) -> io::Result<OwnedFd> {
    let protocol = if receive { i32::from((libc::ETH_P_ARP as u16).to_be()) } else { 0 };
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if receive {
        let addr = link_addr(ifindex)?;
        // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), size_of::<libc::sockaddr_ll>() as libc::socklen_t)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        // SAFETY: `tv` is a valid timeval of the size passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

fn send_on(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> io::Result<()> {
    let addr = link_addr(ifindex)?;
    // SAFETY: `frame` is a live buffer of `frame.len()` bytes and `addr` a sockaddr_ll
    // whose size is passed along; both outlive the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A send-only packet socket, reused for every frame and interface: closing a packet
/// socket waits for an RCU grace period (about 13 ms on a VM), so a socket per gratuitous
/// ARP made announcing 1 000 new addresses take 13 s.
#[derive(Debug)]
pub struct FrameSender(OwnedFd);

impl FrameSender {
    /// Opens the socket. Needs CAP_NET_RAW.
    pub fn open() -> io::Result<Self> {
        // Interface 0: a send-only socket is bound to no interface; each frame names its own.
        arp_socket(0, false).map(Self)
    }

    /// Sends one link-layer `frame` (with its Ethernet header) out of interface `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        send_on(&self.0, ifindex, frame)
    }
}

/// Asks, out of interface `ifindex` (hardware address `mac`), who answers ARP for each of
/// `targets`, as `sender`, and collects every answer for `wait`: each target's MAC
/// addresses other than `mac`. With `sender` 0.0.0.0 these are RFC 5227 probes, which
/// change nobody's ARP cache. Blocking; needs CAP_NET_RAW.
pub fn ask(
    ifindex: u32,
    mac: [u8; 6],
    sender: Ipv4Addr,
    targets: &BTreeSet<Ipv4Addr>,
    wait: Duration,
    which: Answers,
) -> io::Result<BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>> {
    let fd = arp_socket(ifindex, true)?;
    for t in targets {
        send_on(&fd, ifindex, &request(mac, sender, *t))?;
    }
    let mut out: BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>> = BTreeMap::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        if let Some((ip, from)) = answer(&buf[..n], targets, which)
            && from != mac
        {
            out.entry(ip).or_default().insert(from);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_announcements_for_the_asked_addresses_are_answers() {
        let vip = Ipv4Addr::new(192, 0, 2, 10);
        let other = [0x02, 0, 0, 0, 0, 9];
        let targets = BTreeSet::from([vip]);
        assert_eq!(answer(&announcement(other, vip), &targets, Answers::Claims), Some((vip, other)));
        assert_eq!(answer(&announcement(other, vip), &targets, Answers::Replies), None, "an announcement is no reply");
        // A plain request from someone asking for it is not an answer.
        assert_eq!(answer(&request(other, Ipv4Addr::new(192, 0, 2, 1), vip), &targets, Answers::Claims), None);
        let mut reply = request(other, vip, Ipv4Addr::new(192, 0, 2, 1));
        reply[21] = 2; // ARP operation: reply
        assert_eq!(answer(&reply, &targets, Answers::Claims), Some((vip, other)));
        assert_eq!(answer(&reply, &BTreeSet::from([Ipv4Addr::new(192, 0, 2, 99)]), Answers::Claims), None);
        assert_eq!(answer(&reply[..20], &targets, Answers::Claims), None, "truncated");
    }

    #[test]
    fn an_announcement_is_a_broadcast_arp_request_for_the_address_itself() {
        let mac = [0x02, 0, 0, 0, 0, 7];
        let vip = Ipv4Addr::new(192, 0, 2, 10);
        let frame = announcement(mac, vip);
        let eth = Ethernet2HeaderSlice::from_slice(&frame).unwrap();
        assert_eq!((eth.destination(), eth.source(), eth.ether_type()), (BROADCAST, mac, EtherType::ARP));
        let arp = ArpPacketSlice::from_slice(&frame[Ethernet2Header::LEN..]).unwrap().to_packet();
        let arp = arp.try_eth_ipv4().unwrap();
        assert_eq!(arp.operation, ArpOperation::REQUEST);
        assert_eq!((arp.sender_mac, arp.sender_ipv4_addr(), arp.target_ipv4_addr()), (mac, vip, vip));
        assert_eq!(arp.target_mac, [0; 6]);
        assert!(frame[42..].iter().all(|b| *b == 0), "padding");
    }
}
