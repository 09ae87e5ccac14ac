//! ARP as a router on the segment sees it: who answers for an address. Raw ARP requests
//! from a test namespace, every reply collected, so two nodes answering for one address is
//! seen rather than hidden by a neighbour cache that keeps the first answer.

use std::{
    collections::BTreeSet,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use etherparse::{ArpEthIpv4Packet, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header, Ethernet2HeaderSlice};

use crate::netns::Netns;

const BROADCAST: [u8; 6] = [0xff; 6];

fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if raw < 0 {
        bail!("packet socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let addr = link_addr(ifindex, BROADCAST);
    // SAFETY: `addr` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), size_of::<libc::sockaddr_ll>() as libc::socklen_t)
    };
    if r < 0 {
        bail!("bind packet socket: {}", std::io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    // SAFETY: `tv` is a valid timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

fn link_addr(ifindex: u32, mac: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: plain data; all zeroes is a valid value.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = libc::AF_PACKET as u16;
    a.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    a.sll_ifindex = ifindex as i32;
    a.sll_halen = 6;
    a.sll_addr[..6].copy_from_slice(&mac);
    a
}

/// The MAC addresses that answer an ARP request for `target` sent from `dev` in `ns`
/// (with `sender` as the asking address), collected for `wait`.
pub fn who_has(ns: &Netns, dev: &str, sender: Ipv4Addr, target: Ipv4Addr, wait: Duration) -> Result<BTreeSet<[u8; 6]>> {
    let ifindex = ns.ifindex(dev)?;
    let mac = ns.mac(dev)?;
    ns.run(|| -> Result<BTreeSet<[u8; 6]>> {
        let fd = packet_socket(ifindex)?;
        let eth = Ethernet2Header { source: mac, destination: BROADCAST, ether_type: EtherType::ARP };
        let arp = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: mac,
            sender_ipv4: sender.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        };
        let mut frame = [0u8; 60];
        frame[..14].copy_from_slice(&eth.to_bytes());
        frame[14..14 + ArpEthIpv4Packet::LEN].copy_from_slice(&arp.to_bytes());
        let to = link_addr(ifindex, BROADCAST);
        // SAFETY: `frame` and `to` are valid for the sizes given and outlive the call.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            bail!("send ARP request: {}", std::io::Error::last_os_error());
        }
        let mut macs = BTreeSet::new();
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let Ok(eth) = Ethernet2HeaderSlice::from_slice(&buf[..n]) else { continue };
            if eth.ether_type() != EtherType::ARP {
                continue;
            }
            let Ok(arp) = ArpPacketSlice::from_slice(&buf[14..n]) else { continue };
            let Ok(arp) = arp.to_packet().try_eth_ipv4() else { continue };
            if arp.operation == ArpOperation::REPLY && arp.sender_ipv4_addr() == target {
                macs.insert(arp.sender_mac);
            }
        }
        Ok(macs)
    })?
}
