//! Typed BAR0 registers with named fields, and the BAR0 offsets the model knows.
//!
//! Each register is a `u32` newtype declared with the `register!` macro: every field gets
//! a getter (`field()`) and a builder-style setter (`with_field(value)`), so no code outside
//! this module shifts or masks register bits by hand. Bit layouts are from `gpu-facts.md`
//! sections 2.2–2.4, 4.6 and 4.7.

use thiserror::Error;

use crate::chip::{ChipError, Generation};
use crate::vram::VramAddr;

/// Size of BAR0 (the register BAR): 16 MiB on every supported chip.
pub const BAR0_SIZE: u64 = 0x100_0000;

/// `NV_PMC_BOOT_0`: chip identification (architecture, implementation, revision).
pub const BOOT_0: u64 = 0x00_0000;
/// `NV_PMC_BOOT_1`: VGPU/VF mode bits (historically the endian switch). The model reads 0.
pub const BOOT_1: u64 = 0x00_0004;
/// `NV_PMC_BOOT_42`: chip identification used by modern drivers.
pub const BOOT_42: u64 = 0x00_0A00;
/// `NV_PBUS_BAR0_WINDOW` (Maxwell–Ada): PRAMIN window base and target.
pub const PBUS_BAR0_WINDOW: u64 = 0x00_1700;
/// `NV_XAL_EP_ZB_BAR0_WINDOW` (Hopper, Blackwell): PRAMIN window base (always VRAM).
pub const XAL_BAR0_WINDOW: u64 = 0x10_FD40;
/// First BAR0 offset of the PRAMIN aperture (the 1 MiB window into VRAM).
pub const PRAMIN_BASE: u64 = 0x70_0000;
/// Size of the PRAMIN aperture: 1 MiB.
pub const PRAMIN_SIZE: u64 = 0x10_0000;
/// The window BASE field holds a VRAM address shifted right by this many bits (64 KiB units).
pub const WINDOW_BASE_SHIFT: u32 = 16;
/// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE_PDB` (Turing–Blackwell).
pub const MMU_INVALIDATE_PDB: u64 = 0xB8_30A0;
/// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE_UPPER_PDB` (Turing–Blackwell).
pub const MMU_INVALIDATE_UPPER_PDB: u64 = 0xB8_30A4;
/// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE`: TLB invalidate control (Turing–Blackwell).
pub const MMU_INVALIDATE: u64 = 0xB8_30B0;
/// `NV_VIRTUAL_FUNCTION_PRIV_BAR1_BLOCK` (Turing–Ada).
pub const BAR1_BLOCK: u64 = 0xB8_0F40;
/// `NV_VIRTUAL_FUNCTION_PRIV_BAR2_BLOCK` (Turing–Ada).
pub const BAR2_BLOCK: u64 = 0xB8_0F48;
/// `NV_VIRTUAL_FUNCTION_PRIV_BIND_STATUS` (Turing–Ada).
pub const BIND_STATUS: u64 = 0xB8_0F50;
/// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR1_BLOCK_LOW_ADDR` (Hopper–Blackwell).
pub const BAR1_BLOCK_LOW_ADDR: u64 = 0xB8_0F60;
/// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR1_BLOCK_HIGH_ADDR` (Hopper–Blackwell).
pub const BAR1_BLOCK_HIGH_ADDR: u64 = 0xB8_0F64;
/// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR2_BLOCK_LOW_ADDR` (Hopper–Blackwell).
pub const BAR2_BLOCK_LOW_ADDR: u64 = 0xB8_0F70;
/// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR2_BLOCK_HIGH_ADDR` (Hopper–Blackwell).
pub const BAR2_BLOCK_HIGH_ADDR: u64 = 0xB8_0F74;
/// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE`: the size of local memory (gpu-facts 5, nova-core
/// `fb/hal`).
pub const LOCAL_MEMORY_RANGE: u64 = 0x10_0CE0;
/// `NV_USABLE_FB_SIZE_IN_MB`: usable framebuffer in MiB (gpu-facts 5: read by nova-core on
/// GA102+ and GH100; the model answers it on every generation).
pub const USABLE_FB_SIZE_IN_MB: u64 = 0x11_83A4;
/// `NV_PGSP_QUEUE_HEAD(0)`: the CPU→GSP doorbell (GSP falcon base 0x110000 + 0xC00); see
/// `crate::gsp::falcon`.
pub const GSP_QUEUE_HEAD0: u64 = 0x11_0C00;

