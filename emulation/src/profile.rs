//! Chip profiles: the fixed table of emulated parts, chosen by name (`tu102-24g`, ...).
//!
//! A profile says which chip the emulated GPU claims to be (BOOT_0/BOOT_42, PCI ids), how
//! much VRAM it has (the real, non-power-of-two size a board reports), and the BAR layout of
//! the real part. BAR sizes here are REAL lengths; padding to a power of two is the
//! presentation layer's job.
//!
//! Values come from `gpu-facts.md`; any value not found there is marked
//! "ASSUMPTION" in a comment next to it.

use thiserror::Error;

use crate::chip::{Generation, PciIdentity, CLASS_3D_CONTROLLER, CLASS_VGA, NVIDIA_VENDOR_ID};
use crate::regs::{Boot0, Boot42, BAR0_SIZE};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Size of the instance-memory BAR ("NVIDIA BAR2", PCI BAR3/BAR4): 32 MiB (gpu-facts 2.1).
pub const INSTANCE_BAR_SIZE: u64 = 32 * MIB;

/// Errors of profile lookup.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProfileError {
    /// No profile has the requested name.
    #[error("unknown chip profile `{requested}`; valid profiles: {}", ChipProfile::names().join(", "))]
    UnknownProfile {
        /// The name that was asked for.
        requested: String,
    },
}

/// What a BAR exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarRole {
    /// The 16 MiB register BAR (BAR0): trapped, served by the register model.
    Registers,
    /// A window onto device memory: BAR offset `o` is VRAM address `vram_offset + o`.
    Vram {
        /// VRAM address of the BAR's first byte.
        vram_offset: u64,
    },
    /// The instance-memory aperture ("NVIDIA BAR2"), backed by its own memory.
    InstanceMemory,
}

/// One PCI memory BAR of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BarSpec {
    /// First PCI BAR slot the BAR occupies (equal to its VFIO region index). A 64-bit BAR
    /// also occupies slot `index + 1`.
    pub index: u8,
    /// What the BAR exposes.
    pub role: BarRole,
    /// Real length in bytes (not padded to a power of two).
    pub size: u64,
    /// Whether this is a 64-bit BAR (occupies two slots).
    pub is_64bit: bool,
    /// Whether the BAR is prefetchable.
    pub prefetchable: bool,
}

impl BarSpec {
    /// Number of BAR slots used: 2 for a 64-bit BAR, 1 otherwise.
    pub const fn slot_count(&self) -> u8 {
        if self.is_64bit {
            2
        } else {
            1
        }
    }

    /// The smallest power of two ≥ `size`: the length a PCI BAR must have. `None` on
    /// overflow (never for the built-in profiles).
    pub const fn padded_size(&self) -> Option<u64> {
        self.size.checked_next_power_of_two()
    }
}

/// A chip the emulator can pretend to be. All profiles live in a `'static` table; see
/// [`ChipProfile::all`] and [`ChipProfile::by_name`].
#[derive(Debug, PartialEq, Eq)]
pub struct ChipProfile {
    name: &'static str,
    human_name: &'static str,
    generation: Generation,
    boot0: Boot0,
    boot42: Boot42,
    pci: PciIdentity,
    vram_size: u64,
    usable_vram_size: u64,
    bars: &'static [BarSpec],
}

/// BAR0 of Turing/Ampere parts: 32-bit, non-prefetchable, slot 0.
const BAR0_32: BarSpec = BarSpec {
    index: 0,
    role: BarRole::Registers,
    size: BAR0_SIZE,
    is_64bit: false,
    prefetchable: false,
};

/// BAR0 of Hopper/Blackwell parts: 64-bit prefetchable at slots 0-1, as in the H100 SXM5
/// config dump (gpu-facts 2.1: BAR0 dword 0x0200000C).
const BAR0_64: BarSpec = BarSpec {
    index: 0,
    role: BarRole::Registers,
    size: BAR0_SIZE,
    is_64bit: true,
    prefetchable: true,
};

