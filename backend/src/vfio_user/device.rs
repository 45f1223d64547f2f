//! The interface between the vfio-user server and the device it presents.
//!
//! A device implements [`VfioUserDevice`]. The server calls it from the connection thread for
//! region accesses and resets, and hands it a [`ClientHandle`] when a client connects so the
//! device can raise interrupts and reach guest memory (DMA) from any thread.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use super::client::ClientHandle;
pub use super::dma_map::ClientDmaMap;

/// An errno value for the wire (positive, e.g. `libc::EINVAL`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Bad address / access outside a mapping.
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// I/O error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Operation not supported.
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    /// Function not implemented (unknown command).
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    /// Entry exists (overlapping DMA map).
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Argument list too long (transfer larger than negotiated).
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// No space left (too many DMA maps).
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// Not connected.
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);
    /// Timed out.
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    /// Would deadlock.
    pub const EDEADLK: Errno = Errno(libc::EDEADLK);
    /// Resource temporarily unavailable.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// Protocol error.
    pub const EPROTO: Errno = Errno(libc::EPROTO);

    /// The errno of an `io::Error`, `EIO` if it carries none.
    pub fn from_io(err: &std::io::Error) -> Errno {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The value to put on the wire: always positive and non-zero.
    pub fn wire_value(self) -> u32 {
        if self.0 > 0 {
            self.0 as u32
        } else {
            libc::EIO as u32
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Errno({}: {})",
            self.0,
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

impl From<std::io::Error> for Errno {
    fn from(err: std::io::Error) -> Self {
        Errno::from_io(&err)
    }
}

/// What `VFIO_USER_DEVICE_GET_INFO` reports. The server always sets `VFIO_DEVICE_FLAGS_PCI`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Number of regions (at least `VFIO_PCI_CONFIG_REGION_INDEX + 1` for QEMU).
    pub num_regions: u32,
    /// Number of interrupt types (at least `VFIO_PCI_MSIX_IRQ_INDEX + 1` for QEMU).
    pub num_irqs: u32,
    /// Whether `VFIO_USER_DEVICE_RESET` is supported (`VFIO_DEVICE_FLAGS_RESET`).
    pub resettable: bool,
}

/// A page-aligned part of a region that the client may `mmap()`, relative to the region start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset of the area within the region.
    pub offset: u64,
    /// Size of the area in bytes.
    pub size: u64,
}

/// How a region can be memory-mapped by the client.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file the client maps (sent with `SCM_RIGHTS` in the region info reply).
    pub fd: Arc<OwnedFd>,
    /// Offset of the region's first byte within `fd`.
    pub file_offset: u64,
    /// Mappable areas. Empty means the whole region is mappable (no sparse capability is sent);
    /// otherwise a `VFIO_REGION_INFO_CAP_SPARSE_MMAP` capability lists exactly these areas and
    /// everything outside them is accessed with `REGION_READ`/`REGION_WRITE`.
    pub sparse_areas: Vec<SparseArea>,
}

/// What `VFIO_USER_DEVICE_GET_REGION_INFO` reports for one region.
///
/// The server snapshots the region table when a client connects: sizes and mmap layout must not
/// change while a client is connected.
#[derive(Clone, Debug, Default)]
pub struct RegionInfo {
    /// Region size in bytes (a BAR size must be a power of two for QEMU).
    pub size: u64,
    /// The client may read it.
    pub readable: bool,
    /// The client may write it.
    pub writable: bool,
    /// Set if (part of) the region can be mapped by the client.
    pub mmap: Option<RegionMmap>,
}

/// What `VFIO_USER_DEVICE_GET_IRQ_INFO` reports for one interrupt type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors of this type.
    pub count: u32,
    /// `VFIO_IRQ_INFO_EVENTFD`: can be signalled through an eventfd.
    pub eventfd: bool,
    /// `VFIO_IRQ_INFO_MASKABLE`: supports MASK/UNMASK.
    pub maskable: bool,
    /// `VFIO_IRQ_INFO_AUTOMASKED`: masks itself when triggered (INTx).
    pub automasked: bool,
    /// `VFIO_IRQ_INFO_NORESIZE`.
    pub noresize: bool,
}

/// A device presented over vfio-user.
///
/// Region accesses arrive on the connection thread, in protocol order. Implementations must not
/// block for long there (a posted-write backlog delays every later read), and must not wait on
/// socket-based DMA from inside a region access: QEMU holds its big lock while it waits for the
/// access to complete, so it could not answer (the [`ClientHandle`] reports `EDEADLK` for DMA
/// attempted on the connection thread).
pub trait VfioUserDevice: Send + Sync + 'static {
    /// Device-wide information.
    fn device_info(&self) -> DeviceInfo;
    /// Information about region `index`, `None` if it does not exist.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Information about interrupt type `index`, `None` if it does not exist.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// Read `buf.len()` bytes at `offset` of region `index`; returns the number of bytes served
    /// (at most `buf.len()`). The server has checked the access lies inside the region.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, Errno>;
    /// Write `data` at `offset` of region `index`; returns the number of bytes accepted.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, Errno>;
    /// Reset the device (only called if [`DeviceInfo::resettable`]).
    fn reset(&self) -> Result<(), Errno>;
    /// A client connected: gives the device this connection's interrupt lines and DMA space.
    fn client_connected(&self, client: ClientHandle) {
        let _ = client;
    }
    /// The client went away (its DMA maps and irq fds are already dropped).
    fn client_disconnected(&self) {}
    /// Whether the device reaches the client's memory from this process: if so (the
    /// default), DMA maps that come with an fd sealed against shrinking are mmapped when
    /// added, so [`ClientDmaMap`] accesses are plain copies and
    /// [`ClientDmaMap::host_address`] is set. A device that never touches guest memory says
    /// `false`: every map is then only recorded (its fd closed at once), costing no address
    /// space, and reached with socket DMA should the device ever access it. Asked once per
    /// connection.
    fn maps_dma(&self) -> bool {
        true
    }
    /// The client added a DMA map (`DMA_MAP`); `map` reaches it from any thread until it is
    /// removed. An error fails the `DMA_MAP` with that errno and the map is undone (no
    /// [`VfioUserDevice::dma_unmapped`] follows). Called on the connection thread, so it
    /// must not do socket DMA. The default accepts the map and keeps nothing.
    fn dma_mapped(&self, map: ClientDmaMap) -> Result<(), Errno> {
        let _ = map;
        Ok(())
    }
    /// The client's DMA map at `iova` of `size` bytes is being removed (`DMA_UNMAP`,
    /// `UNMAP_ALL`, or the client leaving): called once for every map
    /// [`VfioUserDevice::dma_mapped`] accepted, after its [`ClientDmaMap`] handles were
    /// revoked (no access through them is in flight, later ones fail) and before its memory
    /// is unmapped; the unmap is answered after this returns.
    fn dma_unmapped(&self, iova: u64, size: u64) {
        let _ = (iova, size);
    }
}
