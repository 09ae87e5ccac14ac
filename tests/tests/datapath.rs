//! Packet tests: the real XDP and TC programs, loaded by the kernel's verifier, run with
//! `BPF_PROG_TEST_RUN` on crafted frames; every output frame is compared byte for byte
//! with one built (checksums included) by etherparse.

use std::net::{Ipv4Addr, SocketAddrV4};

use ballast_tests::{
    frames::{Frame, assert_frame, parse},
    lab::{self, BACKENDS, CLIENT, GW_MAC, LB_BACKEND_IP, LB_BE_MAC, LB_CL_MAC, Lab, VIP, backend_mac, xdp},
};
use lb_agent::model::{BackendSpec, Protocol, ServiceSpec};
use lb_common::flow::{FLOW_REPLY, FlowKey};

fn svc(port: u16, protocol: Protocol, backends: &[SocketAddrV4]) -> ServiceSpec {
    ServiceSpec {
        name: format!("svc-{port}-{protocol}"),
        vip: VIP,
        port,
        protocol,
        backends: backends.iter().copied().map(BackendSpec::active).collect(),
    }
}

fn be(i: usize, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(BACKENDS[i], port)
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// The SNAT source the data path chose for a client flow, read from its flow entry.
fn snat_of(lab: &Lab, key: FlowKey) -> SocketAddrV4 {
    let f = lab.dp.maps.flow(&key).unwrap().expect("flow entry exists");
    SocketAddrV4::new(Ipv4Addr::from(f.src), f.sport)
}

fn key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey { src: src.ip().octets(), dst: dst.ip().octets(), sport: src.port(), dport: dst.port(), proto, _pad: [0; 3] }
}

#[test]
fn tcp_flow_is_translated_both_ways_with_exact_checksums() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 8080), be(1, 8080)])]).unwrap();

    let syn = Frame::tcp(client(40000), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT, "{:?}", parse(&out.frame));
    let snat = snat_of(&lab, key(client(40000), vip(80), 6));
    assert_eq!(*snat.ip(), LB_BACKEND_IP);
    let expected = syn.clone().macs(LB_BE_MAC, backend_mac(BACKENDS[0])).tuple(snat, be(0, 8080)).ttl(63);
    assert_frame(&out.frame, &expected.bytes());

    // The backend's SYN-ACK comes back to the SNAT address and leaves towards the client
    // from VIP:80.
    let synack = Frame::tcp(be(0, 8080), snat)
        .macs(backend_mac(BACKENDS[0]), LB_BE_MAC)
        .tcp_header(|h| {
            h.ack = true;
            h.acknowledgment_number = 1001;
        })
        .payload(b"hello");
    let out = lab.xdp(&synack.bytes(), lab.be).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    let expected = synack.clone().macs(LB_CL_MAC, GW_MAC).tuple(vip(80), client(40000)).ttl(63);
    assert_frame(&out.frame, &expected.bytes());

    let rev = lab.dp.maps.flow(&key(be(0, 8080), snat, 6)).unwrap().unwrap();
    assert_ne!(rev.flags & FLOW_REPLY, 0);
}
