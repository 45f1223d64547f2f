//! Instance blocks (NV_RAMIN): where a BAR binding's page-directory base and VA limit
//! live, gpu-facts 4.5 and 4.6.
//!
//! - Word 128 (0x200): PAGE_DIR_BASE_TARGET 1:0 (0 video, 2 sys coherent, 3 sys
//!   non-coherent), VOL 2, FAULT_REPLAY_TEX 4, FAULT_REPLAY_GCC 5, USE_NEW_PT_FORMAT 10,
//!   BIG_PAGE_SIZE 11, PAGE_DIR_BASE_LO 31:12 (address bits 31:12 in place).
//! - Word 129 (0x204): PAGE_DIR_BASE_HI = address bits 63:32.
//! - Words 130/131 (0x208/0x20C): ADR_LIMIT_LO 31:12 (in place) / ADR_LIMIT_HI.
//!
//! The page-table format comes from the chip generation, not from USE_NEW_PT_FORMAT
//! (gpu-facts: v3 hardware evidently ignores it; v1 tables are not modelled). Big pages are
//! always 64 KiB (Volta+ RM forces it), whatever BIG_PAGE_SIZE says.
//!
//! ADR_LIMIT (ASSUMPTION: its inclusiveness is not in gpu-facts): a limit of 0 means "not
//! set" and is not enforced; otherwise VAs above `limit | 0xFFF` fault.

use thiserror::Error;

use super::fault::Bar1Fault;
use crate::regs::{register, BarBlock, BarBlockHigh, BarBlockLow, BarMode, MemoryTarget};
use crate::vram::{Vram, VramAddr};

/// Byte offset of `PAGE_DIR_BASE_LO` (word 128) in an instance block.
pub const RAMIN_PAGE_DIR_BASE_LO: u64 = 0x200;
/// Byte offset of `PAGE_DIR_BASE_HI` (word 129).
pub const RAMIN_PAGE_DIR_BASE_HI: u64 = 0x204;
/// Byte offset of `ADR_LIMIT_LO` (word 130).
pub const RAMIN_ADR_LIMIT_LO: u64 = 0x208;
/// Byte offset of `ADR_LIMIT_HI` (word 131).
pub const RAMIN_ADR_LIMIT_HI: u64 = 0x20C;

register! {
    /// Instance block word 128 (0x200): page-directory base, low part, and flags.
    pub struct RaminPageDirBaseLo {
        /// PAGE_DIR_BASE_TARGET (0 video, 2 sys coherent, 3 sys non-coherent).
        1:0 => target, with_target;
        /// PAGE_DIR_BASE_VOL.
        2:2 => vol, with_vol;
        /// FAULT_REPLAY_TEX.
        4:4 => fault_replay_tex, with_fault_replay_tex;
        /// FAULT_REPLAY_GCC.
        5:5 => fault_replay_gcc, with_fault_replay_gcc;
        /// USE_NEW_PT_FORMAT ("VER2").
        10:10 => use_ver2_pt_format, with_use_ver2_pt_format;
        /// BIG_PAGE_SIZE (1 = 64 KiB, 0 = 128 KiB).
        11:11 => big_page_size, with_big_page_size;
        /// PAGE_DIR_BASE_LO: address bits 31:12.
        31:12 => address_lo, with_address_lo;
    }
}

register! {
    /// Instance block word 129 (0x204): page-directory base address bits 63:32.
    pub struct RaminPageDirBaseHi {
        /// PAGE_DIR_BASE_HI.
        31:0 => address_hi, with_address_hi;
    }
}

register! {
    /// Instance block word 130 (0x208): VA limit, low part.
    pub struct RaminAdrLimitLo {
        /// ADR_LIMIT_LO: limit bits 31:12.
        31:12 => limit_lo, with_limit_lo;
    }
}

register! {
    /// Instance block word 131 (0x20C): VA limit bits 63:32.
    pub struct RaminAdrLimitHi {
        /// ADR_LIMIT_HI.
        31:0 => limit_hi, with_limit_hi;
    }
}

/// Why a BAR binding could not be resolved to page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
pub enum InstanceError {
    /// The block register's TARGET is not video memory (raw TARGET value).
    #[error("the BAR block register targets memory {0} (not video memory)")]
    BlockNotInVideoMemory(u32),
    /// The instance block's PDB words lie outside VRAM.
    #[error("instance block at {0:#x} is outside VRAM")]
    OutsideVram(u64),
    /// PAGE_DIR_BASE_TARGET is not video memory (raw value).
    #[error("page directory base target {0} is not video memory")]
    PdbNotInVideoMemory(u32),
}

