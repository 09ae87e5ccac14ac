//! Packet tests: the real XDP and TC programs, loaded by the kernel's verifier, run with
//! `BPF_PROG_TEST_RUN` on crafted frames. Every output frame is compared byte for byte
//! with one built, checksums included, by etherparse (an independent implementation).

use std::net::{Ipv4Addr, SocketAddrV4};

use ballast_tests::{
    frames::{Frame, L4, assert_frame, parse},
    lab::{
        self, BACKENDS, BE_MTU, CLIENT, GW_MAC, LB_BACKEND_IP, LB_BE_MAC, LB_CL_MAC, Lab, ONE_ARM_BACKEND,
        UNRESOLVED_BACKEND, VIP, VLAN_CLIENT, VLAN_GW_MAC, VLAN_ID, backend_mac, mac_str, one_arm_mac, xdp,
    },
};
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
use lb_agent::{
    dataplane::{
        MapSizes, Maps,
        flows::FlowTable,
        plan::{DesiredState, plan},
    },
    model::{BackendSpec, Protocol, ServiceId, ServiceSpec},
};
use lb_common::{
    addr::IFACE_TX_REDIRECT,
    config::DataplaneConfig,
    flow::{FLOW_REPLY, FlowKey},
    hop::{HOP_EMPTY, HOP_READY},
    proto,
};

const TC_ACT_REDIRECT: u32 = 7;

fn svc(port: u16, protocol: Protocol, backends: &[SocketAddrV4]) -> ServiceSpec {
    ServiceSpec {
        id: ServiceId::Static(format!("svc-{port}-{protocol}")),
        vip: VIP,
        port,
        protocol,
        backends: backends.iter().copied().map(BackendSpec::active).collect(),
        interface: None,
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

fn key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey::new(src.ip().octets(), dst.ip().octets(), src.port(), dst.port(), proto)
}

/// The SNAT source the data path chose for a client flow, read from its flow entry.
fn snat_of(lab: &Lab, k: FlowKey) -> SocketAddrV4 {
    let f = lab.dp.maps.flow(&k).unwrap().expect("flow entry exists");
    SocketAddrV4::new(Ipv4Addr::from(f.src), f.sport)
}

/// The backend a client flow was sent to.
fn backend_of(lab: &Lab, k: FlowKey) -> SocketAddrV4 {
    let f = lab.dp.maps.flow(&k).unwrap().expect("flow entry exists");
    SocketAddrV4::new(Ipv4Addr::from(f.dst), f.dport)
}

/// Sends a client SYN and returns the backend the output frame is addressed to.
fn syn_to(lab: &mut Lab, cport: u16, vport: u16) -> SocketAddrV4 {
    let out = lab.xdp(&Frame::tcp(client(cport), vip(vport)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT, "{:?}", parse(&out.frame));
    let p = parse(&out.frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(t)) = p.l4 else { panic!("not TCP") };
    SocketAddrV4::new(Ipv4Addr::from(p.ip.destination), t.destination_port)
}

#[test]
fn each_cpu_rotates_over_the_backends_with_a_cursor_of_its_own() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "this test needs two CPUs to run new flows on; the machine has {cpus}");
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80), be(2, 80)])]).unwrap();
    let mut on = |cpu: usize, cport: u16| {
        ballast_tests::cpu::pin_current_thread(cpu).unwrap();
        syn_to(&mut lab, cport, 80)
    };
    // CPU c starts at position c; neither CPU's turns skip a backend because of the
    // other's: no cursor is shared (one would give 0 1 2 0 1 2 0).
    assert_eq!(on(0, 41100), be(0, 80));
    assert_eq!(on(0, 41101), be(1, 80));
    assert_eq!(on(1, 41102), be(1, 80));
    assert_eq!(on(0, 41103), be(2, 80));
    assert_eq!(on(1, 41104), be(2, 80));
    assert_eq!(on(1, 41105), be(0, 80));
    assert_eq!(on(0, 41106), be(0, 80));
}

/// The IP part (header and payload) of a frame without VLAN tag.
fn ip_part(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// Header fields of packets ballast originates (ICMP errors, resets).
fn originated(mut f: Frame, dont_fragment: bool) -> Frame {
    f.ip.identification = 0;
    f.ip.dont_fragment = dont_fragment;
    f.ttl(64)
}

#[test]
fn tcp_flow_is_translated_both_ways_with_exact_checksums() {
    let mut lab = Lab::new().unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 8080), be(1, 8080)]);
    lab.program(vec![web.clone()]).unwrap();

    let syn = Frame::tcp(client(40000), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT, "{:?}", parse(&out.frame));
    let snat = snat_of(&lab, key(client(40000), vip(80), proto::TCP));
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

    let rev = lab.dp.maps.flow(&key(be(0, 8080), snat, proto::TCP)).unwrap().unwrap();
    assert_ne!(rev.flags & FLOW_REPLY, 0);
    let s = lab.stats(&web).unwrap();
    assert_eq!((s.packets, s.reply_packets, s.new_flows), (1, 1, 1));
    assert_eq!(s.bytes, 40);
    assert_eq!(s.reply_bytes, 45);
}

#[test]
fn new_flows_rotate_over_backends_and_flows_stick() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80), be(2, 80)])]).unwrap();
    // On one CPU (the lab keeps its runs on CPU 0, which starts at position 0), in exact
    // order.
    let chosen: Vec<_> = (0..7).map(|i| syn_to(&mut lab, 41000 + i, 80)).collect();
    assert_eq!(chosen, vec![be(0, 80), be(1, 80), be(2, 80), be(0, 80), be(1, 80), be(2, 80), be(0, 80)]);
    // Later packets of each flow stay on its backend, whatever the cursor says.
    for i in (0..7).rev() {
        let data = Frame::tcp(client(41000 + i), vip(80))
            .macs(GW_MAC, LB_CL_MAC)
            .tcp_header(|h| {
                h.syn = false;
                h.ack = true;
            })
            .payload(b"more");
        let out = lab.xdp(&data.bytes(), lab.cl).unwrap();
        let p = parse(&out.frame).unwrap();
        assert_eq!(Ipv4Addr::from(p.ip.destination), *chosen[i as usize].ip());
    }
}

#[test]
fn flows_are_keyed_by_the_whole_five_tuple() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)]), svc(81, Protocol::Tcp, &[be(1, 81)])]).unwrap();
    // Same client address and port, two services: two independent flows.
    assert_eq!(syn_to(&mut lab, 42000, 80), be(0, 80));
    assert_eq!(syn_to(&mut lab, 42000, 81), be(1, 81));
    assert_eq!(backend_of(&lab, key(client(42000), vip(80), proto::TCP)), be(0, 80));
    assert_eq!(backend_of(&lab, key(client(42000), vip(81), proto::TCP)), be(1, 81));
}