/// A 64-bit prefetchable VRAM aperture of `size` bytes at `index`, starting at VRAM 0.
const fn vram_bar(index: u8, size: u64) -> BarSpec {
    BarSpec {
        index,
        role: BarRole::Vram { vram_offset: 0 },
        size,
        is_64bit: true,
        prefetchable: true,
    }
}

/// The 32 MiB 64-bit prefetchable instance-memory BAR at `index`.
const fn instance_bar(index: u8) -> BarSpec {
    BarSpec {
        index,
        role: BarRole::InstanceMemory,
        size: INSTANCE_BAR_SIZE,
        is_64bit: true,
        prefetchable: true,
    }
}

/// Revision id of an "A1" part, used for every profile. ASSUMPTION except for GH100, whose
/// 0xA1 comes from the config dump in gpu-facts 2.1.
const REV_A1: u8 = 0xA1;

// --- tu102-24g -----------------------------------------------------------------------
/// ASSUMPTION: 24,220 MiB is the usable size a 24 GB TU102 board is taken to report.
const TU102_VRAM: u64 = 24_220 * MIB;
const TU102_BARS: &[BarSpec] = &[BAR0_32, vram_bar(1, TU102_VRAM), instance_bar(3)];

// --- ga100-80g -----------------------------------------------------------------------
/// ASSUMPTION: 81,920 MiB (80 GiB) usable on an A100 80GB.
const GA100_VRAM: u64 = 81_920 * MIB;
const GA100_BARS: &[BarSpec] = &[BAR0_32, vram_bar(1, GA100_VRAM), instance_bar(3)];

// --- gh100-80g -----------------------------------------------------------------------
/// 81,559 MiB: what NVML reports for an H100 80GB (gpu-facts 1.2, third-party source).
const GH100_VRAM: u64 = 81_559 * MIB;
const GH100_BARS: &[BarSpec] = &[BAR0_64, vram_bar(2, GH100_VRAM), instance_bar(4)];

// --- gh200-96g -----------------------------------------------------------------------
/// Total device memory of the emulated GH200: exactly 96 GiB. ASSUMPTION: the exact
/// `nvidia,gpu-mem-size` a GH200 reports is unconfirmed (gpu-facts 1.2).
const GH200_TOTAL: u64 = 96 * GIB;
/// resmem (MIG-bug carve-out) size: 1 GiB from the END of device memory (gpu-facts 1.2).
const GH200_RESMEM: u64 = GIB;
/// usemem: the rest, 95 GiB (already a multiple of the 512 MiB MEMBLK_SIZE).
const GH200_USEMEM: u64 = GH200_TOTAL - GH200_RESMEM;
/// nvgrace-gpu layout (gpu-facts 1.1): BAR0 at slot 0, fake "BAR2" resmem at slot 2, fake
/// "BAR4" usemem at slot 4, no instance-memory BAR.
const GH200_BARS: &[BarSpec] = &[
    BAR0_64,
    BarSpec {
        index: 2,
        role: BarRole::Vram {
            vram_offset: GH200_USEMEM,
        },
        size: GH200_RESMEM,
        is_64bit: true,
        prefetchable: true,
    },
    BarSpec {
        index: 4,
        role: BarRole::Vram { vram_offset: 0 },
        size: GH200_USEMEM,
        is_64bit: true,
        prefetchable: true,
    },
];

// --- gb202-32g -----------------------------------------------------------------------
/// ASSUMPTION: 32,607 MiB usable on an RTX 5090 (32 GB).
const GB202_VRAM: u64 = 32_607 * MIB;
const GB202_BARS: &[BarSpec] = &[BAR0_64, vram_bar(2, GB202_VRAM), instance_bar(4)];

