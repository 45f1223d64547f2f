//! The BAR0 register model: access-width rules, the registers the model implements, the
//! PRAMIN aperture, and accounting of accesses to registers it does not implement.
//!
//! # Access rules
//! - Offsets are relative to BAR0 (16 MiB). Accesses are 1, 2, 4 or 8 bytes, little-endian,
//!   naturally aligned (`offset % width == 0`), and must lie inside BAR0; anything else is
//!   a [`Bar0Error`].
//! - Registers are 32 bits wide. A 1- or 2-byte read extracts the bytes from the dword; a
//!   1- or 2-byte write read-modify-writes the dword (only the written bytes change). An
//!   8-byte access to the register space is two 32-bit accesses, low dword (at `offset`)
//!   first, then high dword (at `offset + 4`).
//! - In the PRAMIN aperture (`0x700000..0x800000`) every width, including 8 bytes, is one
//!   access to memory.
//!
//! # Register behaviour
//! - `BOOT_0` / `BOOT_42` read the profile's values; `BOOT_1` reads 0; writes are ignored.
//! - The generation's window register (`0x1700` Turing–Ada, `0x10FD40` Hopper/Blackwell)
//!   latches writes and reads back exactly what was written, restricted to its defined
//!   fields (BASE and, on `0x1700`, TARGET); other bits read 0. The other generation's
//!   window offset is not implemented.
//! - PRAMIN: aperture offset `o` shows VRAM address `(BASE << 16) + o`. Bytes at or past the
//!   end of VRAM read 0xFF and drop writes (an access straddling the end is split: the
//!   in-range bytes are real). With a TARGET other than VID_MEM on `0x1700` the whole
//!   aperture reads all-ones and drops writes: the emulator has no host system memory
//!   behind the window.
//! - TLB invalidate (`0xB830A0` PDB, `0xB830A4` upper PDB, `0xB830B0` control) and the BAR
//!   block registers of the generation are stored state, restricted to their defined
//!   fields. A control write with TRIGGER set completes synchronously: it is counted,
//!   TRIGGER reads back 0, and the write reports a [`TlbInvalidateRequest`] that the device
//!   applies to its TLB (`crate::mmu::tlb`) before the write returns. Block registers
//!   report binds as complete (PENDING/OUTSTANDING read 0; `BIND_STATUS` reads 0 and
//!   ignores writes); their translation effects live in `crate::mmu`.
//! - Framebuffer size, read-only, writes ignored: `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE`
//!   (0x100CE0) states the physical memory: the profile's VRAM size when its 6-bit
//!   mantissa and 4-bit scale can express it, else the next size they can above it
//!   (ECC_MODE 0), as a board's round physical size holds what it reports as usable; of
//!   the built-in profiles ga100-80g and gh200-96g are exact, tu102-24g reads 24 GiB (for
//!   24,220 MiB), gh100-80g 80 GiB (for 81,559 MiB) and gb202-32g 32 GiB (for 32,607 MiB).
//!   `NV_USABLE_FB_SIZE_IN_MB` (0x1183A4) states the usable VRAM in MiB.
//! - GSP falcon (`crate::gsp::falcon`): `IRQSTAT` (0x110008) shows SWGEN0 raised by the
//!   emulated GSP, `IRQSCLR` (0x110004) clears it, MAILBOX0/1, CPUCTL (STARTCPU, HALTED),
//!   ENGINE (reset) and the RISC-V CPUCTL; a write to `NV_PGSP_QUEUE_HEAD(0)` (0x110C00)
//!   rings the doorbell that wakes the GSP thread (the only register whose write takes a
//!   lock: the doorbell's condition-variable mutex). A CPUCTL write with STARTCPU or an
//!   ENGINE reset write reports an effect the device applies to its GSP before the write
//!   returns (see `crate::gsp`).
//! - Every other offset is unimplemented: reads return the unimplemented value
//!   ([`UNIMPLEMENTED_REGISTER_VALUE`] unless changed) and writes are dropped; both are
//!   counted, and the first [`UNIMPLEMENTED_OFFSETS_RECORDED`] distinct dword offsets are
//!   recorded (see [`UnimplementedStats`]).
//!
//! The access path takes no lock and allocates nothing: registers are atomics. (Applying a
//! triggered TLB invalidate takes the TLB's lock, and starting or resetting the GSP its
//! own, outside this module.)

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::chip::{BarBlockRegisterKind, Generation, WindowRegisterKind};
use crate::gsp::falcon::{FalconAction, FalconReg, GspFalcon};
use crate::mmu::BarBinding;
use crate::regs::{
    self, BarBlock, BarBlockHigh, BarBlockLow, Boot0, Boot42, LocalMemoryRange, MmuInvalidate,
    MmuInvalidatePdb, MmuInvalidateUpperPdb, PbusBar0Window, UsableFbSizeInMb, XalBar0Window,
    BAR0_SIZE, PRAMIN_BASE, PRAMIN_SIZE, WINDOW_BASE_SHIFT,
};
use crate::vram::{Vram, VramAddr, VramError};

/// What an unimplemented register reads as by default.
///
/// ASSUMPTION: real chips answer a PRI error with a value whose top 12 bits are 0xBAD
/// (gpu-facts 5); the exact low bits chosen here are arbitrary. Note that Open RM treats
/// 0xBADxxxxx reads as PRI errors; where that matters use
/// `EmulatedGpu::set_unimplemented_read_value` (e.g. to 0).
pub const UNIMPLEMENTED_REGISTER_VALUE: u32 = 0xBADF_1100;

/// How many distinct unimplemented dword offsets are recorded (later ones are only counted).
pub const UNIMPLEMENTED_OFFSETS_RECORDED: usize = 64;

/// Errors of BAR0 accesses.
#[derive(Debug, Error)]
pub enum Bar0Error {
    /// The access does not lie inside the 16 MiB BAR0.
    #[error("BAR0 access of {width} bytes at {offset:#x} is outside the 16 MiB BAR")]
    OutOfRange {
        /// BAR0 offset of the access.
        offset: u64,
        /// Width in bytes.
        width: u64,
    },
    /// The offset is not a multiple of the access width.
    #[error("BAR0 access of {width} bytes at {offset:#x} is not naturally aligned")]
    Misaligned {
        /// BAR0 offset of the access.
        offset: u64,
        /// Width in bytes.
        width: u64,
    },
    /// An access width other than 1, 2, 4 or 8 bytes (including 0).
    #[error("invalid BAR0 access width of {0} bytes (must be 1, 2, 4 or 8)")]
    InvalidWidth(u64),
    /// A write value with bits set above the access width.
    #[error("value {value:#x} does not fit a {width}-byte write")]
    ValueTooWide {
        /// The value given.
        value: u64,
        /// Width in bytes.
        width: u64,
    },
    /// VRAM behind the PRAMIN window failed an access (not expected: the model clips
    /// accesses to VRAM itself).
    #[error("PRAMIN access to VRAM failed: {0}")]
    Vram(#[from] VramError),
}

/// Width of a BAR0 access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessWidth {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
}