#[test]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    let mut lab = Lab::new().unwrap();
    let dns = svc(53, Protocol::Udp, &[be(0, 5353)]);
    lab.program(vec![dns.clone()]).unwrap();
    for (cport, no_checksum) in [(43000, false), (43001, true)] {
        let mut q = Frame::udp(client(cport), vip(53)).macs(GW_MAC, LB_CL_MAC).payload(b"query");
        if let L4::Udp { no_checksum: n, .. } = &mut q.l4 {
            *n = no_checksum;
        }
        let out = lab.xdp(&q.bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::REDIRECT);
        let snat = snat_of(&lab, key(client(cport), vip(53), proto::UDP));
        let expected = q.clone().macs(LB_BE_MAC, backend_mac(BACKENDS[0])).tuple(snat, be(0, 5353)).ttl(63);
        assert_frame(&out.frame, &expected.bytes());
        if no_checksum {
            assert_eq!(&out.frame[40..42], &[0, 0], "UDP checksum 0 means none and must stay 0");
        }
        let mut answer = Frame::udp(be(0, 5353), snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).payload(b"answer!");
        if let L4::Udp { no_checksum: n, .. } = &mut answer.l4 {
            *n = no_checksum;
        }
        let out = lab.xdp(&answer.bytes(), lab.be).unwrap();
        assert_eq!(out.verdict, xdp::REDIRECT);
        assert_frame(&out.frame, &answer.clone().macs(LB_CL_MAC, GW_MAC).tuple(vip(53), client(cport)).ttl(63).bytes());
    }
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let frames = [
        // To another host.
        Frame::tcp(client(1), SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 77), 80)).bytes(),
        // To the node's own (SNAT) address without a flow: the host's own traffic.
        Frame::tcp(be(0, 22), SocketAddrV4::new(LB_BACKEND_IP, 33000)).bytes(),
        Frame::tcp(client(1), SocketAddrV4::new(lab::LB_CLIENT_IP, 22)).bytes(),
        // Malformed, fragmented or with options, but not for a VIP.
        Frame::tcp(client(1), SocketAddrV4::new(lab::LB_CLIENT_IP, 22)).bytes()[..30].to_vec(),
        {
            let mut f = Frame::udp(client(1), SocketAddrV4::new(lab::LB_CLIENT_IP, 53));
            f.ip.more_fragments = true;
            f.bytes()
        },
    ];
    for f in frames {
        let out = lab.xdp(&f, lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::PASS);
        assert_eq!(out.frame, f);
    }
    // Not IPv4 at all: ARP, IPv6.
    let mut arp = vec![0xffu8; 6];
    arp.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend([0u8; 28]);
    let mut v6 = vec![0u8; 12];
    v6.extend([0x86, 0xdd]);
    v6.extend([0x60; 40]);
    let mut runt = vec![0u8; 12];
    runt.extend([0x88, 0xb5]);
    for f in [arp, v6, runt] {
        let out = lab.xdp(&f, lab.cl).unwrap();
        assert_eq!((out.verdict, out.frame), (xdp::PASS, f));
    }
}

#[test]
fn malformed_packets_to_a_vip_are_dropped_and_counted_by_reason() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)]), svc(53, Protocol::Udp, &[be(0, 53)])]).unwrap();
    let syn = Frame::tcp(client(44000), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let good = syn.bytes();
    // An IPv4 header cut short hides its destination: it cannot be told from others'
    // traffic, so it passes to the stack like everything not for a VIP.
    let cut = good[..14 + 19].to_vec();
    assert_eq!(lab.xdp(&cut, lab.cl).unwrap().verdict, xdp::PASS);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("malformed", good[..14 + 20 + 10].to_vec())); // truncated TCP header
    let mut long = good.clone();
    long[16..18].copy_from_slice(&200u16.to_be_bytes()); // IP length beyond the frame
    cases.push(("malformed", long));
    let mut v6 = good.clone();
    v6[14] = 0x65; // version 6 in an IPv4 ethertype
    cases.push(("malformed", v6));
    let mut doff = good.clone();
    doff[14 + 20 + 12] = 0x40; // TCP data offset 4
    cases.push(("malformed", doff));
    let mut opts = syn.clone();
    opts.ip.options = [1u8, 1, 1, 0][..].try_into().unwrap(); // NOPs + end of options
    cases.push(("ip_options", opts.bytes()));
    let mut frag = syn.clone();
    frag.ip.more_fragments = true;
    cases.push(("fragment", frag.bytes()));
    let mut later = Frame::udp(client(44001), vip(53)).macs(GW_MAC, LB_CL_MAC).payload(&[7; 64]);
    later.ip.fragment_offset = 8u16.try_into().unwrap();
    cases.push(("fragment", later.bytes()));
    for (reason, f) in &cases {
        let out = lab.xdp(f, lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::DROP, "{reason}: {f:02x?}");
    }
    let g = lab.global_stats().unwrap().drops;
    assert_eq!((g.malformed, g.ip_options, g.fragment), (4, 1, 2));
    assert!(lab.dp.maps.flows().unwrap().is_empty(), "no flow was created from bad input");
    // And the good packet still goes through.
    assert_eq!(lab.xdp(&good, lab.cl).unwrap().verdict, xdp::REDIRECT);
}

#[test]
fn ttl_that_would_expire_is_dropped_and_counted() {
    let mut lab = Lab::new().unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    for ttl in [0, 1] {
        let out =
            lab.xdp(&Frame::tcp(client(45000), vip(80)).macs(GW_MAC, LB_CL_MAC).ttl(ttl).bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::DROP);
    }
    assert_eq!(lab.stats(&web).unwrap().drops.ttl_exceeded, 2);
    assert_eq!(syn_to(&mut lab, 45000, 80), be(0, 80), "TTL 2 is forwarded with TTL 1");
}

#[test]
fn ports_without_service_or_backends_are_rejected_like_kube_proxy() {
    let mut lab = Lab::new().unwrap();
    let empty = svc(81, Protocol::Tcp, &[]);
    let empty_udp = svc(54, Protocol::Udp, &[]);
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)]), empty.clone(), empty_udp.clone()]).unwrap();

    // TCP: a reset from VIP:port, acknowledging the SYN.
    for port in [81, 9999] {
        let syn = Frame::tcp(client(46000), vip(port)).macs(GW_MAC, LB_CL_MAC).payload(b"x");
        let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::TX);
        let rst = originated(
            Frame::tcp(vip(port), client(46000)).macs(LB_CL_MAC, GW_MAC).tcp_header(|h| {
                *h = etherparse::TcpHeader::new(port, 46000, 0, 0);
                h.rst = true;
                h.ack = true;
                h.acknowledgment_number = 1000 + 1 + 1;
            }),
            true,
        );
        assert_frame(&out.frame, &rst.bytes());
    }
    // A segment with ACK gets a reset with seq = its ack number.
    let ack = Frame::tcp(client(46001), vip(81)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| {
        h.syn = false;
        h.ack = true;
        h.acknowledgment_number = 777;
    });
    let out = lab.xdp(&ack.bytes(), lab.cl).unwrap();
    let p = parse(&out.frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(t)) = p.l4 else { panic!() };
    assert!(t.rst && !t.ack && t.sequence_number == 777);
    // A reset is never answered.
    let rst = Frame::tcp(client(46002), vip(81)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| {
        h.syn = false;
        h.rst = true;
    });
    assert_eq!(lab.xdp(&rst.bytes(), lab.cl).unwrap().verdict, xdp::DROP);

    // UDP: ICMP port unreachable quoting the IP header and 8 bytes.
    for port in [54, 9999] {
        let q = Frame::udp(client(46003), vip(port)).macs(GW_MAC, LB_CL_MAC).payload(b"a long question");
        let sent = q.bytes();
        let out = lab.xdp(&sent, lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::TX);
        let unreach = originated(
            Frame::icmp(VIP, CLIENT, Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
                .macs(LB_CL_MAC, GW_MAC)
                .payload(&sent[14..14 + 28]),
            false,
        );
        assert_frame(&out.frame, &unreach.bytes());
    }
    assert_eq!(lab.stats(&empty).unwrap().drops.no_backends, 1);
    assert_eq!(lab.stats(&empty).unwrap().drops.no_flow, 1, "the ACK belongs to no flow");
    assert_eq!(lab.stats(&empty_udp).unwrap().drops.no_backends, 1);
    assert_eq!(lab.global_stats().unwrap().drops.no_service, 2);
}

