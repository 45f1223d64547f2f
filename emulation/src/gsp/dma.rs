//! [`DmaSpace`]: the emulated GPU's view of host system memory, an emulated IOMMU.
//!
//! On hardware the host maps memory into the device's IOMMU domain (VFIO
//! `VFIO_IOMMU_MAP_DMA`) and gives the GPU bus ("DMA") addresses. Here every mapping is a
//! [`DmaTarget`]: anything that can be read and written at offsets, placed at a DMA
//! address. Two kinds exist:
//! - memory the backend allocated in-process: it hands the emulated GPU a memfd, which
//!   [`DmaSpace::map`] maps a second time (the GPU's own mapping, a [`SharedMemory`]) at
//!   an address of its choosing;
//! - memory the emulator cannot map itself, placed at an address someone else chose
//!   ([`DmaSpace::map_at`]): e.g. the DMA map of a guest that owns the whole GPU, reached
//!   through its vfio-user connection (a mapped fd, or DMA_READ/DMA_WRITE messages).
//!
//! The GSP resolves DMA addresses through [`DmaSpace::resolve`]: an access must lie inside
//! one mapping (no access spans two). Mappings never overlap and are kept by address, so
//! mapping, unmapping and resolving cost O(log n) in the number of mappings: a whole-GPU
//! guest may hold tens of thousands of DMA maps (up to its budget), and a linear table made
//! every map, unmap and GSP DMA access cost O(n) (65535 maps took 36 s to make).

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::shared_memory::{SharedMemory, SharedMemoryError, SHARED_PAGE};

/// Lowest DMA address [`DmaSpace::map`] hands out (ASSUMPTION: arbitrary; 4 GiB keeps
/// addresses above any 32-bit truncation bug).
pub const DMA_BASE: u64 = 0x1_0000_0000;

/// Gap [`DmaSpace::map`] leaves around the mappings it places, so an access running off
/// the end of one buffer faults instead of landing in the next.
const GUARD: u64 = 0x20_0000;

