//! Pure-data vocabulary about NVIDIA chips: generations, which BAR0 window register a
//! generation uses, its GPU MMU page-table version, and the PCI identity of a part.
//!
//! Facts come from the project fact sheet (`gpu-facts.md` sections 2.2, 2.4, 4.1, 4.6).

use thiserror::Error;

use crate::regs;

/// Errors of the chip vocabulary.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChipError {
    /// An architecture code (BOOT_0 / BOOT_42 ARCHITECTURE field) that is not one of the
    /// generations this crate knows.
    #[error(
        "unknown NVIDIA architecture code {0:#x} (known: 0x16 Turing .. 0x1b Blackwell GB20x)"
    )]
    UnknownArchitecture(u32),
}

/// An NVIDIA GPU generation (architecture family) the emulator can model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Generation {
    /// Turing (TU10x), architecture code 0x16.
    Turing,
    /// Ampere (GA10x), architecture code 0x17.
    Ampere,
    /// Ada Lovelace (AD10x), architecture code 0x19.
    Ada,
    /// Hopper (GH100), architecture code 0x18.
    Hopper,
    /// Blackwell (GB10x architecture code 0x1A, GB20x architecture code 0x1B).
    Blackwell,
}

impl Generation {
    /// Every generation, oldest first.
    pub const ALL: [Generation; 5] = [
        Generation::Turing,
        Generation::Ampere,
        Generation::Ada,
        Generation::Hopper,
        Generation::Blackwell,
    ];

    /// Human-readable name ("Turing", "Ampere", ...).
    pub const fn name(self) -> &'static str {
        match self {
            Generation::Turing => "Turing",
            Generation::Ampere => "Ampere",
            Generation::Ada => "Ada",
            Generation::Hopper => "Hopper",
            Generation::Blackwell => "Blackwell",
        }
    }

    /// Maps a BOOT_0/BOOT_42 architecture code to its generation (gpu-facts 2.2:
    /// TU 0x16, GA 0x17, GH 0x18, AD 0x19, GB10x 0x1A, GB20x 0x1B).
    pub const fn from_architecture(arch: u32) -> Result<Generation, ChipError> {
        match arch {
            0x16 => Ok(Generation::Turing),
            0x17 => Ok(Generation::Ampere),
            0x18 => Ok(Generation::Hopper),
            0x19 => Ok(Generation::Ada),
            0x1A | 0x1B => Ok(Generation::Blackwell),
            other => Err(ChipError::UnknownArchitecture(other)),
        }
    }

    /// Which BAR0 window (PRAMIN base) register this generation uses (gpu-facts 2.4).
    pub const fn window_register(self) -> WindowRegisterKind {
        match self {
            Generation::Turing | Generation::Ampere | Generation::Ada => {
                WindowRegisterKind::Pbus0x1700
            }
            Generation::Hopper | Generation::Blackwell => WindowRegisterKind::Xal0x10FD40,
        }
    }

    /// Width in bits of the window register's BASE field (the VRAM address >> 16).
    ///
    /// Turing–Ada: 24 (bits 23:0, 40-bit addresses); Hopper: 22 (bits 21:0, 38-bit);
    /// Blackwell: 23 (bits 22:0, 39-bit). For GB20x the width is not in the published
    /// header and is taken to equal GB10x (gpu-facts 2.4, unconfirmed).
    pub const fn window_base_bits(self) -> u32 {
        match self {
            Generation::Turing | Generation::Ampere | Generation::Ada => 24,
            Generation::Hopper => 22,
            Generation::Blackwell => 23,
        }
    }

    /// The first VRAM address the window BASE field can no longer express
    /// (`1 << (window_base_bits + 16)`).
    pub const fn window_reach(self) -> u64 {
        1u64 << (self.window_base_bits() + regs::WINDOW_BASE_SHIFT)
    }

    /// GPU MMU page-table format: v2 before Hopper, v3 on Hopper and later (gpu-facts 4.1).
    pub const fn mmu_version(self) -> MmuVersion {
        match self {
            Generation::Turing | Generation::Ampere | Generation::Ada => MmuVersion::V2,
            Generation::Hopper | Generation::Blackwell => MmuVersion::V3,
        }
    }

    /// Which BAR1/BAR2 block (bind) register layout this generation has (gpu-facts 4.6).
    pub const fn bar_block_registers(self) -> BarBlockRegisterKind {
        match self {
            Generation::Turing | Generation::Ampere | Generation::Ada => {
                BarBlockRegisterKind::Single0xB80F40
            }
            Generation::Hopper | Generation::Blackwell => BarBlockRegisterKind::LowHigh0xB80F60,
        }
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The BAR0 window register that positions the 1 MiB PRAMIN aperture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowRegisterKind {
    /// `NV_PBUS_BAR0_WINDOW` at BAR0 + 0x1700 (Maxwell–Ada): BASE in 64 KiB units at bits
    /// 23:0 and TARGET at bits 25:24.
    Pbus0x1700,
    /// `NV_XAL_EP_ZB_BAR0_WINDOW` at BAR0 + 0x10FD40 (Hopper, Blackwell): BASE only, the
    /// target is always video memory.
    Xal0x10FD40,
}

impl WindowRegisterKind {
    /// BAR0 offset of the register.
    pub const fn offset(self) -> u64 {
        match self {
            WindowRegisterKind::Pbus0x1700 => regs::PBUS_BAR0_WINDOW,
            WindowRegisterKind::Xal0x10FD40 => regs::XAL_BAR0_WINDOW,
        }
    }

    /// Whether the register has a TARGET field (only the PBUS one does).
    pub const fn has_target(self) -> bool {
        matches!(self, WindowRegisterKind::Pbus0x1700)
    }
}

/// Layout of the BAR1/BAR2 block (bind) registers in the VF-private register space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarBlockRegisterKind {
    /// Turing–Ada: one 32-bit block register per BAR (0xB80F40 BAR1, 0xB80F48 BAR2) plus a
    /// bind-status register at 0xB80F50.
    Single0xB80F40,
    /// Hopper–Blackwell: LOW/HIGH pairs (0xB80F60/0xB80F64 BAR1, 0xB80F70/0xB80F74 BAR2).
    LowHigh0xB80F60,
}