#[test]
fn other_protocols_to_a_vip_get_protocol_unreachable() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let mut gre = Frame::udp(client(1), vip(1)).macs(GW_MAC, LB_CL_MAC).payload(&[0xab; 24]);
    gre.l4 = L4::Other(47);
    let sent = gre.bytes();
    let out = lab.xdp(&sent, lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let expected = originated(
        Frame::icmp(VIP, CLIENT, Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Protocol))
            .macs(LB_CL_MAC, GW_MAC)
            .payload(&sent[14..14 + 28]),
        false,
    );
    assert_frame(&out.frame, &expected.bytes());
    assert_eq!(lab.global_stats().unwrap().drops.unknown_protocol, 1);
}

#[test]
fn ping_to_a_vip_is_answered() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let echo = etherparse::IcmpEchoHeader { id: 0x4242, seq: 7 };
    let req = Frame::icmp(CLIENT, VIP, Icmpv4Type::EchoRequest(echo))
        .macs(GW_MAC, LB_CL_MAC)
        .ttl(50)
        .payload(b"ping payload");
    let out = lab.xdp(&req.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let mut reply =
        Frame::icmp(VIP, CLIENT, Icmpv4Type::EchoReply(echo)).macs(LB_CL_MAC, GW_MAC).payload(b"ping payload");
    reply.ip.identification = req.ip.identification;
    assert_frame(&out.frame, &reply.ttl(64).bytes());
    // Other ICMP to a VIP is dropped and counted.
    let ts = Frame::icmp(CLIENT, VIP, Icmpv4Type::Unknown { type_u8: 13, code_u8: 0, bytes5to8: [0; 4] })
        .macs(GW_MAC, LB_CL_MAC);
    assert_eq!(lab.xdp(&ts.bytes(), lab.cl).unwrap().verdict, xdp::DROP);
    assert_eq!(lab.global_stats().unwrap().drops.icmp_unsupported, 1);
}

#[test]
fn icmp_errors_about_a_flow_are_translated_back_to_the_client() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 8080)]), svc(53, Protocol::Udp, &[be(1, 5353)])]).unwrap();
    for udp in [false, true] {
        let (orig, backend) = if udp {
            (Frame::udp(client(47001), vip(53)).payload(b"q"), be(1, 5353))
        } else {
            (Frame::tcp(client(47000), vip(80)), be(0, 8080))
        };
        let orig = orig.macs(GW_MAC, LB_CL_MAC);
        let out = lab.xdp(&orig.bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::REDIRECT);
        let proto = if udp { proto::UDP } else { proto::TCP };
        let (sport, vport) = match &orig.l4 {
            L4::Udp { sport, dport, .. } => (*sport, *dport),
            L4::Tcp(h) => (h.source_port, h.destination_port),
            _ => unreachable!(),
        };
        let snat = snat_of(&lab, key(client(sport), vip(vport), proto));
        // A router on the backend path reports that the packet we sent was too big,
        // quoting it as it saw it (TTL already decremented by us).
        let router = Ipv4Addr::new(10, 2, 0, 254);
        let quoted = ip_part(&out.frame);
        let err = Frame::icmp(
            router,
            *snat.ip(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 }),
        )
        .macs(backend_mac(BACKENDS[0]), LB_BE_MAC)
        .payload(&quoted);
        let got = lab.xdp(&err.bytes(), lab.be).unwrap();
        assert_eq!(got.verdict, xdp::REDIRECT, "{:?}", parse(&got.frame));
        // The client receives it from the VIP, quoting its own packet (as forwarded).
        let mut expected = err.clone().macs(LB_CL_MAC, GW_MAC).payload(&ip_part(&orig.clone().ttl(63).bytes())).ttl(63);
        expected.ip.source = VIP.octets();
        expected.ip.destination = CLIENT.octets();
        assert_frame(&got.frame, &expected.bytes());
        let _ = backend;
    }
    // An error quoting a packet of no known flow is not ours: passed to the host.
    let stray = Frame::tcp(SocketAddrV4::new(LB_BACKEND_IP, 50000), be(2, 9)).bytes();
    let err = Frame::icmp(BACKENDS[2], LB_BACKEND_IP, Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port))
        .payload(&stray[14..]);
    assert_eq!(lab.xdp(&err.bytes(), lab.be).unwrap().verdict, xdp::PASS);
}

#[test]
fn too_big_packets_get_fragmentation_needed_for_path_mtu_discovery() {
    let mut lab = Lab::new().unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    let big = Frame::tcp(client(48000), vip(80)).macs(GW_MAC, LB_CL_MAC).payload(&vec![0x5a; BE_MTU as usize]);
    let sent = big.bytes();
    let out = lab.xdp(&sent, lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let expected = originated(
        Frame::icmp(
            VIP,
            CLIENT,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: BE_MTU }),
        )
        .macs(LB_CL_MAC, GW_MAC)
        .payload(&sent[14..14 + 28]),
        false,
    );
    assert_frame(&out.frame, &expected.bytes());
    assert_eq!(lab.stats(&web).unwrap().drops.frag_needed, 1);
    // Without DF it cannot be forwarded (XDP does not fragment): dropped, counted.
    let mut nodf = big.clone();
    nodf.ip.dont_fragment = false;
    assert_eq!(lab.xdp(&nodf.bytes(), lab.cl).unwrap().verdict, xdp::DROP);
    assert_eq!(lab.stats(&web).unwrap().drops.frag_needed, 2);
}

