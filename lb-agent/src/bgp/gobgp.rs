//! [`Speaker`] on a running `gobgpd`, over its gRPC API on 127.0.0.1.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use tonic::{client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;

use super::{
    PeerSpec, RouteSpec, SpeakerSpec,
    api::{self, method},
    plan::Change,
    speaker::{Session, Speaker, SpeakerError},
};

/// How long one call may take: the daemon answers at once unless it is stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds between attempts to connect to a peer. GoBGP's default (120 s) would leave a
/// router that restarted without this node's routes for two minutes.
const CONNECT_RETRY: u64 = 5;

/// A `gobgpd` reached over gRPC.
#[derive(Clone, Debug)]
pub struct GoBgp {
    grpc: Grpc<Channel>,
}

impl GoBgp {
    /// Connects to the daemon's API on 127.0.0.1:`port`.
    pub async fn connect(port: u16) -> Result<Self, SpeakerError> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .map_err(|e| SpeakerError::Daemon(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .map_err(|e| SpeakerError::Daemon(format!("cannot reach gobgpd's API on 127.0.0.1:{port}: {e}")))?;
        Ok(Self { grpc: Grpc::new(channel) })
    }

    async fn unary<Req, Resp>(&mut self, call: &'static str, req: Req) -> Result<Resp, SpeakerError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc.ready().await.map_err(|e| SpeakerError::Daemon(e.to_string()))?;
        self.grpc
            .unary(tonic::Request::new(req), PathAndQuery::from_static(call), ProstCodec::<Req, Resp>::default())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| SpeakerError::Refused { call, message: s.message().to_string() })
    }

    /// Whether the daemon's speaker is started (it answers AS 0 before `StartBgp`).
    pub async fn started(&mut self) -> Result<bool, SpeakerError> {
        let r: api::GetBgpResponse = self.unary(method::GET_BGP, api::Empty {}).await?;
        Ok(r.global.is_some_and(|g| g.asn != 0))
    }
}

fn graceful_restart(restart_time: u32) -> Option<api::GracefulRestart> {
    (restart_time > 0).then_some(api::GracefulRestart { enabled: true, restart_time })
}

fn peer(address: Ipv4Addr, p: &PeerSpec, restart_time: u32) -> api::Peer {
    api::Peer {
        conf: Some(api::PeerConf {
            auth_password: p.password.clone().unwrap_or_default(),
            description: format!("ballast config {}", p.config),
            local_asn: p.local_asn,
            neighbor_address: address.to_string(),
            peer_asn: p.asn,
        }),
        ebgp_multihop: None,
        state: None,
        timers: Some(api::Timers {
            config: Some(api::TimersConfig {
                connect_retry: CONNECT_RETRY,
                hold_time: u64::from(p.hold_time),
                keepalive_interval: u64::from(p.keepalive_time),
            }),
        }),
        transport: Some(api::Transport { remote_port: u32::from(p.port) }),
        graceful_restart: graceful_restart(restart_time),
        afi_safis: vec![api::AfiSafi {
            mp_graceful_restart: (restart_time > 0)
                .then_some(api::MpGracefulRestart { config: Some(api::MpGracefulRestartConfig { enabled: true }) }),
            config: Some(api::AfiSafiConfig { family: Some(api::IPV4_UNICAST), enabled: true }),
        }],
    }
}

fn path(address: Ipv4Addr, r: &RouteSpec) -> api::Path {
    let attr = api::Attribute { origin: None, next_hop: None, local_pref: None, communities: None };
    let mut pattrs = vec![
        // IGP.
        api::Attribute { origin: Some(api::OriginAttribute { origin: 0 }), ..attr.clone() },
        // 0.0.0.0: each session's own address, so every peer learns this node as next hop.
        api::Attribute { next_hop: Some(api::NextHopAttribute { next_hop: "0.0.0.0".into() }), ..attr.clone() },
    ];
    if let Some(lp) = r.local_pref {
        pattrs.push(api::Attribute { local_pref: Some(api::LocalPrefAttribute { local_pref: lp }), ..attr.clone() });
    }
    if !r.communities.is_empty() {
        pattrs.push(api::Attribute {
            communities: Some(api::CommunitiesAttribute { communities: r.communities.clone() }),
            ..attr
        });
    }
    api::Path {
        nlri: Some(api::Nlri { prefix: Some(api::IpAddressPrefix { prefix_len: 32, prefix: address.to_string() }) }),
        pattrs,
        family: Some(api::IPV4_UNICAST),
    }
}

