//! The presented PCI function: what a guest sees of the host GPU.
//!
//! Every BAR of the real part is wrapped in a [`PaddedBar`], so the guest sees a power of
//! two whose tail past the real memory reads ~0 and drops writes. The config space
//! advertises the presented sizes.
//!
//! The function belongs to one guest ([`GuestSlice`]): BAR0 is the guest's
//! [`TrappedBar0`] (register table, virtual window register, PRAMIN aperture confined to
//! the guest's VRAM, MSI-X); a VRAM BAR of the part at VRAM offset `o` with real size `s`
//! shows the guest's VRAM `[o, o + s) ∩ [0, slice.size)` and is dropped when that is
//! empty. Its real part is offered for direct mapping from host VRAM `slice.start + o`
//! (unless [`PresentationOptions::trap_vram`]); trapped accesses go through the guest's
//! BAR1 window (a sliced GPU) or, for a GPU given whole, through the host's BAR1 aperture
//! for the BAR1-aperture BAR (translated as the guest set BAR1 up: the guest owns the GPU
//! and may switch BAR1 to virtual mode) and to host memory for any other VRAM BAR. The
//! instance-memory BAR is presented only to a guest that owns the whole GPU (it is a
//! host-wide aperture).
//!
//! Power: while the config space's PMCSR says D3hot, every BAR access reads ~0 and drops
//! writes without reaching the backing (a device in D3hot answers config space only); back
//! in D0 the BARs answer again. A reset returns to D0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_gpu::{ChipIdentity, HostBar, HostBarRole, HostGpu, MmapSource};
use crate::slice::{whole_gpu_with, GuestSlice, HandOut, SetupError, Slice};

use super::bar0::{TrapStats, TrappedBar0};
use super::config_space::{
    BarDecl, BarKind, ConfigSpace, ConfigSpaceError, ConfigSpaceSpec, MsixDecl, PowerState,
    BAR_COUNT, CONFIG_SPACE_SIZE,
};
use super::guest_vram::GuestVramBacking;
use super::padded_bar::{MappableArea, PaddedBar, PaddedBarError};

/// Number of MSI-X vectors the presented function offers.
///
/// ASSUMPTION: real parts differ; a small count is enough for the GSP interrupt and tests.
pub const MSIX_VECTORS: u16 = 16;

/// BAR0 offset of the MSI-X table.
///
/// ASSUMPTION (unconfirmed, not in gpu-facts.md): NVIDIA parts since Turing report the
/// MSI-X table in BAR0 at 0xB90000 and the PBA at 0xBA0000, inside the VF-private register
/// space.
pub const MSIX_TABLE_OFFSET: u32 = 0x00B9_0000;
/// BAR0 offset of the MSI-X pending bit array (see [`MSIX_TABLE_OFFSET`]).
pub const MSIX_PBA_OFFSET: u32 = 0x00BA_0000;

/// VFIO region index of the expansion ROM (absent: size 0).
pub const ROM_REGION_INDEX: u32 = 6;
/// VFIO region index of the config space.
pub const CONFIG_REGION_INDEX: u32 = 7;
/// VFIO region index of legacy VGA space (absent: size 0).
pub const VGA_REGION_INDEX: u32 = 8;
/// Number of VFIO regions of a PCI function.
pub const REGION_COUNT: u32 = 9;

/// Errors of building or accessing the presented function.
#[derive(Debug, Error)]
pub enum PresentationError {
    /// A BAR of the real part cannot be presented.
    #[error("BAR{index} cannot be presented: {source}")]
    Bar {
        /// BAR slot.
        index: u8,
        /// Cause.
        #[source]
        source: PaddedBarError,
    },
    /// The host reports a memory BAR it cannot back.
    #[error("the host GPU has no memory behind BAR{0}")]
    MissingMemory(u8),
    /// The guest's VRAM could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The config space could not be built or accessed.
    #[error(transparent)]
    ConfigSpace(#[from] ConfigSpaceError),
    /// The region index names no region, or an absent one.
    #[error("no region {0}")]
    NoSuchRegion(u32),
    /// The guest was removed ([`SlicedGpu::remove_guest`](crate::slice::SlicedGpu::remove_guest)):
    /// its slice may belong to somebody else now, so it is never presented again.
    #[error("the guest of slice {0} was removed")]
    Removed(Slice),
}

impl PresentationError {
    /// The errno this error maps to on the wire.
    pub fn errno(&self) -> i32 {
        match self {
            PresentationError::Bar { source, .. } => source.errno(),
            PresentationError::MissingMemory(_) => libc::ENODEV,
            PresentationError::Setup(_) => libc::EIO,
            PresentationError::ConfigSpace(e) => e.errno(),
            PresentationError::NoSuchRegion(_) => libc::EINVAL,
            PresentationError::Removed(_) => libc::ENODEV,
        }
    }
}

/// How a function is presented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresentationOptions {
    /// Offer no VRAM BAR for direct mapping, so every VRAM-BAR access is trapped. The
    /// mapped VRAM of the emulated GPU is device memory 1:1 (BAR1 in physical mode); a
    /// guest owning the whole GPU that switches BAR1 to virtual mode needs its accesses
    /// trapped to have them translated.
    pub trap_vram: bool,
    /// Whether the whole GPU's VRAM is scrubbed before it is presented
    /// ([`HandOut::Unscrubbed`] only to describe the layout, as `inspect` does).
    pub handout: HandOut,
    /// Offer no MSI-X capability: the guest has INTx (and the MSI interrupt type) only, and
    /// BAR0's MSI-X table and PBA read as hidden registers. QEMU 11.1.3 aborts when it
    /// finalizes a hot-unplugged `vfio-user-pci` that has MSI-X (its vfio-user PBA
    /// teardown removes a memory region that was already taken down), so a guest meant to
    /// be unplugged with `device_del` is presented without it.
    pub without_msix: bool,
}

