//! The soak (`gpuprobe.soak=1`): a guest that keeps using its VRAM while the host watches, for
//! the end-to-end test of several live guests on one backend.
//!
//! 1. **Write rounds**, for `soak_write_s` seconds (at least one round). Round `n` fills the
//!    guest's whole VRAM (`slice_size` bytes through the VRAM BARs' mmaps) with the soak
//!    pattern of its BAR seed and reads it back; then, at the window bases of the window checks
//!    (0, the middle, the last MiB), writes [`CHUNK_LEN`] bytes through the PRAMIN aperture with
//!    its aperture seed, reads them back through the aperture and through the VRAM BAR.
//! 2. **What stays**: the last round's pattern, announced so the host can check every byte.
//! 3. **Verify rounds**, `soak_verify` of them (`0`: until the device is lost), `soak_pause_ms`
//!    apart: BOOT_0, then the whole VRAM through the BARs and the start of each aperture chunk
//!    through the aperture, against what stays. A round with mismatches after which BOOT_0
//!    no longer reads its value was cut short by the device going away (`interrupted=1`) and
//!    does not count.
//! 4. **The device lost** (BOOT_0 no longer reads its value: the backend removed the guest):
//!    the aperture and the first VRAM word are read once more, then a "ghost" pattern is
//!    written through the VRAM BAR and the aperture, which must reach no VRAM of anybody
//!    (the host searches for it), and the soak ends.
//!
//! Console lines (besides the `check` lines `soak_write` and `soak_verify`):
//!
//! ```text
//! GPUPROBE soak_start slice_size=.. seed=.. write_s=.. chunks=0x2000,0x802000,0xf02000 chunk_len=4096
//! GPUPROBE soak_round n=.. bar_seed=.. aperture_seed=.. bad=.. first_bad=.. ms=..
//! GPUPROBE soak_kept rounds=.. bar_seed=.. aperture_seed=..
//! GPUPROBE soak_verify n=.. bad=.. first_bad=.. boot0=.. ms=.. interrupted=0|1
//! GPUPROBE soak_lost n=.. boot0=.. aperture=.. bar_word0=.. ghost_seed=.. ghost_bar_bytes=.. ghost_aperture_bytes=.. ghost_read_back=..
//! ```

use std::fs::File;
use std::time::{Duration, Instant};

use crate::aperture::{Bar0Window, VramView, BASE_SHIFT};
use crate::mem::Window;
use crate::out::{fact, fail, pass, set_current};
use crate::params::Params;
use crate::pattern::soak_word;
use crate::pci::{Bar, PciDevice};
use crate::window::bases;

/// Bytes written through the aperture at each window base.
pub const CHUNK_LEN: u64 = 4096;
/// Offset of an aperture chunk from its window base.
pub const CHUNK_OFFSET: u64 = 0x2000;
/// Bytes of the aperture chunks read back in a verify round.
const VERIFY_APERTURE_LEN: u64 = 256;
/// Guest VRAM mapped at a time.
const BLOCK: u64 = 1 << 20;
/// One 64 KiB window step.
const STEP: u64 = 1 << BASE_SHIFT;
/// Bytes of the ghost pattern written through the VRAM BAR / the aperture once the device is
/// lost.
const GHOST_BAR_LEN: u64 = 64 << 10;
const GHOST_APERTURE_LEN: u64 = 256;

/// The seeds of one write round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seeds {
    bar: u64,
    aperture: u64,
}

impl Seeds {
    /// Round `n`'s seeds, derived from the soak seed (the host reads them from the console).
    fn of(seed: u64, n: u64) -> Seeds {
        let bar = seed ^ n.wrapping_mul(0x0001_0000_0002_0000) ^ 0x0b00_0000;
        Seeds {
            bar,
            aperture: bar ^ 0x0a00_0004,
        }
    }

    /// The ghost pattern's seed.
    fn ghost(seed: u64) -> u64 {
        seed ^ 0x0600_0000_6800_0008
    }
}

/// Where the soak writes and what it expects back.
struct Plan {
    size: u64,
    /// Guest VRAM addresses of the aperture chunks.
    chunks: Vec<u64>,
}

impl Plan {
    fn new(size: u64) -> Plan {
        Plan {
            size,
            chunks: bases(size).into_iter().map(|b| b + CHUNK_OFFSET).collect(),
        }
    }

