//! The host's VRAM outside both guests' slices, seen through the server's VRAM memfds: seeded
//! canaries planted in free VRAM next to A's slice and at the end of the guest area, the
//! host-reserved region (BAR1 page tables) as it was, and every VRAM file's size.

use crate::support::proc_stats::HostVramFiles;
use crate::support::rng::{pattern, pattern_mismatch, splitmix64};

/// Bytes per canary.
const CANARY: usize = 64 << 10;

/// What the host VRAM looked like before the soak.
pub struct HostCanaries {
    vram: HostVramFiles,
    seed: u64,
    canaries: Vec<u64>,
    reserved: (u64, u64),
    reserved_hash: u64,
    sizes: Vec<u64>,
}

fn hash(data: &[u8]) -> u64 {
    data.chunks(8).fold(0u64, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        splitmix64(h ^ u64::from_le_bytes(w))
    })
}

impl HostCanaries {
    /// Plant canaries in free VRAM `[free_start, guest_area_end)` (first and last 64 KiB, and
    /// a few seeded places between) and remember the host-reserved region `reserved`.
    pub fn plant(
        vram: HostVramFiles,
        seed: u64,
        free: (u64, u64),
        reserved: (u64, u64),
    ) -> Result<HostCanaries, String> {
        let (start, end) = free;
        let mut canaries = vec![start, end - CANARY as u64];
        let pages = (end - start) / CANARY as u64;
        canaries.extend((0..6u64).map(|i| start + (splitmix64(seed ^ i) % pages) * CANARY as u64));
        let mut buf = vec![0u8; CANARY];
        for &at in &canaries {
            pattern(seed, at, &mut buf);
            vram.write_base(at, &buf)
                .map_err(|e| format!("planting a host canary at {at:#x}: {e}"))?;
        }
        let reserved_hash = Self::hash_range(&vram, reserved)?;
        let sizes = vram.sizes().map_err(|e| e.to_string())?;
        Ok(HostCanaries {
            vram,
            seed,
            canaries,
            reserved,
            reserved_hash,
            sizes,
        })
    }

    fn hash_range(vram: &HostVramFiles, (start, end): (u64, u64)) -> Result<u64, String> {
        let mut buf = vec![0u8; 1 << 20];
        let mut h = 0;
        for at in (start..end).step_by(buf.len()) {
            let n = ((end - at) as usize).min(buf.len());
            vram.read_base(at, &mut buf[..n])
                .map_err(|e| format!("reading host VRAM at {at:#x}: {e}"))?;
            h = splitmix64(h ^ hash(&buf[..n]));
        }
        Ok(h)
    }

    /// Every canary intact.
    pub fn check_canaries(&self) -> Result<(), String> {
        let mut buf = vec![0u8; CANARY];
        for &at in &self.canaries {
            self.vram
                .read_base(at, &mut buf)
                .map_err(|e| format!("reading a host canary at {at:#x}: {e}"))?;
            if let Some(bad) = pattern_mismatch(self.seed, at, &buf) {
                return Err(format!("host VRAM canary changed at {bad:#x}"));
            }
        }
        Ok(())
    }

    /// Canaries, the host-reserved region and every VRAM file's size as before.
    pub fn check_all(&self) -> Result<(), String> {
        self.check_canaries()?;
        if Self::hash_range(&self.vram, self.reserved)? != self.reserved_hash {
            return Err(format!(
                "the host-reserved region [{:#x}, {:#x}) changed",
                self.reserved.0, self.reserved.1
            ));
        }
        let sizes = self.vram.sizes().map_err(|e| e.to_string())?;
        if sizes != self.sizes {
            return Err(format!(
                "VRAM file sizes went from {:x?} to {sizes:x?}",
                self.sizes
            ));
        }
        Ok(())
    }

    /// How many canaries there are.
    pub fn count(&self) -> usize {
        self.canaries.len()
    }
}
