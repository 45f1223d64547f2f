//! Where resource pixels live: a guest's own VRAM slice, seen through [`SliceStore`], and a
//! top-down allocator of byte ranges in it ([`SliceAllocator`]).
//!
//! Resources are not host heap memory: their bytes count against the guest's slice, so a guest
//! whose slice is full gets `ERR_OUT_OF_MEMORY` rather than memory of the host or of another
//! guest. [`SliceVramStore`] is the store over (part of) a guest's slice, reached through the
//! shared host PRAMIN window ([`HostVram`]); [`HostMemoryStore`] is one over a range of a mapped
//! memory BAR; [`VecStore`] is host heap memory, for tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::host_driver::addr::GpuVa;
use crate::host_gpu::HostMemory;
use crate::slice::{GuestSlice, HostVram, Slice, SliceAccess};

/// Alignment of every allocation (a page, so a resource could later be mapped).
pub const ALLOC_ALIGN: u64 = 4096;

/// Errors of a store or its allocator.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The access falls outside the store.
    #[error("access of {len} bytes at {offset:#x} is outside the {size:#x}-byte store")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Store size.
        size: u64,
    },
    /// The memory behind the store failed.
    #[error("store access failed: {0}")]
    Backend(String),
    /// No free range is large enough.
    #[error("no free range of {0} bytes in the slice")]
    OutOfMemory(u64),
    /// The range freed is not an allocation.
    #[error("{0:#x} is not an allocation")]
    NotAllocated(u64),
}

/// Byte-addressed memory holding a guest's resources: offsets are relative to the guest's
/// slice, `[0, size())`.
pub trait SliceStore: Send {
    /// Size of the slice in bytes.
    fn size(&self) -> u64;
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;
    /// Copies `data` to `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError>;
    /// Zeroes `len` bytes at `offset` (a freed resource's bytes, before they are reused).
    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError>;
}

/// Checks `[offset, offset + len)` lies inside `[0, size)`.
fn check(offset: u64, len: u64, size: u64) -> Result<(), StoreError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange { offset, len, size }),
    }
}

/// A store over host memory: for tests, and for a slice with no VRAM behind it.
#[derive(Debug, Clone, Default)]
pub struct VecStore {
    bytes: Vec<u8>,
}

impl VecStore {
    /// A store of `size` bytes, each set to `fill`.
    pub fn new(size: usize, fill: u8) -> VecStore {
        VecStore {
            bytes: vec![fill; size],
        }
    }

    /// The whole store.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl SliceStore for VecStore {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        check(offset, buf.len() as u64, self.size())?;
        let at = offset as usize;
        buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        check(offset, data.len() as u64, self.size())?;
        let at = offset as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        check(offset, len, self.size())?;
        let at = offset as usize;
        self.bytes[at..at + len as usize].fill(0);
        Ok(())
    }
}

/// A store over `[base, base + size)` of a host memory region (a guest's slice of the VRAM
/// BAR).
pub struct HostMemoryStore {
    memory: Arc<dyn HostMemory>,
    base: u64,
    size: u64,
}

impl HostMemoryStore {
    /// The store of `[base, base + size)` of `memory`; `None` if the range is not inside it.
    pub fn new(memory: Arc<dyn HostMemory>, base: u64, size: u64) -> Option<HostMemoryStore> {
        let end = base.checked_add(size)?;
        (end <= memory.len()).then_some(HostMemoryStore { memory, base, size })
    }
}

impl SliceStore for HostMemoryStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        check(offset, buf.len() as u64, self.size)?;
        self.memory
            .read(self.base + offset, buf)
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        check(offset, data.len() as u64, self.size)?;
        self.memory
            .write(self.base + offset, data)
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        check(offset, len, self.size)?;
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// A store over a range of host VRAM (a guest's slice, or the part of it set aside for display
/// resources). Bytes move through the guest's window of the host BAR1 when it has one (a
/// sliced GPU: the GPU MMU translates every access with the page tables of that window, so it
/// can only reach the slice; on hardware BAR1 is a mapped aperture, far faster than PRAMIN),
/// else through the host PRAMIN window (a GPU given whole, whose BAR1 is the guest's).
/// Scrubs go through [`HostVram::scrub`].
pub struct SliceVramStore {
    vram: Arc<HostVram>,
    range: Slice,
    /// BAR1 VA of the slice's first byte, if bytes move through BAR1.
    bar1: Option<GpuVa>,
    /// The guest's access to its slice: once revoked (the guest removed), every access
    /// fails, whatever a display thread still does.
    access: Option<Arc<SliceAccess>>,
}

