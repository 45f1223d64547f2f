//! The shared block the CPU and the GSP exchange messages through ("GspMem", gpu-facts
//! 3.1): one DMA buffer of 129 pages.
//!
//! | offset  | size    | content                                                  |
//! |---------|---------|----------------------------------------------------------|
//! | 0x00000 | 0x1000  | page-table array: 129 × u64 DMA address of each page     |
//! | 0x01000 | 0x40000 | CPU→GSP command queue (the CPU writes its tx header)     |
//! | 0x41000 | 0x40000 | GSP→CPU message queue (the GSP writes its tx header)     |
//!
//! The backend owns the buffer ([`HostGpu::dma_alloc`]); the GSP learns where it is from
//! [`GspMem::init_args`] (carried in GSP_ARGUMENTS_CACHED, [`super::libos`]) and finds
//! every page through the page-table array.

use std::sync::Arc;

use thiserror::Error;

use super::libos::MessageQueueInitArgs;
use super::queue::{QueueRegion, TxHeader, QUEUE_SIZE};
use crate::host_gpu::dma::{DmaBuffer, DMA_PAGE};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Pages in the block: 128 queue pages plus the page-table array page.
pub const PAGE_COUNT: u32 = 129;
/// Bytes in the block.
pub const SHARED_SIZE: u64 = PAGE_COUNT as u64 * DMA_PAGE;
/// Offset of the command queue.
pub const CMDQ_OFFSET: u64 = 0x1000;
/// Offset of the message queue.
pub const MSGQ_OFFSET: u64 = CMDQ_OFFSET + QUEUE_SIZE;

/// Errors of setting up the shared block.
#[derive(Debug, Error)]
pub enum ShmemError {
    /// The host could not allocate DMA memory.
    #[error("allocating the {SHARED_SIZE:#x}-byte GSP shared block failed: {0}")]
    Alloc(#[source] HostGpuError),
    /// The buffer given has the wrong size.
    #[error("GSP shared block must be {SHARED_SIZE:#x} bytes, got {0:#x}")]
    WrongSize(u64),
    /// Writing the block failed.
    #[error("initialising the GSP shared block failed: {0}")]
    Access(#[from] HostGpuError),
}

/// The shared block, initialised: page-table array written, command queue header set,
/// read pointer of the message queue zero.
#[derive(Debug, Clone)]
pub struct GspMem {
    buffer: Arc<dyn DmaBuffer>,
}

impl GspMem {
    /// Allocates the block from `host` and initialises it.
    pub fn allocate(host: &dyn HostGpu) -> Result<GspMem, ShmemError> {
        let buffer = host.dma_alloc(SHARED_SIZE).map_err(ShmemError::Alloc)?;
        GspMem::new(buffer)
    }

    /// Initialises `buffer` (which must be [`SHARED_SIZE`] bytes) as the block.
    pub fn new(buffer: Arc<dyn DmaBuffer>) -> Result<GspMem, ShmemError> {
        if buffer.len() != SHARED_SIZE {
            return Err(ShmemError::WrongSize(buffer.len()));
        }
        let mut table = Vec::with_capacity(PAGE_COUNT as usize * 8);
        for page in 0..u64::from(PAGE_COUNT) {
            table.extend_from_slice(&buffer.dma_addr(page)?.to_le_bytes());
        }
        buffer.write(0, &table)?;
        let cmdq = Self::cmdq();
        // Header words are only ever accessed atomically, by both sides.
        for (i, (_, value)) in TxHeader::initial().fields().into_iter().enumerate() {
            buffer.store_u32(cmdq.tx_word(i as u64), value)?;
        }
        buffer.store_u32(cmdq.rx_read_ptr(), 0)?;
        Ok(GspMem { buffer })
    }

    /// The command queue region (the CPU produces).
    pub const fn cmdq() -> QueueRegion {
        QueueRegion::at(CMDQ_OFFSET)
    }

    /// The message queue region (the GSP produces).
    pub const fn msgq() -> QueueRegion {
        QueueRegion::at(MSGQ_OFFSET)
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &dyn DmaBuffer {
        self.buffer.as_ref()
    }

    /// Another handle on the underlying buffer (keeps it allocated).
    pub fn shared_buffer(&self) -> Arc<dyn DmaBuffer> {
        Arc::clone(&self.buffer)
    }

    /// What the GSP is told about the block when it starts.
    pub fn init_args(&self) -> Result<MessageQueueInitArgs, HostGpuError> {
        Ok(MessageQueueInitArgs {
            shared_mem_phys_addr: self.buffer.dma_addr(0)?,
            page_table_entry_count: PAGE_COUNT,
            cmd_queue_offset: CMDQ_OFFSET,
            stat_queue_offset: MSGQ_OFFSET,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn layout_page_table_and_header() {
        assert_eq!(SHARED_SIZE, 0x81000);
        assert_eq!(MSGQ_OFFSET, 0x41000);
        assert_eq!(MSGQ_OFFSET + QUEUE_SIZE, SHARED_SIZE);
        let host = EmulatedHostGpu::by_name("tu102-24g").unwrap();
        let mem = GspMem::allocate(&host).unwrap();
        let buf = mem.buffer();
        let args = mem.init_args().unwrap();
        assert_eq!(args.page_table_entry_count, 129);
        assert_eq!(
            (args.cmd_queue_offset, args.stat_queue_offset),
            (0x1000, 0x41000)
        );
        let mut entry = [0u8; 8];
        for page in [0u64, 1, 128] {
            buf.read(page * 8, &mut entry).unwrap();
            assert_eq!(u64::from_le_bytes(entry), buf.dma_addr(page).unwrap());
        }
        assert_eq!(
            u64::from_le_bytes(entry),
            args.shared_mem_phys_addr + 128 * 4096
        );
        let words: Vec<u32> = (0..8)
            .map(|i| buf.load_u32(0x1000 + 4 * i).unwrap())
            .collect();
        assert_eq!(words, [0, 0x40000, 0x1000, 63, 0, 1, 0x20, 0x1000]);
        assert!(buf.dma_addr(129).is_err());
        // The emulated GPU maps the block into its IOMMU until the buffer is dropped.
        assert_eq!(host.emulated().dma().mapping_count(), 1);
        drop(mem);
        assert_eq!(host.emulated().dma().mapping_count(), 0);
    }
}
