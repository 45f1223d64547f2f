//! [`FdMapping`]: a DMA map's memory `mmap()`ed from the client's fd. The fd is closed as soon
//! as the memory is mapped: the mapping keeps the memory, and the fd slot is free again, so
//! DMA maps hold no fds however many a client adds.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::vfio_user::device::Errno;

/// A shared mapping of part of a client's file, unmapped on drop.
#[derive(Debug)]
pub(crate) struct FdMapping {
    /// The mapping seen as vm-memory guest memory at the map's IOVA (it does not own the
    /// mapping: `FdMapping` unmaps it).
    region: GuestRegionMmap,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping belongs to this value until `Drop`; all access goes through vm-memory's
// volatile copies, which are sound from any thread.
unsafe impl Send for FdMapping {}
// SAFETY: see `Send`; every accessor takes `&self`.
unsafe impl Sync for FdMapping {}

impl FdMapping {
    /// Maps `len` bytes of `fd` at `offset` with `prot` (`PROT_READ`/`PROT_WRITE`), seen at
    /// DMA address `iova`, and closes `fd`. The caller has checked that the file is sealed
    /// against shrinking and at least `offset + len` bytes long, so no access can fault.
    pub(crate) fn map(
        fd: OwnedFd,
        offset: u64,
        len: usize,
        prot: libc::c_int,
        iova: u64,
    ) -> Result<FdMapping, Errno> {
        let file_offset = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: a fresh mapping placed by the kernel (addr NULL) over a valid fd; it
        // aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        drop(fd);
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(Errno::EFAULT)?;
        let unmap_on_error = |errno: Errno| {
            // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
            unsafe { libc::munmap(addr, len) };
            errno
        };
        // SAFETY: `[ptr, ptr + len)` is the live mapping made above with these protections and
        // flags; it stays mapped until `Drop`, which also drops `region` (nothing else
        // holds it: the field is private and never cloned out).
        let mapping = unsafe {
            MmapRegion::build_raw(
                ptr.as_ptr(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        }
        .map_err(|_| unmap_on_error(Errno::EINVAL))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(iova))
            .ok_or_else(|| unmap_on_error(Errno::EINVAL))?;
        Ok(FdMapping { region, ptr, len })
    }

    /// The mapping as vm-memory guest memory at the map's IOVA.
    pub(crate) fn region(&self) -> &GuestRegionMmap {
        &self.region
    }

    /// The mapping's first byte.
    pub(crate) fn host_address(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for FdMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; `region` (dropped right after)
        // does not own or touch it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