    /// The word at guest address `g` once `seeds`' round is done.
    fn kept_word(&self, seeds: Seeds, g: u64) -> u32 {
        let in_chunk = self.chunks.iter().any(|&c| (c..c + CHUNK_LEN).contains(&g));
        soak_word(if in_chunk { seeds.aperture } else { seeds.bar }, g)
    }
}

/// Mismatches of one round.
#[derive(Default)]
struct Tally {
    bad: u64,
    first: Option<String>,
}

impl Tally {
    fn miss(&mut self, what: impl FnOnce() -> String) {
        self.bad += 1;
        if self.first.is_none() {
            self.first = Some(what());
        }
    }

    /// The first mismatch as one word (for a `key=value` field), `-` if none.
    fn first(&self) -> String {
        self.first
            .as_deref()
            .unwrap_or("-")
            .replace(char::is_whitespace, "_")
    }
}

/// The device's mappings the soak uses.
struct Device {
    win: Bar0Window,
    view: VramView,
    boot0: Window,
}

impl Device {
    fn open(params: &Params, dev: &PciDevice, bars: &[Bar], reg: u64) -> std::io::Result<Device> {
        let bar_size = params
            .vram_bar
            .and_then(|i| bars.iter().find(|b| b.index == i))
            .map_or(0, |b| b.size);
        let regs = File::options()
            .read(true)
            .write(true)
            .open(dev.resource_path(params.boot0_bar))?;
        Ok(Device {
            win: Bar0Window::open(dev, params.boot0_bar, reg)?,
            view: VramView::open(dev, params, bar_size)?,
            boot0: Window::map(&regs, 0, 4)?,
        })
    }
}

/// Fill guest VRAM `[0, size)` through the VRAM BARs with `seed`'s pattern (8-byte stores).
fn fill_bar(d: &Device, plan: &Plan, seed: u64, t: &mut Tally) {
    fill_range(d, 0, plan.size, seed, t);
}

fn fill_range(d: &Device, start: u64, len: u64, seed: u64, t: &mut Tally) {
    for_each_block(d, start, len, t, |g, ptr, n, _| {
        let ptr = ptr.cast::<u64>();
        for i in 0..n / 8 {
            let a = g + 8 * i;
            let v = u64::from(soak_word(seed, a)) | (u64::from(soak_word(seed, a + 4)) << 32);
            // SAFETY: `ptr` maps `n` bytes of the VRAM BAR (page aligned, so 8-byte aligned)
            // and `8 * i + 8 <= n`.
            unsafe { std::ptr::write_volatile(ptr.add(i as usize), v) };
        }
    });
}

/// Runs `f(guest address, pointer, length, tally)` on each mapped block of at most
/// [`BLOCK`] bytes of guest VRAM `[start, start + len)`, through the VRAM BARs; a block
/// that cannot be mapped is a miss and ends the walk.
fn for_each_block(
    d: &Device,
    start: u64,
    len: u64,
    t: &mut Tally,
    mut f: impl FnMut(u64, *mut u8, u64, &mut Tally),
) {
    let mut g = start;
    while g < start + len {
        let n = BLOCK.min(start + len - g);
        let chunk = match d.view.chunk(g, n) {
            Ok(c) => c,
            Err(e) => return t.miss(|| format!("map guest={g:#x}: {e}")),
        };
        let ptr = match chunk.ptr() {
            Ok(p) => p,
            Err(e) => return t.miss(|| format!("map guest={g:#x}: {e}")),
        };
        f(g, ptr, n, t);
        g += n;
    }
}

/// Compare guest VRAM `[start, start + len)` through the VRAM BARs with `want(address)`.
fn check_range(d: &Device, start: u64, len: u64, want: impl Fn(u64) -> u32, t: &mut Tally) {
    for_each_block(d, start, len, t, |g, ptr, n, t| {
        let ptr = ptr.cast::<u32>();
        for i in 0..n / 4 {
            let a = g + 4 * i;
            // SAFETY: `ptr` maps `n` bytes of the VRAM BAR (4-byte aligned) and
            // `4 * i + 4 <= n`.
            let got = unsafe { std::ptr::read_volatile(ptr.add(i as usize)) };
            let w = want(a);
            if got != w {
                t.miss(|| format!("vram_bar guest={a:#x} got={got:#x} want={w:#x}"));
            }
        }
    });
}

/// Point the window at the 64 KiB unit holding guest address `g`; the aperture offset of `g`.
fn window_at(d: &Device, g: u64) -> std::io::Result<u64> {
    let base = g & !(STEP - 1);
    d.win.set_base(base)?;
    Ok(g - base)
}

