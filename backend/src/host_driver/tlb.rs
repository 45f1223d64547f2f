//! GPU TLB invalidation through the MMU invalidate registers (gpu-facts 4.7; Turing
//! through Blackwell use the same `0xB830A0/A4/B0` registers).
//!
//! Protocol: write the PDB (unless invalidating for all PDBs), write the control register
//! with TRIGGER set, then poll until TRIGGER reads back 0, for at most a timeout.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::page_table::TableTarget;
use super::regs::{self, MmuInvalidate, MmuInvalidatePdb, MmuInvalidateUpperPdb, RegError};
use crate::host_gpu::HostGpu;

/// Default completion timeout (nouveau and nova wait 2 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of TLB invalidation.
#[derive(Debug, Error)]
pub enum TlbError {
    /// The PDB cannot be expressed in the PDB registers (not 4 KiB aligned, or beyond
    /// 60 bits).
    #[error("PDB {0:?} is not 4 KiB aligned or too large for the invalidate registers")]
    BadPdb(TableTarget),
    /// TRIGGER did not clear in time.
    #[error("TLB invalidate did not complete within {0:?}")]
    Timeout(Duration),
    /// A register access failed.
    #[error(transparent)]
    Register(#[from] RegError),
}

/// Which translations to invalidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateScope {
    /// Every VA of the address space whose root directory is this PDB.
    Pdb(TableTarget),
    /// Every VA of every address space (ALL_PDB).
    AllPdbs,
}

/// Issues TLB invalidates on one GPU.
pub struct Tlb {
    gpu: Arc<dyn HostGpu>,
    timeout: Duration,
}

impl std::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlb")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Tlb {
    /// Invalidation on `gpu` with [`DEFAULT_TIMEOUT`].
    pub fn new(gpu: Arc<dyn HostGpu>) -> Tlb {
        Tlb {
            gpu,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same with another completion timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Tlb {
        self.timeout = timeout;
        self
    }

    /// The PDB register pair for `pdb`.
    pub fn pdb_registers(
        pdb: TableTarget,
    ) -> Result<(MmuInvalidatePdb, MmuInvalidateUpperPdb), TlbError> {
        let addr = pdb.raw_addr();
        let hi = addr >> 40;
        if addr % 4096 != 0 || !MmuInvalidateUpperPdb::ADDR.fits(hi.into()) {
            return Err(TlbError::BadPdb(pdb));
        }
        let aperture = u32::from(!pdb.is_vram()); // 0 VID, 1 SYS
        Ok((
            MmuInvalidatePdb::from_raw(0)
                .with_aperture(aperture)
                .with_addr(((addr >> 12) & 0x0FFF_FFFF) as u32),
            MmuInvalidateUpperPdb::from_raw(0).with_addr(hi as u32),
        ))
    }

    /// The control value used for `scope`: ALL_VA, all cache levels, TRIGGER (plus ALL_PDB
    /// for [`InvalidateScope::AllPdbs`]).
    pub fn control(scope: InvalidateScope) -> MmuInvalidate {
        MmuInvalidate::from_raw(0)
            .with_all_va(1)
            .with_all_pdb(u32::from(scope == InvalidateScope::AllPdbs))
            .with_cache_level(0)
            .with_trigger(1)
    }

    /// Invalidates every translation of `scope` and waits for completion.
    pub fn invalidate(&self, scope: InvalidateScope) -> Result<(), TlbError> {
        let gpu = &*self.gpu;
        if let InvalidateScope::Pdb(pdb) = scope {
            let (lo, hi) = Self::pdb_registers(pdb)?;
            regs::write_reg(gpu, lo)?;
            regs::write_reg(gpu, hi)?;
        }
        regs::write_reg(gpu, Self::control(scope))?;
        let done = regs::poll_until(self.timeout, || {
            let r: MmuInvalidate = regs::read_reg(gpu)?;
            Ok::<_, TlbError>((r.trigger() == 0).then_some(()))
        })?;
        done.ok_or(TlbError::Timeout(self.timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_driver::addr::{SysAddr, VramAddr};
    use crate::host_driver::test_support::StuckRegister;
    use crate::host_gpu::emulated::EmulatedHostGpu;

    #[test]
    fn pdb_register_values() {
        let pdb = TableTarget::Vram(VramAddr::new(0x12_3456_7000));
        let (lo, hi) = Tlb::pdb_registers(pdb).unwrap();
        // facts 4.7: lo = pdb >> 8 | aperture << 1; hi = pdb >> 40.
        assert_eq!(u64::from(lo.raw()), (0x12_3456_7000u64 >> 8) & 0xFFFF_FFFF);
        assert_eq!(hi.raw(), 0);
        let pdb = TableTarget::SysCoherent(SysAddr::new(0xAB_CDEF_0123_4000));
        let (lo, hi) = Tlb::pdb_registers(pdb).unwrap();
        assert_eq!(lo.raw(), ((0xAB_CDEF_0123_4000u64 >> 8) as u32 & !0xF) | 2);
        assert_eq!(hi.raw(), 0xABCD);
        assert!(Tlb::pdb_registers(TableTarget::Vram(VramAddr::new(0x800))).is_err());
        assert!(Tlb::pdb_registers(TableTarget::Vram(VramAddr::new(1 << 62))).is_err());
        assert_eq!(Tlb::control(InvalidateScope::AllPdbs).raw(), 0x8000_0003);
    }

    #[test]
    fn invalidate_on_the_emulated_gpu() {
        for name in ["tu102-24g", "gh100-80g"] {
            let gpu = Arc::new(EmulatedHostGpu::by_name(name).unwrap());
            let tlb = Tlb::new(gpu.clone());
            let pdb = VramAddr::new(0x2_0000_3000);
            tlb.invalidate(InvalidateScope::Pdb(TableTarget::Vram(pdb)))
                .unwrap();
            let snap = gpu.emulated().registers();
            assert_eq!(snap.tlb_invalidations, 1, "{name}");
            assert_eq!(u64::from(snap.mmu_invalidate_pdb.raw()), pdb.raw() >> 8);
            assert_eq!(snap.mmu_invalidate_upper_pdb.raw(), 0);
            assert_eq!(snap.mmu_invalidate.raw() & 1, 1, "ALL_VA");
            tlb.invalidate(InvalidateScope::AllPdbs).unwrap();
            assert_eq!(gpu.emulated().registers().tlb_invalidations, 2);
        }
    }

    #[test]
    fn a_trigger_that_never_clears_times_out() {
        let gpu = Arc::new(StuckRegister::new("tu102-24g", 0xB8_30B0, 0x8000_0000));
        let tlb = Tlb::new(gpu).with_timeout(Duration::from_millis(20));
        let err = tlb.invalidate(InvalidateScope::AllPdbs).unwrap_err();
        assert!(matches!(err, TlbError::Timeout(_)), "{err}");
    }
}