#[test]
fn one_armed_flows_leave_through_the_ingress_interface() {
    let mut lab = Lab::new().unwrap();
    let b = SocketAddrV4::new(ONE_ARM_BACKEND, 8080);
    lab.program(vec![svc(80, Protocol::Tcp, &[b])]).unwrap();
    let syn = Frame::tcp(client(49000), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let snat = snat_of(&lab, key(client(49000), vip(80), proto::TCP));
    assert_eq!(*snat.ip(), lab::LB_CLIENT_IP);
    assert_frame(&out.frame, &syn.clone().macs(LB_CL_MAC, one_arm_mac()).tuple(snat, b).ttl(63).bytes());
    let reply = Frame::tcp(b, snat).macs(one_arm_mac(), LB_CL_MAC).tcp_header(|h| h.ack = true);
    let out = lab.xdp(&reply.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    assert_frame(&out.frame, &reply.clone().macs(LB_CL_MAC, GW_MAC).tuple(vip(80), client(49000)).ttl(63).bytes());
}

#[test]
fn veth_uplinks_send_back_with_redirect_instead_of_xdp_tx() {
    let mut lab = Lab::new().unwrap();
    lab.cl_flags = IFACE_TX_REDIRECT;
    let b = SocketAddrV4::new(ONE_ARM_BACKEND, 8080);
    lab.program(vec![svc(80, Protocol::Tcp, &[b])]).unwrap();
    let syn = Frame::tcp(client(49100), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT, "same frame as XDP_TX, sent with bpf_redirect");
    let snat = snat_of(&lab, key(client(49100), vip(80), proto::TCP));
    assert_frame(&out.frame, &syn.clone().macs(LB_CL_MAC, one_arm_mac()).tuple(snat, b).ttl(63).bytes());
    // Answers built in place (here a reset) leave the same way.
    let out = lab.xdp(&Frame::tcp(client(49101), vip(99)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    assert!(matches!(parse(&out.frame).unwrap().l4, Some(etherparse::TransportHeader::Tcp(t)) if t.rst));
}

#[test]
fn vlan_tags_are_removed_added_and_kept_as_the_egress_requires() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![
        svc(80, Protocol::Tcp, &[be(0, 80)]),
        svc(81, Protocol::Tcp, &[SocketAddrV4::new(ONE_ARM_BACKEND, 81)]),
    ])
    .unwrap();
    let vc = SocketAddrV4::new(VLAN_CLIENT, 50000);
    // Tagged in (VLAN 100 on cl), untagged out towards the backend.
    let syn = Frame::tcp(vc, vip(80)).macs(VLAN_GW_MAC, LB_CL_MAC).vlan(VLAN_ID);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    let snat = snat_of(&lab, key(vc, vip(80), proto::TCP));
    let mut expected = syn.clone().macs(LB_BE_MAC, backend_mac(BACKENDS[0])).tuple(snat, be(0, 80)).ttl(63);
    expected.vlan = None;
    assert_frame(&out.frame, &expected.bytes());
    // The reply is routed to the VLAN interface: tag 100 added, sent on its parent.
    let reply = Frame::tcp(be(0, 80), snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).tcp_header(|h| h.ack = true);
    let out = lab.xdp(&reply.bytes(), lab.be).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    let p = parse(&out.frame).unwrap();
    assert_eq!(p.vlan, Some(VLAN_ID));
    assert_frame(
        &out.frame,
        &reply.clone().macs(LB_CL_MAC, VLAN_GW_MAC).vlan(VLAN_ID).tuple(vip(80), vc).ttl(63).bytes(),
    );
    // Tagged in, untagged out on the same device (one-armed towards an untagged backend).
    let syn = Frame::tcp(SocketAddrV4::new(VLAN_CLIENT, 50001), vip(81)).macs(VLAN_GW_MAC, LB_CL_MAC).vlan(VLAN_ID);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    assert_eq!(parse(&out.frame).unwrap().vlan, None);
}

#[test]
fn unresolved_neighbours_are_finished_by_the_tc_companion() {
    let mut lab = Lab::new().unwrap();
    let b = SocketAddrV4::new(UNRESOLVED_BACKEND, 80);
    lab.program(vec![svc(80, Protocol::Tcp, &[b])]).unwrap();
    let syn = Frame::tcp(client(51000), vip(80)).macs(GW_MAC, LB_CL_MAC);
    let out = lab.xdp(&syn.bytes(), lab.cl).unwrap();
    // XDP cannot resolve the neighbour: it records the flow and hands the packet to the stack.
    assert_eq!((out.verdict, &out.frame), (xdp::PASS, &syn.bytes()));
    let k = key(client(51000), vip(80), proto::TCP);
    let f = lab.dp.maps.flow(&k).unwrap().unwrap();
    assert_eq!(lab.dp.maps.next_hop(f.backend_id).unwrap().state, HOP_EMPTY, "an unresolved hop is not cached");
    // TC translates it and lets bpf_redirect_neigh resolve the neighbour.
    let out = lab.tc(&syn.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat = snat_of(&lab, k);
    let expected = syn.clone().tuple(snat, b).ttl(63);
    assert_frame(&out.frame, &expected.bytes());
    // Packets XDP handled itself carry no flow the TC program would touch twice.
    let other = Frame::tcp(client(1), SocketAddrV4::new(lab::LB_CLIENT_IP, 22)).bytes();
    assert_eq!(lab.tc(&other, lab.cl).unwrap().verdict, 0, "TC_ACT_OK");
}

/// A data packet of an established flow from the client, `len` bytes of payload.
fn data(cport: u16, vport: u16, len: usize) -> Frame {
    ack(cport, vport).payload(&vec![0x42; len])
}

#[test]
fn established_flows_use_the_backends_cached_next_hop_until_routing_changes() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let (backend, _) = handshake(&mut lab, 42000, 80);
    assert_eq!(backend, be(0, 80));
    let f = lab.dp.maps.flow(&key(client(42000), vip(80), proto::TCP)).unwrap().unwrap();
    let hop = lab.dp.maps.next_hop(f.backend_id).unwrap();
    assert_eq!((hop.state, hop.oif, hop.dmac, hop.smac), (HOP_READY, lab.be, backend_mac(BACKENDS[0]), LB_BE_MAC));
    assert_eq!(hop.mtu, BE_MTU, "the path MTU comes with the hop");
    let dmac = |lab: &mut Lab| {
        let out = lab.xdp(&data(42000, 80, 10).bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::REDIRECT);
        parse(&out.frame).unwrap().dmac
    };

    // The neighbour changes behind the data path's back: established packets keep the
    // cached hop (they do no FIB lookup)...
    let moved = [0x02, 0, 0, 0, 2, 0x99];
    lab.ns.ip(&format!("neigh replace {} lladdr {} dev be nud permanent", BACKENDS[0], mac_str(moved))).unwrap();
    assert_eq!(dmac(&mut lab), backend_mac(BACKENDS[0]), "no lookup on the established path");
    // ...until the agent's route follower sees the change and moves the route epoch.
    let follower = lab.follow_routes().unwrap();
    assert_eq!(dmac(&mut lab), moved, "a stale next hop is looked up again");
    let epoch = lab.dp.maps.route_epoch().unwrap();
    lab.ns.ip(&format!("neigh replace {} lladdr {} dev be nud permanent", BACKENDS[0], mac_str(LB_CL_MAC))).unwrap();
    lab.wait_for_epoch_after(epoch).unwrap();
    assert_eq!(dmac(&mut lab), LB_CL_MAC, "a neighbour change reaches the flow");

    // A route with a smaller MTU: the flow's next big packet gets fragmentation needed
    // with the new MTU (path MTU discovery), smaller ones go through. (Forwarding honours
    // a route's MTU when it is locked, or with ip_forward_use_pmtu, as the kernel's own.)
    let epoch = lab.dp.maps.route_epoch().unwrap();
    lab.ns.ip(&format!("route add {}/32 dev be mtu lock 1300", BACKENDS[0])).unwrap();
    lab.wait_for_epoch_after(epoch).unwrap();
    let big = data(42000, 80, 1300 - 40 + 1);
    let out = lab.xdp(&big.bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX, "answered to the client");
    let p = parse(&out.frame).unwrap();
    assert_eq!(Ipv4Addr::from(p.ip.destination), CLIENT);
    let Some(etherparse::TransportHeader::Icmpv4(icmp)) = p.l4 else { panic!("not ICMP: {p:?}") };
    assert_eq!(
        icmp.icmp_type,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 })
    );
    assert_eq!(lab.xdp(&data(42000, 80, 1300 - 40).bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT, "fits");
    drop(follower);
}

#[test]
fn replies_go_back_the_way_the_clients_first_packet_came_and_respect_its_mtu() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    // The client's router is not the one the FIB would choose: replies still go to it.
    let router = [0x02, 0, 0, 0, 1, 0x77];
    let syn = Frame::tcp(client(43000), vip(80)).macs(router, LB_CL_MAC);
    assert_eq!(lab.xdp(&syn.bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT);
    let snat = snat_of(&lab, key(client(43000), vip(80), proto::TCP));
    let rev = lab.dp.maps.flow(&key(be(0, 80), snat, proto::TCP)).unwrap().unwrap();
    assert_eq!((rev.tx_ifindex, rev.smac, rev.dmac, rev.vlan, rev.mtu), (lab.cl, LB_CL_MAC, router, 0, 1500));
    let reply = |len: usize| {
        Frame::tcp(be(0, 80), snat)
            .macs(backend_mac(BACKENDS[0]), LB_BE_MAC)
            .tcp_header(|h| h.ack = true)
            .payload(&vec![0x24; len])
    };
    let out = lab.xdp(&reply(100).bytes(), lab.be).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    assert_frame(&out.frame, &reply(100).macs(LB_CL_MAC, router).tuple(vip(80), client(43000)).ttl(63).bytes());

    // A reply larger than the way back: fragmentation needed, to the backend, quoting the
    // reply as the backend sent it, so its path MTU discovery works through the NAT.
    let sent = reply(1500 - 40 + 1).bytes();
    let out = lab.xdp(&sent, lab.be).unwrap();
    assert_eq!(out.verdict, xdp::TX, "sent back out of the backend side");
    let p = parse(&out.frame).unwrap();
    assert_eq!((Ipv4Addr::from(p.ip.source), Ipv4Addr::from(p.ip.destination)), (LB_BACKEND_IP, BACKENDS[0]));
    let Some(etherparse::TransportHeader::Icmpv4(icmp)) = p.l4 else { panic!("not ICMP: {p:?}") };
    assert_eq!(
        icmp.icmp_type,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1500 })
    );
    assert_eq!(&p.payload[..20], &sent[14..34], "the quoted header is the reply's, untranslated");
}

