//! A measured identity mapping: map VA `[0, len)` to VRAM `[0, len)` through PRAMIN and
//! report the entries written, the window moves and the time taken (`gpu-backend measure`
//! and the page-table benchmark).

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::addr::{GpuVa, PageSize, VramAddr, MIB};
use super::cursor::PraminCursor;
use super::page_table::builder::{
    window_moves_per_1000, BuildError, MapOptions, MapReport, PageTableBuilder,
};
use super::page_table::format::PageTableFormat;
use super::pramin::{Pramin, PraminError};
use super::vram_alloc::{AllocError, VramAllocator};
use crate::host_gpu::HostGpu;

/// VRAM reserved for page tables after the mapped range (enough for 4 KiB pages over
/// 24 GiB: ~12.4 k table pages ≈ 49 MiB).
pub const TABLE_SPACE: u64 = 128 * MIB;

/// Errors of a measured build.
#[derive(Debug, Error)]
pub enum IdentityBuildError {
    /// The GPU has too little VRAM for the mapping plus table space.
    #[error("{vram:#x} bytes of VRAM cannot hold a {len:#x}-byte mapping plus {tables:#x} bytes of tables")]
    TooSmall {
        /// VRAM size.
        vram: u64,
        /// Mapping length.
        len: u64,
        /// Table space.
        tables: u64,
    },
    /// PRAMIN setup failed.
    #[error(transparent)]
    Pramin(#[from] PraminError),
    /// The allocator range was invalid.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Building failed.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// The outcome of one measured build.
#[derive(Debug, Clone, Copy)]
pub struct BuildMeasurement {
    /// Largest page size allowed.
    pub page_size: PageSize,
    /// Bytes mapped.
    pub bytes: u64,
    /// What the builder reported (entries written, window moves, ...).
    pub report: MapReport,
    /// Wall time of the `map` call (table setup excluded).
    pub elapsed: Duration,
}

impl BuildMeasurement {
    /// Entries written (PTEs plus linking PDEs).
    pub fn entries_written(&self) -> u64 {
        self.report.entries_written()
    }

    /// PRAMIN window moves.
    pub fn window_moves(&self) -> u64 {
        self.report.window_moves
    }

    /// Entries written per second.
    pub fn entries_per_second(&self) -> f64 {
        self.entries_written() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Window moves per 1000 entries written.
    pub fn window_moves_per_1000_entries(&self) -> f64 {
        window_moves_per_1000(self.window_moves(), self.entries_written())
    }
}

/// Maps VA `[0, len)` to VRAM `[0, len)` with pages of at most `page_size` on `gpu`,
/// with page tables taken from `[len, len + TABLE_SPACE)`, and measures the `map`.
pub fn measure_identity_build(
    gpu: Arc<dyn HostGpu>,
    len: u64,
    page_size: PageSize,
) -> Result<BuildMeasurement, IdentityBuildError> {
    let vram = gpu.identity().vram_size;
    let format = PageTableFormat::for_generation(gpu.identity().generation);
    let tables_end = len.checked_add(TABLE_SPACE).filter(|&e| e <= vram);
    let Some(tables_end) = tables_end else {
        return Err(IdentityBuildError::TooSmall {
            vram,
            len,
            tables: TABLE_SPACE,
        });
    };
    let mut pramin = Pramin::new(gpu)?;
    let mut cursor = PraminCursor::new(&mut pramin);
    let alloc = VramAllocator::new(VramAddr::new(len), VramAddr::new(tables_end))?;
    let mut builder = PageTableBuilder::new(&mut cursor, format, alloc)?;
    let start = Instant::now();
    let report = builder.map_with(
        &mut cursor,
        GpuVa::ZERO,
        VramAddr::ZERO,
        len,
        MapOptions {
            max_page_size: page_size,
        },
    )?;
    Ok(BuildMeasurement {
        page_size,
        bytes: len,
        report,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_driver::addr::GIB;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn small_identity_builds() {
        let gpu: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let m = measure_identity_build(gpu.clone(), 64 * MIB, PageSize::Size2M).unwrap();
        assert_eq!(m.report.ptes_2m, 32);
        assert_eq!(m.report.ptes(), 32);
        // PD2, PD1, PD0 linked.
        assert_eq!(m.report.pdes, 3);
        let m = measure_identity_build(gpu.clone(), 8 * MIB, PageSize::Size4K).unwrap();
        assert_eq!(m.report.ptes_4k, 2048);
        assert_eq!(m.report.pdes, 3 + 4);
        assert!(m.window_moves() <= 3, "{m:?}");
        assert!(matches!(
            measure_identity_build(gpu, 24 * GIB, PageSize::Size2M),
            Err(IdentityBuildError::TooSmall { .. })
        ));
    }
}
