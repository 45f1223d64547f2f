//! DMA memory for a GPU behind VFIO: host pages mapped into the device's IOMMU domain with
//! `VFIO_IOMMU_MAP_DMA` at bus addresses ("IOVAs") the backend manages ([`IovaSpace`]).
//!
//! A [`VfioDmaBuffer`] is anonymous memory, populated up front, pinned by the IOMMU map
//! (the kernel charges the pinned pages to `RLIMIT_MEMLOCK`, so a low limit refuses the map
//! with `ENOMEM`; the error says so). It is unmapped from the IOMMU before the memory is
//! released, and the owner of a buffer the device writes (the GSP's queue block) stops the
//! device first: see `gsp::session`.

use std::collections::BTreeMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use vfio_ioctls::VfioContainer;
use vmm_sys_util::ioctl_io_nr;

use crate::host_gpu::dma::{DmaBuffer, DMA_PAGE};
use crate::host_gpu::HostGpuError;

/// First IOVA the backend hands out. 4 GiB keeps clear of the x86 MSI window
/// (0xFEE0_0000) and of any 32-bit truncation; every GPU the backend knows addresses at
/// least 47 bits (nova-core's DMA masks, gpu-facts 5).
pub const IOVA_BASE: u64 = 0x1_0000_0000;
/// IOVAs stay below 2^47 (the narrowest DMA mask of the known generations).
pub const IOVA_LIMIT: u64 = 1 << 47;
/// Unmapped gap kept after each backend buffer, so a device access running off its end
/// faults in the IOMMU instead of landing in the next buffer.
const GUARD: u64 = 0x20_0000;

/// Errors of DMA memory.
#[derive(Debug, Error)]
pub enum VfioDmaError {
    /// The size is zero or not a multiple of 4 KiB.
    #[error("DMA buffer size {0:#x} is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// No IOVA range is free (or the requested one overlaps another).
    #[error("no room in the DMA address space for {len:#x} bytes at {iova:#x}")]
    NoRoom {
        /// Requested (or first tried) IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// Allocating the host memory failed.
    #[error("allocating {len:#x} bytes of DMA memory failed: {source}")]
    Alloc {
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The IOMMU map was refused.
    #[error("VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova:#x} refused: {source}{hint}")]
    Map {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// What the kernel said.
        source: vfio_ioctls::VfioError,
        /// Advice (RLIMIT_MEMLOCK), possibly empty.
        hint: String,
    },
}

impl From<VfioDmaError> for HostGpuError {
    fn from(e: VfioDmaError) -> HostGpuError {
        match &e {
            VfioDmaError::BadSize(_) => HostGpuError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                e.to_string(),
            )),
            VfioDmaError::NoRoom { .. } | VfioDmaError::Alloc { .. } | VfioDmaError::Map { .. } => {
                HostGpuError::DmaRefused(e.to_string())
            }
        }
    }
}

/// What to tell the user when a map is refused: the memlock limit, if that is the likely cause.
fn memlock_hint(len: u64) -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the plain struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return String::new();
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        return String::new();
    }
    format!(
        " (pinned DMA memory counts against RLIMIT_MEMLOCK, which is {} bytes here; this map \
         needs {len:#x} more: raise it, e.g. `ulimit -l unlimited` or LimitMEMLOCK= in a \
         systemd unit)",
        limit.rlim_cur
    )
}

/// The device's bus-address space as the backend uses it: ranges in use (start → length),
/// by address, so a guest's thousands of maps cost O(log n) each.
#[derive(Debug, Default)]
pub struct IovaSpace {
    used: Mutex<BTreeMap<u64, u64>>,
}

