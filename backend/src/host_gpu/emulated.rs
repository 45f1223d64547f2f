//! [`HostGpu`] for the emulated GPU of the `gpu-emulation` crate (the embedded default).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use gpu_emulation::gsp::DmaError;
use gpu_emulation::{BarRole, ChipProfile, EmulatedGpu, GpuError, Vram, VramAddr};
use thiserror::Error;

use super::guest_dma::GuestDmaMemory;
use super::{
    AccessWidth, ChipIdentity, HostBar, HostBarRole, HostGpu, HostGpuError, HostMemory, MmapSource,
};
use crate::host_driver::addr::VramAddr as HostVramAddr;

/// Errors of bringing up the emulated GPU.
#[derive(Debug, Error)]
pub enum EmulatedHostGpuError {
    /// The emulated GPU could not be created.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The VRAM fd could not be duplicated for mapping.
    #[error("duplicating the emulated memory fd failed: {0}")]
    DupFd(#[source] std::io::Error),
}

/// The emulated GPU behind the [`HostGpu`] trait.
pub struct EmulatedHostGpu {
    gpu: Arc<EmulatedGpu>,
    identity: ChipIdentity,
    memory_bars: Vec<(u8, Arc<dyn HostMemory>)>,
    /// VRAM ranges handed out by [`HostGpu::vram_mmap_source`]: (start, len, the range's
    /// own memfd from [`Vram::carve`]). Never the whole-VRAM memfd, which would let the
    /// peer map every other slice and the host-reserved VRAM.
    carves: Mutex<Vec<(u64, u64, Arc<OwnedFd>)>>,
}

impl EmulatedHostGpu {
    /// Powers on an emulated GPU of `profile`.
    pub fn new(profile: &'static ChipProfile) -> Result<Self, EmulatedHostGpuError> {
        Self::with_vram_file(profile, None)
    }

    /// [`EmulatedHostGpu::new`], with VRAM kept in the file at `vram_file` if given (`serve
    /// --state`: it outlives the process). Such VRAM is never handed to QEMU for mapping (a
    /// regular file cannot be sealed against a peer truncating it): every VRAM access of
    /// its guests is trapped.
    pub fn with_vram_file(
        profile: &'static ChipProfile,
        vram_file: Option<&std::path::Path>,
    ) -> Result<Self, EmulatedHostGpuError> {
        let gpu = Arc::new(EmulatedGpu::with_vram_file(profile, vram_file)?);
        let shareable = vram_file.is_none();
        let dup = |memory: Option<&Vram>| -> Result<Arc<OwnedFd>, EmulatedHostGpuError> {
            let memory = memory.ok_or_else(|| {
                EmulatedHostGpuError::DupFd(std::io::Error::from_raw_os_error(libc::ENODEV))
            })?;
            Ok(Arc::new(
                memory
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(EmulatedHostGpuError::DupFd)?,
            ))
        };
        // Shared by the VRAM BARs, whose mapping is for a guest given the whole GPU.
        let vram_fd = dup(Some(gpu.vram()))?;
        let mut memory_bars: Vec<(u8, Arc<dyn HostMemory>)> = Vec::new();
        for bar in profile.bars() {
            let which = match bar.role {
                BarRole::Registers => continue,
                BarRole::Vram { vram_offset } => EmulatedMemory::Vram { vram_offset },
                BarRole::InstanceMemory => EmulatedMemory::Instance,
            };
            let fd = match which {
                EmulatedMemory::Vram { .. } => Arc::clone(&vram_fd),
                EmulatedMemory::Instance => dup(which.memory(&gpu))?,
            };
            let region = EmulatedBarMemory {
                gpu: Arc::clone(&gpu),
                which,
                len: bar.size,
                fd,
                shareable,
            };
            memory_bars.push((bar.index, Arc::new(region)));
        }
        Ok(EmulatedHostGpu {
            identity: identity_of(profile),
            gpu,
            memory_bars,
            carves: Mutex::new(Vec::new()),
        })
    }

    /// Powers on an emulated GPU of the profile named `name`.
    pub fn by_name(name: &str) -> Result<Self, crate::cli::CliError> {
        let profile = ChipProfile::by_name(name)?;
        Ok(Self::new(profile)?)
    }

