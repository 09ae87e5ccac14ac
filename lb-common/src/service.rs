//! Services and their ordered backend sets.

/// Identifies a service: the destination of a client's packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Virtual IP, network order.
    pub vip: [u8; 4],
    /// Service port, host order.
    pub port: u16,
    /// IP protocol (`proto::TCP` or `proto::UDP`).
    pub proto: u8,
    /// Always zero; keys are compared bytewise.
    pub _pad: u8,
}

/// What the data path needs to choose a backend for a new flow.
///
/// The agent replaces this value in one map update, which is what makes a backend-set
/// change atomic for packets: a packet sees either the old `(set, count)` or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Dense service id: index into the `stats` and `rr` arrays.
    pub id: u32,
    /// Active backend set: `SlotKey::set` of the slots to pick from.
    pub set: u32,
    /// Number of slots in the active set; zero rejects new flows.
    pub count: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// One position in a backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    /// Set id: every service owns two (`2 * id` and `2 * id + 1`) and alternates between
    /// them, so the set packets read is never the one being written.
    pub set: u32,
    /// Position in the set, `0..count`.
    pub index: u32,
}

impl SlotKey {
    /// The two set ids owned by service `id`.
    pub const fn sets_of(id: u32) -> [u32; 2] {
        [id * 2, id * 2 + 1]
    }

    /// The service id owning this position's set (the inverse of [`Self::sets_of`]).
    pub const fn service(&self) -> u32 {
        self.set / 2
    }
}

/// The backend at one position of a set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Index into the `backends` array.
    pub backend_id: u32,
}

/// One CPU's round-robin cursor of one service (the `rr` map is per CPU), advanced for
/// every new flow that CPU assigns. CPU `c` picks position `(next + c) % count`, so CPUs
/// start their rotations at different backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundRobin {
    /// Number of new flows assigned so far (wraps).
    pub next: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);
const _: () = assert!(core::mem::size_of::<Slot>() == 4);
const _: () = assert!(core::mem::size_of::<RoundRobin>() == 4);

crate::pod!(ServiceKey, ServiceValue, SlotKey, Slot, RoundRobin);
