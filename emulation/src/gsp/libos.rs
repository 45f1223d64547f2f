//! What the emulated GSP-RM reads at STARTCPU: the LibOS init-argument array and the
//! GSP_ARGUMENTS_CACHED ("RMARGS") it points to (gpu-facts 3.1, 3.7).
//!
//! - **LibOS init-argument array**: one 4 KiB page at the DMA address the host left in
//!   MAILBOX1:MAILBOX0, of 32-byte entries `{id8 u64 @0, pa u64 @8, size u64 @16, kind u8
//!   @24, loc u8 @25, pad}`. An entry whose `id8` is 0 ends the array. `id8` is an ASCII
//!   name packed with its last character in the least significant byte.
//! - **RMARGS**: the entry named "RMARGS" must be contiguous (`kind` 1) system memory
//!   (`loc` 1) and at least [`GSP_ARGUMENTS_CACHED_SIZE`] bytes; its `pa` is the DMA
//!   address of GSP_ARGUMENTS_CACHED, whose first 0x20 bytes are the
//!   MESSAGE_QUEUE_INIT_ARGUMENTS ([`MessageQueueInitArgs`]).
//!
//! Field offsets of GSP_ARGUMENTS_CACHED are derived from nova-core's r570_144 bindings
//! (`drivers/gpu/nova-core/gsp/fw/r570_144/bindings.rs`: `MESSAGE_QUEUE_INIT_ARGUMENTS`,
//! `GSP_SR_INIT_ARGUMENTS`, `GSP_ARGUMENTS_CACHED`), laid out with C rules. The other
//! LibOS entries (log buffers) are skipped: the emulated GSP-RM keeps no logs.
//!
//! This decoder is the emulator's own; the backend encodes the same structures with an
//! independent implementation, and tests cross-check the two.

use thiserror::Error;

use super::dma::{DmaError, DmaSpace};
use super::queues::MessageQueueInitArgs;

/// Size of the LibOS init-argument array: one 4 KiB page.
pub const LIBOS_ARRAY_SIZE: usize = 0x1000;
/// Size of one array entry.
pub const ENTRY_SIZE: usize = 32;
/// `id8` of the GSP_ARGUMENTS_CACHED entry: "RMARGS", last character in the low byte.
pub const RMARGS_ID: u64 = 0x0000_524D_4152_4753;
/// `kind` of a physically contiguous region.
pub const KIND_CONTIGUOUS: u8 = 1;
/// `loc` of a region in system memory.
pub const LOC_SYSMEM: u8 = 1;
/// Bytes of GSP_ARGUMENTS_CACHED (r570_144).
pub const GSP_ARGUMENTS_CACHED_SIZE: usize = 0x48;

// Entry field offsets.
const ENTRY_ID8: usize = 0x00;
const ENTRY_PA: usize = 0x08;
const ENTRY_SIZE_FIELD: usize = 0x10;
const ENTRY_KIND: usize = 0x18;
const ENTRY_LOC: usize = 0x19;

// GSP_ARGUMENTS_CACHED field offsets (r570_144 bindings; see the module documentation).
const MQ_SHARED_MEM_PHYS_ADDR: usize = 0x00;
const MQ_PAGE_TABLE_ENTRY_COUNT: usize = 0x08;
const MQ_CMD_QUEUE_OFFSET: usize = 0x10;
const MQ_STAT_QUEUE_OFFSET: usize = 0x18;
const SR_OLD_LEVEL: usize = 0x20;
const SR_FLAGS: usize = 0x24;
const SR_IN_PM_TRANSITION: usize = 0x28;
const GPU_INSTANCE: usize = 0x2C;
const DMEM_STACK: usize = 0x30;
const PROFILER_PA: usize = 0x38;
const PROFILER_SIZE: usize = 0x40;

/// Errors of reading the LibOS arguments.
#[derive(Debug, Error)]
pub enum LibosError {
    /// The array page at the mailbox address cannot be read.
    #[error("LibOS argument array at {addr:#x} is unreachable: {source}")]
    ArrayUnreachable {
        /// The address from MAILBOX1:MAILBOX0.
        addr: u64,
        /// Why.
        #[source]
        source: DmaError,
    },
    /// No entry named RMARGS before the end of the array.
    #[error("the LibOS argument array has no RMARGS entry")]
    NoRmArgs,
    /// The RMARGS entry is not contiguous system memory.
    #[error("RMARGS entry has kind {kind} and location {loc} (need 1 contiguous, 1 sysmem)")]
    UnsupportedEntry {
        /// `kind`.
        kind: u8,
        /// `loc`.
        loc: u8,
    },
    /// The RMARGS entry is smaller than GSP_ARGUMENTS_CACHED.
    #[error("RMARGS entry of {0:#x} bytes is smaller than GSP_ARGUMENTS_CACHED ({GSP_ARGUMENTS_CACHED_SIZE:#x})")]
    EntryTooSmall(u64),
    /// GSP_ARGUMENTS_CACHED cannot be read at the entry's address.
    #[error("GSP_ARGUMENTS_CACHED at {addr:#x} is unreachable: {source}")]
    ArgsUnreachable {
        /// The entry's `pa`.
        addr: u64,
        /// Why.
        #[source]
        source: DmaError,
    },
}

