//! A shared mapping of a VRAM BAR's memfd, as QEMU maps the BAR's sparse area: how the test
//! guests reach their mapped VRAM.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

/// A shared mapping of a VRAM BAR's memfd, as QEMU maps the BAR's sparse area.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`, shared and writable.
    pub fn new(fd: &OwnedFd, offset: u64, len: u64) -> Result<Mapping, String> {
        let len = usize::try_from(len).map_err(|e| e.to_string())?;
        // SAFETY: a fresh shared mapping chosen by the kernel (address NULL); it aliases no
        // Rust object and is only reached through raw pointers below, within `len`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mapping the VRAM BAR fd: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ptr = NonNull::new(p.cast()).ok_or("mmap returned NULL")?;
        Ok(Mapping { ptr, len })
    }

    fn check(&self, o: u64, n: usize) -> usize {
        let o = o as usize;
        assert!(o + n <= self.len, "mapped access past the mapping");
        o
    }

    /// Copies `buf.len()` bytes at `o` out of the mapping.
    pub fn read(&self, o: u64, buf: &mut [u8]) {
        let o = self.check(o, buf.len());
        // SAFETY: `[o, o + len)` lies inside the live mapping (checked); `buf` is a distinct
        // Rust buffer. Other writers of the shared memory can only change the bytes read.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), buf.as_mut_ptr(), buf.len())
        };
    }

    /// Copies `data` into the mapping at `o`.
    pub fn write(&self, o: u64, data: &[u8]) {
        let o = self.check(o, data.len());
        // SAFETY: as in `read`; the mapping is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(o), data.len())
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory owned by this value, reached only by copies.
unsafe impl Send for Mapping {}
