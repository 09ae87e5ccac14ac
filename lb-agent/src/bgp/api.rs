//! The part of GoBGP's gRPC API (`api.GoBgpService`, GoBGP v4: `proto/api/*.proto`) the
//! agent calls, as prost messages. Only the fields the agent sets or reads are declared;
//! protobuf skips the others on decoding, and their tags here are GoBGP's, so the two stay
//! wire-compatible. Declared by hand instead of generated from GoBGP's `.proto` files so
//! building the agent needs neither `protoc` nor a copy of them; the tests against a real
//! `gobgpd` check every message used here.

use prost::Message;

/// `StartBgpRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct StartBgpRequest {
    /// The speaker's global settings.
    #[prost(message, optional, tag = "1")]
    pub global: Option<Global>,
}

/// `StartBgpResponse`, `AddPeerResponse`, `DeletePeerResponse`, `DeletePathResponse`,
/// `StopBgpResponse` and `GetBgpRequest`: no field the agent reads.
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

/// `StopBgpRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct StopBgpRequest {
    /// Leave without NOTIFICATION, so peers keep the routes as stale (graceful restart).
    #[prost(bool, tag = "1")]
    pub allow_graceful_restart: bool,
}

/// `GetBgpResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct GetBgpResponse {
    /// The running speaker's settings (AS 0 before `StartBgp`).
    #[prost(message, optional, tag = "1")]
    pub global: Option<Global>,
}

/// `Global`.
#[derive(Clone, PartialEq, Message)]
pub struct Global {
    /// The speaker's AS.
    #[prost(uint32, tag = "1")]
    pub asn: u32,
    /// Its router ID (an IPv4 address).
    #[prost(string, tag = "2")]
    pub router_id: String,
    /// TCP port to accept sessions on; -1 accepts none (the agent connects out).
    #[prost(int32, tag = "3")]
    pub listen_port: i32,
    /// Graceful restart.
    #[prost(message, optional, tag = "10")]
    pub graceful_restart: Option<GracefulRestart>,
}

/// `GracefulRestart`.
#[derive(Clone, PartialEq, Message)]
pub struct GracefulRestart {
    /// Advertise the capability.
    #[prost(bool, tag = "1")]
    pub enabled: bool,
    /// Seconds peers keep this speaker's routes after its session drops without
    /// NOTIFICATION.
    #[prost(uint32, tag = "2")]
    pub restart_time: u32,
}

/// `AddPeerRequest` and `UpdatePeerRequest` (whose field 2, `do_soft_reset_in`, the agent
/// leaves unset).
#[derive(Clone, PartialEq, Message)]
pub struct PeerRequest {
    /// The peer.
    #[prost(message, optional, tag = "1")]
    pub peer: Option<Peer>,
}

/// `DeletePeerRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct DeletePeerRequest {
    /// The peer's address.
    #[prost(string, tag = "1")]
    pub address: String,
}

/// `ListPeerRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct ListPeerRequest {
    /// One peer, or every peer when empty.
    #[prost(string, tag = "1")]
    pub address: String,
}

/// `ListPeerResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct ListPeerResponse {
    /// One peer.
    #[prost(message, optional, tag = "1")]
    pub peer: Option<Peer>,
}

/// `Peer`.
#[derive(Clone, PartialEq, Message)]
pub struct Peer {
    /// What the peer is.
    #[prost(message, optional, tag = "2")]
    pub conf: Option<PeerConf>,
    /// eBGP multihop.
    #[prost(message, optional, tag = "3")]
    pub ebgp_multihop: Option<EbgpMultihop>,
    /// Its session (read only).
    #[prost(message, optional, tag = "5")]
    pub state: Option<PeerState>,
    /// Hold and keepalive times.
    #[prost(message, optional, tag = "6")]
    pub timers: Option<Timers>,
    /// Where to connect.
    #[prost(message, optional, tag = "7")]
    pub transport: Option<Transport>,
    /// Graceful restart towards this peer.
    #[prost(message, optional, tag = "9")]
    pub graceful_restart: Option<GracefulRestart>,
    /// Address families.
    #[prost(message, repeated, tag = "10")]
    pub afi_safis: Vec<AfiSafi>,
}