fn global(s: &SpeakerSpec) -> api::Global {
    api::Global {
        asn: s.asn,
        router_id: s.router_id.to_string(),
        // Sessions are opened from this side only: the node may already run a BGP daemon on
        // port 179 (Calico's BIRD, for one).
        listen_port: -1,
        graceful_restart: graceful_restart(s.restart_time),
    }
}

/// A session state's name.
fn state_name(state: i32) -> &'static str {
    match state {
        1 => "idle",
        2 => "connect",
        3 => "active",
        4 => "opensent",
        5 => "openconfirm",
        6 => "established",
        _ => "unknown",
    }
}

impl GoBgp {
    async fn change(&mut self, change: &Change, restart_time: u32) -> Result<(), SpeakerError> {
        match change {
            Change::Start(s) => {
                let _: api::Empty =
                    self.unary(method::START_BGP, api::StartBgpRequest { global: Some(global(s)) }).await?;
            }
            Change::Stop => {
                let _: api::Empty =
                    self.unary(method::STOP_BGP, api::StopBgpRequest { allow_graceful_restart: false }).await?;
            }
            Change::AddPeer(a, p) => {
                let _: api::Empty =
                    self.unary(method::ADD_PEER, api::PeerRequest { peer: Some(peer(*a, p, restart_time)) }).await?;
            }
            Change::DeletePeer(a) => {
                let _: api::Empty =
                    self.unary(method::DELETE_PEER, api::DeletePeerRequest { address: a.to_string() }).await?;
            }
            Change::Announce(a, r) => {
                let req = api::AddPathRequest { table_type: api::TABLE_GLOBAL, path: Some(path(*a, r)) };
                let _: api::Empty = self.unary(method::ADD_PATH, req).await?;
            }
            Change::Withdraw(a) => {
                let req = api::DeletePathRequest {
                    table_type: api::TABLE_GLOBAL,
                    family: Some(api::IPV4_UNICAST),
                    path: Some(path(*a, &RouteSpec::default())),
                };
                let _: api::Empty = self.unary(method::DELETE_PATH, req).await?;
            }
        }
        Ok(())
    }
}

/// [`GoBgp`] with the graceful-restart time its peers are given (set by `Start`).
#[derive(Clone, Debug)]
pub struct GoBgpSpeaker {
    /// The client.
    pub client: GoBgp,
    restart_time: u32,
}

impl GoBgpSpeaker {
    /// A speaker on `client`.
    pub fn new(client: GoBgp) -> Self {
        Self { client, restart_time: 0 }
    }
}

impl Speaker for GoBgpSpeaker {
    async fn apply(&mut self, change: &Change) -> Result<(), SpeakerError> {
        if let Change::Start(s) = change {
            self.restart_time = s.restart_time;
        }
        self.client.change(change, self.restart_time).await
    }

    async fn sessions(&mut self) -> Result<BTreeMap<Ipv4Addr, Session>, SpeakerError> {
        let c = &mut self.client;
        c.grpc.ready().await.map_err(|e| SpeakerError::Daemon(e.to_string()))?;
        let refused = |s: tonic::Status| SpeakerError::Refused { call: method::LIST_PEER, message: s.message().into() };
        let mut stream = c
            .grpc
            .server_streaming(
                tonic::Request::new(api::ListPeerRequest { address: String::new() }),
                PathAndQuery::from_static(method::LIST_PEER),
                ProstCodec::<api::ListPeerRequest, api::ListPeerResponse>::default(),
            )
            .await
            .map_err(refused)?
            .into_inner();
        let mut out = BTreeMap::new();
        while let Some(r) = stream.message().await.map_err(refused)? {
            let Some(p) = r.peer else { continue };
            let address = p.conf.as_ref().map(|c| c.neighbor_address.as_str()).unwrap_or_default();
            let Ok(address) = address.parse::<Ipv4Addr>() else { continue };
            let st = p.state.unwrap_or_default();
            let up = st.session_state == api::SESSION_ESTABLISHED;
            let mut state = state_name(st.session_state).to_string();
            if !up && !st.disconnect_message.is_empty() {
                state = format!("{state} ({})", st.disconnect_message);
            }
            out.insert(address, Session { up, state });
        }
        Ok(out)
    }
}
