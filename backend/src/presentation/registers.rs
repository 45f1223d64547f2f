//! The presented BAR0, register by register: what is **passed** to the host GPU, what the
//! backend **emulates** per guest, and what is **hidden** (reads 0, writes dropped,
//! counted).
//!
//! Two modes ([`RegisterMode`]):
//! - **sliced** (a guest with a slice of the GPU): [`REGISTER_TABLE`], default-deny. An
//!   offset no rule names is hidden, and no rule passes a write, so a guest never writes a
//!   host register.
//! - **whole GPU** (a guest given the whole GPU, which runs a real host driver): passthrough.
//!   Only the table's emulated rules apply (the window register, the PRAMIN aperture
//!   confined to the guest's VRAM, which is all of it, and the MSI-X table and PBA); every
//!   other offset is passed, reads and writes.
//!
//! Rules are matched in table order (the first rule covering the dword wins);
//! `docs/registers.md` is the same table in prose and a test keeps the two in step.

use std::fmt;

use crate::host_gpu::Generation;

use super::function::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS};

/// A set of GPU generations a rule applies to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Generations(u8);

impl Generations {
    /// Every generation.
    pub const ALL: Generations = Generations(0b1_1111);
    /// Turing, Ampere and Ada (the `NV_PBUS` window register, single BAR block registers).
    pub const TURING_ADA: Generations = Generations(0b0_0111);
    /// Hopper and Blackwell (the `NV_XAL` window register, LOW/HIGH BAR block registers).
    pub const HOPPER_BLACKWELL: Generations = Generations(0b1_1000);

    const fn bit(generation: Generation) -> u8 {
        match generation {
            Generation::Turing => 1,
            Generation::Ampere => 2,
            Generation::Ada => 4,
            Generation::Hopper => 8,
            Generation::Blackwell => 16,
        }
    }

    /// Whether `generation` is in the set.
    pub const fn contains(self, generation: Generation) -> bool {
        self.0 & Self::bit(generation) != 0
    }
}

impl fmt::Debug for Generations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Generations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Generations::ALL => f.write_str("all"),
            Generations::TURING_ADA => f.write_str("Turing-Ada"),
            Generations::HOPPER_BLACKWELL => f.write_str("Hopper-Blackwell"),
            other => {
                let names: Vec<&str> = Generation::ALL
                    .iter()
                    .filter(|g| other.contains(**g))
                    .map(|g| g.name())
                    .collect();
                f.write_str(&names.join(","))
            }
        }
    }
}

/// What the backend emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emulated {
    /// The BAR0 window register: a per-guest copy; its base is relative to the guest's VRAM.
    WindowRegister,
    /// The PRAMIN aperture: the guest's VRAM under its window, through the host PRAMIN.
    PraminAperture,
    /// The MSI-X table.
    MsixTable,
    /// The MSI-X pending bit array.
    MsixPba,
}

/// How a register is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Treatment {
    /// Reads and writes reach the host register (a guest given the whole GPU only).
    Pass,
    /// Reads return the host register; writes are dropped (and counted).
    PassRead,
    /// Served by the backend per guest.
    Emulated(Emulated),
    /// Reads return 0; writes are dropped; both are counted. The default.
    Hidden,
}

impl Treatment {
    /// Short name: `passed (reads and writes)`, `passed (reads)`, `emulated`, `hidden`.
    pub const fn label(self) -> &'static str {
        match self {
            Treatment::Pass => "passed (reads and writes)",
            Treatment::PassRead => "passed (reads)",
            Treatment::Emulated(_) => "emulated",
            Treatment::Hidden => "hidden",
        }
    }
}

impl fmt::Display for Treatment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One row of the register table: a dword-aligned BAR0 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterRule {
    /// Register (or block) name.
    pub name: &'static str,
    /// BAR0 offset (dword aligned).
    pub offset: u64,
    /// Length in bytes (a multiple of 4).
    pub size: u64,
    /// Generations the rule applies to.
    pub generations: Generations,
    /// Treatment.
    pub treatment: Treatment,
    /// Why.
    pub note: &'static str,
}

impl RegisterRule {
    /// Whether the rule covers BAR0 `offset`.
    pub const fn covers(&self, offset: u64) -> bool {
        offset >= self.offset && offset - self.offset < self.size
    }
}

const fn rule(
    name: &'static str,
    offset: u64,
    size: u64,
    generations: Generations,
    treatment: Treatment,
    note: &'static str,
) -> RegisterRule {
    RegisterRule {
        name,
        offset,
        size,
        generations,
        treatment,
        note,
    }
}

