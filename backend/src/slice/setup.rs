//! Handing VRAM to guests: [`GuestSlice`] (what a presented function needs to know about its
//! guest's VRAM), [`whole_gpu`] (one guest owning the GPU) and [`SlicedGpu`] (several guests,
//! each with a scrubbed slice and a BAR1 window).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use thiserror::Error;

use super::bar1::Bar1Error;
use super::host_vram::{HostVram, HostVramError};
use super::partition::{PartitionError, Slice, VramPartition};
use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Errors of giving VRAM to guests.
#[derive(Debug, Error)]
pub enum SetupError {
    /// The request does not fit the partition (bad size, no space, overlap).
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// Host VRAM access (PRAMIN, BAR1 tables) failed.
    #[error(transparent)]
    HostVram(#[from] HostVramError),
    /// A removed guest's slice could not be cut off from what its peer maps (kept assigned).
    #[error("{slice} cannot be cut off from the memory its removed guest may still map; it is kept out of use: {source}")]
    Quarantined {
        /// The slice.
        slice: Slice,
        /// Why.
        #[source]
        source: HostGpuError,
    },
    /// Scrubbing a slice failed.
    #[error("scrubbing {slice} failed: {source}")]
    Scrub {
        /// The slice.
        slice: Slice,
        /// What went wrong.
        #[source]
        source: HostVramError,
    },
    /// The guest slice does not belong to this GPU's partition.
    #[error("{0} is not a guest of this GPU")]
    NotAGuest(Slice),
    /// The GSP did not boot, so the framebuffer layout is unknown.
    #[error("the GSP did not boot: {0}")]
    Gsp(#[from] crate::gsp::BootError),
    /// The GSP reported no usable framebuffer region starting at VRAM address 0.
    #[error("the GSP reported no usable framebuffer region at VRAM address 0")]
    NoUsableRegion,
}

impl SetupError {
    /// Whether the error is the request's fault (sizes that cannot be satisfied), as
    /// opposed to a device failure.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            SetupError::Partition(_)
                | SetupError::NotAGuest(_)
                | SetupError::HostVram(HostVramError::Bar1(Bar1Error::ApertureFull { .. }))
        )
    }
}

/// Whether a guest may still reach its slice: revoked for good when the guest is removed
/// ([`SlicedGpu::remove_guest`]), shared by every clone of the guest's [`GuestSlice`].
///
/// Every access of the guest's trapped aperture and VRAM BAR runs inside
/// [`SliceAccess::with_live`], which holds off revocation until the access is done, so no
/// access of a removed guest can land after its slice was handed to somebody else.
#[derive(Debug, Default)]
pub struct SliceAccess {
    revoked: RwLock<bool>,
}

impl SliceAccess {
    /// Runs `access` if the slice is still the guest's (revocation waits until it
    /// returns); `None`, without running it, once revoked.
    pub fn with_live<R>(&self, access: impl FnOnce() -> R) -> Option<R> {
        let revoked = self.revoked.read().unwrap_or_else(PoisonError::into_inner);
        (!*revoked).then(access)
    }

    /// Whether the guest was removed.
    pub fn is_revoked(&self) -> bool {
        *self.revoked.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Revokes access for good, after every access in flight has finished.
    pub(crate) fn revoke(&self) {
        self.revoke_with(|| ());
    }

    /// Revokes access for good and runs `last` at that moment, with no access in flight
    /// and none let in until it returns: whoever sees the slice revoked sees what `last`
    /// did done.
    pub(crate) fn revoke_with<R>(&self, last: impl FnOnce() -> R) -> R {
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        let result = last();
        *revoked = true;
        result
    }
}

/// A guest's VRAM as the presentation sees it: its slice of host VRAM, the shared host
/// PRAMIN window, and (for a sliced GPU) its BAR1 window.
#[derive(Clone)]
pub struct GuestSlice {
    /// Unique per [`SlicedGpu`] (0 for a GPU given whole), so a stale handle cannot remove
    /// a later guest that got the same slice and window.
    id: u64,
    slice: Slice,
    vram: Arc<HostVram>,
    bar1_window: Option<GpuVa>,
    /// Revoked when the guest is removed; every access to the slice checks it.
    access: Arc<SliceAccess>,
}

impl std::fmt::Debug for GuestSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSlice")
            .field("id", &self.id)
            .field("slice", &self.slice)
            .field("bar1_window", &self.bar1_window)
            .field("revoked", &self.access.is_revoked())
            .finish_non_exhaustive()
    }
}

