//! Condition types and reasons: enums, written to the API as their CamelCase names and
//! read back by parsing those names, never matched as text.

use std::fmt;

/// The condition types ballast owns on a Service (and mirrors on its LoadBalancer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConditionType {
    /// An address was allocated from a config.
    AddressAllocated,
    /// A node holds the address (L2: its owner; None mode: every eligible node).
    AddressAssigned,
    /// The nodes' data paths serve the ports.
    DataplaneProgrammed,
    /// Every port has a ready endpoint.
    EndpointsReady,
}

impl ConditionType {
    /// Every type, in the order they are written.
    pub const ALL: [Self; 4] =
        [Self::AddressAllocated, Self::AddressAssigned, Self::DataplaneProgrammed, Self::EndpointsReady];

    /// The API name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AddressAllocated => "AddressAllocated",
            Self::AddressAssigned => "AddressAssigned",
            Self::DataplaneProgrammed => "DataplaneProgrammed",
            Self::EndpointsReady => "EndpointsReady",
        }
    }

    /// The type named `s`, if it is one of ballast's.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for ConditionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A condition or Event reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Self] = &[$(Self::$name,)*];

            /// The API name (CamelCase).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // Positive outcomes.
    /// An address was allocated.
    Allocated,
    /// The address is held.
    Assigned,
    /// The data path serves the ports.
    Programmed,
    /// Every port has a ready endpoint.
    EndpointsReady,
    /// A config is valid.
    Valid,
    /// No other config is the default.
    NoConflict,
    // Not ballast's.
    /// Not of type LoadBalancer.
    NotLoadBalancer,
    /// Another loadBalancerClass.
    ClassMismatch,
    // No config.
    /// The annotated config does not exist.
    ConfigNotFound,
    /// No config is the default.
    NoDefaultConfig,
    /// Several configs are the default.
    MultipleDefaultConfigs,
    /// The chosen config is invalid.
    InvalidConfig,
    /// The chosen config's `namespaceSelector` does not select the Service's namespace.
    NamespaceNotSelected,
    /// The config became invalid, ambiguous (a second default) or is being deleted: the
    /// Service keeps the address it has (frozen) and new allocations wait.
    ConfigInvalid,
    // No address.
    /// No free address (or port) in the pool; waits for one.
    PoolExhausted,
    /// The requested address is used by a Service that cannot share it.
    AddressInUse,
    /// The requested address is not in the pool.
    RequestedAddressOutsidePool,
    /// The requested address does not parse.
    InvalidRequestedAddress,
    // Config validity.
    /// The addresses do not parse or leave nothing usable.
    InvalidAddresses,
    /// The port range is empty.
    InvalidPortRange,
    /// The announce node selector is not a valid label selector.
    InvalidNodeSelector,
    /// `backends.deniedCIDRs` has an entry that does not parse.
    InvalidBackendPolicy,
    /// The namespace selector is not a valid label selector.
    InvalidNamespaceSelector,
    /// `announce.bgp` is missing (BGP mode) or has a field out of range.
    InvalidBgp,
    // Waiting on something else.
    /// No address yet (see AddressAllocated).
    NoAddress,
    /// The Service has no TCP or UDP port.
    NoPorts,
    /// A port has no ready endpoint.
    NoReadyEndpoints,
    /// Endpoint addresses that may not be backends (loopback, link-local, a node's or a
    /// pool's own address, a denied range) were left out.
    BackendRefused,
    // Nodes.
    /// No node may hold the address (heartbeats, readiness, selectors, links).
    NoEligibleNode,
    /// A node could not put the address on its interface.
    AssignFailed,
    /// A node could not program its data path.
    ProgrammingFailed,
    // Events only.
    /// An address was allocated.
    AddressAllocated,
    /// An address was released.
    AddressReleased,
    /// The address moved to another node.
    AddressMoved,
}

impl Reason {
    /// The reason named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }

    /// Reasons that wait for something to change rather than for a user to fix something.
    pub const fn is_waiting(self) -> bool {
        matches!(self, Self::PoolExhausted)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
        }
        for t in ConditionType::ALL {
            assert_eq!(ConditionType::parse(t.as_str()), Some(t));
        }
        assert_eq!(Reason::parse("Nope"), None);
        assert_eq!(Reason::PoolExhausted.to_string(), "PoolExhausted");
    }
}
