//! The emulated GPU's VRAM as the host sees it: the `gpu-emulation-vram` memfd of a running
//! `gpu-backend serve`, opened through `/proc/<pid>/fd/<n>` (needs the rights to read another
//! process's fds: root, or the same user with ptrace access). File offset = host VRAM address,
//! except in the slices carved out into memfds of their own
//! (`gpu-emulation-vram-slice@<start>`, file offset 0 = host VRAM `start`; the base memfd
//! holds holes there): [`HostVram`] opens those too and routes each access to the memfd
//! that holds it, so it reads and writes host VRAM as the emulated GPU sees it.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// The name the emulated GPU gives its VRAM memfd (shown by `readlink` as
/// `/memfd:gpu-emulation-vram (deleted)`).
pub const VRAM_MEMFD_NAME: &str = "memfd:gpu-emulation-vram";

/// The name prefix of a carved slice's memfd; the slice's host VRAM start follows in hex.
pub const SLICE_MEMFD_PREFIX: &str = "memfd:gpu-emulation-vram-slice@";

/// What a `/proc/<pid>/fd` link names: the base VRAM memfd, a slice memfd starting at host
/// VRAM address `.0`, or neither.
fn classify(target: &str) -> Option<Option<u64>> {
    let name = target.strip_prefix('/').unwrap_or(target);
    let name = name.strip_suffix(" (deleted)").unwrap_or(name);
    if name == VRAM_MEMFD_NAME {
        return Some(None);
    }
    let start = name.strip_prefix(SLICE_MEMFD_PREFIX)?;
    let start = start.strip_prefix("0x").unwrap_or(start);
    u64::from_str_radix(start, 16).ok().map(Some)
}

/// Errors of finding the VRAM memfd.
#[derive(Debug, thiserror::Error)]
pub enum HostVramError {
    /// No fd of the process is the VRAM memfd.
    #[error("process {pid} has no fd linking to `{VRAM_MEMFD_NAME}` among {fds} fds")]
    NotFound {
        /// The process searched.
        pid: u32,
        /// How many fds it has.
        fds: usize,
    },
    /// A read or write went past the end of VRAM.
    #[error("host VRAM [{offset:#x}, +{len:#x}) is past the end of VRAM ({size:#x})")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Its length.
        len: u64,
        /// VRAM size.
        size: u64,
    },
}

/// Read/write access to a backend's host VRAM.
#[derive(Debug)]
pub struct HostVram {
    file: File,
    path: PathBuf,
    size: u64,
    /// The carved slices, sorted by start: (start, memfd, its path, its size).
    slices: Vec<(u64, File, PathBuf, u64)>,
}

impl HostVram {
    /// Open the VRAM memfd of process `pid` (a running `gpu-backend serve` with an emulated GPU).
    pub fn open(pid: u32) -> Result<HostVram> {
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let entries = std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))?;
        let (mut fds, mut base) = (0, None);
        let mut slices: Vec<(u64, File, PathBuf, u64)> = Vec::new();
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            fds += 1;
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            match classify(&target.to_string_lossy()) {
                Some(None) if base.is_none() => base = Some(Self::open_path(entry.path())?),
                Some(Some(start)) if !slices.iter().any(|(s, ..)| *s == start) => {
                    let one = Self::open_path(entry.path())?;
                    slices.push((start, one.file, one.path, one.size));
                }
                _ => {}
            }
        }
        let mut vram = base.ok_or(HostVramError::NotFound { pid, fds })?;
        slices.sort_by_key(|(start, ..)| *start);
        vram.slices = slices;
        Ok(vram)
    }

    /// Host VRAM starts of the carved slices found (sorted).
    pub fn slice_starts(&self) -> Vec<u64> {
        self.slices.iter().map(|(start, ..)| *start).collect()
    }

    /// The pieces of `[offset, offset + len)`: (file, its path, offset in it, length).
    fn pieces(&self, offset: u64, len: usize) -> Vec<(&File, &PathBuf, u64, usize)> {
        let (mut out, mut at, end) = (Vec::new(), offset, offset + len as u64);
        while at < end {
            let inside = self
                .slices
                .iter()
                .find(|(start, .., size)| *start <= at && at < start + size);
            let piece = match inside {
                Some((start, file, path, size)) => {
                    let n = (end.min(start + size) - at) as usize;
                    (file, path, at - start, n)
                }
                None => {
                    let next = self
                        .slices
                        .iter()
                        .map(|(start, ..)| *start)
                        .find(|&start| start > at)
                        .unwrap_or(end);
                    (&self.file, &self.path, at, (end.min(next) - at) as usize)
                }
            };
            at += piece.3 as u64;
            out.push(piece);
        }
        out
    }

    /// The host VRAM ranges that hold data (sorted, adjacent ones merged): the pages of the
    /// memfds that were ever written, found with `lseek(SEEK_DATA/SEEK_HOLE)`; the rest of
    /// VRAM reads as zeros. Lets a search look at all of a large, sparse VRAM.
    pub fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        let mut out = data_ranges_of(&self.file, &self.path, 0)?;
        for (start, file, path, _) in &self.slices {
            out.extend(data_ranges_of(file, path, *start)?);
        }
        out.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Open a file standing for host VRAM (the memfd's `/proc` link, or any file in tests).
    pub fn open_path(path: PathBuf) -> Result<HostVram> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        let size = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        Ok(HostVram {
            file,
            path,
            size,
            slices: Vec::new(),
        })
    }

    /// VRAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        let len = len as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(HostVramError::OutOfRange {
                offset,
                len,
                size: self.size,
            }
            .into());
        }
        Ok(())
    }

    /// Read `len` bytes at host VRAM address `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check(offset, len)?;
        let mut buf = vec![0; len];
        let mut done = 0;
        for (file, path, at, n) in self.pieces(offset, len) {
            file.read_exact_at(&mut buf[done..done + n], at)
                .ctx(|| format!("reading {} at {at:#x}", path.display()))?;
            done += n;
        }
        Ok(buf)
    }

    /// Write `bytes` at host VRAM address `offset`.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check(offset, bytes.len())?;
        let mut done = 0;
        for (file, path, at, n) in self.pieces(offset, bytes.len()) {
            file.write_all_at(&bytes[done..done + n], at)
                .ctx(|| format!("writing {} at {at:#x}", path.display()))?;
            done += n;
        }
        Ok(())
    }
}

