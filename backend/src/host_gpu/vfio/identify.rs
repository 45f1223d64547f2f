//! Who the GPU behind VFIO is, read from the device itself: PCI ids and BAR types from its
//! config space, the BAR layout from VFIO region info, the chip from `NV_PMC_BOOT_0` /
//! `NV_PMC_BOOT_42`, and the VRAM size from the framebuffer-size register a driver reads on
//! that chip (gpu-facts 2.2, 2.3, 5).
//!
//! [`identify`] is a pure function of what was read ([`DeviceReadout`]), so every rule is
//! tested without hardware.
//!
//! BAR roles follow the slot conventions of gpu-facts 2.1: BAR0 holds the registers; the
//! largest memory BAR is the VRAM aperture (BAR1, which starts at VRAM address 0); on an
//! nvgrace part (usable memory at BAR4 and a smaller BAR2) BAR2 is the reserved memory that
//! follows the usable part (gpu-facts 1.1); any other memory BAR is the instance-memory
//! aperture. The real size of a VRAM BAR is capped by the VRAM behind it: a BAR may be
//! padded past the memory (nvgrace-gpu does exactly that).

use thiserror::Error;

use crate::host_driver::regs::bitfield;
use crate::host_gpu::{ChipIdentity, Generation, HostBar, HostBarRole, PciIdentity};

use super::address::PciAddress;

/// `NV_PMC_BOOT_0` offset.
pub const BOOT_0: u64 = 0x0;
/// `NV_PMC_BOOT_42` offset.
pub const BOOT_42: u64 = 0xA00;
/// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE` offset (Turing, GA100).
pub const LOCAL_MEMORY_RANGE: u64 = 0x10_0CE0;
/// `NV_USABLE_FB_SIZE_IN_MB` offset (GA102 and later, Hopper, Blackwell).
pub const USABLE_FB_SIZE_IN_MB: u64 = 0x11_83A4;

bitfield! {
    /// `NV_PMC_BOOT_0` (gpu-facts 2.2).
    pub struct Boot0(u32) {
        /// Minor revision.
        minor_revision, with_minor_revision, MINOR_REVISION: 3:0;
        /// Major revision.
        major_revision, with_major_revision, MAJOR_REVISION: 7:4;
        /// Most significant bit of the architecture (zero on modern chips).
        architecture_1, with_architecture_1, ARCHITECTURE_1: 8:8;
        /// Implementation within the architecture.
        implementation, with_implementation, IMPLEMENTATION: 23:20;
        /// Architecture (low bits).
        architecture_0, with_architecture_0, ARCHITECTURE_0: 28:24;
    }
}

bitfield! {
    /// `NV_PMC_BOOT_42` (gpu-facts 2.3).
    pub struct Boot42(u32) {
        /// Implementation.
        implementation, with_implementation, IMPLEMENTATION: 23:20;
        /// Architecture.
        architecture, with_architecture, ARCHITECTURE: 29:24;
        /// Chip id: architecture and implementation (`0x162` for TU102).
        chip_id, with_chip_id, CHIP_ID: 29:20;
    }
}

bitfield! {
    /// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE` (nova-core `fb/regs.rs`, gpu-facts 5): VRAM size
    /// as `lower_mag << lower_scale` MiB, 15/16 of it with ECC.
    pub struct LocalMemoryRange(u32) {
        /// Power-of-two scale, in MiB.
        lower_scale, with_lower_scale, LOWER_SCALE: 3:0;
        /// Magnitude.
        lower_mag, with_lower_mag, LOWER_MAG: 9:4;
        /// ECC enabled: 1/16 of the memory holds check bits.
        ecc_mode, with_ecc_mode, ECC_MODE: 30:30;
    }
}

impl LocalMemoryRange {
    /// The VRAM size in bytes.
    pub fn size(self) -> u64 {
        let size = u64::from(self.lower_mag()) << (u64::from(self.lower_scale()) + 20);
        if self.ecc_mode() != 0 {
            size / 16 * 15
        } else {
            size
        }
    }
}

/// The config-space offset of the BAR registers.
const CONFIG_BARS: usize = 0x10;
/// A BAR register's "64-bit memory BAR" type bits (2:1 = 0b10).
const BAR_TYPE_64: u32 = 0b100;
/// A BAR register's prefetchable bit.
const BAR_PREFETCHABLE: u32 = 0b1000;

/// Everything [`identify`] needs, as read from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReadout {
    /// The first 64 bytes of the function's config space.
    pub config: [u8; 64],
    /// Sizes of VFIO regions 0..=5 (the BARs; 0 for an absent slot or the upper half of
    /// a 64-bit BAR).
    pub bar_region_sizes: [u64; 6],
    /// `NV_PMC_BOOT_0`.
    pub boot0: u32,
    /// `NV_PMC_BOOT_42`.
    pub boot42: u32,
    /// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE`.
    pub local_memory_range: u32,
    /// `NV_USABLE_FB_SIZE_IN_MB`.
    pub usable_fb_size_mb: u32,
}

