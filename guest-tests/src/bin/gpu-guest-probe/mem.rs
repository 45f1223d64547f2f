//! Access paths to a BAR from user space: an `mmap` window of a file (a sysfs `resourceN` file
//! or `/dev/mem`) with volatile 32-bit accesses, and `pread`/`pwrite` on a file descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

/// Page size assumed for aligning mmap offsets (x86-64).
pub const PAGE: u64 = 4096;

/// Open a file read-write with `O_SYNC` (uncached mappings for `/dev/mem`).
pub fn open_rw_sync(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(path)
}

/// A shared, read-write mapping of `len` bytes of a file, starting at a page-aligned offset.
pub struct Window {
    ptr: *mut u8,
    len: usize,
    /// File offset of the first mapped byte.
    base: u64,
}

impl Window {
    /// Map the pages of `file` covering `[offset, offset + len)`.
    pub fn map(file: &File, offset: u64, len: u64) -> io::Result<Window> {
        let base = offset & !(PAGE - 1);
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let map_len = (end - base).div_ceil(PAGE) * PAGE;
        let map_len =
            usize::try_from(map_len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file_off = libc::off_t::try_from(base)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr = null); the fd is valid for
        // the duration of the call. The mapping is only accessed through volatile reads/writes
        // inside its bounds and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window {
            ptr: ptr.cast(),
            len: map_len,
            base,
        })
    }

    fn at(&self, offset: u64, size: usize) -> io::Result<*mut u8> {
        let rel = offset
            .checked_sub(self.base)
            .and_then(|r| usize::try_from(r).ok())
            .filter(|r| r.checked_add(size).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "offset outside mapped window")
            })?;
        if rel % size != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned access",
            ));
        }
        // SAFETY: rel + size <= len, so the resulting pointer stays inside the mapping.
        Ok(unsafe { self.ptr.add(rel) })
    }

    /// Pointer to file offset `offset` with `len` bytes of the mapping behind it (for bulk
    /// access, e.g. bandwidth measurements).
    pub fn region(&self, offset: u64, len: usize) -> io::Result<*mut u8> {
        let rel = offset
            .checked_sub(self.base)
            .and_then(|r| usize::try_from(r).ok())
            .filter(|r| r.checked_add(len).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "range outside mapped window")
            })?;
        // SAFETY: rel + len <= self.len, so the pointer stays inside the mapping.
        Ok(unsafe { self.ptr.add(rel) })
    }

    /// Volatile 32-bit read at file offset `offset`.
    pub fn read32(&self, offset: u64) -> io::Result<u32> {
        let p = self.at(offset, 4)?;
        // SAFETY: `p` is 4-byte aligned and inside the live mapping (checked by `at`).
        Ok(unsafe { std::ptr::read_volatile(p.cast::<u32>()) })
    }

    /// Volatile 32-bit write at file offset `offset`.
    pub fn write32(&self, offset: u64, value: u32) -> io::Result<()> {
        let p = self.at(offset, 4)?;
        // SAFETY: `p` is 4-byte aligned and inside the live, writable mapping (checked by `at`).
        unsafe { std::ptr::write_volatile(p.cast::<u32>(), value) };
        Ok(())
    }

    /// Volatile 8-bit read at file offset `offset`.
    pub fn read8(&self, offset: u64) -> io::Result<u8> {
        let p = self.at(offset, 1)?;
        // SAFETY: `p` is inside the live mapping (checked by `at`).
        Ok(unsafe { std::ptr::read_volatile(p) })
    }

    /// One volatile load of `width` bytes (1, 2, 4 or 8, naturally aligned) at file offset
    /// `offset`, zero-extended.
    pub fn read_width(&self, offset: u64, width: usize) -> io::Result<u64> {
        let p = self.at(offset, width)?;
        // SAFETY: `p` is `width`-aligned with `width` bytes of the live mapping behind it
        // (checked by `at`); one volatile load of exactly that width.
        Ok(unsafe {
            match width {
                1 => u64::from(std::ptr::read_volatile(p)),
                2 => u64::from(std::ptr::read_volatile(p.cast::<u16>())),
                4 => u64::from(std::ptr::read_volatile(p.cast::<u32>())),
                8 => std::ptr::read_volatile(p.cast::<u64>()),
                _ => return Err(bad_width()),
            }
        })
    }

    /// One volatile store of the low `width` bytes (1, 2, 4 or 8, naturally aligned) of
    /// `value` at file offset `offset`.
    pub fn write_width(&self, offset: u64, width: usize, value: u64) -> io::Result<()> {
        let p = self.at(offset, width)?;
        // SAFETY: `p` is `width`-aligned with `width` bytes of the live, writable mapping
        // behind it (checked by `at`); one volatile store of exactly that width.
        unsafe {
            match width {
                1 => std::ptr::write_volatile(p, value as u8),
                2 => std::ptr::write_volatile(p.cast::<u16>(), value as u16),
                4 => std::ptr::write_volatile(p.cast::<u32>(), value as u32),
                8 => std::ptr::write_volatile(p.cast::<u64>(), value),
                _ => return Err(bad_width()),
            }
        }
        Ok(())
    }
}

fn bad_width() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "access width must be 1, 2, 4 or 8",
    )
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping created in `map`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `pread` of a little-endian u32.
pub fn pread32(file: &File, offset: u64) -> io::Result<u32> {
    let mut b = [0u8; 4];
    file.read_exact_at(&mut b, offset)?;
    Ok(u32::from_le_bytes(b))
}

/// `pwrite` of a little-endian u32.
pub fn pwrite32(file: &File, offset: u64, value: u32) -> io::Result<()> {
    file.write_all_at(&value.to_le_bytes(), offset)
}