impl IovaSpace {
    fn used(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks the lowest free IOVA for `len` bytes (plus a guard gap after it) at or above
    /// [`IOVA_BASE`], and marks it used.
    pub fn allocate(&self, len: u64) -> Result<u64, VfioDmaError> {
        let span = len.checked_add(GUARD).ok_or(VfioDmaError::NoRoom {
            iova: IOVA_BASE,
            len,
        })?;
        let mut used = self.used();
        let mut at = IOVA_BASE;
        for (&start, &size) in used.range(..).filter(|(&s, &l)| s + l > IOVA_BASE) {
            if at.checked_add(span).is_some_and(|end| end <= start) {
                break;
            }
            at = at.max((start + size).next_multiple_of(DMA_PAGE));
        }
        if at.checked_add(span).is_none_or(|end| end > IOVA_LIMIT) {
            return Err(VfioDmaError::NoRoom { iova: at, len });
        }
        used.insert(at, span);
        Ok(at)
    }

    /// Marks `[iova, iova + len)` used (a range a guest chose); fails if it overlaps.
    pub fn reserve(&self, iova: u64, len: u64) -> Result<(), VfioDmaError> {
        let end = iova
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(VfioDmaError::NoRoom { iova, len })?;
        let mut used = self.used();
        // Only the last range starting below `end` can overlap: ranges never overlap each
        // other.
        if let Some((&s, &l)) = used.range(..end).next_back() {
            if iova < s + l {
                return Err(VfioDmaError::NoRoom { iova, len });
            }
        }
        used.insert(iova, len);
        Ok(())
    }

    /// Frees the range starting at `iova`. Returns its length (with any guard) if it was used.
    pub fn release(&self, iova: u64) -> Option<u64> {
        self.used().remove(&iova)
    }
}

ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, b';' as u32, 100 + 13);

/// `VFIO_IOMMU_MAP_DMA` of `[vaddr, vaddr + size)` at `iova` with exactly the access the
/// memory's owner allows the device (vfio-ioctls' `vfio_dma_map` always asks for read and
/// write, which fails for read-only memory and grants too much for write-only memory).
///
/// # Safety
/// `[vaddr, vaddr + size)` must stay mapped until the range is unmapped from the IOMMU, and
/// this process must touch it only through raw pointers while the device may write it.
pub unsafe fn map_dma(
    container: &VfioContainer,
    iova: u64,
    size: u64,
    vaddr: *mut u8,
    readable: bool,
    writable: bool,
) -> std::io::Result<()> {
    use vfio_bindings::bindings::vfio::{
        vfio_iommu_type1_dma_map, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    };
    let mut flags = 0;
    if readable {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if writable {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    let map = vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr: vaddr as u64,
        iova,
        size,
    };
    // SAFETY: the container fd is valid; the kernel reads `map` (argsz says how much); the
    // caller keeps the memory mapped as required above.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(container, VFIO_IOMMU_MAP_DMA(), &map) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Anonymous host memory mapped for the device's DMA.
pub struct VfioDmaBuffer {
    ptr: NonNull<u8>,
    len: u64,
    iova: u64,
    container: Arc<VfioContainer>,
    space: Arc<IovaSpace>,
}

// SAFETY: the buffer is shared with a device that reads and writes it concurrently; every
// access goes through volatile copies or atomics on raw pointers (never a Rust reference),
// which is fine from any thread.
unsafe impl Send for VfioDmaBuffer {}
// SAFETY: see `Send`.
unsafe impl Sync for VfioDmaBuffer {}

impl VfioDmaBuffer {
    /// Allocates `len` bytes (a multiple of 4 KiB), zero-filled and populated, and maps them
    /// for the device at a fresh IOVA of `space`.
    pub fn new(
        container: Arc<VfioContainer>,
        space: Arc<IovaSpace>,
        len: u64,
    ) -> Result<VfioDmaBuffer, VfioDmaError> {
        if len == 0 || len % DMA_PAGE != 0 {
            return Err(VfioDmaError::BadSize(len));
        }
        let size = usize::try_from(len).map_err(|_| VfioDmaError::BadSize(len))?;
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioDmaError::Alloc {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(VfioDmaError::Alloc {
            len,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        let unmap_host = || {
            // SAFETY: the mapping made just above, not shared with anybody yet.
            unsafe { libc::munmap(ptr.as_ptr().cast(), size) };
        };
        let iova = match space.allocate(len) {
            Ok(iova) => iova,
            Err(e) => {
                unmap_host();
                return Err(e);
            }
        };
        // SAFETY: `[ptr, ptr + size)` is our own mapping, which stays mapped until after
        // `vfio_dma_unmap` in `Drop`; it is only ever accessed through raw pointers
        // (volatile or atomic), never through references.
        if let Err(source) = unsafe { container.vfio_dma_map(iova, size, ptr.as_ptr()) } {
            space.release(iova);
            unmap_host();
            return Err(VfioDmaError::Map {
                iova,
                len,
                hint: memlock_hint(len),
                source,
            });
        }
        Ok(VfioDmaBuffer {
            ptr,
            len,
            iova,
            container,
            space,
        })
    }

    /// The bus address of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    fn at(&self, offset: u64, len: usize) -> Result<*mut u8, HostGpuError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => {
                // SAFETY: `offset + len <= self.len`, inside the mapping.
                Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
            }
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset,
                len: len as u64,
                size: self.len,
            }),
        }
    }

    fn atomic(&self, offset: u64) -> Result<&AtomicU32, HostGpuError> {
        if offset % 4 != 0 {
            return Err(HostGpuError::MemoryOutOfRange {
                offset,
                len: 4,
                size: self.len,
            });
        }
        let p = self.at(offset, 4)?;
        // SAFETY: 4-byte aligned, inside the mapping for the buffer's lifetime (which
        // bounds the returned reference); the device may write it concurrently, which is
        // what an atomic is for.
        Ok(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }
}

impl fmt::Debug for VfioDmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDmaBuffer")
            .field("len", &format_args!("{:#x}", self.len))
            .field("iova", &format_args!("{:#x}", self.iova))
            .finish()
    }
}

