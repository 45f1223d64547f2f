//! The host-GPU boundary: the one trait through which everything above reaches the GPU it
//! drives.
//!
//! Two implementations are planned: the emulated GPU of the `gpu-emulation` crate (the
//! embedded default, [`emulated::EmulatedHostGpu`]) and a real NVIDIA GPU bound to vfio-pci
//! (opened with `vfio-ioctls`). Code above this trait (the presentation, the vfio-user
//! server, the host driver) must not know which one it drives.

pub mod dma;
pub mod emulated;
pub mod guest_dma;
pub mod vfio;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use thiserror::Error;

pub use gpu_emulation::{AccessWidth, Generation, PciIdentity};

use crate::host_driver::addr::VramAddr;

/// Errors crossing the host-GPU boundary.
#[derive(Debug, Error)]
pub enum HostGpuError {
    /// A BAR0 register access was rejected (out of range or misaligned).
    #[error("BAR0 access rejected: {0}")]
    Bar0(String),
    /// A device-memory range is outside VRAM (or overflows).
    #[error("VRAM range {addr} + {len:#x} is outside the {size:#x}-byte VRAM")]
    VramOutOfRange {
        /// Start of the range.
        addr: VramAddr,
        /// Length of the range.
        len: u64,
        /// VRAM size.
        size: u64,
    },
    /// A BAR1-aperture access was rejected (outside the aperture, or no aperture).
    #[error("BAR1 aperture access rejected: {0}")]
    Bar1(String),
    /// A memory BAR access was rejected (out of range).
    #[error("memory access of {len} bytes at {offset:#x} is outside the {size:#x}-byte region")]
    MemoryOutOfRange {
        /// Offset of the access inside the region.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// The device failed the access (I/O error on hardware).
    #[error("host GPU I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The host refused to map memory for the device's DMA (on hardware: the IOMMU map
    /// failed, typically because of `RLIMIT_MEMLOCK`). The message says what to change.
    #[error("{0}")]
    DmaRefused(String),
    /// The device stopped answering (reads all ones) and is no longer driven.
    #[error("{0}")]
    DeviceLost(String),
}

impl HostGpuError {
    /// The errno this error maps to on the wire.
    pub fn errno(&self) -> i32 {
        match self {
            HostGpuError::Bar0(_)
            | HostGpuError::MemoryOutOfRange { .. }
            | HostGpuError::VramOutOfRange { .. }
            | HostGpuError::Bar1(_) => libc::EINVAL,
            HostGpuError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            HostGpuError::DmaRefused(_) => libc::ENOMEM,
            HostGpuError::DeviceLost(_) => libc::ENODEV,
        }
    }
}

/// What a BAR of the host GPU exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostBarRole {
    /// The register BAR (BAR0).
    Registers,
    /// A window onto device memory starting at `vram_offset`.
    Vram {
        /// Device-memory address of the BAR's first byte.
        vram_offset: u64,
    },
    /// The instance-memory aperture.
    InstanceMemory,
}

/// One memory BAR of the host GPU, with its *real* size (not padded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBar {
    /// First PCI BAR slot (equal to the VFIO region index).
    pub index: u8,
    /// What it exposes.
    pub role: HostBarRole,
    /// Real length in bytes.
    pub size: u64,
    /// 64-bit BAR (occupies slots `index` and `index + 1`).
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// Who the host GPU is: identity registers, PCI ids and the BAR layout of the real part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipIdentity {
    /// Short name (the profile name for the emulated GPU, the PCI address on hardware).
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// GPU generation.
    pub generation: Generation,
    /// `NV_PMC_BOOT_0`.
    pub boot0: u32,
    /// `NV_PMC_BOOT_42`.
    pub boot42: u32,
    /// PCI identity of the function.
    pub pci: PciIdentity,
    /// Device memory in bytes, including reserved carve-outs.
    pub vram_size: u64,
    /// Device memory the board reports as usable (`vram_size` minus carve-outs such as
    /// the GH200 resmem region, which starts right after it).
    pub usable_vram_size: u64,
    /// The memory BARs of the real part, by slot.
    pub bars: Vec<HostBar>,
}

impl ChipIdentity {
    /// The BAR whose first slot is `index`.
    pub fn bar(&self, index: u8) -> Option<&HostBar> {
        self.bars.iter().find(|bar| bar.index == index)
    }

    /// The BAR1 aperture: the VRAM BAR starting at device-memory address 0, whose offsets
    /// are VRAM addresses in physical mode and GPU virtual addresses in virtual mode
    /// (gpu-facts 4.6). On the GH200 this is the nvgrace usemem BAR.
    pub fn bar1_aperture(&self) -> Option<&HostBar> {
        self.bars
            .iter()
            .find(|bar| bar.role == HostBarRole::Vram { vram_offset: 0 })
    }
}

