//! `gpu-emulation`: a software model of an NVIDIA GPU, the default host GPU of `gpu-backend`.
//!
//! It knows a handful of real parts ([`ChipProfile`]: `tu102-24g`, `ga100-80g`, `gh100-80g`,
//! `gh200-96g`, `gb202-32g`) and emulates, for one of them:
//! - the PCI identity and real (unpadded) BAR layout of the part ([`profile`]);
//! - device memory as a sparse memfd that QEMU can map directly ([`Vram`], [`VramAddr`]);
//! - the BAR0 registers a driver touches first: BOOT_0/BOOT_42, the PRAMIN window register
//!   and its 1 MiB aperture into VRAM, TLB invalidate and BAR block registers, the
//!   framebuffer size registers, with every access to an unmodelled register counted
//!   ([`bar0`], [`EmulatedGpu`]);
//! - the GPU MMU: page-table walker (formats v2 and v3), a TLB honouring the invalidate
//!   registers, and BAR1 in physical and virtual mode ([`mmu`]);
//! - the GSP: started through its falcon registers (LibOS arguments at MAILBOX0/1,
//!   CPUCTL.STARTCPU, ENGINE reset), its end of the command/message queues in host (or
//!   guest) memory reached through an emulated IOMMU, the doorbell and SWGEN0 interrupt,
//!   and a small GSP-RM answering the boot handshake and object requests ([`gsp`]).
//!
//! Register bit layouts are typed ([`regs`]); chip vocabulary is in [`chip`].
//! Hardware facts come from the project fact sheet; values not found there are marked as
//! assumptions where they are defined.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bar0;
pub mod chip;
pub mod gpu;
pub mod gsp;
pub mod mmu;
pub mod profile;
pub mod regs;
pub mod vram;

pub use bar0::{
    AccessWidth, Bar0Error, RegisterSnapshot, TlbInvalidateRequest, UnimplementedStats,
    UNIMPLEMENTED_REGISTER_VALUE,
};
pub use chip::{ChipError, Generation, MmuVersion, PciIdentity, WindowRegisterKind};
pub use gpu::{BarMemory, EmulatedGpu, GpuError};
pub use mmu::{
    Bar1Error, Bar1Fault, Bar1Stats, PageSize, PteAperture, TlbStats, Translation, WalkFault,
};
pub use profile::{BarRole, BarSpec, ChipProfile, ProfileError};
pub use regs::{BarMode, MemoryTarget, WindowTarget};
pub use vram::{Vram, VramAddr, VramError};
