//! [`MappedBar`]: a BAR of a VFIO device mapped into the process, accessed the way a kernel
//! driver accesses MMIO: volatile, naturally aligned loads and stores of 1, 2 or 4 bytes
//! (8-byte accesses are two dwords, low first, as the GPU's registers are 32 bits wide).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use thiserror::Error;

use crate::host_gpu::AccessWidth;

/// Errors of mapping or accessing a BAR.
#[derive(Debug, Error)]
pub enum MappedBarError {
    /// `mmap` of the region failed.
    #[error(
        "mapping {len:#x} bytes of the VFIO region at file offset {offset:#x} failed: {source}"
    )]
    Map {
        /// Region length.
        len: u64,
        /// Region offset in the device fd.
        offset: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The access is outside the BAR or not naturally aligned.
    #[error("{width}-byte access at {offset:#x} is outside the {len:#x}-byte BAR or misaligned")]
    BadAccess {
        /// Offset of the access.
        offset: u64,
        /// Bytes accessed.
        width: u64,
        /// BAR length.
        len: u64,
    },
}

/// A BAR mapped shared from a VFIO device fd. Unmapped on drop.
#[derive(Debug)]
pub struct MappedBar {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is MMIO (or device memory) that the kernel keeps valid for the
// lifetime of `MappedBar`; every access is a volatile load or store of a primitive, which
// is fine from any thread (the device serialises concurrent accesses itself).
unsafe impl Send for MappedBar {}
// SAFETY: see `Send`: no access creates a reference into the mapping.
unsafe impl Sync for MappedBar {}

impl MappedBar {
    /// Maps `len` bytes of `fd` at `offset` (a VFIO region's offset) read-write, shared.
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<MappedBar, MappedBarError> {
        let map_error = |source| MappedBarError::Map {
            len,
            offset,
            source,
        };
        let size = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| map_error(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| map_error(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), of a valid fd; the
        // result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_error(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| map_error(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        Ok(MappedBar { base, len })
    }

    /// Length of the mapping.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never: mapping refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, width: u64) -> Result<usize, MappedBarError> {
        let fits = offset.checked_add(width).is_some_and(|end| end <= self.len);
        if !fits || offset % width.min(4) != 0 {
            return Err(MappedBarError::BadAccess {
                offset,
                width,
                len: self.len,
            });
        }
        // Below `len`, which came from a `usize`.
        Ok(offset as usize)
    }

    /// Reads `width` bytes at `offset` (little-endian, zero-extended).
    pub fn read(&self, offset: u64, width: AccessWidth) -> Result<u64, MappedBarError> {
        let at = self.check(offset, width.bytes())?;
        // SAFETY: `check` put `[at, at + width)` inside the mapping with natural alignment
        // (dword alignment for 8 bytes); volatile loads of primitives from MMIO.
        let value = unsafe {
            let p = self.base.as_ptr().add(at);
            match width {
                AccessWidth::Byte => u64::from(p.read_volatile()),
                AccessWidth::Word => u64::from(u16::from_le(p.cast::<u16>().read_volatile())),
                AccessWidth::Dword => u64::from(u32::from_le(p.cast::<u32>().read_volatile())),
                AccessWidth::Qword => {
                    let lo = u32::from_le(p.cast::<u32>().read_volatile());
                    let hi = u32::from_le(p.add(4).cast::<u32>().read_volatile());
                    u64::from(lo) | u64::from(hi) << 32
                }
            }
        };
        Ok(value)
    }

    /// Writes the low `width` bytes of `value` at `offset`.
    pub fn write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), MappedBarError> {
        let at = self.check(offset, width.bytes())?;
        // SAFETY: as in `read`; volatile stores of primitives to MMIO.
        unsafe {
            let p = self.base.as_ptr().add(at);
            match width {
                AccessWidth::Byte => p.write_volatile(value as u8),
                AccessWidth::Word => p.cast::<u16>().write_volatile((value as u16).to_le()),
                AccessWidth::Dword => p.cast::<u32>().write_volatile((value as u32).to_le()),
                AccessWidth::Qword => {
                    p.cast::<u32>().write_volatile((value as u32).to_le());
                    p.add(4)
                        .cast::<u32>()
                        .write_volatile(((value >> 32) as u32).to_le());
                }
            }
        }
        Ok(())
    }
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers into it.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"mapped-bar-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn widths_alignment_and_bounds() {
        let file = memfd(0x2000);
        let bar = MappedBar::map(file.as_fd(), 0x1000, 0x1000).unwrap();
        bar.write(0x10, AccessWidth::Dword, 0x1234_5678).unwrap();
        assert_eq!(bar.read(0x10, AccessWidth::Dword).unwrap(), 0x1234_5678);
        assert_eq!(bar.read(0x10, AccessWidth::Byte).unwrap(), 0x78);
        assert_eq!(bar.read(0x12, AccessWidth::Word).unwrap(), 0x1234);
        bar.write(0x20, AccessWidth::Qword, 0x1111_2222_3333_4444)
            .unwrap();
        assert_eq!(bar.read(0x24, AccessWidth::Dword).unwrap(), 0x1111_2222);
        assert_eq!(
            bar.read(0x20, AccessWidth::Qword).unwrap(),
            0x1111_2222_3333_4444
        );
        // The mapping starts at the region's offset in the file.
        let mut raw = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0x1010).unwrap();
        assert_eq!(u32::from_le_bytes(raw), 0x1234_5678);
        assert!(bar.read(0x11, AccessWidth::Dword).is_err());
        assert!(bar.read(0xFFE, AccessWidth::Dword).is_err());
        assert!(bar.write(0x1000, AccessWidth::Byte, 0).is_err());
        assert!(bar.read(u64::MAX, AccessWidth::Byte).is_err());
    }

    #[test]
    fn mapping_nothing_or_a_bad_fd_is_an_error() {
        let file = memfd(0x1000);
        assert!(MappedBar::map(file.as_fd(), 0, 0).is_err());
        // /dev/null cannot be mapped (ENODEV).
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(MappedBar::map(null.as_fd(), 0, 0x1000).is_err());
    }
}