/// Write `len` bytes of `seed`'s pattern at guest address `g` through the aperture.
fn aperture_fill(d: &Device, g: u64, len: u64, seed: u64) -> std::io::Result<()> {
    let off = window_at(d, g)?;
    for i in 0..len / 4 {
        let a = g + 4 * i;
        d.win.write(off + 4 * i, 4, u64::from(soak_word(seed, a)))?;
    }
    Ok(())
}

/// Compare `len` bytes at guest address `g` through the aperture with `seed`'s pattern.
fn aperture_check(d: &Device, g: u64, len: u64, seed: u64, t: &mut Tally) {
    let off = match window_at(d, g) {
        Ok(o) => o,
        Err(e) => return t.miss(|| format!("window at {g:#x}: {e}")),
    };
    for i in 0..len / 4 {
        let a = g + 4 * i;
        let w = u64::from(soak_word(seed, a));
        match d.win.read(off + 4 * i, 4) {
            Ok(got) if got == w => {}
            Ok(got) => t.miss(|| format!("aperture guest={a:#x} got={got:#x} want={w:#x}")),
            Err(e) => t.miss(|| format!("aperture guest={a:#x}: {e}")),
        }
    }
}

/// One write round: the whole VRAM through the BARs, then the aperture chunks.
fn write_round(d: &Device, plan: &Plan, seeds: Seeds) -> Tally {
    let mut t = Tally::default();
    fill_bar(d, plan, seeds.bar, &mut t);
    check_range(d, 0, plan.size, |a| soak_word(seeds.bar, a), &mut t);
    for &c in &plan.chunks {
        if let Err(e) = aperture_fill(d, c, CHUNK_LEN, seeds.aperture) {
            t.miss(|| format!("aperture write at {c:#x}: {e}"));
            continue;
        }
        // Through the aperture first: a trapped read waits for the posted writes before it.
        aperture_check(d, c, CHUNK_LEN, seeds.aperture, &mut t);
        check_range(d, c, CHUNK_LEN, |a| soak_word(seeds.aperture, a), &mut t);
    }
    let _ = d.win.set(0);
    t
}

/// One verify round against what `seeds`' round left.
fn verify_round(d: &Device, plan: &Plan, seeds: Seeds) -> Tally {
    let mut t = Tally::default();
    check_range(d, 0, plan.size, |a| plan.kept_word(seeds, a), &mut t);
    for &c in &plan.chunks {
        aperture_check(d, c, VERIFY_APERTURE_LEN, seeds.aperture, &mut t);
    }
    let _ = d.win.set(0);
    t
}

/// The device is gone: look once more, then write the ghost pattern that must land nowhere.
fn lost(d: &Device, plan: &Plan, n: u64, boot0: u32, seed: u64) {
    set_current("soak_lost");
    let aperture = window_at(d, plan.chunks[0])
        .and_then(|off| d.win.read(off, 4))
        .map_or_else(|e| format!("error:{e}"), |v| format!("{v:#x}"));
    let word0 = d
        .view
        .read32(0)
        .map_or_else(|e| format!("error:{e}"), |v| format!("{v:#x}"));
    let ghost = Seeds::ghost(seed);
    let mut t = Tally::default();
    fill_range(d, 0, GHOST_BAR_LEN, ghost, &mut t);
    let ghost_aperture = aperture_fill(d, plan.chunks[0], GHOST_APERTURE_LEN, ghost).is_ok();
    let read_back = d
        .view
        .read32(0)
        .map_or_else(|e| format!("error:{e}"), |v| format!("{v:#x}"));
    fact(
        "soak_lost",
        &format!(
            "n={n} boot0={boot0:#010x} aperture={aperture} bar_word0={word0} ghost_seed={ghost:#x} \
             ghost_bar_bytes={} ghost_aperture_bytes={} ghost_read_back={read_back}",
            if t.bad == 0 { GHOST_BAR_LEN } else { 0 },
            if ghost_aperture { GHOST_APERTURE_LEN } else { 0 },
        ),
    );
}

