//! Backends: where flows are sent.

/// One backend of one service, at a stable id for as long as the service keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IP, network order.
    pub ip: [u8; 4],
    /// Backend port, host order.
    pub port: u16,
    /// `BACKEND_IN_USE` when the id is allocated.
    pub flags: u16,
    /// Bumped whenever the id is freed or reused. A flow remembers the generation it was
    /// created with; a mismatch means its backend was removed and the flow is over.
    pub generation: u32,
    /// Owning service id.
    pub service_id: u32,
}

/// `Backend::flags`: the id is allocated to a service.
pub const BACKEND_IN_USE: u16 = 1;

const _: () = assert!(core::mem::size_of::<Backend>() == 16);

crate::pod!(Backend);
