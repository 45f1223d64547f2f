//! [`Bar1Space`]: the host's BAR1 in virtual mode, one window per sliced guest.
//!
//! At setup the backend builds, in the host-reserved region, an instance block and an empty
//! address space of the chip's page-table format (MMU v2 or v3), binds BAR1 to it in
//! virtual mode and invalidates the TLB. Each guest then gets a **window**: BAR1 virtual
//! addresses `[base, base + slice.size)` mapped with the largest pages (2 MiB: slices are
//! 2 MiB aligned) to host VRAM `[slice.start, slice.end)`, so BAR1 offset `base + g` is the
//! guest's VRAM address `g`. Nothing else is mapped: the host-reserved region, carve-outs
//! and free VRAM are unreachable through BAR1, and every window is surrounded by
//! [`BAR1_GUARD`] bytes of unmapped VA, so an access running off a window faults (reads ~0)
//! instead of reaching the next guest.
//!
//! Windows are placed first-fit in BAR1 VA order starting at [`BAR1_GUARD`]; with guards
//! the BAR1 aperture (as large as usable VRAM on the emulated profiles) holds every slice
//! plus a 2 MiB gap per guest. Removing a window unmaps it, invalidates the TLB and only
//! then recycles its table pages.

use std::collections::BTreeMap;
use std::sync::Arc;

use thiserror::Error;

use super::partition::{Slice, VramRange};
use crate::host_driver::addr::{GpuVa, VramAddr, MIB};
use crate::host_driver::cursor::{CursorError, PraminCursor};
use crate::host_driver::instance::{
    bind_bar1, BarMode, InstanceBlock, InstanceError, PageDirBase, DEFAULT_BIND_TIMEOUT,
    INSTANCE_BLOCK_SIZE,
};
use crate::host_driver::page_table::builder::{BuildError, PageTableBuilder};
use crate::host_driver::page_table::format::PageTableFormat;
use crate::host_driver::page_table::TableTarget;
use crate::host_driver::tlb::{InvalidateScope, Tlb, TlbError};
use crate::host_driver::vram_alloc::{AllocError, VramAllocator};
use crate::host_gpu::HostGpu;

/// Unmapped BAR1 VA kept before and after every window.
pub const BAR1_GUARD: u64 = 2 * MIB;

