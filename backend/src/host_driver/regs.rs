//! Typed registers and table-entry bit layouts: a small bit-field helper ([`Field`] and
//! the crate-internal `bitfield!` macro), the BAR0 registers the host driver
//! programs, typed 32-bit register access over [`HostGpu`], and a bounded poll loop.
//!
//! Bit positions follow `gpu-facts.md` (sections 2.4, 4.5–4.7); anything not stated there
//! is marked **unconfirmed** where it is defined.

use std::fmt;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::host_gpu::{AccessWidth, HostGpu, HostGpuError};

/// Errors of typed register access.
#[derive(Debug, Error)]
pub enum RegError {
    /// The BAR0 access failed.
    #[error("register {name} at BAR0 {offset:#x}: {source}")]
    Access {
        /// Register name.
        name: &'static str,
        /// BAR0 offset.
        offset: u64,
        /// What the host GPU reported.
        #[source]
        source: HostGpuError,
    },
}

/// A bit range `hi:lo` (inclusive) of a register or table entry of up to 128 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Field {
    /// Highest bit of the field.
    pub hi: u32,
    /// Lowest bit of the field.
    pub lo: u32,
}

impl Field {
    /// The field `hi:lo`. `hi >= lo` and `hi < 128` are checked when the constant is built
    /// (a bad definition fails to compile when used in a `const`).
    pub const fn new(hi: u32, lo: u32) -> Field {
        assert!(hi >= lo && hi < 128, "bad bit field");
        Field { hi, lo }
    }

    /// Number of bits.
    pub const fn width(self) -> u32 {
        self.hi - self.lo + 1
    }

    /// Largest value the field holds.
    pub const fn max(self) -> u128 {
        if self.width() == 128 {
            u128::MAX
        } else {
            (1u128 << self.width()) - 1
        }
    }

    /// The field's bits in place.
    pub const fn mask(self) -> u128 {
        self.max() << self.lo
    }

    /// Whether `value` fits the field without truncation.
    pub const fn fits(self, value: u128) -> bool {
        value <= self.max()
    }

    /// The field's value in `raw`.
    #[inline]
    pub const fn get(self, raw: u128) -> u128 {
        (raw >> self.lo) & self.max()
    }

    /// `raw` with the field replaced by `value` (truncated to the field width).
    #[inline]
    pub const fn set(self, raw: u128, value: u128) -> u128 {
        (raw & !self.mask()) | ((value & self.max()) << self.lo)
    }
}

