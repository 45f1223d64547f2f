//! `gpu-backend measure`: the host-driver paths timed on whatever GPU the backend drives, so
//! the same command gives the in-process (emulated) and the VFIO figures side by side:
//! BAR0 register reads, a GSP boot, and a page-table build through PRAMIN.
//!
//! The page-table build writes tables into VRAM (`[map_size, map_size + 128 MiB)`) and the
//! GSP is restarted: run it on a GPU no guest is using.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::gsp::{boot, BootError, GspTimeouts};
use crate::host_driver::addr::PageSize;
use crate::host_driver::addr::VramAddr;
use crate::host_driver::identity_build::{measure_identity_build, IdentityBuildError};
use crate::host_gpu::{AccessWidth, HostGpu, HostGpuError};
use crate::slice::{HostVram, HostVramError};

/// Errors of a measurement.
#[derive(Debug, Error)]
pub enum MeasureError {
    /// A register read failed.
    #[error("register read failed: {0}")]
    Register(#[from] HostGpuError),
    /// The GSP did not boot.
    #[error("GSP boot failed: {0}")]
    Boot(#[from] BootError),
    /// The page-table build failed.
    #[error("page-table build failed: {0}")]
    Build(#[from] IdentityBuildError),
    /// The scrub failed.
    #[error("scrub failed: {0}")]
    Scrub(#[from] HostVramError),
}

/// Latency percentiles of repeated operations, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Operations timed.
    pub count: u32,
    /// Median.
    pub p50_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Mean.
    pub mean_ns: u64,
}

impl Latency {
    /// Times `count` calls of `op` one by one.
    pub fn of<E>(count: u32, mut op: impl FnMut() -> Result<(), E>) -> Result<Latency, E> {
        let mut samples = Vec::with_capacity(count as usize);
        let start = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            op()?;
            samples.push(t.elapsed());
        }
        let total = start.elapsed();
        samples.sort_unstable();
        let pick = |pct: usize| {
            samples
                .get((samples.len() * pct / 100).min(samples.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
                .as_nanos() as u64
        };
        Ok(Latency {
            count,
            p50_ns: pick(50),
            p99_ns: pick(99),
            mean_ns: (total.as_nanos() / u128::from(count.max(1))) as u64,
        })
    }
}

/// One page-table build.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BuildFigures {
    /// Bytes mapped (4 KiB pages).
    pub bytes: u64,
    /// Entries written.
    pub entries: u64,
    /// PRAMIN window moves.
    pub window_moves: u64,
    /// Wall time of the build, in microseconds.
    pub micros: u64,
    /// Entries per second.
    pub entries_per_second: f64,
}

/// One scrub of VRAM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScrubFigures {
    /// Bytes zeroed.
    pub bytes: u64,
    /// Wall time, in microseconds.
    pub micros: u64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Whether it went through the PRAMIN window (a host without a scrub of its own, such
    /// as a GPU behind VFIO) rather than the host's own scrub (the emulated GPU's hole
    /// punching).
    pub through_pramin: bool,
}

/// Everything `measure` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// The GPU measured (profile name or PCI address).
    pub gpu: String,
    /// Dword reads of `NV_PMC_BOOT_0` through [`HostGpu::bar0_read`].
    pub register_read: Latency,
    /// The same reads through `pread` on the VFIO device fd (VFIO only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register_read_pread: Option<Latency>,
    /// GSP boot: start to GSP_INIT_DONE, in microseconds.
    pub gsp_init_done_micros: u64,
    /// GSP boot: start to the static info, in microseconds.
    pub gsp_boot_micros: u64,
    /// A page-table build with 4 KiB pages.
    pub page_table_build: BuildFigures,
    /// A scrub of the first `scrub_size` bytes of VRAM, as slices are scrubbed.
    pub scrub: ScrubFigures,
}

/// Runs every measurement on `gpu`: `reads` register reads (and, if `pread_read` is given,
/// as many through it), one GSP boot and a `map_size` identity build with 4 KiB pages.
pub fn measure(
    gpu: Arc<dyn HostGpu>,
    reads: u32,
    pread_read: Option<&dyn Fn() -> Result<u32, HostGpuError>>,
    map_size: u64,
    scrub_size: u64,
) -> Result<Measurement, MeasureError> {
    let register_read = Latency::of(reads, || gpu.bar0_read(0, AccessWidth::Dword).map(|_| ()))?;
    let register_read_pread = pread_read
        .map(|read| Latency::of(reads, || read().map(|_| ())))
        .transpose()?;
    let (init, total) = {
        let session = boot(gpu.as_ref(), GspTimeouts::default())?;
        let trace = session.boot_trace();
        (trace.init_time, trace.total_time)
    };
    let build = measure_identity_build(Arc::clone(&gpu), map_size, PageSize::Size4K)?;
    let through_pramin = matches!(
        gpu.scrub_vram(VramAddr::ZERO, 0),
        Err(HostGpuError::Io(ref e)) if e.raw_os_error() == Some(libc::ENOTSUP)
    );
    let vram = HostVram::new(Arc::clone(&gpu))?;
    let started = Instant::now();
    vram.scrub(VramAddr::ZERO, scrub_size)?;
    let scrubbed = started.elapsed();
    Ok(Measurement {
        gpu: gpu.identity().name.clone(),
        register_read,
        register_read_pread,
        gsp_init_done_micros: micros(init),
        gsp_boot_micros: micros(total),
        page_table_build: BuildFigures {
            bytes: build.bytes,
            entries: build.entries_written(),
            window_moves: build.window_moves(),
            micros: micros(build.elapsed),
            entries_per_second: build.entries_per_second(),
        },
        scrub: ScrubFigures {
            bytes: scrub_size,
            micros: micros(scrubbed),
            bytes_per_second: scrub_size as f64 / scrubbed.as_secs_f64().max(1e-9),
            through_pramin,
        },
    })
}

/// Writes `m` as a few human-readable lines.
pub fn write_summary(out: &mut dyn std::io::Write, m: &Measurement) -> std::io::Result<()> {
    let line = |name: &str, l: &Latency| {
        format!(
            "{name}: p50 {:.2} us, p99 {:.2} us, mean {:.2} us ({} reads)",
            l.p50_ns as f64 / 1e3,
            l.p99_ns as f64 / 1e3,
            l.mean_ns as f64 / 1e3,
            l.count
        )
    };
    writeln!(out, "GPU {}", m.gpu)?;
    writeln!(out, "{}", line("BOOT_0 read", &m.register_read))?;
    if let Some(p) = &m.register_read_pread {
        writeln!(
            out,
            "{}",
            line("BOOT_0 read through pread on the VFIO device fd", p)
        )?;
    }
    writeln!(
        out,
        "GSP boot: GSP_INIT_DONE after {} us, static info after {} us",
        m.gsp_init_done_micros, m.gsp_boot_micros
    )?;
    let b = &m.page_table_build;
    writeln!(
        out,
        "page tables: {} bytes in 4 KiB pages, {} entries in {} us ({:.0} entries/s, {} window moves)",
        b.bytes, b.entries, b.micros, b.entries_per_second, b.window_moves
    )?;
    let s = &m.scrub;
    writeln!(
        out,
        "scrub: {} bytes in {} us ({:.1} MB/s, {})",
        s.bytes,
        s.micros,
        s.bytes_per_second / 1e6,
        if s.through_pramin {
            "through PRAMIN"
        } else {
            "host's own scrub"
        }
    )
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn measures_the_emulated_gpu() {
        let gpu: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let m = measure(gpu, 100, None, 2 << 20, 1 << 20).unwrap();
        assert_eq!(m.gpu, "tu102-24g");
        assert_eq!(m.register_read.count, 100);
        assert!(m.register_read.p50_ns <= m.register_read.p99_ns);
        assert!(m.register_read_pread.is_none());
        assert!(m.gsp_init_done_micros <= m.gsp_boot_micros);
        assert!(m.gsp_boot_micros > 0);
        // 512 PTEs of 4 KiB plus the directories linking them.
        assert!(m.page_table_build.entries > 512, "{m:?}");
        assert_eq!(m.scrub.bytes, 1 << 20);
        assert!(!m.scrub.through_pramin, "the emulated GPU punches holes");
    }

    #[test]
    fn a_failing_operation_stops_the_timing() {
        let mut n = 0;
        let r = Latency::of(10, || {
            n += 1;
            if n == 3 {
                Err("boom")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("boom"));
        assert_eq!(n, 3);
    }
}
