//! VRAM partitioning: [`Slice`] (a guest's range of host VRAM) and [`VramPartition`] (where
//! slices may be carved and where the host keeps its own structures).
//!
//! Layout of host VRAM when it is sliced between guests:
//!
//! ```text
//! 0                                    guest_area_end          usable_vram     vram_size
//! | slice 0 | slice 1 | ... | (free)   | host-reserved (64 MiB) | carve-outs (GH200 resmem)
//! ```
//!
//! - Slices are 2 MiB aligned and a multiple of 2 MiB long, so the BAR1 page tables that
//!   translate them can use 2 MiB pages only.
//! - The **host-reserved region** is the last [`HOST_RESERVED_SIZE`] bytes of *usable* VRAM:
//!   the BAR1 page tables and instance block live there, and no guest can reach it.
//! - Carve-outs past usable VRAM (the GH200's 1 GiB resmem) belong to no sliced guest.
//!
//! A GPU served to a single guest as a whole ([`VramPartition::whole_gpu_slice`]) has no
//! host-reserved region: that guest's slice is all of device memory, carve-outs included,
//! so it sees exactly the BARs of the real part.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

use crate::host_driver::addr::{VramAddr, MIB};
use crate::host_gpu::ChipIdentity;

/// Alignment and size granularity of a slice (one 2 MiB page of the BAR1 page tables).
pub const SLICE_ALIGN: u64 = 2 * MIB;
/// Size of the host-reserved region at the top of usable VRAM (page tables, instance
/// blocks). 64 MiB holds 16 Ki table pages: far more than 2 MiB mappings of all of VRAM
/// need (about one 4 KiB table per GiB).
pub const HOST_RESERVED_SIZE: u64 = 64 * MIB;

/// Errors of partitioning VRAM.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PartitionError {
    /// A slice of zero bytes.
    #[error("a slice cannot be empty")]
    EmptySlice,
    /// Start or size is not a multiple of 2 MiB.
    #[error("slice {start} + {size:#x} is not 2 MiB aligned (start and size must be multiples of 2 MiB)")]
    Misaligned {
        /// Start of the slice.
        start: VramAddr,
        /// Size of the slice.
        size: u64,
    },
    /// The slice does not lie inside the area guests may be given.
    #[error(
        "slice {start} + {size:#x} is outside the guest area [0, {guest_area_end:#x}) of VRAM"
    )]
    OutOfRange {
        /// Start of the slice.
        start: VramAddr,
        /// Size of the slice.
        size: u64,
        /// End of the guest area (start of the host-reserved region).
        guest_area_end: u64,
    },
    /// The slice overlaps one already handed out.
    #[error("slice {start} + {size:#x} overlaps the slice {other}")]
    Overlap {
        /// Start of the slice.
        start: VramAddr,
        /// Size of the slice.
        size: u64,
        /// The slice it overlaps.
        other: Slice,
    },
    /// No free range of the requested size is left.
    #[error("no free {size:#x}-byte range left in the {guest_area_end:#x}-byte guest area ({free:#x} bytes free)")]
    NoSpace {
        /// Requested size.
        size: u64,
        /// Bytes still free (possibly fragmented).
        free: u64,
        /// End of the guest area.
        guest_area_end: u64,
    },
    /// Releasing a slice that is not handed out.
    #[error("{0} is not a slice handed out by this partition")]
    NotAssigned(Slice),
    /// Usable VRAM is too small to hold the host-reserved region and any slice.
    #[error("usable VRAM of {usable:#x} bytes leaves no room for slices next to the {reserved:#x}-byte host-reserved region")]
    TooSmall {
        /// Usable VRAM.
        usable: u64,
        /// Host-reserved size.
        reserved: u64,
    },
}

/// A guest's VRAM: host VRAM `[start, start + size)`. The guest addresses it as
/// `[0, size)`: guest VRAM address `g` is host address `start + g`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slice {
    start: VramAddr,
    size: u64,
}

impl Slice {
    /// The slice `[start, start + size)` with no alignment checks (use
    /// [`VramPartition::check`] for slices handed to guests).
    pub const fn new(start: VramAddr, size: u64) -> Slice {
        Slice { start, size }
    }

    /// First host VRAM address of the slice.
    pub const fn start(&self) -> VramAddr {
        self.start
    }

    /// Length in bytes (the size of the guest's VRAM).
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// One past the last host VRAM address (saturating).
    pub const fn end(&self) -> u64 {
        self.start.raw().saturating_add(self.size)
    }

    /// The host address of guest VRAM `[guest, guest + len)`, if it lies inside the slice.
    pub fn host_addr(&self, guest: u64, len: u64) -> Option<VramAddr> {
        let end = guest.checked_add(len)?;
        (end <= self.size).then(|| VramAddr::new(self.start.raw() + guest))
    }

    /// Whether host VRAM address `addr` lies inside the slice.
    pub fn contains(&self, addr: VramAddr) -> bool {
        addr >= self.start && addr.raw() < self.end()
    }

    /// Whether the two slices share a byte.
    pub fn overlaps(&self, other: &Slice) -> bool {
        self.start.raw() < other.end() && other.start.raw() < self.end()
    }
}

