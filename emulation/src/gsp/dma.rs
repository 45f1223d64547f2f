//! [`DmaSpace`]: the emulated GPU's view of host system memory, an emulated IOMMU.
//!
//! On hardware the host maps its buffer into the device's IOMMU domain (VFIO
//! `VFIO_IOMMU_MAP_DMA`) and gives the GPU bus ("DMA") addresses. Here the host hands the
//! emulated GPU the buffer's memfd; [`DmaSpace::map`] maps it a second time (the GPU's own
//! mapping) at a fresh DMA address, and the GSP resolves DMA addresses through
//! [`DmaSpace::resolve`].

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::shared_memory::{SharedMemory, SharedMemoryError, SHARED_PAGE};

/// First DMA address handed out (ASSUMPTION: arbitrary; 4 GiB keeps addresses above any
/// 32-bit truncation bug).
pub const DMA_BASE: u64 = 0x1_0000_0000;

/// Gap left between mappings, so an access running off the end of one buffer faults
/// instead of landing in the next.
const GUARD: u64 = 0x20_0000;

/// Errors of the emulated IOMMU.
#[derive(Debug, Error)]
pub enum DmaError {
    /// The buffer could not be mapped.
    #[error("mapping DMA memory failed: {0}")]
    Map(#[from] SharedMemoryError),
    /// No mapping covers the range.
    #[error("DMA access of {len:#x} bytes at {addr:#x} hits no mapped buffer")]
    Unmapped {
        /// DMA address.
        addr: u64,
        /// Length of the access.
        len: u64,
    },
    /// The DMA address space is exhausted (not expected: it is 64 bits wide).
    #[error("the emulated DMA address space is exhausted")]
    Exhausted,
}

/// One buffer mapped into the emulated IOMMU.
#[derive(Debug, Clone)]
struct Mapping {
    addr: u64,
    memory: Arc<SharedMemory>,
}

#[derive(Debug)]
struct Table {
    next: u64,
    mappings: Vec<Mapping>,
}

/// The DMA address space of one emulated GPU.
#[derive(Debug)]
pub struct DmaSpace {
    table: Mutex<Table>,
}

impl Default for DmaSpace {
    fn default() -> DmaSpace {
        DmaSpace {
            table: Mutex::new(Table {
                next: DMA_BASE,
                mappings: Vec::new(),
            }),
        }
    }
}

impl DmaSpace {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table consistent (every update is a
        // single push/remove), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the first `len` bytes of `fd` (a multiple of 4 KiB) and returns the DMA
    /// address of its first byte.
    pub fn map(&self, fd: BorrowedFd<'_>, len: u64) -> Result<u64, DmaError> {
        let memory = Arc::new(SharedMemory::map(fd, len)?);
        let mut table = self.table();
        let addr = table.next;
        table.next = addr
            .checked_add(len)
            .and_then(|end| end.checked_add(GUARD))
            .map(|end| end.next_multiple_of(SHARED_PAGE))
            .ok_or(DmaError::Exhausted)?;
        table.mappings.push(Mapping { addr, memory });
        Ok(addr)
    }

    /// Removes the mapping starting at `addr`. Users that already resolved it keep their
    /// reference (the emulator does not model IOMMU faults on in-flight accesses).
    pub fn unmap(&self, addr: u64) -> Result<(), DmaError> {
        let mut table = self.table();
        let i = table
            .mappings
            .iter()
            .position(|m| m.addr == addr)
            .ok_or(DmaError::Unmapped { addr, len: 0 })?;
        table.mappings.remove(i);
        Ok(())
    }

    /// The buffer holding `[addr, addr + len)` and the offset of `addr` in it.
    pub fn resolve(&self, addr: u64, len: u64) -> Result<(Arc<SharedMemory>, u64), DmaError> {
        let table = self.table();
        table
            .mappings
            .iter()
            .find_map(|m| {
                let off = addr.checked_sub(m.addr)?;
                let end = off.checked_add(len)?;
                (end <= m.memory.len()).then(|| (Arc::clone(&m.memory), off))
            })
            .ok_or(DmaError::Unmapped { addr, len })
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.table().mappings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_resolve_unmap() {
        let space = DmaSpace::default();
        let a = SharedMemory::create(c"a", 0x3000).unwrap();
        let b = SharedMemory::create(c"b", 0x1000).unwrap();
        let da = space.map(a.as_fd(), 0x3000).unwrap();
        let db = space.map(b.as_fd(), 0x1000).unwrap();
        assert_eq!(da, DMA_BASE);
        assert!(db >= da + 0x3000 + GUARD);
        a.write(0x2FF0, &[7; 16]).unwrap();
        let (mem, off) = space.resolve(da + 0x2FF0, 16).unwrap();
        assert_eq!(off, 0x2FF0);
        let mut buf = [0; 16];
        mem.read(off, &mut buf).unwrap();
        assert_eq!(buf, [7; 16]);
        assert!(space.resolve(da + 0x2FF0, 17).is_err());
        assert!(space.resolve(da - 1, 1).is_err());
        assert!(space.resolve(db, 0x1000).is_ok());
        space.unmap(da).unwrap();
        assert!(space.resolve(da, 1).is_err());
        assert!(space.unmap(da).is_err());
        assert_eq!(space.mapping_count(), 1);
    }
}