/// One entry of the LibOS init-argument array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibosArg {
    /// Packed ASCII name.
    pub id8: u64,
    /// DMA address of the region.
    pub pa: u64,
    /// Bytes of the region.
    pub size: u64,
    /// 0 none, 1 contiguous, 2 radix3.
    pub kind: u8,
    /// 0 none, 1 sysmem, 2 FB.
    pub loc: u8,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

impl LibosArg {
    /// Decodes one entry.
    pub fn parse(entry: &[u8; ENTRY_SIZE]) -> LibosArg {
        LibosArg {
            id8: u64_at(entry, ENTRY_ID8),
            pa: u64_at(entry, ENTRY_PA),
            size: u64_at(entry, ENTRY_SIZE_FIELD),
            kind: entry[ENTRY_KIND],
            loc: entry[ENTRY_LOC],
        }
    }
}

/// GSP_ARGUMENTS_CACHED as decoded (r570_144 layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GspArgumentsCached {
    /// MESSAGE_QUEUE_INIT_ARGUMENTS.
    pub queues: MessageQueueInitArgs,
    /// `srInitArguments.oldLevel`.
    pub sr_old_level: u32,
    /// `srInitArguments.flags`.
    pub sr_flags: u32,
    /// `srInitArguments.bInPMTransition`.
    pub sr_in_pm_transition: bool,
    /// `gpuInstance`.
    pub gpu_instance: u32,
    /// `bDmemStack`.
    pub dmem_stack: bool,
    /// `profilerArgs.pa`.
    pub profiler_pa: u64,
    /// `profilerArgs.size`.
    pub profiler_size: u64,
}

impl GspArgumentsCached {
    /// Decodes the structure.
    pub fn parse(b: &[u8; GSP_ARGUMENTS_CACHED_SIZE]) -> GspArgumentsCached {
        GspArgumentsCached {
            queues: MessageQueueInitArgs {
                shared_mem_phys_addr: u64_at(b, MQ_SHARED_MEM_PHYS_ADDR),
                page_table_entry_count: u32_at(b, MQ_PAGE_TABLE_ENTRY_COUNT),
                cmd_queue_offset: u64_at(b, MQ_CMD_QUEUE_OFFSET),
                stat_queue_offset: u64_at(b, MQ_STAT_QUEUE_OFFSET),
            },
            sr_old_level: u32_at(b, SR_OLD_LEVEL),
            sr_flags: u32_at(b, SR_FLAGS),
            sr_in_pm_transition: b[SR_IN_PM_TRANSITION] != 0,
            gpu_instance: u32_at(b, GPU_INSTANCE),
            dmem_stack: b[DMEM_STACK] != 0,
            profiler_pa: u64_at(b, PROFILER_PA),
            profiler_size: u64_at(b, PROFILER_SIZE),
        }
    }
}