static PROFILES: [ChipProfile; 5] = [
    ChipProfile {
        name: "tu102-24g",
        human_name: "NVIDIA TITAN RTX (TU102, 24 GB GDDR6)",
        generation: Generation::Turing,
        // 0x162000A1: observed on real TU102 A1 (gpu-facts 2.2).
        boot0: Boot0::for_chip(0x16, 0x2, 0xA, 0x1),
        // 0x162A1000: derived from the BOOT_42 field layout (gpu-facts 2.3).
        boot42: Boot42::for_chip(0x16, 0x2, 0xA, 0x1),
        pci: PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            // ASSUMPTION: 0x1E02 (TITAN RTX) is not in gpu-facts.
            device_id: 0x1E02,
            // ASSUMPTION: placeholder subsystem (NVIDIA-branded board, id = device id).
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: 0x1E02,
            class_code: CLASS_VGA,
            revision: REV_A1,
        },
        vram_size: TU102_VRAM,
        usable_vram_size: TU102_VRAM,
        bars: TU102_BARS,
    },
    ChipProfile {
        name: "ga100-80g",
        human_name: "NVIDIA A100-SXM4-80GB (GA100)",
        generation: Generation::Ampere,
        // 0x170000A1 / 0x170A1000: derived (gpu-facts 2.2, 2.3).
        boot0: Boot0::for_chip(0x17, 0x0, 0xA, 0x1),
        boot42: Boot42::for_chip(0x17, 0x0, 0xA, 0x1),
        pci: PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            // ASSUMPTION: 0x20B2 (A100 SXM4 80GB) is not in gpu-facts.
            device_id: 0x20B2,
            // ASSUMPTION: placeholder subsystem (id = device id).
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: 0x20B2,
            class_code: CLASS_3D_CONTROLLER,
            revision: REV_A1,
        },
        vram_size: GA100_VRAM,
        usable_vram_size: GA100_VRAM,
        // Facts 2.1 say some GA100 SKUs have a 64-bit BAR0; this profile models the
        // 32-bit layout (ASSUMPTION).
        bars: GA100_BARS,
    },
    ChipProfile {
        name: "gh100-80g",
        human_name: "NVIDIA H100 80GB HBM3 (GH100, SXM5)",
        generation: Generation::Hopper,
        // 0x180000A1 / 0x180A1000: derived (gpu-facts 2.2, 2.3).
        boot0: Boot0::for_chip(0x18, 0x0, 0xA, 0x1),
        boot42: Boot42::for_chip(0x18, 0x0, 0xA, 0x1),
        // All from the H100 SXM5 config dump (gpu-facts 2.1).
        pci: PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            device_id: 0x2330,
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: 0x16C1,
            class_code: CLASS_3D_CONTROLLER,
            revision: REV_A1,
        },
        vram_size: GH100_VRAM,
        usable_vram_size: GH100_VRAM,
        bars: GH100_BARS,
    },
    ChipProfile {
        name: "gh200-96g",
        human_name: "NVIDIA GH200 Grace Hopper Superchip (GH100, 96 GB HBM3)",
        generation: Generation::Hopper,
        // Same GPU die as GH100: derived values (gpu-facts 2.2, 2.3).
        boot0: Boot0::for_chip(0x18, 0x0, 0xA, 0x1),
        boot42: Boot42::for_chip(0x18, 0x0, 0xA, 0x1),
        pci: PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            // 0x2342 is in the nvgrace-gpu id table (gpu-facts 1.1), which labels it
            // "GH200 120GB"; pairing it with a 96 GiB memory size is an ASSUMPTION.
            device_id: 0x2342,
            // ASSUMPTION: placeholder subsystem (id = device id).
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: 0x2342,
            class_code: CLASS_3D_CONTROLLER,
            revision: REV_A1,
        },
        vram_size: GH200_TOTAL,
        usable_vram_size: GH200_USEMEM,
        // BAR0 64-bit prefetchable like H100 (ASSUMPTION for GH200).
        bars: GH200_BARS,
    },
    ChipProfile {
        name: "gb202-32g",
        human_name: "NVIDIA GeForce RTX 5090 (GB202, 32 GB GDDR7)",
        generation: Generation::Blackwell,
        // 0x1B2000A1 derived (gpu-facts 2.2); 0x1B2A1000 observed (gpu-facts 2.3).
        boot0: Boot0::for_chip(0x1B, 0x2, 0xA, 0x1),
        boot42: Boot42::for_chip(0x1B, 0x2, 0xA, 0x1),
        pci: PciIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            // ASSUMPTION: 0x2B85 (RTX 5090) is not in gpu-facts.
            device_id: 0x2B85,
            // ASSUMPTION: placeholder subsystem (id = device id).
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: 0x2B85,
            class_code: CLASS_VGA,
            revision: REV_A1,
        },
        vram_size: GB202_VRAM,
        usable_vram_size: GB202_VRAM,
        bars: GB202_BARS,
    },
];