/// Defines a `Copy` newtype over an unsigned integer with named bit fields.
///
/// For each `getter, setter, CONST: hi:lo;` line it generates an associated [`Field`]
/// constant, a getter returning the field value and a `with_`-style setter that returns
/// a copy with the field replaced (the value is truncated to the field width: check
/// `Type::CONST.fits(v)` first where a value may not fit). `DEFINED_MASK` is the union
/// of all fields (overlapping alternative layouts included).
macro_rules! bitfield {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($ty:ty) {
            $(
                $(#[$fmeta:meta])*
                $getter:ident, $setter:ident, $FIELD:ident : $hi:literal : $lo:literal;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        $vis struct $name($ty);

        #[allow(dead_code)]
        impl $name {
            $(
                $(#[$fmeta])*
                pub const $FIELD: $crate::host_driver::regs::Field =
                    $crate::host_driver::regs::Field::new($hi, $lo);
            )*

            /// Union of all defined fields.
            pub const DEFINED_MASK: $ty = 0 $(| (Self::$FIELD.mask() as $ty))*;

            /// Wraps a raw value.
            pub const fn from_raw(raw: $ty) -> Self {
                Self(raw)
            }

            /// The raw value.
            pub const fn raw(self) -> $ty {
                self.0
            }

            $(
                $(#[$fmeta])*
                #[inline]
                pub const fn $getter(self) -> $ty {
                    Self::$FIELD.get(self.0 as u128) as $ty
                }

                /// Returns a copy with this field set (value truncated to the field width).
                #[inline]
                pub const fn $setter(self, value: $ty) -> Self {
                    Self(Self::$FIELD.set(self.0 as u128, value as u128) as $ty)
                }
            )*
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("raw", &format_args!("{:#x}", self.0))
                    $(.field(stringify!($getter), &format_args!("{:#x}", self.$getter())))*
                    .finish()
            }
        }
    };
}

pub(crate) use bitfield;

/// A 32-bit BAR0 register at a fixed offset.
pub trait Register32: Copy {
    /// BAR0 offset.
    const OFFSET: u64;
    /// Name for diagnostics.
    const NAME: &'static str;
    /// Wraps a raw value.
    fn from_u32(raw: u32) -> Self;
    /// The raw value.
    fn to_u32(self) -> u32;
}

macro_rules! register32 {
    ($name:ident, $offset:expr, $regname:literal) => {
        impl Register32 for $name {
            const OFFSET: u64 = $offset;
            const NAME: &'static str = $regname;
            fn from_u32(raw: u32) -> Self {
                Self::from_raw(raw)
            }
            fn to_u32(self) -> u32 {
                self.raw()
            }
        }
    };
}

/// Reads register `R`.
pub fn read_reg<R: Register32>(gpu: &dyn HostGpu) -> Result<R, RegError> {
    gpu.bar0_read(R::OFFSET, AccessWidth::Dword)
        .map(|v| R::from_u32(v as u32))
        .map_err(|source| RegError::Access {
            name: R::NAME,
            offset: R::OFFSET,
            source,
        })
}

/// Writes register `R`.
pub fn write_reg<R: Register32>(gpu: &dyn HostGpu, value: R) -> Result<(), RegError> {
    gpu.bar0_write(R::OFFSET, AccessWidth::Dword, u64::from(value.to_u32()))
        .map_err(|source| RegError::Access {
            name: R::NAME,
            offset: R::OFFSET,
            source,
        })
}

/// Memory target encoding shared by the window register TARGET, the BAR block TARGET and
/// the instance-block PAGE_DIR_BASE_TARGET (gpu-facts 2.4, 4.5, 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemTarget {
    /// Video memory (0).
    Vram,
    /// Coherent system memory (2).
    SysCoherent,
    /// Non-coherent system memory (3).
    SysNonCoherent,
}

impl MemTarget {
    /// The 2-bit encoding.
    pub const fn raw(self) -> u32 {
        match self {
            MemTarget::Vram => 0,
            MemTarget::SysCoherent => 2,
            MemTarget::SysNonCoherent => 3,
        }
    }

    /// Decodes the 2-bit encoding (1 is unused).
    pub const fn from_raw(raw: u32) -> Option<MemTarget> {
        match raw {
            0 => Some(MemTarget::Vram),
            2 => Some(MemTarget::SysCoherent),
            3 => Some(MemTarget::SysNonCoherent),
            _ => None,
        }
    }
}

impl fmt::Display for MemTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemTarget::Vram => "VID_MEM",
            MemTarget::SysCoherent => "SYS_MEM_COHERENT",
            MemTarget::SysNonCoherent => "SYS_MEM_NONCOHERENT",
        })
    }
}

bitfield! {
    /// `NV_PBUS_BAR0_WINDOW` (Maxwell–Ada, BAR0 0x1700): BASE = VRAM address >> 16 and the
    /// aperture TARGET (gpu-facts 2.4).
    pub struct PbusBar0Window(u32) {
        /// Window base in 64 KiB units.
        base, with_base, BASE: 23:0;
        /// 0 VID_MEM, 2 SYS_MEM_COHERENT, 3 SYS_MEM_NONCOHERENT.
        target, with_target, TARGET: 25:24;
    }
}
register32!(PbusBar0Window, 0x1700, "NV_PBUS_BAR0_WINDOW");