/// `PeerConf`.
#[derive(Clone, PartialEq, Message)]
pub struct PeerConf {
    /// TCP MD5 password.
    #[prost(string, tag = "1")]
    pub auth_password: String,
    /// Free text (the agent writes the config's name).
    #[prost(string, tag = "2")]
    pub description: String,
    /// This side's AS towards the peer.
    #[prost(uint32, tag = "3")]
    pub local_asn: u32,
    /// The peer's address.
    #[prost(string, tag = "4")]
    pub neighbor_address: String,
    /// The peer's AS.
    #[prost(uint32, tag = "5")]
    pub peer_asn: u32,
}

/// `EbgpMultihop`.
#[derive(Clone, PartialEq, Message)]
pub struct EbgpMultihop {
    /// Allow more than one hop.
    #[prost(bool, tag = "1")]
    pub enabled: bool,
    /// The TTL of the session's packets.
    #[prost(uint32, tag = "2")]
    pub multihop_ttl: u32,
}

/// `PeerState` (read only).
#[derive(Clone, PartialEq, Message)]
pub struct PeerState {
    /// The peer's address.
    #[prost(string, tag = "5")]
    pub neighbor_address: String,
    /// `SessionState`: 6 is established.
    #[prost(int32, tag = "13")]
    pub session_state: i32,
    /// Why the session last went down (`DisconnectReason`).
    #[prost(int32, tag = "21")]
    pub disconnect_reason: i32,
    /// The NOTIFICATION's text, if any.
    #[prost(string, tag = "22")]
    pub disconnect_message: String,
}

/// `PeerState.SessionState` of an established session.
pub const SESSION_ESTABLISHED: i32 = 6;

/// `Timers`.
#[derive(Clone, PartialEq, Message)]
pub struct Timers {
    /// The configured times.
    #[prost(message, optional, tag = "1")]
    pub config: Option<TimersConfig>,
}

/// `TimersConfig` (seconds).
#[derive(Clone, PartialEq, Message)]
pub struct TimersConfig {
    /// Seconds between connection attempts.
    #[prost(uint64, tag = "1")]
    pub connect_retry: u64,
    /// Hold time.
    #[prost(uint64, tag = "2")]
    pub hold_time: u64,
    /// Keepalive interval.
    #[prost(uint64, tag = "3")]
    pub keepalive_interval: u64,
}

/// `Transport`.
#[derive(Clone, PartialEq, Message)]
pub struct Transport {
    /// The peer's TCP port (default 179).
    #[prost(uint32, tag = "6")]
    pub remote_port: u32,
}

/// `AfiSafi`.
#[derive(Clone, PartialEq, Message)]
pub struct AfiSafi {
    /// Graceful restart for this family.
    #[prost(message, optional, tag = "1")]
    pub mp_graceful_restart: Option<MpGracefulRestart>,
    /// The family.
    #[prost(message, optional, tag = "2")]
    pub config: Option<AfiSafiConfig>,
}

/// `MpGracefulRestart`.
#[derive(Clone, PartialEq, Message)]
pub struct MpGracefulRestart {
    /// Its config.
    #[prost(message, optional, tag = "1")]
    pub config: Option<MpGracefulRestartConfig>,
}

/// `MpGracefulRestartConfig`.
#[derive(Clone, PartialEq, Message)]
pub struct MpGracefulRestartConfig {
    /// On.
    #[prost(bool, tag = "1")]
    pub enabled: bool,
}

/// `AfiSafiConfig`.
#[derive(Clone, PartialEq, Message)]
pub struct AfiSafiConfig {
    /// The family.
    #[prost(message, optional, tag = "1")]
    pub family: Option<Family>,
    /// On.
    #[prost(bool, tag = "2")]
    pub enabled: bool,
}

/// `Family`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Family {
    /// `Afi`: 1 is IPv4.
    #[prost(int32, tag = "1")]
    pub afi: i32,
    /// `Safi`: 1 is unicast.
    #[prost(int32, tag = "2")]
    pub safi: i32,
}

/// IPv4 unicast, the only family the agent announces.
pub const IPV4_UNICAST: Family = Family { afi: 1, safi: 1 };

/// `TableType` of the global RIB.
pub const TABLE_GLOBAL: i32 = 1;

/// `AddPathRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct AddPathRequest {
    /// `TableType`: [`TABLE_GLOBAL`].
    #[prost(int32, tag = "1")]
    pub table_type: i32,
    /// The route.
    #[prost(message, optional, tag = "3")]
    pub path: Option<Path>,
}

