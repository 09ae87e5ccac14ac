//! Loading the kernel object with pinned maps, and attaching its programs to interfaces.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo, NodeLease},
    backend::Backend,
    config::{self, DataplaneConfig},
    cpu::CpuState,
    flow::{FlowKey, FlowValue},
    hop::{BackendHop, RouteEpoch},
    map_names, program_names,
    service::{RoundRobin, ServiceKey, ServiceValue, Slot, SlotKey},
    stats::ServiceStats,
};
use tracing::{info, warn};

use super::maps::{Maps, MapsError, nr_cpus};

/// Capacity of each map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Service ids (rows of `stats` and `rr`; entries of `services`).
    pub services: u32,
    /// Entries of `slots` (backend set positions; two sets per service).
    pub slots: u32,
    /// Backend ids.
    pub backends: u32,
    /// Entries of the table of confirmed flows (two per flow).
    pub flow_entries: u32,
    /// Entries of the half-open table (two per flow).
    pub half_open_entries: u32,
    /// Owned addresses.
    pub addrs: u32,
    /// Interfaces.
    pub ifaces: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: config::MAX_SERVICES,
            slots: config::MAX_SLOTS,
            backends: config::MAX_BACKENDS,
            flow_entries: config::MAX_FLOW_ENTRIES,
            half_open_entries: config::MAX_HALF_OPEN_ENTRIES,
            addrs: config::MAX_ADDRS,
            ifaces: config::MAX_IFACES,
        }
    }
}

/// How to attach XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode if the driver refuses.
    Auto,
    /// Native mode only.
    Native,
    /// Generic mode only.
    Skb,
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory the maps are pinned in.
    pub pin_dir: PathBuf,
    /// Map capacities.
    pub sizes: MapSizes,
    /// Data path settings.
    pub config: DataplaneConfig,
    /// Kernel-side log level (aya-log: 0 off, 1 error … 5 trace). It is read-only data,
    /// so with 0 the verifier removes every log call.
    pub kernel_log: u8,
}

/// Reads the kernel program's log records and hands them to the `log` facade (which
/// `tracing` picks up).
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Why the data path could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The pin directory is not on a bpf filesystem.
    #[error("{0} is not on a bpf filesystem; mount one first (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    /// The pin directory could not be created or inspected.
    #[error("cannot use pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel log reader could not be set up.
    #[error("cannot read the kernel program's log: {0}")]
    KernelLog(String),
    /// The object could not be loaded (includes verifier rejections).
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        source: ProgramError,
    },
    /// XDP could not be attached to an interface.
    #[error("cannot attach XDP to {iface} ({mode}): {source}")]
    AttachXdp {
        /// Interface.
        iface: String,
        /// Mode tried last.
        mode: &'static str,
        /// Cause.
        source: ProgramError,
    },
    /// TC could not be attached to an interface.
    #[error("cannot attach the TC companion to {iface}: {source}")]
    AttachTc {
        /// Interface.
        iface: String,
        /// Cause.
        source: ProgramError,
    },
    /// A link could not be reused.
    #[error("link {path}: {source}")]
    Link {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        source: LinkError,
    },
    /// A link could not be pinned.
    #[error("cannot pin link at {path}: {source}")]
    PinLink {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        source: aya::pin::PinError,
    },
    /// The pinned maps could not be opened.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Directory of the pinned links.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn link_path(pin_dir: &Path, kind: &str, iface: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{kind}-{iface}"))
}

/// Programs attached to one interface, through links pinned under `<pin_dir>/links`: the
/// pins keep the programs attached while no agent runs, and the next agent replaces the
/// programs in those links atomically (`bpf_link_update`).
struct Attachment {
    name: String,
    /// `None` on interfaces towards local pods ([`Hooks::TcOnly`]).
    xdp: Option<PinnedLink>,
    tc: PinnedLink,
}