bitfield! {
    /// `NV_XAL_EP_ZB_BAR0_WINDOW` (Hopper/Blackwell, BAR0 0x10FD40): BASE only, always
    /// VIDMEM (gpu-facts 2.4). The field is 21:0 on GH100 and 22:0 on GB10x (24:0 on the
    /// integrated GB10B); it is defined here at its widest and the PRAMIN owner limits it
    /// per generation.
    pub struct XalBar0Window(u32) {
        /// Window base in 64 KiB units.
        base, with_base, BASE: 24:0;
    }
}
register32!(XalBar0Window, 0x10_FD40, "NV_XAL_EP_ZB_BAR0_WINDOW");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE_PDB` (BAR0 0xB830A0, gpu-facts 4.7).
    pub struct MmuInvalidatePdb(u32) {
        /// 0 VID, 1 SYS.
        aperture, with_aperture, APERTURE: 1:1;
        /// PDB address >> 12 (address bits 39:12).
        addr, with_addr, ADDR: 31:4;
    }
}
register32!(MmuInvalidatePdb, 0xB8_30A0, "MMU_INVALIDATE_PDB");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE_UPPER_PDB` (BAR0 0xB830A4, gpu-facts 4.7).
    pub struct MmuInvalidateUpperPdb(u32) {
        /// PDB address >> 40.
        addr, with_addr, ADDR: 19:0;
    }
}
register32!(MmuInvalidateUpperPdb, 0xB8_30A4, "MMU_INVALIDATE_UPPER_PDB");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_MMU_INVALIDATE` (BAR0 0xB830B0, gpu-facts 4.7).
    pub struct MmuInvalidate(u32) {
        /// Invalidate every VA.
        all_va, with_all_va, ALL_VA: 0:0;
        /// Invalidate for every PDB (the PDB registers are ignored).
        all_pdb, with_all_pdb, ALL_PDB: 1:1;
        /// Only the hub TLB.
        hubtlb_only, with_hubtlb_only, HUBTLB_ONLY: 2:2;
        /// Replay mode (0 none).
        replay, with_replay, REPLAY: 5:3;
        /// System membar.
        sys_membar, with_sys_membar, SYS_MEMBAR: 6:6;
        /// Ack mode (0 none, 1 globally, 2 intranode).
        ack, with_ack, ACK: 8:7;
        /// Cancel client id.
        cancel_client_id, with_cancel_client_id, CANCEL_CLIENT_ID: 14:9;
        /// Cancel GPC id.
        cancel_gpc_id, with_cancel_gpc_id, CANCEL_GPC_ID: 19:15;
        /// Cancel client type (0 GPC, 1 HUB).
        cancel_client_type, with_cancel_client_type, CANCEL_CLIENT_TYPE: 20:20;
        /// Use PASID.
        use_pasid, with_use_pasid, USE_PASID: 21:21;
        /// Use size.
        use_size, with_use_size, USE_SIZE: 22:22;
        /// Propagate flush.
        prop_flush, with_prop_flush, PROP_FLUSH: 23:23;
        /// Cache level (0 all, 1 PTE only, 2..7 up to PDE0..PDE5).
        cache_level, with_cache_level, CACHE_LEVEL: 26:24;
        /// Write 1 to start; reads 1 while the invalidate is in progress.
        trigger, with_trigger, TRIGGER: 31:31;
    }
}
register32!(MmuInvalidate, 0xB8_30B0, "MMU_INVALIDATE");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_BAR1_BLOCK` (Turing–Ada, BAR0 0xB80F40, gpu-facts 4.6).
    pub struct Bar1Block(u32) {
        /// Instance block address >> 12.
        ptr, with_ptr, PTR: 27:0;
        /// Instance block target (0 VID, 2 SYS_COH, 3 SYS_NCOH).
        target, with_target, TARGET: 29:28;
        /// 0 physical, 1 virtual.
        mode, with_mode, MODE: 31:31;
    }
}
register32!(Bar1Block, 0xB8_0F40, "BAR1_BLOCK");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_BIND_STATUS` (Turing–Ada, BAR0 0xB80F50, gpu-facts 4.6).
    pub struct BindStatus(u32) {
        /// BAR1 bind pending.
        bar1_pending, with_bar1_pending, BAR1_PENDING: 0:0;
        /// BAR1 bind outstanding.
        bar1_outstanding, with_bar1_outstanding, BAR1_OUTSTANDING: 1:1;
        /// BAR2 bind pending.
        bar2_pending, with_bar2_pending, BAR2_PENDING: 2:2;
        /// BAR2 bind outstanding.
        bar2_outstanding, with_bar2_outstanding, BAR2_OUTSTANDING: 3:3;
    }
}
register32!(BindStatus, 0xB8_0F50, "BIND_STATUS");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR1_BLOCK_LOW_ADDR` (Hopper–Blackwell, BAR0
    /// 0xB80F60, gpu-facts 4.6).
    pub struct Bar1BlockLow(u32) {
        /// Bind pending.
        pending, with_pending, PENDING: 0:0;
        /// Bind outstanding.
        outstanding, with_outstanding, OUTSTANDING: 1:1;
        /// 0 physical, 1 virtual.
        mode, with_mode, MODE: 9:9;
        /// Instance block target (0 VID, 2 SYS_COH, 3 SYS_NCOH).
        target, with_target, TARGET: 11:10;
        /// Instance block address bits 31:12, in place.
        ptr, with_ptr, PTR: 31:12;
    }
}
register32!(Bar1BlockLow, 0xB8_0F60, "BAR1_BLOCK_LOW_ADDR");