/// GPU MMU page-table format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmuVersion {
    /// MMU v2: 49-bit VA, 5 levels (Pascal–Ada).
    V2,
    /// MMU v3: 57-bit VA, 6 levels (Hopper and later).
    V3,
}

/// PCI vendor id of NVIDIA.
pub const NVIDIA_VENDOR_ID: u16 = 0x10DE;
/// PCI class code of a VGA-compatible display controller (GeForce / Titan parts).
pub const CLASS_VGA: u32 = 0x03_00_00;
/// PCI class code of a 3D controller (datacenter parts without a display engine).
pub const CLASS_3D_CONTROLLER: u32 = 0x03_02_00;

/// The PCI identity a part presents in config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciIdentity {
    /// Vendor id (0x10DE for NVIDIA).
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// 24-bit class code: `base_class << 16 | sub_class << 8 | prog_if`.
    pub class_code: u32,
    /// Revision id.
    pub revision: u8,
}

impl PciIdentity {
    /// Base class (bits 23:16 of the class code), e.g. 0x03 display controller.
    pub const fn base_class(&self) -> u8 {
        ((self.class_code >> 16) & 0xFF) as u8
    }

    /// Sub-class (bits 15:8 of the class code), e.g. 0x00 VGA, 0x02 3D.
    pub const fn sub_class(&self) -> u8 {
        ((self.class_code >> 8) & 0xFF) as u8
    }

    /// Programming interface (bits 7:0 of the class code).
    pub const fn prog_if(&self) -> u8 {
        (self.class_code & 0xFF) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_register_per_generation() {
        for g in [Generation::Turing, Generation::Ampere, Generation::Ada] {
            assert_eq!(g.window_register(), WindowRegisterKind::Pbus0x1700);
            assert_eq!(g.window_register().offset(), 0x1700);
            assert!(g.window_register().has_target());
            assert_eq!(g.window_base_bits(), 24);
            assert_eq!(g.window_reach(), 1 << 40);
            assert_eq!(g.mmu_version(), MmuVersion::V2);
            assert_eq!(
                g.bar_block_registers(),
                BarBlockRegisterKind::Single0xB80F40
            );
        }
        for g in [Generation::Hopper, Generation::Blackwell] {
            assert_eq!(g.window_register(), WindowRegisterKind::Xal0x10FD40);
            assert_eq!(g.window_register().offset(), 0x10FD40);
            assert!(!g.window_register().has_target());
            assert_eq!(g.mmu_version(), MmuVersion::V3);
            assert_eq!(
                g.bar_block_registers(),
                BarBlockRegisterKind::LowHigh0xB80F60
            );
        }
        assert_eq!(Generation::Hopper.window_base_bits(), 22);
        assert_eq!(Generation::Hopper.window_reach(), 1 << 38);
        assert_eq!(Generation::Blackwell.window_base_bits(), 23);
        assert_eq!(Generation::Blackwell.window_reach(), 1 << 39);
    }

    #[test]
    fn architecture_codes() {
        assert_eq!(Generation::from_architecture(0x16), Ok(Generation::Turing));
        assert_eq!(Generation::from_architecture(0x17), Ok(Generation::Ampere));
        assert_eq!(Generation::from_architecture(0x18), Ok(Generation::Hopper));
        assert_eq!(Generation::from_architecture(0x19), Ok(Generation::Ada));
        assert_eq!(
            Generation::from_architecture(0x1A),
            Ok(Generation::Blackwell)
        );
        assert_eq!(
            Generation::from_architecture(0x1B),
            Ok(Generation::Blackwell)
        );
        assert_eq!(
            Generation::from_architecture(0x14),
            Err(ChipError::UnknownArchitecture(0x14))
        );
        assert!(ChipError::UnknownArchitecture(0x14)
            .to_string()
            .contains("0x14"));
    }

    #[test]
    fn class_code_parts() {
        let id = PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            device_id: 0x2330,
            subsystem_vendor_id: 0x10DE,
            subsystem_id: 0x16C1,
            class_code: CLASS_3D_CONTROLLER,
            revision: 0xA1,
        };
        assert_eq!(id.base_class(), 0x03);
        assert_eq!(id.sub_class(), 0x02);
        assert_eq!(id.prog_if(), 0x00);
        assert_eq!(Generation::Ada.to_string(), "Ada");
    }
}
