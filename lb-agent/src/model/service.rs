//! A load-balanced service.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{proto, service::ServiceKey};
use serde::{Deserialize, Serialize};

use super::ServiceId;

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    /// The protocol a Kubernetes API value (`TCP`, `UDP`) names, if the data path serves it.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }

    /// The protocol with IP protocol number `n`, if the data path serves it.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// One backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSpec {
    /// Where flows are sent.
    pub addr: SocketAddrV4,
    /// The backend is terminating: its established flows continue, it takes no new ones.
    pub terminating: bool,
}

impl BackendSpec {
    /// A backend that takes new flows.
    pub const fn active(addr: SocketAddrV4) -> Self {
        Self { addr, terminating: false }
    }
}

/// A service: one VIP port and its ordered backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Which service this is (unique).
    pub id: ServiceId,
    /// Virtual IP clients connect to.
    pub vip: Ipv4Addr,
    /// Port clients connect to.
    pub port: u16,
    /// Protocol of the port.
    pub protocol: Protocol,
    /// Backends in round-robin order.
    pub backends: Vec<BackendSpec>,
    /// Interface that holds the VIP; `None` means the agent's `--interface`.
    pub interface: Option<String>,
}

impl ServiceSpec {
    /// The data path's key for this service.
    pub const fn key(&self) -> ServiceKey {
        ServiceKey { vip: self.vip.octets(), port: self.port, proto: self.protocol.number(), _pad: 0 }
    }
}