/// Errors of the typed-register helpers.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegsError {
    /// A 2-bit memory TARGET field holds the reserved value 1.
    #[error("reserved memory target encoding {0}")]
    ReservedTarget(u32),
    /// A window base address that is not 64 KiB aligned.
    #[error("window base {0} is not 64 KiB aligned")]
    UnalignedWindowBase(VramAddr),
    /// A window base address the register's BASE field cannot express.
    #[error("window base {addr} does not fit a {bits}-bit BASE field")]
    WindowBaseTooLarge {
        /// The requested base address.
        addr: VramAddr,
        /// Width of the BASE field.
        bits: u32,
    },
}

/// Mask of bits `hi:lo` (inclusive) of a 32-bit register.
pub(crate) const fn field_mask(hi: u32, lo: u32) -> u32 {
    let width = hi - lo + 1;
    if width >= 32 {
        u32::MAX
    } else {
        ((1u32 << width) - 1) << lo
    }
}

/// Mask of bits `hi:lo` (inclusive) of a 64-bit word (page-table entries).
pub(crate) const fn field_mask64(hi: u32, lo: u32) -> u64 {
    let width = hi - lo + 1;
    if width >= 64 {
        u64::MAX
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Declares a register (or memory word) newtype with named bit fields.
///
/// Without a type the word is a 32-bit register; `struct Name: u64` declares a 64-bit
/// word (used for page-table entries).
///
/// ```text
/// register! {
///     /// Doc of the register.
///     pub struct Name {
///         /// Doc of the field.
///         7:4 => field_getter, with_field_setter;
///     }
/// }
/// ```
macro_rules! register {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident : u64 { $($body:tt)* }
    ) => {
        register!(@impl [$(#[$meta])*] $vis $name, u64, $crate::regs::field_mask64, "{:#018x}", { $($body)* });
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident { $($body:tt)* }
    ) => {
        register!(@impl [$(#[$meta])*] $vis $name, u32, $crate::regs::field_mask, "{:#010x}", { $($body)* });
    };
    (
        @impl [$(#[$meta:meta])*] $vis:vis $name:ident, $ty:ident, $mask:path, $rawfmt:literal,
        {
            $(
                $(#[$fmeta:meta])*
                $hi:literal : $lo:literal => $get:ident, $set:ident;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        #[repr(transparent)]
        $vis struct $name($ty);

        impl $name {
            /// The bits covered by the fields defined for this word.
            pub const DEFINED_MASK: $ty = 0 $( | $mask($hi, $lo) )*;

            /// Wraps a raw value (all bits kept, defined or not).
            pub const fn from_raw(raw: $ty) -> Self {
                Self(raw)
            }

            /// The raw value.
            pub const fn raw(self) -> $ty {
                self.0
            }

            /// A copy with every bit outside the defined fields cleared.
            #[must_use]
            pub const fn defined_only(self) -> Self {
                Self(self.0 & Self::DEFINED_MASK)
            }

            $(
                $(#[$fmeta])*
                #[doc = ""]
                #[doc = concat!("Bits ", stringify!($hi), ":", stringify!($lo), ".")]
                pub const fn $get(self) -> $ty {
                    (self.0 & $mask($hi, $lo)) >> $lo
                }

                #[doc = concat!(
                    "A copy with `", stringify!($get), "` (bits ", stringify!($hi), ":",
                    stringify!($lo), ") set to `value`; bits of `value` that do not fit the ",
                    "field are discarded."
                )]
                #[must_use]
                pub const fn $set(self, value: $ty) -> Self {
                    let mask = $mask($hi, $lo);
                    Self((self.0 & !mask) | ((value << $lo) & mask))
                }
            )*
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("raw", &format_args!($rawfmt, self.0))
                    $( .field(stringify!($get), &format_args!("{:#x}", self.$get())) )*
                    .finish()
            }
        }

        impl From<$ty> for $name {
            fn from(raw: $ty) -> Self {
                Self(raw)
            }
        }

        impl From<$name> for $ty {
            fn from(reg: $name) -> $ty {
                reg.0
            }
        }
    };
}
pub(crate) use register;

/// Memory target encoding shared by the PBUS window TARGET field and the BAR block TARGET
/// fields: 0 video memory, 2 coherent system memory, 3 non-coherent system memory
/// (1 is reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryTarget {
    /// Video memory (VRAM), encoding 0.
    VidMem,
    /// Coherent (snooped) system memory, encoding 2.
    SysMemCoherent,
    /// Non-coherent system memory, encoding 3.
    SysMemNonCoherent,
}

/// The window register's TARGET values are the generic [`MemoryTarget`] encoding.
pub type WindowTarget = MemoryTarget;

impl MemoryTarget {
    /// Decodes a 2-bit TARGET field.
    pub const fn from_raw(raw: u32) -> Result<MemoryTarget, RegsError> {
        match raw {
            0 => Ok(MemoryTarget::VidMem),
            2 => Ok(MemoryTarget::SysMemCoherent),
            3 => Ok(MemoryTarget::SysMemNonCoherent),
            other => Err(RegsError::ReservedTarget(other)),
        }
    }

    /// The 2-bit field encoding.
    pub const fn raw(self) -> u32 {
        match self {
            MemoryTarget::VidMem => 0,
            MemoryTarget::SysMemCoherent => 2,
            MemoryTarget::SysMemNonCoherent => 3,
        }
    }
}

/// BAR1/BAR2 translation mode of a BAR block register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarMode {
    /// Physical mode: BAR offsets map VRAM 1:1 (the reset value).
    Physical,
    /// Virtual mode: BAR offsets are translated through the instance block's page tables.
    Virtual,
}

impl BarMode {
    /// Decodes the 1-bit MODE field.
    pub const fn from_bit(bit: u32) -> BarMode {
        if bit & 1 == 0 {
            BarMode::Physical
        } else {
            BarMode::Virtual
        }
    }

    /// The 1-bit MODE field encoding.
    pub const fn bit(self) -> u32 {
        match self {
            BarMode::Physical => 0,
            BarMode::Virtual => 1,
        }
    }
}

register! {
    /// `NV_PMC_BOOT_0` (BAR0 + 0x0): architecture, implementation and revision.
    pub struct Boot0 {
        /// MINOR_REVISION (e.g. 1 for an "A1" part).
        3:0 => minor_revision, with_minor_revision;
        /// MAJOR_REVISION (e.g. 0xA for an "A1" part).
        7:4 => major_revision, with_major_revision;
        /// ARCHITECTURE_1: most significant bit of the architecture (zero on modern chips).
        8:8 => architecture_1, with_architecture_1;
        /// IMPLEMENTATION within the architecture (e.g. 2 for TU102).
        23:20 => implementation, with_implementation;
        /// ARCHITECTURE_0: low five bits of the architecture code.
        28:24 => architecture_0, with_architecture_0;
    }
}

impl Boot0 {
    /// BOOT_0 of a chip: `architecture` (up to 6 bits), `implementation`, revision
    /// `major`.`minor` (an "A1" part is major 0xA, minor 1). Bits 19:12 are left zero.
    pub const fn for_chip(architecture: u32, implementation: u32, major: u32, minor: u32) -> Boot0 {
        Boot0(0)
            .with_architecture_0(architecture)
            .with_architecture_1(architecture >> 5)
            .with_implementation(implementation)
            .with_major_revision(major)
            .with_minor_revision(minor)
    }

    /// The full architecture code (`ARCHITECTURE_1 << 5 | ARCHITECTURE_0`), e.g. 0x16 Turing.
    pub const fn architecture(self) -> u32 {
        (self.architecture_1() << 5) | self.architecture_0()
    }

    /// The chipset id (`architecture << 4 | implementation`), e.g. 0x162 for TU102.
    pub const fn chipset(self) -> u32 {
        (self.architecture() << 4) | self.implementation()
    }

    /// The generation named by the architecture code.
    pub const fn generation(self) -> Result<Generation, ChipError> {
        Generation::from_architecture(self.architecture())
    }
}

register! {
    /// `NV_PMC_BOOT_42` (BAR0 + 0xA00): the chip identification modern drivers use.
    pub struct Boot42 {
        /// MINOR_EXTENDED_REVISION.
        11:8 => minor_extended_revision, with_minor_extended_revision;
        /// MINOR_REVISION.
        15:12 => minor_revision, with_minor_revision;
        /// MAJOR_REVISION.
        19:16 => major_revision, with_major_revision;
        /// IMPLEMENTATION.
        23:20 => implementation, with_implementation;
        /// ARCHITECTURE (6 bits).
        29:24 => architecture, with_architecture;
        /// CHIP_ID = ARCHITECTURE and IMPLEMENTATION together (e.g. 0x1B2 for GB202).
        29:20 => chip_id, with_chip_id;
    }
}

impl Boot42 {
    /// BOOT_42 of a chip: `architecture`, `implementation`, revision `major`.`minor`; the
    /// minor extended revision is zero.
    pub const fn for_chip(
        architecture: u32,
        implementation: u32,
        major: u32,
        minor: u32,
    ) -> Boot42 {
        Boot42(0)
            .with_architecture(architecture)
            .with_implementation(implementation)
            .with_major_revision(major)
            .with_minor_revision(minor)
    }

    /// The generation named by the architecture code.
    pub const fn generation(self) -> Result<Generation, ChipError> {
        Generation::from_architecture(self.architecture())
    }
}

register! {
    /// `NV_PBUS_BAR0_WINDOW` (BAR0 + 0x1700, Maxwell–Ada): where the PRAMIN aperture points.
    pub struct PbusBar0Window {
        /// BASE: target address >> 16 (64 KiB units).
        23:0 => base, with_base;
        /// TARGET (raw encoding; see [`PbusBar0Window::target`]).
        25:24 => target_raw, with_target_raw;
    }
}

impl PbusBar0Window {
    /// The decoded TARGET field; the reserved encoding 1 is an error.
    pub const fn target(self) -> Result<WindowTarget, RegsError> {
        MemoryTarget::from_raw(self.target_raw())
    }

    /// A copy with TARGET set to `target`.
    #[must_use]
    pub const fn with_target(self, target: WindowTarget) -> PbusBar0Window {
        self.with_target_raw(target.raw())
    }

    /// The address the window's first byte maps to (`base << 16`).
    pub const fn base_address(self) -> VramAddr {
        VramAddr::new((self.base() as u64) << WINDOW_BASE_SHIFT)
    }

    /// A copy whose BASE points at `addr` (must be 64 KiB aligned and below 1 TiB).
    pub const fn with_base_address(self, addr: VramAddr) -> Result<PbusBar0Window, RegsError> {
        match window_base_field(addr, 24) {
            Ok(base) => Ok(self.with_base(base)),
            Err(e) => Err(e),
        }
    }
}

register! {
    /// `NV_XAL_EP_ZB_BAR0_WINDOW` (BAR0 + 0x10FD40, Hopper/Blackwell): where the PRAMIN
    /// aperture points; always video memory.
    ///
    /// The BASE field is declared with the widest known layout (22:0, Blackwell GB10x);
    /// on Hopper only bits 21:0 exist, see [`XalBar0Window::base_mask`].
    pub struct XalBar0Window {
        /// BASE: VRAM address >> 16 (64 KiB units).
        22:0 => base, with_base;
    }
}

impl XalBar0Window {
    /// The bits of the register that exist on `generation` (the BASE field, 22 bits on
    /// Hopper and 23 on Blackwell).
    pub const fn base_mask(generation: Generation) -> u32 {
        field_mask(generation.window_base_bits() - 1, 0)
    }

    /// The VRAM address the window's first byte maps to (`base << 16`).
    pub const fn base_address(self) -> VramAddr {
        VramAddr::new((self.base() as u64) << WINDOW_BASE_SHIFT)
    }

    /// A copy whose BASE points at `addr`, which must be 64 KiB aligned and expressible in
    /// `generation`'s BASE field.
    pub const fn with_base_address(
        self,
        addr: VramAddr,
        generation: Generation,
    ) -> Result<XalBar0Window, RegsError> {
        match window_base_field(addr, generation.window_base_bits()) {
            Ok(base) => Ok(self.with_base(base)),
            Err(e) => Err(e),
        }
    }
}

register! {
    /// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE` (BAR0 + 0x100CE0): local memory size as
    /// `lower_mag << lower_scale` MiB (gpu-facts 5; nova-core derates the size by 15/16
    /// when ECC_MODE is set).
    pub struct LocalMemoryRange {
        /// LOWER_SCALE: the size's power-of-two exponent above 1 MiB.
        3:0 => lower_scale, with_lower_scale;
        /// LOWER_MAG: the size's mantissa.
        9:4 => lower_mag, with_lower_mag;
        /// ECC_MODE.
        30:30 => ecc_mode, with_ecc_mode;
    }
}

impl LocalMemoryRange {
    /// The size the register states, in bytes: `lower_mag << (lower_scale + 20)` (the
    /// ECC derating is not applied).
    pub const fn size(self) -> u64 {
        (self.lower_mag() as u64) << (self.lower_scale() + 20)
    }

    /// The register (ECC off) stating the smallest size it can express that is at least
    /// `bytes`: exactly `bytes` when that is a 6-bit mantissa times a power of two between
    /// 1 MiB and 32 GiB, the next such size above otherwise (the physical memory of a
    /// board is such a round size, and holds at least what it reports as usable: 24 GiB
    /// for a 24,220 MiB TU102). Saturates at the largest size it can state.
    pub const fn at_least(bytes: u64) -> LocalMemoryRange {
        let max_mag = (field_mask(9, 4) >> 4) as u64;
        let max_scale = field_mask(3, 0);
        let mut best = LocalMemoryRange(0)
            .with_lower_scale(max_scale)
            .with_lower_mag(max_mag as u32);
        let mut scale = 0;
        while scale <= max_scale {
            let unit = 1u64 << (scale + 20);
            let mag = bytes.div_ceil(unit);
            if mag <= max_mag {
                let candidate = LocalMemoryRange(0)
                    .with_lower_scale(scale)
                    .with_lower_mag(mag as u32);
                if candidate.size() < best.size() {
                    best = candidate;
                }
            }
            scale += 1;
        }
        best
    }
}

register! {
    /// `NV_USABLE_FB_SIZE_IN_MB` (BAR0 + 0x1183A4): the usable framebuffer in MiB
    /// (gpu-facts 5).
    pub struct UsableFbSizeInMb {
        /// The size in MiB.
        31:0 => mib, with_mib;
    }
}

impl UsableFbSizeInMb {
    /// The register stating `bytes` in whole MiB (rounded down; saturating).
    pub const fn for_bytes(bytes: u64) -> UsableFbSizeInMb {
        let mib = bytes >> 20;
        UsableFbSizeInMb(if mib > u32::MAX as u64 {
            u32::MAX
        } else {
            mib as u32
        })
    }
}

/// Converts a window base address into a BASE field value of `bits` bits.
const fn window_base_field(addr: VramAddr, bits: u32) -> Result<u32, RegsError> {
    let raw = addr.raw();
    if raw & ((1 << WINDOW_BASE_SHIFT) - 1) != 0 {
        return Err(RegsError::UnalignedWindowBase(addr));
    }
    let base = raw >> WINDOW_BASE_SHIFT;
    if base >= (1u64 << bits) {
        return Err(RegsError::WindowBaseTooLarge { addr, bits });
    }
    Ok(base as u32)
}

register! {
    /// `MMU_INVALIDATE_PDB` (BAR0 + 0xB830A0): low part of the page-directory base whose
    /// TLB entries are invalidated.
    pub struct MmuInvalidatePdb {
        /// APERTURE: 0 video memory, 1 system memory.
        1:1 => aperture, with_aperture;
        /// ADDR: PDB address bits 39:12 (`pdb >> 12`).
        31:4 => addr, with_addr;
    }
}

register! {
    /// `MMU_INVALIDATE_UPPER_PDB` (BAR0 + 0xB830A4): PDB address bits above 40.
    pub struct MmuInvalidateUpperPdb {
        /// ADDR: `pdb >> 40`.
        19:0 => addr, with_addr;
    }
}

/// The page-directory base named by an invalidate PDB register pair.
pub const fn invalidate_pdb_address(lo: MmuInvalidatePdb, hi: MmuInvalidateUpperPdb) -> u64 {
    ((hi.addr() as u64) << 40) | ((lo.addr() as u64) << 12)
}

register! {
    /// `MMU_INVALIDATE` (BAR0 + 0xB830B0): TLB invalidate control. Writing TRIGGER = 1
    /// starts the invalidate; software polls until TRIGGER reads 0.
    pub struct MmuInvalidate {
        /// ALL_VA: invalidate every virtual address.
        0:0 => all_va, with_all_va;
        /// ALL_PDB: invalidate for every page directory (ignore the PDB registers).
        1:1 => all_pdb, with_all_pdb;
        /// HUBTLB_ONLY.
        2:2 => hubtlb_only, with_hubtlb_only;
        /// REPLAY (0 none, 1 start, 2 start-ack-all, 3..5 cancel variants).
        5:3 => replay, with_replay;
        /// SYS_MEMBAR.
        6:6 => sys_membar, with_sys_membar;
        /// ACK (0 none, 1 globally, 2 intranode).
        8:7 => ack, with_ack;
        /// CANCEL_CLIENT_ID.
        14:9 => cancel_client_id, with_cancel_client_id;
        /// CANCEL_GPC_ID.
        19:15 => cancel_gpc_id, with_cancel_gpc_id;
        /// CANCEL_CLIENT_TYPE (0 GPC, 1 HUB).
        20:20 => cancel_client_type, with_cancel_client_type;
        /// USE_PASID.
        21:21 => use_pasid, with_use_pasid;
        /// USE_SIZE.
        22:22 => use_size, with_use_size;
        /// PROP_FLUSH.
        23:23 => prop_flush, with_prop_flush;
        /// CACHE_LEVEL (0 all, 1 PTE only, 2.. up to PDE0..PDE5).
        26:24 => cache_level, with_cache_level;
        /// TRIGGER: write 1 to start; reads 1 while the invalidate is in progress.
        31:31 => trigger, with_trigger;
    }
}

register! {
    /// `BAR1_BLOCK` / `BAR2_BLOCK` (BAR0 + 0xB80F40 / 0xB80F48, Turing–Ada): binds a BAR to
    /// an instance block.
    pub struct BarBlock {
        /// PTR: instance block address >> 12.
        27:0 => ptr, with_ptr;
        /// TARGET (raw [`MemoryTarget`] encoding).
        29:28 => target_raw, with_target_raw;
        /// DEBUG_CYA (BAR2 only; reset value 1).
        30:30 => debug_cya, with_debug_cya;
        /// MODE (raw [`BarMode`] encoding): 0 physical (reset), 1 virtual.
        31:31 => mode_raw, with_mode_raw;
    }
}

impl BarBlock {
    /// The decoded TARGET field.
    pub const fn target(self) -> Result<MemoryTarget, RegsError> {
        MemoryTarget::from_raw(self.target_raw())
    }

    /// The decoded MODE field.
    pub const fn mode(self) -> BarMode {
        BarMode::from_bit(self.mode_raw())
    }

    /// The instance block address (`ptr << 12`).
    pub const fn instance_address(self) -> u64 {
        (self.ptr() as u64) << 12
    }
}

register! {
    /// `BIND_STATUS` (BAR0 + 0xB80F50, Turing–Ada): pending/outstanding bind flags.
    pub struct BindStatus {
        /// BAR1_PENDING.
        0:0 => bar1_pending, with_bar1_pending;
        /// BAR1_OUTSTANDING.
        1:1 => bar1_outstanding, with_bar1_outstanding;
        /// BAR2_PENDING.
        2:2 => bar2_pending, with_bar2_pending;
        /// BAR2_OUTSTANDING.
        3:3 => bar2_outstanding, with_bar2_outstanding;
    }
}

register! {
    /// `BARn_BLOCK_LOW_ADDR` (BAR0 + 0xB80F60 / 0xB80F70, Hopper–Blackwell).
    pub struct BarBlockLow {
        /// PENDING: a bind is in progress.
        0:0 => pending, with_pending;
        /// OUTSTANDING: a bind is outstanding.
        1:1 => outstanding, with_outstanding;
        /// MODE (raw [`BarMode`] encoding).
        9:9 => mode_raw, with_mode_raw;
        /// TARGET (raw [`MemoryTarget`] encoding).
        11:10 => target_raw, with_target_raw;
        /// PTR: instance block address bits 31:12, in place.
        31:12 => ptr, with_ptr;
    }
}

impl BarBlockLow {
    /// The decoded TARGET field.
    pub const fn target(self) -> Result<MemoryTarget, RegsError> {
        MemoryTarget::from_raw(self.target_raw())
    }

    /// The decoded MODE field.
    pub const fn mode(self) -> BarMode {
        BarMode::from_bit(self.mode_raw())
    }
}

register! {
    /// `BARn_BLOCK_HIGH_ADDR` (BAR0 + 0xB80F64 / 0xB80F74, Hopper–Blackwell). Writing it
    /// triggers the bind on hardware.
    pub struct BarBlockHigh {
        /// ADDR: instance block address bits 51:32.
        19:0 => addr, with_addr;
    }
}

/// The instance block address named by a Hopper-style LOW/HIGH block register pair.
pub const fn bar_block_instance_address(low: BarBlockLow, high: BarBlockHigh) -> u64 {
    ((high.addr() as u64) << 32) | ((low.ptr() as u64) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_masks() {
        assert_eq!(field_mask(3, 0), 0xF);
        assert_eq!(field_mask(31, 0), u32::MAX);
        assert_eq!(field_mask(31, 31), 0x8000_0000);
        assert_eq!(field_mask(29, 20), 0x3FF0_0000);
        assert_eq!(Boot0::DEFINED_MASK, 0x1FF0_01FF);
        assert_eq!(PbusBar0Window::DEFINED_MASK, 0x03FF_FFFF);
        assert_eq!(MmuInvalidatePdb::DEFINED_MASK, 0xFFFF_FFF2);
    }

    #[test]
    fn boot0_observed_tu102_value_decodes() {
        // TU102 rev A1 BOOT_0 observed in nouveau logs (gpu-facts 2.2).
        let b = Boot0::from_raw(0x1620_00A1);
        assert_eq!(b.architecture(), 0x16);
        assert_eq!(b.implementation(), 2);
        assert_eq!(b.chipset(), 0x162);
        assert_eq!(b.major_revision(), 0xA);
        assert_eq!(b.minor_revision(), 1);
        assert_eq!(b.generation(), Ok(Generation::Turing));
        assert_eq!(Boot0::for_chip(0x16, 2, 0xA, 1), b);
        // nouveau's decoding: chipset = (boot0 & 0x1FF00000) >> 20.
        assert_eq!((b.raw() & 0x1FF0_0000) >> 20, b.chipset());
    }

    #[test]
    fn boot42_observed_gb202_value_decodes() {
        // GB202 BOOT_42 observed in a nova-core patch (gpu-facts 2.3).
        let b = Boot42::from_raw(0x1B2A_1000);
        assert_eq!(b.architecture(), 0x1B);
        assert_eq!(b.implementation(), 2);
        assert_eq!(b.chip_id(), 0x1B2);
        assert_eq!(b.major_revision(), 0xA);
        assert_eq!(b.minor_revision(), 1);
        assert_eq!(b.minor_extended_revision(), 0);
        assert_eq!(b.generation(), Ok(Generation::Blackwell));
        assert_eq!(Boot42::for_chip(0x1B, 2, 0xA, 1), b);
    }

    #[test]
    fn setters_discard_excess_bits_and_keep_others() {
        let b = Boot0::from_raw(0xFFFF_FFFF).with_implementation(0x12);
        assert_eq!(b.implementation(), 0x2);
        assert_eq!(b.raw(), 0xFF2F_FFFF);
        let r = MmuInvalidate::default().with_trigger(1).with_cache_level(9);
        assert_eq!(r.trigger(), 1);
        assert_eq!(r.cache_level(), 1);
        assert_eq!(r.raw(), 0x8100_0000);
        assert_eq!(u32::from(r), 0x8100_0000);
        assert_eq!(MmuInvalidate::from(0x8100_0000u32), r);
    }

    #[test]
    fn pbus_window_fields() {
        let w = PbusBar0Window::default()
            .with_base_address(VramAddr::new(0x12_3456_0000))
            .unwrap()
            .with_target(WindowTarget::SysMemNonCoherent);
        assert_eq!(w.base(), 0x12_3456);
        assert_eq!(w.target(), Ok(WindowTarget::SysMemNonCoherent));
        assert_eq!(w.raw(), 0x0312_3456);
        assert_eq!(w.base_address(), VramAddr::new(0x12_3456_0000));
        assert_eq!(
            PbusBar0Window::from_raw(0x0100_0000).target(),
            Err(RegsError::ReservedTarget(1))
        );
        assert_eq!(
            PbusBar0Window::default().with_base_address(VramAddr::new(0x1_8000)),
            Err(RegsError::UnalignedWindowBase(VramAddr::new(0x1_8000)))
        );
        assert!(matches!(
            PbusBar0Window::default().with_base_address(VramAddr::new(1 << 40)),
            Err(RegsError::WindowBaseTooLarge { bits: 24, .. })
        ));
        let dbg = format!("{w:?}");
        assert!(dbg.contains("base: 0x123456"), "{dbg}");
        assert!(dbg.contains("target_raw: 0x3"), "{dbg}");
    }

    #[test]
    fn xal_window_fields() {
        assert_eq!(XalBar0Window::base_mask(Generation::Hopper), 0x3F_FFFF);
        assert_eq!(XalBar0Window::base_mask(Generation::Blackwell), 0x7F_FFFF);
        let w = XalBar0Window::default()
            .with_base_address(VramAddr::new(0x3F_FFFF << 16), Generation::Hopper)
            .unwrap();
        assert_eq!(w.raw(), 0x3F_FFFF);
        assert!(XalBar0Window::default()
            .with_base_address(VramAddr::new(1 << 38), Generation::Hopper)
            .is_err());
        assert!(XalBar0Window::default()
            .with_base_address(VramAddr::new(1 << 38), Generation::Blackwell)
            .is_ok());
    }

    #[test]
    fn tlb_and_block_fields() {
        let pdb = 0x12_3456_7000u64;
        let lo = MmuInvalidatePdb::default()
            .with_addr((pdb >> 12) as u32)
            .with_aperture(0);
        let hi = MmuInvalidateUpperPdb::default().with_addr((pdb >> 40) as u32);
        assert_eq!(invalidate_pdb_address(lo, hi), pdb);
        // Register value = pdb >> 8 | aperture << 1 (gpu-facts 4.7).
        assert_eq!(lo.raw() as u64, (pdb >> 8) & 0xFFFF_FFF0);

        let b = BarBlock::from_raw(0xC000_1234);
        assert_eq!(b.mode(), BarMode::Virtual);
        assert_eq!(b.debug_cya(), 1);
        assert_eq!(b.target(), Ok(MemoryTarget::VidMem));
        assert_eq!(b.instance_address(), 0x123_4000);

        let low = BarBlockLow::default()
            .with_ptr(0xABCDE)
            .with_mode_raw(BarMode::Virtual.bit())
            .with_target_raw(MemoryTarget::SysMemCoherent.raw());
        let high = BarBlockHigh::default().with_addr(0x5);
        assert_eq!(low.mode(), BarMode::Virtual);
        assert_eq!(low.target(), Ok(MemoryTarget::SysMemCoherent));
        assert_eq!(bar_block_instance_address(low, high), 0x5_ABCD_E000);
        assert_eq!(BindStatus::DEFINED_MASK, 0xF);
    }

    #[test]
    fn local_memory_range_encodes_the_smallest_size_holding_the_vram() {
        const MIB: u64 = 1 << 20;
        let r = LocalMemoryRange::from_raw(0)
            .with_lower_mag(5)
            .with_lower_scale(14);
        assert_eq!(r.raw(), 0x5E);
        assert_eq!(r.size(), 80 << 30);
        for (bytes, expect) in [
            (80u64 << 30, 80u64 << 30),
            (96 << 30, 96 << 30),
            (24 << 30, 24 << 30),
            (63 * MIB, 63 * MIB),
            (64 * MIB, 64 * MIB),
            (24_220 * MIB, 24 << 30),
            (32_607 * MIB, 32 << 30),
            (81_559 * MIB, 80 << 30),
            (MIB - 1, MIB),
            (0, 0),
        ] {
            let r = LocalMemoryRange::at_least(bytes);
            assert_eq!(r.size(), expect, "{bytes:#x}");
            assert_eq!(r.ecc_mode(), 0);
            assert!(r.size() >= bytes);
        }
        assert_eq!(LocalMemoryRange::at_least(u64::MAX).size(), 63 << 35);
        assert_eq!(UsableFbSizeInMb::for_bytes(95 << 30).mib(), 97_280);
        assert_eq!(UsableFbSizeInMb::for_bytes(3 * MIB - 1).mib(), 2);
        assert_eq!(UsableFbSizeInMb::for_bytes(u64::MAX).mib(), u32::MAX);
    }
}
