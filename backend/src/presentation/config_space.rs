//! PCI configuration space of the presented function (4 KiB, PCIe extended).
//!
//! The space is a byte image plus a per-byte write mask: a write changes only
//! the bits its mask allows (`new = (old & !mask) | (data & mask)`), so every
//! access of any width at any offset behaves byte by byte, including accesses
//! that straddle registers.
//!
//! BAR emulation is layered on that mechanism, as on hardware and in
//! nvgrace-gpu's fake-BAR emulation: the type bits of a BAR register are
//! read-only image bits and only the size-aligned address bits are writable.
//! Writing all-ones and reading back therefore yields `~(size - 1)` with the
//! type bits (the sizing probe), and the upper dword of a 64-bit BAR yields
//! the high half of that mask. Nothing else in the header reacts to writes.
//!
//! Layout:
//! - type-0 header ([`offset`]), status "capabilities list" set;
//! - capabilities ([`cap_id`]): Power Management at [`PM_CAP_OFFSET`]
//!   (version 3; D0 and D3hot, no D1/D2, no PME; No_Soft_Reset), PCI Express at
//!   [`PCIE_CAP_OFFSET`]
//!   (version 2 endpoint, x16 at 16 GT/s, no slot), and, if declared, MSI-X at
//!   [`MSIX_CAP_OFFSET`];
//! - extended space `0x100..0x1000` empty (reads 0, ignores writes).
//!
//! Writable: command bits [`Command::MEMORY_SPACE`], [`Command::BUS_MASTER`],
//! [`Command::INTX_DISABLE`] and, if an I/O BAR exists, [`Command::IO_SPACE`];
//! cache line size and interrupt line (scratch); BAR address bits; MSI-X
//! enable and function mask; the PMCSR power state; and the PCIe device/link
//! control fields an OS configures (scratch, no effect). Status bits are
//! read-only (RW1C is not emulated). The expansion ROM BAR reads 0 and ignores
//! writes.
//!
//! # Power states
//!
//! The PMCSR PowerState field (bits 1:0) reads back what was written, as on a
//! device: D0 (0) or D3hot (3). The PMC advertises neither D1 nor D2, so a
//! write of 1 or 2 leaves the state unchanged. No_Soft_Reset is set: going
//! from D3hot back to D0 keeps the configuration (BAR addresses, command
//! register), so the BARs are where they were. [`ConfigSpace::power_state`]
//! tells the function whether to answer BAR accesses (a device in D3hot
//! answers config space only); a reset returns to D0. FLR is not offered.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::host_driver::regs::bitfield;

/// Size of the (PCIe extended) configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;

/// Size of the conventional PCI part of the configuration space.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

/// Number of BAR slots in a type-0 header.
pub const BAR_COUNT: usize = 6;

/// Offsets of the type-0 header registers.
pub mod offset {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command register (u16).
    pub const COMMAND: usize = 0x04;
    /// Status register (u16).
    pub const STATUS: usize = 0x06;
    /// Revision ID (u8).
    pub const REVISION_ID: usize = 0x08;
    /// Class code (24 bits: programming interface, subclass, base class).
    pub const CLASS_CODE: usize = 0x09;
    /// Cache line size (u8).
    pub const CACHE_LINE_SIZE: usize = 0x0C;
    /// Latency timer (u8; hardwired to 0 on PCIe).
    pub const LATENCY_TIMER: usize = 0x0D;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0E;
    /// BIST (u8).
    pub const BIST: usize = 0x0F;
    /// First BAR register; BAR `n` is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2E;
    /// Expansion ROM base address (u32).
    pub const ROM_BAR: usize = 0x30;
    /// Capabilities pointer (u8).
    pub const CAPABILITIES_POINTER: usize = 0x34;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: usize = 0x3C;
    /// Interrupt pin (u8).
    pub const INTERRUPT_PIN: usize = 0x3D;
}

/// Capability IDs used in the capabilities list.
pub mod cap_id {
    /// PCI Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Offset of the Power Management capability.
pub const PM_CAP_OFFSET: usize = 0x40;
/// Offset of the PCI Express capability.
pub const PCIE_CAP_OFFSET: usize = 0x60;
/// Offset of the MSI-X capability (present only if declared).
pub const MSIX_CAP_OFFSET: usize = 0xA0;

/// Status register: the capabilities list is present.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

/// Header type 0 (general device), single function.
const HEADER_TYPE_GENERAL: u8 = 0x00;

/// Low bit of an I/O BAR.
pub const BAR_IO_SPACE: u32 = 0x1;
/// Memory BAR type field value for a 64-bit BAR.
pub const BAR_MEM_TYPE_64: u32 = 0x4;
/// Memory BAR prefetchable bit.
pub const BAR_PREFETCHABLE: u32 = 0x8;
/// Read-only flag bits at the bottom of a memory BAR.
const BAR_MEM_FLAG_BITS: u64 = 0xF;
/// Read-only flag bits at the bottom of an I/O BAR.
const BAR_IO_FLAG_BITS: u64 = 0x3;
/// Smallest memory BAR.
pub const MIN_MEMORY_BAR_SIZE: u64 = 16;
/// Smallest I/O BAR.
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Largest I/O BAR (PCI allows at most 256 bytes per I/O BAR).
pub const MAX_IO_BAR_SIZE: u64 = 256;
/// Largest 32-bit memory BAR.
pub const MAX_MEMORY32_BAR_SIZE: u64 = 1 << 31;
/// Largest 64-bit memory BAR.
pub const MAX_MEMORY64_BAR_SIZE: u64 = 1 << 63;

/// Largest interrupt pin value (INTD).
pub const MAX_INTERRUPT_PIN: u8 = 4;
/// Largest MSI-X table size.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Size of one MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// MSI-X table and PBA offsets must be multiples of this (the low bits hold the BIR).
pub const MSIX_OFFSET_ALIGN: u32 = 8;

/// Layout of the Power Management capability.
mod pm {
    /// Power Management Capabilities (u16).
    pub const PMC: usize = 0x02;
    /// Power Management Control/Status (u16).
    pub const PMCSR: usize = 0x04;
    /// Length of the capability.
    pub const LEN: usize = 0x08;
    /// PMC: specification version 3 (PCI PM 1.2).
    pub const PMC_VERSION_3: u16 = 0x3;
}

bitfield! {
    /// Power Management Capabilities (PCI PM 1.2, 3.2.3).
    pub struct Pmc(u16) {
        /// Version of the PM specification (3: PCI PM 1.2).
        version, with_version, VERSION: 2:0;
        /// The function supports D1.
        d1_support, with_d1_support, D1_SUPPORT: 9:9;
        /// The function supports D2.
        d2_support, with_d2_support, D2_SUPPORT: 10:10;
        /// States from which the function can assert PME#.
        pme_support, with_pme_support, PME_SUPPORT: 15:11;
    }
}

bitfield! {
    /// Power Management Control/Status (PCI PM 1.2, 3.2.4).
    pub struct Pmcsr(u16) {
        /// Current power state (see [`PowerState`]).
        power_state, with_power_state, POWER_STATE: 1:0;
        /// D3hot to D0 does not reset the function's configuration.
        no_soft_reset, with_no_soft_reset, NO_SOFT_RESET: 3:3;
    }
}

/// A PCI function power state (PMCSR PowerState).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// Fully on.
    D0,
    /// Light sleep (not supported by the presented function).
    D1,
    /// Deeper sleep (not supported by the presented function).
    D2,
    /// Off with power kept: the function answers config space only.
    D3Hot,
}

impl PowerState {
    /// The state a PowerState field value names.
    pub fn from_field(field: u16) -> PowerState {
        match field & 0x3 {
            0 => PowerState::D0,
            1 => PowerState::D1,
            2 => PowerState::D2,
            _ => PowerState::D3Hot,
        }
    }

    /// The PowerState field value.
    pub fn field(self) -> u16 {
        match self {
            PowerState::D0 => 0,
            PowerState::D1 => 1,
            PowerState::D2 => 2,
            PowerState::D3Hot => 3,
        }
    }
}