impl GuestSlice {
    /// The guest's host VRAM.
    pub fn slice(&self) -> Slice {
        self.slice
    }

    /// The shared host PRAMIN window.
    pub fn vram(&self) -> &Arc<HostVram> {
        &self.vram
    }

    /// The GPU.
    pub fn host(&self) -> &Arc<dyn HostGpu> {
        self.vram.host()
    }

    /// First BAR1 VA of the guest's window (`None` for a GPU given whole: BAR1 stays in
    /// physical mode and trapped VRAM accesses go straight to host memory).
    pub fn bar1_window(&self) -> Option<GpuVa> {
        self.bar1_window
    }

    /// Whether the guest may still reach its slice (see [`SliceAccess`]); every access of
    /// its aperture and VRAM BAR must go through [`SliceAccess::with_live`].
    pub fn access(&self) -> &Arc<SliceAccess> {
        &self.access
    }

    /// Whether the guest owns the whole GPU.
    pub fn is_whole_gpu(&self) -> bool {
        self.bar1_window.is_none()
    }
}

/// A removed guest's range and BAR1 window, out of use until
/// [`SlicedGpu::release_taken`] (see [`SlicedGpu::take_back_guest`]).
#[derive(Debug)]
#[must_use = "the range stays out of use until it is released"]
pub struct TakenBack {
    slice: Slice,
    va: GpuVa,
}

impl TakenBack {
    /// The range.
    pub fn slice(&self) -> Slice {
        self.slice
    }
}

/// Whether VRAM is scrubbed when it is handed to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandOut {
    /// Scrubbed first (serving guests).
    #[default]
    Scrubbed,
    /// Left as it is: only for describing a layout (`inspect`), where nothing is served.
    /// On hardware a scrub runs through PRAMIN and costs minutes per GiB.
    Unscrubbed,
}

fn scrub(vram: &HostVram, slice: Slice, handout: HandOut) -> Result<(), SetupError> {
    if handout == HandOut::Unscrubbed {
        return Ok(());
    }
    vram.scrub(slice.start(), slice.size())
        .map_err(|source| SetupError::Scrub { slice, source })
}

/// Gives `host` whole to one guest: its slice is all of device memory (carve-outs
/// included, no host-reserved region), scrubbed first; the guest's window register is
/// still virtual and its aperture served through the host PRAMIN.
pub fn whole_gpu(host: Arc<dyn HostGpu>) -> Result<GuestSlice, SetupError> {
    whole_gpu_with(host, HandOut::Scrubbed)
}

/// [`whole_gpu`], scrubbing as `handout` says.
pub fn whole_gpu_with(host: Arc<dyn HostGpu>, handout: HandOut) -> Result<GuestSlice, SetupError> {
    let slice = VramPartition::whole_gpu_slice(host.identity());
    let vram = Arc::new(HostVram::new(host)?);
    scrub(&vram, slice, handout)?;
    Ok(GuestSlice {
        id: 0,
        slice,
        vram,
        bar1_window: None,
        access: Arc::default(),
    })
}

/// A GPU shared by several guests: the VRAM partition, the shared host PRAMIN window and
/// BAR1 in virtual mode with one window per guest.
pub struct SlicedGpu {
    vram: Arc<HostVram>,
    partition: VramPartition,
    handout: HandOut,
    /// Live guests by id.
    guests: BTreeMap<u64, Slice>,
    next_id: u64,
}

impl std::fmt::Debug for SlicedGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlicedGpu")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

