//! A guest's operations, drawn at random: every register, aperture, BAR and mapping access
//! of every width and offset, window values inside, at the edge of and past the slice or
//! garbage, DMA maps, power states, config space, resets, reconnects (`run.rs` runs them).

use gpu_backend::presentation::config_space::PM_CAP_OFFSET;

use super::dma::{MapRequest, UnmapRequest};
use super::guest::Guest;
use super::model::{guest_data, APERTURE, APERTURE_SIZE, BAR0_SIZE};
use crate::support::rng::Rng;

/// Host registers whose change would break isolation (BAR binds, TLB invalidate, GSP
/// doorbell, both generations' window registers and their neighbours).
const HOST_STATE: [u64; 14] = [
    0xB8_0F40, 0xB8_0F48, 0xB8_0F50, 0xB8_0F60, 0xB8_0F64, 0xB8_0F70, 0xB8_0F74, 0xB8_30A0,
    0xB8_30A4, 0xB8_30B0, 0x11_0C00, 0x1704, 0x10_FD40, 0x1700,
];
/// PMCSR, in config space.
pub const PMCSR: u64 = PM_CAP_OFFSET as u64 + 4;

/// How an access reaches the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A call on the presented function (what the connection thread does).
    Direct,
    /// A vfio-user message, answered.
    Socket,
    /// A vfio-user message with `NO_REPLY` (writes only; QEMU posts BAR writes).
    Posted,
}

/// One guest operation.
#[derive(Debug, Clone)]
pub enum Access {
    /// BAR0 read of `len` bytes at `at`.
    Bar0Read { at: u64, len: usize, via: Via },
    /// BAR0 write.
    Bar0Write { at: u64, data: Vec<u8>, via: Via },
    /// Trapped VRAM BAR read.
    VramRead { at: u64, len: usize, via: Via },
    /// Trapped VRAM BAR write.
    VramWrite { at: u64, data: Vec<u8>, via: Via },
    /// Read through QEMU's mapping of the VRAM BAR.
    MappedRead { at: u64, len: usize },
    /// Write through QEMU's mapping of the VRAM BAR.
    MappedWrite { at: u64, data: Vec<u8> },
    /// `REGION_WRITE_MULTI` of (region, offset, bytes) writes.
    WriteMulti {
        writes: Vec<(u32, u64, Vec<u8>)>,
        posted: bool,
    },
    /// `DMA_MAP`.
    DmaMap(MapRequest),
    /// `DMA_UNMAP`.
    DmaUnmap(UnmapRequest),
    /// A PMCSR write (D0, D3hot, or an unsupported state), then a read back.
    Power { value: u16, via: Via },
    /// A config space write anywhere (PMCSR included, sometimes), then PMCSR read back.
    Config { at: u64, data: Vec<u8>, via: Via },
    /// Function-level reset.
    Reset { via: Via },
    /// Hang up and connect again.
    Reconnect,
}

impl Access {
    /// Whether the access goes through the guest's connection (ordered after its posted
    /// messages).
    pub fn through_connection(&self) -> bool {
        match self {
            Access::Bar0Read { via, .. }
            | Access::Bar0Write { via, .. }
            | Access::VramRead { via, .. }
            | Access::VramWrite { via, .. }
            | Access::Power { via, .. }
            | Access::Config { via, .. }
            | Access::Reset { via } => *via != Via::Direct,
            Access::MappedRead { .. } | Access::MappedWrite { .. } | Access::Reconnect => false,
            Access::WriteMulti { .. } | Access::DmaMap(_) | Access::DmaUnmap(_) => true,
        }
    }

    /// Whether the access is a posted message.
    pub fn posted(&self) -> bool {
        match self {
            Access::Bar0Write { via, .. } | Access::VramWrite { via, .. } => *via == Via::Posted,
            Access::WriteMulti { posted, .. } => *posted,
            _ => false,
        }
    }
}

/// The kinds of operation, for drawing and counting.
pub const KINDS: [(&str, u32); 18] = [
    ("window write", 90),
    ("window read", 30),
    ("aperture read", 140),
    ("aperture write", 140),
    ("aperture at the slice end", 90),
    ("aperture at its own end", 20),
    ("BAR0 anywhere", 50),
    ("VRAM BAR read", 90),
    ("VRAM BAR write", 90),
    ("mapped read", 50),
    ("mapped write", 60),
    ("write multi", 30),
    ("DMA map", 25),
    ("DMA unmap", 20),
    ("power state", 8),
    ("config space", 8),
    ("reset", 8),
    ("reconnect", 3),
];