fn list(v: &[u64]) -> String {
    v.iter()
        .map(|x| format!("{x:#x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Run the soak.
pub fn run(params: &Params, dev: &PciDevice, bars: &[Bar]) {
    set_current("soak");
    let (Some(reg), Some(size), Some(boot0)) = (params.window_reg, params.slice_size, params.boot0)
    else {
        return fail(
            "soak_write",
            "gpuprobe.soak needs window_reg, slice_size and boot0",
        );
    };
    if size < 2 * BLOCK || size % BLOCK != 0 {
        return fail(
            "soak_write",
            &format!("slice_size {size} is below 2 MiB or not whole MiB"),
        );
    }
    let d = match Device::open(params, dev, bars, reg) {
        Ok(d) => d,
        Err(e) => return fail("soak_write", &format!("mapping BAR0 / the VRAM BARs: {e}")),
    };
    let plan = Plan::new(size);
    fact(
        "soak_start",
        &format!(
            "slice_size={size} seed={:#x} write_s={} chunks={} chunk_len={CHUNK_LEN}",
            params.soak_seed,
            params.soak_write_s,
            list(&plan.chunks)
        ),
    );

    set_current("soak_write");
    let write_for = Duration::from_secs(params.soak_write_s);
    let start = Instant::now();
    let (mut rounds, mut bad, mut first_bad) = (0u64, 0u64, None);
    loop {
        let seeds = Seeds::of(params.soak_seed, rounds);
        let t0 = Instant::now();
        let t = write_round(&d, &plan, seeds);
        fact(
            "soak_round",
            &format!(
                "n={rounds} bar_seed={:#x} aperture_seed={:#x} bad={} first_bad={} ms={}",
                seeds.bar,
                seeds.aperture,
                t.bad,
                t.first(),
                t0.elapsed().as_millis()
            ),
        );
        rounds += 1;
        bad += t.bad;
        first_bad = first_bad.or(t.first.clone());
        if start.elapsed() >= write_for {
            break;
        }
    }
    let kept = Seeds::of(params.soak_seed, rounds - 1);
    fact(
        "soak_kept",
        &format!(
            "rounds={rounds} bar_seed={:#x} aperture_seed={:#x}",
            kept.bar, kept.aperture
        ),
    );
    let summary = format!(
        "rounds={rounds} bad={bad} seconds={}",
        start.elapsed().as_secs()
    );
    match first_bad {
        None => pass("soak_write", &summary),
        Some(f) => fail("soak_write", &format!("{summary} first={f}")),
    }

    set_current("soak_verify");
    let (mut n, mut bad, mut first_bad, mut was_lost) = (0u64, 0u64, None, false);
    while params.soak_verify == 0 || n < params.soak_verify {
        let t0 = Instant::now();
        let b = d.boot0.read32(0).unwrap_or(u32::MAX);
        if b != boot0 {
            lost(&d, &plan, n, b, params.soak_seed);
            was_lost = true;
            break;
        }
        let t = verify_round(&d, &plan, kept);
        // A round the device was taken away during does not count: its VRAM went mid-way.
        let after = d.boot0.read32(0).unwrap_or(u32::MAX);
        let interrupted = t.bad > 0 && after != boot0;
        fact(
            "soak_verify",
            &format!(
                "n={n} bad={} first_bad={} boot0={b:#010x} ms={} interrupted={}",
                t.bad,
                t.first(),
                t0.elapsed().as_millis(),
                u8::from(interrupted)
            ),
        );
        if interrupted {
            lost(&d, &plan, n, after, params.soak_seed);
            was_lost = true;
            break;
        }
        bad += t.bad;
        first_bad = first_bad.or(t.first.clone());
        n += 1;
        std::thread::sleep(Duration::from_millis(params.soak_pause_ms));
    }
    set_current("soak_verify");
    let summary = format!("rounds={n} bad={bad} lost={}", u8::from(was_lost));
    match first_bad {
        None => pass("soak_verify", &summary),
        Some(f) => fail("soak_verify", &format!("{summary} first={f}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_and_seeds() {
        let plan = Plan::new(16 << 20);
        assert_eq!(plan.chunks, [0x2000, 0x80_2000, 0xf0_2000]);
        let s = Seeds::of(0x50a4, 3);
        assert_ne!(s, Seeds::of(0x50a4, 4));
        assert_ne!(s.bar, s.aperture);
        assert_eq!(plan.kept_word(s, 0x2000), soak_word(s.aperture, 0x2000));
        assert_eq!(plan.kept_word(s, 0x1ffc), soak_word(s.bar, 0x1ffc));
        assert_eq!(plan.kept_word(s, 0x3000), soak_word(s.bar, 0x3000));
        assert_ne!(soak_word(Seeds::ghost(0x50a4), 0), soak_word(s.bar, 0));
    }
}