bitfield! {
    /// `NV_VIRTUAL_FUNCTION_PRIV_FUNC_BAR1_BLOCK_HIGH_ADDR` (Hopper–Blackwell, BAR0
    /// 0xB80F64): instance block address bits above 32. Writing it triggers the bind.
    pub struct Bar1BlockHigh(u32) {
        /// Instance block address >> 32.
        ptr_hi, with_ptr_hi, PTR_HI: 19:0;
    }
}
register32!(Bar1BlockHigh, 0xB8_0F64, "BAR1_BLOCK_HIGH_ADDR");

bitfield! {
    /// Instance block word 128 (byte 0x200): PAGE_DIR_BASE low word (gpu-facts 4.5).
    pub struct RaminPageDirBaseLo(u32) {
        /// PAGE_DIR_BASE_TARGET (0 VID, 2 SYS_COH, 3 SYS_NONCOH).
        target, with_target, TARGET: 1:0;
        /// PAGE_DIR_BASE_VOL.
        vol, with_vol, VOL: 2:2;
        /// FAULT_REPLAY_TEX.
        fault_replay_tex, with_fault_replay_tex, FAULT_REPLAY_TEX: 4:4;
        /// FAULT_REPLAY_GCC.
        fault_replay_gcc, with_fault_replay_gcc, FAULT_REPLAY_GCC: 5:5;
        /// USE_NEW_PT_FORMAT ("VER2").
        use_new_pt_format, with_use_new_pt_format, USE_NEW_PT_FORMAT: 10:10;
        /// BIG_PAGE_SIZE (1 = 64 KiB, 0 = 128 KiB).
        big_page_size, with_big_page_size, BIG_PAGE_SIZE: 11:11;
        /// Root directory address bits 31:12, in place.
        addr_lo, with_addr_lo, ADDR_LO: 31:12;
    }
}

bitfield! {
    /// Instance block word 129 (byte 0x204): PAGE_DIR_BASE_HI.
    pub struct RaminPageDirBaseHi(u32) {
        /// Root directory address bits 63:32.
        addr_hi, with_addr_hi, ADDR_HI: 31:0;
    }
}

bitfield! {
    /// Instance block word 130 (byte 0x208): ADR_LIMIT_LO.
    pub struct RaminAdrLimitLo(u32) {
        /// VA limit bits 31:12, in place.
        limit_lo, with_limit_lo, LIMIT_LO: 31:12;
    }
}

bitfield! {
    /// Instance block word 131 (byte 0x20C): ADR_LIMIT_HI.
    pub struct RaminAdrLimitHi(u32) {
        /// VA limit bits 63:32.
        limit_hi, with_limit_hi, LIMIT_HI: 31:0;
    }
}

bitfield! {
    /// GSP falcon `MAILBOX0` (BAR0 0x110040, gpu-facts 3.3): before STARTCPU the low half
    /// of the LibOS argument array's DMA address; after it the GSP's start status.
    pub struct GspMailbox0(u32) {
        /// The whole register.
        value, with_value, VALUE: 31:0;
    }
}
register32!(GspMailbox0, 0x11_0040, "GSP_FALCON_MAILBOX0");

bitfield! {
    /// GSP falcon `MAILBOX1` (BAR0 0x110044): the high half of the LibOS argument array's
    /// DMA address.
    pub struct GspMailbox1(u32) {
        /// The whole register.
        value, with_value, VALUE: 31:0;
    }
}
register32!(GspMailbox1, 0x11_0044, "GSP_FALCON_MAILBOX1");

bitfield! {
    /// GSP falcon `CPUCTL` (BAR0 0x110100, gpu-facts 3.3).
    pub struct GspCpuCtl(u32) {
        /// STARTCPU: write 1 to start the falcon's CPU.
        startcpu, with_startcpu, STARTCPU: 1:1;
        /// HALTED: reads 1 while the CPU is not running.
        halted, with_halted, HALTED: 4:4;
        /// ALIAS_EN.
        alias_en, with_alias_en, ALIAS_EN: 6:6;
    }
}
register32!(GspCpuCtl, 0x11_0100, "GSP_FALCON_CPUCTL");

