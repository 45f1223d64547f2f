//! What one guest should see: its VRAM, its window register and its power state, and the
//! bytes guests write (each guest's own marker among bytes that are nobody's marker and no
//! canary).

use gpu_backend::host_gpu::Generation;

use crate::support::rng::Rng;

/// What every byte of free guest VRAM (never handed out, or released) holds.
pub const FREE_CANARY: u8 = 0x5A;
/// What the host-reserved region holds outside the BAR1 tables.
pub const RESERVED_CANARY: u8 = 0xA5;
/// Guests' markers: each incarnation of a guest writes its own, and no other guest's data
/// ever contains it.
pub const MARKERS: std::ops::RangeInclusive<u8> = 0xB0..=0xBB;
/// What a refused read returns (padding, past the slice, a removed guest, D3hot).
pub const ONES: u8 = 0xFF;
/// BAR0 offset and size of the PRAMIN aperture.
pub const APERTURE: u64 = 0x70_0000;
/// Size of the PRAMIN aperture.
pub const APERTURE_SIZE: u64 = 1 << 20;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 16 << 20;

/// Whether `byte` is some guest's marker.
pub fn is_marker(byte: u8) -> bool {
    MARKERS.contains(&byte)
}

/// Whether `byte` is a canary of host VRAM.
pub fn is_canary(byte: u8) -> bool {
    byte == FREE_CANARY || byte == RESERVED_CANARY
}

/// `n` bytes a guest with `marker` writes: about a quarter its marker, the rest anything
/// that is neither a marker nor a canary.
pub fn guest_data(rng: &mut Rng, marker: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            if rng.chance(1, 4) {
                return marker;
            }
            loop {
                let b = rng.next_u32() as u8;
                if !is_marker(b) && !is_canary(b) {
                    return b;
                }
            }
        })
        .collect()
}

/// The first byte of `data` (read by guest `marker` at `at`) that is another guest's
/// marker or a canary of host VRAM, described.
pub fn foreign_byte(data: &[u8], marker: u8, at: u64) -> Option<String> {
    let (i, &b) = data
        .iter()
        .enumerate()
        .find(|&(_, &b)| (is_marker(b) && b != marker) || is_canary(b))?;
    let what = if is_canary(b) {
        "a canary of host VRAM"
    } else {
        "another guest's marker"
    };
    Some(format!(
        "read {b:#04x} ({what}) at {:#x}",
        at.wrapping_add(i as u64)
    ))
}

/// The layout of a generation's window register, written down independently of the
/// backend (gpu-facts 2.4): offset, latching bits, BASE bits, whether TARGET exists.
#[derive(Debug, Clone, Copy)]
pub struct WindowLayout {
    /// BAR0 offset.
    pub offset: u64,
    /// Bits that latch.
    pub defined: u32,
    /// BASE (64 KiB units).
    pub base_mask: u32,
    /// TARGET (bits 25:24) exists; non-zero reaches no VRAM.
    pub has_target: bool,
}

impl WindowLayout {
    /// The layout of `generation`.
    pub fn of(generation: Generation) -> WindowLayout {
        match generation {
            Generation::Turing | Generation::Ampere | Generation::Ada => WindowLayout {
                offset: 0x1700,
                defined: 0x03FF_FFFF,
                base_mask: 0x00FF_FFFF,
                has_target: true,
            },
            Generation::Hopper => WindowLayout {
                offset: 0x10_FD40,
                defined: 0x003F_FFFF,
                base_mask: 0x003F_FFFF,
                has_target: false,
            },
            Generation::Blackwell => WindowLayout {
                offset: 0x10_FD40,
                defined: 0x007F_FFFF,
                base_mask: 0x007F_FFFF,
                has_target: false,
            },
        }
    }
}

/// One guest as it should behave.
#[derive(Debug)]
pub struct GuestModel {
    /// The guest's VRAM (its slice), byte for byte.
    pub vram: Vec<u8>,
    /// The window register's value.
    pub window: u32,
    /// PMCSR says D3hot: every BAR reads ~0 and drops writes.
    pub powered_off: bool,
    /// The guest still owns its slice (not removed).
    pub live: bool,
    layout: WindowLayout,
}