impl AccessWidth {
    /// Number of bytes accessed.
    pub const fn bytes(self) -> u64 {
        match self {
            AccessWidth::Byte => 1,
            AccessWidth::Word => 2,
            AccessWidth::Dword => 4,
            AccessWidth::Qword => 8,
        }
    }

    /// The width of a `bytes`-long access; 0, 3, 5.. and anything above 8 are errors.
    pub const fn from_bytes(bytes: u64) -> Result<AccessWidth, Bar0Error> {
        match bytes {
            1 => Ok(AccessWidth::Byte),
            2 => Ok(AccessWidth::Word),
            4 => Ok(AccessWidth::Dword),
            8 => Ok(AccessWidth::Qword),
            other => Err(Bar0Error::InvalidWidth(other)),
        }
    }

    /// Mask of the value bits an access of this width carries.
    pub const fn value_mask(self) -> u64 {
        match self {
            AccessWidth::Qword => u64::MAX,
            w => (1u64 << (w.bytes() * 8)) - 1,
        }
    }
}

impl TryFrom<usize> for AccessWidth {
    type Error = Bar0Error;

    fn try_from(bytes: usize) -> Result<AccessWidth, Bar0Error> {
        AccessWidth::from_bytes(bytes as u64)
    }
}

/// Accesses to registers the model does not implement, since creation or the last clear.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnimplementedStats {
    /// Number of unimplemented dword reads (an 8-byte access counts as two).
    pub reads: u64,
    /// Number of unimplemented dword writes (an 8-byte access counts as two).
    pub writes: u64,
    /// Distinct dword-aligned BAR0 offsets touched, in first-touch order, at most
    /// [`UNIMPLEMENTED_OFFSETS_RECORDED`].
    pub offsets: Vec<u64>,
    /// Whether more distinct offsets were touched than recorded in `offsets`.
    pub offsets_truncated: bool,
}

/// A snapshot of the stored (non-constant) register state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterSnapshot {
    /// Raw value of the generation's window register (defined fields only).
    pub window: u32,
    /// VRAM address the PRAMIN aperture starts at (`BASE << 16`), whatever the target.
    pub window_base: VramAddr,
    /// `MMU_INVALIDATE_PDB`.
    pub mmu_invalidate_pdb: MmuInvalidatePdb,
    /// `MMU_INVALIDATE_UPPER_PDB`.
    pub mmu_invalidate_upper_pdb: MmuInvalidateUpperPdb,
    /// `MMU_INVALIDATE` as it reads back (TRIGGER always 0).
    pub mmu_invalidate: MmuInvalidate,
    /// Number of TLB invalidates triggered since power-on/reset.
    pub tlb_invalidations: u64,
    /// `BAR1_BLOCK` (Turing–Ada; reset value on other generations).
    pub bar1_block: BarBlock,
    /// `BAR2_BLOCK` (Turing–Ada; reset value on other generations).
    pub bar2_block: BarBlock,
    /// `BAR1_BLOCK_LOW_ADDR` (Hopper–Blackwell; 0 on other generations).
    pub bar1_block_low: BarBlockLow,
    /// `BAR1_BLOCK_HIGH_ADDR` (Hopper–Blackwell; 0 on other generations).
    pub bar1_block_high: BarBlockHigh,
    /// `BAR2_BLOCK_LOW_ADDR` (Hopper–Blackwell; 0 on other generations).
    pub bar2_block_low: BarBlockLow,
    /// `BAR2_BLOCK_HIGH_ADDR` (Hopper–Blackwell; 0 on other generations).
    pub bar2_block_high: BarBlockHigh,
}

/// A TLB invalidate triggered by a write of `MMU_INVALIDATE` with TRIGGER set: the register
/// values at the moment of the trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlbInvalidateRequest {
    /// The control value written (merged with the stored bits for a sub-dword write),
    /// TRIGGER included.
    pub control: MmuInvalidate,
    /// `MMU_INVALIDATE_PDB`.
    pub pdb: MmuInvalidatePdb,
    /// `MMU_INVALIDATE_UPPER_PDB`.
    pub upper_pdb: MmuInvalidateUpperPdb,
}

/// What a BAR0 write asks of the rest of the device, which applies it before the write
/// returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bar0Effect {
    /// A TLB invalidate was triggered.
    TlbInvalidate(TlbInvalidateRequest),
    /// A GSP falcon write asks the GSP to start or to halt.
    Falcon(FalconAction),
}

/// The read-only framebuffer size registers of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FbSizeRegisters {
    /// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE`.
    pub local_memory_range: LocalMemoryRange,
    /// `NV_USABLE_FB_SIZE_IN_MB`.
    pub usable_fb_size: UsableFbSizeInMb,
}

impl FbSizeRegisters {
    /// The registers of a part with `vram_size` bytes of VRAM, `usable` of them usable.
    pub(crate) const fn for_sizes(vram_size: u64, usable: u64) -> FbSizeRegisters {
        FbSizeRegisters {
            local_memory_range: LocalMemoryRange::at_least(vram_size),
            usable_fb_size: UsableFbSizeInMb::for_bytes(usable),
        }
    }
}

/// Power-on value of `BAR2_BLOCK`: DEBUG_CYA = 1 (gpu-facts 4.6), physical mode.
const BAR2_BLOCK_RESET: u32 = BarBlock::from_raw(0).with_debug_cya(1).raw();

/// Stored register state. All fields are atomics so accesses need no lock.
#[derive(Debug, Default)]
struct RegisterFile {
    window: AtomicU32,
    tlb_pdb: AtomicU32,
    tlb_upper_pdb: AtomicU32,
    tlb_control: AtomicU32,
    tlb_invalidations: AtomicU64,
    bar1_block: AtomicU32,
    bar2_block: AtomicU32,
    bar1_block_low: AtomicU32,
    bar1_block_high: AtomicU32,
    bar2_block_low: AtomicU32,
    bar2_block_high: AtomicU32,
}

impl RegisterFile {
    fn new() -> RegisterFile {
        let r = RegisterFile::default();
        r.reset();
        r
    }

