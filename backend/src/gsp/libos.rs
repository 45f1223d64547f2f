//! What the host hands the GSP at start (gpu-facts 3.1, 3.7): a LibOS init-argument array
//! whose RMARGS entry points to GSP_ARGUMENTS_CACHED, which carries the
//! MESSAGE_QUEUE_INIT_ARGUMENTS ([`MessageQueueInitArgs`]) of the shared block.
//!
//! Both live in one DMA buffer of two pages ([`LibosArgs`]):
//!
//! | page | content |
//! |---|---|
//! | 0 | the array: one RMARGS entry (contiguous, sysmem), then an all-zero entry that ends it |
//! | 1 | GSP_ARGUMENTS_CACHED ([`GSP_ARGUMENTS_CACHED_SIZE`] bytes) |
//!
//! The DMA address of page 0 goes to the GSP falcon's MAILBOX0 (low half) and MAILBOX1
//! (high half) before STARTCPU ([`super::falcon`]). The log buffers (LOGINIT, LOGINTR,
//! LOGRM) real firmware also expects are not provided: the emulated GSP keeps no logs.
//!
//! This encoder is the host driver's own; the emulator decodes the same structures with
//! an independent implementation (`gpu_emulation::gsp::libos`), and tests boot one against
//! the other.

use std::sync::Arc;

use thiserror::Error;

use crate::host_gpu::dma::{DmaBuffer, DMA_PAGE};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Bytes of the argument buffer: the array page and the GSP_ARGUMENTS_CACHED page.
pub const LIBOS_BUFFER_SIZE: u64 = 2 * DMA_PAGE;
/// Bytes of one LibOS array entry.
pub const ENTRY_SIZE: usize = 32;
/// Bytes of GSP_ARGUMENTS_CACHED in the r570_144 layout.
pub const GSP_ARGUMENTS_CACHED_SIZE: usize = 0x48;
/// `id8` of the GSP_ARGUMENTS_CACHED entry.
pub const RMARGS_ID: u64 = id8(b"RMARGS");

/// Packs an ASCII name of up to 8 characters into an `id8`, the last character in the
/// least significant byte (gpu-facts 3.7).
pub const fn id8(name: &[u8]) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < name.len() {
        v = (v << 8) | name[i] as u64;
        i += 1;
    }
    v
}

/// How a LibOS region is laid out (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Physically contiguous (1).
    Contiguous,
}

/// Where a LibOS region lives (`loc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionLoc {
    /// System memory (1).
    Sysmem,
}

/// One entry of the LibOS init-argument array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibosEntry {
    /// Packed name ([`id8`]).
    pub id8: u64,
    /// DMA address of the region.
    pub pa: u64,
    /// Bytes of the region.
    pub size: u64,
    /// Layout.
    pub kind: RegionKind,
    /// Location.
    pub loc: RegionLoc,
}

impl LibosEntry {
    /// The entry's 32 bytes: id8 @0, pa @8, size @16, kind @24, loc @25, zero padding.
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..8].copy_from_slice(&self.id8.to_le_bytes());
        b[8..16].copy_from_slice(&self.pa.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24] = match self.kind {
            RegionKind::Contiguous => 1,
        };
        b[25] = match self.loc {
            RegionLoc::Sysmem => 1,
        };
        b
    }
}

/// MESSAGE_QUEUE_INIT_ARGUMENTS (gpu-facts 3.1): where the GSP finds its queues.
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

/// GSP_ARGUMENTS_CACHED as the host fills it: the queue location, everything else as
/// nova-core leaves it for a cold boot (no suspend/resume state, GPU instance 0, no
/// profiler buffer) with `bDmemStack` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GspArgumentsCached {
    /// MESSAGE_QUEUE_INIT_ARGUMENTS.
    pub queues: MessageQueueInitArgs,
}

/// A field of GSP_ARGUMENTS_CACHED: its byte offset and width. Offsets are derived from
/// nova-core's r570_144 bindings (`MESSAGE_QUEUE_INIT_ARGUMENTS` {sharedMemPhysAddr u64,
/// pageTableEntryCount u32, pad, cmdQueueOffset u64, statQueueOffset u64},
/// `GSP_SR_INIT_ARGUMENTS` {oldLevel u32, flags u32, bInPMTransition u8, pad},
/// `GSP_ARGUMENTS_CACHED` {messageQueueInitArguments, srInitArguments, gpuInstance u32,
/// bDmemStack u8, pad, profilerArgs {pa u64, size u64}}), laid out with C rules.
#[derive(Debug, Clone, Copy)]
struct ArgField {
    offset: usize,
    width: usize,
}