impl GuestModel {
    /// A guest just handed a scrubbed slice of `size` bytes.
    pub fn new(size: u64, layout: WindowLayout) -> GuestModel {
        GuestModel {
            vram: vec![0; size as usize],
            window: 0,
            powered_off: false,
            live: true,
            layout,
        }
    }

    /// The window register's layout.
    pub fn layout(&self) -> WindowLayout {
        self.layout
    }

    /// Size of the guest's VRAM.
    pub fn size(&self) -> u64 {
        self.vram.len() as u64
    }

    /// The guest VRAM address aperture offset `o` shows, if any.
    pub fn aperture_addr(&self, o: u64) -> Option<u64> {
        if self.layout.has_target && (self.window >> 24) & 3 != 0 {
            return None;
        }
        let g = (u64::from(self.window & self.layout.base_mask) << 16) + o;
        (g < self.size()).then_some(g)
    }

    /// The expected byte of a BAR0 read at `a`, where the model knows it (the window
    /// register and the aperture; other registers pass or hide host state).
    pub fn bar0_byte(&self, a: u64) -> Option<u8> {
        // A removed guest's registers read ~0 too, not the host's.
        if self.powered_off || !self.live {
            return Some(ONES);
        }
        let w = self.layout.offset;
        if (w..w + 4).contains(&a) {
            return Some((self.window >> (8 * (a - w))) as u8);
        }
        if (APERTURE..APERTURE + APERTURE_SIZE).contains(&a) {
            return Some(match self.aperture_addr(a - APERTURE) {
                Some(g) if self.live => self.vram[g as usize],
                _ => ONES,
            });
        }
        None
    }

    /// A BAR0 write of `data` at `at` (already clipped to BAR0).
    pub fn write_bar0(&mut self, at: u64, data: &[u8]) {
        if self.powered_off || !self.live {
            return;
        }
        let w = self.layout.offset;
        let mut window = self.window;
        for (i, &b) in data.iter().enumerate() {
            let a = at + i as u64;
            if (w..w + 4).contains(&a) {
                let shift = 8 * (a - w);
                window = (window & !(0xFF << shift)) | (u32::from(b) << shift);
            }
        }
        self.window = window & self.layout.defined;
        for (i, &b) in data.iter().enumerate() {
            let a = at + i as u64;
            if (APERTURE..APERTURE + APERTURE_SIZE).contains(&a) {
                if let Some(g) = self.aperture_addr(a - APERTURE).filter(|_| self.live) {
                    self.vram[g as usize] = b;
                }
            }
        }
    }

    /// The expected byte at offset `o` of the trapped VRAM BAR.
    pub fn vram_bar_byte(&self, o: u64) -> u8 {
        if self.powered_off || !self.live {
            return ONES;
        }
        self.vram.get(o as usize).copied().unwrap_or(ONES)
    }

    /// A trapped VRAM BAR write of `data` at `o` (already clipped to the presented size).
    pub fn write_vram_bar(&mut self, o: u64, data: &[u8]) {
        if self.powered_off || !self.live {
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            if let Some(v) = self.vram.get_mut(o as usize + i) {
                *v = b;
            }
        }
    }

    /// A write through the guest's mapping of its VRAM (not gated by the power state).
    pub fn write_mapped(&mut self, o: u64, data: &[u8]) {
        if self.live {
            self.vram[o as usize..o as usize + data.len()].copy_from_slice(data);
        }
    }

    /// A PMCSR write of `value`: D0 (0) and D3hot (3) latch, 1 and 2 are not supported and
    /// change nothing.
    pub fn write_pmcsr(&mut self, value: u16) {
        match value & 3 {
            0 => self.powered_off = false,
            3 => self.powered_off = true,
            _ => {}
        }
    }

    /// Function-level reset: window 0, D0; VRAM kept.
    pub fn reset(&mut self) {
        self.window = 0;
        self.powered_off = false;
    }
}