    fn reset(&self) {
        for cell in [
            &self.window,
            &self.tlb_pdb,
            &self.tlb_upper_pdb,
            &self.tlb_control,
            &self.bar1_block,
            &self.bar1_block_low,
            &self.bar1_block_high,
            &self.bar2_block_low,
            &self.bar2_block_high,
        ] {
            cell.store(0, Ordering::Release);
        }
        self.bar2_block.store(BAR2_BLOCK_RESET, Ordering::Release);
        self.tlb_invalidations.store(0, Ordering::Release);
    }
}

/// Lock-free record of unimplemented accesses.
#[derive(Debug)]
struct UnimplementedTracker {
    reads: AtomicU64,
    writes: AtomicU64,
    /// Recorded offsets + 1 (0 = empty slot), filled in order.
    offsets: [AtomicU32; UNIMPLEMENTED_OFFSETS_RECORDED],
    truncated: AtomicBool,
}

impl UnimplementedTracker {
    fn new() -> UnimplementedTracker {
        UnimplementedTracker {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            offsets: std::array::from_fn(|_| AtomicU32::new(0)),
            truncated: AtomicBool::new(false),
        }
    }

    fn record(&self, dword_offset: u32, write: bool) {
        let counter = if write { &self.writes } else { &self.reads };
        counter.fetch_add(1, Ordering::Relaxed);
        // Offsets are < 16 MiB, so `+ 1` cannot overflow and 0 stays free as "empty".
        let key = dword_offset + 1;
        for slot in &self.offsets {
            // Plain loads first: a CAS only on an empty slot keeps repeated accesses (driver
            // poll loops) cheap once the offset is recorded or the table is full.
            match slot.load(Ordering::Acquire) {
                k if k == key => return,
                0 => {}
                _ => continue,
            }
            match slot.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(existing) if existing == key => return,
                Err(_) => {}
            }
        }
        self.truncated.store(true, Ordering::Relaxed);
    }

    fn stats(&self) -> UnimplementedStats {
        UnimplementedStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            offsets: self
                .offsets
                .iter()
                .map(|s| s.load(Ordering::Acquire))
                .take_while(|&k| k != 0)
                .map(|k| u64::from(k - 1))
                .collect(),
            offsets_truncated: self.truncated.load(Ordering::Relaxed),
        }
    }

    fn clear(&self) {
        self.reads.store(0, Ordering::Relaxed);
        self.writes.store(0, Ordering::Relaxed);
        for s in &self.offsets {
            s.store(0, Ordering::Release);
        }
        self.truncated.store(false, Ordering::Relaxed);
    }
}

/// A decoded register (dword) offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Boot0,
    Boot1,
    Boot42,
    Window,
    TlbPdb,
    TlbUpperPdb,
    TlbControl,
    Bar1Block,
    Bar2Block,
    BindStatus,
    Bar1BlockLow,
    Bar1BlockHigh,
    Bar2BlockLow,
    Bar2BlockHigh,
    LocalMemoryRange,
    UsableFbSize,
    Gsp(FalconReg),
    Unimplemented,
}

/// The BAR0 model of one GPU. PRAMIN accesses are served from the `Vram` passed in.
#[derive(Debug)]
pub(crate) struct Bar0Registers {
    boot0: Boot0,
    boot42: Boot42,
    window_kind: WindowRegisterKind,
    /// Bits of the window register that exist on this generation.
    window_mask: u32,
    block_kind: BarBlockRegisterKind,
    fb: FbSizeRegisters,
    regs: RegisterFile,
    unimplemented: UnimplementedTracker,
    unimplemented_value: AtomicU32,
    gsp_falcon: Arc<GspFalcon>,
}

impl Bar0Registers {
    /// A power-on register model for `generation` answering `boot0`/`boot42` and the
    /// framebuffer size registers `fb`.
    pub(crate) fn new(
        generation: Generation,
        boot0: Boot0,
        boot42: Boot42,
        fb: FbSizeRegisters,
    ) -> Bar0Registers {
        let window_kind = generation.window_register();
        let window_mask = match window_kind {
            WindowRegisterKind::Pbus0x1700 => PbusBar0Window::DEFINED_MASK,
            WindowRegisterKind::Xal0x10FD40 => XalBar0Window::base_mask(generation),
        };
        Bar0Registers {
            boot0,
            boot42,
            window_kind,
            window_mask,
            block_kind: generation.bar_block_registers(),
            fb,
            regs: RegisterFile::new(),
            unimplemented: UnimplementedTracker::new(),
            unimplemented_value: AtomicU32::new(UNIMPLEMENTED_REGISTER_VALUE),
            gsp_falcon: Arc::default(),
        }
    }

    /// The GSP falcon registers (shared with the emulated GSP).
    pub(crate) fn gsp_falcon(&self) -> &Arc<GspFalcon> {
        &self.gsp_falcon
    }

    /// Registers back to power-on values. Unimplemented-access stats and the
    /// unimplemented read value are kept.
    pub(crate) fn reset(&self) {
        self.regs.reset();
        self.gsp_falcon.reset();
    }

    pub(crate) fn unimplemented_stats(&self) -> UnimplementedStats {
        self.unimplemented.stats()
    }

    pub(crate) fn clear_unimplemented_stats(&self) {
        self.unimplemented.clear();
    }