#[test]
fn adding_a_backend_keeps_flows_and_removing_one_ends_only_its_flows() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80)])]).unwrap();
    assert_eq!(syn_to(&mut lab, 52000, 80), be(0, 80));
    assert_eq!(syn_to(&mut lab, 52001, 80), be(1, 80));
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80), be(2, 80)])]).unwrap();
    let data = |cport: u16| {
        Frame::tcp(client(cport), vip(80))
            .macs(GW_MAC, LB_CL_MAC)
            .tcp_header(|h| {
                h.syn = false;
                h.ack = true;
            })
            .bytes()
    };
    let dst = |lab: &mut Lab, cport| {
        let out = lab.xdp(&data(cport), lab.cl).unwrap();
        Ipv4Addr::from(parse(&out.frame).unwrap().ip.destination)
    };
    assert_eq!(dst(&mut lab, 52000), BACKENDS[0], "adding a backend moves no flow");
    assert_eq!(dst(&mut lab, 52001), BACKENDS[1]);
    // Backend 1 goes away: its flow ends (its next packet is a new flow), the other stays.
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(2, 80)])]).unwrap();
    assert_eq!(dst(&mut lab, 52000), BACKENDS[0]);
    assert_ne!(dst(&mut lab, 52001), BACKENDS[1]);
    // A late reply from the removed backend is dropped, not delivered.
    let flows = lab.dp.maps.flows().unwrap();
    assert!(flows.iter().all(|(k, _)| k.src != BACKENDS[1].octets()), "the removed backend's flow entries are gone");
}