static PROFILE_NAMES: [&str; 5] = [
    PROFILES[0].name,
    PROFILES[1].name,
    PROFILES[2].name,
    PROFILES[3].name,
    PROFILES[4].name,
];

impl ChipProfile {
    /// Every built-in profile.
    pub fn all() -> &'static [ChipProfile] {
        &PROFILES
    }

    /// The names of every built-in profile, in table order (usable as CLI choices).
    pub fn names() -> &'static [&'static str] {
        &PROFILE_NAMES
    }

    /// The profile called `name` (exact match); the error lists the valid names.
    pub fn by_name(name: &str) -> Result<&'static ChipProfile, ProfileError> {
        PROFILES
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ProfileError::UnknownProfile {
                requested: name.to_owned(),
            })
    }

    /// Short profile name, e.g. `gh100-80g`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Marketing-style name of the part.
    pub fn human_name(&self) -> &'static str {
        self.human_name
    }

    /// The chip generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The value of `NV_PMC_BOOT_0`.
    pub fn boot0(&self) -> Boot0 {
        self.boot0
    }

    /// The value of `NV_PMC_BOOT_42`.
    pub fn boot42(&self) -> Boot42 {
        self.boot42
    }

    /// PCI identity (vendor/device/subsystem ids, class, revision).
    pub fn pci(&self) -> &PciIdentity {
        &self.pci
    }

    /// Total device memory in bytes: the size the emulated VRAM memfd holds. Not a power
    /// of two.
    pub fn vram_size(&self) -> u64 {
        self.vram_size
    }

    /// Usable device memory the board reports: equal to [`ChipProfile::vram_size`] except
    /// on `gh200-96g`, where the 1 GiB resmem carve-out at the end is excluded.
    pub fn usable_vram_size(&self) -> u64 {
        self.usable_vram_size
    }

    /// Device memory carved out at the end of VRAM and not part of the usable size
    /// (nvgrace resmem; 0 on other profiles).
    pub fn reserved_vram_size(&self) -> u64 {
        self.vram_size - self.usable_vram_size
    }

    /// The part's memory BARs, in slot order, with real (unpadded) sizes.
    pub fn bars(&self) -> &'static [BarSpec] {
        self.bars
    }

    /// The BAR whose first slot is `index`, if any.
    pub fn bar(&self, index: u8) -> Option<&'static BarSpec> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// The register BAR (BAR0). Every built-in profile has one.
    pub fn registers_bar(&self) -> Option<&'static BarSpec> {
        self.bars.iter().find(|b| b.role == BarRole::Registers)
    }

    /// The instance-memory BAR, if the part has one (not on `gh200-96g`).
    pub fn instance_bar(&self) -> Option<&'static BarSpec> {
        self.bars.iter().find(|b| b.role == BarRole::InstanceMemory)
    }
}

