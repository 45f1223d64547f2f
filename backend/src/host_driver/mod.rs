//! Host-side driver pieces that build GPU page tables in VRAM through the PRAMIN window.
//!
//! Everything here reaches the GPU only through [`HostGpu`](crate::host_gpu::HostGpu)
//! BAR0 accesses, so the same code drives the emulated GPU and real hardware. Layers,
//! bottom up:
//! - [`regs`]: a bit-field helper and the typed registers used below.
//! - [`addr`]: typed addresses ([`addr::VramAddr`], [`addr::GpuVa`]) and page sizes.
//! - [`pramin`]: the owner of the BAR0 window register, handing out 1 MiB windows.
//! - [`cursor`]: random VRAM access that moves the window only when needed.
//! - [`vram_alloc`]: a page allocator for page-table pages.
//! - [`page_table`]: MMU v2/v3 entry codecs, the level structure, the mapping builder and
//!   a software walker.
//! - [`tlb`]: TLB invalidation.
//! - [`instance`]: instance-block PDB fields and the BAR1 bind.
//! - [`identity_build`]: a measured identity mapping (`gpu-backend measure`).
//! - `bench` (feature `test-utils`): the standard 24 GiB build for the benchmark.

pub mod addr;
#[cfg(any(test, feature = "test-utils"))]
pub mod bench;
pub mod cursor;
pub mod identity_build;
pub mod instance;
pub mod page_table;
pub mod pramin;
pub mod regs;
pub mod tlb;
pub mod vram_alloc;

#[cfg(test)]
pub(crate) mod test_support;
