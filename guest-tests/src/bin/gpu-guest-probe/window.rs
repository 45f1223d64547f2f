//! The BAR0 window checks (`gpuprobe.window=1`): the window register and the PRAMIN aperture
//! as the guest sees them. The backend virtualises the register per guest (its base is
//! relative to the guest's own VRAM) and confines the aperture to the guest's VRAM.
//!
//! | check | what |
//! |---|---|
//! | `window_reg_readback` | the register reads back what was written (defined bits: `window_mask`), sub-dword writes change only their bytes |
//! | `window_aperture_rw` | at bases 0, the middle and the last MiB: a pattern written through the aperture reads back through the aperture (4- and 8-byte loads) and through the VRAM BAR at the same guest address |
//! | `window_bar_to_aperture` | the reverse: written through the VRAM BAR, read through the aperture |
//! | `window_move_order` | window moves alternating between two bases, each followed at once by an aperture write and read, hit the latest base |
//! | `window_past_end_read` | windows straddling the VRAM end, just past it and far past it (BASE all-ones): bytes past the end read 0xFF (1/2/4/8-byte loads), bytes below it the data |
//! | `window_past_end_write` | writes there are dropped (re-read 0xFF) and alias nowhere in the guest's VRAM |
//! | `window_target_sysmem` | TARGET != VID_MEM (Turing–Ada): the aperture reads 0xFF, writes are dropped |
//! | `window_written_intact` | at the end every range written reads back through the VRAM BAR |
//!
//! Every range written is announced with `GPUPROBE wrote via=aperture|vram_bar guest_off=..
//! len=.. seed=..` (words from `pattern::vram_word`), so the host can find them in host VRAM.

use std::io;

use crate::aperture::{Bar0Window, VramView, APERTURE_LEN, BASE_SHIFT, TARGET_SHIFT};
use crate::out::{fact, fail, pass, set_current, skip};
use crate::params::Params;
use crate::pattern::vram_word;
use crate::pci::{Bar, PciDevice};

/// Bytes of each pattern chunk.
const CHUNK: u64 = 1024;
/// Aperture offsets of the chunks written through the aperture (start, middle, last KiB).
const APERTURE_CHUNKS: [u64; 3] = [0, 0x8_0000, APERTURE_LEN - CHUNK];
/// Aperture offsets of the chunks written through the VRAM BAR.
const BAR_CHUNKS: [u64; 3] = [0x1000, 0x8_1000, APERTURE_LEN - 2 * CHUNK];
/// Aperture offset and word count of the window-move ordering test.
const ORDER_OFFSET: u64 = 0x800;
const ORDER_WORDS: u64 = 64;
/// One 64 KiB window step.
const STEP: u64 = 1 << BASE_SHIFT;
/// Every byte 0xFF, as read from outside the guest's VRAM.
const ONES: u64 = u64::MAX;

/// What the checks need to know.
struct Config {
    reg_mask: u32,
    has_target: bool,
    size: u64,
    seed_aperture: u64,
    seed_bar: u64,
}

/// Mismatches of one check.
#[derive(Default)]
struct Tally {
    ok: usize,
    bad: Vec<String>,
}

impl Tally {
    fn expect(&mut self, what: impl FnOnce() -> String, got: io::Result<u64>, want: u64) {
        match got {
            Ok(v) if v == want => self.ok += 1,
            Ok(v) => self
                .bad
                .push(format!("{}:got={v:#x},want={want:#x}", what())),
            Err(e) => self.bad.push(format!("{}:error={e}", what())),
        }
    }

    fn error(&mut self, what: String, e: io::Error) {
        self.bad.push(format!("{what}:error={e}"));
    }

    fn report(&self, name: &'static str, what: &str) {
        if self.bad.is_empty() && self.ok > 0 {
            pass(name, &format!("{what} accesses={}", self.ok));
        } else if self.bad.is_empty() {
            fail(name, &format!("{what}: nothing was checked"));
        } else {
            let shown: Vec<&str> = self.bad.iter().take(4).map(String::as_str).collect();
            fail(
                name,
                &format!(
                    "{what} bad={}/{} {}",
                    self.bad.len(),
                    self.bad.len() + self.ok,
                    shown.join(" ")
                ),
            );
        }
    }
}