    /// The emulated GPU itself (for tests and diagnostics that look behind the boundary).
    pub fn emulated(&self) -> &Arc<EmulatedGpu> {
        &self.gpu
    }
}

fn identity_of(profile: &'static ChipProfile) -> ChipIdentity {
    ChipIdentity {
        name: profile.name().to_owned(),
        description: profile.human_name().to_owned(),
        generation: profile.generation(),
        boot0: profile.boot0().raw(),
        boot42: profile.boot42().raw(),
        pci: *profile.pci(),
        vram_size: profile.vram_size(),
        usable_vram_size: profile.usable_vram_size(),
        bars: profile
            .bars()
            .iter()
            .map(|bar| HostBar {
                index: bar.index,
                role: match bar.role {
                    BarRole::Registers => HostBarRole::Registers,
                    BarRole::Vram { vram_offset } => HostBarRole::Vram { vram_offset },
                    BarRole::InstanceMemory => HostBarRole::InstanceMemory,
                },
                size: bar.size,
                is_64bit: bar.is_64bit,
                prefetchable: bar.prefetchable,
            })
            .collect(),
    }
}

impl HostGpu for EmulatedHostGpu {
    fn identity(&self) -> &ChipIdentity {
        &self.identity
    }

    fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
        self.gpu
            .bar0_read(offset, width)
            .map_err(|e| HostGpuError::Bar0(e.to_string()))
    }

    fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), HostGpuError> {
        self.gpu
            .bar0_write(offset, width, value)
            .map_err(|e| HostGpuError::Bar0(e.to_string()))
    }

    fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>> {
        self.memory_bars
            .iter()
            .find(|(slot, _)| *slot == index)
            .map(|(_, region)| Arc::clone(region))
    }

    fn reset(&self) -> Result<(), HostGpuError> {
        self.gpu.reset();
        Ok(())
    }

    fn scrub_vram(&self, addr: HostVramAddr, len: u64) -> Result<(), HostGpuError> {
        let size = self.identity.vram_size;
        if addr.raw().checked_add(len).is_none_or(|end| end > size) {
            return Err(HostGpuError::VramOutOfRange { addr, len, size });
        }
        // Zero-fill punches holes: the scrubbed range becomes sparse again.
        self.gpu
            .vram()
            .fill(VramAddr::new(addr.raw()), len, 0)
            .map_err(|e| HostGpuError::Io(std::io::Error::other(e.to_string())))
    }

    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.gpu
            .bar1_read(offset, buf)
            .map_err(|e| HostGpuError::Bar1(e.to_string()))
    }

    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.gpu
            .bar1_write(offset, data)
            .map_err(|e| HostGpuError::Bar1(e.to_string()))
    }

    /// The range's own memfd (carved out of VRAM on first use, the same fd afterwards until
    /// [`HostGpu::release_vram_mmap_source`]), at
    /// file offset 0: whoever maps it reaches `[addr, addr + len)` and nothing else. A
    /// range that overlaps an earlier, different one gets no mmap source (its accesses are
    /// trapped instead).
    fn vram_mmap_source(&self, addr: HostVramAddr, len: u64) -> Option<MmapSource> {
        if self.gpu.vram().is_file_backed() {
            return None;
        }
        let (start, end) = (addr.raw(), addr.raw().checked_add(len)?);
        if end > self.identity.vram_size {
            return None;
        }
        let mut carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, fd)) = carves.iter().find(|(s, l, _)| (*s, *l) == (start, len)) {
            return Some(MmapSource {
                fd: Arc::clone(fd),
                file_offset: 0,
            });
        }
        match self.gpu.vram().carve(VramAddr::new(start), len) {
            Ok(fd) => {
                carves.push((start, len, Arc::clone(&fd)));
                Some(MmapSource { fd, file_offset: 0 })
            }
            Err(e) => {
                log::warn!("VRAM {addr} + {len:#x} cannot be mapped directly: {e}");
                None
            }
        }
    }

    /// Uncarves every cached range overlapping `[addr, addr + len)` and forgets it: the
    /// next [`HostGpu::vram_mmap_source`] of the range carves a fresh memfd, and the old
    /// one (which a removed guest's QEMU may still map) is no longer VRAM. A range whose
    /// uncarve fails stays backed by the old memfd, which its old peer may still map: that
    /// is an error, and the caller must never hand the range out again.
    fn release_vram_mmap_source(&self, addr: HostVramAddr, len: u64) -> Result<(), HostGpuError> {
        let end = addr.raw().saturating_add(len);
        let mut carves = self.carves.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failed = None;
        carves.retain(|&(start, carve_len, _)| {
            if start >= end || start + carve_len <= addr.raw() {
                return true;
            }
            if let Err(e) = self.gpu.vram().uncarve(VramAddr::new(start), carve_len) {
                log::error!(
                    "VRAM {start:#x} + {carve_len:#x} cannot be disconnected from its old \
                     memfd: {e}"
                );
                failed = Some(e);
            }
            false
        });
        match failed {
            Some(e) => Err(HostGpuError::Io(std::io::Error::other(e.to_string()))),
            None => Ok(()),
        }
    }

    fn dma_alloc(&self, len: u64) -> Result<Arc<dyn super::dma::DmaBuffer>, HostGpuError> {
        let buffer = super::dma::EmulatedDmaBuffer::new(Arc::clone(&self.gpu), len)?;
        Ok(Arc::new(buffer))
    }

    /// Puts `memory` into the emulated IOMMU at `iova` (wrapped as a DMA target that
    /// honours its read/write permissions). A range that overlaps an existing mapping is
    /// refused with EEXIST, an empty or wrapping one with EINVAL.
    fn map_guest_dma(
        &self,
        iova: u64,
        memory: Arc<dyn GuestDmaMemory>,
    ) -> Result<(), HostGpuError> {
        let target = Arc::new(super::dma::GuestDmaTarget::new(memory));
        self.gpu.dma().map_at(iova, target).map_err(|e| {
            log::warn!("mapping guest DMA memory at {iova:#x}: {e}");
            let errno = match e {
                DmaError::Overlap { .. } => libc::EEXIST,
                _ => libc::EINVAL,
            };
            HostGpuError::Io(std::io::Error::from_raw_os_error(errno))
        })
    }

    /// Takes the guest map at `iova` out of the emulated IOMMU (a GSP access already under
    /// way keeps its reference until it ends).
    fn unmap_guest_dma(&self, iova: u64) {
        if let Err(e) = self.gpu.dma().unmap_at(iova) {
            log::debug!("unmapping guest DMA memory at {iova:#x}: {e}");
        }
    }
}

