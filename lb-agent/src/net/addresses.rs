//! Which VIPs to add to and remove from the interface. Pure.
//!
//! Ownership lives in the kernel: every address ballast adds carries its address protocol
//! marker, so a restarted agent recognises its own addresses, adopts the ones still wanted,
//! removes the ones no longer wanted, and never touches anyone else's. The reference count of
//! a VIP is the number of services using it; the address goes with its last user.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{IfAddr, Lifetime};

/// Where a VIP should be held, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// ifindex of the interface that should hold it.
    pub index: u32,
    /// Its lifetime: forever, or the seconds left of the node's lease.
    pub lifetime: Lifetime,
}

/// Changes to make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressChanges {
    /// VIPs to add (as /32, marked as ballast's): (ifindex, address, lifetime).
    pub add: Vec<(u32, Ipv4Addr, Lifetime)>,
    /// ballast's VIPs already in place whose lifetime must change (a lease renewed, or a
    /// permanent address becoming leased and back): (ifindex, address, lifetime).
    pub renew: Vec<(u32, Ipv4Addr, Lifetime)>,
    /// ballast's addresses to remove: (ifindex, address, prefix).
    pub remove: Vec<(u32, Ipv4Addr, u8)>,
    /// Wanted VIPs that some other software already put on an interface: used as they
    /// are, never changed or removed.
    pub foreign: Vec<Ipv4Addr>,
}

/// Computes the changes that make the node hold exactly `wanted`, given every IPv4
/// address on the node.
pub fn address_changes(wanted: &BTreeMap<Ipv4Addr, Want>, present: &[IfAddr]) -> AddressChanges {
    let mut out = AddressChanges::default();
    // Indexed once: a scan of every address per wanted VIP was 10^8 steps at 10 000 VIPs.
    let mut by_addr: BTreeMap<Ipv4Addr, Vec<&IfAddr>> = BTreeMap::new();
    for a in present {
        by_addr.entry(a.addr).or_default().push(a);
    }
    for (vip, want) in wanted {
        let here = by_addr.get(vip).map_or(&[][..], Vec::as_slice);
        if here.iter().any(|a| !a.ours) {
            out.foreign.push(*vip);
            continue;
        }
        match here.iter().find(|a| a.ours && a.index == want.index) {
            None => out.add.push((want.index, *vip, want.lifetime)),
            // The kernel reports the seconds left; a renewal sets them again.
            Some(a) if a.lifetime != want.lifetime => out.renew.push((want.index, *vip, want.lifetime)),
            Some(_) => {}
        }
    }
    let foreign: std::collections::BTreeSet<Ipv4Addr> = out.foreign.iter().copied().collect();
    for a in present.iter().filter(|a| a.ours) {
        let keep = wanted.get(&a.addr).is_some_and(|w| w.index == a.index) && !foreign.contains(&a.addr);
        if !keep {
            out.remove.push((a.index, a.addr, a.prefix));
        }
    }
    out
}

/// Number of services per VIP (its reference count).
pub fn vip_users<'a>(vips: impl IntoIterator<Item = &'a Ipv4Addr>) -> BTreeMap<Ipv4Addr, usize> {
    let mut users = BTreeMap::new();
    for v in vips {
        *users.entry(*v).or_insert(0) += 1;
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(index: u32, a: [u8; 4], ours: bool) -> IfAddr {
        IfAddr { index, addr: a.into(), prefix: 32, ours, secondary: false, lifetime: Lifetime::Forever }
    }

    fn want(index: u32, lifetime: Lifetime) -> Want {
        Want { index, lifetime }
    }

    const V1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const V2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    /// VIP → ifindex 3, forever, for every VIP with at least one user.
    fn on3(vips: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, Want> {
        vip_users(vips).into_keys().map(|v| (v, want(3, Lifetime::Forever))).collect()
    }

    #[test]
    fn shared_vip_is_added_once_and_removed_with_its_last_user() {
        let users = vip_users(&[V1, V1, V2]);
        assert_eq!(users[&V1], 2);
        let c = address_changes(&on3(&[V1, V1, V2]), &[]);
        assert_eq!(c.add, vec![(3, V1, Lifetime::Forever), (3, V2, Lifetime::Forever)]);
        let present = [addr(3, V1.octets(), true), addr(3, V2.octets(), true)];
        // One of V1's two services goes: nothing changes.
        let c = address_changes(&on3(&[V1, V2]), &present);
        assert_eq!(c, AddressChanges::default());
        // Its last user goes: removed.
        let c = address_changes(&on3(&[V2]), &present);
        assert_eq!(c.remove, vec![(3, V1, 32)]);
    }

    #[test]
    fn addresses_of_others_are_used_but_never_removed() {
        let present = [addr(3, V1.octets(), false), addr(2, [10, 0, 0, 1], false)];
        let c = address_changes(&on3(&[V1]), &present);
        assert_eq!(c.foreign, vec![V1]);
        assert!(c.add.is_empty() && c.remove.is_empty());
        let c = address_changes(&on3(&[]), &present);
        assert!(c.remove.is_empty(), "not ours: left alone");
    }

    #[test]
    fn our_leftovers_are_removed_and_wanted_ones_adopted() {
        // A previous run left V1 (still wanted) and V2 (not wanted) on the interface, and V1
        // on another interface (the interface changed).
        let present = [addr(3, V1.octets(), true), addr(3, V2.octets(), true), addr(4, V1.octets(), true)];
        let c = address_changes(&on3(&[V1]), &present);
        assert!(c.add.is_empty());
        assert_eq!(c.remove, vec![(3, V2, 32), (4, V1, 32)]);
    }

    #[test]
    fn a_vip_moves_when_its_interface_changes() {
        let present = [addr(3, V1.octets(), true)];
        let c = address_changes(&BTreeMap::from([(V1, want(4, Lifetime::Forever))]), &present);
        assert_eq!((c.add, c.remove), (vec![(4, V1, Lifetime::Forever)], vec![(3, V1, 32)]));
    }

    #[test]
    fn leased_addresses_are_renewed_when_their_lifetime_differs_and_never_touched_when_foreign() {
        let mut leased = addr(3, V1.octets(), true);
        leased.lifetime = Lifetime::Seconds(1);
        // The lease moved on: the kernel's 1 s left becomes 2 s again.
        let c = address_changes(&BTreeMap::from([(V1, want(3, Lifetime::Seconds(2)))]), &[leased]);
        assert_eq!((c.add.len(), c.renew, c.remove.len()), (0, vec![(3, V1, Lifetime::Seconds(2))], 0));
        // Same lifetime: nothing to do.
        let c = address_changes(&BTreeMap::from([(V1, want(3, Lifetime::Seconds(1)))]), &[leased]);
        assert_eq!(c, AddressChanges::default());
        // From leased to permanent (announce mode L2 → None) and back.
        let c = address_changes(&BTreeMap::from([(V1, want(3, Lifetime::Forever))]), &[leased]);
        assert_eq!(c.renew, vec![(3, V1, Lifetime::Forever)]);
        let c = address_changes(&BTreeMap::from([(V1, want(3, Lifetime::Seconds(2)))]), &[addr(3, V1.octets(), true)]);
        assert_eq!(c.renew, vec![(3, V1, Lifetime::Seconds(2))]);
        // Someone else's address is never renewed.
        let c = address_changes(&BTreeMap::from([(V1, want(3, Lifetime::Seconds(2)))]), &[addr(3, V1.octets(), false)]);
        assert_eq!((c.renew.len(), c.foreign), (0, vec![V1]));
    }
}
