//! Benchmark helpers (feature `test-utils`): the standard 24 GiB identity build on an
//! emulated GPU, measured with [`measure_identity_build`].

use std::sync::Arc;

use thiserror::Error;

use super::addr::{PageSize, GIB};
use super::identity_build::{measure_identity_build, BuildMeasurement, IdentityBuildError};
use crate::host_gpu::emulated::EmulatedHostGpu;

/// Bytes mapped by the standard measurement.
pub const BENCH_MAPPING: u64 = 24 * GIB;
/// Profile of the emulated GPU used by [`build_24g_on_emulated`] (80 GiB of VRAM).
pub const BENCH_PROFILE: &str = "ga100-80g";

/// Errors of the benchmark helpers.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The emulated GPU could not be created.
    #[error("creating the emulated GPU failed: {0}")]
    Gpu(String),
    /// The build failed.
    #[error(transparent)]
    Build(#[from] IdentityBuildError),
}

/// Builds a 24 GiB identity mapping with pages of at most `page_size` on a fresh
/// emulated [`BENCH_PROFILE`] GPU and returns (entries written, window moves).
pub fn build_24g_on_emulated(page_size: PageSize) -> Result<(u64, u64), BenchError> {
    let m = measure_24g_on_emulated(page_size)?;
    Ok((m.entries_written(), m.window_moves()))
}

/// [`build_24g_on_emulated`] with the full measurement.
pub fn measure_24g_on_emulated(page_size: PageSize) -> Result<BuildMeasurement, BenchError> {
    let gpu =
        EmulatedHostGpu::by_name(BENCH_PROFILE).map_err(|e| BenchError::Gpu(e.to_string()))?;
    Ok(measure_identity_build(
        Arc::new(gpu),
        BENCH_MAPPING,
        page_size,
    )?)
}