/// `lseek(fd, from, whence)`: `None` when the kernel says there is no more data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on an fd `file` owns; it moves only the file offset, which nothing else
    // here relies on (all reads and writes are positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(at as u64))
}

/// The data ranges of `file`, shifted by `base` (the host VRAM address of its offset 0).
fn data_ranges_of(file: &File, path: &Path, base: u64) -> Result<Vec<Range<u64>>> {
    let size = file
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) =
            seek(file, at, libc::SEEK_DATA).ctx(|| format!("SEEK_DATA in {}", path.display()))?
        else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)
            .ctx(|| format!("SEEK_HOLE in {}", path.display()))?
            .unwrap_or(size)
            .min(size);
        if end <= start {
            break;
        }
        out.push(base + start..base + end);
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_a_file_and_refuses_past_the_end() {
        let path = std::env::temp_dir().join(format!("host-vram-test-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let v = HostVram::open_path(path.clone()).unwrap();
        assert_eq!(v.size(), 8192);
        v.write(4090, &[1, 2, 3]).unwrap();
        assert_eq!(v.read(4089, 5).unwrap(), [0, 1, 2, 3, 0]);
        assert!(v.read(8190, 4).is_err());
        assert!(v.write(u64::MAX, &[0]).is_err());
        std::fs::remove_file(path).unwrap();
    }

    fn memfd(name: &std::ffi::CStr, len: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by `file`.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh fd nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn classifies_memfd_links() {
        let base = "/memfd:gpu-emulation-vram (deleted)";
        assert_eq!(classify(base), Some(None));
        let slice = "/memfd:gpu-emulation-vram-slice@0x4000000 (deleted)";
        assert_eq!(classify(slice), Some(Some(0x400_0000)));
        assert_eq!(classify("/memfd:gpu-emulation-test (deleted)"), None);
        assert_eq!(classify("/memfd:gpu-emulation-vram-x (deleted)"), None);
        assert_eq!(classify("/dev/null"), None);
    }

    /// (One test: the memfds of this process stand in for the backend's, and a second
    /// test creating its own would race with this one's lookup.)
    #[test]
    fn finds_the_memfds_by_name_and_routes_slices_to_theirs() {
        let file = memfd(c"gpu-emulation-vram", 1 << 20);
        // A carved slice [0x4000, 0x6000): the base memfd holds a hole there.
        let slice = memfd(c"gpu-emulation-vram-slice@0x4000", 0x2000);
        let v = HostVram::open(std::process::id()).unwrap();
        assert_eq!(v.size(), 1 << 20);
        assert_eq!(v.slice_starts(), [0x4000]);
        v.write(0x1000, b"canary").unwrap();
        let mut buf = [0u8; 6];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(&buf, b"canary");
        // Straddling both edges of the slice: base, slice, base.
        v.write(0x3FFE, &[1, 2, 3, 4]).unwrap();
        v.write(0x5FFE, &[5, 6, 7, 8]).unwrap();
        let mut two = [0u8; 2];
        file.read_exact_at(&mut two, 0x3FFE).unwrap();
        assert_eq!(two, [1, 2]);
        slice.read_exact_at(&mut two, 0).unwrap();
        assert_eq!(two, [3, 4]);
        slice.read_exact_at(&mut two, 0x1FFE).unwrap();
        assert_eq!(two, [5, 6]);
        file.read_exact_at(&mut two, 0x6000).unwrap();
        assert_eq!(two, [7, 8]);
        file.read_exact_at(&mut two, 0x4000).unwrap();
        assert_eq!(two, [0, 0], "the base memfd's hole stays untouched");
        let all = v.read(0x3FFE, 0x2004).unwrap();
        assert_eq!(&all[..4], &[1, 2, 3, 4]);
        assert_eq!(&all[0x2000..], &[5, 6, 7, 8]);
        // Written pages: the base memfd's 0x1000 and 0x3000 and 0x6000 pages, the slice's
        // first and last; contiguous ones merged across the two memfds.
        v.write(0x80000, &[9]).unwrap();
        let ranges = v.data_ranges().unwrap();
        assert_eq!(ranges, [0x1000..0x2000, 0x3000..0x7000, 0x80000..0x81000]);
    }
}
