//! Slices: a guest's range of host VRAM, and everything that confines a guest to it.
//!
//! - [`partition`]: [`Slice`], [`VramPartition`] (guest area, host-reserved region,
//!   overlap and range checks).
//! - [`spec`]: sizes and `SOCKET:SIZE` guest specifications from the command line.
//! - [`host_vram`]: [`HostVram`], the host PRAMIN window shared by all guests behind one
//!   lock (guest apertures and the page-table builder), held per bounded chunk.
//! - [`bar1`]: [`Bar1Space`], BAR1 in virtual mode with one guarded window per guest.
//! - [`setup`]: [`GuestSlice`], [`whole_gpu`] and [`SlicedGpu`]: scrubbed slices handed to
//!   guests.
//!
//! See `docs/architecture.md` ("Slices") for the layout and the guarantees.

pub mod bar1;
pub mod host_vram;
pub mod partition;
pub mod setup;
pub mod spec;

#[cfg(test)]
pub(crate) mod tests;

pub use bar1::{Bar1Error, Bar1Space, BAR1_GUARD};
pub use host_vram::{HostVram, HostVramError};
pub use partition::{
    PartitionError, Slice, VramPartition, VramRange, HOST_RESERVED_SIZE, SLICE_ALIGN,
};
pub use setup::{
    whole_gpu, whole_gpu_with, GuestSlice, HandOut, SetupError, SliceAccess, SlicedGpu, TakenBack,
};
pub use spec::{parse_size, parse_slice_size, GuestSpec, SpecError};
