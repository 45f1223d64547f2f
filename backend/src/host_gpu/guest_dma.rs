//! Guest memory lent to the GPU for DMA ([`GuestDmaMemory`]): one DMA map of the client
//! that was given the whole GPU.
//!
//! A guest that owns the whole GPU programs it to reach guest memory by DMA (its driver
//! boots the GSP with queues in guest RAM, say). The vfio-user client announces that
//! memory with `DMA_MAP`; the backend hands each map to the host GPU with
//! [`HostGpu::map_guest_dma`](super::HostGpu::map_guest_dma), which makes it reachable at
//! the map's IOVA: the emulated GPU puts it into its emulated IOMMU, a VFIO host would map
//! it with `VFIO_IOMMU_MAP_DMA`. Sliced guests never lend memory to the GPU: the GPU is
//! the host's, and a guest's DMA maps stay with its connection.

use std::fmt;
use std::ptr::NonNull;

use super::HostGpuError;

/// One range of guest memory the device may reach by DMA. Offsets are bytes from the
/// range's start; implementations check `offset + len <= self.len()`.
pub trait GuestDmaMemory: Send + Sync + fmt::Debug {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the range is empty (never for a real map).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the guest allowed the device to read it.
    fn readable(&self) -> bool;
    /// Whether the guest allowed the device to write it.
    fn writable(&self) -> bool;
    /// Copies `buf.len()` bytes at `offset` out of guest memory.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError>;
    /// Copies `data` into guest memory at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError>;
    /// The range's first byte in this process's address space, if the whole range is one
    /// mapping here (an fd-backed map); `None` if it is reached over the socket. A VFIO
    /// host can only hand the IOMMU memory it has mapped.
    fn host_mapping(&self) -> Option<NonNull<u8>>;
}