bitfield! {
    /// GSP falcon `ENGINE` (BAR0 0x1103C0, gpu-facts 3.3): reset control.
    pub struct GspEngine(u32) {
        /// RESET: 1 holds the falcon (and the GSP) in reset.
        reset, with_reset, RESET: 0:0;
    }
}
register32!(GspEngine, 0x11_03C0, "GSP_FALCON_ENGINE");

/// Polls `probe` until it returns `Some`, for at least `timeout`. The probe always runs
/// once more after the deadline, so a late wake-up never reports a false timeout.
/// Returns `Ok(None)` on timeout.
pub fn poll_until<T, E>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let expired = start.elapsed() >= timeout;
        if let Some(v) = probe()? {
            return Ok(Some(v));
        }
        if expired {
            return Ok(None);
        }
        // Hardware usually completes within microseconds: spin briefly, then back off.
        spins = spins.saturating_add(1);
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    bitfield! {
        struct Wide(u128) {
            low, with_low, LOW: 3:0;
            top, with_top, TOP: 127:120;
        }
    }

    #[test]
    fn fields_get_set_and_truncate() {
        let f = Field::new(7, 4);
        assert_eq!(f.width(), 4);
        assert_eq!(f.mask(), 0xF0);
        assert!(f.fits(15) && !f.fits(16));
        assert_eq!(f.set(0xFFFF, 0x3), 0xFF3F);
        assert_eq!(f.get(0xABCD), 0xC);
        assert_eq!(Field::new(127, 0).max(), u128::MAX);
        let w = Wide::from_raw(0).with_low(0x1F).with_top(0xAB);
        assert_eq!(w.low(), 0xF, "truncated to the field width");
        assert_eq!(w.top(), 0xAB);
        assert_eq!(Wide::DEFINED_MASK, 0xFF << 120 | 0xF);
    }

    #[test]
    fn register_layouts_match_the_fact_sheet() {
        // 0x1700: BASE 23:0, TARGET 25:24.
        let w = PbusBar0Window::from_raw(0)
            .with_base(0x12_3456)
            .with_target(2);
        assert_eq!(w.raw(), 0x0212_3456);
        // MMU_INVALIDATE_PDB = pdb >> 8 | aperture << 1 for a 4 KiB-aligned pdb.
        let pdb = 0x12_3456_7000u64;
        let r = MmuInvalidatePdb::from_raw(0).with_addr((pdb >> 12) as u32);
        assert_eq!(u64::from(r.raw()), (pdb >> 8) & 0xFFFF_FFF0);
        assert_eq!(
            MmuInvalidate::from_raw(0).with_trigger(1).raw(),
            0x8000_0000
        );
        assert_eq!(
            Bar1Block::from_raw(0).with_ptr(0x1234).with_mode(1).raw(),
            0x8000_1234
        );
        assert_eq!(
            Bar1BlockLow::from_raw(0)
                .with_ptr(0xABCDE)
                .with_target(2)
                .with_mode(1)
                .raw(),
            0xABCD_E800 | 0x200
        );
        assert_eq!(
            RaminPageDirBaseLo::from_raw(0)
                .with_use_new_pt_format(1)
                .with_big_page_size(1)
                .raw(),
            0xC00
        );
        // GSP falcon (gpu-facts 3.3): CPUCTL bit1 STARTCPU, bit4 HALTED; ENGINE bit0.
        assert_eq!(GspCpuCtl::from_raw(0).with_startcpu(1).raw(), 0x2);
        assert_eq!(GspCpuCtl::from_raw(0x10).halted(), 1);
        assert_eq!(GspEngine::from_raw(0).with_reset(1).raw(), 1);
        assert_eq!(
            [
                GspMailbox0::OFFSET,
                GspMailbox1::OFFSET,
                GspCpuCtl::OFFSET,
                GspEngine::OFFSET
            ],
            [0x110040, 0x110044, 0x110100, 0x1103C0]
        );
    }

    #[test]
    fn poll_times_out_and_succeeds() {
        let r: Result<Option<()>, ()> = poll_until(Duration::from_millis(5), || Ok(None));
        assert_eq!(r, Ok(None));
        let mut n = 0;
        let r: Result<Option<u32>, ()> = poll_until(Duration::from_secs(5), || {
            n += 1;
            Ok((n == 3).then_some(n))
        });
        assert_eq!(r, Ok(Some(3)));
    }
}
