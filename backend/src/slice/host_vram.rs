//! [`HostVram`]: the host's one PRAMIN window, shared by every guest's trapped aperture and by
//! the BAR1 page-table builder, behind one mutex.
//!
//! The window register is a single piece of device state, so every user of PRAMIN holds the
//! lock for its whole access: a guest's aperture read moves the host window over
//! `slice.start + guest address` and reads through the host aperture without anybody moving
//! the window in between (see [`crate::host_driver::pramin`] on why the lock lives here, at
//! the layer that shares the device, and not inside `Pramin`). The BAR1 address space
//! ([`Bar1Space`]) lives under the same lock because building page tables is PRAMIN work too.

use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use super::bar1::{Bar1Error, Bar1Space};
use super::partition::{Slice, VramRange};
use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_driver::cursor::{CursorError, PraminCursor};
use crate::host_driver::pramin::{Pramin, PraminError};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Bytes zeroed per lock hold when scrubbing through PRAMIN (64 KiB: the window's
/// granularity, a few hundred microseconds of register writes on hardware).
pub const SCRUB_CHUNK: u64 = 0x1_0000;

/// Errors of host VRAM access.
#[derive(Debug, Error)]
pub enum HostVramError {
    /// Taking the window register failed.
    #[error(transparent)]
    Pramin(#[from] PraminError),
    /// A VRAM access through PRAMIN failed.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The BAR1 address space failed.
    #[error(transparent)]
    Bar1(#[from] Bar1Error),
    /// The host failed to scrub VRAM.
    #[error("scrubbing VRAM: {0}")]
    Scrub(#[source] HostGpuError),
    /// A BAR1 operation before the BAR1 address space was set up.
    #[error("the BAR1 address space is not set up")]
    NoBar1,
}

/// What the lock protects: the window owner and the BAR1 address space.
#[derive(Debug)]
struct State {
    pramin: Pramin,
    bar1: Option<Bar1Space>,
}

/// The host PRAMIN window (and the BAR1 address space) of one GPU, shared by all guests.
pub struct HostVram {
    host: Arc<dyn HostGpu>,
    state: Mutex<State>,
}

impl std::fmt::Debug for HostVram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostVram")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl HostVram {
    /// Takes ownership of `host`'s window register. Nothing else may write the register
    /// afterwards (guests reach it only through their virtual copy).
    pub fn new(host: Arc<dyn HostGpu>) -> Result<HostVram, HostVramError> {
        let pramin = Pramin::new(Arc::clone(&host))?;
        Ok(HostVram {
            host,
            state: Mutex::new(State { pramin, bar1: None }),
        })
    }

    /// The GPU.
    pub fn host(&self) -> &Arc<dyn HostGpu> {
        &self.host
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every access re-derives the window from the cached base, and the page-table
        // builder poisons itself on device errors, so a panic elsewhere leaves nothing
        // half-done that matters more than refusing service.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies host VRAM `[addr, addr + buf.len())` into `buf` through the host PRAMIN.
    pub fn read(&self, addr: VramAddr, buf: &mut [u8]) -> Result<(), HostVramError> {
        let mut state = self.lock();
        PraminCursor::new(&mut state.pramin).read_bytes(addr, buf)?;
        Ok(())
    }

    /// Copies `data` to host VRAM at `addr` through the host PRAMIN.
    pub fn write(&self, addr: VramAddr, data: &[u8]) -> Result<(), HostVramError> {
        let mut state = self.lock();
        PraminCursor::new(&mut state.pramin).write_bytes(addr, data)?;
        Ok(())
    }

    /// Sets host VRAM `[addr, addr + len)` to zero. A host that can scrub without the
    /// window (the emulated GPU punches holes in its memfd) does so; otherwise the range is
    /// zeroed through the host PRAMIN window, the window register's one writer, taking
    /// the lock per [`SCRUB_CHUNK`] so that guests' aperture accesses wait for one chunk
    /// at most, not for the whole scrub.
    pub fn scrub(&self, addr: VramAddr, len: u64) -> Result<(), HostVramError> {
        match self.host.scrub_vram(addr, len) {
            Err(HostGpuError::Io(e)) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            other => return other.map_err(HostVramError::Scrub),
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(SCRUB_CHUNK);
            let at =
                addr.offset(done)
                    .ok_or(HostVramError::Scrub(HostGpuError::VramOutOfRange {
                        addr,
                        len,
                        size: self.host.identity().vram_size,
                    }))?;
            let mut state = self.lock();
            PraminCursor::new(&mut state.pramin).fill_zero(at, n)?;
            done += n;
        }
        Ok(())
    }

    /// Host window register writes so far (window moves).
    pub fn window_moves(&self) -> u64 {
        self.lock().pramin.window_moves()
    }

    /// Builds the BAR1 address space with tables in `reserved`, binds BAR1 to it in virtual
    /// mode and invalidates the TLB (see [`Bar1Space::new`]). Replaces nothing: a second
    /// call is an error.
    pub fn set_up_bar1(&self, reserved: VramRange) -> Result<(), HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        if bar1.is_some() {
            return Err(Bar1Error::AlreadySetUp.into());
        }
        let mut cursor = PraminCursor::new(pramin);
        *bar1 = Some(Bar1Space::new(
            &mut cursor,
            Arc::clone(&self.host),
            reserved,
        )?);
        Ok(())
    }

    /// Maps `slice` into BAR1 (largest pages, TLB invalidated) and returns its window's
    /// first BAR1 virtual address.
    pub fn map_bar1_window(&self, slice: Slice) -> Result<GpuVa, HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        let bar1 = bar1.as_mut().ok_or(HostVramError::NoBar1)?;
        Ok(bar1.map_window(&mut PraminCursor::new(pramin), slice)?)
    }

    /// Unmaps the BAR1 window starting at `va`, invalidates the TLB and frees its tables.
    pub fn unmap_bar1_window(&self, va: GpuVa) -> Result<Slice, HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        let bar1 = bar1.as_mut().ok_or(HostVramError::NoBar1)?;
        Ok(bar1.unmap_window(&mut PraminCursor::new(pramin), va)?)
    }

    /// The root page directory and instance block of the BAR1 address space, if set up.
    pub fn bar1_tables(&self) -> Option<(VramAddr, VramAddr)> {
        let state = self.lock();
        state.bar1.as_ref().map(|b| (b.root(), b.instance_block()))
    }

    /// The BAR1 windows mapped: (first VA, slice), by VA.
    pub fn bar1_windows(&self) -> Vec<(GpuVa, Slice)> {
        self.lock()
            .bar1
            .as_ref()
            .map(|b| b.windows().collect())
            .unwrap_or_default()
    }

    /// Whether host VRAM `addr` is a page allocated for BAR1 tables or the instance block.
    pub fn is_bar1_table_page(&self, addr: VramAddr) -> bool {
        self.lock()
            .bar1
            .as_ref()
            .is_some_and(|b| b.is_table_page(addr))
    }
}