    pub(crate) fn set_unimplemented_value(&self, value: u32) {
        self.unimplemented_value.store(value, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RegisterSnapshot {
        let r = &self.regs;
        let ld = |c: &AtomicU32| c.load(Ordering::Acquire);
        let window = ld(&r.window);
        RegisterSnapshot {
            window,
            window_base: window_base(window, self.window_mask),
            mmu_invalidate_pdb: MmuInvalidatePdb::from_raw(ld(&r.tlb_pdb)),
            mmu_invalidate_upper_pdb: MmuInvalidateUpperPdb::from_raw(ld(&r.tlb_upper_pdb)),
            mmu_invalidate: MmuInvalidate::from_raw(ld(&r.tlb_control)),
            tlb_invalidations: r.tlb_invalidations.load(Ordering::Acquire),
            bar1_block: BarBlock::from_raw(ld(&r.bar1_block)),
            bar2_block: BarBlock::from_raw(ld(&r.bar2_block)),
            bar1_block_low: BarBlockLow::from_raw(ld(&r.bar1_block_low)),
            bar1_block_high: BarBlockHigh::from_raw(ld(&r.bar1_block_high)),
            bar2_block_low: BarBlockLow::from_raw(ld(&r.bar2_block_low)),
            bar2_block_high: BarBlockHigh::from_raw(ld(&r.bar2_block_high)),
        }
    }

    /// Reads `width` bytes at BAR0 `offset`.
    pub(crate) fn read(
        &self,
        vram: &Vram,
        offset: u64,
        width: AccessWidth,
    ) -> Result<u64, Bar0Error> {
        check_access(offset, width)?;
        if let Some(o) = pramin_offset(offset) {
            return self.pramin_read(vram, o, width);
        }
        // `check_access` bounds `offset` below 16 MiB, so it fits a u32.
        let off = offset as u32;
        Ok(match width {
            AccessWidth::Qword => {
                let lo = self.read_dword(off);
                let hi = self.read_dword(off + 4);
                u64::from(lo) | (u64::from(hi) << 32)
            }
            _ => {
                let shift = (off & 3) * 8;
                let dword = self.read_dword(off & !3);
                (u64::from(dword) >> shift) & width.value_mask()
            }
        })
    }

    /// Writes the low `width` bytes of `value` at BAR0 `offset`. Returns what the write
    /// asks of the rest of the device (a TLB invalidate, a GSP start or halt), if
    /// anything, for the caller to apply. (An 8-byte write covers two dwords, of which at
    /// most one has an effect: no two effect registers share an aligned qword.)
    pub(crate) fn write(
        &self,
        vram: &Vram,
        offset: u64,
        width: AccessWidth,
        value: u64,
    ) -> Result<Option<Bar0Effect>, Bar0Error> {
        check_access(offset, width)?;
        if value & !width.value_mask() != 0 {
            return Err(Bar0Error::ValueTooWide {
                value,
                width: width.bytes(),
            });
        }
        if let Some(o) = pramin_offset(offset) {
            self.pramin_write(vram, o, width, value)?;
            return Ok(None);
        }
        let off = offset as u32; // < 16 MiB, see `read`
        Ok(match width {
            AccessWidth::Qword => {
                let lo = self.write_dword(off, u32::MAX, value as u32);
                let hi = self.write_dword(off + 4, u32::MAX, (value >> 32) as u32);
                lo.or(hi)
            }
            _ => {
                let shift = (off & 3) * 8;
                let mask = (width.value_mask() as u32) << shift;
                self.write_dword(off & !3, mask, (value as u32) << shift)
            }
        })
    }

    /// The BAR1 binding the generation's BAR1 block register(s) currently hold.
    pub(crate) fn bar1_binding(&self) -> BarBinding {
        let r = &self.regs;
        match self.block_kind {
            BarBlockRegisterKind::Single0xB80F40 => {
                BarBinding::from_block(BarBlock::from_raw(r.bar1_block.load(Ordering::Acquire)))
            }
            BarBlockRegisterKind::LowHigh0xB80F60 => BarBinding::from_low_high(
                BarBlockLow::from_raw(r.bar1_block_low.load(Ordering::Acquire)),
                BarBlockHigh::from_raw(r.bar1_block_high.load(Ordering::Acquire)),
            ),
        }
    }

    fn decode(&self, off: u32) -> Reg {
        let off = u64::from(off);
        match off {
            regs::BOOT_0 => Reg::Boot0,
            regs::BOOT_1 => Reg::Boot1,
            regs::BOOT_42 => Reg::Boot42,
            regs::MMU_INVALIDATE_PDB => Reg::TlbPdb,
            regs::MMU_INVALIDATE_UPPER_PDB => Reg::TlbUpperPdb,
            regs::MMU_INVALIDATE => Reg::TlbControl,
            regs::LOCAL_MEMORY_RANGE => Reg::LocalMemoryRange,
            regs::USABLE_FB_SIZE_IN_MB => Reg::UsableFbSize,
            o if o == self.window_kind.offset() => Reg::Window,
            o => match self.block_kind {
                BarBlockRegisterKind::Single0xB80F40 => match o {
                    regs::BAR1_BLOCK => Reg::Bar1Block,
                    regs::BAR2_BLOCK => Reg::Bar2Block,
                    regs::BIND_STATUS => Reg::BindStatus,
                    _ => decode_gsp(o),
                },
                BarBlockRegisterKind::LowHigh0xB80F60 => match o {
                    regs::BAR1_BLOCK_LOW_ADDR => Reg::Bar1BlockLow,
                    regs::BAR1_BLOCK_HIGH_ADDR => Reg::Bar1BlockHigh,
                    regs::BAR2_BLOCK_LOW_ADDR => Reg::Bar2BlockLow,
                    regs::BAR2_BLOCK_HIGH_ADDR => Reg::Bar2BlockHigh,
                    _ => decode_gsp(o),
                },
            },
        }
    }

    /// The atomic holding a stored register, with the bits of it that stick on a write.
    fn cell(&self, reg: Reg) -> Option<(&AtomicU32, u32)> {
        let r = &self.regs;
        Some(match reg {
            Reg::Window => (&r.window, self.window_mask),
            Reg::TlbPdb => (&r.tlb_pdb, MmuInvalidatePdb::DEFINED_MASK),
            Reg::TlbUpperPdb => (&r.tlb_upper_pdb, MmuInvalidateUpperPdb::DEFINED_MASK),
            // TRIGGER never sticks: the invalidate completes within the write.
            Reg::TlbControl => (
                &r.tlb_control,
                MmuInvalidate::DEFINED_MASK & !MmuInvalidate::from_raw(0).with_trigger(1).raw(),
            ),
            Reg::Bar1Block => (&r.bar1_block, BarBlock::DEFINED_MASK),
            Reg::Bar2Block => (&r.bar2_block, BarBlock::DEFINED_MASK),
            // PENDING/OUTSTANDING never stick: binds complete immediately.
            Reg::Bar1BlockLow => (&r.bar1_block_low, BLOCK_LOW_STICKY),
            Reg::Bar2BlockLow => (&r.bar2_block_low, BLOCK_LOW_STICKY),
            Reg::Bar1BlockHigh => (&r.bar1_block_high, BarBlockHigh::DEFINED_MASK),
            Reg::Bar2BlockHigh => (&r.bar2_block_high, BarBlockHigh::DEFINED_MASK),
            Reg::Boot0
            | Reg::Boot1
            | Reg::Boot42
            | Reg::BindStatus
            | Reg::LocalMemoryRange
            | Reg::UsableFbSize
            | Reg::Gsp(_)
            | Reg::Unimplemented => return None,
        })
    }

    fn read_dword(&self, off: u32) -> u32 {
        let reg = self.decode(off);
        match reg {
            Reg::Boot0 => self.boot0.raw(),
            Reg::Boot1 | Reg::BindStatus => 0,
            Reg::Boot42 => self.boot42.raw(),
            Reg::LocalMemoryRange => self.fb.local_memory_range.raw(),
            Reg::UsableFbSize => self.fb.usable_fb_size.raw(),
            Reg::Gsp(r) => self.gsp_falcon.read(r),
            Reg::Unimplemented => {
                self.unimplemented.record(off, false);
                self.unimplemented_value.load(Ordering::Relaxed)
            }
            _ => match self.cell(reg) {
                Some((cell, _)) => cell.load(Ordering::Acquire),
                None => 0,
            },
        }
    }

    /// Writes the bytes of `value` selected by `byte_mask` into the dword at `off`;
    /// returns the effect it asks for, if any.
    fn write_dword(&self, off: u32, byte_mask: u32, value: u32) -> Option<Bar0Effect> {
        let reg = self.decode(off);
        if reg == Reg::Unimplemented {
            self.unimplemented.record(off, true);
            return None;
        }
        if let Reg::Gsp(r) = reg {
            return self
                .gsp_falcon
                .write(r, byte_mask, value)
                .map(Bar0Effect::Falcon);
        }
        // Read-only register: nothing to do.
        let (cell, sticky) = self.cell(reg)?;
        let merge = |old: u32| (old & !byte_mask) | (value & byte_mask);
        // The closure always returns `Some`, so this is always `Ok(previous value)`.
        let old = match cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
            Some(merge(old) & sticky)
        }) {
            Ok(old) | Err(old) => old,
        };
        if reg == Reg::TlbControl && MmuInvalidate::from_raw(value & byte_mask).trigger() == 1 {
            self.regs.tlb_invalidations.fetch_add(1, Ordering::AcqRel);
            let r = &self.regs;
            return Some(Bar0Effect::TlbInvalidate(TlbInvalidateRequest {
                control: MmuInvalidate::from_raw(merge(old)),
                pdb: MmuInvalidatePdb::from_raw(r.tlb_pdb.load(Ordering::Acquire)),
                upper_pdb: MmuInvalidateUpperPdb::from_raw(r.tlb_upper_pdb.load(Ordering::Acquire)),
            }));
        }
        None
    }

