//! Instance blocks: the page-directory-base fields (NV_RAMIN words 128–131, gpu-facts
//! 4.5) written through the PRAMIN cursor, and the BAR1 bind registers of both layouts
//! (gpu-facts 4.6).

use std::time::Duration;

use thiserror::Error;

use super::addr::{GpuVa, VramAddr};
use super::cursor::{CursorError, PraminCursor};
use super::page_table::format::PageTableFormat;
use super::page_table::TableTarget;
use super::regs::{
    self, Bar1Block, Bar1BlockHigh, Bar1BlockLow, BindStatus, MemTarget, RaminAdrLimitHi,
    RaminAdrLimitLo, RaminPageDirBaseHi, RaminPageDirBaseLo, RegError,
};
use crate::host_driver::addr::SysAddr;
use crate::host_gpu::{Generation, HostGpu};

/// Size and alignment of an instance block.
pub const INSTANCE_BLOCK_SIZE: u64 = 4096;
/// Byte offset of PAGE_DIR_BASE_LO (word 128).
pub const PAGE_DIR_BASE_LO: u64 = 0x200;
/// Byte offset of PAGE_DIR_BASE_HI (word 129).
pub const PAGE_DIR_BASE_HI: u64 = 0x204;
/// Byte offset of ADR_LIMIT_LO (word 130).
pub const ADR_LIMIT_LO: u64 = 0x208;
/// Byte offset of ADR_LIMIT_HI (word 131).
pub const ADR_LIMIT_HI: u64 = 0x20C;
/// Default BAR1 bind completion timeout.
pub const DEFAULT_BIND_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of instance-block writes and BAR binds.
#[derive(Debug, Error)]
pub enum InstanceError {
    /// The instance block address is not 4 KiB aligned.
    #[error("instance block {0} is not 4 KiB aligned")]
    Misaligned(VramAddr),
    /// The root directory address is not 4 KiB aligned.
    #[error("page directory base {0:?} is not 4 KiB aligned")]
    MisalignedPdb(TableTarget),
    /// The address limit is zero or not 4 KiB aligned.
    #[error("address-space end {0} must be non-zero and 4 KiB aligned")]
    BadLimit(GpuVa),
    /// The stored PAGE_DIR_BASE_TARGET is the unused value 1.
    #[error("PAGE_DIR_BASE_TARGET holds the unused value 1")]
    BadTarget,
    /// The instance block lies beyond what the bind register can point at.
    #[error("instance block {inst} is beyond the {bits}-bit reach of the BAR1 block register")]
    BindOutOfReach {
        /// The instance block.
        inst: VramAddr,
        /// Address bits the register holds.
        bits: u32,
    },
    /// The bind did not complete in time.
    #[error("BAR1 bind did not complete within {0:?}")]
    BindTimeout(Duration),
    /// VRAM access failed.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// A register access failed.
    #[error(transparent)]
    Register(#[from] RegError),
}

/// The PAGE_DIR_BASE fields of an instance block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageDirBase {
    /// Root page directory (4 KiB aligned).
    pub root: TableTarget,
    /// PAGE_DIR_BASE_VOL.
    pub vol: bool,
    /// USE_NEW_PT_FORMAT ("VER2").
    pub use_new_pt_format: bool,
    /// BIG_PAGE_SIZE = 64 KiB (else 128 KiB).
    pub big_page_64k: bool,
}

impl PageDirBase {
    /// The fields for tables of `format` rooted at `root` in VRAM: 64 KiB big pages;
    /// USE_NEW_PT_FORMAT for v2 (as nouveau's gp100 join) and clear for v3 (as RM does
    /// for Hopper's base PDB; v3 hardware evidently ignores it — **unconfirmed**).
    pub fn for_format(format: PageTableFormat, root: VramAddr) -> PageDirBase {
        PageDirBase {
            root: TableTarget::Vram(root),
            vol: false,
            use_new_pt_format: format == PageTableFormat::V2,
            big_page_64k: true,
        }
    }
}

/// An instance block in VRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceBlock {
    addr: VramAddr,
}