const SHARED_MEM_PHYS_ADDR: ArgField = ArgField {
    offset: 0x00,
    width: 8,
};
const PAGE_TABLE_ENTRY_COUNT: ArgField = ArgField {
    offset: 0x08,
    width: 4,
};
const CMD_QUEUE_OFFSET: ArgField = ArgField {
    offset: 0x10,
    width: 8,
};
const STAT_QUEUE_OFFSET: ArgField = ArgField {
    offset: 0x18,
    width: 8,
};
const SR_OLD_LEVEL: ArgField = ArgField {
    offset: 0x20,
    width: 4,
};
const SR_FLAGS: ArgField = ArgField {
    offset: 0x24,
    width: 4,
};
const SR_IN_PM_TRANSITION: ArgField = ArgField {
    offset: 0x28,
    width: 1,
};
const GPU_INSTANCE: ArgField = ArgField {
    offset: 0x2C,
    width: 4,
};
const DMEM_STACK: ArgField = ArgField {
    offset: 0x30,
    width: 1,
};
const PROFILER_PA: ArgField = ArgField {
    offset: 0x38,
    width: 8,
};
const PROFILER_SIZE: ArgField = ArgField {
    offset: 0x40,
    width: 8,
};

impl ArgField {
    /// Stores the low `width` bytes of `value` little-endian.
    fn put(self, b: &mut [u8; GSP_ARGUMENTS_CACHED_SIZE], value: u64) {
        b[self.offset..self.offset + self.width]
            .copy_from_slice(&value.to_le_bytes()[..self.width]);
    }
}

impl GspArgumentsCached {
    /// The structure's bytes.
    pub fn encode(&self) -> [u8; GSP_ARGUMENTS_CACHED_SIZE] {
        let q = &self.queues;
        let mut b = [0u8; GSP_ARGUMENTS_CACHED_SIZE];
        for (field, value) in [
            (SHARED_MEM_PHYS_ADDR, q.shared_mem_phys_addr),
            (PAGE_TABLE_ENTRY_COUNT, u64::from(q.page_table_entry_count)),
            (CMD_QUEUE_OFFSET, q.cmd_queue_offset),
            (STAT_QUEUE_OFFSET, q.stat_queue_offset),
            (SR_OLD_LEVEL, 0),
            (SR_FLAGS, 0),
            (SR_IN_PM_TRANSITION, 0),
            (GPU_INSTANCE, 0),
            (DMEM_STACK, 1),
            (PROFILER_PA, 0),
            (PROFILER_SIZE, 0),
        ] {
            field.put(&mut b, value);
        }
        b
    }
}