/// The translation state of BAR1 or BAR2 as its block register(s) set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarBinding {
    /// Physical (1:1) or virtual (page tables) mode.
    pub mode: BarMode,
    /// Raw TARGET of the instance block (0 video, 2/3 system memory).
    pub target_raw: u32,
    /// Instance block address.
    pub instance: u64,
}

impl BarBinding {
    /// The binding of a Turing–Ada `BARn_BLOCK` register (instance = PTR << 12).
    pub const fn from_block(block: BarBlock) -> BarBinding {
        BarBinding {
            mode: block.mode(),
            target_raw: block.target_raw(),
            instance: block.instance_address(),
        }
    }

    /// The binding of a Hopper+ `BARn_BLOCK_LOW_ADDR`/`_HIGH_ADDR` pair (instance =
    /// HIGH << 32 | LOW bits 31:12). The model applies the live register values; it does
    /// not latch the bind at the HIGH write.
    pub const fn from_low_high(low: BarBlockLow, high: BarBlockHigh) -> BarBinding {
        BarBinding {
            mode: low.mode(),
            target_raw: low.target_raw(),
            instance: crate::regs::bar_block_instance_address(low, high),
        }
    }
}

/// The page-table root of an instance block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstanceBlock {
    /// Address of the root page directory (PD3 for v2, PD4 for v3), in video memory.
    pub pdb: VramAddr,
    /// Highest VA page allowed (`limit | 0xFFF` is the last byte), or `None` when the
    /// ADR_LIMIT words are 0.
    pub address_limit: Option<u64>,
    /// Word 128 as read.
    pub page_dir_base_lo: RaminPageDirBaseLo,
}

impl InstanceBlock {
    /// Whether `va` is within the address limit.
    pub const fn allows(&self, va: u64) -> bool {
        match self.address_limit {
            None => true,
            Some(limit) => va <= limit | 0xFFF,
        }
    }

    /// [`Bar1Fault::AboveAddressLimit`] unless `va` is within the address limit.
    pub(crate) fn check_limit(&self, va: u64) -> Result<(), Bar1Fault> {
        if !self.allows(va) {
            return Err(Bar1Fault::AboveAddressLimit {
                va,
                limit: self.address_limit.unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }
}

/// Reads the page-directory base and address limit of the instance block `binding` points
/// at. The block is re-read on every call (the model does not latch binds).
pub fn read_instance_block(
    vram: &Vram,
    binding: &BarBinding,
) -> Result<InstanceBlock, InstanceError> {
    if binding.target_raw != MemoryTarget::VidMem.raw() {
        return Err(InstanceError::BlockNotInVideoMemory(binding.target_raw));
    }
    let word = |off: u64| -> Result<u32, InstanceError> {
        let addr = binding
            .instance
            .checked_add(off)
            .ok_or(InstanceError::OutsideVram(binding.instance))?;
        vram.read_u32(VramAddr::new(addr))
            .map_err(|_| InstanceError::OutsideVram(binding.instance))
    };
    let lo = RaminPageDirBaseLo::from_raw(word(RAMIN_PAGE_DIR_BASE_LO)?);
    let hi = RaminPageDirBaseHi::from_raw(word(RAMIN_PAGE_DIR_BASE_HI)?);
    let lim_lo = RaminAdrLimitLo::from_raw(word(RAMIN_ADR_LIMIT_LO)?);
    let lim_hi = RaminAdrLimitHi::from_raw(word(RAMIN_ADR_LIMIT_HI)?);
    if lo.target() != MemoryTarget::VidMem.raw() {
        return Err(InstanceError::PdbNotInVideoMemory(lo.target()));
    }
    let pdb = (u64::from(hi.address_hi()) << 32) | (u64::from(lo.address_lo()) << 12);
    let limit = (u64::from(lim_hi.limit_hi()) << 32) | (u64::from(lim_lo.limit_lo()) << 12);
    Ok(InstanceBlock {
        pdb: VramAddr::new(pdb),
        address_limit: (limit != 0).then_some(limit),
        page_dir_base_lo: lo,
    })
}