/// Layout of the PCI Express capability (version 2, endpoint).
mod pcie {
    /// PCI Express Capabilities register (u16).
    pub const FLAGS: usize = 0x02;
    /// Device Capabilities (u32).
    pub const DEVCAP: usize = 0x04;
    /// Device Control (u16).
    pub const DEVCTL: usize = 0x08;
    /// Link Capabilities (u32).
    pub const LNKCAP: usize = 0x0C;
    /// Link Control (u16).
    pub const LNKCTL: usize = 0x10;
    /// Link Status (u16).
    pub const LNKSTA: usize = 0x12;
    /// Link Capabilities 2 (u32).
    pub const LNKCAP2: usize = 0x2C;
    /// Link Control 2 (u16).
    pub const LNKCTL2: usize = 0x30;
    /// Length of a version 2 capability without slot/root registers in use.
    pub const LEN: usize = 0x3C;

    /// Capability version 2, device/port type 0 (PCI Express endpoint), no slot.
    pub const FLAGS_V2_ENDPOINT: u16 = 0x0002;
    /// DEVCAP: max payload 256 bytes, extended tags, role-based error reporting.
    pub const DEVCAP_VALUE: u32 = 0b001 | (1 << 5) | (1 << 15);
    /// DEVCTL reset value: relaxed ordering, no snoop, max read request 512 bytes.
    pub const DEVCTL_RESET: u16 = (1 << 4) | (1 << 11) | (0b010 << 12);
    /// DEVCTL bits an OS configures: error reporting enables, relaxed
    /// ordering, max payload, extended tags, no snoop, max read request.
    pub const DEVCTL_WRITABLE: u16 = 0x01FF | (1 << 11) | (0b111 << 12);
    /// Link speed encoding for 16 GT/s (Gen4).
    pub const SPEED_16GT: u16 = 4;
    /// Link width x16.
    pub const WIDTH_X16: u16 = 16;
    /// LNKCAP: max speed 16 GT/s, max width x16, no ASPM, port 0.
    pub const LNKCAP_VALUE: u32 = (SPEED_16GT as u32) | ((WIDTH_X16 as u32) << 4);
    /// LNKCTL bits an OS configures: ASPM control, read completion boundary,
    /// common clock configuration, extended synch.
    pub const LNKCTL_WRITABLE: u16 = 0b11 | (1 << 3) | (1 << 6) | (1 << 7);
    /// LNKSTA: trained at 16 GT/s x16, slot clock configuration.
    pub const LNKSTA_VALUE: u16 = SPEED_16GT | (WIDTH_X16 << 4) | (1 << 12);
    /// LNKCAP2: supported link speeds 2.5, 5, 8 and 16 GT/s.
    pub const LNKCAP2_VALUE: u32 = 0b1111 << 1;
    /// LNKCTL2: target link speed 16 GT/s.
    pub const LNKCTL2_VALUE: u16 = SPEED_16GT;
}

/// Layout of the MSI-X capability.
mod msix {
    /// Message Control (u16).
    pub const MESSAGE_CONTROL: usize = 0x02;
    /// Table offset / BIR (u32).
    pub const TABLE: usize = 0x04;
    /// PBA offset / BIR (u32).
    pub const PBA: usize = 0x08;
    /// Length of the capability.
    pub const LEN: usize = 0x0C;
    /// Message Control: MSI-X enable.
    pub const ENABLE: u16 = 1 << 15;
    /// Message Control: function mask.
    pub const FUNCTION_MASK: u16 = 1 << 14;
}

/// Kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// 32-bit memory BAR (one slot).
    Memory32,
    /// 64-bit memory BAR (occupies its slot and the next one).
    Memory64,
    /// I/O space BAR.
    Io,
}

impl BarKind {
    /// Whether the BAR decodes memory space.
    pub fn is_memory(self) -> bool {
        matches!(self, Self::Memory32 | Self::Memory64)
    }
}

/// Declaration of one presented BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarDecl {
    /// Presented size in bytes (a power of two; for padded BARs the
    /// [`presented_size`](super::padded_bar::PaddedBar::presented_size)).
    pub size: u64,
    /// Kind of BAR.
    pub kind: BarKind,
    /// Prefetchable (memory BARs only).
    pub prefetchable: bool,
}

/// Declaration of the MSI-X capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixDecl {
    /// Number of vectors (table size), `1..=2048`.
    pub vectors: u16,
    /// BAR slot holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR slot holding the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixDecl {
    /// Byte range of the table inside its BAR.
    pub fn table_range(&self) -> Range<u64> {
        let start = u64::from(self.table_offset);
        start..start + u64::from(self.vectors) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Byte range of the pending bit array inside its BAR (one u64 per 64 vectors).
    pub fn pba_range(&self) -> Range<u64> {
        let start = u64::from(self.pba_offset);
        start..start + u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// Everything that defines the presented function's configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceSpec {
    /// Vendor ID (not 0xFFFF).
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Class code: base class, subclass, programming interface (24 bits).
    pub class_code: u32,
    /// Revision ID.
    pub revision: u8,
    /// BAR slots; the slot after a [`BarKind::Memory64`] BAR must be `None`.
    pub bars: [Option<BarDecl>; BAR_COUNT],
    /// MSI-X capability, if any.
    pub msix: Option<MsixDecl>,
    /// Interrupt pin: 0 (none) or 1..=4 (INTA..INTD).
    pub interrupt_pin: u8,
}

/// Errors of configuration-space construction and access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSpaceError {
    /// The access does not fit inside the 4 KiB configuration space.
    #[error(
        "config access at {offset:#x} of {len} bytes is outside the {CONFIG_SPACE_SIZE}-byte space"
    )]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
    /// 0xFFFF is what an absent function reads as; it cannot be a vendor ID.
    #[error("vendor ID 0xffff is invalid")]
    InvalidVendorId,
    /// The class code does not fit in 24 bits.
    #[error("class code {class_code:#x} is wider than 24 bits")]
    InvalidClassCode {
        /// The offending class code.
        class_code: u32,
    },
    /// The interrupt pin is not 0..=4.
    #[error("interrupt pin {pin} is not 0..=4")]
    InvalidInterruptPin {
        /// The offending pin.
        pin: u8,
    },
    /// A BAR size is not a power of two or is out of the range of its kind.
    #[error("BAR {slot}: size {size:#x} is not a valid {kind:?} BAR size")]
    InvalidBarSize {
        /// BAR slot.
        slot: usize,
        /// Declared size.
        size: u64,
        /// Declared kind.
        kind: BarKind,
    },
    /// An I/O BAR is declared prefetchable.
    #[error("BAR {slot}: I/O BARs cannot be prefetchable")]
    PrefetchableIoBar {
        /// BAR slot.
        slot: usize,
    },
    /// A 64-bit BAR is declared in the last slot.
    #[error("BAR {slot}: a 64-bit BAR cannot use the last slot")]
    Bar64AtLastSlot {
        /// BAR slot.
        slot: usize,
    },
    /// The slot after a 64-bit BAR is declared too.
    #[error("BAR {slot}: 64-bit BAR overlaps BAR {upper}, which is also declared")]
    BarOverlap {
        /// Slot of the 64-bit BAR.
        slot: usize,
        /// The slot it also occupies.
        upper: usize,
    },
    /// The MSI-X vector count is not 1..=2048.
    #[error("MSI-X vector count {vectors} is not 1..={MAX_MSIX_VECTORS}")]
    InvalidMsixVectors {
        /// Declared vector count.
        vectors: u16,
    },
    /// An MSI-X structure names a slot without a memory BAR.
    #[error("MSI-X {structure} BAR {bar} is not a declared memory BAR")]
    InvalidMsixBar {
        /// "table" or "PBA".
        structure: &'static str,
        /// Declared BAR slot.
        bar: u8,
    },
    /// An MSI-X structure offset is not 8-byte aligned.
    #[error("MSI-X {structure} offset {offset:#x} is not {MSIX_OFFSET_ALIGN}-byte aligned")]
    MisalignedMsixOffset {
        /// "table" or "PBA".
        structure: &'static str,
        /// Declared offset.
        offset: u32,
    },
    /// An MSI-X structure does not fit in its BAR.
    #[error("MSI-X {structure} ends at {end:#x}, past its BAR of {bar_size:#x} bytes")]
    MsixOutsideBar {
        /// "table" or "PBA".
        structure: &'static str,
        /// End of the structure.
        end: u64,
        /// Size of the BAR.
        bar_size: u64,
    },
    /// The MSI-X table and PBA overlap.
    #[error("MSI-X table and PBA overlap")]
    MsixOverlap,
}

