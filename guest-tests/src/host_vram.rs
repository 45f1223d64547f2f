//! The emulated GPU's VRAM as the host sees it: the `gpu-emulation-vram` memfd of a running
//! `gpu-backend serve`, opened through `/proc/<pid>/fd/<n>` (needs the rights to read another
//! process's fds: root, or the same user with ptrace access). File offset = host VRAM address.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{IoContext, Result};

/// The name the emulated GPU gives its VRAM memfd (shown by `readlink` as
/// `/memfd:gpu-emulation-vram (deleted)`).
pub const VRAM_MEMFD_NAME: &str = "memfd:gpu-emulation-vram";

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
}

impl HostVram {
    /// Open the VRAM memfd of process `pid` (a running `gpu-backend serve` with an emulated GPU).
    pub fn open(pid: u32) -> Result<HostVram> {
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let entries = std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))?;
        let mut fds = 0;
        for entry in entries {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            fds += 1;
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if target.to_string_lossy().contains(VRAM_MEMFD_NAME) {
                return Self::open_path(entry.path());
            }
        }
        Err(HostVramError::NotFound { pid, fds }.into())
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
        Ok(HostVram { file, path, size })
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
        self.file
            .read_exact_at(&mut buf, offset)
            .ctx(|| format!("reading {} at {offset:#x}", self.path.display()))?;
        Ok(buf)
    }

    /// Write `bytes` at host VRAM address `offset`.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check(offset, bytes.len())?;
        self.file
            .write_all_at(bytes, offset)
            .ctx(|| format!("writing {} at {offset:#x}", self.path.display()))
    }
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

    #[test]
    fn finds_a_memfd_by_name() {
        // This process's own memfd of that name stands in for the backend's.
        let name = c"gpu-emulation-vram";
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by `file`.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh fd nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(1 << 20).unwrap();
        let v = HostVram::open(std::process::id()).unwrap();
        assert_eq!(v.size(), 1 << 20);
        v.write(0x1000, b"canary").unwrap();
        let mut buf = [0u8; 6];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(&buf, b"canary");
    }
}