    /// The VRAM address aperture offset `o` maps to, or `None` if the window targets
    /// system memory (which the emulator does not have).
    fn pramin_target(&self, o: u64) -> Option<u64> {
        let raw = self.regs.window.load(Ordering::Acquire);
        if self.window_kind == WindowRegisterKind::Pbus0x1700
            && PbusBar0Window::from_raw(raw).target_raw() != regs::MemoryTarget::VidMem.raw()
        {
            return None;
        }
        // base < 2^24 and o < 2^20: no overflow.
        Some(window_base(raw, self.window_mask).raw() + o)
    }

    fn pramin_read(&self, vram: &Vram, o: u64, width: AccessWidth) -> Result<u64, Bar0Error> {
        let Some(addr) = self.pramin_target(o) else {
            return Ok(width.value_mask());
        };
        let n = width.bytes();
        let addr_t = VramAddr::new(addr);
        let in_range = vram.size().saturating_sub(addr).min(n);
        if in_range == n {
            return Ok(match width {
                AccessWidth::Byte => u64::from(vram.read_u8(addr_t)?),
                AccessWidth::Word => u64::from(vram.read_u16(addr_t)?),
                AccessWidth::Dword => u64::from(vram.read_u32(addr_t)?),
                AccessWidth::Qword => vram.read_u64(addr_t)?,
            });
        }
        // At or past the end of VRAM: real bytes first, then 0xFF.
        let mut bytes = [0xFFu8; 8];
        if in_range > 0 {
            vram.read(addr_t, &mut bytes[..in_range as usize])?;
        }
        Ok(u64::from_le_bytes(bytes) & width.value_mask())
    }

    fn pramin_write(
        &self,
        vram: &Vram,
        o: u64,
        width: AccessWidth,
        value: u64,
    ) -> Result<(), Bar0Error> {
        let Some(addr) = self.pramin_target(o) else {
            return Ok(()); // system-memory target: dropped
        };
        let n = width.bytes();
        let addr_t = VramAddr::new(addr);
        let in_range = vram.size().saturating_sub(addr).min(n);
        if in_range == n {
            match width {
                AccessWidth::Byte => vram.write_u8(addr_t, value as u8)?,
                AccessWidth::Word => vram.write_u16(addr_t, value as u16)?,
                AccessWidth::Dword => vram.write_u32(addr_t, value as u32)?,
                AccessWidth::Qword => vram.write_u64(addr_t, value)?,
            }
            return Ok(());
        }
        // Straddling or past the end: keep the in-range bytes, drop the rest.
        if in_range > 0 {
            vram.write(addr_t, &value.to_le_bytes()[..in_range as usize])?;
        }
        Ok(())
    }
}

/// Bits of a `BARn_BLOCK_LOW_ADDR` write that stick (all defined fields but PENDING and
/// OUTSTANDING).
const BLOCK_LOW_STICKY: u32 = BarBlockLow::DEFINED_MASK
    & !BarBlockLow::from_raw(0)
        .with_pending(1)
        .with_outstanding(1)
        .raw();

/// The VRAM address a window register value points at.
fn window_base(raw: u32, mask: u32) -> VramAddr {
    // Both window layouts keep BASE at bit 0; `mask` limits it to the generation's width
    // (on 0x1700 the TARGET bits above bit 23 are removed by the 24-bit BASE mask).
    let base = raw & mask & PbusBar0Window::from_raw(0).with_base(u32::MAX).raw();
    VramAddr::new(u64::from(base) << WINDOW_BASE_SHIFT)
}

/// Validates a BAR0 access: inside the BAR, naturally aligned.
fn check_access(offset: u64, width: AccessWidth) -> Result<(), Bar0Error> {
    let w = width.bytes();
    match offset.checked_add(w) {
        Some(end) if end <= BAR0_SIZE => {}
        _ => return Err(Bar0Error::OutOfRange { offset, width: w }),
    }
    if offset % w != 0 {
        return Err(Bar0Error::Misaligned { offset, width: w });
    }
    Ok(())
}

/// The GSP falcon register at dword offset `o`, or unimplemented.
fn decode_gsp(o: u64) -> Reg {
    FalconReg::decode(o).map_or(Reg::Unimplemented, Reg::Gsp)
}