/// The `width`-byte value of `seed`'s pattern at guest address `g` (naturally aligned).
fn pattern(seed: u64, g: u64, width: usize) -> u64 {
    let word = |a: u64| u64::from(vram_word(seed, a));
    let w = word(g & !3);
    match width {
        8 => w | (word(g + 4) << 32),
        4 => w,
        _ => (w >> (8 * (g & 3))) & ((1u64 << (8 * width)) - 1),
    }
}

/// Announce a written range to the host.
fn announce(via: &str, guest: u64, len: u64, seed: u64) {
    fact(
        "wrote",
        &format!("via={via} guest_off={guest:#x} len={len} seed={seed:#x}"),
    );
}

/// The ranges written (guest VRAM address, length, seed), for the final intact check.
type Written = Vec<(u64, u64, u64)>;

/// Run the window checks.
pub fn run(params: &Params, dev: &PciDevice, bars: &[Bar]) {
    set_current("window");
    let (Some(reg), Some(reg_mask), Some(size)) =
        (params.window_reg, params.window_mask, params.slice_size)
    else {
        return fail(
            "window",
            "gpuprobe.window needs window_reg, window_mask and slice_size",
        );
    };
    if size < 2 * APERTURE_LEN || size % 4 != 0 {
        return fail(
            "window",
            &format!("slice_size {size} below 2 MiB or unaligned"),
        );
    }
    let bar_size = params
        .vram_bar
        .and_then(|i| bars.iter().find(|b| b.index == i))
        .map_or(0, |b| b.size);
    let opened = Bar0Window::open(dev, params.boot0_bar, reg)
        .and_then(|w| Ok((w, VramView::open(dev, params, bar_size)?)));
    let (win, view) = match opened {
        Ok(x) => x,
        Err(e) => return fail("window", &format!("mapping BAR0 / the VRAM BARs: {e}")),
    };
    let cfg = Config {
        reg_mask,
        has_target: params.window_target,
        size,
        seed_aperture: params.window_seed,
        seed_bar: params.window_seed ^ 0x5a5a_5a5a,
    };
    fact(
        "window",
        &format!(
            "reg={reg:#x} mask={reg_mask:#x} target_field={} slice_size={size}",
            u8::from(cfg.has_target)
        ),
    );
    let mut written = Written::new();
    check_register(&win, &cfg);
    let bases = bases(size);
    check_aperture_rw(&win, &view, &cfg, &bases, &mut written);
    check_bar_to_aperture(&win, &view, &cfg, &bases, &mut written);
    check_move_order(&win, &view, &cfg, &bases, &mut written);
    check_past_end(&win, &view, &cfg, &mut written);
    check_target(&win, &view, &cfg);
    check_intact(&view, &written);
    set_current("window");
    let _ = win.set(0);
}

/// Window bases (bytes): 0, the middle and the last MiB, at least 1 MiB apart.
pub(crate) fn bases(size: u64) -> Vec<u64> {
    let mut out = vec![0];
    for b in [
        (size / 2) & !(STEP - 1),
        (size - APERTURE_LEN) & !(STEP - 1),
    ] {
        if out.iter().all(|&o| b >= o + APERTURE_LEN) {
            out.push(b);
        }
    }
    out
}

/// (d) The register reads back what was written, restricted to its defined bits.
fn check_register(win: &Bar0Window, cfg: &Config) {
    set_current("window_reg_readback");
    let mut t = Tally::default();
    let units = (cfg.size >> BASE_SHIFT) as u32;
    for v in [
        0,
        1,
        0x5a_5a5a,
        units,
        units.wrapping_sub(1),
        0x00ff_ffff,
        0x0200_0010,
        0x0300_1234,
        u32::MAX,
        0,
    ] {
        match win.set(v) {
            Ok(()) => t.expect(
                || format!("wrote={v:#x}"),
                win.get().map(u64::from),
                u64::from(v & cfg.reg_mask),
            ),
            Err(e) => t.error(format!("wrote={v:#x}"), e),
        }
    }
    // Sub-dword writes change only their bytes.
    let steps: [(u64, usize, u64, u32); 3] = [
        (0, 4, 0x0012_3456, 0x0012_3456),
        (1, 1, 0xab, 0x0012_ab56),
        (2, 2, 0x0001, 0x0001_ab56),
    ];
    for (byte, width, value, want) in steps {
        match win.set_part(byte, width, value) {
            Ok(()) => t.expect(
                || format!("wrote={value:#x}@byte{byte}/{width}"),
                win.get().map(u64::from),
                u64::from(want & cfg.reg_mask),
            ),
            Err(e) => t.error(format!("byte{byte}"), e),
        }
    }
    let _ = win.set(0);
    t.report(
        "window_reg_readback",
        &format!("defined bits {:#x}, 32/16/8-bit writes", cfg.reg_mask),
    );
}

