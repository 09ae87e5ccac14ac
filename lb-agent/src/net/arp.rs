//! Gratuitous ARP: tells the segment which MAC address holds an IPv4 address, so hosts,
//! routers and switches switch over at once when an address moves to this node instead
//! of waiting for their ARP entries to go stale.

use std::{io, mem::size_of, net::Ipv4Addr, os::fd::AsRawFd};

use etherparse::{ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header};

/// Length of the frame sent: the Ethernet minimum (without FCS). ARP itself needs 42
/// bytes; the rest is padding, which some drivers do not add themselves.
pub const FRAME_LEN: usize = 60;

const BROADCAST: [u8; 6] = [0xff; 6];

/// An ARP announcement (RFC 5227 §2.3): an ARP request, broadcast, whose sender and target
/// address are both `vip` and whose sender hardware address is `mac`. Linux, other hosts
/// and routers update an existing ARP entry for `vip` from it (a "gratuitous ARP").
pub fn announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let eth = Ethernet2Header { source: mac, destination: BROADCAST, ether_type: EtherType::ARP };
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: mac,
        sender_ipv4: vip.octets(),
        target_mac: [0; 6],
        target_ipv4: vip.octets(),
    };
    let mut frame = [0u8; FRAME_LEN];
    frame[..Ethernet2Header::LEN].copy_from_slice(&eth.to_bytes());
    frame[Ethernet2Header::LEN..Ethernet2Header::LEN + ArpEthIpv4Packet::LEN].copy_from_slice(&arp.to_bytes());
    frame
}

/// Sends one link-layer `frame` (with its Ethernet header) out of interface `ifindex`
/// through a packet socket. Needs CAP_NET_RAW.
pub fn send_frame(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments. Protocol 0: the socket receives nothing.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&BROADCAST);
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

#[cfg(test)]
mod tests {
    use etherparse::{ArpPacketSlice, Ethernet2HeaderSlice};

    use super::*;

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