/// Why the device cannot be identified.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentifyError {
    /// BOOT_0 reads all ones: the device is not answering.
    #[error(
        "{address} does not answer: NV_PMC_BOOT_0 reads 0xffffffff (fallen off the bus, or \
         powered down)"
    )]
    NotAnswering {
        /// The device.
        address: PciAddress,
    },
    /// BOOT_0/BOOT_42 name no generation the backend knows.
    #[error(
        "{address} is an NVIDIA GPU the backend does not know: NV_PMC_BOOT_0 {boot0:#010x}, \
         NV_PMC_BOOT_42 {boot42:#010x} (known: Turing, Ampere, Ada, Hopper, Blackwell)"
    )]
    UnknownChip {
        /// The device.
        address: PciAddress,
        /// BOOT_0.
        boot0: u32,
        /// BOOT_42.
        boot42: u32,
    },
    /// The framebuffer-size register gives no usable size.
    #[error("{address}: {register} reads {value:#010x}, which is no VRAM size")]
    NoVramSize {
        /// The device.
        address: PciAddress,
        /// Register name.
        register: &'static str,
        /// What it read.
        value: u32,
    },
    /// BAR0 is missing or too small to hold the registers.
    #[error("{address}: BAR0 is {size:#x} bytes; the GPU's registers need 16 MiB")]
    NoRegisterBar {
        /// The device.
        address: PciAddress,
        /// Its size.
        size: u64,
    },
    /// No memory BAR at all.
    #[error("{address} has no VRAM BAR")]
    NoVramBar {
        /// The device.
        address: PciAddress,
    },
}

/// Size of the register BAR every generation has (gpu-facts 2.1).
pub const BAR0_SIZE: u64 = 16 << 20;

fn config_u16(config: &[u8; 64], at: usize) -> u16 {
    u16::from_le_bytes([config[at], config[at + 1]])
}

fn config_u32(config: &[u8; 64], at: usize) -> u32 {
    u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
}

/// The generation BOOT_42 (or, where it reads 0, BOOT_0) names.
pub fn generation_of(boot0: u32, boot42: u32) -> Option<Generation> {
    let boot0 = Boot0::from_raw(boot0);
    // nova-core: chips older than Fermi have ARCHITECTURE_1 = 0 and ARCHITECTURE_0 < 0xC.
    if boot0.architecture_1() == 0 && boot0.architecture_0() < 0xC {
        return None;
    }
    let arch = match Boot42::from_raw(boot42) {
        b if b.raw() != 0 => b.architecture(),
        _ => boot0.architecture_0() | boot0.architecture_1() << 5,
    };
    Generation::from_architecture(arch).ok()
}

/// Whether nova-core reads the VRAM size from `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE` on this
/// chip (Turing and GA100) rather than from `NV_USABLE_FB_SIZE_IN_MB` (GA102 and later).
fn uses_local_memory_range(generation: Generation, boot42: u32) -> bool {
    generation == Generation::Turing
        || (generation == Generation::Ampere && Boot42::from_raw(boot42).chip_id() == 0x170)
}

/// The usable VRAM size. `NV_USABLE_FB_SIZE_IN_MB` (written by the boot firmware; it
/// excludes memory the firmware reserves) is preferred wherever it reads as a plausible
/// size no larger than the physical size; on Turing and GA100, where nova-core reads
/// `NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE` instead, that register is the fallback and the upper
/// bound. Whether the firmware fills the usable-size register on Turing is **unconfirmed**.
fn usable_vram(
    address: PciAddress,
    generation: Generation,
    readout: &DeviceReadout,
) -> Result<u64, IdentifyError> {
    let range_raw = readout.local_memory_range;
    let physical = Some(LocalMemoryRange::from_raw(range_raw).size())
        .filter(|&s| !is_bogus(range_raw) && s > 0);
    let usable_raw = readout.usable_fb_size_mb;
    let usable = Some(u64::from(usable_raw) << 20)
        .filter(|&s| !is_bogus(usable_raw) && physical.is_none_or(|p| s <= p));
    if uses_local_memory_range(generation, readout.boot42) {
        usable.or(physical).ok_or(IdentifyError::NoVramSize {
            address,
            register: "NV_PFB_PRI_MMU_LOCAL_MEMORY_RANGE",
            value: range_raw,
        })
    } else {
        usable.ok_or(IdentifyError::NoVramSize {
            address,
            register: "NV_USABLE_FB_SIZE_IN_MB",
            value: usable_raw,
        })
    }
}