use Generations as G;
use Treatment::{Hidden, PassRead};

/// Bytes of the MSI-X table (16 bytes per vector).
const MSIX_TABLE_BYTES: u64 = MSIX_VECTORS as u64 * 16;
/// Bytes of the MSI-X PBA (one u64 per 64 vectors).
const MSIX_PBA_BYTES: u64 = (MSIX_VECTORS as u64).div_ceil(64) * 8;

/// The register table of sliced guests (the whole-GPU mode uses its emulated rules only).
/// Offsets and fields from gpu-facts 1.7, 2.2–2.4, 3.3, 3.7, 4.6, 4.7.
pub const REGISTER_TABLE: &[RegisterRule] = &[
    // Identity: what every driver reads first (gpu-facts 5). Read-only on hardware; a
    // write to BOOT_1 would flip the host's endianness switch on old parts, so writes drop.
    rule("NV_PMC_BOOT_0", 0x0, 4, G::ALL, PassRead, "chip identity"),
    rule("NV_PMC_BOOT_1", 0x4, 4, G::ALL, PassRead, "endianness / VGPU bits"),
    rule("NV_PMC_BOOT_42", 0xA00, 4, G::ALL, PassRead, "chip identity (nova)"),
    // The window register and PRAMIN (gpu-facts 2.4).
    rule(
        "NV_PBUS_BAR0_WINDOW",
        0x1700,
        4,
        G::TURING_ADA,
        Treatment::Emulated(Emulated::WindowRegister),
        "per-guest copy; BASE relative to the guest's VRAM, TARGET other than VID_MEM reaches nothing",
    ),
    rule(
        "NV_XAL_EP_ZB_BAR0_WINDOW",
        0x10_FD40,
        4,
        G::HOPPER_BLACKWELL,
        Treatment::Emulated(Emulated::WindowRegister),
        "per-guest copy; BASE relative to the guest's VRAM",
    ),
    rule(
        "PRAMIN aperture",
        0x70_0000,
        0x10_0000,
        G::ALL,
        Treatment::Emulated(Emulated::PraminAperture),
        "guest VRAM at (window << 16) + offset through the host PRAMIN; past the guest's VRAM reads ~0",
    ),
    // MSI-X storage in BAR0 (presentation/msix.rs).
    rule(
        "MSI-X table",
        MSIX_TABLE_OFFSET as u64,
        MSIX_TABLE_BYTES,
        G::ALL,
        Treatment::Emulated(Emulated::MsixTable),
        "per-guest table",
    ),
    rule(
        "MSI-X PBA",
        MSIX_PBA_OFFSET as u64,
        MSIX_PBA_BYTES,
        G::ALL,
        Treatment::Emulated(Emulated::MsixPba),
        "reads 0",
    ),
    // Host MMU state: a guest must not rebind BAR1/BAR2 or flush host TLBs.
    rule("NV_PBUS_BAR1_BLOCK (legacy)", 0x1704, 4, G::ALL, Hidden, "Maxwell-Volta BAR1 bind"),
    rule("NV_PBUS_BIND_STATUS (legacy)", 0x1710, 4, G::ALL, Hidden, "Maxwell-Volta bind status"),
    rule("NV_PBUS_BAR2_BLOCK (legacy)", 0x1714, 4, G::ALL, Hidden, "Maxwell-Volta BAR2 bind"),
    rule("NV_VIRTUAL_FUNCTION_PRIV_BAR1_BLOCK", 0xB8_0F40, 4, G::TURING_ADA, Hidden, "host BAR1 bind (virtual mode, guest windows)"),
    rule("NV_VIRTUAL_FUNCTION_PRIV_BAR2_BLOCK", 0xB8_0F48, 4, G::TURING_ADA, Hidden, "host BAR2 bind"),
    rule("NV_VIRTUAL_FUNCTION_PRIV_BIND_STATUS", 0xB8_0F50, 4, G::TURING_ADA, Hidden, "host bind status"),
    rule("FUNC_BAR1_BLOCK_LOW_ADDR/HIGH_ADDR", 0xB8_0F60, 8, G::HOPPER_BLACKWELL, Hidden, "host BAR1 bind (virtual mode, guest windows)"),
    rule("FUNC_BAR2_BLOCK_LOW_ADDR/HIGH_ADDR", 0xB8_0F70, 8, G::HOPPER_BLACKWELL, Hidden, "host BAR2 bind"),
    rule("MMU_INVALIDATE_PDB/UPPER_PDB", 0xB8_30A0, 8, G::ALL, Hidden, "host TLB invalidate"),
    rule("MMU_INVALIDATE", 0xB8_30B0, 4, G::ALL, Hidden, "host TLB invalidate trigger"),
    rule("NV_PFB_PRI_MMU_INVALIDATE (legacy)", 0x10_0CB8, 8, G::ALL, Hidden, "Maxwell-Volta TLB invalidate"),
    rule("NV_PFB_PRI_MMU_INVALIDATE_PDB hi (legacy)", 0x10_0CEC, 4, G::ALL, Hidden, "Maxwell-Volta TLB invalidate"),
    // GSP, falcons, boot and memory-controller state of the host.
    rule("NV_PGSP_QUEUE_HEAD(0) (GSP doorbell)", 0x11_0C00, 4, G::ALL, Hidden, "host GSP command queue doorbell"),
    rule("GSP falcon + RISC-V", 0x11_0000, 0x2000, G::ALL, Hidden, "host GSP (IRQSCLR, MAILBOX0/1, CPUCTL)"),
    rule("SEC2 falcon + RISC-V", 0x84_0000, 0x2000, G::ALL, Hidden, "host SEC2"),
    rule("FSP falcon + RISC-V", 0x8F_2000, 0x2000, G::ALL, Hidden, "host FSP (COT boot, EMEM queues)"),
    rule("GFW_BOOT status", 0x11_8128, 4, G::TURING_ADA, Hidden, "host boot status"),
    rule("WPR2_ADDR_LO/HI", 0x1F_A824, 8, G::ALL, Hidden, "host write-protected region"),
    rule("Sysmem flush page", 0x10_0C10, 4, G::ALL, Hidden, "host flush address"),
    rule("Sysmem flush page hi", 0x10_0C40, 4, G::ALL, Hidden, "host flush address"),
    rule("FBHUB_PCIE_FLUSH_SYSMEM_ADDR_LO/HI", 0x10_0A34, 8, G::HOPPER_BLACKWELL, Hidden, "host flush address"),
    rule("FB size", 0x10_0CE0, 4, G::ALL, Hidden, "host memory size (the guest's is its slice)"),
    rule("NV_USABLE_FB_SIZE_IN_MB", 0x11_83A4, 4, G::ALL, Hidden, "host memory size (the guest's is its slice)"),
    rule("PCI config mirror", 0x08_8000, 0x1000, G::TURING_ADA, Hidden, "host config space; the guest's is the backend's"),
    rule("PCI config mirror", 0x09_2000, 0x1000, G::HOPPER_BLACKWELL, Hidden, "host config space; the guest's is the backend's"),
    rule("C2C link status (nvgrace probe)", 0x1498, 4, G::HOPPER_BLACKWELL, Hidden, "host-side probe register"),
    rule("NV_THERM_I2CS_SCRATCH (FSP boot / HBM training)", 0x20_0BC, 4, G::ALL, Hidden, "host boot status"),
];