#[test]
fn backend_set_changes_are_atomic_for_packets() {
    let mut lab = Lab::new().unwrap();
    let a = svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80)]);
    let b = svc(80, Protocol::Tcp, &[be(2, 80), be(1, 80), be(0, 80)]);
    lab.program(vec![a.clone()]).unwrap();
    let pin_dir = lab.dp.pin_dir().to_path_buf();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Stops the writer however the packet loop ends (a failed assertion included).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // Packets run until the writer has flipped the set often enough (however slowly a
    // loaded machine schedules it), so the race is always exercised.
    const MIN_FLIPS: usize = 20;
    const MIN_PACKETS: u32 = 3000;
    const MAX_PACKETS: u32 = 16_000;
    let flips = std::sync::atomic::AtomicUsize::new(0);
    let verdicts = std::thread::scope(|s| {
        // A second writer flips the backend set as fast as it can.
        s.spawn(|| {
            let mut maps = Maps::open(&pin_dir).unwrap();
            let mut st = maps.read_state().unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let next = if n % 2 == 0 { &b } else { &a };
                let desired =
                    DesiredState { services: vec![next.clone()], addrs: st.addrs.clone(), ifaces: st.ifaces.clone() };
                for op in plan(&st, &desired, maps.limits()).ops {
                    maps.apply(&op).unwrap();
                    st.apply(&op);
                }
                n += 1;
                flips.store(n, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let _guard = StopOnDrop(&stop);
        let mut verdicts = Vec::new();
        let mut i = 0u32;
        while i < MIN_PACKETS || (flips.load(std::sync::atomic::Ordering::Relaxed) < MIN_FLIPS && i < MAX_PACKETS) {
            // Distinct client ports: every packet is a new flow.
            let frame = Frame::tcp(client(10000 + i as u16), vip(80)).macs(GW_MAC, LB_CL_MAC).bytes();
            verdicts.push(lab.xdp(&frame, lab.cl).unwrap().verdict);
            i += 1;
        }
        verdicts
    });
    let flipped = flips.load(std::sync::atomic::Ordering::Relaxed);
    assert!(flipped >= MIN_FLIPS, "the writer flipped the set only {flipped} times in {MAX_PACKETS} packets");
    let bad: Vec<(usize, u32)> = verdicts.iter().copied().enumerate().filter(|(_, v)| *v != xdp::REDIRECT).collect();
    assert!(bad.is_empty(), "packets that saw no usable backend set: {bad:?}");
    assert_eq!(lab.stats(&a).unwrap().drops.no_backends, 0);
    assert_eq!(lab.stats(&a).unwrap().new_flows, verdicts.len() as u64);
}

#[test]
fn closed_tcp_flows_are_reclaimed_and_the_port_can_be_reused() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80)])]).unwrap();
    assert_eq!(syn_to(&mut lab, 53000, 80), be(0, 80));
    let snat = snat_of(&lab, key(client(53000), vip(80), proto::TCP));
    // A SYN on an open flow (retransmission) stays on its backend.
    assert_eq!(syn_to(&mut lab, 53000, 80), be(0, 80));
    // FIN from the client, FIN from the backend: closed.
    let fin = Frame::tcp(client(53000), vip(80)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| {
        h.syn = false;
        h.fin = true;
        h.ack = true;
    });
    assert_eq!(lab.xdp(&fin.bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT);
    let fin_back = Frame::tcp(be(0, 80), snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).tcp_header(|h| {
        h.fin = true;
        h.ack = true;
    });
    assert_eq!(lab.xdp(&fin_back.bytes(), lab.be).unwrap().verdict, xdp::REDIRECT);
    let f = lab.dp.maps.flow(&key(client(53000), vip(80), proto::TCP)).unwrap().unwrap();
    assert!(f.is_closed());
    // The client reuses its port: a new flow, the next backend.
    assert_eq!(syn_to(&mut lab, 53000, 80), be(1, 80));
    // RST closes a flow too.
    let rst = Frame::tcp(client(53000), vip(80)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| {
        h.syn = false;
        h.rst = true;
    });
    assert_eq!(lab.xdp(&rst.bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT);
    assert_eq!(syn_to(&mut lab, 53000, 80), be(0, 80));
}

#[test]
fn idle_flows_expire() {
    let config = DataplaneConfig { udp_timeout_ns: 200_000_000, ..DataplaneConfig::default() };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    lab.program(vec![svc(53, Protocol::Udp, &[be(0, 53), be(1, 53)])]).unwrap();
    let q = Frame::udp(client(54000), vip(53)).macs(GW_MAC, LB_CL_MAC).bytes();
    let dst = |lab: &mut Lab| Ipv4Addr::from(parse(&lab.xdp(&q, lab.cl).unwrap().frame).unwrap().ip.destination);
    assert_eq!(dst(&mut lab), BACKENDS[0]);
    // An answer, then the client's next query: confirmed.
    let snat = snat_of(&lab, key(client(54000), vip(53), proto::UDP));
    let answer = Frame::udp(be(0, 53), snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).bytes();
    assert_eq!(lab.xdp(&answer, lab.be).unwrap().verdict, xdp::REDIRECT);
    assert_eq!(dst(&mut lab), BACKENDS[0], "active flow stays");
    let k = key(client(54000), vip(53), proto::UDP);
    assert!(lab.dp.maps.flow_in(FlowTable::Established, &k).unwrap().is_some(), "confirmed");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(dst(&mut lab), BACKENDS[1], "idle past the UDP timeout: a new flow");
}

/// Sends SYN, the backend's SYN-ACK and the client's ACK; returns the backend and the
/// SNAT source the flow uses.
fn handshake(lab: &mut Lab, cport: u16, vport: u16) -> (SocketAddrV4, SocketAddrV4) {
    let backend = syn_to(lab, cport, vport);
    let k = key(client(cport), vip(vport), proto::TCP);
    let snat = snat_of(lab, k);
    let i = BACKENDS.iter().position(|b| b == backend.ip()).expect("a test backend");
    let synack = Frame::tcp(backend, snat).macs(backend_mac(BACKENDS[i]), LB_BE_MAC).tcp_header(|h| h.ack = true);
    assert_eq!(lab.xdp(&synack.bytes(), lab.be).unwrap().verdict, xdp::REDIRECT, "SYN-ACK translated");
    assert_eq!(lab.xdp(&ack(cport, vport).bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT, "ACK translated");
    (backend, snat)
}

/// The client's ACK (no SYN) on a flow.
fn ack(cport: u16, vport: u16) -> Frame {
    Frame::tcp(client(cport), vip(vport)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| {
        h.syn = false;
        h.ack = true;
        h.acknowledgment_number = 1;
    })
}

#[test]
fn a_flow_is_half_open_until_the_client_answers_the_reply() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let k = key(client(41000), vip(80), proto::TCP);
    let backend = syn_to(&mut lab, 41000, 80);
    let snat = snat_of(&lab, k);
    let rk = key(backend, snat, proto::TCP);
    let table = |lab: &Lab, k: &FlowKey| {
        let m = &lab.dp.maps;
        (m.flow_in(FlowTable::Established, k).unwrap().is_some(), m.flow_in(FlowTable::HalfOpen, k).unwrap().is_some())
    };
    assert_eq!((table(&lab, &k), table(&lab, &rk)), ((false, true), (false, true)), "SYN: half-open");
    // A retransmitted SYN stays half-open, on the same backend and port.
    assert_eq!(syn_to(&mut lab, 41000, 80), backend);
    assert_eq!(snat_of(&lab, k), snat);
    let synack = Frame::tcp(backend, snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).tcp_header(|h| h.ack = true);
    assert_eq!(lab.xdp(&synack.bytes(), lab.be).unwrap().verdict, xdp::REDIRECT);
    assert_eq!(table(&lab, &k), (false, true), "a reply alone (what a spoofed SYN gets) confirms nothing");
    let out = lab.xdp(&ack(41000, 80).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
    let p = parse(&out.frame).unwrap();
    assert_eq!(Ipv4Addr::from(p.ip.destination), *backend.ip());
    assert_eq!((table(&lab, &k), table(&lab, &rk)), ((true, false), (true, false)), "the ACK confirms");
    assert_eq!(lab.dp.maps.flow(&k).unwrap().map(|f| f.sport), Some(snat.port()), "same SNAT port");
    assert_eq!(lab.xdp(&synack.bytes(), lab.be).unwrap().verdict, xdp::REDIRECT, "replies go on");
}

#[test]
fn tcp_segments_of_unknown_flows_get_a_reset_and_create_nothing() {
    let mut lab = Lab::new().unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    let out = lab.xdp(&ack(42000, 80).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let p = parse(&out.frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(t)) = p.l4 else { panic!("not TCP") };
    assert!(t.rst, "answered with RST");
    assert!(lab.dp.maps.flows().unwrap().is_empty(), "no flow from an ACK");
    let synack = Frame::tcp(client(42001), vip(80)).macs(GW_MAC, LB_CL_MAC).tcp_header(|h| h.ack = true);
    assert_eq!(lab.xdp(&synack.bytes(), lab.cl).unwrap().verdict, xdp::TX);
    assert!(lab.dp.maps.flows().unwrap().is_empty(), "no flow from a SYN-ACK");
    assert_eq!(lab.stats(&web).unwrap().drops.no_flow, 2);
}

#[test]
fn half_of_an_evicted_half_open_pair_is_never_used() {
    // One SNAT port: whoever holds it holds the only tuple towards the backend.
    let config = DataplaneConfig {
        snat_port_min: 20000,
        snat_port_max: 20000,
        half_open_reclaim_ns: u64::MAX,
        ..DataplaneConfig::default()
    };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    let a = key(client(43000), vip(80), proto::TCP);
    let b = key(client(43001), vip(80), proto::TCP);
    syn_to(&mut lab, 43000, 80);
    let snat = snat_of(&lab, a);
    // The LRU evicts A's reply entry alone: the port looks free and B takes it.
    lab.dp.maps.remove_flow_in(FlowTable::HalfOpen, &key(be(0, 80), snat, proto::TCP)).unwrap();
    syn_to(&mut lab, 43001, 80);
    assert_eq!(snat_of(&lab, b), snat, "B holds the port now");
    // A's orphaned forward entry must not send A's packets down B's tuple.
    let out = lab.xdp(&Frame::tcp(client(43000), vip(80)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
    assert_ne!(out.verdict, xdp::REDIRECT, "A is not forwarded with B's port");
    assert_eq!(lab.stats(&web).unwrap().drops.snat_exhausted, 1, "A waits for a port instead");
    assert!(lab.dp.maps.flow(&a).unwrap().is_none(), "the orphan is gone");
    // B's flow is whole and works both ways.
    let synack = Frame::tcp(be(0, 80), snat).macs(backend_mac(BACKENDS[0]), LB_BE_MAC).tcp_header(|h| h.ack = true);
    let out = lab.xdp(&synack.bytes(), lab.be).unwrap();
    let p = parse(&out.frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(t)) = p.l4 else { panic!("not TCP") };
    assert_eq!(t.destination_port, 43001, "the backend's answer reaches B");
    // And an orphaned reply entry is dropped, not delivered to a client.
    lab.dp.maps.remove_flow_in(FlowTable::HalfOpen, &b).unwrap();
    assert_eq!(lab.xdp(&synack.bytes(), lab.be).unwrap().verdict, xdp::DROP);
    assert_eq!(lab.stats(&web).unwrap().drops.stale_flow, 1);
}

#[test]
fn a_port_held_by_a_half_open_flow_goes_to_a_new_flow_that_needs_it() {
    // One SNAT port, held by a SYN nobody completes (a spoofed one).
    let config = DataplaneConfig { snat_port_min: 20000, snat_port_max: 20000, ..DataplaneConfig::default() };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    syn_to(&mut lab, 49000, 80);
    let spoofed = key(client(49000), vip(80), proto::TCP);
    assert!(lab.dp.maps.flow(&spoofed).unwrap().is_some());
    std::thread::sleep(std::time::Duration::from_millis(1300));
    // Older than the reclaim age (1 s): a real client gets the port at once, not after
    // the 10 s half-open timeout.
    syn_to(&mut lab, 49001, 80);
    assert_eq!(snat_of(&lab, key(client(49001), vip(80), proto::TCP)).port(), 20000);
    assert!(lab.dp.maps.flow(&spoofed).unwrap().is_none(), "the spoofed flow gave its port up, both entries");
    assert_eq!(lab.dp.maps.flows().unwrap().len(), 2);
}

#[test]
fn spoofed_syns_never_evict_or_disturb_an_established_flow() {
    let sizes = MapSizes { flow_entries: 64, half_open_entries: 256, ..MapSizes::default() };
    let mut lab = Lab::with_config(DataplaneConfig::default(), sizes).unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    let (backend, snat) = handshake(&mut lab, 44000, 80);
    // 20 000 SYNs from spoofed sources: 40 times what the half-open table holds.
    for i in 0..20_000u32 {
        let src = SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + i), 1024 + (i % 60000) as u16);
        let out = lab.xdp(&Frame::tcp(src, vip(80)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
        assert_eq!(out.verdict, xdp::REDIRECT, "spoofed SYN {i} is forwarded like any SYN");
    }
    let k = key(client(44000), vip(80), proto::TCP);
    let f = lab.dp.maps.flow_in(FlowTable::Established, &k).unwrap().expect("the established flow survived");
    assert_eq!((f.dst, f.sport), (backend.ip().octets(), snat.port()));
    let out = lab.xdp(&ack(44000, 80).payload(b"GET /").bytes(), lab.cl).unwrap();
    let p = parse(&out.frame).unwrap();
    assert_eq!(Ipv4Addr::from(p.ip.destination), *backend.ip(), "its packets still go to its backend");
    let half_open = lab.dp.maps.flows_in(FlowTable::HalfOpen).unwrap().len();
    assert!(half_open <= 256, "the flood stays within the half-open table: {half_open}");
    assert_eq!(lab.stats(&web).unwrap().drops.snat_exhausted, 0, "evicted half-open flows gave their ports back");
    // A real client still connects.
    handshake(&mut lab, 44001, 80);
}

#[test]
fn half_open_flows_expire_after_their_short_timeout() {
    let config = DataplaneConfig { half_open_timeout_ns: 200_000_000, ..DataplaneConfig::default() };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80), be(1, 80)])]).unwrap();
    assert_eq!(syn_to(&mut lab, 45000, 80), be(0, 80));
    assert_eq!(syn_to(&mut lab, 45000, 80), be(0, 80), "a retransmission within the timeout");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(syn_to(&mut lab, 45000, 80), be(1, 80), "never confirmed, idle past 200 ms: a new flow");
    // A confirmed flow keeps the long TCP timeout.
    handshake(&mut lab, 45001, 80);
    std::thread::sleep(std::time::Duration::from_millis(400));
    let k = key(client(45001), vip(80), proto::TCP);
    assert!(lab.dp.maps.flow_in(FlowTable::Established, &k).unwrap().is_some());
    let out = lab.xdp(&ack(45001, 80).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::REDIRECT);
}