fn via(rng: &mut Rng, write: bool) -> Via {
    match rng.below(8) {
        0 | 1 => Via::Socket,
        2 if write => Via::Posted,
        _ => Via::Direct,
    }
}

/// An access length: mostly the register widths 1, 2, 4 and 8, then odd ones, short runs,
/// pages and (rarely) up to 64 KiB.
fn length(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=39 => *rng.pick(&[1, 2, 4, 8]),
        40..=54 => *rng.pick(&[3, 5, 6, 7]),
        55..=84 => rng.range(9, 64) as usize,
        85..=97 => rng.range(65, 4096) as usize,
        _ => rng.range(4097, 64 << 10) as usize,
    }
}

/// A window register value for a guest of `size` bytes.
fn window_value(rng: &mut Rng, size: u64, has_target: bool) -> u64 {
    let pages = size >> 16;
    match rng.below(10) {
        // Inside the slice.
        0..=2 => rng.below(pages),
        // The 1 MiB window straddles the end of the slice.
        3 | 4 => rng.range(pages.saturating_sub(16), pages),
        // Past it (what would be the neighbour's or the host's VRAM).
        5 => rng.range(pages, pages + 4096),
        6 => rng.range(pages, 0x7F_FFFF),
        // Garbage.
        7 => rng.next_u64(),
        8 => u64::from(rng.next_u32()),
        // Another TARGET (system memory on Turing-Ada; undefined bits elsewhere).
        _ => {
            let target = if has_target {
                rng.range(1, 3)
            } else {
                rng.range(1, 255)
            };
            rng.below(pages + 32) | target << 24
        }
    }
}

/// An aperture offset: anywhere, or just below a 64 KiB boundary.
fn aperture_offset(rng: &mut Rng) -> u64 {
    if rng.chance(1, 3) {
        (rng.range(1, 16) << 16) - rng.range(1, 24)
    } else {
        rng.below(APERTURE_SIZE)
    }
}

/// An offset in a padded BAR of `real` bytes presented as `presented`: anywhere, around
/// the end of the real part, in the padding, around and past the end.
fn bar_offset(rng: &mut Rng, real: u64, presented: u64) -> u64 {
    match rng.below(20) {
        0..=8 => rng.below(presented),
        9..=11 => rng.below(real),
        12..=14 => real.saturating_sub(rng.range(1, 24)),
        15 | 16 if presented > real => rng.range(real, presented - 1),
        17 => presented.saturating_sub(rng.range(1, 24)),
        18 => presented + rng.below(1 << 20),
        _ => rng.next_u64(),
    }
}