/// Whom a register map serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterMode {
    /// A guest with a slice of the GPU: [`REGISTER_TABLE`], default-deny.
    Sliced,
    /// A guest given the whole GPU: the table's emulated rules and the PCI config mirror
    /// (hidden), every other offset passed (reads and writes).
    WholeGpu,
}

/// Offsets of the rules a whole-GPU guest still does not get through: the mirror of the
/// device's physical PCI config space in BAR0. Passed, it would let the guest rewrite the
/// host's real COMMAND register, BAR bases, MSI and power state behind the presented config
/// space (QEMU's vfio-pci traps the same range for the same reason).
const WHOLE_GPU_HIDDEN: [u64; 2] = [0x08_8000, 0x09_2000];

impl RegisterMode {
    /// What an offset no rule names gets.
    pub const fn default_treatment(self) -> Treatment {
        match self {
            RegisterMode::Sliced => Treatment::Hidden,
            RegisterMode::WholeGpu => Treatment::Pass,
        }
    }
}

/// The rules of one generation and mode, in table order, with a lookup by offset.
#[derive(Debug, Clone)]
pub struct RegisterMap {
    generation: Generation,
    mode: RegisterMode,
    rules: Vec<&'static RegisterRule>,
}

impl RegisterMap {
    /// The rules that apply to a sliced guest of `generation`.
    pub fn for_generation(generation: Generation) -> RegisterMap {
        RegisterMap::new(generation, RegisterMode::Sliced)
    }