/// Errors of setting up the LibOS arguments.
#[derive(Debug, Error)]
pub enum LibosError {
    /// The host could not allocate DMA memory.
    #[error("allocating the {LIBOS_BUFFER_SIZE:#x}-byte LibOS argument buffer failed: {0}")]
    Alloc(#[source] HostGpuError),
    /// The buffer given is too small.
    #[error("the LibOS argument buffer must be at least {LIBOS_BUFFER_SIZE:#x} bytes, got {0:#x}")]
    TooSmall(u64),
    /// Writing the buffer failed.
    #[error("writing the LibOS arguments failed: {0}")]
    Access(#[from] HostGpuError),
}

/// The LibOS arguments in DMA memory, written.
#[derive(Debug, Clone)]
pub struct LibosArgs {
    buffer: Arc<dyn DmaBuffer>,
}

impl LibosArgs {
    /// Allocates the buffer from `host` and writes the arguments for `queues`.
    pub fn allocate(
        host: &dyn HostGpu,
        queues: MessageQueueInitArgs,
    ) -> Result<LibosArgs, LibosError> {
        let buffer = host
            .dma_alloc(LIBOS_BUFFER_SIZE)
            .map_err(LibosError::Alloc)?;
        LibosArgs::new(buffer, queues)
    }

    /// Writes the arguments for `queues` into `buffer` (at least [`LIBOS_BUFFER_SIZE`]
    /// bytes; the array page is zeroed, so the RMARGS entry is the only one).
    pub fn new(
        buffer: Arc<dyn DmaBuffer>,
        queues: MessageQueueInitArgs,
    ) -> Result<LibosArgs, LibosError> {
        if buffer.len() < LIBOS_BUFFER_SIZE {
            return Err(LibosError::TooSmall(buffer.len()));
        }
        let rmargs = LibosEntry {
            id8: RMARGS_ID,
            pa: buffer.dma_addr(1)?,
            size: GSP_ARGUMENTS_CACHED_SIZE as u64,
            kind: RegionKind::Contiguous,
            loc: RegionLoc::Sysmem,
        };
        let mut array = vec![0u8; DMA_PAGE as usize];
        array[..ENTRY_SIZE].copy_from_slice(&rmargs.encode());
        buffer.write(0, &array)?;
        buffer.write(DMA_PAGE, &GspArgumentsCached { queues }.encode())?;
        Ok(LibosArgs { buffer })
    }

    /// DMA address of the array: what goes to MAILBOX1:MAILBOX0.
    pub fn array_addr(&self) -> Result<u64, HostGpuError> {
        self.buffer.dma_addr(0)
    }

    /// The buffer (which must stay allocated while the GSP may read it).
    pub fn buffer(&self) -> &Arc<dyn DmaBuffer> {
        &self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn names_pack_last_character_lowest() {
        assert_eq!(RMARGS_ID, 0x0000_524D_4152_4753);
        assert_eq!(id8(b"LOGINIT"), 0x004C_4F47_494E_4954);
    }

    #[test]
    fn encodings_have_the_r570_layout() {
        let e = LibosEntry {
            id8: RMARGS_ID,
            pa: 0x1122_3344_5566_7788,
            size: 0x48,
            kind: RegionKind::Contiguous,
            loc: RegionLoc::Sysmem,
        }
        .encode();
        assert_eq!(&e[0..8], &RMARGS_ID.to_le_bytes());
        assert_eq!(&e[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&e[16..24], &0x48u64.to_le_bytes());
        assert_eq!(&e[24..], &[1, 1, 0, 0, 0, 0, 0, 0]);
        let a = GspArgumentsCached {
            queues: MessageQueueInitArgs {
                shared_mem_phys_addr: 0xAABB_CCDD_0000,
                page_table_entry_count: 129,
                cmd_queue_offset: 0x1000,
                stat_queue_offset: 0x41000,
            },
        }
        .encode();
        let mut expect = [0u8; 0x48];
        expect[0..8].copy_from_slice(&0xAABB_CCDD_0000u64.to_le_bytes());
        expect[8..12].copy_from_slice(&129u32.to_le_bytes());
        expect[0x10..0x18].copy_from_slice(&0x1000u64.to_le_bytes());
        expect[0x18..0x20].copy_from_slice(&0x41000u64.to_le_bytes());
        expect[0x30] = 1;
        assert_eq!(a, expect);
    }

    #[test]
    fn the_buffer_holds_one_rmargs_entry_pointing_at_page_one() {
        let host = EmulatedHostGpu::by_name("tu102-24g").unwrap();
        let queues = MessageQueueInitArgs {
            shared_mem_phys_addr: 0x5000,
            page_table_entry_count: 129,
            cmd_queue_offset: 0x1000,
            stat_queue_offset: 0x41000,
        };
        let args = LibosArgs::allocate(&host, queues).unwrap();
        let buf = args.buffer();
        let mut page = vec![0u8; DMA_PAGE as usize];
        buf.read(0, &mut page).unwrap();
        assert_eq!(&page[8..16], &buf.dma_addr(1).unwrap().to_le_bytes());
        assert!(page[ENTRY_SIZE..].iter().all(|&b| b == 0), "terminated");
        assert_eq!(args.array_addr().unwrap(), buf.dma_addr(0).unwrap());
        let too_small = host.dma_alloc(DMA_PAGE).unwrap();
        assert!(matches!(
            LibosArgs::new(too_small, queues),
            Err(LibosError::TooSmall(0x1000))
        ));
    }
}