/// Draws a `kind` operation for `guest`.
pub fn draw(rng: &mut Rng, kind: &str, guest: &Guest) -> Access {
    let m = &guest.model;
    let size = m.size();
    let marker = guest.marker;
    let layout = m.layout();
    match kind {
        "window write" => {
            let value = window_value(rng, size, layout.has_target);
            let (d, data) = match rng.below(20) {
                0..=11 => (0, (value as u32).to_le_bytes().to_vec()),
                12 | 13 => (0, value.to_le_bytes().to_vec()),
                14..=16 => {
                    let width = *rng.pick(&[1u64, 2]);
                    let byte = rng.below(4 / width) * width;
                    let bytes = (value >> (8 * byte)).to_le_bytes();
                    (byte as i64, bytes[..width as usize].to_vec())
                }
                _ => {
                    let d = rng.range(0, 12) as i64 - 4;
                    let n = rng.range(1, 9) as usize;
                    (d, rng.bytes(n))
                }
            };
            Access::Bar0Write {
                at: layout.offset.wrapping_add_signed(d),
                data,
                via: via(rng, true),
            }
        }
        "window read" => Access::Bar0Read {
            at: layout
                .offset
                .wrapping_add_signed(rng.range(0, 12) as i64 - 4),
            len: rng.range(1, 9) as usize,
            via: via(rng, false),
        },
        "aperture read"
        | "aperture write"
        | "aperture at the slice end"
        | "aperture at its own end" => {
            let len = length(rng);
            let o = match kind {
                "aperture at the slice end" => {
                    // The access ends `back` bytes before the end of the slice under the
                    // current window, straddling it when longer.
                    let back = rng.below(24);
                    m.aperture_addr(0)
                        .and_then(|g0| (size - g0).checked_sub(back + 1))
                        .filter(|&o| o < APERTURE_SIZE)
                        .unwrap_or_else(|| aperture_offset(rng))
                }
                "aperture at its own end" => APERTURE_SIZE - rng.range(1, 24),
                _ => aperture_offset(rng),
            };
            let at = APERTURE + o;
            if kind == "aperture read" || (kind != "aperture write" && rng.chance(1, 2)) {
                Access::Bar0Read {
                    at,
                    len,
                    via: via(rng, false),
                }
            } else {
                Access::Bar0Write {
                    at,
                    data: guest_data(rng, marker, len),
                    via: via(rng, true),
                }
            }
        }
        "BAR0 anywhere" => {
            let at = match rng.below(20) {
                0..=15 => rng.below(BAR0_SIZE),
                16 | 17 => *rng.pick(&HOST_STATE),
                18 => BAR0_SIZE - rng.range(1, 24),
                _ => BAR0_SIZE + rng.below(1 << 30),
            };
            let len = length(rng);
            if rng.chance(1, 2) {
                Access::Bar0Read {
                    at,
                    len,
                    via: via(rng, false),
                }
            } else {
                Access::Bar0Write {
                    at,
                    data: guest_data(rng, marker, len),
                    via: via(rng, true),
                }
            }
        }
        "VRAM BAR read" => Access::VramRead {
            at: bar_offset(rng, size, guest.presented),
            len: length(rng),
            via: via(rng, false),
        },
        "VRAM BAR write" => {
            let at = bar_offset(rng, size, guest.presented);
            let len = length(rng);
            Access::VramWrite {
                at,
                data: guest_data(rng, marker, len),
                via: via(rng, true),
            }
        }
        "mapped read" | "mapped write" => {
            let len = length(rng).min(size as usize);
            let last = size - len as u64;
            let at = if rng.chance(1, 4) {
                last - rng.below(16).min(last)
            } else {
                rng.range(0, last)
            };
            if kind == "mapped read" {
                Access::MappedRead { at, len }
            } else {
                Access::MappedWrite {
                    at,
                    data: guest_data(rng, marker, len),
                }
            }
        }
        "write multi" => {
            let writes = (0..rng.range(1, 8))
                .map(|_| {
                    let n = rng.range(1, 8) as usize;
                    match rng.below(4) {
                        0 => {
                            let v = window_value(rng, size, layout.has_target);
                            (0, layout.offset, (v as u32).to_le_bytes().to_vec())
                        }
                        1 | 2 => {
                            let o = aperture_offset(rng).min(APERTURE_SIZE - n as u64);
                            (0, APERTURE + o, guest_data(rng, marker, n))
                        }
                        _ => {
                            let o = rng.below(guest.presented - n as u64);
                            (guest.vram_bar, o, guest_data(rng, marker, n))
                        }
                    }
                })
                .collect();
            Access::WriteMulti {
                writes,
                posted: rng.chance(1, 2),
            }
        }
        "DMA map" => Access::DmaMap(guest.dma.random_map(rng)),
        "DMA unmap" => Access::DmaUnmap(guest.dma.random_unmap(rng)),
        "power state" => Access::Power {
            value: match rng.below(10) {
                0..=3 => 3,
                4..=7 => 0,
                _ => rng.next_u32() as u16,
            },
            via: via(rng, false),
        },
        "config space" => {
            let at = match rng.below(8) {
                0 => PMCSR - rng.below(4),
                1 => rng.range(256, 4095),
                2 => 4096 - rng.range(1, 4),
                _ => rng.below(256),
            };
            let n = rng.range(1, 8) as usize;
            Access::Config {
                at,
                data: rng.bytes(n),
                via: via(rng, false),
            }
        }
        "reset" => Access::Reset {
            via: via(rng, false),
        },
        _ => Access::Reconnect,
    }
}
