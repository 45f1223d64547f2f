//! [`Liveness`]: noticing that a GPU stopped answering.
//!
//! A PCIe device that fell off the bus (surprise removal, a fatal error, power loss) reads
//! all ones. A register can legitimately read 0xFFFFFFFF, so an all-ones read is confirmed
//! by re-reading `NV_PMC_BOOT_0`, which never reads all ones on a live GPU (Open RM's
//! "fallen off the bus" check, gpu-facts 5). Once confirmed the device is lost for good:
//! every later access fails at once with [`HostGpuError::DeviceLost`] (no access waits on
//! a dead device), and the loss is logged once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::host_gpu::{AccessWidth, HostGpuError};

use super::address::PciAddress;

/// Whether one GPU still answers.
#[derive(Debug)]
pub struct Liveness {
    address: PciAddress,
    lost: AtomicBool,
}

impl Liveness {
    /// A device believed alive.
    pub fn new(address: PciAddress) -> Liveness {
        Liveness {
            address,
            lost: AtomicBool::new(false),
        }
    }

    /// Whether the device was found lost.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The error every access of a lost device gets.
    pub fn lost_error(&self) -> HostGpuError {
        HostGpuError::DeviceLost(format!(
            "GPU {} stopped answering (NV_PMC_BOOT_0 reads 0xffffffff) and is no longer driven",
            self.address
        ))
    }

    /// `Ok` while the device is alive.
    pub fn check(&self) -> Result<(), HostGpuError> {
        if self.is_lost() {
            Err(self.lost_error())
        } else {
            Ok(())
        }
    }

    /// Vets `value`, just read with `width`: an all-ones dword or qword is confirmed with
    /// `read_boot0`; if BOOT_0 reads all ones too (or cannot be read), the device is lost.
    pub fn vet_read(
        &self,
        value: u64,
        width: AccessWidth,
        read_boot0: impl FnOnce() -> Option<u32>,
    ) -> Result<u64, HostGpuError> {
        let all_ones = match width {
            AccessWidth::Dword => value == u64::from(u32::MAX),
            AccessWidth::Qword => value == u64::MAX,
            AccessWidth::Byte | AccessWidth::Word => false,
        };
        if all_ones && read_boot0().is_none_or(|boot0| boot0 == u32::MAX) {
            if !self.lost.swap(true, Ordering::AcqRel) {
                log::error!(
                    "GPU {} stopped answering (NV_PMC_BOOT_0 reads 0xffffffff): it is no \
                     longer served; its guests get ENODEV",
                    self.address
                );
            }
            return Err(self.lost_error());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness::new("0000:01:00.0".parse().unwrap())
    }

    #[test]
    fn an_all_ones_register_on_a_live_gpu_is_just_a_value() {
        let l = liveness();
        let v = l
            .vet_read(0xFFFF_FFFF, AccessWidth::Dword, || Some(0x1620_00A1))
            .unwrap();
        assert_eq!(v, 0xFFFF_FFFF);
        assert!(!l.is_lost());
        assert!(l.check().is_ok());
    }

    #[test]
    fn all_ones_confirmed_by_boot0_loses_the_device_for_good() {
        let l = liveness();
        let mut rereads = 0;
        let e = l
            .vet_read(u64::from(u32::MAX), AccessWidth::Dword, || {
                rereads += 1;
                Some(u32::MAX)
            })
            .unwrap_err();
        assert_eq!(rereads, 1);
        assert!(matches!(e, HostGpuError::DeviceLost(_)));
        assert_eq!(e.errno(), libc::ENODEV);
        assert!(e.to_string().contains("0000:01:00.0"), "{e}");
        assert!(l.is_lost());
        assert!(l.check().is_err());
        // Later reads fail even if they look fine: nothing more is trusted from it.
        assert!(l.check().is_err());
    }

    #[test]
    fn only_full_width_all_ones_reads_are_suspicious() {
        let l = liveness();
        let boom = || -> Option<u32> { panic!("BOOT_0 must not be re-read") };
        assert_eq!(l.vet_read(0xFF, AccessWidth::Byte, boom).unwrap(), 0xFF);
        assert_eq!(l.vet_read(0xFFFF, AccessWidth::Word, boom).unwrap(), 0xFFFF);
        assert_eq!(
            l.vet_read(0xFFFF_FFFF, AccessWidth::Qword, boom).unwrap(),
            0xFFFF_FFFF
        );
        assert!(l.vet_read(u64::MAX, AccessWidth::Qword, || None).is_err());
    }
}
