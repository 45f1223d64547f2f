//! [`VfioBarMemory`]: the real part of a memory BAR of a GPU behind VFIO, read and written
//! with `pread`/`pwrite` on the device fd at the region's offset (every failure is an error
//! the caller sees, unlike `vfio-ioctls`' `region_read`, which only logs).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::host_gpu::{HostGpuError, HostMemory, MmapSource};

/// `pread` until `buf` is full.
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: writes at most `buf.len() - done` bytes into the rest of `buf`.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                at,
            )
        };
        match n {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `pwrite` until all of `data` is written.
pub fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: reads at most `data.len() - done` bytes from the rest of `data`.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                at,
            )
        };
        match n {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// One memory BAR: `len` real bytes at `region_offset` of the device fd.
pub struct VfioBarMemory {
    device: Arc<OwnedFd>,
    region_offset: u64,
    len: u64,
    /// What QEMU may map for this BAR: never the device fd itself (it reaches BAR0, config
    /// space and reset past every trap), only an export of exactly this BAR's real part.
    mmap: Option<MmapSource>,
}

impl VfioBarMemory {
    /// The BAR whose region starts at `region_offset` of `device`, `len` real bytes, with
    /// an optional exported fd QEMU may map.
    pub fn new(
        device: Arc<OwnedFd>,
        region_offset: u64,
        len: u64,
        mmap: Option<MmapSource>,
    ) -> VfioBarMemory {
        VfioBarMemory {
            device,
            region_offset,
            len,
            mmap,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, HostGpuError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.region_offset + offset),
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset,
                len: len as u64,
                size: self.len,
            }),
        }
    }
}

impl HostMemory for VfioBarMemory {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        let at = self.check(offset, buf.len())?;
        use std::os::fd::AsFd;
        Ok(pread_exact(self.device.as_fd(), buf, at)?)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        let at = self.check(offset, data.len())?;
        use std::os::fd::AsFd;
        Ok(pwrite_all(self.device.as_fd(), data, at)?)
    }

    fn mmap_source(&self) -> Option<MmapSource> {
        self.mmap.clone()
    }
}