/// Finds the RMARGS entry of the array at DMA address `array` and reads the
/// GSP_ARGUMENTS_CACHED it points to. Two DMA reads: the array page, then the arguments.
pub fn read_rm_args(dma: &DmaSpace, array: u64) -> Result<GspArgumentsCached, LibosError> {
    let mut page = vec![0u8; LIBOS_ARRAY_SIZE];
    dma.read(array, &mut page)
        .map_err(|source| LibosError::ArrayUnreachable {
            addr: array,
            source,
        })?;
    let rmargs = page
        .chunks_exact(ENTRY_SIZE)
        .map(|e| LibosArg::parse(e.try_into().expect("32-byte chunk")))
        .take_while(|e| e.id8 != 0)
        .find(|e| e.id8 == RMARGS_ID)
        .ok_or(LibosError::NoRmArgs)?;
    if rmargs.kind != KIND_CONTIGUOUS || rmargs.loc != LOC_SYSMEM {
        return Err(LibosError::UnsupportedEntry {
            kind: rmargs.kind,
            loc: rmargs.loc,
        });
    }
    if rmargs.size < GSP_ARGUMENTS_CACHED_SIZE as u64 {
        return Err(LibosError::EntryTooSmall(rmargs.size));
    }
    let mut raw = [0u8; GSP_ARGUMENTS_CACHED_SIZE];
    dma.read(rmargs.pa, &mut raw)
        .map_err(|source| LibosError::ArgsUnreachable {
            addr: rmargs.pa,
            source,
        })?;
    Ok(GspArgumentsCached::parse(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsp::SharedMemory;

    fn entry(id8: u64, pa: u64, size: u64, kind: u8, loc: u8) -> [u8; ENTRY_SIZE] {
        let mut e = [0u8; ENTRY_SIZE];
        e[0..8].copy_from_slice(&id8.to_le_bytes());
        e[8..16].copy_from_slice(&pa.to_le_bytes());
        e[16..24].copy_from_slice(&size.to_le_bytes());
        e[24] = kind;
        e[25] = loc;
        e
    }

    #[test]
    fn rmargs_id_is_the_packed_name() {
        let packed = b"RMARGS"
            .iter()
            .fold(0u64, |acc, &c| (acc << 8) | u64::from(c));
        assert_eq!(packed, RMARGS_ID);
        // The last character is the least significant byte.
        assert_eq!(RMARGS_ID as u8, b'S');
    }

    #[test]
    fn finds_rmargs_after_other_entries_and_decodes_every_field() {
        let dma = DmaSpace::default();
        let mem = SharedMemory::create(c"libos", 0x2000).unwrap();
        let base = dma.map(mem.as_fd(), 0x2000).unwrap();
        let loginit = u64::from_be_bytes(*b"\0LOGINIT");
        mem.write(0, &entry(loginit, 0x1234_0000, 0x10000, 1, 1))
            .unwrap();
        mem.write(32, &entry(RMARGS_ID, base + 0x1000, 0x1000, 1, 1))
            .unwrap();
        let mut args = [0u8; GSP_ARGUMENTS_CACHED_SIZE];
        let fields: [(usize, &[u8]); 11] = [
            (0x00, &0xAB_CDEF_0000u64.to_le_bytes()),
            (0x08, &129u32.to_le_bytes()),
            (0x10, &0x1000u64.to_le_bytes()),
            (0x18, &0x41000u64.to_le_bytes()),
            (0x20, &3u32.to_le_bytes()),
            (0x24, &5u32.to_le_bytes()),
            (0x28, &[1]),
            (0x2C, &7u32.to_le_bytes()),
            (0x30, &[1]),
            (0x38, &0x9000u64.to_le_bytes()),
            (0x40, &0x800u64.to_le_bytes()),
        ];
        for (at, bytes) in fields {
            args[at..at + bytes.len()].copy_from_slice(bytes);
        }
        mem.write(0x1000, &args).unwrap();
        let got = read_rm_args(&dma, base).unwrap();
        assert_eq!(
            got,
            GspArgumentsCached {
                queues: MessageQueueInitArgs {
                    shared_mem_phys_addr: 0xAB_CDEF_0000,
                    page_table_entry_count: 129,
                    cmd_queue_offset: 0x1000,
                    stat_queue_offset: 0x41000,
                },
                sr_old_level: 3,
                sr_flags: 5,
                sr_in_pm_transition: true,
                gpu_instance: 7,
                dmem_stack: true,
                profiler_pa: 0x9000,
                profiler_size: 0x800,
            }
        );
    }

    #[test]
    fn bad_arrays_and_entries_are_refused() {
        let dma = DmaSpace::default();
        let mem = SharedMemory::create(c"libos", 0x2000).unwrap();
        let base = dma.map(mem.as_fd(), 0x2000).unwrap();
        assert!(matches!(
            read_rm_args(&dma, 0x1000),
            Err(LibosError::ArrayUnreachable { addr: 0x1000, .. })
        ));
        // Array runs off the end of the mapping.
        assert!(matches!(
            read_rm_args(&dma, base + 0x1800),
            Err(LibosError::ArrayUnreachable { .. })
        ));
        assert!(matches!(
            read_rm_args(&dma, base),
            Err(LibosError::NoRmArgs)
        ));
        // RMARGS behind the terminator is not found.
        mem.write(32, &entry(RMARGS_ID, base + 0x1000, 0x1000, 1, 1))
            .unwrap();
        assert!(matches!(
            read_rm_args(&dma, base),
            Err(LibosError::NoRmArgs)
        ));
        let cases = [
            (entry(RMARGS_ID, base + 0x1000, 0x1000, 2, 1), "kind"),
            (entry(RMARGS_ID, base + 0x1000, 0x1000, 1, 2), "loc"),
            (entry(RMARGS_ID, base + 0x1000, 0x47, 1, 1), "size"),
            (entry(RMARGS_ID, base + 0x1FF0, 0x1000, 1, 1), "pa"),
        ];
        for (e, what) in cases {
            mem.write(0, &e).unwrap();
            let err = read_rm_args(&dma, base).unwrap_err();
            let ok = match what {
                "kind" | "loc" => matches!(err, LibosError::UnsupportedEntry { .. }),
                "size" => matches!(err, LibosError::EntryTooSmall(0x47)),
                _ => matches!(err, LibosError::ArgsUnreachable { .. }),
            };
            assert!(ok, "{what}: {err}");
        }
    }
}
