//! `gpu-guest-vfio-bench`: the cost of one 32-bit register read of a device bound to the
//! kernel's vfio-pci, two ways: a load from BAR0 mmapped from the VFIO device fd, and `pread`
//! on the device fd at BAR0's region offset (the kernel does the access). The same for the first
//! word of the largest BAR (the VRAM BAR). Meant for the nested VFIO guest, where every BAR0
//! access leaves the guest (BAR0 is trapped by the backend) and VRAM BAR loads do not.
//!
//! Opens the device like the backend does, with `vfio-ioctls` (container/group API, no KVM).
//! Prints a [`BenchReport`] (one JSON line between `GPU-VFIO-BENCH-REPORT-BEGIN` and `...-END`)
//! on stdout and a table on stderr. Exit status 1 if the device cannot be opened or mapped.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use guest_tests::vfio_report::{BenchFigure, BenchReport, ReadPath};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};

/// `VFIO_REGION_INFO_FLAG_MMAP`.
const REGION_FLAG_MMAP: u32 = 1 << 2;
/// BAR0's region index.
const BAR0: u32 = 0;
/// Bytes mapped of each BAR (the words read lie in the first page).
const MAP_LEN: usize = 4096;

/// Register read cost through the VFIO BAR0 mmap and through pread.
#[derive(Debug, Parser)]
#[command(name = "gpu-guest-vfio-bench")]
struct Args {
    /// PCI address of the device bound to vfio-pci.
    #[arg(long, default_value = "0000:00:05.0")]
    device: String,
    /// Timed reads per figure.
    #[arg(long, default_value = "2000")]
    iterations: u64,
}

/// Errors of the bench.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    /// The device's IOMMU group could not be read from sysfs.
    #[error("reading the IOMMU group of {path}: {source}")]
    Group {
        /// The sysfs link.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// vfio-ioctls failed to open the container, group or device.
    #[error("opening the VFIO device: {0}")]
    Vfio(#[from] VfioError),
    /// A region cannot be mapped.
    #[error("region {region}: {reason}")]
    Region {
        /// Region index.
        region: u32,
        /// Why.
        reason: String,
    },
    /// A pread failed.
    #[error("pread of region {region} at {offset:#x}: {source}")]
    Pread {
        /// Region index.
        region: u32,
        /// Offset in the region.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A read-only shared mapping of the first page of a region.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, region: u32, file_offset: u64) -> Result<Mapping, BenchError> {
        let offset = libc::off_t::try_from(file_offset).map_err(|_| BenchError::Region {
            region,
            reason: format!("offset {file_offset:#x} does not fit off_t"),
        })?;
        // SAFETY: a fresh shared read-only mapping chosen by the kernel (no fixed address), of
        // an fd that stays open while the mapping lives (the device outlives every Mapping).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAP_LEN,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BenchError::Region {
                region,
                reason: format!("mmap: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(Mapping { ptr, len: MAP_LEN })
    }

    /// A 32-bit load at `offset` (4-byte aligned, inside the mapping).
    fn read32(&self, offset: usize) -> u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "read outside the mapping"
        );
        // SAFETY: the address is inside the live mapping and 4-byte aligned (checked above);
        // a volatile load so that each iteration is a device access.
        unsafe { std::ptr::read_volatile(self.ptr.cast::<u8>().add(offset).cast::<u32>()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`, which nothing uses afterwards.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn pread32(fd: RawFd, region: u32, file_offset: u64, offset: u64) -> Result<u32, BenchError> {
    let mut buf = [0u8; 4];
    let err = |source| BenchError::Pread {
        region,
        offset,
        source,
    };
    let at = libc::off_t::try_from(file_offset + offset)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: reads at most 4 bytes into the 4-byte stack buffer.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), at) };
    if n != 4 {
        return Err(err(if n < 0 {
            std::io::Error::last_os_error()
        } else {
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
        }));
    }
    Ok(u32::from_le_bytes(buf))
}

/// Time `iterations` calls of `read`.
fn time_reads(
    name: &str,
    path: ReadPath,
    region: u32,
    offset: u64,
    iterations: u64,
    mut read: impl FnMut() -> Result<u32, BenchError>,
) -> Result<BenchFigure, BenchError> {
    let value = read()?;
    let (mut total, mut min, mut max) = (0u128, u64::MAX, 0u64);
    for _ in 0..iterations {
        let t = Instant::now();
        std::hint::black_box(read()?);
        let ns = t.elapsed().as_nanos();
        total += ns;
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        min = min.min(ns);
        max = max.max(ns);
    }
    Ok(BenchFigure {
        name: name.into(),
        path,
        region,
        offset,
        iterations,
        mean_ns: total as f64 / iterations.max(1) as f64,
        min_ns: if iterations == 0 { 0 } else { min },
        max_ns: max,
        value,
    })
}

fn iommu_group(sysfs: &Path) -> Result<u32, BenchError> {
    let link = sysfs.join("iommu_group");
    let err = |source| BenchError::Group {
        path: link.clone(),
        source,
    };
    let target = std::fs::read_link(&link).map_err(err)?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::InvalidData)))
}

fn run(args: &Args) -> Result<BenchReport, BenchError> {
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&args.device);
    let group = iommu_group(&sysfs)?;
    let container = Arc::new(VfioContainer::new(None)?);
    let device = VfioDevice::new(&sysfs, container, false)?;
    let fd = device.as_raw_fd();
    let mut report = BenchReport {
        device: args.device.clone(),
        group,
        bar0_size: device.get_region_size(BAR0),
        figures: Vec::new(),
    };
    // The VRAM BAR: the largest memory BAR after BAR0.
    let vram = (1..=5u32)
        .filter(|&i| device.get_region_size(i) > 0)
        .max_by_key(|&i| device.get_region_size(i));
    let mut targets = vec![("bar0_boot0", BAR0)];
    if let Some(i) = vram {
        targets.push(("vram_bar_word0", i));
    }
    for (name, region) in targets {
        let file_offset = device.get_region_offset(region);
        if device.get_region_flags(region) & REGION_FLAG_MMAP == 0 {
            return Err(BenchError::Region {
                region,
                reason: "VFIO does not allow mmap".into(),
            });
        }
        let map = Mapping::new(fd, region, file_offset)?;
        let iters = args.iterations;
        report
            .figures
            .push(time_reads(name, ReadPath::Mmap, region, 0, iters, || {
                Ok(map.read32(0))
            })?);
        report
            .figures
            .push(time_reads(name, ReadPath::Pread, region, 0, iters, || {
                pread32(fd, region, file_offset, 0)
            })?);
    }
    drop(device);
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            for f in &report.figures {
                eprintln!(
                    "{:<16} region {} via {:<5} {:>6} reads: mean {:>10.0} ns, min {:>8} ns, max {:>9} ns, value {:#010x}",
                    f.name,
                    f.region,
                    format!("{:?}", f.path).to_lowercase(),
                    f.iterations,
                    f.mean_ns,
                    f.min_ns,
                    f.max_ns,
                    f.value
                );
            }
            print!("{}", report.framed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu-guest-vfio-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