impl ConfigSpaceError {
    /// The errno a config-region handler should report (always `EINVAL`).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// The command register, with typed bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Command(u16);

impl Command {
    /// I/O space enable.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Memory space enable.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;

    /// A command value from raw register bits.
    pub fn from_bits(bits: u16) -> Self {
        Self(bits)
    }

    /// The raw register bits.
    pub fn bits(self) -> u16 {
        self.0
    }

    /// Whether I/O space decoding is enabled.
    pub fn io_space(self) -> bool {
        self.0 & Self::IO_SPACE != 0
    }

    /// Whether memory space decoding is enabled.
    pub fn memory_space(self) -> bool {
        self.0 & Self::MEMORY_SPACE != 0
    }

    /// Whether the function may master the bus (DMA, MSI/MSI-X).
    pub fn bus_master(self) -> bool {
        self.0 & Self::BUS_MASTER != 0
    }

    /// Whether INTx assertion is disabled.
    pub fn intx_disabled(self) -> bool {
        self.0 & Self::INTX_DISABLE != 0
    }
}

/// A 4 KiB byte image with a per-byte write mask, used while building.
struct Image {
    value: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
}

impl Image {
    fn new() -> Self {
        Self {
            value: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
        }
    }

    fn set(&mut self, at: usize, bytes: &[u8]) {
        self.value[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn set_writable(&mut self, at: usize, mask: &[u8]) {
        self.wmask[at..at + mask.len()].copy_from_slice(mask);
    }

    fn set_u8(&mut self, at: usize, v: u8) {
        self.set(at, &[v]);
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.set(at, &v.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        self.set(at, &v.to_le_bytes());
    }

    fn writable_u16(&mut self, at: usize, mask: u16) {
        self.set_writable(at, &mask.to_le_bytes());
    }

    fn writable_u32(&mut self, at: usize, mask: u32) {
        self.set_writable(at, &mask.to_le_bytes());
    }
}

/// The configuration space of the presented function.
///
/// See the [module documentation](self) for layout and write semantics.
#[derive(Clone)]
pub struct ConfigSpace {
    spec: ConfigSpaceSpec,
    value: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    reset_value: Box<[u8; CONFIG_SPACE_SIZE]>,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bars: Vec<_> = (0..BAR_COUNT).map(|slot| self.bar_address(slot)).collect();
        f.debug_struct("ConfigSpace")
            .field("spec", &self.spec)
            .field("command", &self.command())
            .field("bar_addresses", &bars)
            .field("msix_enabled", &self.msix_enabled())
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// Build the configuration space described by `spec`, in its reset state.
    pub fn new(spec: ConfigSpaceSpec) -> Result<Self, ConfigSpaceError> {
        validate(&spec)?;
        let mut img = Image::new();
        build_header(&mut img, &spec);
        build_bars(&mut img, &spec);
        build_capabilities(&mut img, &spec);
        Ok(Self {
            spec,
            reset_value: img.value.clone(),
            value: img.value,
            wmask: img.wmask,
        })
    }

    /// The spec this space was built from.
    pub fn spec(&self) -> &ConfigSpaceSpec {
        &self.spec
    }

    /// The BAR declared at `slot` (`None` for empty slots, the upper half of
    /// a 64-bit BAR, or `slot >= 6`).
    pub fn bar(&self, slot: usize) -> Option<BarDecl> {
        self.spec.bars.get(slot).copied().flatten()
    }

    /// Read `buf.len()` bytes at `offset`.
    ///
    /// The whole access must lie inside the 4 KiB space; otherwise nothing is
    /// read and [`ConfigSpaceError::OutOfRange`] is returned.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ConfigSpaceError> {
        let range = access_range(offset, buf.len())?;
        buf.copy_from_slice(&self.value[range]);
        Ok(())
    }

    /// Write `data` at `offset`, byte by byte through the write mask.
    ///
    /// The whole access must lie inside the 4 KiB space; otherwise nothing is
    /// written and [`ConfigSpaceError::OutOfRange`] is returned. Read-only
    /// bits keep their value.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigSpaceError> {
        let range = access_range(offset, data.len())?;
        let before = self.power_state();
        let targets = self.value[range.clone()].iter_mut();
        for ((byte, &mask), &new) in targets.zip(&self.wmask[range]).zip(data) {
            *byte = (*byte & !mask) | (new & mask);
        }
        // D1 and D2 are not supported (PMC): such a write leaves the state as it was.
        if matches!(self.power_state(), PowerState::D1 | PowerState::D2) {
            self.set_pmcsr(self.pmcsr().with_power_state(before.field()));
        }
        Ok(())
    }

    /// The PMCSR power state: D0 or D3hot (D1/D2 writes are refused).
    pub fn power_state(&self) -> PowerState {
        PowerState::from_field(self.pmcsr().power_state())
    }

    fn pmcsr(&self) -> Pmcsr {
        Pmcsr::from_raw(self.u16_at(PM_CAP_OFFSET + pm::PMCSR))
    }

    fn set_pmcsr(&mut self, value: Pmcsr) {
        let at = PM_CAP_OFFSET + pm::PMCSR;
        self.value[at..at + 2].copy_from_slice(&value.raw().to_le_bytes());
    }

    /// Read a little-endian u16 at `offset`.
    pub fn read_u16(&self, offset: u64) -> Result<u16, ConfigSpaceError> {
        let mut bytes = [0; 2];
        self.read(offset, &mut bytes)?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// Read a little-endian u32 at `offset`.
    pub fn read_u32(&self, offset: u64) -> Result<u32, ConfigSpaceError> {
        let mut bytes = [0; 4];
        self.read(offset, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Write a little-endian u16 at `offset`.
    pub fn write_u16(&mut self, offset: u64, value: u16) -> Result<(), ConfigSpaceError> {
        self.write(offset, &value.to_le_bytes())
    }

    /// Write a little-endian u32 at `offset`.
    pub fn write_u32(&mut self, offset: u64, value: u32) -> Result<(), ConfigSpaceError> {
        self.write(offset, &value.to_le_bytes())
    }

    /// Return to the reset state: BAR addresses 0, command 0, MSI-X disabled
    /// and unmasked, power state D0, scratch registers 0.
    pub fn reset(&mut self) {
        self.value.copy_from_slice(&self.reset_value[..]);
    }

    /// The command register.
    pub fn command(&self) -> Command {
        Command::from_bits(self.u16_at(offset::COMMAND))
    }

    /// Whether MSI-X is enabled (false if there is no MSI-X capability).
    pub fn msix_enabled(&self) -> bool {
        self.msix_control_bit(msix::ENABLE)
    }

    /// Whether all MSI-X vectors are masked by the function mask (false if
    /// there is no MSI-X capability).
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control_bit(msix::FUNCTION_MASK)
    }

    /// The address programmed into the BAR at `slot` (size aligned, type bits
    /// stripped; both halves for a 64-bit BAR). `None` if no BAR starts at `slot`.
    pub fn bar_address(&self, slot: usize) -> Option<u64> {
        let decl = self.bar(slot)?;
        let low = u64::from(self.u32_at(bar_offset(slot)));
        Some(match decl.kind {
            BarKind::Memory32 => low & !BAR_MEM_FLAG_BITS,
            BarKind::Memory64 => {
                let high = u64::from(self.u32_at(bar_offset(slot + 1)));
                (high << 32) | (low & !BAR_MEM_FLAG_BITS)
            }
            BarKind::Io => low & !BAR_IO_FLAG_BITS,
        })
    }

    fn msix_control_bit(&self, bit: u16) -> bool {
        self.spec.msix.is_some() && self.u16_at(MSIX_CAP_OFFSET + msix::MESSAGE_CONTROL) & bit != 0
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.value[at], self.value[at + 1]])
    }

    fn u32_at(&self, at: usize) -> u32 {
        let b = &self.value[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Offset of the BAR register for `slot`.
fn bar_offset(slot: usize) -> usize {
    offset::BAR0 + 4 * slot
}

/// The index range of an access, if it lies inside the space.
fn access_range(offset: u64, len: usize) -> Result<Range<usize>, ConfigSpaceError> {
    let out_of_range = ConfigSpaceError::OutOfRange { offset, len };
    let start = usize::try_from(offset).map_err(|_| out_of_range.clone())?;
    match start.checked_add(len) {
        Some(end) if start < CONFIG_SPACE_SIZE && end <= CONFIG_SPACE_SIZE => Ok(start..end),
        _ => Err(out_of_range),
    }
}

fn validate(spec: &ConfigSpaceSpec) -> Result<(), ConfigSpaceError> {
    if spec.vendor_id == 0xFFFF {
        return Err(ConfigSpaceError::InvalidVendorId);
    }
    if spec.class_code > 0x00FF_FFFF {
        return Err(ConfigSpaceError::InvalidClassCode {
            class_code: spec.class_code,
        });
    }
    if spec.interrupt_pin > MAX_INTERRUPT_PIN {
        return Err(ConfigSpaceError::InvalidInterruptPin {
            pin: spec.interrupt_pin,
        });
    }
    for (slot, decl) in spec.bars.iter().enumerate() {
        if let Some(decl) = decl {
            validate_bar(spec, slot, decl)?;
        }
    }
    if let Some(decl) = &spec.msix {
        validate_msix(spec, decl)?;
    }
    Ok(())
}

fn validate_bar(
    spec: &ConfigSpaceSpec,
    slot: usize,
    decl: &BarDecl,
) -> Result<(), ConfigSpaceError> {
    let (min, max) = match decl.kind {
        BarKind::Memory32 => (MIN_MEMORY_BAR_SIZE, MAX_MEMORY32_BAR_SIZE),
        BarKind::Memory64 => (MIN_MEMORY_BAR_SIZE, MAX_MEMORY64_BAR_SIZE),
        BarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
    };
    if !decl.size.is_power_of_two() || decl.size < min || decl.size > max {
        return Err(ConfigSpaceError::InvalidBarSize {
            slot,
            size: decl.size,
            kind: decl.kind,
        });
    }
    match decl.kind {
        BarKind::Io if decl.prefetchable => Err(ConfigSpaceError::PrefetchableIoBar { slot }),
        BarKind::Memory64 if slot + 1 >= BAR_COUNT => {
            Err(ConfigSpaceError::Bar64AtLastSlot { slot })
        }
        BarKind::Memory64 if spec.bars[slot + 1].is_some() => Err(ConfigSpaceError::BarOverlap {
            slot,
            upper: slot + 1,
        }),
        _ => Ok(()),
    }
}

fn validate_msix(spec: &ConfigSpaceSpec, decl: &MsixDecl) -> Result<(), ConfigSpaceError> {
    if decl.vectors == 0 || decl.vectors > MAX_MSIX_VECTORS {
        return Err(ConfigSpaceError::InvalidMsixVectors {
            vectors: decl.vectors,
        });
    }
    let structures = [
        (
            "table",
            decl.table_bar,
            decl.table_offset,
            decl.table_range(),
        ),
        ("PBA", decl.pba_bar, decl.pba_offset, decl.pba_range()),
    ];
    for (structure, bar, offset, range) in structures {
        let bar_decl = spec
            .bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .filter(|d| d.kind.is_memory())
            .ok_or(ConfigSpaceError::InvalidMsixBar { structure, bar })?;
        if offset % MSIX_OFFSET_ALIGN != 0 {
            return Err(ConfigSpaceError::MisalignedMsixOffset { structure, offset });
        }
        if range.end > bar_decl.size {
            return Err(ConfigSpaceError::MsixOutsideBar {
                structure,
                end: range.end,
                bar_size: bar_decl.size,
            });
        }
    }
    let (table, pba) = (decl.table_range(), decl.pba_range());
    if decl.table_bar == decl.pba_bar && table.start < pba.end && pba.start < table.end {
        return Err(ConfigSpaceError::MsixOverlap);
    }
    Ok(())
}

fn build_header(img: &mut Image, spec: &ConfigSpaceSpec) {
    img.set_u16(offset::VENDOR_ID, spec.vendor_id);
    img.set_u16(offset::DEVICE_ID, spec.device_id);
    img.set_u16(offset::STATUS, STATUS_CAPABILITIES_LIST);
    img.set_u8(offset::REVISION_ID, spec.revision);
    img.set(offset::CLASS_CODE, &spec.class_code.to_le_bytes()[..3]);
    img.set_u8(offset::HEADER_TYPE, HEADER_TYPE_GENERAL);
    img.set_u16(offset::SUBSYSTEM_VENDOR_ID, spec.subsystem_vendor_id);
    img.set_u16(offset::SUBSYSTEM_ID, spec.subsystem_id);
    img.set_u8(offset::INTERRUPT_PIN, spec.interrupt_pin);

    let has_io_bar = spec.bars.iter().flatten().any(|d| d.kind == BarKind::Io);
    let mut command = Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTX_DISABLE;
    if has_io_bar {
        command |= Command::IO_SPACE;
    }
    img.writable_u16(offset::COMMAND, command);
    img.set_writable(offset::CACHE_LINE_SIZE, &[0xFF]);
    img.set_writable(offset::INTERRUPT_LINE, &[0xFF]);
    // ROM BAR, BIST, latency timer, min-grant/max-latency: read-only zero.
}

fn build_bars(img: &mut Image, spec: &ConfigSpaceSpec) {
    for (slot, decl) in spec.bars.iter().enumerate() {
        let Some(decl) = decl else { continue };
        // Address bits at and above log2(size) are writable, the rest read as 0
        // except for the read-only type bits.
        let address_mask = !(decl.size - 1);
        let at = bar_offset(slot);
        match decl.kind {
            BarKind::Io => {
                img.set_u32(at, BAR_IO_SPACE);
                img.writable_u32(at, (address_mask & !BAR_IO_FLAG_BITS) as u32);
            }
            BarKind::Memory32 | BarKind::Memory64 => {
                let mut flags = 0;
                if decl.kind == BarKind::Memory64 {
                    flags |= BAR_MEM_TYPE_64;
                }
                if decl.prefetchable {
                    flags |= BAR_PREFETCHABLE;
                }
                img.set_u32(at, flags);
                img.writable_u32(at, (address_mask & !BAR_MEM_FLAG_BITS) as u32);
                if decl.kind == BarKind::Memory64 {
                    img.writable_u32(bar_offset(slot + 1), (address_mask >> 32) as u32);
                }
            }
        }
    }
}

fn build_capabilities(img: &mut Image, spec: &ConfigSpaceSpec) {
    let mut caps = vec![
        (PM_CAP_OFFSET, cap_id::POWER_MANAGEMENT),
        (PCIE_CAP_OFFSET, cap_id::PCI_EXPRESS),
    ];
    if spec.msix.is_some() {
        caps.push((MSIX_CAP_OFFSET, cap_id::MSIX));
    }
    img.set_u8(offset::CAPABILITIES_POINTER, caps[0].0 as u8);
    for (i, &(at, id)) in caps.iter().enumerate() {
        let next = caps.get(i + 1).map_or(0, |&(next, _)| next as u8);
        img.set(at, &[id, next]);
    }

    // Power Management: version 3, no D1/D2, no PME; PowerState writable (D0/D3hot),
    // No_Soft_Reset (D3hot -> D0 keeps the configuration); starts in D0.
    img.set_u16(
        PM_CAP_OFFSET + pm::PMC,
        Pmc::default().with_version(pm::PMC_VERSION_3).raw(),
    );
    img.set_u16(
        PM_CAP_OFFSET + pm::PMCSR,
        Pmcsr::default()
            .with_no_soft_reset(1)
            .with_power_state(PowerState::D0.field())
            .raw(),
    );
    img.writable_u16(PM_CAP_OFFSET + pm::PMCSR, Pmcsr::POWER_STATE.mask() as u16);

    // PCI Express: version 2 endpoint, x16 at 16 GT/s, no slot.
    let at = PCIE_CAP_OFFSET;
    img.set_u16(at + pcie::FLAGS, pcie::FLAGS_V2_ENDPOINT);
    img.set_u32(at + pcie::DEVCAP, pcie::DEVCAP_VALUE);
    img.set_u16(at + pcie::DEVCTL, pcie::DEVCTL_RESET);
    img.writable_u16(at + pcie::DEVCTL, pcie::DEVCTL_WRITABLE);
    img.set_u32(at + pcie::LNKCAP, pcie::LNKCAP_VALUE);
    img.writable_u16(at + pcie::LNKCTL, pcie::LNKCTL_WRITABLE);
    img.set_u16(at + pcie::LNKSTA, pcie::LNKSTA_VALUE);
    img.set_u32(at + pcie::LNKCAP2, pcie::LNKCAP2_VALUE);
    img.set_u16(at + pcie::LNKCTL2, pcie::LNKCTL2_VALUE);

    // MSI-X: table size N-1 (read-only), enable and function mask writable.
    if let Some(decl) = &spec.msix {
        let at = MSIX_CAP_OFFSET;
        img.set_u16(at + msix::MESSAGE_CONTROL, decl.vectors - 1);
        img.writable_u16(
            at + msix::MESSAGE_CONTROL,
            msix::ENABLE | msix::FUNCTION_MASK,
        );
        img.set_u32(
            at + msix::TABLE,
            decl.table_offset | u32::from(decl.table_bar),
        );
        img.set_u32(at + msix::PBA, decl.pba_offset | u32::from(decl.pba_bar));
    }
}

// The capabilities must fit in the conventional space without overlapping.
const _: () = {
    assert!(PM_CAP_OFFSET + pm::LEN <= PCIE_CAP_OFFSET);
    assert!(PCIE_CAP_OFFSET + pcie::LEN <= MSIX_CAP_OFFSET);
    assert!(MSIX_CAP_OFFSET + msix::LEN <= LEGACY_CONFIG_SPACE_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn mem(size: u64, kind: BarKind, prefetchable: bool) -> Option<BarDecl> {
        Some(BarDecl {
            size,
            kind,
            prefetchable,
        })
    }

    /// A GH200-like function: BAR0 16 MiB registers, BAR2 1 GiB resmem,
    /// BAR4 128 GiB usemem, MSI-X in BAR0.
    fn gpu_spec() -> ConfigSpaceSpec {
        ConfigSpaceSpec {
            vendor_id: 0x10DE,
            device_id: 0x2342,
            subsystem_vendor_id: 0x10DE,
            subsystem_id: 0x16EB,
            class_code: 0x03_02_00,
            revision: 0xA1,
            bars: [
                mem(16 * MIB, BarKind::Memory32, false),
                None,
                mem(GIB, BarKind::Memory64, true),
                None,
                mem(128 * GIB, BarKind::Memory64, true),
                None,
            ],
            msix: Some(MsixDecl {
                vectors: 6,
                table_bar: 0,
                table_offset: 0xB9_0000,
                pba_bar: 0,
                pba_offset: 0xBA_0000,
            }),
            interrupt_pin: 1,
        }
    }

    fn gpu() -> ConfigSpace {
        ConfigSpace::new(gpu_spec()).unwrap()
    }

    fn bar_reg(slot: usize) -> u64 {
        bar_offset(slot) as u64
    }

    #[test]
    fn sizing_probe_128g_64bit_prefetchable() {
        let mut cs = gpu();
        assert_eq!(cs.read_u32(0x20).unwrap(), 0x0000_000C);
        assert_eq!(cs.read_u32(0x24).unwrap(), 0);
        cs.write_u32(0x20, 0xFFFF_FFFF).unwrap();
        cs.write_u32(0x24, 0xFFFF_FFFF).unwrap();
        assert_eq!(cs.read_u32(0x20).unwrap(), 0x0000_000C);
        assert_eq!(cs.read_u32(0x24).unwrap(), 0xFFFF_FFE0);
        assert_eq!(cs.bar_address(4), Some(0xFFFF_FFE0_0000_0000));
    }

    #[test]
    fn sizing_probe_other_bars() {
        let mut cs = gpu();
        for slot in 0..BAR_COUNT {
            cs.write_u32(bar_reg(slot), u32::MAX).unwrap();
        }
        assert_eq!(cs.read_u32(bar_reg(0)).unwrap(), 0xFF00_0000);
        assert_eq!(cs.read_u32(bar_reg(1)).unwrap(), 0);
        assert_eq!(cs.read_u32(bar_reg(2)).unwrap(), 0xC000_000C);
        assert_eq!(cs.read_u32(bar_reg(3)).unwrap(), 0xFFFF_FFFF);
        assert_eq!(cs.bar_address(1), None);
        assert_eq!(cs.bar_address(3), None);
        assert_eq!(cs.bar_address(6), None);
    }

    #[test]
    fn io_bar_sizing_and_command_io_bit() {
        let mut spec = gpu_spec();
        spec.bars[1] = mem(128, BarKind::Io, false);
        let mut cs = ConfigSpace::new(spec).unwrap();
        assert_eq!(cs.read_u32(bar_reg(1)).unwrap(), 0x1);
        cs.write_u32(bar_reg(1), u32::MAX).unwrap();
        assert_eq!(cs.read_u32(bar_reg(1)).unwrap(), 0xFFFF_FF81);
        cs.write_u32(bar_reg(1), 0xC07F).unwrap();
        assert_eq!(cs.bar_address(1), Some(0xC000));
        cs.write_u16(offset::COMMAND as u64, 0xFFFF).unwrap();
        assert!(cs.command().io_space());
        assert_eq!(cs.command().bits(), 0x0407);
    }

    #[test]
    fn bar_addresses_stick_only_when_aligned() {
        let mut cs = gpu();
        cs.write_u32(0x20, 0x1234_5678).unwrap();
        cs.write_u32(0x24, 0x0000_0045).unwrap();
        // 128 GiB alignment: bits 0..37 are not address bits.
        assert_eq!(cs.bar_address(4), Some(0x0000_0040_0000_0000));
        assert_eq!(cs.read_u32(0x20).unwrap(), 0x0000_000C);
        assert_eq!(cs.read_u32(0x24).unwrap(), 0x0000_0040);
        cs.write_u32(0x10, 0xFE12_3456).unwrap();
        assert_eq!(cs.bar_address(0), Some(0xFE00_0000));
        assert_eq!(cs.read_u32(0x10).unwrap(), 0xFE00_0000);
    }

    #[test]
    fn straddling_write_across_bar_registers() {
        let mut cs = gpu();
        // Bytes 0x1E..0x22: top of BAR3 (upper half of BAR2) and bottom of BAR4.
        cs.write(0x1E, &[0xAB, 0xCD, 0xFF, 0xFF]).unwrap();
        assert_eq!(cs.read_u32(0x1C).unwrap(), 0xCDAB_0000);
        assert_eq!(cs.read_u32(0x20).unwrap(), 0x0000_000C);
        let mut buf = [0u8; 6];
        cs.read(0x1D, &mut buf).unwrap();
        assert_eq!(buf, [0x00, 0xAB, 0xCD, 0x0C, 0x00, 0x00]);
    }

    #[test]
    fn rom_bar_reads_zero_and_ignores_writes() {
        let mut cs = gpu();
        assert_eq!(cs.read_u32(offset::ROM_BAR as u64).unwrap(), 0);
        cs.write_u32(offset::ROM_BAR as u64, 0xFFFF_F801).unwrap();
        assert_eq!(cs.read_u32(offset::ROM_BAR as u64).unwrap(), 0);
    }

    #[test]
    fn identity_fields_and_read_only_registers() {
        let mut cs = gpu();
        let before = cs.clone();
        assert_eq!(cs.read_u16(0x00).unwrap(), 0x10DE);
        assert_eq!(cs.read_u16(0x02).unwrap(), 0x2342);
        assert_eq!(cs.read_u32(0x08).unwrap(), 0x0302_00A1);
        assert_eq!(cs.read_u16(0x2C).unwrap(), 0x10DE);
        assert_eq!(cs.read_u16(0x2E).unwrap(), 0x16EB);
        assert_eq!(cs.read_u16(0x3C).unwrap(), 0x0100);
        assert_eq!(cs.read_u16(0x06).unwrap(), STATUS_CAPABILITIES_LIST);
        for at in [0x00, 0x08, 0x0E, 0x2C, 0x34, 0x3D] {
            cs.write(at, &[0x55]).unwrap();
        }
        cs.write_u32(0x00, 0).unwrap();
        cs.write_u16(0x06, 0xFFFF).unwrap();
        let mut a = [0u8; CONFIG_SPACE_SIZE];
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        cs.read(0, &mut a).unwrap();
        before.read(0, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn scratch_registers() {
        let mut cs = gpu();
        cs.write(offset::INTERRUPT_LINE as u64, &[0x2B]).unwrap();
        cs.write(offset::CACHE_LINE_SIZE as u64, &[0x10]).unwrap();
        cs.write(offset::LATENCY_TIMER as u64, &[0x40]).unwrap();
        assert_eq!(cs.read_u16(0x3C).unwrap(), 0x012B);
        assert_eq!(cs.read_u16(0x0C).unwrap(), 0x0010);
    }

    #[test]
    fn command_register_writable_bits() {
        let mut cs = gpu();
        assert_eq!(cs.command(), Command::default());
        cs.write_u16(offset::COMMAND as u64, 0xFFFF).unwrap();
        let cmd = cs.command();
        assert_eq!(cmd.bits(), 0x0406);
        assert!(cmd.memory_space() && cmd.bus_master() && cmd.intx_disabled());
        assert!(!cmd.io_space(), "no I/O BAR, I/O space stays off");
        cs.write(offset::COMMAND as u64, &[0x02]).unwrap();
        assert_eq!(cs.command().bits(), 0x0402);
        cs.write(offset::COMMAND as u64 + 1, &[0x00]).unwrap();
        assert_eq!(cs.command().bits(), Command::MEMORY_SPACE);
    }

    #[test]
    fn capability_list_walk() {
        let cs = gpu();
        let mut found = Vec::new();
        let mut ptr = [0u8; 1];
        cs.read(offset::CAPABILITIES_POINTER as u64, &mut ptr)
            .unwrap();
        let mut at = ptr[0];
        let mut steps = 0;
        while at != 0 {
            assert_eq!(at % 4, 0, "capability pointer {at:#x} not dword aligned");
            assert!(at >= 0x40, "capability pointer {at:#x} inside the header");
            let mut hdr = [0u8; 2];
            cs.read(u64::from(at), &mut hdr).unwrap();
            found.push((hdr[0], at));
            at = hdr[1];
            steps += 1;
            assert!(steps < 48, "capability list does not terminate");
        }
        let ids: Vec<u8> = found.iter().map(|&(id, _)| id).collect();
        assert_eq!(
            ids,
            [cap_id::POWER_MANAGEMENT, cap_id::PCI_EXPRESS, cap_id::MSIX]
        );

        let pcie_at = u64::from(found[1].1);
        assert_eq!(
            cs.read_u16(pcie_at + 2).unwrap() & 0xF,
            2,
            "PCIe cap version 2"
        );
        assert_eq!(
            (cs.read_u16(pcie_at + 2).unwrap() >> 4) & 0xF,
            0,
            "endpoint"
        );
        assert_eq!(
            cs.read_u16(pcie_at + 0x12).unwrap() & 0x3FF,
            0x104,
            "Gen4 x16"
        );
        let pm_at = u64::from(found[0].1);
        assert_eq!(cs.read_u16(pm_at + 2).unwrap() & 0x7, 3, "PM version 3");
        assert_eq!(cs.read_u16(pm_at + 4).unwrap() & 0x3, 0, "D0");
        let msix_at = u64::from(found[2].1);
        assert_eq!(cs.read_u16(msix_at + 2).unwrap(), 5, "table size N-1");
        assert_eq!(cs.read_u32(msix_at + 4).unwrap(), 0xB9_0000);
        assert_eq!(cs.read_u32(msix_at + 8).unwrap(), 0xBA_0000);

        // Extended space is empty.
        assert_eq!(cs.read_u32(0x100).unwrap(), 0);
    }

    #[test]
    fn pmcsr_power_state_d0_and_d3hot_read_back_d1_d2_refused() {
        let mut cs = gpu();
        let pmc = PM_CAP_OFFSET as u64 + 2;
        let pmcsr = PM_CAP_OFFSET as u64 + 4;
        let caps = Pmc::from_raw(cs.read_u16(pmc).unwrap());
        assert_eq!(
            (caps.version(), caps.d1_support(), caps.d2_support()),
            (3, 0, 0),
            "PM 1.2, no D1/D2"
        );
        assert_eq!(caps.pme_support(), 0);
        assert_eq!(cs.power_state(), PowerState::D0);
        assert_eq!(cs.read_u16(pmcsr).unwrap(), 0x0008, "D0, No_Soft_Reset");
        // D3hot, as the guest's vfio-pci writes it when the device is idle.
        cs.write_u16(pmcsr, 0x0003).unwrap();
        assert_eq!(cs.power_state(), PowerState::D3Hot);
        assert_eq!(cs.read_u16(pmcsr).unwrap(), 0x000B);
        // D1 and D2 are not supported: the state stays, from D3hot and from D0.
        for unsupported in [1u8, 2] {
            cs.write(pmcsr, &[unsupported]).unwrap();
            assert_eq!(cs.power_state(), PowerState::D3Hot);
        }
        // Back to D0 with a dword write over PMCSR and its neighbours (read-only there).
        cs.write_u32(pmcsr, 0xFFFF_FFF4).unwrap();
        assert_eq!(cs.power_state(), PowerState::D0);
        assert_eq!(
            cs.read_u32(pmcsr).unwrap(),
            0x0000_0008,
            "No_Soft_Reset stays set"
        );
        for unsupported in [1u16, 2] {
            cs.write_u16(pmcsr, unsupported).unwrap();
            assert_eq!(cs.power_state(), PowerState::D0);
        }
        // No_Soft_Reset: D3hot -> D0 keeps the BAR addresses and the command register.
        cs.write_u32(0x20, 0x4000_0000).unwrap();
        cs.write_u32(0x24, 0x40).unwrap();
        cs.write_u16(offset::COMMAND as u64, Command::MEMORY_SPACE)
            .unwrap();
        cs.write(pmcsr, &[3]).unwrap();
        cs.write(pmcsr, &[0]).unwrap();
        assert_eq!(cs.bar_address(4), Some(0x40_0000_0000));
        assert!(cs.command().memory_space());
        // A reset returns to D0.
        cs.write(pmcsr, &[3]).unwrap();
        cs.reset();
        assert_eq!(cs.power_state(), PowerState::D0);
    }

    #[test]
    fn no_msix_ends_list_at_pcie() {
        let mut spec = gpu_spec();
        spec.msix = None;
        let mut cs = ConfigSpace::new(spec).unwrap();
        let next = cs.read_u16(PCIE_CAP_OFFSET as u64).unwrap() >> 8;
        assert_eq!(next, 0);
        cs.write_u16(MSIX_CAP_OFFSET as u64 + 2, 0xFFFF).unwrap();
        assert!(!cs.msix_enabled());
        assert!(!cs.msix_function_masked());
    }

    #[test]
    fn msix_enable_and_mask_bits() {
        let mut cs = gpu();
        let control = MSIX_CAP_OFFSET as u64 + 2;
        assert!(!cs.msix_enabled());
        cs.write_u16(control, 0xFFFF).unwrap();
        assert_eq!(cs.read_u16(control).unwrap(), 0xC005);
        assert!(cs.msix_enabled() && cs.msix_function_masked());
        cs.write(control + 1, &[0x80]).unwrap();
        assert!(cs.msix_enabled() && !cs.msix_function_masked());
        // Table/PBA registers are read-only.
        cs.write_u32(control + 2, 0).unwrap();
        assert_eq!(cs.read_u32(control + 2).unwrap(), 0xB9_0000);
    }

    #[test]
    fn reset_restores_defaults() {
        let mut cs = gpu();
        let fresh = gpu();
        cs.write_u16(offset::COMMAND as u64, 0xFFFF).unwrap();
        cs.write_u32(0x20, 0xFFFF_FFFF).unwrap();
        cs.write_u32(0x24, 0x1).unwrap();
        cs.write_u16(MSIX_CAP_OFFSET as u64 + 2, 0xC000).unwrap();
        cs.write(offset::INTERRUPT_LINE as u64, &[9]).unwrap();
        cs.reset();
        assert_eq!(cs.command().bits(), 0);
        assert_eq!(cs.bar_address(4), Some(0));
        assert!(!cs.msix_enabled() && !cs.msix_function_masked());
        let (mut a, mut b) = ([0u8; CONFIG_SPACE_SIZE], [0u8; CONFIG_SPACE_SIZE]);
        cs.read(0, &mut a).unwrap();
        fresh.read(0, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn out_of_range_accesses() {
        let mut cs = gpu();
        let mut buf = [0u8; 8];
        for (offset, len) in [
            (4096u64, 1usize),
            (4095, 2),
            (4090, 8),
            (u64::MAX, 1),
            (4096, 0),
        ] {
            let err = cs.read(offset, &mut buf[..len]).unwrap_err();
            assert_eq!(err, ConfigSpaceError::OutOfRange { offset, len });
            assert_eq!(err.errno(), libc::EINVAL);
            assert!(cs.write(offset, &buf[..len]).is_err());
        }
        // A rejected write changes nothing, even its in-range part.
        cs.write(0x0FFC, &[0xFF; 8]).unwrap_err();
        assert_eq!(cs.read_u32(0xFFC).unwrap(), 0);
        assert!(cs.read(4095, &mut buf[..1]).is_ok());
        assert!(cs.read(4095, &mut []).is_ok());
    }

    #[test]
    fn spec_validation() {
        let check = |edit: &dyn Fn(&mut ConfigSpaceSpec), want: ConfigSpaceError| {
            let mut spec = gpu_spec();
            edit(&mut spec);
            assert_eq!(ConfigSpace::new(spec).unwrap_err(), want);
        };
        check(&|s| s.vendor_id = 0xFFFF, ConfigSpaceError::InvalidVendorId);
        check(
            &|s| s.class_code = 0x0100_0000,
            ConfigSpaceError::InvalidClassCode {
                class_code: 0x0100_0000,
            },
        );
        check(
            &|s| s.interrupt_pin = 5,
            ConfigSpaceError::InvalidInterruptPin { pin: 5 },
        );
        let bad_size = |slot, size, kind| ConfigSpaceError::InvalidBarSize { slot, size, kind };
        check(
            &|s| s.bars[1] = mem(3 * MIB, BarKind::Memory32, false),
            bad_size(1, 3 * MIB, BarKind::Memory32),
        );
        check(
            &|s| s.bars[1] = mem(8, BarKind::Memory32, false),
            bad_size(1, 8, BarKind::Memory32),
        );
        check(
            &|s| s.bars[1] = mem(4 * GIB, BarKind::Memory32, false),
            bad_size(1, 4 * GIB, BarKind::Memory32),
        );
        check(
            &|s| s.bars[1] = mem(2, BarKind::Io, false),
            bad_size(1, 2, BarKind::Io),
        );
        check(
            &|s| s.bars[1] = mem(512, BarKind::Io, false),
            bad_size(1, 512, BarKind::Io),
        );
        check(
            &|s| s.bars[1] = mem(0, BarKind::Memory32, false),
            bad_size(1, 0, BarKind::Memory32),
        );
        check(
            &|s| s.bars[1] = mem(16, BarKind::Io, true),
            ConfigSpaceError::PrefetchableIoBar { slot: 1 },
        );
        check(
            &|s| {
                s.bars[4] = None;
                s.bars[5] = mem(GIB, BarKind::Memory64, true);
            },
            ConfigSpaceError::Bar64AtLastSlot { slot: 5 },
        );
        check(
            &|s| s.bars[3] = mem(16, BarKind::Memory32, false),
            ConfigSpaceError::BarOverlap { slot: 2, upper: 3 },
        );
        let msix =
            |f: fn(&mut MsixDecl)| move |s: &mut ConfigSpaceSpec| f(s.msix.as_mut().unwrap());
        check(
            &msix(|m| m.vectors = 0),
            ConfigSpaceError::InvalidMsixVectors { vectors: 0 },
        );
        check(
            &msix(|m| m.vectors = 2049),
            ConfigSpaceError::InvalidMsixVectors { vectors: 2049 },
        );
        check(
            &msix(|m| m.table_bar = 1),
            ConfigSpaceError::InvalidMsixBar {
                structure: "table",
                bar: 1,
            },
        );
        check(
            &msix(|m| m.pba_bar = 7),
            ConfigSpaceError::InvalidMsixBar {
                structure: "PBA",
                bar: 7,
            },
        );
        check(
            &msix(|m| m.table_offset = 0x1004),
            ConfigSpaceError::MisalignedMsixOffset {
                structure: "table",
                offset: 0x1004,
            },
        );
        check(
            &msix(|m| m.pba_offset = 0xFF_FFF8 + 8),
            ConfigSpaceError::MsixOutsideBar {
                structure: "PBA",
                end: 16 * MIB + 8,
                bar_size: 16 * MIB,
            },
        );
        check(
            &msix(|m| m.pba_offset = 0xB9_0008),
            ConfigSpaceError::MsixOverlap,
        );
        let mut spec = gpu_spec();
        spec.bars[1] = mem(64, BarKind::Io, false);
        spec.msix.as_mut().unwrap().table_bar = 1;
        assert!(matches!(
            ConfigSpace::new(spec),
            Err(ConfigSpaceError::InvalidMsixBar { bar: 1, .. })
        ));
    }

    // ---- Property tests. ----

    /// Raw choice for one BAR slot: (kind selector, size selector, prefetchable).
    type BarChoice = (u8, u8, bool);

    /// Turn raw choices into a valid BAR layout (and optionally MSI-X).
    fn make_spec(choices: [BarChoice; BAR_COUNT], msix: Option<u16>, pin: u8) -> ConfigSpaceSpec {
        let mut bars = [None; BAR_COUNT];
        let mut slot = 0;
        while slot < BAR_COUNT {
            let (kind, size_sel, prefetchable) = choices[slot];
            let pick = |lo: u32, hi: u32| 1u64 << (lo + u32::from(size_sel) % (hi - lo + 1));
            let decl = match kind % 4 {
                1 => mem(pick(4, 31), BarKind::Memory32, prefetchable),
                2 if slot + 1 < BAR_COUNT => mem(pick(4, 63), BarKind::Memory64, prefetchable),
                2 => mem(pick(4, 31), BarKind::Memory32, prefetchable),
                3 => mem(pick(2, 8), BarKind::Io, false),
                _ => None,
            };
            bars[slot] = decl;
            slot += if matches!(decl, Some(d) if d.kind == BarKind::Memory64) {
                2
            } else {
                1
            };
        }
        let msix = msix.and_then(|vectors| {
            let table_len = u64::from(vectors) * 16;
            let pba_len = u64::from(vectors).div_ceil(64) * 8;
            let bar = bars.iter().position(
                |d| matches!(d, Some(d) if d.kind.is_memory() && d.size >= table_len + pba_len),
            )?;
            Some(MsixDecl {
                vectors,
                table_bar: bar as u8,
                table_offset: 0,
                pba_bar: bar as u8,
                pba_offset: table_len as u32,
            })
        });
        ConfigSpaceSpec {
            bars,
            msix,
            interrupt_pin: pin % 5,
            ..gpu_spec()
        }
    }

    fn spec_strategy() -> impl Strategy<Value = ConfigSpaceSpec> {
        (
            prop::array::uniform6((any::<u8>(), any::<u8>(), any::<bool>())),
            prop::option::of(1u16..=2048),
            any::<u8>(),
        )
            .prop_map(|(choices, msix, pin)| make_spec(choices, msix, pin))
    }

    /// Offsets biased towards the header and capabilities.
    fn cfg_offset() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..0x40,
            2 => 0x40u64..0x100,
            1 => (0u64..0x40).prop_map(|dw| dw * 4),
            1 => 0u64..4096,
        ]
    }

    fn write_op() -> impl Strategy<Value = (u64, Vec<u8>)> {
        (
            cfg_offset(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..=8),
                prop::collection::vec(Just(0xFFu8), 1..=8),
            ],
        )
    }

    /// Offsets of the capabilities with each id, found by walking the list.
    fn find_cap(cs: &ConfigSpace, id: u8) -> Option<usize> {
        let mut at = cs.read_u16(offset::CAPABILITIES_POINTER as u64).unwrap() as u8;
        for _ in 0..48 {
            if at == 0 {
                return None;
            }
            let hdr = cs.read_u16(u64::from(at)).unwrap();
            if hdr as u8 == id {
                return Some(usize::from(at));
            }
            at = (hdr >> 8) as u8;
        }
        None
    }

    /// Independently stated writable bits of byte `at`.
    fn expected_writable(spec: &ConfigSpaceSpec, caps: &[(u8, usize)], at: usize) -> u8 {
        let has_io = spec.bars.iter().flatten().any(|d| d.kind == BarKind::Io);
        match at {
            0x04 => 0b0000_0110 | u8::from(has_io),
            0x05 => 0b0000_0100,
            0x0C | 0x3C => 0xFF,
            0x10..=0x27 => {
                let slot = (at - 0x10) / 4;
                // Which BAR (if any) this byte belongs to, and its bit position in the BAR.
                let (decl, bit_base) = match (spec.bars[slot], slot.checked_sub(1)) {
                    (Some(d), _) => (d, (at - 0x10) % 4 * 8),
                    (None, Some(prev)) => match spec.bars[prev] {
                        Some(d) if d.kind == BarKind::Memory64 => (d, 32 + (at - 0x10) % 4 * 8),
                        _ => return 0,
                    },
                    _ => return 0,
                };
                let first_flag_free = if decl.kind == BarKind::Io { 2 } else { 4 };
                let mut mask = 0u8;
                for bit in 0..8 {
                    let pos = bit_base + bit;
                    if pos >= first_flag_free && (1u64 << pos) >= decl.size {
                        mask |= 1 << bit;
                    }
                }
                mask
            }
            _ => {
                for &(id, cap) in caps {
                    match (id, at.wrapping_sub(cap)) {
                        (cap_id::POWER_MANAGEMENT, 4) => return 0x03,
                        (cap_id::MSIX, 3) => return 0xC0,
                        (cap_id::PCI_EXPRESS, 0x08) => return 0xFF,
                        (cap_id::PCI_EXPRESS, 0x09) => return 0x79,
                        (cap_id::PCI_EXPRESS, 0x10) => return 0xCB,
                        _ => {}
                    }
                }
                0
            }
        }
    }

    fn image(cs: &ConfigSpace) -> Vec<u8> {
        let mut out = vec![0; CONFIG_SPACE_SIZE];
        cs.read(0, &mut out).unwrap();
        out
    }

    fn check_bar_invariants(cs: &ConfigSpace) -> Result<(), TestCaseError> {
        let spec = cs.spec();
        for slot in 0..BAR_COUNT {
            let reg = cs.read_u32(bar_reg(slot)).unwrap();
            match spec.bars[slot] {
                Some(d) => {
                    let flags = match d.kind {
                        BarKind::Io => 0x1,
                        BarKind::Memory32 => u32::from(d.prefetchable) << 3,
                        BarKind::Memory64 => 0x4 | u32::from(d.prefetchable) << 3,
                    };
                    let flag_bits = if d.kind == BarKind::Io { 0x3 } else { 0xF };
                    prop_assert_eq!(reg & flag_bits, flags, "BAR {} type bits", slot);
                    let addr = cs.bar_address(slot).unwrap();
                    prop_assert_eq!(
                        addr % d.size,
                        0,
                        "BAR {} address {:#x} unaligned",
                        slot,
                        addr
                    );
                    if d.kind != BarKind::Memory64 {
                        prop_assert!(addr <= u64::from(u32::MAX));
                    }
                }
                None => {
                    let upper_of_64 = slot > 0
                        && matches!(spec.bars[slot - 1], Some(d) if d.kind == BarKind::Memory64);
                    if !upper_of_64 {
                        prop_assert_eq!(reg, 0, "empty BAR {} reads non-zero", slot);
                    }
                    prop_assert_eq!(cs.bar_address(slot), None);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn writes_respect_read_only_bits_and_bar_invariants(
            spec in spec_strategy(),
            ops in prop::collection::vec(write_op(), 1..40),
        ) {
            let mut cs = ConfigSpace::new(spec.clone()).unwrap();
            let initial = image(&cs);
            let caps: Vec<(u8, usize)> = [cap_id::POWER_MANAGEMENT, cap_id::PCI_EXPRESS, cap_id::MSIX]
                .into_iter()
                .filter_map(|id| find_cap(&cs, id).map(|at| (id, at)))
                .collect();
            prop_assert_eq!(caps.len(), 2 + usize::from(spec.msix.is_some()));
            let writable: Vec<u8> = (0..CONFIG_SPACE_SIZE)
                .map(|at| expected_writable(&spec, &caps, at))
                .collect();
            for (offset, data) in ops {
                let before = image(&cs);
                let res = cs.write(offset, &data);
                let after = image(&cs);
                if offset as usize + data.len() > CONFIG_SPACE_SIZE {
                    prop_assert!(res.is_err());
                    prop_assert_eq!(&before, &after);
                } else {
                    prop_assert!(res.is_ok());
                }
                for at in 0..CONFIG_SPACE_SIZE {
                    prop_assert_eq!(
                        after[at] & !writable[at], initial[at] & !writable[at],
                        "read-only bits of byte {:#x} changed", at
                    );
                }
                check_bar_invariants(&cs)?;
            }
            cs.reset();
            prop_assert_eq!(image(&cs), initial);
        }

        #[test]
        fn split_writes_and_reads_are_equivalent(
            spec in spec_strategy(),
            ops in prop::collection::vec((write_op(), any::<u64>()), 1..40),
        ) {
            let mut whole = ConfigSpace::new(spec.clone()).unwrap();
            let mut bytewise = ConfigSpace::new(spec.clone()).unwrap();
            let mut chunked = ConfigSpace::new(spec).unwrap();
            for ((offset, data), split_seed) in ops {
                let whole_res = whole.write(offset, &data);
                if whole_res.is_err() {
                    continue;
                }
                for (i, byte) in data.iter().enumerate() {
                    bytewise.write(offset + i as u64, &[*byte]).unwrap();
                }
                let split = (split_seed % (data.len() as u64 + 1)) as usize;
                // Empty halves are not accesses (a zero-length write at the very end of
                // config space is out of range).
                for (at, part) in [(0, &data[..split]), (split, &data[split..])] {
                    if !part.is_empty() {
                        chunked.write(offset + at as u64, part).unwrap();
                    }
                }

                // Reads: one access vs byte by byte.
                let mut buf = vec![0u8; data.len()];
                whole.read(offset, &mut buf).unwrap();
                for (i, byte) in buf.iter().enumerate() {
                    let mut one = [0u8];
                    whole.read(offset + i as u64, &mut one).unwrap();
                    prop_assert_eq!(one[0], *byte);
                }
            }
            let image_whole = image(&whole);
            prop_assert_eq!(&image_whole, &image(&bytewise));
            prop_assert_eq!(&image_whole, &image(&chunked));
        }
    }
}