/// Write `CHUNK` bytes of `seed`'s pattern at aperture offset `off` (window at `base`).
fn aperture_fill(win: &Bar0Window, base: u64, off: u64, seed: u64) -> io::Result<()> {
    for i in 0..CHUNK / 4 {
        let o = off + 4 * i;
        win.write(o, 4, pattern(seed, base + o, 4))?;
    }
    Ok(())
}

/// Check `CHUNK` bytes at aperture offset `off` (window at `base`) with 4- and 8-byte loads.
fn aperture_check(win: &Bar0Window, base: u64, off: u64, seed: u64, t: &mut Tally) {
    for width in [4usize, 8] {
        for i in 0..CHUNK / width as u64 {
            let o = off + width as u64 * i;
            t.expect(
                || format!("aperture base={base:#x} off={o:#x}/{width}"),
                win.read(o, width),
                pattern(seed, base + o, width),
            );
        }
    }
}

/// Check `len` bytes of guest VRAM at `guest` through the VRAM BAR.
fn bar_check(view: &VramView, guest: u64, len: u64, seed: u64, t: &mut Tally) {
    let chunk = match view.chunk(guest, len) {
        Ok(c) => c,
        Err(e) => return t.error(format!("vram_bar guest={guest:#x}"), e),
    };
    for i in 0..len / 4 {
        let g = guest + 4 * i;
        t.expect(
            || format!("vram_bar guest={g:#x}"),
            chunk.read32(g).map(u64::from),
            pattern(seed, g, 4),
        );
    }
}

/// (a) Aperture writes read back through the aperture and the VRAM BAR.
fn check_aperture_rw(
    win: &Bar0Window,
    view: &VramView,
    cfg: &Config,
    bases: &[u64],
    written: &mut Written,
) {
    set_current("window_aperture_rw");
    let seed = cfg.seed_aperture;
    let mut t = Tally::default();
    for &base in bases {
        if let Err(e) = win.set_base(base) {
            t.error(format!("window base={base:#x}"), e);
            continue;
        }
        for off in APERTURE_CHUNKS {
            match aperture_fill(win, base, off, seed) {
                Ok(()) => {
                    announce("aperture", base + off, CHUNK, seed);
                    written.push((base + off, CHUNK, seed));
                }
                Err(e) => t.error(format!("aperture write base={base:#x} off={off:#x}"), e),
            }
            aperture_check(win, base, off, seed, &mut t);
            bar_check(view, base + off, CHUNK, seed, &mut t);
        }
    }
    let _ = win.set(0);
    t.report(
        "window_aperture_rw",
        &format!(
            "bases {} x chunks at aperture {}: written via aperture, read via aperture (4/8-byte) and the VRAM BAR",
            list(bases),
            list(&APERTURE_CHUNKS)
        ),
    );
}

/// (a, reverse) VRAM-BAR writes read back through the aperture.
fn check_bar_to_aperture(
    win: &Bar0Window,
    view: &VramView,
    cfg: &Config,
    bases: &[u64],
    written: &mut Written,
) {
    set_current("window_bar_to_aperture");
    let seed = cfg.seed_bar;
    let mut t = Tally::default();
    for &base in bases {
        for off in BAR_CHUNKS {
            let g = base + off;
            let filled = view.chunk(g, CHUNK).and_then(|c| {
                (0..CHUNK / 4)
                    .try_for_each(|i| c.write32(g + 4 * i, pattern(seed, g + 4 * i, 4) as u32))
            });
            match filled {
                Ok(()) => {
                    announce("vram_bar", g, CHUNK, seed);
                    written.push((g, CHUNK, seed));
                }
                Err(e) => t.error(format!("vram_bar write guest={g:#x}"), e),
            }
        }
        // Move the window only after the writes, then read at once.
        if let Err(e) = win.set_base(base) {
            t.error(format!("window base={base:#x}"), e);
            continue;
        }
        for off in BAR_CHUNKS {
            aperture_check(win, base, off, seed, &mut t);
        }
    }
    let _ = win.set(0);
    t.report(
        "window_bar_to_aperture",
        &format!(
            "bases {} x chunks at aperture {}: written via the VRAM BAR, read via aperture (4/8-byte)",
            list(bases),
            list(&BAR_CHUNKS)
        ),
    );
}