/// What a presented BAR is backed by.
enum BarContent {
    /// BAR0: the guest's trapped registers (boxed: far larger than a memory BAR).
    Registers(Box<PaddedBar<TrappedBar0>>),
    /// A memory BAR: the guest's memory, plus the fd that maps its real part, if any.
    Memory {
        bar: PaddedBar<GuestVramBacking>,
        mmap: Option<MmapSource>,
    },
}

/// One presented BAR.
pub struct PresentedBar {
    index: u8,
    role: HostBarRole,
    is_64bit: bool,
    prefetchable: bool,
    host_vram: Option<VramAddr>,
    content: BarContent,
}

impl PresentedBar {
    /// First PCI BAR slot.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// What the BAR exposes.
    pub fn role(&self) -> HostBarRole {
        self.role
    }

    /// 64-bit BAR.
    pub fn is_64bit(&self) -> bool {
        self.is_64bit
    }

    /// Prefetchable BAR.
    pub fn prefetchable(&self) -> bool {
        self.prefetchable
    }

    /// Host VRAM address of the BAR's first byte (VRAM BARs only).
    pub fn host_vram(&self) -> Option<VramAddr> {
        self.host_vram
    }

    /// The trapped BAR0, if this is BAR0.
    pub fn registers(&self) -> Option<&TrappedBar0> {
        match &self.content {
            BarContent::Registers(bar) => Some(bar.backing()),
            BarContent::Memory { .. } => None,
        }
    }

    /// Real size of the backing.
    pub fn real_size(&self) -> u64 {
        match &self.content {
            BarContent::Registers(bar) => bar.real_size(),
            BarContent::Memory { bar, .. } => bar.real_size(),
        }
    }

    /// Size the guest sees (a power of two).
    pub fn presented_size(&self) -> u64 {
        match &self.content {
            BarContent::Registers(bar) => bar.presented_size(),
            BarContent::Memory { bar, .. } => bar.presented_size(),
        }
    }

    /// The area QEMU may map directly, with the fd and offset to map it from.
    pub fn mappable(&self) -> Option<(MappableArea, &MmapSource)> {
        match &self.content {
            BarContent::Registers(_) => None,
            BarContent::Memory { bar, mmap } => Some((bar.mappable_area()?, mmap.as_ref()?)),
        }
    }

    /// Reads at `offset`; returns the clipped count (see [`PaddedBar::read`]).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PaddedBarError> {
        match &self.content {
            BarContent::Registers(bar) => bar.read(offset, buf),
            BarContent::Memory { bar, .. } => bar.read(offset, buf),
        }
    }

    /// Writes at `offset`; returns the clipped count (see [`PaddedBar::write`]).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<usize, PaddedBarError> {
        match &self.content {
            BarContent::Registers(bar) => bar.write(offset, data),
            BarContent::Memory { bar, .. } => bar.write(offset, data),
        }
    }

    /// Reads at `offset` of a function in D3hot: ~0, nothing reaches the backing.
    fn read_powered_off(&self, offset: u64, buf: &mut [u8]) -> Result<usize, PaddedBarError> {
        match &self.content {
            BarContent::Registers(bar) => bar.read_ones(offset, buf),
            BarContent::Memory { bar, .. } => bar.read_ones(offset, buf),
        }
    }

    /// Writes at `offset` of a function in D3hot: dropped.
    fn write_powered_off(&self, offset: u64, data: &[u8]) -> Result<usize, PaddedBarError> {
        match &self.content {
            BarContent::Registers(bar) => bar.drop_write(offset, data),
            BarContent::Memory { bar, .. } => bar.drop_write(offset, data),
        }
    }
}