impl SliceVramStore {
    /// The store over `range` of host VRAM.
    pub fn new(vram: Arc<HostVram>, range: Slice) -> SliceVramStore {
        SliceVramStore {
            vram,
            range,
            bar1: None,
            access: None,
        }
    }

    /// The store over a guest's slice, usable only as long as the guest owns it, through
    /// its BAR1 window if it has one.
    pub fn for_guest(guest: &GuestSlice) -> SliceVramStore {
        SliceVramStore {
            vram: Arc::clone(guest.vram()),
            range: guest.slice(),
            bar1: guest.bar1_window(),
            access: Some(Arc::clone(guest.access())),
        }
    }

    /// The BAR1 offset of `offset` of the slice (checked against the slice first).
    fn bar1_at(&self, va: GpuVa, offset: u64, len: u64) -> Result<u64, StoreError> {
        self.at(offset, len)?;
        va.offset(offset)
            .map(GpuVa::raw)
            .ok_or(StoreError::OutOfRange {
                offset,
                len,
                size: self.range.size(),
            })
    }

    /// Runs `f` if the slice is still the guest's.
    fn live<R>(&self, f: impl FnOnce() -> Result<R, StoreError>) -> Result<R, StoreError> {
        match &self.access {
            None => f(),
            Some(access) => access.with_live(f).unwrap_or_else(|| {
                Err(StoreError::Backend("the guest's slice was revoked".into()))
            }),
        }
    }

    fn at(&self, offset: u64, len: u64) -> Result<crate::host_driver::addr::VramAddr, StoreError> {
        self.range
            .host_addr(offset, len)
            .ok_or(StoreError::OutOfRange {
                offset,
                len,
                size: self.range.size(),
            })
    }
}

impl SliceStore for SliceVramStore {
    fn size(&self) -> u64 {
        self.range.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let backend = |e: &dyn std::fmt::Display| StoreError::Backend(e.to_string());
        if let Some(va) = self.bar1 {
            let at = self.bar1_at(va, offset, buf.len() as u64)?;
            return self.live(|| self.vram.host().bar1_read(at, buf).map_err(|e| backend(&e)));
        }
        let addr = self.at(offset, buf.len() as u64)?;
        self.live(|| self.vram.read(addr, buf).map_err(|e| backend(&e)))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let backend = |e: &dyn std::fmt::Display| StoreError::Backend(e.to_string());
        if let Some(va) = self.bar1 {
            let at = self.bar1_at(va, offset, data.len() as u64)?;
            return self.live(|| {
                self.vram
                    .host()
                    .bar1_write(at, data)
                    .map_err(|e| backend(&e))
            });
        }
        let addr = self.at(offset, data.len() as u64)?;
        self.live(|| self.vram.write(addr, data).map_err(|e| backend(&e)))
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        let addr = self.at(offset, len)?;
        self.live(|| {
            self.vram
                .scrub(addr, len)
                .map_err(|e| StoreError::Backend(e.to_string()))
        })
    }
}

/// A store chosen at run time (the slice's VRAM, or host memory in tests).
impl<S: SliceStore + ?Sized> SliceStore for Box<S> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        (**self).read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        (**self).write(offset, data)
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        (**self).scrub(offset, len)
    }
}

/// Shares one store between its owner and an observer (tests record through it).
impl<S: SliceStore> SliceStore for Arc<Mutex<S>> {
    fn size(&self) -> u64 {
        self.lock().map(|s| s.size()).unwrap_or(0)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.lock()
            .map_err(|_| StoreError::Backend("poisoned".into()))?
            .read(offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.lock()
            .map_err(|_| StoreError::Backend("poisoned".into()))?
            .write(offset, data)
    }

    fn scrub(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.lock()
            .map_err(|_| StoreError::Backend("poisoned".into()))?
            .scrub(offset, len)
    }
}

/// Allocator of [`ALLOC_ALIGN`]-aligned byte ranges in `[0, size)`, placing each in the
/// highest free range that fits.
#[derive(Debug, Clone)]
pub struct SliceAllocator {
    size: u64,
    /// Allocated ranges: start -> length (rounded up to the alignment).
    used: BTreeMap<u64, u64>,
}

impl SliceAllocator {
    /// An allocator over `[0, size)`.
    pub fn new(size: u64) -> SliceAllocator {
        SliceAllocator {
            size,
            used: BTreeMap::new(),
        }
    }

    /// Bytes currently allocated (rounded to the alignment).
    pub fn allocated(&self) -> u64 {
        self.used.values().sum()
    }

