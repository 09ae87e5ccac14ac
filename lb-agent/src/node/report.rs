//! What applying a [`crate::model::NodeDesired`] did, and why a service is not (fully)
//! served on this node.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::io::IoError;
use crate::{dataplane::plan::PlanError, model::ServiceId};

/// Why one service is not (fully) served on this node. Everything else is served
/// regardless.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeFailure {
    /// The interface that should hold the VIP does not exist here.
    #[error("interface {interface:?} does not exist")]
    NoSuchInterface {
        /// Its name.
        interface: String,
    },
    /// Another service already holds the same VIP on another interface.
    #[error("VIP {vip} is already held on another interface than {interface}")]
    VipOnOtherInterface {
        /// The VIP.
        vip: Ipv4Addr,
        /// The interface this service wanted.
        interface: String,
    },
    /// The programs could not be attached to the interface.
    #[error("cannot attach to {interface}: {error}")]
    AttachFailed {
        /// The interface.
        interface: String,
        /// What the kernel said.
        error: String,
    },
    /// The VIP could not be put on the interface.
    #[error("cannot add {vip} to {interface}: {error}")]
    AddressFailed {
        /// The VIP.
        vip: Ipv4Addr,
        /// The interface.
        interface: String,
        /// What the kernel said.
        error: String,
    },
    /// Another host on the segment already answers ARP for the VIP (static mode).
    #[error(
        "{vip} is already answered on {interface} by {mac}: another host holds it (static mode holds an address on one node only)"
    )]
    AddressConflict {
        /// The VIP.
        vip: Ipv4Addr,
        /// The interface.
        interface: String,
        /// The other host's MAC address (`aa:bb:…`).
        mac: String,
    },
    /// The maps cannot take the service (ids exhausted).
    #[error(transparent)]
    Maps(PlanError),
}

impl NodeFailure {
    /// Whether the failure is about holding the address rather than the data path.
    pub fn is_address(&self) -> bool {
        matches!(self, Self::AddressFailed { .. } | Self::AddressConflict { .. })
    }
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Map operations applied.
    pub map_ops: usize,
    /// VIPs added to an interface.
    pub added: Vec<Ipv4Addr>,
    /// VIPs removed from an interface.
    pub removed: Vec<Ipv4Addr>,
    /// VIPs announced (gratuitous ARP) because this node took them.
    pub announced: Vec<Ipv4Addr>,
    /// Services not (fully) served, with the reason.
    pub failed: BTreeMap<ServiceId, NodeFailure>,
    /// Node-wide failures (a map write, a netlink call): the rest of the pass went on, and
    /// the pass should be retried soon.
    pub errors: Vec<IoError>,
    /// Things worth an operator's attention that did not stop anything.
    pub warnings: Vec<String>,
}

impl NodeFailure {
    /// Whether only a change can end it: to the services asked for or to the interfaces
    /// (both make the next pass whole). The others (an address refused, an attachment, a
    /// conflict on the segment, the maps) are tried again by every pass.
    pub fn waits_for_a_change(&self) -> bool {
        matches!(self, Self::NoSuchInterface { .. } | Self::VipOnOtherInterface { .. })
    }
}

impl ApplyReport {
    /// Whether anything changed on the node.
    pub fn changed(&self) -> bool {
        self.map_ops > 0 || !self.added.is_empty() || !self.removed.is_empty()
    }
}
