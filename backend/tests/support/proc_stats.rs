//! What `/proc/<pid>` says about a running `gpu-backend serve`: its open fds, its address
//! space, and its VRAM memfds (opened through `/proc/<pid>/fd/<n>`, as
//! `guest-tests/src/host_vram.rs` does, to read and plant host VRAM behind the backend's back).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The base VRAM memfd: file offset = host VRAM address (holes where slices were carved out).
pub const VRAM_MEMFD: &str = "/memfd:gpu-emulation-vram";
/// A carved slice's memfd; its host VRAM start follows in hex.
pub const SLICE_MEMFD_PREFIX: &str = "/memfd:gpu-emulation-vram-slice@";

/// Resource figures of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// Open file descriptors.
    pub fds: usize,
    /// Mapped address space (`VmSize`), bytes.
    pub vm_size: u64,
    /// Resident memory (`VmRSS`), bytes.
    pub vm_rss: u64,
    /// Memory mappings (lines of `/proc/<pid>/maps`).
    pub maps: usize,
    /// Threads.
    pub threads: usize,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open fds of `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The figures of `pid` now.
pub fn proc_stats(pid: u32) -> io::Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(ProcStats {
        fds: fd_count(pid)?,
        vm_size: status_kib(&status, "VmSize:") * 1024,
        vm_rss: status_kib(&status, "VmRSS:") * 1024,
        maps: maps.lines().count(),
        threads: status_kib(&status, "Threads:") as usize,
    })
}

/// A byte count for people: "1.50 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// One VRAM memfd of the server.
#[derive(Debug)]
pub struct VramFile {
    /// Host VRAM address of file offset 0.
    pub start: u64,
    /// The file, opened read-write.
    pub file: File,
}

/// The server's host VRAM: the base memfd and the carved slices.
#[derive(Debug)]
pub struct HostVramFiles {
    /// The base memfd (host VRAM address = file offset).
    pub base: VramFile,
    /// The carved slices, by start.
    pub slices: Vec<VramFile>,
}

impl HostVramFiles {
    /// Open the VRAM memfds of `pid` (the same user's process, or root).
    pub fn open(pid: u32) -> io::Result<HostVramFiles> {
        let mut base = None;
        let mut slices: Vec<VramFile> = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let path = entry?.path();
            let Ok(target) = std::fs::read_link(&path) else {
                continue;
            };
            let target = target.to_string_lossy();
            let name = target.strip_suffix(" (deleted)").unwrap_or(&target);
            let start = if name == VRAM_MEMFD {
                if base.is_some() {
                    continue;
                }
                None
            } else if let Some(hex) = name.strip_prefix(SLICE_MEMFD_PREFIX) {
                let hex = hex.strip_prefix("0x").unwrap_or(hex);
                let Ok(start) = u64::from_str_radix(hex, 16) else {
                    continue;
                };
                if slices.iter().any(|s| s.start == start) {
                    continue;
                }
                Some(start)
            } else {
                continue;
            };
            let file = File::options().read(true).write(true).open(&path)?;
            let vram = VramFile {
                start: start.unwrap_or(0),
                file,
            };
            match start {
                None => base = Some(vram),
                Some(_) => slices.push(vram),
            }
        }
        slices.sort_by_key(|s| s.start);
        let base = base.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{pid} has no {VRAM_MEMFD}"),
            )
        })?;
        Ok(HostVramFiles { base, slices })
    }

    /// Read host VRAM `[at, at + buf.len())` from the base memfd (outside every slice).
    pub fn read_base(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.base.file.read_exact_at(buf, at)
    }

    /// Write host VRAM `[at, at + data.len())` in the base memfd (outside every slice).
    pub fn write_base(&self, at: u64, data: &[u8]) -> io::Result<()> {
        self.base.file.write_all_at(data, at)
    }

    /// The current sizes of every VRAM file (base first, then slices), to see that nobody
    /// resized one.
    pub fn sizes(&self) -> io::Result<Vec<u64>> {
        std::iter::once(&self.base)
            .chain(&self.slices)
            .map(|f| Ok(f.file.metadata()?.len()))
            .collect()
    }
}