/// Which emulated memory a BAR shows.
#[derive(Debug, Clone, Copy)]
enum EmulatedMemory {
    Vram { vram_offset: u64 },
    Instance,
}

impl EmulatedMemory {
    fn memory(self, gpu: &EmulatedGpu) -> Option<&Vram> {
        match self {
            EmulatedMemory::Vram { .. } => Some(gpu.vram()),
            EmulatedMemory::Instance => gpu.instance_memory(),
        }
    }

    fn base(self) -> u64 {
        match self {
            EmulatedMemory::Vram { vram_offset } => vram_offset,
            EmulatedMemory::Instance => 0,
        }
    }
}

/// One memory BAR of the emulated GPU: a range of its VRAM or instance memory.
struct EmulatedBarMemory {
    gpu: Arc<EmulatedGpu>,
    which: EmulatedMemory,
    len: u64,
    fd: Arc<OwnedFd>,
    /// The memory may be mapped by a peer (not file-backed VRAM).
    shareable: bool,
}

impl EmulatedBarMemory {
    /// The memory and the address of `offset..offset+len` in it, after a range check.
    fn locate(&self, offset: u64, len: usize) -> Result<(&Vram, VramAddr), HostGpuError> {
        let out_of_range = || HostGpuError::MemoryOutOfRange {
            offset,
            len: len as u64,
            size: self.len,
        };
        let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
        if end > self.len {
            return Err(out_of_range());
        }
        let memory = self.which.memory(&self.gpu).ok_or_else(out_of_range)?;
        let addr = self
            .which
            .base()
            .checked_add(offset)
            .ok_or_else(out_of_range)?;
        Ok((memory, VramAddr::new(addr)))
    }
}

