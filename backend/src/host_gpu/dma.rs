//! Host memory the GPU reaches by DMA ([`DmaBuffer`]), and what the GSP is told about its
//! message queues when it starts ([`MessageQueueInitArgs`]).
//!
//! On hardware a DMA buffer is host memory mapped into the device's IOMMU domain through
//! VFIO (`VFIO_IOMMU_MAP_DMA`); its pages have bus addresses the GPU uses. For the
//! emulated GPU it is a memfd the backend creates and maps, whose fd it hands to the
//! emulated GPU, which maps it a second time into its emulated IOMMU
//! ([`EmulatedDmaBuffer`]). Either way the memory is shared with a device that writes it
//! concurrently: accessors copy in and out (volatile) and the 32-bit queue pointers are
//! atomic; no reference to the shared bytes is ever handed out.

use std::fmt;
use std::sync::Arc;

use gpu_emulation::gsp::{SharedMemory, SharedMemoryError};
use gpu_emulation::EmulatedGpu;

use super::HostGpuError;

/// Size of a DMA page.
pub const DMA_PAGE: u64 = 0x1000;

/// Host memory the GPU can reach by DMA. Offsets are bytes from the buffer's start; every
/// access is bounds-checked.
pub trait DmaBuffer: Send + Sync + fmt::Debug {
    /// Length in bytes (a multiple of [`DMA_PAGE`]).
    fn len(&self) -> u64;
    /// Whether the buffer is empty (never for an allocated buffer).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` out of the buffer.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError>;
    /// Copies `data` into the buffer at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError>;
    /// Loads the little-endian `u32` at `offset` (4-byte aligned) atomically, with acquire
    /// ordering.
    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError>;
    /// Stores `value` at `offset` (4-byte aligned) atomically, with release ordering:
    /// everything written before is visible to the device once it sees the value.
    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError>;
    /// The bus (DMA) address of 4 KiB page `page` of the buffer.
    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError>;
}

/// MESSAGE_QUEUE_INIT_ARGUMENTS (gpu-facts 3.1): where the GSP finds its queues. On
/// hardware these travel inside GSP_ARGUMENTS_CACHED through the firmware boot chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageQueueInitArgs {
    /// DMA address of the page-table array (page 0 of the shared block).
    pub shared_mem_phys_addr: u64,
    /// Pages of the shared block (entries of the page-table array).
    pub page_table_entry_count: u32,
    /// Offset of the command (CPU→GSP) queue in the block.
    pub cmd_queue_offset: u64,
    /// Offset of the status (GSP→CPU) queue in the block.
    pub stat_queue_offset: u64,
}

impl From<&MessageQueueInitArgs> for gpu_emulation::gsp::MessageQueueInitArgs {
    fn from(a: &MessageQueueInitArgs) -> Self {
        gpu_emulation::gsp::MessageQueueInitArgs {
            shared_mem_phys_addr: a.shared_mem_phys_addr,
            page_table_entry_count: a.page_table_entry_count,
            cmd_queue_offset: a.cmd_queue_offset,
            stat_queue_offset: a.stat_queue_offset,
        }
    }
}

/// A DMA buffer of the emulated GPU: the backend's mapping of a memfd that the GPU has
/// mapped too. Dropping it unmaps it from the GPU's emulated IOMMU.
pub struct EmulatedDmaBuffer {
    memory: SharedMemory,
    dma_base: u64,
    gpu: Arc<EmulatedGpu>,
}

fn shm_error(e: SharedMemoryError) -> HostGpuError {
    match e {
        SharedMemoryError::OutOfBounds { offset, len, size } => {
            HostGpuError::MemoryOutOfRange { offset, len, size }
        }
        other => HostGpuError::Io(std::io::Error::other(other.to_string())),
    }
}

impl EmulatedDmaBuffer {
    /// Creates a zero-filled memfd of `len` bytes, maps it, and maps it into `gpu`.
    pub fn new(gpu: Arc<EmulatedGpu>, len: u64) -> Result<EmulatedDmaBuffer, HostGpuError> {
        let memory = SharedMemory::create(c"gpu-backend-dma", len).map_err(shm_error)?;
        let dma_base = gpu
            .dma()
            .map(memory.as_fd(), len)
            .map_err(|e| HostGpuError::Io(std::io::Error::other(e.to_string())))?;
        Ok(EmulatedDmaBuffer {
            memory,
            dma_base,
            gpu,
        })
    }
}

impl fmt::Debug for EmulatedDmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedDmaBuffer")
            .field("len", &format_args!("{:#x}", self.memory.len()))
            .field("dma_base", &format_args!("{:#x}", self.dma_base))
            .finish()
    }
}

impl DmaBuffer for EmulatedDmaBuffer {
    fn len(&self) -> u64 {
        self.memory.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
        self.memory.read(offset, buf).map_err(shm_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
        self.memory.write(offset, data).map_err(shm_error)
    }

    fn load_u32(&self, offset: u64) -> Result<u32, HostGpuError> {
        self.memory.load_u32(offset).map_err(shm_error)
    }

    fn store_u32(&self, offset: u64, value: u32) -> Result<(), HostGpuError> {
        self.memory.store_u32(offset, value).map_err(shm_error)
    }

    fn dma_addr(&self, page: u64) -> Result<u64, HostGpuError> {
        let size = self.memory.len();
        match page.checked_mul(DMA_PAGE) {
            Some(off) if off < size => Ok(self.dma_base + off),
            _ => Err(HostGpuError::MemoryOutOfRange {
                offset: page.saturating_mul(DMA_PAGE),
                len: DMA_PAGE,
                size,
            }),
        }
    }
}

impl Drop for EmulatedDmaBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.gpu.dma().unmap(self.dma_base) {
            log::warn!("unmapping emulated DMA buffer: {e}");
        }
    }
}