    /// The highest free range of `len` bytes (`len > 0`, rounded up to [`ALLOC_ALIGN`]);
    /// returns its start. Resources fill the slice from its top down, away from the low
    /// VRAM a guest's own driver uses first; they meet only when the slice is full.
    pub fn alloc(&mut self, len: u64) -> Result<u64, StoreError> {
        let rounded = len
            .checked_next_multiple_of(ALLOC_ALIGN)
            .filter(|r| *r > 0)
            .ok_or(StoreError::OutOfMemory(len))?;
        // Free gaps from the top: [end of an allocation, start of the next one or `size`).
        // Starts and lengths are aligned, so every gap is (with `size` rounded down).
        let mut gap_end = self.size - self.size % ALLOC_ALIGN;
        let mut place = None;
        for (&start, &l) in self.used.iter().rev() {
            let gap_start = start + l;
            if gap_end.saturating_sub(gap_start) >= rounded {
                place = Some(gap_end - rounded);
                break;
            }
            gap_end = start;
        }
        let start = match place {
            Some(start) => start,
            None if gap_end >= rounded => gap_end - rounded,
            None => return Err(StoreError::OutOfMemory(len)),
        };
        self.used.insert(start, rounded);
        Ok(start)
    }

    /// Frees the allocation starting at `start`; returns its (rounded) length.
    pub fn free(&mut self, start: u64) -> Result<u64, StoreError> {
        self.used
            .remove(&start)
            .ok_or(StoreError::NotAllocated(start))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn vec_store_bounds() {
        let mut s = VecStore::new(16, 0xa5);
        s.write(12, &[1, 2, 3, 4]).unwrap();
        assert!(s.write(13, &[1, 2, 3, 4]).is_err());
        assert!(s.read(u64::MAX, &mut [0u8; 2]).is_err());
        s.scrub(12, 2).unwrap();
        assert_eq!(&s.bytes()[11..], &[0xa5, 0, 0, 3, 4]);
    }

    #[test]
    fn host_memory_store_is_a_window_of_vram() {
        use crate::host_gpu::emulated::EmulatedHostGpu;
        use crate::host_gpu::HostGpu;

        let gpu = EmulatedHostGpu::by_name("gh200-96g").unwrap();
        let bar = gpu.memory_bar(4).unwrap();
        let base = 0x20_0000;
        assert!(HostMemoryStore::new(Arc::clone(&bar), bar.len() - 4, 8).is_none());
        assert!(HostMemoryStore::new(Arc::clone(&bar), u64::MAX, 8).is_none());
        let mut s = HostMemoryStore::new(Arc::clone(&bar), base, 3 * ALLOC_ALIGN).unwrap();
        s.write(ALLOC_ALIGN, &[1, 2, 3, 4]).unwrap();
        let mut vram = [0u8; 4];
        bar.read(base + ALLOC_ALIGN, &mut vram).unwrap();
        assert_eq!(
            vram,
            [1, 2, 3, 4],
            "the bytes live at the slice's base in VRAM"
        );
        assert!(s.write(3 * ALLOC_ALIGN - 2, &[0; 4]).is_err());
        bar.write(base + 3 * ALLOC_ALIGN, &[0xee; 4]).unwrap();
        s.scrub(0, 3 * ALLOC_ALIGN).unwrap();
        let mut back = vec![0xffu8; 3 * ALLOC_ALIGN as usize + 4];
        bar.read(base, &mut back).unwrap();
        assert!(back[..3 * ALLOC_ALIGN as usize].iter().all(|b| *b == 0));
        assert_eq!(
            &back[3 * ALLOC_ALIGN as usize..],
            &[0xee; 4],
            "scrub stays inside"
        );
    }

    #[test]
    fn slice_vram_store_stays_in_its_slice() {
        use crate::host_driver::addr::VramAddr;
        use crate::host_gpu::emulated::EmulatedHostGpu;
        use crate::host_gpu::HostGpu;

        let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let vram = Arc::new(HostVram::new(host).unwrap());
        let start = VramAddr::new(0x400_0000);
        let mut s = SliceVramStore::new(Arc::clone(&vram), Slice::new(start, 2 * ALLOC_ALIGN));
        vram.write(VramAddr::new(start.raw() + 2 * ALLOC_ALIGN), &[0xee; 4])
            .unwrap();
        s.write(ALLOC_ALIGN, &[1, 2, 3, 4]).unwrap();
        let mut back = [0u8; 4];
        vram.read(VramAddr::new(start.raw() + ALLOC_ALIGN), &mut back)
            .unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        s.read(ALLOC_ALIGN, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        assert!(s.write(2 * ALLOC_ALIGN - 2, &[0; 4]).is_err());
        assert!(s.scrub(1, 2 * ALLOC_ALIGN).is_err());
        s.scrub(0, 2 * ALLOC_ALIGN).unwrap();
        let mut all = vec![0xffu8; 2 * ALLOC_ALIGN as usize + 4];
        vram.read(start, &mut all).unwrap();
        assert!(all[..2 * ALLOC_ALIGN as usize].iter().all(|b| *b == 0));
        assert_eq!(&all[2 * ALLOC_ALIGN as usize..], &[0xee; 4]);
    }

    #[test]
    fn a_removed_guests_store_reaches_nothing() {
        use crate::host_gpu::emulated::EmulatedHostGpu;
        use crate::host_gpu::HostGpu;
        use crate::slice::SlicedGpu;

        let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let mut gpu = SlicedGpu::new(host).unwrap();
        let guest = gpu.add_guest(2 << 20).unwrap();
        let mut s = SliceVramStore::for_guest(&guest);
        s.write(0x1000, &[7; 8]).unwrap();
        gpu.remove_guest(&guest).unwrap();
        // The range is free (and may be another guest's next): a display thread that still
        // holds the store cannot touch it.
        assert!(s.write(0x1000, &[9; 8]).is_err());
        assert!(s.read(0x1000, &mut [0u8; 8]).is_err());
        assert!(s.scrub(0, 4096).is_err());
        let mut back = [0u8; 8];
        gpu.vram()
            .read(guest.slice().host_addr(0x1000, 8).unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, [7; 8], "the write after removal did not land");
    }

    #[test]
    fn top_down_placement_reuses_holes_and_refuses_overflow() {
        let mut a = SliceAllocator::new(4 * ALLOC_ALIGN);
        assert_eq!(a.alloc(1).unwrap(), 3 * ALLOC_ALIGN, "the top page first");
        assert_eq!(a.alloc(ALLOC_ALIGN + 1).unwrap(), ALLOC_ALIGN);
        assert!(matches!(
            a.alloc(2 * ALLOC_ALIGN),
            Err(StoreError::OutOfMemory(_))
        ));
        assert_eq!(a.free(3 * ALLOC_ALIGN).unwrap(), ALLOC_ALIGN);
        assert!(a.free(3 * ALLOC_ALIGN).is_err());
        assert_eq!(a.alloc(10).unwrap(), 3 * ALLOC_ALIGN, "the freed hole");
        assert_eq!(a.alloc(ALLOC_ALIGN).unwrap(), 0, "the last hole");
        assert!(a.alloc(1).is_err(), "full");
        assert!(a.alloc(0).is_err());
        assert!(a.alloc(u64::MAX).is_err());
        // A size that is not a multiple of the alignment: the tail is never handed out.
        let mut b = SliceAllocator::new(2 * ALLOC_ALIGN + 100);
        assert_eq!(b.alloc(ALLOC_ALIGN).unwrap(), ALLOC_ALIGN);
        assert_eq!(b.alloc(ALLOC_ALIGN).unwrap(), 0);
        assert!(b.alloc(1).is_err());
    }

    proptest! {
        #[test]
        fn allocations_never_overlap(ops in proptest::collection::vec((any::<bool>(), 1u64..20_000, any::<prop::sample::Index>()), 0..200)) {
            let size = 64 * ALLOC_ALIGN;
            let mut a = SliceAllocator::new(size);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (alloc, len, pick) in ops {
                if alloc || live.is_empty() {
                    if let Ok(start) = a.alloc(len) {
                        prop_assert!(start % ALLOC_ALIGN == 0 && start + len <= size);
                        // Top-down: no free aligned range of this length lies above it.
                        let rounded = len.next_multiple_of(ALLOC_ALIGN);
                        let mut higher = start + ALLOC_ALIGN;
                        while higher + rounded <= size {
                            prop_assert!(
                                live.iter().any(|&(s, l)| higher < s + l && s < higher + rounded),
                                "a free range at {higher:#x} lies above {start:#x}"
                            );
                            higher += ALLOC_ALIGN;
                        }
                        for &(s, l) in &live {
                            prop_assert!(start + len <= s || s + l <= start);
                        }
                        live.push((start, rounded));
                    }
                } else {
                    let (s, _) = live.swap_remove(pick.index(live.len()));
                    a.free(s).unwrap();
                }
            }
        }
    }
}