impl std::fmt::Display for ChipProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.human_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chip::Generation;

    #[test]
    fn names_match_table_and_are_unique() {
        let names: Vec<_> = ChipProfile::all().iter().map(|p| p.name()).collect();
        assert_eq!(names, ChipProfile::names());
        assert_eq!(
            names,
            [
                "tu102-24g",
                "ga100-80g",
                "gh100-80g",
                "gh200-96g",
                "gb202-32g"
            ]
        );
        for n in ChipProfile::names() {
            assert_eq!(ChipProfile::by_name(n).unwrap().name(), *n);
        }
    }

    #[test]
    fn unknown_name_error_lists_all_profiles() {
        let err = ChipProfile::by_name("gv100-32g").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gv100-32g"), "{msg}");
        for n in ChipProfile::names() {
            assert!(msg.contains(n), "{msg} lacks {n}");
        }
        assert!(ChipProfile::by_name("GH100-80G").is_err());
        assert!(ChipProfile::by_name("").is_err());
    }

    #[test]
    fn boot_registers_decode_to_the_profile_chip() {
        let expect = [
            (
                "tu102-24g",
                Generation::Turing,
                0x16,
                2,
                0x1620_00A1,
                0x162A_1000,
            ),
            (
                "ga100-80g",
                Generation::Ampere,
                0x17,
                0,
                0x1700_00A1,
                0x170A_1000,
            ),
            (
                "gh100-80g",
                Generation::Hopper,
                0x18,
                0,
                0x1800_00A1,
                0x180A_1000,
            ),
            (
                "gh200-96g",
                Generation::Hopper,
                0x18,
                0,
                0x1800_00A1,
                0x180A_1000,
            ),
            (
                "gb202-32g",
                Generation::Blackwell,
                0x1B,
                2,
                0x1B20_00A1,
                0x1B2A_1000,
            ),
        ];
        for (name, generation, arch, imp, boot0, boot42) in expect {
            let p = ChipProfile::by_name(name).unwrap();
            assert_eq!(p.generation(), generation, "{name}");
            assert_eq!(p.boot0().raw(), boot0, "{name}");
            assert_eq!(p.boot42().raw(), boot42, "{name}");
            assert_eq!(p.boot0().architecture(), arch, "{name}");
            assert_eq!(p.boot0().implementation(), imp, "{name}");
            assert_eq!(p.boot42().architecture(), arch, "{name}");
            assert_eq!(p.boot42().implementation(), imp, "{name}");
            assert_eq!(p.boot42().chip_id(), p.boot0().chipset(), "{name}");
            assert_eq!(p.boot0().generation(), Ok(generation), "{name}");
            assert_eq!(p.boot42().generation(), Ok(generation), "{name}");
            // Never a value a driver would take as "fallen off the bus" or a PRI error.
            assert_ne!(p.boot0().raw(), u32::MAX);
            assert_ne!(p.boot0().raw() >> 20, 0xBAD);
        }
    }

    #[test]
    fn pci_identity() {
        for p in ChipProfile::all() {
            assert_eq!(p.pci().vendor_id, 0x10DE, "{p}");
            assert_eq!(p.pci().base_class(), 0x03, "{p}");
        }
        let h = ChipProfile::by_name("gh100-80g").unwrap().pci();
        assert_eq!(
            (
                h.device_id,
                h.subsystem_vendor_id,
                h.subsystem_id,
                h.class_code,
                h.revision
            ),
            (0x2330, 0x10DE, 0x16C1, 0x030200, 0xA1)
        );
        let class = |n| ChipProfile::by_name(n).unwrap().pci().class_code;
        assert_eq!(class("tu102-24g"), 0x030000);
        assert_eq!(class("gb202-32g"), 0x030000);
        assert_eq!(class("ga100-80g"), 0x030200);
        assert_eq!(class("gh200-96g"), 0x030200);
        assert_eq!(
            ChipProfile::by_name("gh200-96g").unwrap().pci().device_id,
            0x2342
        );
    }

    #[test]
    fn bar_layouts_are_consistent() {
        for p in ChipProfile::all() {
            let bars = p.bars();
            // Slots do not overlap, stay within the 6 BAR slots, and are sorted.
            let mut used = [false; 6];
            for b in bars {
                for s in b.index..b.index + b.slot_count() {
                    assert!((s as usize) < 6, "{p}: slot {s}");
                    assert!(!used[s as usize], "{p}: slot {s} used twice");
                    used[s as usize] = true;
                }
                assert!(b.size > 0);
                assert!(b.padded_size().unwrap() >= b.size);
                assert_eq!(p.bar(b.index), Some(b));
            }
            assert!(bars.windows(2).all(|w| w[0].index < w[1].index), "{p}");

            let r = p.registers_bar().expect("register BAR");
            assert_eq!((r.index, r.size), (0, 16 * MIB), "{p}");
            match p.generation() {
                Generation::Turing | Generation::Ampere => {
                    assert!(!r.is_64bit && !r.prefetchable, "{p}")
                }
                _ => assert!(r.is_64bit && r.prefetchable, "{p}"),
            }

            // VRAM BARs: real, non-power-of-two sizes inside device memory.
            let mut vram_total = 0;
            for b in bars {
                if let BarRole::Vram { vram_offset } = b.role {
                    assert!(b.is_64bit && b.prefetchable, "{p}");
                    assert!(vram_offset + b.size <= p.vram_size(), "{p}");
                    vram_total += b.size;
                }
            }
            assert_eq!(vram_total, p.vram_size(), "{p}: BARs cover all VRAM");
            assert!(!p.vram_size().is_power_of_two(), "{p}");
            assert!(!p.usable_vram_size().is_power_of_two(), "{p}");
            assert_eq!(p.vram_size() % 4096, 0, "{p}");
        }
    }

    #[test]
    fn per_profile_slots_and_sizes() {
        let p = ChipProfile::by_name("tu102-24g").unwrap();
        assert_eq!(p.vram_size(), 24_220 * MIB);
        assert_eq!(p.bar(1).unwrap().role, BarRole::Vram { vram_offset: 0 });
        assert_eq!(p.bar(1).unwrap().size, 24_220 * MIB);
        assert_eq!(p.bar(1).unwrap().padded_size(), Some(32 * GIB));
        assert_eq!(p.instance_bar().unwrap().index, 3);
        assert_eq!(p.instance_bar().unwrap().size, 32 * MIB);

        let p = ChipProfile::by_name("ga100-80g").unwrap();
        assert_eq!(p.vram_size(), 80 * GIB);
        assert_eq!(p.bar(1).unwrap().size, 80 * GIB);
        assert_eq!(p.instance_bar().unwrap().index, 3);

        for name in ["gh100-80g", "gb202-32g"] {
            let p = ChipProfile::by_name(name).unwrap();
            assert_eq!(p.bar(2).unwrap().role, BarRole::Vram { vram_offset: 0 });
            assert_eq!(p.bar(2).unwrap().size, p.vram_size());
            assert_eq!(p.instance_bar().unwrap().index, 4);
            assert_eq!(p.reserved_vram_size(), 0);
        }
        assert_eq!(
            ChipProfile::by_name("gh100-80g").unwrap().vram_size(),
            81_559 * MIB
        );
        assert_eq!(
            ChipProfile::by_name("gb202-32g").unwrap().vram_size(),
            32_607 * MIB
        );
    }

    #[test]
    fn gh200_follows_nvgrace_split() {
        let p = ChipProfile::by_name("gh200-96g").unwrap();
        assert_eq!(p.vram_size(), 96 * GIB);
        assert_eq!(p.usable_vram_size(), 95 * GIB);
        assert_eq!(p.reserved_vram_size(), GIB);
        assert_eq!(p.instance_bar(), None);
        assert_eq!(p.bars().len(), 3);
        let resmem = p.bar(2).unwrap();
        assert_eq!(
            resmem.role,
            BarRole::Vram {
                vram_offset: 95 * GIB
            }
        );
        assert_eq!(resmem.size, GIB);
        assert_eq!(resmem.padded_size(), Some(GIB));
        let usemem = p.bar(4).unwrap();
        assert_eq!(usemem.role, BarRole::Vram { vram_offset: 0 });
        assert_eq!(usemem.size, 95 * GIB);
        assert_eq!(usemem.padded_size(), Some(128 * GIB));
        // usemem is a multiple of the 512 MiB MEMBLK_SIZE (gpu-facts 1.2).
        assert_eq!(usemem.size % (512 * MIB), 0);
        assert!(p.bar(0).unwrap().is_64bit);
    }
}