impl DmaBuffer for VfioDmaBuffer {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        let src = self.at(offset, buf.len())?;
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: `at` checked the whole range; volatile because the device writes it.
            *byte = unsafe { src.add(i).read_volatile() };
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        let dst = self.at(offset, data.len())?;
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { dst.add(i).write_volatile(*byte) };
        }
        Ok(())
    }

    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError> {
        Ok(u32::from_le(self.atomic(offset)?.load(Ordering::Acquire)))
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError> {
        self.atomic(offset)?.store(value.to_le(), Ordering::Release);
        Ok(())
    }

    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError> {
        match page.checked_mul(DMA_PAGE) {
            Some(off) if off < self.len => Ok(self.iova + off),
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset: page.saturating_mul(DMA_PAGE),
                len: DMA_PAGE,
                size: self.len,
            }),
        }
    }
}

impl Drop for VfioDmaBuffer {
    fn drop(&mut self) {
        // The IOMMU map goes first: after it the device cannot reach the pages.
        match self.container.vfio_dma_unmap(self.iova, self.len as usize) {
            Ok(()) => {
                self.space.release(self.iova);
                // SAFETY: our own mapping, no longer reachable by the device.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len as usize) };
            }
            Err(e) => {
                // The device may still reach the pages: keep them (leaked) rather than
                // hand memory the GPU can write back to the allocator.
                log::error!(
                    "VFIO_IOMMU_UNMAP_DMA of {:#x} bytes at IOVA {:#x} failed ({e}): the \
                     buffer is leaked so the device cannot write freed memory",
                    self.len,
                    self.iova
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovas_are_disjoint_guarded_and_reused() {
        let space = IovaSpace::default();
        let a = space.allocate(0x81000).unwrap();
        let b = space.allocate(0x2000).unwrap();
        assert_eq!(a, IOVA_BASE);
        assert!(b >= a + 0x81000 + GUARD);
        assert_eq!(b % DMA_PAGE, 0);
        assert!(space.release(a).is_some());
        assert!(space.release(a).is_none());
        // The hole below `b` is reused for something that fits it.
        assert_eq!(space.allocate(0x1000).unwrap(), IOVA_BASE);
    }

    #[test]
    fn reservations_refuse_overlap_and_steer_allocations() {
        let space = IovaSpace::default();
        space.reserve(IOVA_BASE, 0x10000).unwrap();
        assert!(space.reserve(IOVA_BASE + 0xF000, 0x1000).is_err());
        assert!(space.reserve(0, 0).is_err());
        assert!(space.reserve(u64::MAX, 2).is_err());
        let a = space.allocate(0x1000).unwrap();
        assert!(a >= IOVA_BASE + 0x10000);
        space.reserve(0x1000, 0x1000).unwrap();
    }

    #[test]
    fn the_space_is_bounded() {
        let space = IovaSpace::default();
        assert!(space.allocate(IOVA_LIMIT).is_err());
        assert!(space.allocate(u64::MAX).is_err());
    }
}