/// End of the usable framebuffer region at VRAM address 0, as the freshly booted GSP
/// reports. The GSP is stopped again (through its registers) when the session ends here,
/// before its DMA memory is freed.
fn gsp_usable_vram(host: &dyn HostGpu) -> Result<u64, SetupError> {
    let session = crate::gsp::boot(host, crate::gsp::GspTimeouts::default())?;
    let usable = session
        .static_info()
        .usable_regions()
        .find(|region| region.start == VramAddr::ZERO)
        .map(|region| region.end.raw())
        .ok_or(SetupError::NoUsableRegion)?;
    log::info!(
        "GSP reports {usable:#x} bytes of usable VRAM at 0 ({} usable in all)",
        session.static_info().usable_bytes()
    );
    Ok(usable)
}

impl SlicedGpu {
    /// Partitions `host`'s VRAM and sets up BAR1 in virtual mode with its tables in the
    /// host-reserved region (no windows yet).
    ///
    /// The usable VRAM comes from the GSP: it is booted, and the usable framebuffer region
    /// at address 0 of its GET_GSP_STATIC_INFO reply bounds the partition (board-reserved
    /// and firmware regions are never handed out). The GSP is stopped again once the
    /// sizes are read.
    pub fn new(host: Arc<dyn HostGpu>) -> Result<SlicedGpu, SetupError> {
        let usable = gsp_usable_vram(&*host)?;
        let partition = VramPartition::with_sizes(host.identity().vram_size, usable)?;
        let vram = Arc::new(HostVram::new(host)?);
        vram.set_up_bar1(partition.host_reserved())?;
        Ok(SlicedGpu {
            vram,
            partition,
            handout: HandOut::Scrubbed,
            guests: BTreeMap::new(),
            next_id: 1,
        })
    }

    /// Whether slices handed out from now on are scrubbed ([`HandOut::Scrubbed`] unless
    /// changed; `inspect` describes a layout without scrubbing).
    pub fn set_handout(&mut self, handout: HandOut) {
        self.handout = handout;
    }

    /// The partition (slices handed out, host-reserved region).
    pub fn partition(&self) -> &VramPartition {
        &self.partition
    }

    /// The shared host PRAMIN window.
    pub fn vram(&self) -> &Arc<HostVram> {
        &self.vram
    }

    /// The GPU.
    pub fn host(&self) -> &Arc<dyn HostGpu> {
        self.vram.host()
    }

    /// Hands the lowest free `size` bytes to a new guest: the slice is scrubbed, then mapped
    /// into BAR1. On failure nothing stays assigned.
    pub fn add_guest(&mut self, size: u64) -> Result<GuestSlice, SetupError> {
        let slice = self.reserve(size)?;
        self.hand_out(slice, self.handout)
    }

    /// Takes the lowest free `size` bytes out of the free VRAM for a guest to come, without
    /// scrubbing them: the caller scrubs the range ([`SlicedGpu::scrub_reserved`]) where it
    /// holds no lock, then hands it out ([`SlicedGpu::hand_out_reserved`]) or gives it
    /// back ([`SlicedGpu::release_range`]).
    pub fn reserve(&mut self, size: u64) -> Result<Slice, SetupError> {
        Ok(self.partition.assign(size)?)
    }

    /// Scrubs a range from [`SlicedGpu::reserve`] as the GPU hands slices out (not at all
    /// with [`HandOut::Unscrubbed`]), through `vram` (this GPU's [`SlicedGpu::vram`]).
    pub fn scrub_reserved(
        vram: &HostVram,
        slice: Slice,
        handout: HandOut,
    ) -> Result<(), SetupError> {
        scrub(vram, slice, handout)
    }

    /// How slices are handed out ([`SlicedGpu::set_handout`]).
    pub fn handout(&self) -> HandOut {
        self.handout
    }

    /// Hands a range from [`SlicedGpu::reserve`], already scrubbed, to a new guest (mapped
    /// into BAR1). On failure the range is free again.
    pub fn hand_out_reserved(&mut self, slice: Slice) -> Result<GuestSlice, SetupError> {
        self.hand_out(slice, HandOut::Unscrubbed)
    }

    /// Returns a range from [`SlicedGpu::reserve`] to the free VRAM.
    pub fn release_range(&mut self, slice: Slice) -> Result<(), SetupError> {
        Ok(self.partition.release(slice)?)
    }