impl fmt::Debug for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slice[{:#x}, {:#x})", self.start.raw(), self.end())
    }
}

impl fmt::Display for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.raw(), self.end())
    }
}

/// A byte range of host VRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VramRange {
    /// First address.
    pub start: VramAddr,
    /// One past the last address.
    pub end: VramAddr,
}

impl VramRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.raw().saturating_sub(self.start.raw())
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How host VRAM is split between guests and the host, and which slices are handed out.
#[derive(Debug, Clone)]
pub struct VramPartition {
    vram_size: u64,
    usable: u64,
    guest_area_end: u64,
    assigned: BTreeMap<VramAddr, u64>,
}

impl VramPartition {
    /// The partition of a GPU with `identity`: guests in `[0, usable - 64 MiB)` rounded
    /// down to 2 MiB, the host-reserved region above it up to usable VRAM.
    pub fn new(identity: &ChipIdentity) -> Result<VramPartition, PartitionError> {
        Self::with_sizes(identity.vram_size, identity.usable_vram_size)
    }

    /// The partition of `vram_size` bytes of VRAM of which `usable` are usable.
    pub fn with_sizes(vram_size: u64, usable: u64) -> Result<VramPartition, PartitionError> {
        let usable = usable.min(vram_size);
        let reserved_start = usable.saturating_sub(HOST_RESERVED_SIZE);
        let guest_area_end = reserved_start - reserved_start % SLICE_ALIGN;
        if guest_area_end == 0 {
            return Err(PartitionError::TooSmall {
                usable,
                reserved: HOST_RESERVED_SIZE,
            });
        }
        Ok(VramPartition {
            vram_size,
            usable,
            guest_area_end,
            assigned: BTreeMap::new(),
        })
    }

    /// The one slice of a GPU given whole to a single guest: all of device memory,
    /// carve-outs included, with no host-reserved region.
    pub fn whole_gpu_slice(identity: &ChipIdentity) -> Slice {
        Slice::new(VramAddr::ZERO, identity.vram_size)
    }

    /// Total device memory.
    pub fn vram_size(&self) -> u64 {
        self.vram_size
    }

    /// Usable device memory.
    pub fn usable(&self) -> u64 {
        self.usable
    }

    /// End of the area slices are carved from (start of the host-reserved region,
    /// rounded down to 2 MiB).
    pub fn guest_area_end(&self) -> u64 {
        self.guest_area_end
    }

    /// The host-reserved region: `[guest_area_end, usable)`.
    pub fn host_reserved(&self) -> VramRange {
        VramRange {
            start: VramAddr::new(self.guest_area_end),
            end: VramAddr::new(self.usable),
        }
    }