/// The aperture offset of a BAR0 offset inside PRAMIN.
fn pramin_offset(offset: u64) -> Option<u64> {
    offset.checked_sub(PRAMIN_BASE).filter(|&o| o < PRAMIN_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::{MemoryTarget, MMU_INVALIDATE, PBUS_BAR0_WINDOW, XAL_BAR0_WINDOW};

    const MIB: u64 = 1 << 20;

    const FB: FbSizeRegisters = FbSizeRegisters::for_sizes(24 << 30, 23 << 30);

    fn turing() -> Bar0Registers {
        Bar0Registers::new(
            Generation::Turing,
            Boot0::for_chip(0x16, 2, 0xA, 1),
            Boot42::for_chip(0x16, 2, 0xA, 1),
            FB,
        )
    }

    fn hopper() -> Bar0Registers {
        Bar0Registers::new(
            Generation::Hopper,
            Boot0::for_chip(0x18, 0, 0xA, 1),
            Boot42::for_chip(0x18, 0, 0xA, 1),
            FB,
        )
    }

    /// The TLB invalidate a write reported.
    fn tlb(effect: Option<Bar0Effect>) -> TlbInvalidateRequest {
        match effect {
            Some(Bar0Effect::TlbInvalidate(req)) => req,
            other => panic!("expected a TLB invalidate, got {other:?}"),
        }
    }

    #[test]
    fn access_width_conversions() {
        assert_eq!(AccessWidth::from_bytes(4).unwrap(), AccessWidth::Dword);
        assert_eq!(AccessWidth::try_from(8usize).unwrap(), AccessWidth::Qword);
        for bad in [0u64, 3, 5, 16] {
            assert!(matches!(
                AccessWidth::from_bytes(bad),
                Err(Bar0Error::InvalidWidth(b)) if b == bad
            ));
        }
        assert_eq!(AccessWidth::Byte.value_mask(), 0xFF);
        assert_eq!(AccessWidth::Word.value_mask(), 0xFFFF);
        assert_eq!(AccessWidth::Dword.value_mask(), 0xFFFF_FFFF);
        assert_eq!(AccessWidth::Qword.value_mask(), u64::MAX);
    }

    #[test]
    fn access_checks() {
        let b = turing();
        let v = Vram::new(MIB).unwrap();
        use AccessWidth::*;
        assert!(matches!(
            b.read(&v, BAR0_SIZE, Byte),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read(&v, u64::MAX, Byte),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(matches!(
            b.read(&v, u64::MAX - 3, Dword),
            Err(Bar0Error::OutOfRange { .. })
        ));
        assert!(matches!(
            b.write(&v, BAR0_SIZE - 4, Qword, 0),
            Err(Bar0Error::OutOfRange { .. })
        ));
        for (off, w) in [
            (1, Word),
            (2, Dword),
            (4, Qword),
            (0x700001, Word),
            (0x700004, Qword),
        ] {
            assert!(
                matches!(b.read(&v, off, w), Err(Bar0Error::Misaligned { .. })),
                "{off:#x} {w:?}"
            );
            assert!(matches!(
                b.write(&v, off, w, 0),
                Err(Bar0Error::Misaligned { .. })
            ));
        }
        assert!(matches!(
            b.write(&v, 0x700000, Byte, 0x100),
            Err(Bar0Error::ValueTooWide { .. })
        ));
        assert!(matches!(
            b.write(&v, 0x1700, Dword, 1 << 32),
            Err(Bar0Error::ValueTooWide { .. })
        ));
        // Failed accesses have no effect and are not counted.
        assert_eq!(b.snapshot().window, 0);
        assert_eq!(b.unimplemented_stats(), UnimplementedStats::default());
        assert_eq!(v.read_u8(VramAddr::ZERO).unwrap(), 0);
        // The last bytes of BAR0 are accessible.
        assert!(b.read(&v, BAR0_SIZE - 8, Qword).is_ok());
        assert!(b.read(&v, BAR0_SIZE - 1, Byte).is_ok());
    }

    #[test]
    fn sub_dword_register_access() {
        let b = turing();
        let v = Vram::new(MIB).unwrap();
        use AccessWidth::*;
        assert_eq!(b.read(&v, 0, Byte).unwrap(), 0xA1);
        assert_eq!(b.read(&v, 2, Word).unwrap(), 0x1620);
        assert_eq!(b.read(&v, 3, Byte).unwrap(), 0x16);
        assert_eq!(b.read(&v, 0, Qword).unwrap(), 0x1620_00A1);
        b.write(&v, PBUS_BAR0_WINDOW, Dword, 0x0000_1234).unwrap();
        b.write(&v, PBUS_BAR0_WINDOW + 2, Byte, 0x56).unwrap();
        assert_eq!(b.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(), 0x0056_1234);
        b.write(&v, PBUS_BAR0_WINDOW, Word, 0xABCD).unwrap();
        assert_eq!(b.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(), 0x0056_ABCD);
        // Undefined bits (31:26) do not stick even in a byte write.
        b.write(&v, PBUS_BAR0_WINDOW + 3, Byte, 0xFF).unwrap();
        assert_eq!(b.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(), 0x0356_ABCD);
        // A qword write splits into two dwords: window + the unimplemented 0x1704.
        b.write(&v, PBUS_BAR0_WINDOW, Qword, 0x1111_2222_0000_0042)
            .unwrap();
        assert_eq!(b.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(), 0x42);
        let s = b.unimplemented_stats();
        assert_eq!((s.reads, s.writes), (0, 1));
        assert_eq!(s.offsets, [0x1704]);
    }

    #[test]
    fn window_register_per_generation() {
        let v = Vram::new(MIB).unwrap();
        use AccessWidth::*;
        let t = turing();
        t.write(&v, PBUS_BAR0_WINDOW, Dword, 0xFFFF_FFFF).unwrap();
        assert_eq!(t.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(), 0x03FF_FFFF);
        assert_eq!(
            t.read(&v, XAL_BAR0_WINDOW, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );

        let h = hopper();
        h.write(&v, XAL_BAR0_WINDOW, Dword, 0xFFFF_FFFF).unwrap();
        assert_eq!(h.read(&v, XAL_BAR0_WINDOW, Dword).unwrap(), 0x003F_FFFF);
        h.write(&v, XAL_BAR0_WINDOW, Dword, 0x12).unwrap();
        assert_eq!(h.read(&v, XAL_BAR0_WINDOW, Dword).unwrap(), 0x12);
        assert_eq!(h.snapshot().window_base, VramAddr::new(0x12_0000));
        assert_eq!(
            h.read(&v, PBUS_BAR0_WINDOW, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );
        assert_eq!(h.unimplemented_stats().offsets, [PBUS_BAR0_WINDOW]);
        let bw = Bar0Registers::new(
            Generation::Blackwell,
            Boot0::for_chip(0x1B, 2, 0xA, 1),
            Boot42::for_chip(0x1B, 2, 0xA, 1),
            FB,
        );
        bw.write(&v, XAL_BAR0_WINDOW, Dword, 0xFFFF_FFFF).unwrap();
        assert_eq!(bw.read(&v, XAL_BAR0_WINDOW, Dword).unwrap(), 0x007F_FFFF);
    }

    #[test]
    fn access_straddling_end_of_vram_is_split() {
        // 64 KiB + 4 bytes of VRAM; window at 64 KiB: aperture bytes 0..4 are real.
        let v = Vram::new_unaligned_for_test(0x1_0004).unwrap();
        v.write_u32(VramAddr::new(0x1_0000), 0x4433_2211).unwrap();
        let t = turing();
        t.write(&v, PBUS_BAR0_WINDOW, AccessWidth::Dword, 1)
            .unwrap();
        assert_eq!(
            t.read(&v, PRAMIN_BASE, AccessWidth::Qword).unwrap(),
            0xFFFF_FFFF_4433_2211
        );
        t.write(&v, PRAMIN_BASE, AccessWidth::Qword, 0x8877_6655_DDCC_BBAA)
            .unwrap();
        assert_eq!(v.read_u32(VramAddr::new(0x1_0000)).unwrap(), 0xDDCC_BBAA);
        assert_eq!(
            t.read(&v, PRAMIN_BASE, AccessWidth::Qword).unwrap(),
            0xFFFF_FFFF_DDCC_BBAA
        );
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 4, AccessWidth::Dword).unwrap(),
            0xFFFF_FFFF
        );
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 3, AccessWidth::Byte).unwrap(),
            0xDD
        );
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 4, AccessWidth::Byte).unwrap(),
            0xFF
        );
        // Same with an odd end inside a dword: 65,538 bytes.
        let v = Vram::new_unaligned_for_test(0x1_0002).unwrap();
        t.write(&v, PRAMIN_BASE, AccessWidth::Dword, 0x4433_2211)
            .unwrap();
        assert_eq!(v.read_u16(VramAddr::new(0x1_0000)).unwrap(), 0x2211);
        assert_eq!(
            t.read(&v, PRAMIN_BASE, AccessWidth::Dword).unwrap(),
            0xFFFF_2211
        );
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 2, AccessWidth::Word).unwrap(),
            0xFFFF
        );
    }

    #[test]
    fn sysmem_target_reads_ones_and_drops_writes() {
        let v = Vram::new(MIB).unwrap();
        v.write_u32(VramAddr::new(0x10), 0x1234_5678).unwrap();
        let t = turing();
        for target in [
            MemoryTarget::SysMemCoherent,
            MemoryTarget::SysMemNonCoherent,
        ] {
            let w = PbusBar0Window::default().with_target(target);
            t.write(&v, PBUS_BAR0_WINDOW, AccessWidth::Dword, u64::from(w.raw()))
                .unwrap();
            assert_eq!(
                t.read(&v, PRAMIN_BASE + 0x10, AccessWidth::Dword).unwrap(),
                0xFFFF_FFFF
            );
            t.write(&v, PRAMIN_BASE + 0x10, AccessWidth::Dword, 0)
                .unwrap();
            assert_eq!(v.read_u32(VramAddr::new(0x10)).unwrap(), 0x1234_5678);
        }
        // The reserved target encoding 1 behaves the same.
        t.write(&v, PBUS_BAR0_WINDOW, AccessWidth::Dword, 0x0100_0000)
            .unwrap();
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 0x10, AccessWidth::Qword).unwrap(),
            u64::MAX
        );
        t.write(&v, PBUS_BAR0_WINDOW, AccessWidth::Dword, 0)
            .unwrap();
        assert_eq!(
            t.read(&v, PRAMIN_BASE + 0x10, AccessWidth::Dword).unwrap(),
            0x1234_5678
        );
    }

    #[test]
    fn tlb_invalidate_completes_synchronously() {
        let v = Vram::new(MIB).unwrap();
        let b = hopper();
        use AccessWidth::*;
        b.write(&v, regs::MMU_INVALIDATE_PDB, Dword, 0x1234_567B)
            .unwrap();
        assert_eq!(
            b.read(&v, regs::MMU_INVALIDATE_PDB, Dword).unwrap(),
            0x1234_5672
        );
        b.write(&v, regs::MMU_INVALIDATE_UPPER_PDB, Dword, 0xFFF0_0001)
            .unwrap();
        assert_eq!(
            b.read(&v, regs::MMU_INVALIDATE_UPPER_PDB, Dword).unwrap(),
            0x1
        );
        let ctl = MmuInvalidate::default()
            .with_all_va(1)
            .with_cache_level(1)
            .with_trigger(1);
        b.write(&v, MMU_INVALIDATE, Dword, u64::from(ctl.raw()))
            .unwrap();
        let back = MmuInvalidate::from_raw(b.read(&v, MMU_INVALIDATE, Dword).unwrap() as u32);
        assert_eq!(back.trigger(), 0);
        assert_eq!(back.all_va(), 1);
        assert_eq!(back.cache_level(), 1);
        assert_eq!(b.snapshot().tlb_invalidations, 1);
        // A byte write of the top byte with TRIGGER also triggers; the request carries the
        // stored ALL_VA bit (CACHE_LEVEL is in the written byte) and the PDB registers.
        let req = tlb(b.write(&v, MMU_INVALIDATE + 3, Byte, 0x80).unwrap());
        assert_eq!(b.snapshot().tlb_invalidations, 2);
        assert_eq!(req.control.trigger(), 1);
        assert_eq!(req.control.all_va(), 1);
        assert_eq!(req.control.cache_level(), 0);
        assert_eq!(req.pdb.raw(), 0x1234_5672);
        assert_eq!(req.upper_pdb.raw(), 1);
        // A write without TRIGGER does not.
        assert_eq!(b.write(&v, MMU_INVALIDATE, Dword, 1).unwrap(), None);
        assert_eq!(b.snapshot().tlb_invalidations, 2);
        // A qword write covering the control register reports the trigger too; other
        // register writes report nothing.
        let req = tlb(b.write(&v, MMU_INVALIDATE, Qword, 0x8000_0002).unwrap());
        assert_eq!(req.control.all_pdb(), 1);
        assert_eq!(b.write(&v, regs::BOOT_0, Dword, 0).unwrap(), None);
        assert_eq!(b.write(&v, PRAMIN_BASE, Dword, 0).unwrap(), None);
        assert_eq!(b.unimplemented_stats().reads, 0);
    }

    #[test]
    fn bar_block_registers_per_generation() {
        let v = Vram::new(MIB).unwrap();
        use AccessWidth::*;
        let t = turing();
        assert_eq!(
            t.read(&v, regs::BAR2_BLOCK, Dword).unwrap(),
            u64::from(BAR2_BLOCK_RESET)
        );
        t.write(&v, regs::BAR1_BLOCK, Dword, 0x8000_0123).unwrap();
        assert_eq!(t.read(&v, regs::BAR1_BLOCK, Dword).unwrap(), 0x8000_0123);
        t.write(&v, regs::BIND_STATUS, Dword, 0xF).unwrap();
        assert_eq!(t.read(&v, regs::BIND_STATUS, Dword).unwrap(), 0);
        assert_eq!(
            t.read(&v, regs::BAR1_BLOCK_LOW_ADDR, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );

        let h = hopper();
        h.write(&v, regs::BAR2_BLOCK_LOW_ADDR, Dword, 0x1234_5E03)
            .unwrap();
        // PENDING/OUTSTANDING read 0 (bind complete); bits 8:2 are undefined.
        assert_eq!(
            h.read(&v, regs::BAR2_BLOCK_LOW_ADDR, Dword).unwrap(),
            0x1234_5E00
        );
        h.write(&v, regs::BAR2_BLOCK_HIGH_ADDR, Dword, 0xFFFF_FFFF)
            .unwrap();
        assert_eq!(
            h.read(&v, regs::BAR2_BLOCK_HIGH_ADDR, Dword).unwrap(),
            0xF_FFFF
        );
        let s = h.snapshot();
        assert_eq!(s.bar2_block_low.raw(), 0x1234_5E00);
        assert_eq!(
            regs::bar_block_instance_address(s.bar2_block_low, s.bar2_block_high),
            0xF_FFFF_1234_5000
        );
        assert_eq!(
            h.read(&v, regs::BAR1_BLOCK, Dword).unwrap(),
            u64::from(UNIMPLEMENTED_REGISTER_VALUE)
        );
    }

    #[test]
    fn reset_restores_power_on_values() {
        let v = Vram::new(MIB).unwrap();
        let t = turing();
        use AccessWidth::*;
        t.write(&v, PBUS_BAR0_WINDOW, Dword, 0x10).unwrap();
        t.write(&v, regs::BAR2_BLOCK, Dword, 0).unwrap();
        t.write(&v, MMU_INVALIDATE, Dword, 0x8000_0001).unwrap();
        t.write(&v, 0x200, Dword, 1).unwrap();
        t.reset();
        let s = t.snapshot();
        assert_eq!(s.window, 0);
        assert_eq!(s.bar2_block.raw(), BAR2_BLOCK_RESET);
        assert_eq!(s.mmu_invalidate.raw(), 0);
        assert_eq!(s.tlb_invalidations, 0);
        // Stats survive a reset until cleared.
        assert_eq!(t.unimplemented_stats().writes, 1);
        t.clear_unimplemented_stats();
        assert_eq!(t.unimplemented_stats(), UnimplementedStats::default());
    }

    #[test]
    fn fb_size_registers_are_read_only() {
        let v = Vram::new(MIB).unwrap();
        let b = turing();
        use AccessWidth::*;
        let range = b.read(&v, regs::LOCAL_MEMORY_RANGE, Dword).unwrap() as u32;
        assert_eq!(LocalMemoryRange::from_raw(range).size(), 24 << 30);
        assert_eq!(
            b.read(&v, regs::USABLE_FB_SIZE_IN_MB, Dword).unwrap(),
            23 * 1024
        );
        b.write(&v, regs::LOCAL_MEMORY_RANGE, Dword, 0).unwrap();
        b.write(&v, regs::USABLE_FB_SIZE_IN_MB, Word, 1).unwrap();
        assert_eq!(
            b.read(&v, regs::LOCAL_MEMORY_RANGE, Dword).unwrap() as u32,
            range
        );
        assert_eq!(
            b.read(&v, regs::USABLE_FB_SIZE_IN_MB, Dword).unwrap(),
            23 * 1024
        );
        let s = b.unimplemented_stats();
        assert_eq!((s.reads, s.writes), (0, 0));
    }

    #[test]
    fn falcon_writes_report_gsp_effects() {
        let v = Vram::new(MIB).unwrap();
        let b = turing();
        use crate::gsp::falcon::{GSP_CPUCTL, GSP_CPUCTL_ALIAS, GSP_ENGINE, GSP_MAILBOX0};
        use AccessWidth::*;
        let start = Some(Bar0Effect::Falcon(FalconAction::StartCpu));
        assert_eq!(b.write(&v, GSP_CPUCTL, Dword, 2).unwrap(), start);
        assert_eq!(b.write(&v, GSP_CPUCTL_ALIAS, Dword, 2).unwrap(), start);
        assert_eq!(b.write(&v, GSP_CPUCTL, Byte, 2).unwrap(), start);
        assert_eq!(b.read(&v, GSP_CPUCTL, Dword).unwrap(), 0x10);
        assert_eq!(
            b.write(&v, GSP_ENGINE, Dword, 1).unwrap(),
            Some(Bar0Effect::Falcon(FalconAction::Reset))
        );
        assert_eq!(b.write(&v, GSP_CPUCTL, Dword, 2).unwrap(), None);
        assert_eq!(b.write(&v, GSP_ENGINE, Dword, 0).unwrap(), None);
        // A qword write of both mailboxes.
        b.write(&v, GSP_MAILBOX0, Qword, 0x1_2345_6000).unwrap();
        assert_eq!(b.read(&v, GSP_MAILBOX0, Dword).unwrap(), 0x2345_6000);
        assert_eq!(b.read(&v, GSP_MAILBOX0 + 4, Dword).unwrap(), 1);
        b.reset();
        assert_eq!(b.read(&v, GSP_MAILBOX0, Qword).unwrap(), 0);
        assert_eq!(b.unimplemented_stats().reads, 0);
    }

    #[test]
    fn unimplemented_tracking_is_bounded_and_distinct() {
        let v = Vram::new(MIB).unwrap();
        let b = turing();
        for i in 0..100u64 {
            let off = 0x2_0000 + i * 4;
            b.read(&v, off, AccessWidth::Dword).unwrap();
            b.read(&v, off + 2, AccessWidth::Word).unwrap(); // same dword
            b.write(&v, off, AccessWidth::Byte, 1).unwrap();
        }
        let s = b.unimplemented_stats();
        assert_eq!(s.reads, 200);
        assert_eq!(s.writes, 100);
        assert_eq!(s.offsets.len(), UNIMPLEMENTED_OFFSETS_RECORDED);
        assert_eq!(s.offsets[0], 0x2_0000);
        assert_eq!(s.offsets[63], 0x2_0000 + 63 * 4);
        assert!(s.offsets_truncated);
        b.set_unimplemented_value(0);
        assert_eq!(b.read(&v, 0x2_0000, AccessWidth::Dword).unwrap(), 0);
        assert_eq!(b.read(&v, 0x2_0000, AccessWidth::Qword).unwrap(), 0);
        assert_eq!(b.unimplemented_stats().reads, 203);
    }
}
