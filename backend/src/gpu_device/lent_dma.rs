//! A client's DMA map lent to the GPU ([`LentDmaMap`]): the [`GuestDmaMemory`] a guest given
//! the whole GPU hands to [`HostGpu::map_guest_dma`](crate::host_gpu::HostGpu::map_guest_dma).
//!
//! It reaches exactly one map of the connection through its [`ClientDmaMap`]: an mmapped map
//! is copied through the mapping (and [`GuestDmaMemory::host_mapping`] is its address), any
//! other map with `DMA_READ`/`DMA_WRITE` messages, which the GPU's own threads (the GSP
//! thread of the emulated GPU) may send but the connection thread may not. Once the client
//! removes the map every access fails, even if the GPU still holds the adapter.

use std::ptr::NonNull;

use crate::host_gpu::guest_dma::GuestDmaMemory;
use crate::host_gpu::HostGpuError;
use crate::vfio_user::{ClientDmaMap, DmaError};

/// One DMA map of the client, as guest memory the GPU may reach.
#[derive(Debug)]
pub struct LentDmaMap {
    map: ClientDmaMap,
}

impl LentDmaMap {
    /// Lends `map`.
    pub fn new(map: ClientDmaMap) -> LentDmaMap {
        LentDmaMap { map }
    }
}

fn host_error(error: DmaError) -> HostGpuError {
    HostGpuError::Io(std::io::Error::from_raw_os_error(error.errno().0))
}

impl GuestDmaMemory for LentDmaMap {
    fn len(&self) -> u64 {
        self.map.size()
    }

    fn readable(&self) -> bool {
        self.map.readable()
    }

    fn writable(&self) -> bool {
        self.map.writable()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.map.read(offset, buf).map_err(host_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.map.write(offset, data).map_err(host_error)
    }

    fn host_mapping(&self) -> Option<NonNull<u8>> {
        self.map.host_address()
    }
}