/// The PCI function a guest sees.
pub struct PresentedFunction {
    guest: GuestSlice,
    bars: Vec<PresentedBar>,
    msix: Option<MsixDecl>,
    options: PresentationOptions,
    config: Mutex<ConfigSpace>,
    /// PMCSR says D3hot (kept in step with `config` under its lock; read lock-free on the
    /// BAR access path).
    powered_off: AtomicBool,
}

/// The guest's view of one host memory BAR: (host VRAM address, real size), or `None` if
/// the BAR shows none of the guest's VRAM.
fn guest_part(bar: &HostBar, vram_offset: u64, guest: &GuestSlice) -> Option<(VramAddr, u64)> {
    let slice = guest.slice();
    let real = bar.size.min(slice.size().checked_sub(vram_offset)?);
    let host = slice.host_addr(vram_offset, real)?;
    (real > 0).then_some((host, real))
}

impl PresentedFunction {
    /// Presents `host` whole to one guest (see [`whole_gpu`](crate::slice::whole_gpu): its VRAM is scrubbed and
    /// its window register taken over by the backend).
    pub fn new(host: Arc<dyn HostGpu>) -> Result<Self, PresentationError> {
        Self::new_with(host, PresentationOptions::default())
    }

    /// Presents `host` whole to one guest, as `options` say (see [`PresentedFunction::new`]).
    pub fn new_with(
        host: Arc<dyn HostGpu>,
        options: PresentationOptions,
    ) -> Result<Self, PresentationError> {
        Self::for_guest_with(whole_gpu_with(host, options.handout)?, options)
    }

    /// The function of `guest`: pads every BAR to a power of two and builds the config
    /// space.
    pub fn for_guest(guest: GuestSlice) -> Result<Self, PresentationError> {
        Self::for_guest_with(guest, PresentationOptions::default())
    }

    /// The function of `guest`, presented as `options` say (see
    /// [`PresentedFunction::for_guest`]).
    pub fn for_guest_with(
        guest: GuestSlice,
        options: PresentationOptions,
    ) -> Result<Self, PresentationError> {
        let slice = guest.slice();
        if guest.access().is_revoked() {
            return Err(PresentationError::Removed(slice));
        }
        let host = Arc::clone(guest.host());
        let identity = host.identity().clone();
        let msix = (!options.without_msix).then_some(MsixDecl {
            vectors: MSIX_VECTORS,
            table_bar: 0,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: 0,
            pba_offset: MSIX_PBA_OFFSET,
        });
        let mut bars = Vec::with_capacity(identity.bars.len());
        for bar in &identity.bars {
            let bar_error = |source| PresentationError::Bar {
                index: bar.index,
                source,
            };
            let (content, host_vram) = match bar.role {
                HostBarRole::Registers => (
                    BarContent::Registers(Box::new(
                        PaddedBar::new(TrappedBar0::new(&guest, bar.size, msix.as_ref()))
                            .map_err(bar_error)?,
                    )),
                    None,
                ),
                HostBarRole::Vram { vram_offset } => {
                    let Some((at, real)) = guest_part(bar, vram_offset, &guest) else {
                        continue;
                    };
                    // A GPU given whole maps the host BAR as it is; a slice maps only its
                    // own VRAM (its own fd), never the memory of the whole GPU.
                    let (backing, mmap) = match guest.bar1_window() {
                        None => {
                            let memory = host
                                .memory_bar(bar.index)
                                .ok_or(PresentationError::MissingMemory(bar.index))?;
                            let mmap = memory.mmap_source();
                            let is_bar1 = identity
                                .bar1_aperture()
                                .is_some_and(|aperture| aperture.index == bar.index);
                            let backing = if is_bar1 {
                                // The guest owns the GPU and may put BAR1 in virtual mode:
                                // trapped accesses are translated as BAR1 is set up (the
                                // same bytes as the memory itself in physical mode).
                                GuestVramBacking::Bar1 {
                                    host: Arc::clone(&host),
                                    va: GpuVa::new(0),
                                    len: memory.len(),
                                    access: Arc::clone(guest.access()),
                                }
                            } else {
                                GuestVramBacking::Host(memory)
                            };
                            (backing, mmap)
                        }
                        Some(window) => {
                            let va = window
                                .offset(vram_offset)
                                .ok_or(PresentationError::MissingMemory(bar.index))?;
                            // The slice's own memory where the host can hand it out by
                            // VRAM address (the emulated GPU's per-slice memfd), else an
                            // export of exactly its BAR1 window (a dma-buf on hardware),
                            // else nothing: trapped. Only while the slice is the guest's:
                            // a removed guest's range may be another guest's now (whose
                            // memfd this would hand out), and a removal waits until the
                            // source is made, so it releases it too.
                            let mmap = guest
                                .access()
                                .with_live(|| {
                                    host.vram_mmap_source(at, real)
                                        .or_else(|| host.bar1_mmap_source(va.raw(), real))
                                })
                                .ok_or(PresentationError::Removed(slice))?;
                            (
                                GuestVramBacking::Bar1 {
                                    host: Arc::clone(&host),
                                    va,
                                    len: real,
                                    access: Arc::clone(guest.access()),
                                },
                                mmap,
                            )
                        }
                    };
                    (
                        BarContent::Memory {
                            bar: PaddedBar::new(backing).map_err(bar_error)?,
                            mmap: mmap.filter(|_| !options.trap_vram),
                        },
                        Some(at),
                    )
                }
                HostBarRole::InstanceMemory => {
                    if !guest.is_whole_gpu() {
                        continue;
                    }
                    let memory = host
                        .memory_bar(bar.index)
                        .ok_or(PresentationError::MissingMemory(bar.index))?;
                    let mmap = memory.mmap_source();
                    (
                        BarContent::Memory {
                            bar: PaddedBar::new(GuestVramBacking::Host(memory))
                                .map_err(bar_error)?,
                            mmap,
                        },
                        None,
                    )
                }
            };
            bars.push(PresentedBar {
                index: bar.index,
                role: bar.role,
                is_64bit: bar.is_64bit,
                prefetchable: bar.prefetchable,
                host_vram,
                content,
            });
        }
        let config = ConfigSpace::new(config_spec(&identity, &bars, msix))?;
        Ok(PresentedFunction {
            guest,
            bars,
            msix,
            options,
            config: Mutex::new(config),
            powered_off: AtomicBool::new(false),
        })
    }

