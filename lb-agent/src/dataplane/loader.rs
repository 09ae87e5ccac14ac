//! Loading the kernel object with pinned maps, and attaching its programs to interfaces.

use std::{
    collections::BTreeMap,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapInfo,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo},
    backend::Backend,
    config::{self, DataplaneConfig},
    flow::{FlowKey, FlowValue},
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
    /// Flow table entries (two per flow).
    pub flow_entries: u32,
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
}

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
    /// The pinned maps could not be opened.
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Programs attached to one interface.
struct Attachment {
    name: String,
    xdp: XdpLinkId,
    tc: SchedClassifierLinkId,
}

/// A loaded data path: programs (attached to zero or more interfaces) and pinned maps.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The maps, opened from their pins.
    pub maps: Maps,
    pin_dir: PathBuf,
    attached: BTreeMap<u32, Attachment>,
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

/// Shape of each map as created from `sizes`: (name, key size, value size, max entries).
fn expected_shapes(sizes: &MapSizes) -> [(&'static str, usize, usize, u32); 8] {
    use std::mem::size_of;
    let cpus = nr_cpus() as u32;
    // Per-CPU LRU lists make the kernel round the capacity up to a multiple of the CPUs.
    let flows = sizes.flow_entries.div_ceil(cpus) * cpus;
    [
        (
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            sizes.services,
        ),
        (
            map_names::SLOTS,
            size_of::<SlotKey>(),
            size_of::<Slot>(),
            sizes.slots,
        ),
        (map_names::BACKENDS, 4, size_of::<Backend>(), sizes.backends),
        (
            map_names::FLOWS,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            flows,
        ),
        (
            map_names::ADDRS,
            size_of::<AddrKey>(),
            size_of::<AddrInfo>(),
            sizes.addrs,
        ),
        (map_names::IFACES, 4, size_of::<IfaceInfo>(), sizes.ifaces),
        (
            map_names::STATS,
            4,
            size_of::<ServiceStats>(),
            sizes.services + 1,
        ),
        (map_names::RR, 4, size_of::<RoundRobin>(), sizes.services),
    ]
}

/// Removes pinned maps whose shape differs from what this build creates (an upgrade that
/// changed a layout, or different sizes): reusing them would break the program. Flows and
/// counters in them are lost, which is logged.
fn drop_incompatible_pins(dir: &Path, sizes: &MapSizes) -> Result<(), LoadError> {
    for (name, key, value, max) in expected_shapes(sizes) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let fits = match MapInfo::from_pin(&path) {
            Ok(info) => {
                info.key_size() as usize == key
                    && info.value_size() as usize == value
                    && info.max_entries() == max
            }
            Err(_) => false,
        };
        if !fits {
            warn!(map = name, path = %path.display(), "pinned map has a different layout or size; recreating it (its entries are lost)");
            std::fs::remove_file(&path).map_err(|source| LoadError::PinDir {
                path: path.clone(),
                source,
            })?;
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
                return Err(LoadError::PinDir {
                    path: probe.to_path_buf(),
                    source,
                });
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
            path: dir.clone(),
            source,
        })?;
        drop_incompatible_pins(dir, &opts.sizes)?;

        let mut cfg = opts.config;
        cfg.global_stats_index = opts.sizes.services;
        let s = opts.sizes;
        let pins: Vec<(&'static str, PathBuf)> =
            map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map_names::SERVICES, s.services)
            .map_max_entries(map_names::SLOTS, s.slots)
            .map_max_entries(map_names::BACKENDS, s.backends)
            .map_max_entries(map_names::FLOWS, s.flow_entries)
            .map_max_entries(map_names::ADDRS, s.addrs)
            .map_max_entries(map_names::IFACES, s.ifaces)
            .map_max_entries(map_names::STATS, s.services + 1)
            .map_max_entries(map_names::RR, s.services)
            .override_global("CONFIG", &cfg, true);
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;

        let xdp: &mut Xdp = program(&mut ebpf, program_names::XDP)?;
        xdp.load().map_err(|source| LoadError::Program {
            name: program_names::XDP,
            source,
        })?;
        let tc: &mut SchedClassifier = program(&mut ebpf, program_names::TC)?;
        tc.load().map_err(|source| LoadError::Program {
            name: program_names::TC,
            source,
        })?;

        let maps = Maps::open(dir)?;
        info!(pin_dir = %dir.display(), "data path loaded");
        Ok(Self {
            ebpf,
            maps,
            pin_dir: dir.clone(),
            attached: BTreeMap::new(),
        })
    }

    /// The bpffs directory holding the maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches XDP (and the TC ingress companion) to an interface. Returns the XDP mode
    /// in use. Attaching twice is a no-op.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpAttachMode,
    ) -> Result<&'static str, LoadError> {
        if self.attached.contains_key(&ifindex) {
            return Ok("already attached");
        }
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::XDP)?;
        let attempts: &[(XdpMode, &'static str)] = match mode {
            XdpAttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
            XdpAttachMode::Native => &[(XdpMode::Driver, "native")],
            XdpAttachMode::Skb => &[(XdpMode::Skb, "skb")],
        };
        let mut last = None;
        let mut used = None;
        for (m, label) in attempts {
            match xdp.attach_to_if_index(ifindex, *m) {
                Ok(link) => {
                    used = Some((link, *label));
                    break;
                }
                Err(e) => {
                    if attempts.len() > 1 {
                        warn!(iface, mode = label, error = %e, "XDP attach failed; trying the next mode");
                    }
                    last = Some((e, *label));
                }
            }
        }
        let (xdp_link, label) = match (used, last) {
            (Some(u), _) => u,
            (None, Some((source, mode))) => {
                return Err(LoadError::AttachXdp {
                    iface: iface.into(),
                    mode,
                    source,
                });
            }
            (None, None) => unreachable!("at least one attach mode is always tried"),
        };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::TC)?;
        let tc_link = match tc.attach(iface, TcAttachType::Ingress) {
            Ok(l) => l,
            Err(source) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, program_names::XDP)?;
                let _ = xdp.detach(xdp_link);
                return Err(LoadError::AttachTc {
                    iface: iface.into(),
                    source,
                });
            }
        };
        info!(
            iface,
            ifindex,
            xdp_mode = label,
            "attached XDP and TC ingress"
        );
        self.attached.insert(
            ifindex,
            Attachment {
                name: iface.into(),
                xdp: xdp_link,
                tc: tc_link,
            },
        );
        Ok(label)
    }

    /// Interfaces the programs are attached to (ifindex → name).
    pub fn attached(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attached.iter().map(|(i, a)| (*i, a.name.as_str()))
    }

    /// Detaches from every interface. Maps stay pinned.
    pub fn detach_all(&mut self) {
        let attached = std::mem::take(&mut self.attached);
        for (_, a) in attached {
            if let Ok(xdp) = program::<Xdp>(&mut self.ebpf, program_names::XDP)
                && let Err(e) = xdp.detach(a.xdp)
            {
                warn!(iface = a.name, error = %e, "XDP detach failed");
            }
            if let Ok(tc) = program::<SchedClassifier>(&mut self.ebpf, program_names::TC)
                && let Err(e) = tc.detach(a.tc)
            {
                warn!(iface = a.name, error = %e, "TC detach failed");
            }
            info!(iface = a.name, "detached");
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
            p.load().map_err(|source| LoadError::Program {
                name: program_names::BASELINE,
                source,
            })?;
        }
        Ok(p)
    }

    /// The TC program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        program(&mut self.ebpf, program_names::TC)
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(LoadError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    p.try_into()
        .map_err(|source| LoadError::Program { name, source })
}