    /// The slices handed out, by start address.
    pub fn assigned(&self) -> impl Iterator<Item = Slice> + '_ {
        self.assigned
            .iter()
            .map(|(&start, &size)| Slice::new(start, size))
    }

    /// Bytes of the guest area not handed out.
    pub fn free_bytes(&self) -> u64 {
        self.guest_area_end - self.assigned.values().sum::<u64>()
    }

    /// Checks that `[start, start + size)` could be handed out: non-empty, 2 MiB aligned,
    /// inside the guest area and overlapping no assigned slice.
    pub fn check(&self, start: VramAddr, size: u64) -> Result<Slice, PartitionError> {
        if size == 0 {
            return Err(PartitionError::EmptySlice);
        }
        if !start.is_aligned(SLICE_ALIGN) || size % SLICE_ALIGN != 0 {
            return Err(PartitionError::Misaligned { start, size });
        }
        let fits = start
            .raw()
            .checked_add(size)
            .is_some_and(|end| end <= self.guest_area_end);
        if !fits {
            return Err(PartitionError::OutOfRange {
                start,
                size,
                guest_area_end: self.guest_area_end,
            });
        }
        let slice = Slice::new(start, size);
        let end = VramAddr::new(slice.end());
        // The last slice starting below our end is the only candidate for an overlap.
        if let Some((&s, &len)) = self.assigned.range(..end).next_back() {
            let other = Slice::new(s, len);
            if other.overlaps(&slice) {
                return Err(PartitionError::Overlap { start, size, other });
            }
        }
        Ok(slice)
    }

    /// Hands out `[start, start + size)` (see [`check`](Self::check)).
    pub fn assign_at(&mut self, start: VramAddr, size: u64) -> Result<Slice, PartitionError> {
        let slice = self.check(start, size)?;
        self.assigned.insert(slice.start(), slice.size());
        Ok(slice)
    }

    /// Hands out the lowest free range of `size` bytes: consecutive requests get
    /// consecutive slices from address 0.
    pub fn assign(&mut self, size: u64) -> Result<Slice, PartitionError> {
        if size == 0 {
            return Err(PartitionError::EmptySlice);
        }
        if size % SLICE_ALIGN != 0 {
            return Err(PartitionError::Misaligned {
                start: VramAddr::ZERO,
                size,
            });
        }
        let mut candidate = 0u64;
        for (&start, &len) in &self.assigned {
            if candidate
                .checked_add(size)
                .is_some_and(|e| e <= start.raw())
            {
                break;
            }
            candidate = start.raw() + len;
        }
        if candidate
            .checked_add(size)
            .is_none_or(|e| e > self.guest_area_end)
        {
            return Err(PartitionError::NoSpace {
                size,
                free: self.free_bytes(),
                guest_area_end: self.guest_area_end,
            });
        }
        self.assign_at(VramAddr::new(candidate), size)
    }

    /// Takes `slice` back.
    pub fn release(&mut self, slice: Slice) -> Result<(), PartitionError> {
        match self.assigned.get(&slice.start()) {
            Some(&size) if size == slice.size() => {
                self.assigned.remove(&slice.start());
                Ok(())
            }
            _ => Err(PartitionError::NotAssigned(slice)),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::host_driver::addr::GIB;

    fn partition() -> VramPartition {
        // 24,220 MiB like the emulated TU102.
        VramPartition::with_sizes(24_220 * MIB, 24_220 * MIB).unwrap()
    }

    #[test]
    fn host_reserved_region_is_the_top_of_usable_vram() {
        let p = partition();
        assert_eq!(p.guest_area_end(), 24_156 * MIB);
        assert_eq!(p.host_reserved().len(), 64 * MIB);
        // GH200: resmem above usable belongs to nobody; reserved is below it.
        let gh200 = VramPartition::with_sizes(96 * GIB, 95 * GIB).unwrap();
        assert_eq!(gh200.host_reserved().end.raw(), 95 * GIB);
        assert_eq!(gh200.guest_area_end(), 95 * GIB - 64 * MIB);
        assert!(VramPartition::with_sizes(64 * MIB, 64 * MIB).is_err());
        // Unaligned usable sizes round the guest area down to 2 MiB.
        let odd = VramPartition::with_sizes(GIB + 5 * MIB, GIB + 5 * MIB).unwrap();
        assert_eq!(odd.guest_area_end() % SLICE_ALIGN, 0);
        assert!(odd.guest_area_end() + HOST_RESERVED_SIZE <= odd.usable());
    }

    #[test]
    fn consecutive_slices_and_errors() {
        let mut p = partition();
        let a = p.assign(8 * GIB).unwrap();
        let b = p.assign(8 * GIB).unwrap();
        assert_eq!((a.start().raw(), b.start().raw()), (0, 8 * GIB));
        assert!(matches!(p.assign(0), Err(PartitionError::EmptySlice)));
        assert!(matches!(
            p.assign(3 * MIB),
            Err(PartitionError::Misaligned { .. })
        ));
        assert!(matches!(
            p.assign(8 * GIB),
            Err(PartitionError::NoSpace { .. })
        ));
        assert!(matches!(
            p.assign_at(VramAddr::new(4 * GIB), 2 * MIB),
            Err(PartitionError::Overlap { .. })
        ));
        assert!(matches!(
            p.assign_at(VramAddr::new(1 << 20), 2 * MIB),
            Err(PartitionError::Misaligned { .. })
        ));
        assert!(matches!(
            p.assign_at(VramAddr::new(p.guest_area_end()), 2 * MIB),
            Err(PartitionError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.assign_at(VramAddr::new(u64::MAX - MIB - 1), 2 * MIB),
            Err(PartitionError::Misaligned { .. }) | Err(PartitionError::OutOfRange { .. })
        ));
        p.release(a).unwrap();
        assert_eq!(p.release(a), Err(PartitionError::NotAssigned(a)));
        // The hole at 0 is reused first.
        assert_eq!(p.assign(2 * MIB).unwrap().start(), VramAddr::ZERO);
        assert_eq!(a.host_addr(8 * GIB - 1, 1).unwrap().raw(), 8 * GIB - 1);
        assert_eq!(a.host_addr(8 * GIB - 1, 2), None);
        assert_eq!(b.host_addr(u64::MAX, 2), None);
    }

    proptest! {
        #[test]
        fn assigned_slices_never_overlap_or_leave_the_guest_area(
            ops in proptest::collection::vec((0u64..64, 1u64..2048, any::<bool>(), any::<prop::sample::Index>()), 1..60)
        ) {
            let mut p = VramPartition::with_sizes(4 * GIB, 4 * GIB - 8 * MIB).unwrap();
            let mut live: Vec<Slice> = Vec::new();
            for (at, pages, by_address, pick) in ops {
                if !live.is_empty() && pages % 5 == 0 {
                    let s = live.remove(pick.index(live.len()));
                    p.release(s).unwrap();
                    continue;
                }
                let size = (pages % 512 + 1) * SLICE_ALIGN;
                let result = if by_address {
                    p.assign_at(VramAddr::new(at * 64 * MIB), size)
                } else {
                    p.assign(size)
                };
                if let Ok(s) = result {
                    prop_assert!(s.end() <= p.guest_area_end());
                    prop_assert!(s.start().is_aligned(SLICE_ALIGN));
                    for o in &live {
                        prop_assert!(!o.overlaps(&s), "{s:?} overlaps {o:?}");
                    }
                    live.push(s);
                }
                prop_assert_eq!(p.assigned().count(), live.len());
            }
        }
    }
}
