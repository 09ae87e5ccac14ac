//! What one node must serve: the desired state every source (static file, Kubernetes)
//! produces and the node programmer applies.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::ServiceSpec;

/// How this node holds a VIP on its interface (and so whether it answers ARP for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hold {
    /// Always, with no lifetime: static mode and announce mode `None`.
    Permanent,
    /// As the address's single owner (L2 mode): neighbours are told at once (gratuitous
    /// ARP), and the data path lets ARP requests for it reach the kernel only while the
    /// node's lease lasts, so a node that stops renewing its heartbeat stops answering for
    /// it even when its agent is gone.
    Owner,
    /// Not held: another node owns the address. The data path is still programmed, so
    /// taking over is only adding the address.
    Standby,
    /// Always, unless another host on the segment already answers ARP for it. Static mode
    /// has no cluster to agree with, so it asks the segment before taking an address (and
    /// announces it when it does), and gives a held address up when another host also
    /// holds it and has the lower MAC address.
    Exclusive,
}

/// Everything one node must serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeDesired {
    /// Data-path services (one per VIP, port and protocol).
    pub services: Vec<ServiceSpec>,
    /// How each VIP is held; a VIP missing here is not held ([`Hold::Standby`]).
    pub holds: BTreeMap<Ipv4Addr, Hold>,
}

impl NodeDesired {
    /// Services whose VIPs are all held the same way, without a lease.
    pub fn holding(services: Vec<ServiceSpec>, hold: Hold) -> Self {
        let holds = services.iter().map(|s| (s.vip, hold)).collect();
        Self { services, holds }
    }

    /// Services whose VIPs are all held permanently.
    pub fn permanent(services: Vec<ServiceSpec>) -> Self {
        Self::holding(services, Hold::Permanent)
    }

    /// How `vip` is held.
    pub fn hold(&self, vip: Ipv4Addr) -> Hold {
        self.holds.get(&vip).copied().unwrap_or(Hold::Standby)
    }
}
