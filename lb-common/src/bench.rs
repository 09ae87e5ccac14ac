//! The benchmark's traffic generator (`lb-bench` object, never loaded by the agent): its
//! frame template, shared with the harness that fills it.

/// Frame bytes the generator writes at the start of every frame it sends.
pub const GEN_FRAME_LEN: usize = 64;

/// The generator's only `gen_template` entry. Every frame starts as `frame` (Ethernet,
/// IPv4 without options, UDP or TCP, checksums valid for tuple 0); tuple `k` of
/// `0..flows` has source address `frame`'s + `k / ports` and source port `frame`'s +
/// `k % ports`, with both checksums patched to match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenTemplate {
    /// The headers of tuple 0, zero-padded.
    pub frame: [u8; GEN_FRAME_LEN],
    /// Distinct tuples to cycle through (at least 1).
    pub flows: u32,
    /// Source ports per source address (at least 1).
    pub ports: u32,
    /// `proto::TCP` or `proto::UDP`, which says where the L4 checksum is.
    pub proto: u32,
    /// Always zero.
    pub _pad: u32,
}

impl Default for GenTemplate {
    fn default() -> Self {
        Self { frame: [0; GEN_FRAME_LEN], flows: 1, ports: 1, proto: 0, _pad: 0 }
    }
}

const _: () = assert!(core::mem::size_of::<GenTemplate>() == 80);

crate::pod!(GenTemplate);