/// An fd (and the offset in it) that maps a memory BAR's real part directly.
#[derive(Debug, Clone)]
pub struct MmapSource {
    /// The file to map (the VRAM memfd, or the VFIO device fd on hardware).
    pub fd: Arc<OwnedFd>,
    /// Offset in `fd` of the BAR's first byte.
    pub file_offset: u64,
}

/// The real memory behind one memory BAR. Offsets are relative to the BAR's start and must
/// satisfy `offset + len <= self.len()`; implementations check and return an error
/// otherwise.
pub trait HostMemory: Send + Sync {
    /// Real length in bytes.
    fn len(&self) -> u64;
    /// Whether the region is empty (never for a real BAR).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError>;
    /// Copies `data` to `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError>;
    /// Where the region can be mapped from, if it can.
    fn mmap_source(&self) -> Option<MmapSource>;
}

/// A GPU the backend drives: BAR0 registers, memory BARs, identity and reset.
pub trait HostGpu: Send + Sync {
    /// Identity and real BAR layout.
    fn identity(&self) -> &ChipIdentity;
    /// Whether the device stopped answering, so nothing should be served from it any
    /// more. The default (a device that cannot get lost) is `false`.
    fn is_lost(&self) -> bool {
        false
    }
    /// Reads `width` bytes of BAR0 at `offset` (little-endian, naturally aligned).
    fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError>;
    /// Writes the low `width` bytes of `value` to BAR0 at `offset`.
    fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), HostGpuError>;
    /// The memory behind the memory BAR whose first slot is `index`.
    fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>>;
    /// Resets the GPU's register state. Device memory is kept.
    fn reset(&self) -> Result<(), HostGpuError>;
    /// Sets device memory `[addr, addr + len)` to zero (scrubbing VRAM before it is
    /// handed to a guest). The emulated GPU punches holes in its memfd, so a scrubbed range
    /// costs no resident memory; hardware would use a copy-engine fill or PRAMIN writes.
    fn scrub_vram(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError>;
    /// Reads `buf.len()` bytes at `offset` of the BAR1 aperture
    /// ([`ChipIdentity::bar1_aperture`]): VRAM 1:1 in physical mode, translated by the GPU
    /// MMU through the bound instance block in virtual mode (faulting pages read ~0).
    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError>;
    /// Writes `data` at `offset` of the BAR1 aperture (see [`HostGpu::bar1_read`]; writes
    /// to faulting pages are dropped by the GPU).
    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError>;
    /// An fd and offset that map device memory `[addr, addr + len)` directly, if the host
    /// can hand one out (the emulated GPU: its VRAM memfd at `addr`).
    fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<MmapSource>;
    /// An fd and offset that map `[offset, offset + len)` of the BAR1 aperture directly
    /// (a sliced guest's BAR1 window), if the host can export exactly that range; `None`
    /// (the default) serves the range through the socket.
    fn bar1_mmap_source(&self, offset: u64, len: u64) -> Option<MmapSource> {
        let _ = (offset, len);
        None
    }
    /// Disconnects every source [`HostGpu::vram_mmap_source`] handed out for device memory
    /// overlapping `[addr, addr + len)` (called when a guest's slice is taken back), so the
    /// next request for the range gets a fresh source and whoever still maps an old one no
    /// longer reaches device memory through it. The default does nothing (a host that hands
    /// out no sources). An error means a source could not be disconnected: whoever maps it
    /// may still reach the range, which must then never be handed to anybody else.
    fn release_vram_mmap_source(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
        let _ = (addr, len);
        Ok(())
    }
    /// Allocates `len` bytes (a multiple of 4 KiB) of zero-filled host memory the GPU
    /// reaches by DMA (the GSP's shared queue block and boot arguments; the GSP itself is
    /// started through BAR0, see `crate::gsp::falcon`). The emulated GPU maps a memfd into
    /// its emulated IOMMU; a VFIO host would map anonymous memory with
    /// `VFIO_IOMMU_MAP_DMA`. The default refuses with ENOTSUP.
    fn dma_alloc(&self, len: u64) -> Result<Arc<dyn dma::DmaBuffer>, HostGpuError> {
        let _ = len;
        Err(HostGpuError::Io(std::io::Error::from_raw_os_error(
            libc::ENOTSUP,
        )))
    }
    /// Makes `memory` (a DMA map of the guest given the whole GPU) reachable by the GPU at
    /// bus address `iova`. The default refuses with ENOTSUP (a host that cannot lend guest
    /// memory to its device).
    fn map_guest_dma(
        &self,
        iova: u64,
        memory: std::sync::Arc<dyn guest_dma::GuestDmaMemory>,
    ) -> Result<(), HostGpuError> {
        let _ = (iova, memory);
        Err(HostGpuError::Io(std::io::Error::from_raw_os_error(
            libc::ENOTSUP,
        )))
    }
    /// Takes back the guest map that [`HostGpu::map_guest_dma`] made at `iova`; once this
    /// returns the GPU no longer reaches it. The default does nothing.
    fn unmap_guest_dma(&self, iova: u64) {
        let _ = iova;
    }
}
