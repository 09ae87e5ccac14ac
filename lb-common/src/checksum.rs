//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624).
//!
//! Values are taken *as stored in the packet*: a 16-bit word is the two bytes loaded in
//! native order. One's-complement sums are byte-order independent as long as every word is
//! read the same way, so the data path never swaps bytes to update a checksum.

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Accumulates the difference between old and new header words, then patches a checksum
/// once: `HC' = ~(~HC + Σ~m + Σm')` (RFC 1624, eqn. 3).
#[derive(Clone, Copy, Debug, Default)]
pub struct CsumDelta {
    sum: u32,
}

impl CsumDelta {
    /// An empty delta.
    #[inline(always)]
    pub const fn new() -> Self {
        Self { sum: 0 }
    }

    /// Records that a 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub const fn u16(mut self, old: u16, new: u16) -> Self {
        self.sum += (!old) as u32 + new as u32;
        self.sum = fold(self.sum) as u32;
        self
    }

    /// Records that a 32-bit field (two words) changed from `old` to `new`.
    #[inline(always)]
    pub const fn u32(self, old: u32, new: u32) -> Self {
        self.u16(old as u16, new as u16).u16((old >> 16) as u16, (new >> 16) as u16)
    }

    /// Adds another delta (e.g. the pseudo-header part shared by IP and L4 checksums).
    #[inline(always)]
    pub const fn merge(mut self, other: Self) -> Self {
        self.sum += other.sum;
        self.sum = fold(self.sum) as u32;
        self
    }

    /// The checksum field after applying the delta to `check`.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u32 + self.sum)
    }

    /// The delta as one word, for checksums that cover this checksum field itself (the
    /// ICMP checksum covers the quoted packet's checksums).
    #[inline(always)]
    pub const fn as_word(self) -> u16 {
        fold(self.sum)
    }

    /// Like [`Self::apply`] for UDP: a zero checksum means "none" and stays zero, and a
    /// computed zero is sent as `0xffff` (RFC 768).
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        let c = self.apply(check);
        if c == 0 { 0xffff } else { c }
    }
}

/// Sums 16-bit words (for checksums computed from scratch over a few header words).
#[inline(always)]
pub const fn sum_words(words: &[u16]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < words.len() {
        sum += words[i] as u32;
        i += 1;
    }
    sum
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn words(bytes: &[u8]) -> Vec<u16> {
        bytes.chunks(2).map(|c| u16::from_ne_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect()
    }

    fn full(bytes: &[u8]) -> u16 {
        !fold(sum_words(&words(bytes)))
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        // An IPv4 header with a correct checksum, then every address rewritten.
        let mut hdr: [u8; 20] = [0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 10, 0, 0, 1, 192, 0, 2, 10];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(full(&hdr), 0);

        let old_src = u32::from_ne_bytes(hdr[12..16].try_into().unwrap());
        let old_dst = u32::from_ne_bytes(hdr[16..20].try_into().unwrap());
        let old_ttl = u16::from_ne_bytes([hdr[8], hdr[9]]);
        let new_src = u32::from_ne_bytes([10, 1, 2, 3]);
        let new_dst = u32::from_ne_bytes([172, 16, 9, 200]);
        hdr[8] -= 1;
        let new_ttl = u16::from_ne_bytes([hdr[8], hdr[9]]);
        hdr[12..16].copy_from_slice(&new_src.to_ne_bytes());
        hdr[16..20].copy_from_slice(&new_dst.to_ne_bytes());
        let delta = CsumDelta::new().u32(old_src, new_src).u32(old_dst, new_dst).u16(old_ttl, new_ttl);
        let patched = delta.apply(c);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(patched, full(&hdr));
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        let d = CsumDelta::new().u16(1, 2);
        assert_eq!(d.apply_udp(0), 0);
        // Choose a checksum that the delta turns into zero: apply(c) == 0 ⇔ ~c + 1 == 0xffff.
        let c = !0xfffe_u16;
        assert_eq!(d.apply(c), 0);
        assert_eq!(d.apply_udp(c), 0xffff);
    }
}