/// Which programs an interface gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    /// XDP (the data path) and the TC companion: client-facing interfaces and interfaces
    /// towards backends elsewhere.
    XdpAndTc,
    /// Only TC: interfaces towards pods on this node (`IFACE_TC_PATH`), whose packets XDP
    /// cannot translate correctly.
    TcOnly,
}

/// How an attach went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Already attached by this process.
    Already,
    /// A pinned link from a previous agent now runs this program (atomic replacement).
    Replaced,
    /// Newly attached in this XDP mode.
    New(&'static str),
}

/// A loaded data path: programs (attached to zero or more interfaces) and pinned maps.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The maps, opened from their pins.
    pub maps: Maps,
    pin_dir: PathBuf,
    attached: BTreeMap<u32, Attachment>,
    last_mode: &'static str,
    kernel_logger: Option<KernelLogger>,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lives on a bpf filesystem.
fn on_bpffs(path: &Path) -> Result<bool, std::io::Error> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Shape of each map as created from `sizes`: (name, type, key size, value size, max
/// entries).
fn expected_shapes(sizes: &MapSizes) -> [(&'static str, MapType, usize, usize, u32); 14] {
    use std::mem::size_of;
    let cpus = nr_cpus() as u32;
    // Per-CPU LRU lists make the kernel round the capacity up to a multiple of the CPUs.
    let half_open = sizes.half_open_entries.div_ceil(cpus) * cpus;
    let flow = (size_of::<FlowKey>(), size_of::<FlowValue>());
    [
        (map_names::SERVICES, MapType::Hash, size_of::<ServiceKey>(), size_of::<ServiceValue>(), sizes.services),
        (map_names::SLOTS, MapType::Hash, size_of::<SlotKey>(), size_of::<Slot>(), sizes.slots),
        (map_names::BACKENDS, MapType::Array, 4, size_of::<Backend>(), sizes.backends),
        (map_names::FLOWS, MapType::Hash, flow.0, flow.1, sizes.flow_entries),
        (map_names::HALF_OPEN, MapType::LruHash, flow.0, flow.1, half_open),
        (map_names::ADDRS, MapType::Hash, size_of::<AddrKey>(), size_of::<AddrInfo>(), sizes.addrs),
        (map_names::IFACES, MapType::Hash, 4, size_of::<IfaceInfo>(), sizes.ifaces),
        (map_names::STATS, MapType::PerCpuArray, 4, size_of::<ServiceStats>(), sizes.services + 1),
        (map_names::RR, MapType::PerCpuArray, 4, size_of::<RoundRobin>(), sizes.services),
        (map_names::LEASE, MapType::Array, 4, size_of::<NodeLease>(), 1),
        (map_names::CPU_STATE, MapType::PerCpuArray, 4, size_of::<CpuState>(), 1),
        (map_names::NEXT_HOPS, MapType::Array, 4, size_of::<BackendHop>(), sizes.backends),
        (map_names::ROUTE_EPOCH, MapType::Array, 4, size_of::<RouteEpoch>(), 1),
        // Its values are inner maps' ids.
        (map_names::READER_FENCE, MapType::ArrayOfMaps, 4, 4, 1),
    ]
}

/// Removes pinned maps whose shape differs from what this build creates (an upgrade that
/// changed a layout or a map's type, or different sizes): reusing them would break the
/// program. Flows and counters in them are lost, which is logged.
fn drop_incompatible_pins(dir: &Path, sizes: &MapSizes) -> Result<(), LoadError> {
    for (name, kind, key, value, max) in expected_shapes(sizes) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let fits = match MapInfo::from_pin(&path) {
            Ok(info) => {
                info.map_type().is_ok_and(|t| t == kind)
                    && info.key_size() as usize == key
                    && info.value_size() as usize == value
                    && info.max_entries() == max
            }
            Err(_) => false,
        };
        if !fits {
            warn!(map = name, path = %path.display(), "pinned map has a different type, layout or size; recreating it (its entries are lost)");
            std::fs::remove_file(&path).map_err(|source| LoadError::PinDir { path: path.clone(), source })?;
        }
    }
    Ok(())
}

impl Dataplane {
    /// Loads the kernel object, reusing compatible maps pinned in `opts.pin_dir` (so flows
    /// survive an agent restart) and pinning new ones there.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        let dir = &opts.pin_dir;
        let parent = dir.parent().unwrap_or(dir);
        let probe = if dir.exists() { dir.as_path() } else { parent };
        match on_bpffs(probe) {
            Ok(true) => {}
            Ok(false) => return Err(LoadError::NotBpffs(probe.to_path_buf())),
            Err(source) => {
                return Err(LoadError::PinDir { path: probe.to_path_buf(), source });
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir { path: dir.clone(), source })?;
        drop_incompatible_pins(dir, &opts.sizes)?;

        let mut cfg = opts.config;
        cfg.global_stats_index = opts.sizes.services;
        cfg.cpus = nr_cpus() as u32;
        let s = opts.sizes;
        let pins: Vec<(&'static str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map_names::SERVICES, s.services)
            .map_max_entries(map_names::SLOTS, s.slots)
            .map_max_entries(map_names::BACKENDS, s.backends)
            .map_max_entries(map_names::NEXT_HOPS, s.backends)
            .map_max_entries(map_names::FLOWS, s.flow_entries)
            .map_max_entries(map_names::HALF_OPEN, s.half_open_entries)
            .map_max_entries(map_names::ADDRS, s.addrs)
            .map_max_entries(map_names::IFACES, s.ifaces)
            .map_max_entries(map_names::STATS, s.services + 1)
            .map_max_entries(map_names::RR, s.services)
            .override_global("CONFIG", &cfg, true)
            .override_global("AYA_LOG_LEVEL", &opts.kernel_log, true);
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let kernel_logger = if opts.kernel_log > 0 {
            Some(aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| LoadError::KernelLog(e.to_string()))?)
        } else {
            None
        };

        let xdp: &mut Xdp = program(&mut ebpf, program_names::XDP)?;
        load_retrying(|| xdp.load()).map_err(|source| LoadError::Program { name: program_names::XDP, source })?;
        let tc: &mut SchedClassifier = program(&mut ebpf, program_names::TC)?;
        load_retrying(|| tc.load()).map_err(|source| LoadError::Program { name: program_names::TC, source })?;

        let maps = Maps::open(dir)?;
        info!(pin_dir = %dir.display(), "data path loaded");
        Ok(Self { ebpf, maps, pin_dir: dir.clone(), attached: BTreeMap::new(), last_mode: "native", kernel_logger })
    }

    /// The reader of the kernel program's log, when it was loaded with logging on.
    pub fn take_kernel_logger(&mut self) -> Option<KernelLogger> {
        self.kernel_logger.take()
    }

    /// The bpffs directory holding the maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches XDP (and the TC ingress companion) to an interface. A link pinned by a
    /// previous agent is reused: the new programs replace the old ones atomically, so no
    /// packet goes unprocessed across a restart or upgrade.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpAttachMode,
        hooks: Hooks,
    ) -> Result<Attached, LoadError> {
        if self.attached.contains_key(&ifindex) {
            return Ok(Attached::Already);
        }
        std::fs::create_dir_all(links_dir(&self.pin_dir))
            .map_err(|source| LoadError::PinDir { path: links_dir(&self.pin_dir), source })?;
        let xdp_path = link_path(&self.pin_dir, "xdp", iface);
        let tc_path = link_path(&self.pin_dir, "tc", iface);

        let (xdp, replaced) = match hooks {
            Hooks::XdpAndTc => match self.replace_xdp(&xdp_path)? {
                Some(p) => (Some(p), true),
                None => (Some(self.attach_xdp(iface, ifindex, mode, &xdp_path)?), false),
            },
            Hooks::TcOnly => {
                // An XDP link pinned by an earlier configuration must not stay behind.
                if let Some(old) = open_pinned(&xdp_path)? {
                    drop(old);
                    let _ = std::fs::remove_file(&xdp_path);
                }
                (None, false)
            }
        };
        let tc = match self.replace_tc(&tc_path)? {
            Some(p) => p,
            None => match self.attach_tc(iface, &tc_path) {
                Ok(p) => p,
                Err(e) => {
                    if let Some(x) = xdp {
                        let _ = x.unpin();
                    }
                    return Err(e);
                }
            },
        };
        let how = if replaced { Attached::Replaced } else { Attached::New(self.last_mode) };
        match how {
            Attached::Replaced => info!(iface, ifindex, "replaced the programs in the pinned links atomically"),
            _ if hooks == Hooks::TcOnly => {
                info!(iface, ifindex, "attached TC ingress only: interface towards local pods (link pinned)")
            }
            _ => info!(iface, ifindex, xdp_mode = self.last_mode, "attached XDP and TC ingress (links pinned)"),
        }
        self.attached.insert(ifindex, Attachment { name: iface.into(), xdp, tc });
        Ok(how)
    }

    /// Reuses a pinned XDP link: `Some` if it existed and now runs this program.
    fn replace_xdp(&mut self, path: &Path) -> Result<Option<PinnedLink>, LoadError> {
        let Some(fd) = open_pinned(path)? else { return Ok(None) };
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::XDP)?;
        let link = XdpLink::try_from(fd).map_err(|source| LoadError::Link { path: path.into(), source })?;
        match xdp.attach_to_link(link) {
            Ok(id) => {
                let link =
                    xdp.take_link(id).map_err(|source| LoadError::Program { name: program_names::XDP, source })?;
                // The pin stays in place; keep a handle to it.
                drop(link);
                Ok(Some(PinnedLink::from_pin(path).map_err(|source| LoadError::Link { path: path.into(), source })?))
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "pinned XDP link is unusable (interface recreated?); attaching anew");
                let _ = std::fs::remove_file(path);
                Ok(None)
            }
        }
    }

    /// Reuses a pinned TCX link.
    fn replace_tc(&mut self, path: &Path) -> Result<Option<PinnedLink>, LoadError> {
        let Some(fd) = open_pinned(path)? else { return Ok(None) };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::TC)?;
        let link = SchedClassifierLink::try_from(fd).map_err(|source| LoadError::Link { path: path.into(), source })?;
        match tc.attach_to_link(link) {
            Ok(id) => {
                drop(tc.take_link(id).map_err(|source| LoadError::Program { name: program_names::TC, source })?);
                Ok(Some(PinnedLink::from_pin(path).map_err(|source| LoadError::Link { path: path.into(), source })?))
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "pinned TC link is unusable; attaching anew");
                let _ = std::fs::remove_file(path);
                Ok(None)
            }
        }
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpAttachMode,
        path: &Path,
    ) -> Result<PinnedLink, LoadError> {
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::XDP)?;
        let attempts: &[(XdpMode, &'static str)] = match mode {
            XdpAttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
            XdpAttachMode::Native => &[(XdpMode::Driver, "native")],
            XdpAttachMode::Skb => &[(XdpMode::Skb, "skb")],
        };
        let mut last = None;
        for (m, label) in attempts {
            match xdp.attach_to_if_index(ifindex, *m) {
                Ok(id) => {
                    let link =
                        xdp.take_link(id).map_err(|source| LoadError::Program { name: program_names::XDP, source })?;
                    let fd = FdLink::try_from(link).map_err(|source| LoadError::Link { path: path.into(), source })?;
                    let pinned = fd.pin(path).map_err(|source| LoadError::PinLink { path: path.into(), source })?;
                    self.last_mode = label;
                    return Ok(pinned);
                }
                Err(e) => {
                    if attempts.len() > 1 {
                        warn!(iface, mode = label, error = %e, "XDP attach failed; trying the next mode");
                    }
                    last = Some((e, *label));
                }
            }
        }
        match last {
            Some((source, mode)) => Err(LoadError::AttachXdp { iface: iface.into(), mode, source }),
            None => Err(LoadError::AttachXdp { iface: iface.into(), mode: "none", source: ProgramError::NotAttached }),
        }
    }

    fn attach_tc(&mut self, iface: &str, path: &Path) -> Result<PinnedLink, LoadError> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::TC)?;
        let id = tc
            .attach(iface, TcAttachType::Ingress)
            .map_err(|source| LoadError::AttachTc { iface: iface.into(), source })?;
        let link = tc.take_link(id).map_err(|source| LoadError::AttachTc { iface: iface.into(), source })?;
        let fd = FdLink::try_from(link).map_err(|source| LoadError::Link { path: path.into(), source })?;
        fd.pin(path).map_err(|source| LoadError::PinLink { path: path.into(), source })
    }

    /// Interfaces the programs are attached to (ifindex → name).
    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Whether the XDP program is among what this agent attached to `ifindex`.
    pub fn has_xdp(&self, ifindex: u32) -> bool {
        self.attached.get(&ifindex).is_some_and(|a| a.xdp.is_some())
    }

    /// Detaches from every interface (unpins the links). Maps stay pinned.
    pub fn detach_all(&mut self) {
        for (_, a) in std::mem::take(&mut self.attached) {
            for (kind, link) in [("XDP", a.xdp), ("TC", Some(a.tc))] {
                let Some(link) = link else { continue };
                match link.unpin() {
                    // Dropping the last reference destroys the link: the program detaches.
                    Ok(fd) => drop(fd),
                    Err(e) => warn!(iface = a.name, kind, error = %e, "cannot unpin link"),
                }
            }
            info!(iface = a.name, "detached");
        }
    }

    /// Forgets an attachment whose interface lost its program (interface recreated, link
    /// detached by hand), so the next [`Self::attach`] attaches anew.
    pub fn forget(&mut self, ifindex: u32) {
        if let Some(a) = self.attached.remove(&ifindex) {
            for link in [a.xdp, Some(a.tc)].into_iter().flatten() {
                let _ = link.unpin();
            }
        }
    }

    /// Leaves the programs attached (their links stay pinned) for the next agent.
    pub fn keep_attached(&mut self) {
        for (_, a) in std::mem::take(&mut self.attached) {
            info!(iface = a.name, "leaving XDP and TC attached for the next agent");
        }
    }

    /// The XDP program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn xdp(&mut self) -> Result<&mut Xdp, LoadError> {
        program(&mut self.ebpf, program_names::XDP)
    }

    /// The XDP_PASS baseline program, loaded on first use (benchmarks only).
    pub fn baseline(&mut self) -> Result<&mut Xdp, LoadError> {
        let p: &mut Xdp = program(&mut self.ebpf, program_names::BASELINE)?;
        if p.fd().is_err() {
            p.load().map_err(|source| LoadError::Program { name: program_names::BASELINE, source })?;
        }
        Ok(p)
    }

    /// The TC program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        program(&mut self.ebpf, program_names::TC)
    }
}

/// The link pinned at `path`, if any.
/// Runs a program load, again up to four times when the verifier was interrupted: it
/// gives up with `EAGAIN` when a signal is pending for the loading thread (a child exiting
/// is enough), and libbpf retries the same way.
fn load_retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let interrupted = |e: &ProgramError| matches!(e, ProgramError::LoadError { io_error, .. } if io_error.raw_os_error() == Some(libc::EAGAIN));
    let mut tries = 1;
    loop {
        match load() {
            Err(e) if interrupted(&e) && tries < 5 => {
                warn!(try_ = tries, "program load interrupted (EAGAIN); trying again");
                tries += 1;
            }
            other => return other,
        }
    }
}

fn open_pinned(path: &Path) -> Result<Option<FdLink>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(path)
        .map(|p| Some(FdLink::from(p)))
        .map_err(|source| LoadError::Link { path: path.into(), source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::Program { name, source: ProgramError::NotLoaded })?;
    p.try_into().map_err(|source| LoadError::Program { name, source })
}