fn target_of(t: TableTarget) -> MemTarget {
    match t {
        TableTarget::Vram(_) => MemTarget::Vram,
        TableTarget::SysCoherent(_) => MemTarget::SysCoherent,
        TableTarget::SysNonCoherent(_) => MemTarget::SysNonCoherent,
    }
}

impl InstanceBlock {
    /// The instance block at `addr` (4 KiB aligned).
    pub fn new(addr: VramAddr) -> Result<InstanceBlock, InstanceError> {
        if !addr.is_aligned(INSTANCE_BLOCK_SIZE) {
            return Err(InstanceError::Misaligned(addr));
        }
        Ok(InstanceBlock { addr })
    }

    /// Its address.
    pub fn addr(&self) -> VramAddr {
        self.addr
    }

    fn word(&self, offset: u64) -> VramAddr {
        VramAddr::new(self.addr.raw() + offset)
    }

    /// Writes PAGE_DIR_BASE and ADR_LIMIT. `va_end` is the end of the address space
    /// (e.g. [`PageTableFormat::va_limit`]); ADR_LIMIT holds the last valid address
    /// `va_end - 1`, as nouveau's join writes `limit - 1` (the inclusive reading of the
    /// field is **unconfirmed** in gpu-facts). Other bits of words 128 and 130 (fault
    /// replay, bits below the fields) are preserved; the words go out limit first and
    /// PAGE_DIR_BASE_LO (with the target) last.
    pub fn write_page_dir(
        &self,
        cursor: &mut PraminCursor<'_>,
        pdb: &PageDirBase,
        va_end: GpuVa,
    ) -> Result<(), InstanceError> {
        let root = pdb.root.raw_addr();
        if root % 4096 != 0 {
            return Err(InstanceError::MisalignedPdb(pdb.root));
        }
        if va_end.raw() == 0 || !va_end.is_aligned(4096) {
            return Err(InstanceError::BadLimit(va_end));
        }
        let last = va_end.raw() - 1;
        let lo = RaminAdrLimitLo::from_raw(cursor.read_u32(self.word(ADR_LIMIT_LO))?)
            .with_limit_lo(((last >> 12) & 0xF_FFFF) as u32);
        cursor.write_u32(
            self.word(ADR_LIMIT_HI),
            RaminAdrLimitHi::from_raw((last >> 32) as u32).raw(),
        )?;
        cursor.write_u32(self.word(ADR_LIMIT_LO), lo.raw())?;
        cursor.write_u32(
            self.word(PAGE_DIR_BASE_HI),
            RaminPageDirBaseHi::from_raw((root >> 32) as u32).raw(),
        )?;
        let word = RaminPageDirBaseLo::from_raw(cursor.read_u32(self.word(PAGE_DIR_BASE_LO))?)
            .with_target(target_of(pdb.root).raw())
            .with_vol(pdb.vol.into())
            .with_use_new_pt_format(pdb.use_new_pt_format.into())
            .with_big_page_size(pdb.big_page_64k.into())
            .with_addr_lo(((root >> 12) & 0xF_FFFF) as u32);
        cursor.write_u32(self.word(PAGE_DIR_BASE_LO), word.raw())?;
        Ok(())
    }

    /// Reads PAGE_DIR_BASE and the address-space end (ADR_LIMIT + 1) back.
    pub fn read_page_dir(
        &self,
        cursor: &mut PraminCursor<'_>,
    ) -> Result<(PageDirBase, GpuVa), InstanceError> {
        let lo = RaminPageDirBaseLo::from_raw(cursor.read_u32(self.word(PAGE_DIR_BASE_LO))?);
        let hi = RaminPageDirBaseHi::from_raw(cursor.read_u32(self.word(PAGE_DIR_BASE_HI))?);
        let lim_lo = RaminAdrLimitLo::from_raw(cursor.read_u32(self.word(ADR_LIMIT_LO))?);
        let lim_hi = RaminAdrLimitHi::from_raw(cursor.read_u32(self.word(ADR_LIMIT_HI))?);
        let root = (u64::from(hi.addr_hi()) << 32) | (u64::from(lo.addr_lo()) << 12);
        let root = match MemTarget::from_raw(lo.target()) {
            Some(MemTarget::Vram) => TableTarget::Vram(VramAddr::new(root)),
            Some(MemTarget::SysCoherent) => TableTarget::SysCoherent(SysAddr::new(root)),
            Some(MemTarget::SysNonCoherent) => TableTarget::SysNonCoherent(SysAddr::new(root)),
            None => return Err(InstanceError::BadTarget),
        };
        let last =
            (u64::from(lim_hi.limit_hi()) << 32) | (u64::from(lim_lo.limit_lo()) << 12) | 0xFFF;
        Ok((
            PageDirBase {
                root,
                vol: lo.vol() != 0,
                use_new_pt_format: lo.use_new_pt_format() != 0,
                big_page_64k: lo.big_page_size() != 0,
            },
            GpuVa::new(last.wrapping_add(1)),
        ))
    }
}

