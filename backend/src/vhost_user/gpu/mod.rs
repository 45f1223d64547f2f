//! The virtio-gpu 2D device model the vhost-user transport ([`super::device`]) drives.
//!
//! A guest's stock `virtio_gpu` driver talks to it through two virtqueues (control and cursor,
//! per the virtio 1.2 spec, section 5.7 "GPU Device"). This module turns the request bytes of
//! one descriptor chain into response bytes and [`DisplayEvent`]s:
//! - [`wire`]: the little-endian request/response layouts, decoded without trusting the guest.
//! - [`store`]: where resource pixels live: the guest's own VRAM slice ([`SliceStore`]) and a
//!   top-down allocator over it, so resources count against the guest's slice and are scrubbed
//!   when freed.
//! - [`backing`]: guest-memory backing pages of a resource, validated against guest memory.
//! - [`resources`]: the resource table (ids, formats, per-guest count cap).
//! - [`device`]: [`GpuCommandHandler`], which executes commands and reports display events.
//! - [`edid`]: an EDID generated from an output's size, for outputs the display side gave none.
//!
//! Not done: 3D/blob commands (answered with `ERR_UNSPEC`); streaming a flush (an UPDATE
//! event holds its pixels, up to the scanout's size, until the transport sends them);
//! scrubbing a resource's bytes at creation (they are scrubbed when freed, so a resource shows
//! only what the slice held: this guest's own earlier bytes or what the slice started with).

pub mod backing;
pub mod device;
pub mod edid;
pub mod resources;
pub mod store;
pub mod wire;

#[cfg(test)]
mod tests;

pub use device::{DisplayEvent, GpuCommandHandler, GpuConfig};
pub use store::SliceStore;