/// Window moves alternating between two bases, each followed at once by an aperture write
/// and an aperture read: both must use the window just written.
fn check_move_order(
    win: &Bar0Window,
    view: &VramView,
    cfg: &Config,
    bases: &[u64],
    written: &mut Written,
) {
    set_current("window_move_order");
    let seed = cfg.seed_aperture;
    let (a, b) = (bases[0], bases.get(1).copied().unwrap_or(bases[0]));
    let mut t = Tally::default();
    for round in 0..2u64 {
        for i in 0..ORDER_WORDS {
            let base = if (i + round) % 2 == 0 { a } else { b };
            let o = ORDER_OFFSET + 4 * i;
            let step = win
                .set_base(base)
                .and_then(|()| win.write(o, 4, pattern(seed, base + o, 4)));
            if let Err(e) = step {
                t.error(format!("move to {base:#x}, write {o:#x}"), e);
                continue;
            }
            // Written by check_aperture_rw at each base.
            t.expect(
                || format!("base={base:#x} off=0x0 right after the move"),
                win.read(0, 4),
                pattern(seed, base, 4),
            );
        }
    }
    let _ = win.set(0);
    for base in [a, b] {
        announce("aperture", base + ORDER_OFFSET, 4 * ORDER_WORDS, seed);
        written.push((base + ORDER_OFFSET, 4 * ORDER_WORDS, seed));
        bar_check(view, base + ORDER_OFFSET, 4 * ORDER_WORDS, seed, &mut t);
    }
    t.report(
        "window_move_order",
        &format!(
            "{} window moves between {a:#x} and {b:#x}, each followed at once by an aperture write and read",
            2 * ORDER_WORDS
        ),
    );
}

