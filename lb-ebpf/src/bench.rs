//! `lb-bench`: the benchmark's in-kernel traffic generator and sink, in an object of their
//! own (the agent never loads it). The LB-hop benchmark runs `bench_gen` with
//! `BPF_PROG_RUN` in XDP live-frames mode on the client's veth: every frame it returns
//! `XDP_TX` crosses into the load balancer as an XDP frame, with no socket buffer on the
//! way in. `bench_sink`, on the far end of the load balancer's egress veth, counts and
//! drops what arrives, so backends cost nothing.
//!
//! Live-frame pages are recycled without copying the input again, and the load balancer
//! rewrites frames in place, so the generator writes the whole header on every run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        btf_maps::{Array, PerCpuArray},
        macros::{btf_map, xdp},
        programs::XdpContext,
    };
    use lb_common::{
        bench::{GEN_FRAME_LEN, GenTemplate},
        checksum::CsumDelta,
        proto,
    };

    /// What to send.
    #[btf_map(name = "gen_template")]
    static TEMPLATE: Array<GenTemplate, 1> = Array::new();

    /// Per CPU: the next tuple to send.
    #[btf_map(name = "gen_cursor")]
    static CURSOR: PerCpuArray<u32, 1> = PerCpuArray::new();

    /// Per CPU: frames the sink dropped.
    #[btf_map(name = "sink_count")]
    static SINK_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

    const IP_CHECK: usize = 24;
    const IP_SRC: usize = 26;
    const SPORT: usize = 34;
    const TCP_CHECK: usize = 50;
    const UDP_CHECK: usize = 40;

    fn word(b: &[u8; GEN_FRAME_LEN], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    /// Writes the next tuple's headers and sends the frame out of the device it runs on.
    #[xdp]
    pub fn bench_gen(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + GEN_FRAME_LEN > end {
            return XDP_ABORTED;
        }
        let (Some(t), Some(cursor)) = (TEMPLATE.get(0), CURSOR.get_ptr_mut(0)) else {
            return XDP_ABORTED;
        };
        // SAFETY: per-CPU slot, touched only by this CPU with preemption off.
        let k = unsafe {
            let k = *cursor;
            *cursor = if k + 1 >= t.flows { 0 } else { k + 1 };
            k
        };
        let mut f = t.frame;
        let ports = t.ports.max(1);
        let src = u32::from_be_bytes([f[IP_SRC], f[IP_SRC + 1], f[IP_SRC + 2], f[IP_SRC + 3]]);
        let (old_src_hi, old_src_lo, old_port) = (word(&f, IP_SRC), word(&f, IP_SRC + 2), word(&f, SPORT));
        let new_src = (src.wrapping_add(k / ports)).to_be_bytes();
        let port = u16::from_be_bytes([f[SPORT], f[SPORT + 1]]).wrapping_add((k % ports) as u16).to_be_bytes();
        f[IP_SRC..IP_SRC + 4].copy_from_slice(&new_src);
        f[SPORT..SPORT + 2].copy_from_slice(&port);
        let addr = CsumDelta::new().u16(old_src_hi, word(&f, IP_SRC)).u16(old_src_lo, word(&f, IP_SRC + 2));
        let ip_check = addr.apply(word(&f, IP_CHECK)).to_ne_bytes();
        f[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check);
        let l4 = addr.u16(old_port, word(&f, SPORT));
        if t.proto == proto::TCP as u32 {
            let c = l4.apply(word(&f, TCP_CHECK)).to_ne_bytes();
            f[TCP_CHECK..TCP_CHECK + 2].copy_from_slice(&c);
        } else {
            let c = l4.apply_udp(word(&f, UDP_CHECK)).to_ne_bytes();
            f[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&c);
        }
        // SAFETY: the frame holds at least GEN_FRAME_LEN bytes (checked above) and nothing
        // else refers to its data.
        unsafe { core::ptr::write_unaligned(data as *mut [u8; GEN_FRAME_LEN], f) };
        XDP_TX
    }

    /// Sequence number of the reflector's SYN-ACKs.
    pub const REFLECT_SEQ: u32 = 5000;

    fn put16(data: usize, at: usize, v: u16) {
        // SAFETY: callers checked that `at + 2` is within the frame.
        unsafe { core::ptr::write_unaligned((data + at) as *mut u16, v) }
    }

    fn get16(data: usize, at: usize) -> u16 {
        // SAFETY: callers checked that `at + 2` is within the frame.
        unsafe { core::ptr::read_unaligned((data + at) as *const u16) }
    }

    /// Answers every frame as a backend would, so flows through the load balancer get their
    /// reply before the measurement: swaps MACs, addresses and ports, and for TCP answers a
    /// SYN with a SYN-ACK (sequence `REFLECT_SEQ`, acknowledging the SYN) and anything else
    /// with an ACK, so conntrack's window tracking accepts what follows. Checksums are
    /// patched (a swap changes none).
    #[xdp]
    pub fn bench_reflect(ctx: XdpContext) -> u32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 54 > end {
            return XDP_DROP;
        }
        for i in 0..3 {
            let (a, b) = (get16(data, 2 * i), get16(data, 6 + 2 * i));
            put16(data, 2 * i, b);
            put16(data, 6 + 2 * i, a);
        }
        for i in 0..2 {
            let (a, b) = (get16(data, IP_SRC + 2 * i), get16(data, IP_SRC + 4 + 2 * i));
            put16(data, IP_SRC + 2 * i, b);
            put16(data, IP_SRC + 4 + 2 * i, a);
        }
        let (sp, dp) = (get16(data, SPORT), get16(data, SPORT + 2));
        put16(data, SPORT, dp);
        put16(data, SPORT + 2, sp);
        // SAFETY: offset 23 is within the 54 bytes checked.
        let proto = unsafe { *((data + 23) as *const u8) };
        if proto == proto::TCP {
            let (seq_hi, seq_lo, ack_hi, ack_lo, flags) =
                (get16(data, 38), get16(data, 40), get16(data, 42), get16(data, 44), get16(data, 46));
            let seq = u32::from_be_bytes({
                let (h, l) = (seq_hi.to_ne_bytes(), seq_lo.to_ne_bytes());
                [h[0], h[1], l[0], l[1]]
            });
            let ack = (seq.wrapping_add(1)).to_be_bytes();
            let new_seq = REFLECT_SEQ.to_be_bytes();
            let [doff, bits] = flags.to_ne_bytes();
            // SYN (0x02) → SYN|ACK (0x12); anything else → ACK (0x10).
            let new_flags = u16::from_ne_bytes([doff, if bits & 0x02 != 0 { 0x12 } else { 0x10 }]);
            let words = [
                (seq_hi, u16::from_ne_bytes([new_seq[0], new_seq[1]])),
                (seq_lo, u16::from_ne_bytes([new_seq[2], new_seq[3]])),
                (ack_hi, u16::from_ne_bytes([ack[0], ack[1]])),
                (ack_lo, u16::from_ne_bytes([ack[2], ack[3]])),
                (flags, new_flags),
            ];
            let mut d = CsumDelta::new();
            for (i, (old, new)) in words.iter().enumerate() {
                d = d.u16(*old, *new);
                put16(data, 38 + 2 * i, *new);
            }
            put16(data, TCP_CHECK, d.apply(get16(data, TCP_CHECK)));
        }
        XDP_TX
    }

    /// Passes every frame to the stack: on the kernel contenders' interfaces, where frames
    /// other veths send with XDP must land in an XDP program to be received.
    #[xdp]
    pub fn bench_pass(_ctx: XdpContext) -> u32 {
        XDP_PASS
    }

    /// Counts and drops every frame.
    #[xdp]
    pub fn bench_sink(_ctx: XdpContext) -> u32 {
        if let Some(n) = SINK_COUNT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, touched only by this CPU with preemption off.
            unsafe { *n += 1 };
        }
        XDP_DROP
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        // SAFETY: the verifier rejects programs with a reachable panic path.
        unsafe { core::hint::unreachable_unchecked() }
    }

    /// Helpers such as map lookups need a GPL-compatible license (see main.rs).
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Host builds get an empty binary (see main.rs).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
