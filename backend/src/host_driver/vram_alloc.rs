//! A simple allocator of 4 KiB VRAM pages for page tables: pages come from a fixed
//! `[start, end)` range, first from a LIFO free list, then by bumping a high-water mark.
//! Fresh pages are handed out in ascending address order, which keeps tables written one
//! after another inside the same PRAMIN window.

use std::collections::HashSet;

use thiserror::Error;

use super::addr::{VramAddr, KIB};

/// Size and alignment of an allocated page.
pub const PAGE: u64 = 4 * KIB;

/// Errors of the page allocator.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    /// The range bounds are not page aligned or `start > end`.
    #[error("invalid allocator range [{start}, {end}): bounds must be 4 KiB aligned and ordered")]
    InvalidRange {
        /// Start of the range.
        start: VramAddr,
        /// End of the range.
        end: VramAddr,
    },
    /// Not enough free pages.
    #[error("VRAM page allocator exhausted: {requested} page(s) requested, {available} available")]
    Exhausted {
        /// Pages requested.
        requested: u64,
        /// Pages available.
        available: u64,
    },
    /// The page freed is not an allocated page of this allocator (double free, foreign
    /// or misaligned address).
    #[error("{0} is not an allocated page of this allocator")]
    NotAllocated(VramAddr),
}

/// Allocator of 4 KiB pages in `[start, end)`.
#[derive(Debug)]
pub struct VramAllocator {
    start: VramAddr,
    end: VramAddr,
    /// Pages at or above this address have never been handed out.
    next: VramAddr,
    free: Vec<VramAddr>,
    allocated: HashSet<VramAddr>,
}

impl VramAllocator {
    /// An allocator handing out the pages of `[start, end)`; both bounds 4 KiB aligned.
    pub fn new(start: VramAddr, end: VramAddr) -> Result<VramAllocator, AllocError> {
        if !start.is_aligned(PAGE) || !end.is_aligned(PAGE) || start > end {
            return Err(AllocError::InvalidRange { start, end });
        }
        Ok(VramAllocator {
            start,
            end,
            next: start,
            free: Vec::new(),
            allocated: HashSet::new(),
        })
    }

    /// Start of the managed range.
    pub fn start(&self) -> VramAddr {
        self.start
    }

    /// End of the managed range.
    pub fn end(&self) -> VramAddr {
        self.end
    }

    /// Total pages managed.
    pub fn capacity_pages(&self) -> u64 {
        (self.end.raw() - self.start.raw()) / PAGE
    }

    /// Pages currently allocated.
    pub fn allocated_pages(&self) -> u64 {
        self.allocated.len() as u64
    }

    /// Pages that can still be allocated.
    pub fn available_pages(&self) -> u64 {
        self.capacity_pages() - self.allocated_pages()
    }

    /// Whether `addr` is a currently allocated page.
    pub fn is_allocated(&self, addr: VramAddr) -> bool {
        self.allocated.contains(&addr)
    }

    /// One page. Its contents are whatever VRAM holds: callers zero-fill.
    pub fn alloc(&mut self) -> Result<VramAddr, AllocError> {
        let page = match self.free.pop() {
            Some(page) => page,
            None if self.next < self.end => {
                let page = self.next;
                self.next = VramAddr::new(page.raw() + PAGE);
                page
            }
            None => {
                return Err(AllocError::Exhausted {
                    requested: 1,
                    available: 0,
                })
            }
        };
        self.allocated.insert(page);
        Ok(page)
    }

    /// `count` pages, all or none. Fresh pages come in ascending order.
    pub fn alloc_many(&mut self, count: u64) -> Result<Vec<VramAddr>, AllocError> {
        let available = self.available_pages();
        if count > available {
            return Err(AllocError::Exhausted {
                requested: count,
                available,
            });
        }
        (0..count).map(|_| self.alloc()).collect()
    }

    /// Returns `page` to the allocator.
    pub fn free(&mut self, page: VramAddr) -> Result<(), AllocError> {
        if !self.allocated.remove(&page) {
            return Err(AllocError::NotAllocated(page));
        }
        self.free.push(page);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn bounds_exhaustion_and_frees() {
        assert!(VramAllocator::new(VramAddr::new(0x1001), VramAddr::new(0x4000)).is_err());
        assert!(VramAllocator::new(VramAddr::new(0x4000), VramAddr::new(0x1000)).is_err());
        let mut a = VramAllocator::new(VramAddr::new(0x10_0000), VramAddr::new(0x10_3000)).unwrap();
        assert_eq!(a.capacity_pages(), 3);
        let p: Vec<_> = (0..3).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(
            p,
            [0x10_0000, 0x10_1000, 0x10_2000]
                .map(VramAddr::new)
                .to_vec()
        );
        assert!(matches!(a.alloc(), Err(AllocError::Exhausted { .. })));
        assert!(matches!(a.alloc_many(1), Err(AllocError::Exhausted { .. })));
        a.free(p[1]).unwrap();
        assert_eq!(a.free(p[1]), Err(AllocError::NotAllocated(p[1])));
        assert_eq!(
            a.free(VramAddr::new(0x10_0800)),
            Err(AllocError::NotAllocated(VramAddr::new(0x10_0800)))
        );
        assert_eq!(a.alloc().unwrap(), p[1]);
        assert_eq!(a.available_pages(), 0);
        let mut empty = VramAllocator::new(VramAddr::ZERO, VramAddr::ZERO).unwrap();
        assert!(empty.alloc().is_err());
        assert_eq!(empty.alloc_many(0).unwrap(), vec![]);
    }

    proptest! {
        #[test]
        fn no_double_allocation_and_alignment(
            pages in 1u64..64,
            ops in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..300),
        ) {
            let start = VramAddr::new(0x40_0000);
            let end = VramAddr::new(0x40_0000 + pages * PAGE);
            let mut a = VramAllocator::new(start, end).unwrap();
            let mut live = BTreeSet::new();
            for (alloc, pick) in ops {
                if alloc || live.is_empty() {
                    match a.alloc() {
                        Ok(p) => {
                            prop_assert!(p.is_aligned(PAGE));
                            prop_assert!(p >= start && p < end);
                            prop_assert!(live.insert(p), "page {p} handed out twice");
                        }
                        Err(AllocError::Exhausted { .. }) => {
                            prop_assert_eq!(live.len() as u64, pages);
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                } else {
                    let p = *live.iter().nth(pick.index(live.len())).unwrap();
                    live.remove(&p);
                    a.free(p).unwrap();
                    prop_assert!(a.free(p).is_err(), "double free accepted");
                }
                prop_assert_eq!(a.allocated_pages(), live.len() as u64);
            }
            // Everything left can still be allocated, and only once.
            let rest = a.alloc_many(a.available_pages()).unwrap();
            for p in rest {
                prop_assert!(live.insert(p));
            }
            prop_assert_eq!(live.len() as u64, pages);
        }
    }
}
