//! [`HostGpu`] for a real NVIDIA GPU bound to vfio-pci, driven through the Linux VFIO UAPI
//! with `vfio-ioctls` (container/group API, TYPE1v2 IOMMU).
//!
//! Opening ([`VfioHostGpu::open`]) touches nothing before sysfs says the function is
//! NVIDIA's, bound to vfio-pci and in a viable IOMMU group ([`sysfs`]). Then:
//! - **BAR0** is mapped ([`mapped::MappedBar`]) and every register access is one volatile,
//!   naturally aligned load or store, as a kernel driver does: no syscall per register.
//! - **Identity** comes from the device ([`identify`]): config space, region sizes,
//!   BOOT_0/BOOT_42 and the framebuffer-size register.
//! - **Memory BARs** are read and written with `pread`/`pwrite` on the device fd
//!   ([`memory::VfioBarMemory`]); failures are errors, never just log lines.
//! - **DMA memory** ([`dma::VfioDmaBuffer`]) is pinned and mapped with
//!   `VFIO_IOMMU_MAP_DMA` at IOVAs from [`dma::IovaSpace`].
//! - **A device that stops answering** (a register reads 0xFFFFFFFF and so does BOOT_0) is
//!   marked lost: every later access fails with `ENODEV`, the log says so once, and the
//!   guests of that GPU get errors instead of hanging.
//! - **QEMU never gets the device fd.** A guest's VRAM is offered for mapping only as a
//!   dma-buf export of exactly its range, where the kernel can export mappable dma-bufs
//!   ([`dmabuf`]); otherwise it is served through the socket.
//! - **Scrubbing** is not done here: [`HostGpu::scrub_vram`] is unsupported, so the host
//!   driver scrubs through its PRAMIN window, the window register's one owner.
//!
//! The iommufd cdev path (`/dev/iommu`, `/dev/vfio/devices/vfioN`) is not used: in
//! `vfio-ioctls` 0.10 it sits behind the `vfio_cdev` feature, which pulls in the `kvm`
//! feature the project builds without. Kernels with iommufd keep the container API
//! (`CONFIG_IOMMUFD_VFIO_CONTAINER` or the legacy VFIO container), which is what is opened.

pub mod address;
pub mod dma;
pub mod dmabuf;
pub mod identify;
pub mod liveness;
pub mod mapped;
pub mod memory;
pub mod sysfs;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use super::guest_dma::GuestDmaMemory;
use super::{
    AccessWidth, ChipIdentity, HostBarRole, HostGpu, HostGpuError, HostMemory, MmapSource,
};
use crate::host_driver::addr::VramAddr;
pub use address::PciAddress;
use dma::{IovaSpace, VfioDmaBuffer};
pub use dmabuf::DmaBufSupport;
use identify::{DeviceReadout, IdentifyError};
use liveness::Liveness;
use mapped::{MappedBar, MappedBarError};
use memory::VfioBarMemory;
use std::fs::File;
use std::os::unix::fs::FileExt;
use sysfs::{Sysfs, SysfsError};

ioctl_io_nr!(VFIO_DEVICE_RESET, b';' as u32, 100 + 11);

