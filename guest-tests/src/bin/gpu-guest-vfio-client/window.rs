//! The chip generation from NV_PMC_BOOT_0 and the layout of its BAR0 window register, stated
//! here from `gpu-facts.md` independently of the backend under test.
//!
//! | generation | BOOT_0 ARCHITECTURE (28:24) | window register | BASE (addr >> 16) | TARGET |
//! |---|---|---|---|---|
//! | Turing, Ampere, Ada | 0x16, 0x17, 0x19 | NV_PBUS_BAR0_WINDOW, 0x1700 | 23:0 | 25:24, 0 = VID_MEM |
//! | Hopper | 0x18 | NV_XAL_EP_ZB_BAR0_WINDOW, 0x10FD40 | 21:0 | none |
//! | Blackwell GB10x, GB20x | 0x1A, 0x1B | same, 0x10FD40 | 22:0 (GB20x width **unconfirmed**, taken as GB10x) | none |

use gpu_backend::host_driver::regs::Field;

/// NV_PMC_BOOT_0: BAR0 offset.
pub const BOOT_0: u64 = 0x0;
/// NV_PMC_BOOT_0 ARCHITECTURE field.
const BOOT_0_ARCHITECTURE: Field = Field::new(28, 24);
/// BAR0 offset of the PRAMIN aperture: 1 MiB of VRAM from the window base.
pub const APERTURE: u64 = 0x70_0000;
/// Size of the aperture.
pub const APERTURE_LEN: u64 = 1 << 20;
/// The window moves in steps of 64 KiB (BASE is the address >> 16).
pub const WINDOW_STEP: u64 = 1 << 16;

/// A GPU generation with a known window register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// TU10x.
    Turing,
    /// GA10x.
    Ampere,
    /// AD10x.
    Ada,
    /// GH100.
    Hopper,
    /// GB10x and GB20x.
    Blackwell,
}

impl Generation {
    /// The ARCHITECTURE field of `boot0`.
    pub fn architecture(boot0: u32) -> u32 {
        BOOT_0_ARCHITECTURE.get(u128::from(boot0)) as u32
    }

    /// The generation of a BOOT_0 value, if known.
    pub fn from_boot0(boot0: u32) -> Option<Generation> {
        Some(match Self::architecture(boot0) {
            0x16 => Generation::Turing,
            0x17 => Generation::Ampere,
            0x19 => Generation::Ada,
            0x18 => Generation::Hopper,
            0x1A | 0x1B => Generation::Blackwell,
            _ => return None,
        })
    }

    /// Its name as `gpu-backend inspect` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Generation::Turing => "Turing",
            Generation::Ampere => "Ampere",
            Generation::Ada => "Ada",
            Generation::Hopper => "Hopper",
            Generation::Blackwell => "Blackwell",
        }
    }

    /// The window register of this generation.
    pub fn window(self) -> WindowRegister {
        match self {
            Generation::Turing | Generation::Ampere | Generation::Ada => WindowRegister {
                offset: 0x1700,
                base: Field::new(23, 0),
                target: Some(Field::new(25, 24)),
            },
            Generation::Hopper => WindowRegister {
                offset: 0x10_FD40,
                base: Field::new(21, 0),
                target: None,
            },
            Generation::Blackwell => WindowRegister {
                offset: 0x10_FD40,
                base: Field::new(22, 0),
                target: None,
            },
        }
    }
}

/// The BAR0 window register of one generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRegister {
    /// BAR0 offset.
    pub offset: u64,
    /// BASE: the window's VRAM address >> 16.
    pub base: Field,
    /// TARGET (Turing–Ada; 0 = VID_MEM), absent on Hopper and Blackwell.
    pub target: Option<Field>,
}

impl WindowRegister {
    /// The register value pointing the window at VRAM address `addr` (64 KiB aligned) with
    /// TARGET = VID_MEM, or `None` if `addr` does not fit BASE.
    pub fn value_for(self, addr: u64) -> Option<u32> {
        let base = u128::from(addr / WINDOW_STEP);
        if addr % WINDOW_STEP != 0 || !self.base.fits(base) {
            return None;
        }
        // TARGET = 0 (VID_MEM): nothing to set.
        Some(self.base.set(0, base) as u32)
    }

    /// The largest window base (BASE all ones), as a VRAM address.
    pub fn max_base(self) -> u64 {
        (self.base.max() as u64) * WINDOW_STEP
    }

    /// The bits that latch (what the register reads back).
    pub fn defined_mask(self) -> u32 {
        (self.base.mask() | self.target.map_or(0, |t| t.mask())) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_from_boot0() {
        // TU102 A1 and GH100 A1 as the profiles present them.
        assert_eq!(
            Generation::from_boot0(0x1620_00a1),
            Some(Generation::Turing)
        );
        assert_eq!(
            Generation::from_boot0(0x1800_00a1),
            Some(Generation::Hopper)
        );
        assert_eq!(
            Generation::from_boot0(0x1b20_00a1),
            Some(Generation::Blackwell)
        );
        assert_eq!(Generation::from_boot0(0x1400_00a1), None);
        assert_eq!(Generation::architecture(0x1920_00a1), 0x19);
    }

    #[test]
    fn window_values() {
        let tu = Generation::Turing.window();
        assert_eq!(tu.offset, 0x1700);
        assert_eq!(tu.value_for(0x123_0000), Some(0x123));
        assert_eq!(tu.value_for(0x123_4000), None, "not 64 KiB aligned");
        assert_eq!(tu.defined_mask(), 0x03ff_ffff);
        assert_eq!(tu.max_base(), 0xff_ffff << 16);
        let gh = Generation::Hopper.window();
        assert_eq!(gh.offset, 0x10_FD40);
        assert_eq!(gh.defined_mask(), 0x003f_ffff);
        assert_eq!(gh.value_for(1 << 38), None, "past the 38-bit BASE");
    }
}