/// Errors of the emulated IOMMU and of accesses to its targets.
#[derive(Debug, Error)]
pub enum DmaError {
    /// A memfd could not be mapped, or its mapping rejected an access.
    #[error("DMA memory: {0}")]
    Memory(#[from] SharedMemoryError),
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
    /// [`DmaSpace::map_at`] was given a range that overlaps an existing mapping.
    #[error("DMA range {addr:#x} + {len:#x} overlaps the mapping at {existing:#x}")]
    Overlap {
        /// Requested address.
        addr: u64,
        /// Requested length.
        len: u64,
        /// Start of the mapping it overlaps.
        existing: u64,
    },
    /// [`DmaSpace::map_at`] was given an empty range or one that wraps past 2^64.
    #[error("DMA range {addr:#x} + {len:#x} is empty or overflows")]
    BadRange {
        /// Requested address.
        addr: u64,
        /// Requested length.
        len: u64,
    },
    /// An access outside a target.
    #[error(
        "DMA access of {len:#x} bytes at offset {offset:#x} is outside the {size:#x}-byte target"
    )]
    OutOfBounds {
        /// Offset of the access in the target.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the target.
        size: u64,
    },
    /// A 32-bit access at an offset that is not 4-byte aligned.
    #[error("32-bit DMA access at offset {0:#x} is not 4-byte aligned")]
    Misaligned(u64),
    /// The owner of the memory did not allow the device to read it.
    #[error("the DMA target does not allow device reads")]
    NotReadable,
    /// The owner of the memory did not allow the device to write it.
    #[error("the DMA target does not allow device writes")]
    NotWritable,
    /// The target failed the access (e.g. its connection is gone).
    #[error("DMA target access failed: {0}")]
    Target(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Memory the emulated GPU reaches by DMA: one mapping of the emulated IOMMU.
///
/// Offsets are bytes from the target's start; implementations check
/// `offset + len <= self.len()` and return [`DmaError::OutOfBounds`] otherwise. The memory
/// may be written by its owner at any time, so implementations copy (never hand out
/// references); `load_u32`/`store_u32` carry the queue pointers and must order the data
/// around them (acquire / release) where the memory is shared in-process.
pub trait DmaTarget: Send + Sync + fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the target is empty (never for a mapped target).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` out of the target (a device read).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Copies `data` into the target at `offset` (a device write).
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError>;
    /// Loads the little-endian `u32` at `offset` (4-byte aligned), acquire ordering.
    fn load_u32(&self, offset: u64) -> Result<u32, DmaError>;
    /// Stores `value` little-endian at `offset` (4-byte aligned), release ordering.
    fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaError>;
}

impl DmaTarget for SharedMemory {
    fn len(&self) -> u64 {
        SharedMemory::len(self)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        Ok(SharedMemory::read(self, offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        Ok(SharedMemory::write(self, offset, data)?)
    }

    fn load_u32(&self, offset: u64) -> Result<u32, DmaError> {
        Ok(SharedMemory::load_u32(self, offset)?)
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaError> {
        Ok(SharedMemory::store_u32(self, offset, value)?)
    }
}

/// One target mapped into the emulated IOMMU.
#[derive(Debug, Clone)]
struct Mapping {
    addr: u64,
    target: Arc<dyn DmaTarget>,
}

impl Mapping {
    /// One past the last byte (mappings never wrap: checked when they are made).
    fn end(&self) -> u64 {
        self.addr + self.target.len()
    }
}

#[derive(Debug)]
struct Table {
    /// Where [`DmaSpace::map`] starts looking for room.
    next: u64,
    /// The mappings by DMA address; none overlaps another, none is empty.
    mappings: BTreeMap<u64, Mapping>,
}

impl Table {
    /// A mapping overlapping `[start, end)`, if any: since mappings do not overlap, the one
    /// starting last below `end` reaches furthest, so it overlaps if any does.
    fn overlapping(&self, start: u64, end: u64) -> Option<&Mapping> {
        let (_, last) = self.mappings.range(..end).next_back()?;
        (last.end() > start).then_some(last)
    }
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
                mappings: BTreeMap::new(),
            }),
        }
    }
}

impl DmaSpace {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table consistent (every update is a
        // single insert/remove), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the first `len` bytes of `fd` (a multiple of 4 KiB) and returns the DMA
    /// address of its first byte: the lowest address at or above the last one handed out
    /// whose range, widened by a guard gap on both sides, collides with no mapping.
    pub fn map(&self, fd: BorrowedFd<'_>, len: u64) -> Result<u64, DmaError> {
        let memory: Arc<dyn DmaTarget> = Arc::new(SharedMemory::map(fd, len)?);
        let mut table = self.table();
        let mut addr = table.next;
        loop {
            let lo = addr.checked_sub(GUARD).ok_or(DmaError::Exhausted)?;
            let hi = addr
                .checked_add(len)
                .and_then(|end| end.checked_add(GUARD))
                .ok_or(DmaError::Exhausted)?;
            match table.overlapping(lo, hi) {
                None => break,
                Some(m) => {
                    addr = m
                        .end()
                        .checked_add(GUARD)
                        .and_then(|a| a.checked_next_multiple_of(SHARED_PAGE))
                        .ok_or(DmaError::Exhausted)?;
                }
            }
        }
        table.next = addr
            .checked_add(len)
            .and_then(|end| end.checked_add(GUARD))
            .and_then(|a| a.checked_next_multiple_of(SHARED_PAGE))
            .ok_or(DmaError::Exhausted)?;
        table.mappings.insert(
            addr,
            Mapping {
                addr,
                target: memory,
            },
        );
        Ok(addr)
    }

    /// Maps `target` at DMA address `iova` (chosen by the caller). Refuses an empty
    /// target, a range that wraps past 2^64, and one overlapping any existing mapping.
    pub fn map_at(&self, iova: u64, target: Arc<dyn DmaTarget>) -> Result<(), DmaError> {
        let len = target.len();
        let end = iova
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(DmaError::BadRange { addr: iova, len })?;
        let mut table = self.table();
        if let Some(m) = table.overlapping(iova, end) {
            return Err(DmaError::Overlap {
                addr: iova,
                len,
                existing: m.addr,
            });
        }
        table.mappings.insert(iova, Mapping { addr: iova, target });
        Ok(())
    }

    /// Removes the mapping [`DmaSpace::map`] placed at `addr`. Users that already
    /// resolved it keep their reference (the emulator does not model IOMMU faults on
    /// in-flight accesses).
    pub fn unmap(&self, addr: u64) -> Result<(), DmaError> {
        self.unmap_at(addr).map(drop)
    }

    /// Removes the mapping starting at `iova` (from [`DmaSpace::map_at`] or
    /// [`DmaSpace::map`]) and returns its target. As for [`DmaSpace::unmap`], users that
    /// already resolved it keep their reference.
    pub fn unmap_at(&self, iova: u64) -> Result<Arc<dyn DmaTarget>, DmaError> {
        self.table()
            .mappings
            .remove(&iova)
            .map(|m| m.target)
            .ok_or(DmaError::Unmapped { addr: iova, len: 0 })
    }

    /// The target holding `[addr, addr + len)` and the offset of `addr` in it.
    pub fn resolve(&self, addr: u64, len: u64) -> Result<(Arc<dyn DmaTarget>, u64), DmaError> {
        // Only the mapping starting last at or below `addr` can hold it.
        let table = self.table();
        table
            .mappings
            .range(..=addr)
            .next_back()
            .and_then(|(_, m)| {
                let off = addr - m.addr;
                let end = off.checked_add(len)?;
                (end <= m.target.len()).then(|| (Arc::clone(&m.target), off))
            })
            .ok_or(DmaError::Unmapped { addr, len })
    }

    /// Copies `buf.len()` bytes at DMA address `addr` (inside one mapping) into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (target, off) = self.resolve(addr, buf.len() as u64)?;
        target.read(off, buf)
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.table().mappings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target of `len` bytes that refuses every access (its content does not matter to
    /// the address-space tests).
    #[derive(Debug)]
    struct Opaque(u64);

    impl DmaTarget for Opaque {
        fn len(&self) -> u64 {
            self.0
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DmaError> {
            Err(DmaError::NotReadable)
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), DmaError> {
            Err(DmaError::NotWritable)
        }
        fn load_u32(&self, _: u64) -> Result<u32, DmaError> {
            Err(DmaError::NotReadable)
        }
        fn store_u32(&self, _: u64, _: u32) -> Result<(), DmaError> {
            Err(DmaError::NotWritable)
        }
    }

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
        let mut buf2 = [0; 16];
        space.read(da + 0x2FF0, &mut buf2).unwrap();
        assert_eq!(buf2, [7; 16]);
        assert!(space.resolve(da + 0x2FF0, 17).is_err());
        assert!(space.resolve(da - 1, 1).is_err());
        assert!(space.resolve(db, 0x1000).is_ok());
        space.unmap(da).unwrap();
        assert!(space.resolve(da, 1).is_err());
        assert!(space.unmap(da).is_err());
        assert_eq!(space.mapping_count(), 1);
    }

    #[test]
    fn map_at_refuses_overlap_and_overflow_and_unmaps() {
        let space = DmaSpace::default();
        space.map_at(0x10_0000, Arc::new(Opaque(0x2000))).unwrap();
        for (iova, len) in [
            (0x10_0000, 0x1000),
            (0x10_1000, 0x1000),
            (0x0F_F000, 0x2000),
            (0x0F_0000, 0x20_0000),
        ] {
            assert!(
                matches!(
                    space.map_at(iova, Arc::new(Opaque(len))),
                    Err(DmaError::Overlap {
                        existing: 0x10_0000,
                        ..
                    })
                ),
                "{iova:#x} + {len:#x}"
            );
        }
        // Touching ranges on both sides are fine.
        space.map_at(0x0F_F000, Arc::new(Opaque(0x1000))).unwrap();
        space.map_at(0x10_2000, Arc::new(Opaque(0x1000))).unwrap();
        assert!(matches!(
            space.map_at(u64::MAX - 0xFFF, Arc::new(Opaque(0x2000))),
            Err(DmaError::BadRange { .. })
        ));
        assert!(matches!(
            space.map_at(0x50_0000, Arc::new(Opaque(0))),
            Err(DmaError::BadRange { .. })
        ));
        // A range may end just below 2^64 (ends are exclusive and must fit a u64).
        space
            .map_at(u64::MAX - 0x1FFF, Arc::new(Opaque(0x1000)))
            .unwrap();
        assert_eq!(space.mapping_count(), 4);
        let (t, off) = space.resolve(0x10_1FFC, 4).unwrap();
        assert_eq!((t.len(), off), (0x2000, 0x1FFC));
        assert!(space.resolve(0x10_1FFC, 8).is_err(), "spans two mappings");
        assert_eq!(space.unmap_at(0x10_0000).unwrap().len(), 0x2000);
        assert!(space.resolve(0x10_0000, 4).is_err());
        assert!(matches!(
            space.unmap_at(0x10_0000),
            Err(DmaError::Unmapped { .. })
        ));
        // The hole can be mapped again.
        space.map_at(0x10_0000, Arc::new(Opaque(0x2000))).unwrap();
    }

    #[test]
    fn map_picks_addresses_that_collide_with_nothing() {
        let space = DmaSpace::default();
        // A foreign mapping exactly where `map` would start, and one just past its guard.
        space.map_at(DMA_BASE, Arc::new(Opaque(0x4000))).unwrap();
        let far = DMA_BASE + 0x4000 + GUARD + 0x1000;
        space.map_at(far, Arc::new(Opaque(0x1000))).unwrap();
        let m = SharedMemory::create(c"m", 0x2000).unwrap();
        let addr = space.map(m.as_fd(), 0x2000).unwrap();
        assert_eq!(addr % SHARED_PAGE, 0);
        for (start, len) in [(DMA_BASE, 0x4000), (far, 0x1000)] {
            assert!(
                addr + 0x2000 + GUARD <= start || start + len + GUARD <= addr,
                "{addr:#x} too close to {start:#x}"
            );
        }
        let addr2 = space.map(m.as_fd(), 0x2000).unwrap();
        assert!(addr2 >= addr + 0x2000 + GUARD);
        assert_eq!(space.mapping_count(), 4);
        m.write(0, &[5]).unwrap();
        let mut b = [0u8; 1];
        space.read(addr2, &mut b).unwrap();
        assert_eq!(b, [5]);
    }

    #[test]
    fn many_mappings_are_told_apart() {
        // 4096 mappings of 4 KiB with 4 KiB holes between them, placed out of order.
        let space = DmaSpace::default();
        let at = |i: u64| 0x1000_0000 + i * 0x2000;
        for i in (0..4096).rev().step_by(2).chain((0..4096).step_by(2)) {
            space.map_at(at(i), Arc::new(Opaque(0x1000 + i))).unwrap();
        }
        assert_eq!(space.mapping_count(), 4096);
        for i in [0, 1, 2047, 2048, 4095] {
            let (t, off) = space.resolve(at(i) + 0x10, 4).unwrap();
            assert_eq!((t.len(), off), (0x1000 + i, 0x10));
            // The hole after each mapping (past its 0x1000 + i bytes) resolves to nothing.
            assert!(space.resolve(at(i) + 0x1000 + i, 1).is_err());
            assert!(matches!(
                space.map_at(at(i) + 0xFFF, Arc::new(Opaque(2))),
                Err(DmaError::Overlap { existing, .. }) if existing == at(i)
            ));
        }
        // A range covering a hole and the start of the next mapping overlaps that mapping.
        assert!(matches!(
            space.map_at(at(7) + 0x1800, Arc::new(Opaque(0x1000))),
            Err(DmaError::Overlap { existing, .. }) if existing == at(8)
        ));
        space
            .map_at(at(7) + 0x1800, Arc::new(Opaque(0x800)))
            .unwrap();
        space.unmap_at(at(8)).unwrap();
        assert!(space.resolve(at(8), 1).is_err());
        assert_eq!(space.mapping_count(), 4096);
    }
}