    /// The rules that apply to a guest given the whole GPU of `generation`.
    pub fn whole_gpu(generation: Generation) -> RegisterMap {
        RegisterMap::new(generation, RegisterMode::WholeGpu)
    }

    /// The rules that apply to `generation` in `mode`.
    pub fn new(generation: Generation, mode: RegisterMode) -> RegisterMap {
        let in_mode = |r: &&RegisterRule| match mode {
            RegisterMode::Sliced => true,
            RegisterMode::WholeGpu => {
                matches!(r.treatment, Treatment::Emulated(_))
                    || WHOLE_GPU_HIDDEN.contains(&r.offset)
            }
        };
        RegisterMap {
            generation,
            mode,
            rules: REGISTER_TABLE
                .iter()
                .filter(|r| r.generations.contains(generation))
                .filter(in_mode)
                .collect(),
        }
    }

    /// The generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The mode.
    pub fn mode(&self) -> RegisterMode {
        self.mode
    }

    /// The rules, in table order.
    pub fn rules(&self) -> &[&'static RegisterRule] {
        &self.rules
    }

    /// The first rule covering BAR0 `offset`, if any.
    pub fn rule(&self, offset: u64) -> Option<&'static RegisterRule> {
        self.rules.iter().copied().find(|r| r.covers(offset))
    }

    /// How BAR0 `offset` is treated (the mode's [default](RegisterMode::default_treatment)
    /// if no rule names it).
    pub fn treatment(&self, offset: u64) -> Treatment {
        self.rule(offset)
            .map_or(self.mode.default_treatment(), |r| r.treatment)
    }

    /// The rule of an emulated kind (e.g. the generation's window register).
    pub fn emulated(&self, kind: Emulated) -> Option<&'static RegisterRule> {
        self.rules
            .iter()
            .copied()
            .find(|r| r.treatment == Treatment::Emulated(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_dword_ranges_and_nothing_passes_writes() {
        for r in REGISTER_TABLE {
            assert_ne!(
                r.treatment,
                Treatment::Pass,
                "{}: the table passes no write",
                r.name
            );
            assert_eq!(r.offset % 4, 0, "{}", r.name);
            assert!(r.size > 0 && r.size % 4 == 0, "{}", r.name);
            assert!(r.offset + r.size <= 16 << 20, "{}", r.name);
        }
        // Passed and emulated rules never overlap each other within a generation, so table
        // order only decides between hidden rules.
        for g in Generation::ALL {
            let map = RegisterMap::for_generation(g);
            let special: Vec<_> = map
                .rules()
                .iter()
                .filter(|r| r.treatment != Treatment::Hidden)
                .collect();
            for (i, a) in special.iter().enumerate() {
                for b in &special[i + 1..] {
                    let disjoint = a.offset + a.size <= b.offset || b.offset + b.size <= a.offset;
                    assert!(disjoint, "{g}: {} overlaps {}", a.name, b.name);
                }
                // No hidden rule listed earlier shadows a special one.
                for h in map.rules() {
                    if std::ptr::eq(*h, **a) {
                        break;
                    }
                    assert!(
                        !(h.covers(a.offset) || a.covers(h.offset)),
                        "{g}: {} shadows {}",
                        h.name,
                        a.name
                    );
                }
            }
        }
    }

    #[test]
    fn window_register_per_generation_and_default_deny() {
        let tu = RegisterMap::for_generation(Generation::Turing);
        let gh = RegisterMap::for_generation(Generation::Hopper);
        assert_eq!(
            tu.emulated(Emulated::WindowRegister).unwrap().offset,
            0x1700
        );
        assert_eq!(
            gh.emulated(Emulated::WindowRegister).unwrap().offset,
            0x10_FD40
        );
        // The other generation's window offset is hidden.
        assert_eq!(tu.treatment(0x10_FD40), Treatment::Hidden);
        assert_eq!(gh.treatment(0x1700), Treatment::Hidden);
        assert_eq!(tu.treatment(0), Treatment::PassRead);
        assert_eq!(tu.treatment(0xA00), Treatment::PassRead);
        assert_eq!(tu.treatment(0x20_0000), Treatment::Hidden, "unlisted");
        assert_eq!(gh.treatment(0xB8_30B0), Treatment::Hidden);
        assert_eq!(
            gh.rule(0x11_0C00).unwrap().name,
            "NV_PGSP_QUEUE_HEAD(0) (GSP doorbell)"
        );
        assert_eq!(
            gh.treatment(0x70_0000 + 0xFFFFC),
            Treatment::Emulated(Emulated::PraminAperture)
        );
        assert_eq!(
            gh.treatment(u64::from(MSIX_TABLE_OFFSET) + 0xFC),
            Treatment::Emulated(Emulated::MsixTable)
        );
        assert_eq!(
            gh.treatment(u64::from(MSIX_TABLE_OFFSET) + 0x100),
            Treatment::Hidden
        );
    }

    #[test]
    fn whole_gpu_mode_passes_everything_but_the_emulated_rules_and_the_config_mirror() {
        for g in Generation::ALL {
            let sliced = RegisterMap::for_generation(g);
            let whole = RegisterMap::whole_gpu(g);
            assert_eq!(
                (sliced.mode(), whole.mode()),
                (RegisterMode::Sliced, RegisterMode::WholeGpu)
            );
            // Exactly the sliced map's emulated rules and config mirror, in the same order.
            let emulated: Vec<_> = sliced
                .rules()
                .iter()
                .filter(|r| {
                    matches!(r.treatment, Treatment::Emulated(_)) || r.name == "PCI config mirror"
                })
                .collect();
            assert_eq!(whole.rules().iter().collect::<Vec<_>>(), emulated, "{g}");
            for kind in [
                Emulated::WindowRegister,
                Emulated::PraminAperture,
                Emulated::MsixTable,
                Emulated::MsixPba,
            ] {
                assert_eq!(whole.emulated(kind), sliced.emulated(kind), "{g}");
            }
        }
        let gh = RegisterMap::whole_gpu(Generation::Hopper);
        // The GSP's doorbell, mailboxes, CPUCTL, IRQSCLR; BAR1 bind; TLB invalidate; BOOT_0;
        // unnamed offsets: all passed, reads and writes.
        for offset in [
            0x11_0C00, 0x11_0040, 0x11_0044, 0x11_0100, 0x11_03C0, 0x11_0004, 0xB8_0F60, 0xB8_30B0,
            0x0, 0x20_0000,
        ] {
            assert_eq!(gh.treatment(offset), Treatment::Pass, "{offset:#x}");
        }
        assert_eq!(
            gh.treatment(0x10_FD40),
            Treatment::Emulated(Emulated::WindowRegister)
        );
        assert_eq!(
            gh.treatment(0x70_0000),
            Treatment::Emulated(Emulated::PraminAperture)
        );
        // The other generation's window offset is just a host register here.
        assert_eq!(
            RegisterMap::whole_gpu(Generation::Turing).treatment(0x10_FD40),
            Treatment::Pass
        );
    }

    #[test]
    fn docs_registers_md_lists_every_rule() {
        let doc = include_str!("../../../docs/registers.md");
        for r in REGISTER_TABLE {
            assert!(doc.contains(r.name), "docs/registers.md lacks {}", r.name);
            let offset = format!("0x{:X}", r.offset);
            assert!(
                doc.contains(&offset),
                "docs/registers.md lacks offset {offset} of {}",
                r.name
            );
        }
        // The whole-GPU mode's section names every rule that mode keeps.
        let whole = doc
            .split("## Whole-GPU mode")
            .nth(1)
            .expect("docs/registers.md has a \"## Whole-GPU mode\" section");
        let whole = whole.split("\n## ").next().unwrap_or(whole);
        for g in Generation::ALL {
            for r in RegisterMap::whole_gpu(g).rules() {
                assert!(whole.contains(r.name), "whole-GPU section lacks {}", r.name);
            }
        }
        assert!(whole.contains(Treatment::Pass.label()));
    }

    #[test]
    fn a_whole_gpu_guest_never_reaches_the_physical_config_space_mirror() {
        for (g, mirror) in [
            (Generation::Turing, 0x08_8000),
            (Generation::Ampere, 0x08_8000),
            (Generation::Hopper, 0x09_2000),
            (Generation::Blackwell, 0x09_2000),
        ] {
            let whole = RegisterMap::whole_gpu(g);
            for at in [mirror, mirror + 0x4, mirror + 0x10, mirror + 0xFFC] {
                assert_eq!(whole.treatment(at), Treatment::Hidden, "{g} {at:#x}");
            }
            assert_eq!(whole.treatment(mirror + 0x1000), Treatment::Pass, "{g}");
        }
    }
}