#[test]
fn a_full_flow_table_refuses_new_flows_with_a_reset_and_keeps_the_old_ones() {
    // Each CPU learns by itself that the table is full (no shared write per new flow);
    // the lab keeps every run on one CPU.
    // Room for two confirmed flows.
    let sizes = MapSizes { flow_entries: 4, ..MapSizes::default() };
    let mut lab = Lab::with_config(DataplaneConfig::default(), sizes).unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    handshake(&mut lab, 47000, 80);
    handshake(&mut lab, 47001, 80);
    // The third handshake cannot be confirmed: its ACK still gets through (half-open) ...
    handshake(&mut lab, 47002, 80);
    assert_eq!(lab.stats(&web).unwrap().drops.flow_table_full, 1);
    // ... and new flows are refused with a reset for a moment, not silently dropped.
    let out = lab.xdp(&Frame::tcp(client(47003), vip(80)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
    assert_eq!(out.verdict, xdp::TX);
    let p = parse(&out.frame).unwrap();
    let Some(etherparse::TransportHeader::Tcp(t)) = p.l4 else { panic!("not TCP") };
    assert!(t.rst);
    assert_eq!(lab.stats(&web).unwrap().drops.flow_table_full, 2);
    // The established flows are untouched.
    for c in [47000, 47001] {
        assert_eq!(lab.xdp(&ack(c, 80).bytes(), lab.cl).unwrap().verdict, xdp::REDIRECT);
    }
}

#[test]
fn generated_answers_are_rate_limited_per_cpu() {
    // The limit is per CPU; the lab keeps every run on one.
    // One answer a second with a burst of 5.
    let config = DataplaneConfig {
        reply_interval_ns: 1_000_000_000,
        reply_burst_ns: 5_000_000_000,
        ..DataplaneConfig::default()
    };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)])]).unwrap();
    let started = std::time::Instant::now();
    let mut answered = 0;
    for i in 0..100 {
        let out = lab.xdp(&Frame::tcp(client(48000 + i), vip(9999)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
        if out.verdict == xdp::TX {
            answered += 1;
        } else {
            assert_eq!(out.verdict, xdp::DROP);
        }
    }
    let g = lab.global_stats().unwrap();
    // The burst (plus the first answer), and one more for each second the loop took.
    let most = 6 + started.elapsed().as_secs();
    assert!((6..=most).contains(&answered), "{answered} resets of 100 (at most {most})");
    assert_eq!(g.drops.rate_limited, 100 - answered);
    assert_eq!(g.drops.no_service, 100, "every one is counted for what it was");
}

#[test]
fn snat_ports_are_unique_and_exhaustion_is_counted() {
    // Ports held by half-open flows are not reclaimed during the test, however slow it runs.
    let config = DataplaneConfig {
        snat_port_min: 20000,
        snat_port_max: 20003,
        half_open_reclaim_ns: u64::MAX,
        ..DataplaneConfig::default()
    };
    let mut lab = Lab::with_config(config, MapSizes { flow_entries: 4096, ..MapSizes::default() }).unwrap();
    let web = svc(80, Protocol::Tcp, &[be(0, 80)]);
    lab.program(vec![web.clone()]).unwrap();
    let mut ports = std::collections::BTreeSet::new();
    let mut dropped = 0;
    for i in 0..12 {
        let out = lab.xdp(&Frame::tcp(client(55000 + i), vip(80)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
        if out.verdict == xdp::TX {
            // Refused with a reset, not silently dropped.
            let p = parse(&out.frame).unwrap();
            assert!(matches!(p.l4, Some(etherparse::TransportHeader::Tcp(ref t)) if t.rst));
            dropped += 1;
            continue;
        }
        assert!(ports.insert(snat_of(&lab, key(client(55000 + i), vip(80), proto::TCP)).port()), "SNAT port reused");
    }
    assert!(ports.iter().all(|p| (20000..=20003).contains(p)));
    assert!(ports.len() >= 3, "probing finds free ports: {ports:?}");
    assert_eq!(lab.stats(&web).unwrap().drops.snat_exhausted, dropped);
    assert_eq!(ports.len() as u64 + dropped, 12);
}

#[test]
fn bpftool_dumps_pinned_maps_with_field_names() {
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 80)]), svc(81, Protocol::Tcp, &[])]).unwrap();
    syn_to(&mut lab, 56000, 80);
    lab.xdp(&Frame::tcp(client(56001), vip(81)).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl).unwrap();
    let pins = lab.dp.pin_dir().to_path_buf();
    let dump = |map: &str| {
        let path = pins.join(map);
        ballast_tests::cmd::run("bpftool", &["map", "dump", "pinned", &path.display().to_string()]).unwrap()
    };
    let services = dump("services");
    for field in ["\"vip\"", "\"port\": 80", "\"proto\": 6", "\"set\"", "\"count\": 1"] {
        assert!(services.contains(field), "{field} missing from:\n{services}");
    }
    let flows = dump("half_open");
    for field in ["\"sport\": 56000", "\"backend_id\"", "\"last_seen_ns\"", "\"smac\""] {
        assert!(flows.contains(field), "{field} missing from:\n{flows}");
    }
    let stats = dump("stats");
    for field in ["\"new_flows\": 1", "\"no_backends\": 1", "\"drops\""] {
        assert!(stats.contains(field), "{field} missing from:\n{stats}");
    }
    handshake(&mut lab, 56002, 80);
    let flows = dump("flows");
    assert!(flows.contains("\"sport\": 56002"), "the confirmed flow is in `flows`:\n{flows}");
    let cpu = dump("cpu_state");
    for field in ["\"snat_cursor\"", "\"reply_tat_ns\""] {
        assert!(cpu.contains(field), "{field} missing from:\n{cpu}");
    }
    assert!(dump("backends").contains("\"generation\": 1"));
}