impl HostMemory for EmulatedBarMemory {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        let (memory, addr) = self.locate(offset, buf.len())?;
        memory
            .read(addr, buf)
            .map_err(|e| HostGpuError::Io(std::io::Error::other(e.to_string())))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        let (memory, addr) = self.locate(offset, data.len())?;
        memory
            .write(addr, data)
            .map_err(|e| HostGpuError::Io(std::io::Error::other(e.to_string())))
    }

    fn mmap_source(&self) -> Option<MmapSource> {
        self.shareable.then(|| MmapSource {
            fd: Arc::clone(&self.fd),
            file_offset: self.which.base(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_comes_up_with_its_memory_bars() {
        for profile in ChipProfile::all() {
            let gpu = EmulatedHostGpu::new(profile).unwrap();
            let identity = gpu.identity();
            assert_eq!(identity.pci.vendor_id, 0x10de);
            for bar in &identity.bars {
                match bar.role {
                    HostBarRole::Registers => assert!(gpu.memory_bar(bar.index).is_none()),
                    _ => assert_eq!(gpu.memory_bar(bar.index).unwrap().len(), bar.size),
                }
            }
        }
    }

    #[test]
    fn memory_bar_reads_what_was_written_and_checks_bounds() {
        let gpu = EmulatedHostGpu::by_name("gh200-96g").unwrap();
        let usemem = gpu.memory_bar(4).unwrap();
        let end = usemem.len();
        usemem.write(end - 4, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        usemem.read(end - 4, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(usemem.read(end - 3, &mut buf).is_err());
        assert!(usemem.write(u64::MAX, &buf).is_err());
        // The resmem BAR starts where usemem ends: its first bytes are VRAM at 95 GiB.
        let resmem = gpu.memory_bar(2).unwrap();
        resmem.write(0, &[9; 4]).unwrap();
        let mut vram = [0u8; 4];
        gpu.emulated()
            .vram()
            .read(VramAddr::new(end), &mut vram)
            .unwrap();
        assert_eq!(vram, [9; 4]);
    }

    #[test]
    fn guest_dma_maps_honour_permissions_and_refuse_overlap() {
        use super::super::dma::test_memory::VecGuestMemory;
        let gpu = EmulatedHostGpu::by_name("gh100-80g").unwrap();
        let dma = gpu.emulated().dma();
        let write_only = Arc::new(VecGuestMemory::new(0x2000, false, true));
        let read_only = Arc::new(VecGuestMemory::new(0x1000, true, false));
        read_only.write(0x10, &[1, 2, 3, 4]).unwrap();
        gpu.map_guest_dma(0x8000_0000, write_only.clone()).unwrap();
        gpu.map_guest_dma(0x8000_2000, read_only).unwrap();
        // The device writes write-only memory but cannot read it back.
        let (t, off) = dma.resolve(0x8000_1000, 4).unwrap();
        t.store_u32(off, 0xAABB_CCDD).unwrap();
        let mut b = [0u8; 4];
        write_only.read(0x1000, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xAABB_CCDD);
        assert!(matches!(t.load_u32(off), Err(DmaError::NotReadable)));
        assert!(matches!(t.read(off, &mut b), Err(DmaError::NotReadable)));
        assert!(matches!(t.load_u32(off + 2), Err(DmaError::Misaligned(_))));
        assert!(matches!(
            t.read(0x1FFE, &mut b),
            Err(DmaError::OutOfBounds { .. })
        ));
        // Read-only memory reads, refuses writes.
        let (t, off) = dma.resolve(0x8000_2010, 4).unwrap();
        assert_eq!(t.load_u32(off).unwrap(), 0x0403_0201);
        assert!(matches!(t.store_u32(off, 0), Err(DmaError::NotWritable)));
        // Overlap: EEXIST; empty: EINVAL.
        let err = gpu
            .map_guest_dma(
                0x8000_1000,
                Arc::new(VecGuestMemory::new(0x1000, true, true)),
            )
            .unwrap_err();
        assert_eq!(err.errno(), libc::EEXIST);
        let err = gpu
            .map_guest_dma(0x9000_0000, Arc::new(VecGuestMemory::new(0, true, true)))
            .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        // Unmapped: gone from the IOMMU; unmapping again is harmless.
        gpu.unmap_guest_dma(0x8000_0000);
        gpu.unmap_guest_dma(0x8000_0000);
        assert!(dma.resolve(0x8000_1000, 4).is_err());
        assert_eq!(dma.mapping_count(), 1);
    }

    #[test]
    fn bar0_goes_to_the_register_model() {
        let gpu = EmulatedHostGpu::by_name("tu102-24g").unwrap();
        let boot0 = gpu.bar0_read(0, AccessWidth::Dword).unwrap();
        assert_eq!(boot0 as u32, gpu.identity().boot0);
        assert!(gpu.bar0_read(2, AccessWidth::Dword).is_err());
        assert!(gpu.bar0_read(16 << 20, AccessWidth::Byte).is_err());
    }
}