/// A register value that cannot be a size: unanswered (all ones), PRI error (0xBADxxxxx) or
/// zero.
fn is_bogus(value: u32) -> bool {
    value == 0 || value == u32::MAX || value >> 20 == 0xBAD
}

/// Identifies the GPU at `address` from what was read off it.
pub fn identify(
    address: PciAddress,
    readout: &DeviceReadout,
) -> Result<ChipIdentity, IdentifyError> {
    let DeviceReadout {
        config,
        bar_region_sizes: sizes,
        boot0,
        boot42,
        ..
    } = readout;
    if *boot0 == u32::MAX {
        return Err(IdentifyError::NotAnswering { address });
    }
    let generation = generation_of(*boot0, *boot42).ok_or(IdentifyError::UnknownChip {
        address,
        boot0: *boot0,
        boot42: *boot42,
    })?;
    if sizes[0] < BAR0_SIZE {
        return Err(IdentifyError::NoRegisterBar {
            address,
            size: sizes[0],
        });
    }
    let usable = usable_vram(address, generation, readout)?;

    let bar_register = |index: usize| config_u32(config, CONFIG_BARS + 4 * index);
    let memory: Vec<(u8, u64)> = (1..6u8)
        .filter(|&i| sizes[usize::from(i)] > 0)
        .map(|i| (i, sizes[usize::from(i)]))
        .collect();
    let &(aperture, _) = memory
        .iter()
        .max_by_key(|&&(i, size)| (size, std::cmp::Reverse(i)))
        .ok_or(IdentifyError::NoVramBar { address })?;
    let mut vram_size = usable;
    let mut bars = vec![HostBar {
        index: 0,
        role: HostBarRole::Registers,
        size: sizes[0],
        is_64bit: bar_register(0) & BAR_TYPE_64 != 0,
        prefetchable: bar_register(0) & BAR_PREFETCHABLE != 0,
    }];
    for &(index, region) in &memory {
        let (role, size) = if index == aperture {
            (HostBarRole::Vram { vram_offset: 0 }, region.min(usable))
        } else if aperture == 4 && index == 2 {
            // nvgrace: the reserved memory right after the usable part.
            vram_size = usable + region;
            (
                HostBarRole::Vram {
                    vram_offset: usable,
                },
                region,
            )
        } else {
            (HostBarRole::InstanceMemory, region)
        };
        let register = bar_register(usize::from(index));
        bars.push(HostBar {
            index,
            role,
            size,
            is_64bit: register & BAR_TYPE_64 != 0,
            prefetchable: register & BAR_PREFETCHABLE != 0,
        });
    }
    let pci = PciIdentity {
        vendor_id: config_u16(config, 0x00),
        device_id: config_u16(config, 0x02),
        revision: config[0x08],
        class_code: config_u32(config, 0x08) >> 8,
        subsystem_vendor_id: config_u16(config, 0x2C),
        subsystem_id: config_u16(config, 0x2E),
    };
    let chip = Boot42::from_raw(*boot42).chip_id();
    Ok(ChipIdentity {
        name: address.to_string(),
        description: format!(
            "NVIDIA {generation} GPU {:04x}:{:04x} (chip {chip:#x}) at {address} through VFIO",
            pci.vendor_id, pci.device_id
        ),
        generation,
        boot0: *boot0,
        boot42: *boot42,
        pci,
        vram_size,
        usable_vram_size: usable,
        bars,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::{AccessWidth, HostGpu};
    use gpu_emulation::ChipProfile;

    /// What VFIO would report for an emulated GPU presented with power-of-two BARs: config
    /// space from its identity, region sizes padded, registers read from the emulated BAR0.
    fn readout_of(gpu: &EmulatedHostGpu) -> DeviceReadout {
        let id = gpu.identity();
        let mut config = [0u8; 64];
        config[0..2].copy_from_slice(&id.pci.vendor_id.to_le_bytes());
        config[2..4].copy_from_slice(&id.pci.device_id.to_le_bytes());
        config[8..12]
            .copy_from_slice(&(id.pci.class_code << 8 | u32::from(id.pci.revision)).to_le_bytes());
        config[0x2C..0x2E].copy_from_slice(&id.pci.subsystem_vendor_id.to_le_bytes());
        config[0x2E..0x30].copy_from_slice(&id.pci.subsystem_id.to_le_bytes());
        let mut sizes = [0u64; 6];
        for bar in &id.bars {
            let i = usize::from(bar.index);
            sizes[i] = bar.size.next_power_of_two();
            let bits = if bar.is_64bit { BAR_TYPE_64 } else { 0 }
                | if bar.prefetchable {
                    BAR_PREFETCHABLE
                } else {
                    0
                };
            config[CONFIG_BARS + 4 * i..CONFIG_BARS + 4 * i + 4]
                .copy_from_slice(&bits.to_le_bytes());
        }
        let reg = |offset| gpu.bar0_read(offset, AccessWidth::Dword).unwrap() as u32;
        DeviceReadout {
            config,
            bar_region_sizes: sizes,
            boot0: reg(BOOT_0),
            boot42: reg(BOOT_42),
            local_memory_range: reg(LOCAL_MEMORY_RANGE),
            usable_fb_size_mb: reg(USABLE_FB_SIZE_IN_MB),
        }
    }

    fn address() -> PciAddress {
        "0000:00:05.0".parse().unwrap()
    }

    #[test]
    fn every_profile_is_identified_from_its_registers_and_padded_regions() {
        for profile in ChipProfile::all() {
            let gpu = EmulatedHostGpu::new(profile).unwrap();
            let found = identify(address(), &readout_of(&gpu)).unwrap();
            let want = gpu.identity();
            assert_eq!(found.generation, want.generation, "{}", profile.name());
            assert_eq!((found.boot0, found.boot42), (want.boot0, want.boot42));
            assert_eq!(found.pci, want.pci, "{}", profile.name());
            assert_eq!(found.bars, want.bars, "{}", profile.name());
            assert_eq!(found.vram_size, want.vram_size, "{}", profile.name());
            assert_eq!(
                found.usable_vram_size,
                want.usable_vram_size,
                "{}",
                profile.name()
            );
            assert_eq!(found.name, "0000:00:05.0");
        }
    }

    #[test]
    fn an_unknown_or_silent_chip_is_refused() {
        let gpu = EmulatedHostGpu::by_name("tu102-24g").unwrap();
        let mut r = readout_of(&gpu);
        r.boot0 = u32::MAX;
        assert!(matches!(
            identify(address(), &r),
            Err(IdentifyError::NotAnswering { .. })
        ));
        // Kepler (0x0E4): a generation the backend does not drive.
        r.boot0 = 0x0E40_00A1;
        r.boot42 = 0x0E4A_1000;
        let e = identify(address(), &r).unwrap_err();
        assert!(matches!(e, IdentifyError::UnknownChip { .. }), "{e}");
        assert!(e.to_string().contains("0x0e4000a1"), "{e}");
        // Pre-Fermi.
        r.boot0 = 0x0460_00A1;
        r.boot42 = 0;
        assert!(matches!(
            identify(address(), &r),
            Err(IdentifyError::UnknownChip { .. })
        ));
    }

    #[test]
    fn a_bogus_vram_size_is_refused() {
        let gpu = EmulatedHostGpu::by_name("tu102-24g").unwrap();
        let mut r = readout_of(&gpu);
        for bad in [0, u32::MAX, 0xBADF_1100] {
            r.local_memory_range = bad;
            r.usable_fb_size_mb = bad;
            assert!(matches!(
                identify(address(), &r),
                Err(IdentifyError::NoVramSize { .. })
            ));
        }
        // Turing without the usable-size register: the physical size.
        let mut r = readout_of(&gpu);
        r.usable_fb_size_mb = 0;
        let found = identify(address(), &r).unwrap();
        assert_eq!(
            found.usable_vram_size,
            LocalMemoryRange::from_raw(r.local_memory_range).size()
        );
        // A usable size above the physical one is not believed.
        let mut r = readout_of(&gpu);
        r.usable_fb_size_mb = 1 << 20;
        let found = identify(address(), &r).unwrap();
        assert_eq!(
            found.usable_vram_size,
            LocalMemoryRange::from_raw(r.local_memory_range).size()
        );
        let gpu = EmulatedHostGpu::by_name("gh100-80g").unwrap();
        let mut r = readout_of(&gpu);
        r.usable_fb_size_mb = 0xBADF_1100;
        assert!(matches!(
            identify(address(), &r),
            Err(IdentifyError::NoVramSize { .. })
        ));
    }

    #[test]
    fn missing_bars_are_refused() {
        let gpu = EmulatedHostGpu::by_name("gh100-80g").unwrap();
        let mut r = readout_of(&gpu);
        r.bar_region_sizes[0] = 0x1000;
        assert!(matches!(
            identify(address(), &r),
            Err(IdentifyError::NoRegisterBar { .. })
        ));
        let mut r = readout_of(&gpu);
        r.bar_region_sizes[1..].fill(0);
        assert!(matches!(
            identify(address(), &r),
            Err(IdentifyError::NoVramBar { .. })
        ));
    }

    #[test]
    fn local_memory_range_decodes_like_nova() {
        let r = LocalMemoryRange::from_raw(0)
            .with_lower_mag(3)
            .with_lower_scale(13);
        assert_eq!(r.size(), 24 << 30);
        assert_eq!(r.with_ecc_mode(1).size(), (24u64 << 30) / 16 * 15);
    }
}
