//! Address pools: the `addresses` of a `LoadBalancerConfig`. Pure.

use std::net::Ipv4Addr;

/// A parse error, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address entry {entry:?}: {reason}")]
pub struct PoolError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong.
    pub reason: String,
}

/// A set of IPv4 addresses as inclusive ranges (a /8 stays 1 range, not 16M addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPool {
    ranges: Vec<(u32, u32)>,
}

impl AddressPool {
    /// Parses CIDRs (`192.0.2.0/28`), ranges (`a.b.c.d-a.b.c.e`) and single addresses. For
    /// prefixes up to /30 the network and broadcast addresses are left out (hosts behind a
    /// router often cannot use them); /31 and /32 use every address.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, PoolError> {
        let mut ranges = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            let err = |reason: &str| PoolError { entry: e.to_string(), reason: reason.to_string() };
            let ip = |s: &str| s.trim().parse::<Ipv4Addr>().map(u32::from).map_err(|_| err("not an IPv4 address"));
            let range = if let Some((a, p)) = e.split_once('/') {
                let prefix: u32 = p.trim().parse().map_err(|_| err("prefix length is not a number"))?;
                if prefix > 32 {
                    return Err(err("prefix length exceeds 32"));
                }
                let a = ip(a)?;
                let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                if a & !mask != 0 {
                    return Err(err("host bits are set (did you mean the network address?)"));
                }
                let (lo, hi) = (a, a | !mask);
                if prefix <= 30 { (lo + 1, hi - 1) } else { (lo, hi) }
            } else if let Some((a, b)) = e.split_once('-') {
                let (a, b) = (ip(a)?, ip(b)?);
                if a > b {
                    return Err(err("range start is after its end"));
                }
                (a, b)
            } else {
                let a = ip(e)?;
                (a, a)
            };
            ranges.push(range);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Self { ranges: merged })
    }

    /// Whether `ip` belongs to the pool.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        self.ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&v))
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|(lo, hi)| u64::from(hi - lo) + 1).sum()
    }

    /// The lowest address from `from` on (the whole pool without it) for which `taken`
    /// says no. An allocation that only adds holders can pass the last address it found
    /// as `from`, so handing out n addresses costs O(n), not O(n²).
    pub fn first_free(&self, from: Option<Ipv4Addr>, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        let from = from.map_or(0, u32::from);
        self.ranges
            .iter()
            .filter(|(_, hi)| *hi >= from)
            .flat_map(|(lo, hi)| ((*lo).max(from)..=*hi).map(Ipv4Addr::from))
            .find(|a| !taken(*a))
    }

    /// Every address, lowest first (lazily).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ranges.iter().flat_map(|(lo, hi)| (*lo..=*hi).map(Ipv4Addr::from))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn parses_cidrs_ranges_and_single_addresses() {
        let p =
            AddressPool::parse(&["192.0.2.0/30", "192.0.2.10-192.0.2.12", "198.51.100.7", "203.0.113.4/31"]).unwrap();
        let all: Vec<Ipv4Addr> = p.addresses().collect();
        assert_eq!(
            all,
            [
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.10",
                "192.0.2.11",
                "192.0.2.12",
                "198.51.100.7",
                "203.0.113.4",
                "203.0.113.5"
            ]
            .map(|s| s.parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(p.size(), 8);
        assert!(p.contains("192.0.2.11".parse().unwrap()));
        assert!(!p.contains("192.0.2.3".parse().unwrap()), "broadcast of a /30 is left out");
        assert_eq!(AddressPool::parse(&["10.0.0.0/8"]).unwrap().size(), (1 << 24) - 2);
    }

    #[test]
    fn overlapping_entries_merge_and_free_addresses_are_lowest_first() {
        let p = AddressPool::parse(&["192.0.2.10-192.0.2.20", "192.0.2.15-192.0.2.25"]).unwrap();
        assert_eq!(p.size(), 16);
        let taken: BTreeSet<Ipv4Addr> = ["192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap()].into();
        assert_eq!(p.first_free(None, |a| taken.contains(&a)), Some("192.0.2.12".parse().unwrap()));
        let full: BTreeSet<Ipv4Addr> = p.addresses().collect();
        assert_eq!(p.first_free(None, |a| full.contains(&a)), None);
    }

    #[test]
    fn the_search_resumes_where_it_left_off_across_ranges() {
        let p = AddressPool::parse(&["192.0.2.10-192.0.2.11", "192.0.2.20-192.0.2.21"]).unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let none = |_| false;
        assert_eq!(p.first_free(Some(ip("192.0.2.11")), none), Some(ip("192.0.2.11")));
        // From a gap between ranges, and from below the pool.
        assert_eq!(p.first_free(Some(ip("192.0.2.15")), none), Some(ip("192.0.2.20")));
        assert_eq!(p.first_free(Some(ip("10.0.0.1")), none), Some(ip("192.0.2.10")));
        // Past the end: nothing, even though lower addresses are free.
        assert_eq!(p.first_free(Some(ip("192.0.2.22")), none), None);
        let taken = [ip("192.0.2.20")];
        assert_eq!(p.first_free(Some(ip("192.0.2.12")), |a| taken.contains(&a)), Some(ip("192.0.2.21")));
    }

    #[test]
    fn errors_name_the_entry() {
        for (entry, reason) in [
            ("192.0.2.0/33", "prefix length exceeds 32"),
            ("192.0.2.1/24", "host bits are set"),
            ("192.0.2.9-192.0.2.1", "range start is after its end"),
            ("300.0.0.1", "not an IPv4 address"),
        ] {
            let e = AddressPool::parse(&[entry]).unwrap_err();
            assert_eq!(e.entry, entry);
            assert!(e.to_string().contains(reason), "{e}");
        }
    }
}