/// ARP requests for a VIP held as L2 owner reach the kernel (which answers them) only while
/// the node's lease lasts; everything else about ARP passes untouched.
#[test]
fn arp_for_an_owned_vip_reaches_the_kernel_only_while_the_lease_lasts() {
    use ballast_tests::frames::arp;
    use lb_agent::dataplane::{flows::monotonic_ns, state::MapOp};
    use lb_common::addr::{ADDR_LEASED, ADDR_VIP, AddrInfo, AddrKey};
    let mut lab = Lab::new().unwrap();
    lab.program(vec![svc(80, Protocol::Tcp, &[be(0, 8080)])]).unwrap();
    let gw = Ipv4Addr::new(10, 1, 0, 2);
    let request = |target, vlan| arp(1, GW_MAC, gw, [0; 6], target, vlan);
    let verdict = |lab: &mut Lab, frame: Vec<u8>| lab.xdp(&frame, lab.cl).unwrap().verdict;
    // A VIP held permanently (static mode, announce mode None): always the kernel's.
    assert_eq!(verdict(&mut lab, request(VIP, None)), xdp::PASS);
    // Held as owner: without a lease (a fresh node, a dead agent's), nobody answers here.
    lab.dp
        .maps
        .apply(&MapOp::SetAddr(AddrKey { addr: VIP.octets() }, AddrInfo { flags: ADDR_VIP | ADDR_LEASED }))
        .unwrap();
    assert_eq!(verdict(&mut lab, request(VIP, None)), xdp::DROP);
    // A live lease.
    lab.dp.maps.set_lease_deadline(monotonic_ns() + 3_000_000_000).unwrap();
    assert_eq!(verdict(&mut lab, request(VIP, None)), xdp::PASS);
    assert_eq!(verdict(&mut lab, request(VIP, Some(VLAN_ID))), xdp::PASS, "tagged");
    // The lease ended: dropped, tagged or not.
    lab.dp.maps.set_lease_deadline(monotonic_ns() - 1).unwrap();
    assert_eq!(verdict(&mut lab, request(VIP, None)), xdp::DROP);
    assert_eq!(verdict(&mut lab, request(VIP, Some(VLAN_ID))), xdp::DROP, "tagged");
    // Replies, and requests for addresses that are not leased VIPs, pass.
    assert_eq!(verdict(&mut lab, arp(2, GW_MAC, gw, LB_CL_MAC, VIP, None)), xdp::PASS);
    assert_eq!(verdict(&mut lab, request(LB_BACKEND_IP, None)), xdp::PASS);
    assert_eq!(verdict(&mut lab, request(Ipv4Addr::new(10, 1, 0, 77), None)), xdp::PASS);
    // Truncated: passes (the kernel drops it).
    assert_eq!(verdict(&mut lab, request(VIP, None)[..30].to_vec()), xdp::PASS);
}