/// `DeletePathRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct DeletePathRequest {
    /// `TableType`: [`TABLE_GLOBAL`].
    #[prost(int32, tag = "1")]
    pub table_type: i32,
    /// The family.
    #[prost(message, optional, tag = "3")]
    pub family: Option<Family>,
    /// The route.
    #[prost(message, optional, tag = "4")]
    pub path: Option<Path>,
}

/// `Path`.
#[derive(Clone, PartialEq, Message)]
pub struct Path {
    /// The prefix.
    #[prost(message, optional, tag = "1")]
    pub nlri: Option<Nlri>,
    /// Path attributes.
    #[prost(message, repeated, tag = "2")]
    pub pattrs: Vec<Attribute>,
    /// The family.
    #[prost(message, optional, tag = "9")]
    pub family: Option<Family>,
}

/// `NLRI`, of which the agent uses the plain prefix.
#[derive(Clone, PartialEq, Message)]
pub struct Nlri {
    /// An IPv4 or IPv6 prefix.
    #[prost(message, optional, tag = "1")]
    pub prefix: Option<IpAddressPrefix>,
}

/// `IPAddressPrefix`.
#[derive(Clone, PartialEq, Message)]
pub struct IpAddressPrefix {
    /// Prefix length.
    #[prost(uint32, tag = "1")]
    pub prefix_len: u32,
    /// The address.
    #[prost(string, tag = "2")]
    pub prefix: String,
}

/// `Attribute`: a oneof, of which the agent sets one member per attribute.
#[derive(Clone, PartialEq, Message)]
pub struct Attribute {
    /// `ORIGIN`.
    #[prost(message, optional, tag = "2")]
    pub origin: Option<OriginAttribute>,
    /// `NEXT_HOP`.
    #[prost(message, optional, tag = "4")]
    pub next_hop: Option<NextHopAttribute>,
    /// `LOCAL_PREF`.
    #[prost(message, optional, tag = "6")]
    pub local_pref: Option<LocalPrefAttribute>,
    /// `COMMUNITIES`.
    #[prost(message, optional, tag = "9")]
    pub communities: Option<CommunitiesAttribute>,
}

/// `OriginAttribute`.
#[derive(Clone, PartialEq, Message)]
pub struct OriginAttribute {
    /// 0 is IGP.
    #[prost(uint32, tag = "1")]
    pub origin: u32,
}

/// `NextHopAttribute`.
#[derive(Clone, PartialEq, Message)]
pub struct NextHopAttribute {
    /// The next hop (`0.0.0.0`: the session's own address towards each peer).
    #[prost(string, tag = "1")]
    pub next_hop: String,
}

/// `LocalPrefAttribute`.
#[derive(Clone, PartialEq, Message)]
pub struct LocalPrefAttribute {
    /// LOCAL_PREF (iBGP).
    #[prost(uint32, tag = "1")]
    pub local_pref: u32,
}

/// `CommunitiesAttribute`.
#[derive(Clone, PartialEq, Message)]
pub struct CommunitiesAttribute {
    /// Each `AS:value` as `AS << 16 | value`.
    #[prost(uint32, repeated, tag = "1")]
    pub communities: Vec<u32>,
}

/// gRPC method paths of `api.GoBgpService`.
pub mod method {
    /// StartBgp.
    pub const START_BGP: &str = "/api.GoBgpService/StartBgp";
    /// StopBgp.
    pub const STOP_BGP: &str = "/api.GoBgpService/StopBgp";
    /// GetBgp.
    pub const GET_BGP: &str = "/api.GoBgpService/GetBgp";
    /// AddPeer.
    pub const ADD_PEER: &str = "/api.GoBgpService/AddPeer";
    /// UpdatePeer.
    pub const UPDATE_PEER: &str = "/api.GoBgpService/UpdatePeer";
    /// DeletePeer.
    pub const DELETE_PEER: &str = "/api.GoBgpService/DeletePeer";
    /// ListPeer (server streaming).
    pub const LIST_PEER: &str = "/api.GoBgpService/ListPeer";
    /// AddPath.
    pub const ADD_PATH: &str = "/api.GoBgpService/AddPath";
    /// DeletePath.
    pub const DELETE_PATH: &str = "/api.GoBgpService/DeletePath";
}