/// Errors of the BAR1 address space.
#[derive(Debug, Error)]
pub enum Bar1Error {
    /// The GPU has no BAR1 aperture (no VRAM BAR at VRAM address 0).
    #[error("the GPU has no BAR1 aperture")]
    NoAperture,
    /// The BAR1 address space exists already.
    #[error("the BAR1 address space is already set up")]
    AlreadySetUp,
    /// The aperture has no free VA range for a window of this size.
    #[error("BAR1 aperture of {aperture:#x} bytes has no free {size:#x}-byte window (with {guard:#x}-byte guards)")]
    ApertureFull {
        /// Requested window size.
        size: u64,
        /// Aperture size.
        aperture: u64,
        /// Guard size.
        guard: u64,
    },
    /// No window starts at this VA.
    #[error("no BAR1 window starts at {0}")]
    UnknownWindow(GpuVa),
    /// The host-reserved region is unusable for tables.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Building or changing page tables failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Writing the instance block or binding BAR1 failed.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// TLB invalidation failed.
    #[error(transparent)]
    Tlb(#[from] TlbError),
    /// VRAM access failed.
    #[error(transparent)]
    Cursor(#[from] CursorError),
}

/// The BAR1 virtual address space and its windows.
#[derive(Debug)]
pub struct Bar1Space {
    builder: PageTableBuilder,
    instance: InstanceBlock,
    tlb: Tlb,
    /// VA limit of the address space: the aperture size, 2 MiB aligned.
    aperture: u64,
    /// Windows by first VA.
    windows: BTreeMap<GpuVa, Slice>,
}

impl Bar1Space {
    /// Builds an empty address space with the instance block and tables in `reserved`,
    /// writes the instance block's PAGE_DIR_BASE and ADR_LIMIT (the aperture size), binds
    /// BAR1 to it in virtual mode and invalidates the TLB for its root.
    pub fn new(
        cursor: &mut PraminCursor<'_>,
        host: Arc<dyn HostGpu>,
        reserved: VramRange,
    ) -> Result<Bar1Space, Bar1Error> {
        let identity = host.identity();
        let aperture = identity.bar1_aperture().ok_or(Bar1Error::NoAperture)?.size;
        let aperture = aperture - aperture % BAR1_GUARD;
        if aperture == 0 {
            return Err(Bar1Error::NoAperture);
        }
        let format = PageTableFormat::for_generation(identity.generation);
        let mut alloc = VramAllocator::new(reserved.start, reserved.end)?;
        let inst_addr = alloc.alloc()?;
        cursor.fill_zero(inst_addr, INSTANCE_BLOCK_SIZE)?;
        let builder = PageTableBuilder::new(cursor, format, alloc)?;
        let instance = InstanceBlock::new(inst_addr)?;
        instance.write_page_dir(
            cursor,
            &PageDirBase::for_format(format, builder.root()),
            GpuVa::new(aperture),
        )?;
        bind_bar1(&*host, &instance, BarMode::Virtual, DEFAULT_BIND_TIMEOUT)?;
        let tlb = Tlb::new(host);
        tlb.invalidate(InvalidateScope::Pdb(TableTarget::Vram(builder.root())))?;
        Ok(Bar1Space {
            builder,
            instance,
            tlb,
            aperture,
            windows: BTreeMap::new(),
        })
    }

    /// The root page directory.
    pub fn root(&self) -> VramAddr {
        self.builder.root()
    }

    /// The instance block BAR1 is bound to.
    pub fn instance_block(&self) -> VramAddr {
        self.instance.addr()
    }

    /// The VA limit (aperture size, 2 MiB aligned).
    pub fn aperture(&self) -> u64 {
        self.aperture
    }

    /// The windows: (first VA, slice), by VA.
    pub fn windows(&self) -> impl Iterator<Item = (GpuVa, Slice)> + '_ {
        self.windows.iter().map(|(&va, &s)| (va, s))
    }

    /// Whether `addr` is the instance block or an allocated table page.
    pub fn is_table_page(&self, addr: VramAddr) -> bool {
        let page = addr.align_down(4096);
        page == self.instance.addr() || self.builder.allocator().is_allocated(page)
    }

    /// The lowest VA with `size` free bytes and a guard on both sides.
    fn place(&self, size: u64) -> Result<GpuVa, Bar1Error> {
        let full = || Bar1Error::ApertureFull {
            size,
            aperture: self.aperture,
            guard: BAR1_GUARD,
        };
        let mut candidate = BAR1_GUARD;
        for (&va, slice) in &self.windows {
            let end = candidate
                .checked_add(size)
                .and_then(|e| e.checked_add(BAR1_GUARD))
                .ok_or_else(full)?;
            if end <= va.raw() {
                break;
            }
            candidate = va.raw() + slice.size() + BAR1_GUARD;
        }
        match candidate.checked_add(size) {
            Some(end) if end <= self.aperture => Ok(GpuVa::new(candidate)),
            _ => Err(full()),
        }
    }

    /// Maps `slice` at a free window (largest pages), invalidates the TLB and returns the
    /// window's first VA. Argument and allocation errors change nothing.
    pub fn map_window(
        &mut self,
        cursor: &mut PraminCursor<'_>,
        slice: Slice,
    ) -> Result<GpuVa, Bar1Error> {
        let va = self.place(slice.size())?;
        self.builder.map(cursor, va, slice.start(), slice.size())?;
        self.windows.insert(va, slice);
        self.invalidate()?;
        Ok(va)
    }

    /// Unmaps the window at `va`, invalidates the TLB, then frees its table pages.
    pub fn unmap_window(
        &mut self,
        cursor: &mut PraminCursor<'_>,
        va: GpuVa,
    ) -> Result<Slice, Bar1Error> {
        let slice = *self.windows.get(&va).ok_or(Bar1Error::UnknownWindow(va))?;
        self.builder.unmap(cursor, va, slice.size())?;
        self.windows.remove(&va);
        // No cached walk may still read the freed tables: invalidate before recycling.
        self.invalidate()?;
        self.builder.release_freed_tables()?;
        Ok(slice)
    }

    fn invalidate(&self) -> Result<(), Bar1Error> {
        Ok(self
            .tlb
            .invalidate(InvalidateScope::Pdb(TableTarget::Vram(self.root())))?)
    }
}
