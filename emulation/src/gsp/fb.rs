//! The framebuffer regions the emulated GSP reports in GET_GSP_STATIC_INFO, derived from
//! the chip profile.
//!
//! - Usable: `[0, usable_vram_size)`, exactly the profile's usable size.
//! - Board-reserved: `[usable_vram_size, vram_size)` where the profile carves memory out
//!   (the GH200's 1 GiB nvgrace resmem region); absent elsewhere.
//! - Firmware: the WPR2 / GSP-RM heap region at the top of the physical framebuffer,
//!   `[vram_size, vram_size + FIRMWARE_RESERVED)`. Real boards report as "total" the
//!   framebuffer minus this region (an H100 80GB shows 81,559 MiB of 81,920), and the
//!   profiles model that reported total as their VRAM; so the firmware region lies above
//!   the emulated memory and is not backed by the VRAM memfd. Its size is an ASSUMPTION.

use crate::profile::ChipProfile;

/// Size of the firmware (WPR2 + GSP heap) region above the modelled VRAM (ASSUMPTION).
pub const FIRMWARE_RESERVED: u64 = 256 << 20;

/// What a framebuffer region is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FbRegionKind {
    /// Memory the host may allocate from.
    Usable,
    /// Carved out by the board (nvgrace resmem).
    BoardReserved,
    /// Held by the GSP firmware (WPR2, heap).
    Firmware,
}

impl FbRegionKind {
    /// Wire encoding (project-defined): 0 usable, 1 board-reserved, 2 firmware.
    pub const fn raw(self) -> u32 {
        match self {
            FbRegionKind::Usable => 0,
            FbRegionKind::BoardReserved => 1,
            FbRegionKind::Firmware => 2,
        }
    }
}

/// One framebuffer region, `[base, limit]` (inclusive limit, as RM's FB_REGION_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbRegion {
    /// First byte.
    pub base: u64,
    /// Last byte.
    pub limit: u64,
    /// Purpose.
    pub kind: FbRegionKind,
    /// Protected (not readable by the CPU through BARs).
    pub protected: bool,
}

/// The regions of `profile`, in address order.
pub fn fb_regions(profile: &ChipProfile) -> Vec<FbRegion> {
    let usable = profile.usable_vram_size();
    let total = profile.vram_size();
    let mut regions = vec![FbRegion {
        base: 0,
        limit: usable - 1,
        kind: FbRegionKind::Usable,
        protected: false,
    }];
    if total > usable {
        regions.push(FbRegion {
            base: usable,
            limit: total - 1,
            kind: FbRegionKind::BoardReserved,
            protected: false,
        });
    }
    regions.push(FbRegion {
        base: total,
        limit: total + FIRMWARE_RESERVED - 1,
        kind: FbRegionKind::Firmware,
        protected: true,
    });
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_tile_the_framebuffer_and_match_the_profile() {
        for p in ChipProfile::all() {
            let r = fb_regions(p);
            assert_eq!(r[0].base, 0);
            for w in r.windows(2) {
                assert_eq!(w[0].limit + 1, w[1].base, "{p}");
            }
            let usable: u64 = r
                .iter()
                .filter(|x| x.kind == FbRegionKind::Usable)
                .map(|x| x.limit - x.base + 1)
                .sum();
            assert_eq!(usable, p.usable_vram_size(), "{p}");
            let fw = r.last().unwrap();
            assert_eq!(fw.kind, FbRegionKind::Firmware);
            assert_eq!(fw.base, p.vram_size());
        }
        let gh200 = fb_regions(ChipProfile::by_name("gh200-96g").unwrap());
        assert_eq!(gh200.len(), 3);
        assert_eq!(gh200[1].kind, FbRegionKind::BoardReserved);
        assert_eq!((gh200[1].base, gh200[1].limit + 1), (95 << 30, 96 << 30));
    }
}