    /// How the function was presented.
    pub fn options(&self) -> PresentationOptions {
        self.options
    }

    /// The power state the guest set (PMCSR).
    pub fn power_state(&self) -> PowerState {
        self.config().power_state()
    }

    /// Records the config space's power state for the BAR access path.
    fn track_power(&self, config: &ConfigSpace) {
        let off = config.power_state() == PowerState::D3Hot;
        if self.powered_off.swap(off, Ordering::SeqCst) != off {
            log::debug!(
                "{}: function {}",
                self.identity().name,
                if off {
                    "in D3hot: BARs read ~0 and drop writes"
                } else {
                    "back in D0"
                }
            );
        }
    }

    /// The guest's VRAM.
    pub fn guest(&self) -> &GuestSlice {
        &self.guest
    }

    /// The guest's BAR0.
    pub fn bar0(&self) -> Option<&TrappedBar0> {
        self.bars.iter().find_map(PresentedBar::registers)
    }

    /// Counters of the guest's BAR0 traffic.
    pub fn trap_stats(&self) -> TrapStats {
        self.bar0().map(TrappedBar0::stats).unwrap_or_default()
    }

    /// The host GPU behind the function.
    pub fn host(&self) -> &Arc<dyn HostGpu> {
        self.guest.host()
    }

    /// Identity of the host GPU.
    pub fn identity(&self) -> &ChipIdentity {
        self.host().identity()
    }

    /// The presented BARs, by slot.
    pub fn bars(&self) -> &[PresentedBar] {
        &self.bars
    }

    /// The BAR whose first slot is `index`.
    pub fn bar(&self, index: u32) -> Option<&PresentedBar> {
        self.bars.iter().find(|bar| u32::from(bar.index) == index)
    }

    /// The MSI-X capability as declared (`None`: presented without MSI-X).
    pub fn msix(&self) -> Option<MsixDecl> {
        self.msix
    }

    /// The config space (locked).
    pub fn config(&self) -> MutexGuard<'_, ConfigSpace> {
        // A panic while holding this lock cannot leave the config space half-written in a
        // way that matters more than refusing service, so recover the guard.
        self.config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Size of VFIO region `index` (0 for absent regions).
    pub fn region_size(&self, index: u32) -> u64 {
        match index {
            CONFIG_REGION_INDEX => CONFIG_SPACE_SIZE as u64,
            _ => self.bar(index).map_or(0, PresentedBar::presented_size),
        }
    }

    /// Reads from VFIO region `index`; returns the number of bytes served.
    pub fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PresentationError> {
        if index == CONFIG_REGION_INDEX {
            self.config().read(offset, buf)?;
            return Ok(buf.len());
        }
        let bar = self
            .bar(index)
            .ok_or(PresentationError::NoSuchRegion(index))?;
        let read = if self.is_cut_off() {
            bar.read_powered_off(offset, buf)
        } else {
            bar.read(offset, buf)
        };
        read.map_err(|source| PresentationError::Bar {
            index: bar.index,
            source,
        })
    }

    /// Whether the BARs read ~0 and drop writes: the function is in D3hot, or its guest was
    /// removed (then its registers too read ~0, not the host's values; its VRAM is cut off
    /// by the slice's own checks).
    fn is_cut_off(&self) -> bool {
        self.powered_off.load(Ordering::SeqCst) || self.guest.access().is_revoked()
    }