/// Why a GPU cannot be opened through VFIO. Every variant is the user's to fix (exit
/// code 2): the message names the device and what to do.
#[derive(Debug, Error)]
pub enum VfioHostGpuError {
    /// The PCI address does not parse.
    #[error(transparent)]
    Address(#[from] address::AddressError),
    /// sysfs says the device cannot be used (missing, not NVIDIA, not bound, group).
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The VFIO container could not be opened.
    #[error("cannot open the VFIO container /dev/vfio/vfio: {0} (is the vfio module loaded, and are you root or in the group that owns /dev/vfio?)")]
    Container(#[source] VfioError),
    /// The group or device could not be opened.
    #[error("cannot open {address} through VFIO group {group}: {source}")]
    Device {
        /// The device.
        address: PciAddress,
        /// Its group.
        group: u32,
        /// What vfio-ioctls reported.
        #[source]
        source: VfioError,
    },
    /// The VFIO device fd could not be duplicated.
    #[error("duplicating the VFIO device fd of {address}: {source}")]
    DupFd {
        /// The device.
        address: PciAddress,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// BAR0 cannot be mapped.
    #[error("{address}: BAR0 cannot be mapped ({reason}); the backend reaches registers only through a mapping")]
    Bar0NotMappable {
        /// The device.
        address: PciAddress,
        /// Why.
        reason: String,
    },
    /// Reading the config space failed.
    #[error("{address}: reading config space failed: {source}")]
    Config {
        /// The device.
        address: PciAddress,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The chip could not be identified.
    #[error(transparent)]
    Identify(#[from] IdentifyError),
}

/// A real NVIDIA GPU bound to vfio-pci.
pub struct VfioHostGpu {
    address: PciAddress,
    identity: ChipIdentity,
    bar0: MappedBar,
    /// BAR0's region offset in the device fd.
    bar0_offset: u64,
    memory_bars: Vec<(u8, Arc<VfioBarMemory>)>,
    iova: Arc<IovaSpace>,
    liveness: Liveness,
    dmabuf: DmaBufSupport,
    device_fd: Arc<File>,
    /// The BAR1 aperture's VFIO region offset and region index.
    aperture: Option<(u32, u64)>,
    /// Guest memory lent to the GPU: IOVA → (length, memory kept alive while mapped).
    guest_maps: Mutex<BTreeMap<u64, GuestMap>>,
    // Dropped last, in this order (fields drop in declaration order): the group can only
    // leave the container once every fd and mapping of the device above is closed.
    /// Keeps the group attached to the container for the GPU's lifetime.
    _device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl Drop for VfioHostGpu {
    fn drop(&mut self) {
        let iovas: Vec<u64> = self
            .guest_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        for iova in iovas {
            self.unmap_guest_dma(iova);
        }
    }
}

/// A guest map lent to the GPU: its length, and the memory, kept alive while mapped.
type GuestMap = (u64, Arc<dyn GuestDmaMemory>);

impl std::fmt::Debug for VfioHostGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioHostGpu")
            .field("address", &self.address)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl VfioHostGpu {
    /// Opens the GPU at `address` (e.g. `0000:01:00.0`) through the real sysfs and VFIO.
    pub fn open(address: &str) -> Result<VfioHostGpu, VfioHostGpuError> {
        VfioHostGpu::open_in(&Sysfs::default(), address.parse()?)
    }

    /// Opens the GPU at `address`, checking it in `sysfs` first.
    pub fn open_in(sysfs: &Sysfs, address: PciAddress) -> Result<VfioHostGpu, VfioHostGpuError> {
        let candidate = sysfs.check(address)?;
        if std::path::Path::new("/dev/iommu").exists() {
            log::info!(
                "{address}: /dev/iommu exists, but the iommufd cdev path needs vfio-ioctls' \
                 kvm feature; using the VFIO container API"
            );
        }
        let container = Arc::new(VfioContainer::new(None).map_err(VfioHostGpuError::Container)?);
        let ops: Arc<dyn VfioOps> = Arc::clone(&container) as Arc<dyn VfioOps>;
        let device = VfioDevice::new(&candidate.sysfs_path, ops, false).map_err(|source| {
            VfioHostGpuError::Device {
                address,
                group: candidate.group,
                source,
            }
        })?;
        // SAFETY: `device` owns the fd for as long as this borrow is used (the dup below).
        let device_fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|source| VfioHostGpuError::DupFd { address, source })?;
        let device_fd = Arc::new(File::from(device_fd));

        let bar0_index = VFIO_PCI_BAR0_REGION_INDEX;
        let bar0_size = device.get_region_size(bar0_index);
        if device.get_region_flags(bar0_index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(VfioHostGpuError::Bar0NotMappable {
                address,
                reason: "VFIO does not offer the region for mmap".to_owned(),
            });
        }
        let bar0_offset = device.get_region_offset(bar0_index);
        let bar0 = MappedBar::map(device_fd.as_fd(), bar0_offset, bar0_size).map_err(
            |e: MappedBarError| VfioHostGpuError::Bar0NotMappable {
                address,
                reason: e.to_string(),
            },
        )?;

        let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        enable_memory_and_bus_master(&device_fd, config_offset)
            .map_err(|source| VfioHostGpuError::Config { address, source })?;
        let mut config = [0u8; 64];
        device_fd
            .read_exact_at(&mut config, config_offset)
            .map_err(|source| VfioHostGpuError::Config { address, source })?;
        let register = |offset| {
            bar0.read(offset, AccessWidth::Dword)
                .map(|v| v as u32)
                .unwrap_or(u32::MAX)
        };
        let mut bar_region_sizes = [0u64; 6];
        for (i, size) in bar_region_sizes.iter_mut().enumerate() {
            *size = device.get_region_size(i as u32);
        }
        let readout = DeviceReadout {
            config,
            bar_region_sizes,
            boot0: register(identify::BOOT_0),
            boot42: register(identify::BOOT_42),
            local_memory_range: register(identify::LOCAL_MEMORY_RANGE),
            usable_fb_size_mb: register(identify::USABLE_FB_SIZE_IN_MB),
        };
        let identity = identify::identify(address, &readout)?;

        let aperture = identity.bar1_aperture().map(|bar| {
            (
                u32::from(bar.index),
                device.get_region_offset(u32::from(bar.index)),
            )
        });
        let dmabuf = match identity.bar1_aperture() {
            Some(bar) => dmabuf::detect(
                device_fd.as_fd(),
                u32::from(bar.index),
                bar.size.min(0x20_0000),
            ),
            None => DmaBufSupport::Unavailable("no VRAM aperture".to_owned()),
        };
        match &dmabuf {
            DmaBufSupport::Mappable => log::info!(
                "{address}: guests' VRAM is offered to QEMU as dma-buf exports of their range"
            ),
            DmaBufSupport::Unavailable(why) => log::info!(
                "{address}: guests' VRAM is served through the vfio-user socket (every access \
                 trapped): {why}"
            ),
        }
        let mut memory_bars = Vec::new();
        for bar in &identity.bars {
            if bar.role == HostBarRole::Registers {
                continue;
            }
            let index = u32::from(bar.index);
            let mmap = match (&dmabuf, bar.role) {
                (DmaBufSupport::Mappable, HostBarRole::Vram { .. }) => {
                    match dmabuf::export(device_fd.as_fd(), index, 0, bar.size) {
                        Ok(fd) => Some(MmapSource {
                            fd: Arc::new(fd),
                            file_offset: 0,
                        }),
                        Err(e) => {
                            log::warn!("{address}: BAR{index} cannot be exported: {e}");
                            None
                        }
                    }
                }
                _ => None,
            };
            memory_bars.push((
                bar.index,
                Arc::new(VfioBarMemory::new(
                    Arc::clone(&device_fd),
                    device.get_region_offset(index),
                    bar.size,
                    mmap,
                )),
            ));
        }
        log::info!(
            "{address}: {} ({} VRAM, group {})",
            identity.description,
            crate::units::human_size(identity.vram_size),
            candidate.group
        );
        Ok(VfioHostGpu {
            address,
            identity,
            _device: device,
            container,
            bar0,
            bar0_offset,
            memory_bars,
            iova: Arc::default(),
            liveness: Liveness::new(address),
            dmabuf,
            device_fd,
            aperture,
            guest_maps: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether VRAM ranges can be handed to QEMU as mappable dma-bufs here.
    pub fn dma_buf_support(&self) -> &DmaBufSupport {
        &self.dmabuf
    }

    /// Reads the BAR0 dword at `offset` with `pread` on the device fd: one syscall per
    /// register, the slow path the mapping avoids (kept for comparison, `gpu-backend
    /// measure`).
    pub fn bar0_read_pread(&self, offset: u64) -> Result<u32, HostGpuError> {
        self.check_alive()?;
        if offset % 4 != 0 || offset + 4 > self.bar0.len() {
            return Err(HostGpuError::Bar0(format!("dword read at {offset:#x}")));
        }
        let mut raw = [0u8; 4];
        self.device_fd
            .read_exact_at(&mut raw, self.bar0_offset + offset)?;
        Ok(u32::from_le_bytes(raw))
    }

    fn check_alive(&self) -> Result<(), HostGpuError> {
        self.liveness.check()
    }

    fn aperture_memory(&self) -> Result<&Arc<VfioBarMemory>, HostGpuError> {
        let index = self
            .identity
            .bar1_aperture()
            .map(|bar| bar.index)
            .ok_or_else(|| HostGpuError::Bar1("no BAR1 aperture".to_owned()))?;
        self.memory_bars
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, m)| m)
            .ok_or_else(|| HostGpuError::Bar1("no BAR1 aperture".to_owned()))
    }
}

/// PCI COMMAND register offset and its memory-space and bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// Turns on memory decoding and bus mastering in the device's COMMAND register (through the
/// VFIO config region): vfio-pci clears bus mastering when the device is opened, and without
/// it the GPU cannot reach its DMA memory (the GSP's queues).
fn enable_memory_and_bus_master(device: &File, config_offset: u64) -> std::io::Result<()> {
    let mut raw = [0u8; 2];
    device.read_exact_at(&mut raw, config_offset + PCI_COMMAND)?;
    let command = u16::from_le_bytes(raw);
    let wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    if wanted != command {
        device.write_all_at(&wanted.to_le_bytes(), config_offset + PCI_COMMAND)?;
    }
    Ok(())
}

impl HostGpu for VfioHostGpu {
    fn identity(&self) -> &ChipIdentity {
        &self.identity
    }

    fn is_lost(&self) -> bool {
        self.liveness.is_lost()
    }

    fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
        self.check_alive()?;
        let value = self
            .bar0
            .read(offset, width)
            .map_err(|e| HostGpuError::Bar0(e.to_string()))?;
        self.liveness.vet_read(value, width, || {
            self.bar0
                .read(identify::BOOT_0, AccessWidth::Dword)
                .ok()
                .map(|v| v as u32)
        })
    }

    fn bar0_write(&self, offset: u64, width: AccessWidth, value: u64) -> Result<(), HostGpuError> {
        self.check_alive()?;
        self.bar0
            .write(offset, width, value)
            .map_err(|e| HostGpuError::Bar0(e.to_string()))
    }

    fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>> {
        self.memory_bars
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, m)| Arc::clone(m) as Arc<dyn HostMemory>)
    }

    /// `VFIO_DEVICE_RESET` (a function-level or bus reset, whichever the kernel has).
    fn reset(&self) -> Result<(), HostGpuError> {
        self.check_alive()?;
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is our VFIO device.
        let ret = unsafe { ioctl(&*self.device_fd, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Not here: the host driver scrubs through PRAMIN (see the module documentation).
    fn scrub_vram(&self, addr: VramAddr, len: u64) -> Result<(), HostGpuError> {
        let _ = (addr, len);
        Err(HostGpuError::Io(std::io::Error::from_raw_os_error(
            libc::ENOTSUP,
        )))
    }

    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.check_alive()?;
        self.aperture_memory()?.read(offset, buf)
    }

    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.check_alive()?;
        self.aperture_memory()?.write(offset, data)
    }

    /// A device-memory range cannot be exported by its VRAM address: in BAR1 virtual mode
    /// it is not where it is in the aperture. Guests' ranges are exported by their BAR1
    /// window instead ([`HostGpu::bar1_mmap_source`]).
    fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<MmapSource> {
        let _ = (addr, len);
        None
    }

    fn bar1_mmap_source(&self, offset: u64, len: u64) -> Option<MmapSource> {
        if self.dmabuf != DmaBufSupport::Mappable || self.is_lost() {
            return None;
        }
        let (index, _) = self.aperture?;
        match dmabuf::export(self.device_fd.as_fd(), index, offset, len) {
            Ok(fd) => Some(MmapSource {
                fd: Arc::new(fd),
                file_offset: 0,
            }),
            Err(e) => {
                log::warn!(
                    "{}: BAR1 [{offset:#x}, +{len:#x}) cannot be exported ({e}); served \
                     through the socket",
                    self.address
                );
                None
            }
        }
    }

    fn dma_alloc(&self, len: u64) -> Result<Arc<dyn super::dma::DmaBuffer>, HostGpuError> {
        self.check_alive()?;
        let buffer = VfioDmaBuffer::new(Arc::clone(&self.container), Arc::clone(&self.iova), len)?;
        log::debug!("{}: DMA buffer {buffer:?}", self.address);
        Ok(Arc::new(buffer))
    }

    /// Maps the guest's memory for the device with `VFIO_IOMMU_MAP_DMA` at the guest's
    /// IOVA. Only memory mapped in this process can be handed to the IOMMU: a map reached
    /// over the socket is refused with ENOTSUP.
    fn map_guest_dma(
        &self,
        iova: u64,
        memory: Arc<dyn GuestDmaMemory>,
    ) -> Result<(), HostGpuError> {
        self.check_alive()?;
        let len = memory.len();
        let ptr = memory.host_mapping().ok_or_else(|| {
            HostGpuError::Io(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "guest memory reached over the socket cannot be mapped for a VFIO device",
            ))
        })?;
        let size = usize::try_from(len)
            .map_err(|_| HostGpuError::Io(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        self.iova.reserve(iova, len)?;
        // SAFETY: `memory` is a mapping of guest memory that stays mapped while the map is
        // lent (the connection revokes and unmaps it only after `unmap_guest_dma`); this
        // process only touches it through raw-pointer copies, never references.
        let mapped = unsafe {
            dma::map_dma(
                &self.container,
                iova,
                size as u64,
                ptr.as_ptr(),
                memory.readable(),
                memory.writable(),
            )
        };
        if let Err(e) = mapped {
            self.iova.release(iova);
            return Err(HostGpuError::Io(std::io::Error::new(
                e.kind(),
                format!("VFIO_IOMMU_MAP_DMA of guest memory at {iova:#x}: {e}"),
            )));
        }
        self.guest_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(iova, (len, memory));
        Ok(())
    }

    fn unmap_guest_dma(&self, iova: u64) {
        let mut maps = self
            .guest_maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(&(len, _)) = maps.get(&iova) else {
            return;
        };
        match self.container.vfio_dma_unmap(iova, len as usize) {
            Ok(()) => {
                maps.remove(&iova);
                self.iova.release(iova);
            }
            // The IOMMU keeps the pages pinned (so the host stays safe even once the
            // connection unmaps its view of them), and the IOVA stays reserved: nothing else
            // can be mapped over a range the device may still reach.
            Err(e) => log::error!(
                "{}: VFIO_IOMMU_UNMAP_DMA of guest memory at {iova:#x} failed: {e}; the IOVA \
                 stays reserved",
                self.address
            ),
        }
    }
}
