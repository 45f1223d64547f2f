//! The emulated GPU MMU: page-table formats v2 and v3, a page-table walker, a TLB that
//! honours the MMU_INVALIDATE registers, instance blocks, and BAR1 in virtual mode.
//!
//! Decoding follows `gpu-facts.md` section 4 only (deliberately independent of the
//! page-table builder in the backend, so the two can check each other):
//! - [`v2`] / [`v3`]: typed entry layouts (PTE, PDE, dual PDE);
//! - [`walker`]: [`translate`], the walk from the root directory to the page;
//! - [`tlb`]: [`Tlb`], the translation cache and its invalidation rules;
//! - [`instance`]: BAR block bindings and instance-block PDB / ADR_LIMIT;
//! - [`bar1`]: BAR1 accesses (physical 1:1 or virtual through the TLB), [`Bar1Error`];
//! - [`fault`]: [`Bar1Fault`], [`Bar1Stats`].
//!
//! The entry points on the device are [`EmulatedGpu::bar1_read`] /
//! [`EmulatedGpu::bar1_write`], [`EmulatedGpu::bar1_translate`], the TRIGGER hook in
//! [`EmulatedGpu::bar0_write`], and [`translate_with`] (for tests of page-table builders).

pub mod bar1;
pub mod entry;
pub mod fault;
pub mod instance;
pub mod tlb;
pub mod v2;
pub mod v3;
pub mod walker;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use bar1::Bar1Error;
pub use entry::{Level, PageSize, PdeAperture, PteAperture, Translation};
pub use fault::{Bar1Fault, Bar1Stats};
pub use instance::{BarBinding, InstanceBlock, InstanceError};
pub use tlb::{InvalidateScope, Tlb, TlbStats};
pub use walker::{translate, va_bits, WalkFault};

use crate::gpu::EmulatedGpu;
use crate::vram::VramAddr;
use fault::Bar1Counters;

/// The MMU state of one GPU: the TLB and the BAR1 fault counters.
#[derive(Debug, Default)]
pub(crate) struct Mmu {
    pub(crate) tlb: Tlb,
    pub(crate) bar1: Bar1Counters,
}

/// Test support: translates `va` through the page tables rooted at `pdb` in `gpu`'s VRAM,
/// with the page-table format of its chip (v2 Turing–Ada, v3 Hopper+).
///
/// This is a fresh walk that bypasses the TLB, so it always reflects the tables as they
/// are now; use it to check page tables built by other code.
pub fn translate_with(gpu: &EmulatedGpu, pdb: VramAddr, va: u64) -> Result<Translation, WalkFault> {
    translate(
        gpu.vram(),
        pdb,
        gpu.profile().generation().mmu_version(),
        va,
    )
}