    /// Writes to VFIO region `index`; returns the number of bytes consumed.
    pub fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, PresentationError> {
        if index == CONFIG_REGION_INDEX {
            let mut config = self.config();
            config.write(offset, data)?;
            self.track_power(&config);
            return Ok(data.len());
        }
        let bar = self
            .bar(index)
            .ok_or(PresentationError::NoSuchRegion(index))?;
        let written = if self.is_cut_off() {
            bar.write_powered_off(offset, data)
        } else {
            bar.write(offset, data)
        };
        written.map_err(|source| PresentationError::Bar {
            index: bar.index,
            source,
        })
    }

    /// Function-level reset: config space back to power-on state (D0), the guest's window
    /// register and MSI-X vectors back to reset. Device memory is kept, and the host GPU is
    /// not reset: a sliced GPU's registers are shared by every guest (and none can write
    /// them), and a guest given the whole GPU programs it from the state it finds.
    pub fn reset(&self) -> Result<(), crate::host_gpu::HostGpuError> {
        {
            let mut config = self.config();
            config.reset();
            self.track_power(&config);
        }
        if let Some(bar0) = self.bar0() {
            bar0.reset();
        }
        Ok(())
    }
}

fn config_spec(
    identity: &ChipIdentity,
    bars: &[PresentedBar],
    msix: Option<MsixDecl>,
) -> ConfigSpaceSpec {
    let mut decls: [Option<BarDecl>; BAR_COUNT] = [None; BAR_COUNT];
    for bar in bars {
        if let Some(slot) = decls.get_mut(usize::from(bar.index)) {
            *slot = Some(BarDecl {
                size: bar.presented_size(),
                kind: if bar.is_64bit {
                    BarKind::Memory64
                } else {
                    BarKind::Memory32
                },
                prefetchable: bar.prefetchable,
            });
        }
    }
    ConfigSpaceSpec {
        vendor_id: identity.pci.vendor_id,
        device_id: identity.pci.device_id,
        subsystem_vendor_id: identity.pci.subsystem_vendor_id,
        subsystem_id: identity.pci.subsystem_id,
        class_code: identity.pci.class_code,
        revision: identity.pci.revision,
        bars: decls,
        msix,
        interrupt_pin: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    fn present(profile: &str) -> PresentedFunction {
        let host = Arc::new(EmulatedHostGpu::by_name(profile).unwrap());
        PresentedFunction::new(host).unwrap()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn gh200_usemem_is_95_gib_real_presented_as_128_gib() {
        let function = present("gh200-96g");
        let usemem = function.bar(4).unwrap();
        assert_eq!(usemem.real_size(), 95 * GIB);
        assert_eq!(usemem.presented_size(), 128 * GIB);
        let (area, source) = usemem.mappable().unwrap();
        assert_eq!((area.offset, area.size), (0, 95 * GIB));
        assert_eq!(source.file_offset, 0);
        let resmem = function.bar(2).unwrap();
        assert_eq!(resmem.real_size(), GIB);
        assert_eq!(resmem.mappable().unwrap().1.file_offset, 95 * GIB);
        assert_eq!(function.region_size(4), 128 * GIB);
        assert_eq!(function.region_size(CONFIG_REGION_INDEX), 4096);
        assert_eq!(function.region_size(ROM_REGION_INDEX), 0);
    }

    #[test]
    fn every_presented_bar_is_a_power_of_two_in_config_space() {
        for profile in gpu_emulation::ChipProfile::all() {
            let function = present(profile.name());
            for bar in function.bars() {
                assert!(bar.presented_size().is_power_of_two(), "{}", profile.name());
                let slot = u64::from(bar.index());
                let mut config = function.config();
                config.write_u32(0x10 + 4 * slot, u32::MAX).unwrap();
                let low = config.read_u32(0x10 + 4 * slot).unwrap();
                let mut mask = u64::from(low & !0xF);
                if bar.is_64bit() {
                    config.write_u32(0x14 + 4 * slot, u32::MAX).unwrap();
                    mask |= u64::from(config.read_u32(0x14 + 4 * slot).unwrap()) << 32;
                } else {
                    mask |= 0xFFFF_FFFF_0000_0000;
                }
                assert_eq!(
                    !mask + 1,
                    bar.presented_size(),
                    "{} BAR{slot}",
                    profile.name()
                );
            }
        }
    }

    #[test]
    fn sizing_probe_of_the_128_gib_bar_reads_c_and_ffffffe0() {
        let function = present("gh200-96g");
        let mut config = function.config();
        config.write_u32(0x20, u32::MAX).unwrap();
        config.write_u32(0x24, u32::MAX).unwrap();
        assert_eq!(config.read_u32(0x20).unwrap(), 0x0000_000C);
        assert_eq!(config.read_u32(0x24).unwrap(), 0xFFFF_FFE0);
    }

    #[test]
    fn padding_reads_ff_and_drops_writes_while_real_memory_keeps_data() {
        let function = present("gh200-96g");
        let real_end = 95 * GIB;
        assert_eq!(
            function.region_write(4, real_end - 4, &[0xAB; 8]).unwrap(),
            8
        );
        let mut buf = [0u8; 8];
        assert_eq!(function.region_read(4, real_end - 4, &mut buf).unwrap(), 8);
        assert_eq!(buf, [0xAB, 0xAB, 0xAB, 0xAB, 0xFF, 0xFF, 0xFF, 0xFF]);
        // The dropped bytes did not land in the resmem carve-out behind usemem.
        let mut resmem = [0u8; 4];
        function.region_read(2, 0, &mut resmem).unwrap();
        assert_eq!(resmem, [0; 4]);
        // Last byte of the BAR: clipped count, 0xFF; past it: EINVAL.
        assert_eq!(function.region_read(4, 128 * GIB - 1, &mut buf).unwrap(), 1);
        assert_eq!(buf[0], 0xFF);
        let past = function.region_read(4, 128 * GIB, &mut buf).unwrap_err();
        assert_eq!(past.errno(), libc::EINVAL);
        assert_eq!(
            function.region_read(9, 0, &mut buf).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn bar0_region_serves_registers_at_any_width() {
        let function = present("gb202-32g");
        let boot0 = function.identity().boot0;
        let mut dword = [0u8; 4];
        function.region_read(0, 0, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), boot0);
        // An unaligned 3-byte read is split into byte/word accesses.
        let mut three = [0u8; 3];
        function.region_read(0, 1, &mut three).unwrap();
        assert_eq!(three, boot0.to_le_bytes()[1..4]);
        // The window register reads back what was written, through the region.
        function
            .region_write(0, 0x10FD40, &0x12u32.to_le_bytes())
            .unwrap();
        function.region_read(0, 0x10FD40, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), 0x12);
    }

    /// PMCSR at its place in config space.
    const PMCSR: u64 = super::super::config_space::PM_CAP_OFFSET as u64 + 4;

    fn vram_bar(function: &PresentedFunction) -> u32 {
        let bar = function
            .bars()
            .iter()
            .find(|b| matches!(b.role(), HostBarRole::Vram { .. }));
        u32::from(bar.unwrap().index())
    }

    #[test]
    fn in_d3hot_bars_read_ones_and_drop_writes_and_d0_brings_them_back() {
        let host = Arc::new(EmulatedHostGpu::by_name("gb202-32g").unwrap());
        let function = PresentedFunction::new(host.clone()).unwrap();
        let vram = vram_bar(&function);
        let boot0 = function.identity().boot0;
        function.region_write(vram, 0x40, b"before").unwrap();
        function
            .region_write(0, 0x10FD40, &0x12u32.to_le_bytes())
            .unwrap();
        // The guest's vfio-pci puts the idle device into D3hot; it reads back D3hot.
        function
            .region_write(CONFIG_REGION_INDEX, PMCSR, &[3])
            .unwrap();
        assert_eq!(function.power_state(), PowerState::D3Hot);
        let mut pmcsr = [0u8; 2];
        function
            .region_read(CONFIG_REGION_INDEX, PMCSR, &mut pmcsr)
            .unwrap();
        assert_eq!(pmcsr[0] & 3, 3);
        // Every BAR reads ~0 (registers, VRAM, padding) and drops writes.
        let mut dword = [0u8; 4];
        function.region_read(0, 0, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), u32::MAX);
        let mut six = [0u8; 6];
        assert_eq!(function.region_read(vram, 0x40, &mut six).unwrap(), 6);
        assert_eq!(six, [0xFF; 6]);
        assert_eq!(function.region_write(vram, 0x40, b"during").unwrap(), 6);
        function
            .region_write(0, 0x10FD40, &0x34u32.to_le_bytes())
            .unwrap();
        let presented = function.region_size(vram);
        assert_eq!(
            function
                .region_read(vram, presented, &mut six)
                .unwrap_err()
                .errno(),
            libc::EINVAL,
            "still bounded by the BAR"
        );
        let emulated = host.emulated().vram();
        let mut raw = [0u8; 6];
        emulated
            .read(gpu_emulation::VramAddr::new(0x40), &mut raw)
            .unwrap();
        assert_eq!(&raw, b"before", "the D3hot write did not reach VRAM");
        // Back in D0 (No_Soft_Reset: nothing was reset), the BARs answer as before.
        function
            .region_write(CONFIG_REGION_INDEX, PMCSR, &[0])
            .unwrap();
        assert_eq!(function.power_state(), PowerState::D0);
        function.region_read(0, 0, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), boot0);
        function.region_read(0, 0x10FD40, &mut dword).unwrap();
        assert_eq!(
            u32::from_le_bytes(dword),
            0x12,
            "window kept, D3hot write dropped"
        );
        function.region_read(vram, 0x40, &mut six).unwrap();
        assert_eq!(&six, b"before");
        // A reset returns to D0.
        function
            .region_write(CONFIG_REGION_INDEX, PMCSR, &[3])
            .unwrap();
        function.reset().unwrap();
        assert_eq!(function.power_state(), PowerState::D0);
        function.region_read(0, 0, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), boot0);
    }

    /// A host register as the emulated GPU holds it, behind the boundary.
    fn host_reg(host: &EmulatedHostGpu, offset: u64) -> u32 {
        host.emulated()
            .bar0_read(offset, crate::host_gpu::AccessWidth::Dword)
            .unwrap() as u32
    }

    const GSP_DOORBELL: u64 = 0x11_0C00;
    const GSP_MAILBOX0: u64 = 0x11_0040;
    const MMU_INVALIDATE_PDB: u64 = 0xB8_30A0;

    #[test]
    fn a_whole_gpu_guest_writes_host_registers_a_sliced_one_does_not() {
        let host = Arc::new(EmulatedHostGpu::by_name("gh100-80g").unwrap());
        let whole = PresentedFunction::new(host.clone()).unwrap();
        let bar0 = whole.bar0().unwrap();
        assert_eq!(
            bar0.register_map().mode(),
            super::super::registers::RegisterMode::WholeGpu
        );
        // The doorbell and the TLB-invalidate target latch what the guest wrote.
        whole
            .region_write(0, GSP_DOORBELL, &0x5A5Au32.to_le_bytes())
            .unwrap();
        assert_eq!(host_reg(&host, GSP_DOORBELL), 0x5A5A);
        whole
            .region_write(0, MMU_INVALIDATE_PDB, &0x0012_3400u32.to_le_bytes())
            .unwrap();
        assert_eq!(
            host.emulated().registers().mmu_invalidate_pdb.raw(),
            host_reg(&host, MMU_INVALIDATE_PDB)
        );
        assert_ne!(host_reg(&host, MMU_INVALIDATE_PDB), 0);
        // MAILBOX0 reaches the host too: the guest reads what the host holds.
        whole
            .region_write(0, GSP_MAILBOX0, &0xC0FFEEu32.to_le_bytes())
            .unwrap();
        let mut dword = [0u8; 4];
        whole.region_read(0, GSP_MAILBOX0, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), host_reg(&host, GSP_MAILBOX0));
        let stats = whole.trap_stats();
        assert_eq!((stats.passed_writes, stats.dropped_writes), (3, 0));
        // The window register stays the guest's own: the host's is not written.
        let host_window = host.emulated().registers().window;
        whole
            .region_write(0, 0x10_FD40, &0x77u32.to_le_bytes())
            .unwrap();
        assert_eq!(host.emulated().registers().window, host_window);
        whole.region_read(0, 0x10_FD40, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), 0x77);
        drop(whole);

        // A sliced guest of the same kind of GPU still has every write dropped.
        let host = Arc::new(EmulatedHostGpu::by_name("gh100-80g").unwrap());
        let mut sliced = crate::slice::SlicedGpu::new(host.clone()).unwrap();
        let guest = PresentedFunction::for_guest(sliced.add_guest(1 << 30).unwrap()).unwrap();
        let (doorbell, pdb) = (
            host_reg(&host, GSP_DOORBELL),
            host_reg(&host, MMU_INVALIDATE_PDB),
        );
        guest
            .region_write(0, GSP_DOORBELL, &0xA5A5u32.to_le_bytes())
            .unwrap();
        guest
            .region_write(0, MMU_INVALIDATE_PDB, &0xFFF0_0000u32.to_le_bytes())
            .unwrap();
        assert_eq!(host_reg(&host, GSP_DOORBELL), doorbell);
        assert_eq!(host_reg(&host, MMU_INVALIDATE_PDB), pdb);
        guest.region_read(0, GSP_DOORBELL, &mut dword).unwrap();
        assert_eq!(dword, [0; 4], "hidden");
        let stats = guest.trap_stats();
        assert_eq!((stats.passed_writes, stats.dropped_writes), (0, 2));
    }

    /// The capability IDs of `function`'s config space, in list order.
    fn capability_ids(function: &PresentedFunction) -> Vec<u8> {
        let mut ids = Vec::new();
        let mut at = [0u8; 1];
        function
            .region_read(CONFIG_REGION_INDEX, 0x34, &mut at)
            .unwrap();
        let mut next = at[0];
        while next != 0 && ids.len() < 48 {
            let mut header = [0u8; 2];
            function
                .region_read(CONFIG_REGION_INDEX, u64::from(next), &mut header)
                .unwrap();
            ids.push(header[0]);
            next = header[1];
        }
        ids
    }

    /// `without_msix` (what a hot-unpluggable guest is given): no MSI-X capability, and
    /// BAR0's MSI-X table reads as a hidden register (0, writes dropped) instead of
    /// table storage; with MSI-X the table keeps what is written.
    #[test]
    fn without_msix_offers_no_capability_and_hides_the_table() {
        let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let mut sliced = crate::slice::SlicedGpu::new(Arc::clone(&host)).unwrap();
        let options = PresentationOptions {
            without_msix: true,
            ..PresentationOptions::default()
        };
        let bare = PresentedFunction::for_guest_with(sliced.add_guest(64 << 20).unwrap(), options)
            .unwrap();
        let full = PresentedFunction::for_guest(sliced.add_guest(64 << 20).unwrap()).unwrap();
        assert!(bare.msix().is_none());
        assert_eq!(capability_ids(&bare), [0x01, 0x10], "PM, PCIe");
        assert_eq!(capability_ids(&full), [0x01, 0x10, 0x11], "PM, PCIe, MSI-X");
        let table = u64::from(MSIX_TABLE_OFFSET);
        let data = 0x4321u32.to_le_bytes();
        let mut back = [0u8; 4];
        for function in [&bare, &full] {
            function.region_write(0, table + 8, &data).unwrap();
            function.region_read(0, table + 8, &mut back).unwrap();
            let expected = if function.msix().is_some() {
                data
            } else {
                [0; 4]
            };
            assert_eq!(back, expected);
        }
        assert_eq!(bare.trap_stats().dropped_writes, 1);
        assert_eq!(full.trap_stats().dropped_writes, 0);
    }

    /// A guest given the whole GPU that puts BAR1 in virtual mode (what a nested
    /// gpu-backend slicing the GPU does) gets trapped accesses to the BAR1-aperture BAR
    /// translated; with `trap_vram` nothing of it is offered for mmap.
    #[test]
    fn whole_gpu_bar1_aperture_bar_is_translated_when_trapped() {
        use crate::host_driver::addr::MIB;
        use crate::slice::{Slice, VramRange};
        let host = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let options = PresentationOptions {
            trap_vram: true,
            ..PresentationOptions::default()
        };
        let function = PresentedFunction::new_with(host.clone(), options).unwrap();
        assert_eq!(function.options(), options);
        let aperture = function.identity().bar1_aperture().unwrap().index;
        let index = u32::from(aperture);
        let bar = function.bar(index).unwrap();
        assert!(bar.mappable().is_none(), "trap_vram: nothing to mmap");
        let instance = function
            .bars()
            .iter()
            .find(|b| b.role() == HostBarRole::InstanceMemory)
            .unwrap();
        assert!(instance.mappable().is_some(), "only VRAM BARs are trapped");
        // Physical mode: the BAR is VRAM 1:1.
        let emulated = host.emulated().vram();
        let at = |a: u64| gpu_emulation::VramAddr::new(a);
        emulated.write(at(32 * MIB + 0x100), b"translated").unwrap();
        let mut buf = [0u8; 10];
        function
            .region_read(index, 32 * MIB + 0x100, &mut buf)
            .unwrap();
        assert_eq!(&buf, b"translated");
        // Virtual mode, set up through the host's BAR1 as a driver in the guest would: one
        // window over VRAM [32 MiB, 34 MiB), tables at the top of usable VRAM.
        let usable = function.identity().usable_vram_size;
        let vram = function.guest().vram();
        vram.set_up_bar1(VramRange {
            start: VramAddr::new(usable - 64 * MIB),
            end: VramAddr::new(usable),
        })
        .unwrap();
        let va = vram
            .map_bar1_window(Slice::new(VramAddr::new(32 * MIB), 2 * MIB))
            .unwrap()
            .raw();
        function.region_read(index, va + 0x100, &mut buf).unwrap();
        assert_eq!(&buf, b"translated");
        function
            .region_write(index, va + 0x200, b"via BAR1")
            .unwrap();
        let mut raw = [0u8; 8];
        emulated.read(at(32 * MIB + 0x200), &mut raw).unwrap();
        assert_eq!(&raw, b"via BAR1");
        // BAR1 VA 32 MiB + 0x100 is not mapped now: it faults (reads ~0) instead of showing
        // VRAM 1:1 as an mmap of the memfd would.
        assert_ne!(va, 32 * MIB);
        function
            .region_read(index, 32 * MIB + 0x100, &mut buf)
            .unwrap();
        assert_eq!(buf, [0xFF; 10]);
    }

    #[test]
    fn by_default_the_whole_gpus_vram_bars_are_offered_for_mmap() {
        let function = present("tu102-24g");
        assert_eq!(function.options(), PresentationOptions::default());
        for bar in function.bars() {
            if matches!(bar.role(), HostBarRole::Vram { .. }) {
                assert!(bar.mappable().is_some());
            }
        }
    }
}