    /// Frees what [`SlicedGpu::take_back_guest`] kept: the BAR1 window is unmapped (its VA
    /// free for another guest only now) and the range returns to the free VRAM.
    pub fn release_taken(&mut self, taken: TakenBack) -> Result<(), SetupError> {
        self.vram.unmap_bar1_window(taken.va)?;
        self.release_range(taken.slice)
    }

    /// Gives a guest that already owns `[start, start + size)` (a guest of an earlier run
    /// of the backend, from its state file) its slice again, **not scrubbed**: its VRAM is
    /// what it left. The range must be free and inside the guest area.
    pub fn restore_guest(&mut self, start: VramAddr, size: u64) -> Result<GuestSlice, SetupError> {
        let slice = self.partition.assign_at(start, size)?;
        self.hand_out(slice, HandOut::Unscrubbed)
    }

    /// Scrubs `slice` (as `handout` says), maps it into BAR1 and records the guest; on
    /// failure releases the slice.
    fn hand_out(&mut self, slice: Slice, handout: HandOut) -> Result<GuestSlice, SetupError> {
        let mapped = scrub(&self.vram, slice, handout)
            .and_then(|()| Ok(self.vram.map_bar1_window(slice)?));
        match mapped {
            Ok(va) => {
                let id = self.next_id;
                self.next_id += 1;
                self.guests.insert(id, slice);
                Ok(GuestSlice {
                    id,
                    slice,
                    vram: Arc::clone(&self.vram),
                    bar1_window: Some(va),
                    access: Arc::default(),
                })
            }
            Err(e) => {
                // `slice` was assigned by the caller, so it can be released.
                let _ = self.partition.release(slice);
                Err(e)
            }
        }
    }

    /// Takes a guest's VRAM back: its access is revoked (every handle of the guest reads
    /// ~0 and drops writes from now on, see [`SliceAccess`]), its BAR1 window is unmapped (TLB invalidated), the
    /// memfd handed out for its slice is disconnected from VRAM
    /// ([`HostGpu::release_vram_mmap_source`]; the next guest of the range gets a fresh
    /// one) and the slice returns to the free area (it is scrubbed again before the next
    /// guest gets it).
    pub fn remove_guest(&mut self, guest: &GuestSlice) -> Result<(), SetupError> {
        let taken = self.take_back_guest(guest)?;
        self.release_taken(taken)
    }

    /// [`SlicedGpu::remove_guest`] except that the range stays out of the free VRAM, and its
    /// BAR1 window mapped and its VA reserved, until [`SlicedGpu::release_taken`]: the
    /// caller stops the guest's servers and scrubs the range first, holding no lock, and
    /// until its QEMU is gone (which may still map the window on hardware, see
    /// `docs/vfio.md`) no other guest may get that VA. [`SetupError::Quarantined`] if the
    /// range (and its window) must stay out of use for good.
    pub fn take_back_guest(&mut self, guest: &GuestSlice) -> Result<TakenBack, SetupError> {
        let live = Arc::ptr_eq(&guest.vram, &self.vram)
            && self.guests.get(&guest.id) == Some(&guest.slice);
        let va = guest
            .bar1_window
            .filter(|_| live)
            .ok_or(SetupError::NotAGuest(guest.slice))?;
        // First of all, so that nothing of the guest still presented (its aperture, its
        // trapped VRAM BAR) reaches the slice once somebody else may get it; in the same
        // step the slice's memfd (which the guest's QEMU may still map) is disconnected, so
        // a guest that sees its function revoked (BOOT_0 reads ~0) no longer sees its VRAM
        // through the mapping either. A slice whose memfd cannot be disconnected stays
        // assigned for good (quarantined), since its old peer may still reach it.
        let released = guest.access.revoke_with(|| {
            self.host()
                .release_vram_mmap_source(guest.slice.start(), guest.slice.size())
        });
        self.guests.remove(&guest.id);
        if let Err(source) = released {
            return Err(SetupError::Quarantined {
                slice: guest.slice,
                source,
            });
        }
        Ok(TakenBack {
            slice: guest.slice,
            va,
        })
    }
}