/// BAR1 addressing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarMode {
    /// BAR1 offsets map VRAM 1:1 (the reset mode).
    Physical,
    /// BAR1 offsets are translated through the instance block's page tables.
    Virtual,
}

/// Binds BAR1 to the instance block `inst` (in VRAM) in `mode`, and waits (at most
/// `timeout`) for the bind to complete.
///
/// - Turing–Ada: one write of `BAR1_BLOCK` (0xB80F40: PTR = inst >> 12, TARGET VID,
///   MODE), then poll `BIND_STATUS` (0xB80F50) until BAR1 PENDING and OUTSTANDING are 0.
/// - Hopper–Blackwell: write `BAR1_BLOCK_LOW_ADDR` (0xB80F60: PTR = inst bits 31:12,
///   TARGET, MODE) then `BAR1_BLOCK_HIGH_ADDR` (0xB80F64: inst >> 32, triggers the
///   bind), then poll LOW until PENDING and OUTSTANDING are 0.
pub fn bind_bar1(
    gpu: &dyn HostGpu,
    inst: &InstanceBlock,
    mode: BarMode,
    timeout: Duration,
) -> Result<(), InstanceError> {
    let addr = inst.addr().raw();
    let mode = u32::from(mode == BarMode::Virtual);
    let target = MemTarget::Vram.raw();
    let done = match gpu.identity().generation {
        Generation::Turing | Generation::Ampere | Generation::Ada => {
            let ptr = addr >> 12;
            if !Bar1Block::PTR.fits(ptr.into()) {
                return Err(InstanceError::BindOutOfReach {
                    inst: inst.addr(),
                    bits: Bar1Block::PTR.width() + 12,
                });
            }
            regs::write_reg(
                gpu,
                Bar1Block::from_raw(0)
                    .with_ptr(ptr as u32)
                    .with_target(target)
                    .with_mode(mode),
            )?;
            regs::poll_until(timeout, || {
                let s: BindStatus = regs::read_reg(gpu)?;
                Ok::<_, InstanceError>(
                    (s.bar1_pending() == 0 && s.bar1_outstanding() == 0).then_some(()),
                )
            })?
        }
        Generation::Hopper | Generation::Blackwell => {
            let hi = addr >> 32;
            if !Bar1BlockHigh::PTR_HI.fits(hi.into()) {
                return Err(InstanceError::BindOutOfReach {
                    inst: inst.addr(),
                    bits: Bar1BlockHigh::PTR_HI.width() + 32,
                });
            }
            regs::write_reg(
                gpu,
                Bar1BlockLow::from_raw(0)
                    .with_ptr(((addr >> 12) & 0xF_FFFF) as u32)
                    .with_target(target)
                    .with_mode(mode),
            )?;
            regs::write_reg(gpu, Bar1BlockHigh::from_raw(0).with_ptr_hi(hi as u32))?;
            regs::poll_until(timeout, || {
                let s: Bar1BlockLow = regs::read_reg(gpu)?;
                Ok::<_, InstanceError>((s.pending() == 0 && s.outstanding() == 0).then_some(()))
            })?
        }
    };
    done.ok_or(InstanceError::BindTimeout(timeout))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::host_driver::pramin::Pramin;
    use crate::host_driver::test_support::StuckRegister;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn page_dir_base_words() {
        for (name, format) in [
            ("tu102-24g", PageTableFormat::V2),
            ("gh100-80g", PageTableFormat::V3),
        ] {
            let gpu = Arc::new(EmulatedHostGpu::by_name(name).unwrap());
            let mut pramin = Pramin::new(gpu.clone()).unwrap();
            let mut c = PraminCursor::new(&mut pramin);
            let inst = InstanceBlock::new(VramAddr::new(0x1_2345_6000)).unwrap();
            // Pre-existing fault-replay bits must survive.
            c.write_u32(VramAddr::new(0x1_2345_6200), 0x30).unwrap();
            let root = VramAddr::new(0x3_4567_8000);
            let pdb = PageDirBase::for_format(format, root);
            inst.write_page_dir(&mut c, &pdb, GpuVa::new(format.va_limit()))
                .unwrap();
            let w = |c: &mut PraminCursor<'_>, off: u64| {
                c.read_u32(VramAddr::new(0x1_2345_6000 + off)).unwrap()
            };
            let ver2 = if format == PageTableFormat::V2 {
                1 << 10
            } else {
                0
            };
            // target 0 (VID), vol 0, VER2, BIG_PAGE_SIZE 64K, addr bits 31:12 in place.
            assert_eq!(
                w(&mut c, 0x200),
                0x4567_8000 | 1 << 11 | ver2 | 0x30,
                "{name}"
            );
            assert_eq!(w(&mut c, 0x204), 0x3);
            let last = format.va_limit() - 1;
            assert_eq!(w(&mut c, 0x208), (last as u32) & 0xFFFF_F000);
            assert_eq!(w(&mut c, 0x20C), (last >> 32) as u32);
            let (back, end) = inst.read_page_dir(&mut c).unwrap();
            assert_eq!(back, pdb);
            assert_eq!(end.raw(), format.va_limit());
            assert!(InstanceBlock::new(VramAddr::new(0x800)).is_err());
            assert!(inst
                .write_page_dir(
                    &mut c,
                    &PageDirBase::for_format(format, VramAddr::new(0x10)),
                    GpuVa::new(1 << 40)
                )
                .is_err());
        }
    }

    #[test]
    fn bar1_bind_both_layouts() {
        let gpu = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
        let inst = InstanceBlock::new(VramAddr::new(0x5_0000_1000)).unwrap();
        bind_bar1(&*gpu, &inst, BarMode::Virtual, DEFAULT_BIND_TIMEOUT).unwrap();
        let snap = gpu.emulated().registers();
        assert_eq!(snap.bar1_block.raw(), 0x8000_0000 | 0x50_0001);

        let gpu = Arc::new(EmulatedHostGpu::by_name("gh100-80g").unwrap());
        let inst = InstanceBlock::new(VramAddr::new(0x12_3456_7000)).unwrap();
        bind_bar1(&*gpu, &inst, BarMode::Virtual, DEFAULT_BIND_TIMEOUT).unwrap();
        let snap = gpu.emulated().registers();
        assert_eq!(snap.bar1_block_low.raw(), 0x3456_7000 | 1 << 9);
        assert_eq!(snap.bar1_block_high.raw(), 0x12);
    }

    #[test]
    fn bind_errors() {
        let gpu = Arc::new(StuckRegister::new("gh100-80g", 0xB8_0F60, 1));
        let inst = InstanceBlock::new(VramAddr::new(0x1000)).unwrap();
        assert!(matches!(
            bind_bar1(&*gpu, &inst, BarMode::Virtual, Duration::from_millis(10)),
            Err(InstanceError::BindTimeout(_))
        ));
        let gpu = Arc::new(StuckRegister::new("tu102-24g", 0xB8_0F50, 2));
        assert!(matches!(
            bind_bar1(&*gpu, &inst, BarMode::Physical, Duration::from_millis(10)),
            Err(InstanceError::BindTimeout(_))
        ));
        let far = InstanceBlock::new(VramAddr::new(1 << 40)).unwrap();
        assert!(matches!(
            bind_bar1(&*gpu, &far, BarMode::Virtual, DEFAULT_BIND_TIMEOUT),
            Err(InstanceError::BindOutOfReach { .. })
        ));
    }
}