/// (b) Windows straddling the end of the guest's VRAM, just past it and far past it.
fn check_past_end(win: &Bar0Window, view: &VramView, cfg: &Config, written: &mut Written) {
    set_current("window_past_end_read");
    let size = cfg.size;
    let seed = cfg.seed_aperture;
    // Aperture offset 0 is at least 256 bytes below the end, the rest of the aperture past it.
    let straddle = (size - 256) & !(STEP - 1);
    let just_past = size.next_multiple_of(STEP);
    let far_units = u64::from(0x00ff_ffff & cfg.reg_mask);
    let mut windows = vec![("straddle", straddle), ("end", just_past)];
    if far_units << BASE_SHIFT >= size {
        windows.push(("far", far_units << BASE_SHIFT));
    }
    // The last 256 bytes of VRAM, written through the straddling window: reads below the end
    // must still find them.
    let mut t = Tally::default();
    let tail = size - 256;
    let filled = win.set_base(straddle).and_then(|()| {
        (0..64).try_for_each(|i| {
            let g = tail + 4 * i;
            win.write(g - straddle, 4, pattern(seed, g, 4))
        })
    });
    match filled {
        Ok(()) => {
            announce("aperture", tail, 256, seed);
            written.push((tail, 256, seed));
        }
        Err(e) => t.error("straddle write".into(), e),
    }
    let mut past_offsets = Vec::new();
    for &(name, base) in &windows {
        if let Err(e) = win.set_base(base) {
            t.error(format!("window {name} base={base:#x}"), e);
            continue;
        }
        let edge = size.saturating_sub(base).next_multiple_of(8);
        let mut offs: Vec<u64> = vec![edge, edge + 8, edge + 0x100, 0x8_0000, APERTURE_LEN - 8];
        offs.retain(|&o| o + 8 <= APERTURE_LEN && base + o >= size);
        offs.sort_unstable();
        offs.dedup();
        for &o in &offs {
            for width in [1usize, 2, 4, 8] {
                t.expect(
                    || format!("{name} off={o:#x}/{width}"),
                    win.read(o, width),
                    ONES >> (64 - 8 * width),
                );
            }
        }
        if edge > 0 && edge <= APERTURE_LEN && size % 8 == 0 {
            // The last bytes below the end, through the same window.
            for width in [4usize, 8] {
                let o = edge - 8;
                t.expect(
                    || format!("{name} below the end off={o:#x}/{width}"),
                    win.read(o, width),
                    pattern(seed, base + o, width),
                );
            }
        }
        past_offsets.push((name, base, offs));
    }
    let _ = win.set(0);
    t.report(
        "window_past_end_read",
        &format!(
            "windows {}: past the end 0xFF (1/2/4/8-byte), below it the data",
            windows
                .iter()
                .map(|(n, b)| format!("{n}={b:#x}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );

    set_current("window_past_end_write");
    let mut t = Tally::default();
    // Where the writes would land if the backend wrapped offsets modulo the slice size.
    let aliases: Vec<u64> = past_offsets
        .iter()
        .flat_map(|(_, base, offs)| offs.iter().map(move |o| ((base + o) % size) & !7))
        .collect();
    let before: Vec<io::Result<u32>> = aliases.iter().map(|&g| view.read32(g)).collect();
    for (name, base, offs) in &past_offsets {
        if let Err(e) = win.set_base(*base) {
            t.error(format!("window {name}"), e);
            continue;
        }
        for &o in offs {
            for width in [1usize, 2, 4, 8] {
                let v = 0x1234_5678_9abc_def0u64.rotate_left(8 * width as u32) ^ o;
                if let Err(e) = win.write(o, width, v) {
                    t.error(format!("{name} write off={o:#x}/{width}"), e);
                }
            }
            for width in [1usize, 4, 8] {
                t.expect(
                    || format!("{name} re-read off={o:#x}/{width}"),
                    win.read(o, width),
                    ONES >> (64 - 8 * width),
                );
            }
        }
    }
    let _ = win.set(0);
    for (&g, was) in aliases.iter().zip(before) {
        match was {
            Ok(was) => t.expect(
                || format!("alias guest={g:#x} unchanged"),
                view.read32(g).map(u64::from),
                u64::from(was),
            ),
            Err(e) => t.error(format!("alias guest={g:#x}"), e),
        }
    }
    t.report(
        "window_past_end_write",
        "writes past the end (1/2/4/8-byte) dropped, re-read 0xFF, no wrap-around into the guest's VRAM",
    );
}

/// (c) A TARGET other than VID_MEM reaches nothing.
fn check_target(win: &Bar0Window, view: &VramView, cfg: &Config) {
    set_current("window_target_sysmem");
    if !cfg.has_target {
        return skip(
            "window_target_sysmem",
            "the window register has no TARGET field on this generation",
        );
    }
    let mut t = Tally::default();
    let probes = [0u64, 0x2000];
    let before: Vec<io::Result<u32>> = probes.iter().map(|&g| view.read32(g)).collect();
    for target in 1u32..=3 {
        let value = target << TARGET_SHIFT;
        if let Err(e) = win.set(value) {
            t.error(format!("target={target}"), e);
            continue;
        }
        t.expect(
            || format!("target={target} register"),
            win.get().map(u64::from),
            u64::from(value & cfg.reg_mask),
        );
        for &o in &probes {
            for width in [4usize, 8] {
                t.expect(
                    || format!("target={target} off={o:#x}/{width}"),
                    win.read(o, width),
                    ONES >> (64 - 8 * width),
                );
            }
            if let Err(e) = win.write(o, 4, 0xdead_beef) {
                t.error(format!("target={target} write off={o:#x}"), e);
            }
            t.expect(
                || format!("target={target} re-read off={o:#x}"),
                win.read(o, 4),
                0xffff_ffff,
            );
        }
    }
    let _ = win.set(0);
    for (&g, was) in probes.iter().zip(before) {
        match was {
            Ok(was) => t.expect(
                || format!("VID_MEM guest={g:#x} unchanged"),
                view.read32(g).map(u64::from),
                u64::from(was),
            ),
            Err(e) => t.error(format!("guest={g:#x}"), e),
        }
    }
    t.report(
        "window_target_sysmem",
        "TARGET 1/2/3: aperture reads 0xFF, writes dropped, VRAM unchanged",
    );
}

/// Every range written still reads back through the VRAM BAR.
fn check_intact(view: &VramView, written: &Written) {
    set_current("window_written_intact");
    let mut t = Tally::default();
    for &(g, len, seed) in written {
        bar_check(view, g, len, seed, &mut t);
    }
    t.report(
        "window_written_intact",
        &format!("{} ranges re-read through the VRAM BAR", written.len()),
    );
}

fn list(values: &[u64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:#x}"))
        .collect::<Vec<_>>()
        .join("/")
}
