//! The host's view of the emulated GPU, behind every guest's back: canaries in all VRAM
//! that no guest owns (every byte of the arena where the slices live, the host-reserved
//! region outside the BAR1 tables, samples of the rest), each live slice against its
//! guest's model, the BAR1 translations, and the host registers.

use std::sync::Arc;

use gpu_backend::host_gpu::emulated::EmulatedHostGpu;
use gpu_backend::slice::{HostVram, Slice, SlicedGpu};
use gpu_emulation::bar0::{RegisterSnapshot, UnimplementedStats};
use gpu_emulation::VramAddr as EmuAddr;

use super::model::{FREE_CANARY, RESERVED_CANARY};

/// The guest slices live in `[0, ARENA)`: every byte of it is checked.
pub const ARENA: u64 = 80 << 20;
/// The BAR1 tables are allocated from the bottom of the host-reserved region and must stay
/// in its first `TABLE_ZONE` bytes; the rest of the region holds canaries.
const TABLE_ZONE: u64 = 2 << 20;
/// Length of each sample of free VRAM past the arena.
const SAMPLE: u64 = 64 << 10;
/// Samples spread over the free VRAM past the arena.
const SAMPLES: u64 = 24;
/// Bytes compared per step.
const CHUNK: usize = 1 << 20;

/// A live guest's slice and what it should hold.
pub struct Owned<'a> {
    /// The slice.
    pub slice: Slice,
    /// The guest's model of its VRAM.
    pub vram: &'a [u8],
    /// The guest's BAR1 window.
    pub window: u64,
    /// For messages.
    pub label: String,
}

/// The host's view.
pub struct HostView {
    gpu: Arc<EmulatedHostGpu>,
    vram: Arc<HostVram>,
    reserved: (u64, u64),
    /// Free VRAM past the arena (start, len).
    samples: Vec<(u64, u64)>,
    registers: RegisterSnapshot,
    unimplemented: (u64, u64),
    buf: Vec<u8>,
    fills: [(u8, Vec<u8>); 2],
    /// Bytes of host VRAM compared so far.
    pub bytes_checked: u64,
    /// Full checks so far.
    pub checks: u64,
}

fn unimplemented_counts(u: &UnimplementedStats) -> (u64, u64) {
    (u.reads, u.writes)
}

impl HostView {
    /// The view of `sliced` (on `gpu`), before any guest is added: plants every canary.
    pub fn new(gpu: Arc<EmulatedHostGpu>, sliced: &SlicedGpu) -> Result<HostView, String> {
        let p = sliced.partition();
        let reserved = p.host_reserved();
        let (guest_end, usable, vram_size) = (p.guest_area_end(), p.usable(), p.vram_size());
        if guest_end < ARENA + SAMPLES * SAMPLE * 2 {
            return Err(format!("guest area of {guest_end:#x} bytes is too small"));
        }
        let mut samples: Vec<(u64, u64)> = (0..SAMPLES)
            .map(|k| {
                let span = guest_end - ARENA - SAMPLE;
                let at = ARENA + (span / (SAMPLES - 1)) * k;
                (at - at % SAMPLE, SAMPLE)
            })
            .collect();
        samples.push((guest_end - SAMPLE, SAMPLE));
        // Past usable VRAM (the GH200's carve-out) belongs to nobody either.
        if vram_size > usable {
            samples.push((usable, SAMPLE.min(vram_size - usable)));
            samples.push((
                vram_size - SAMPLE.min(vram_size - usable),
                SAMPLE.min(vram_size - usable),
            ));
        }
        let emu = gpu.emulated();
        let view = HostView {
            registers: emu.registers(),
            unimplemented: unimplemented_counts(&emu.unimplemented_accesses()),
            vram: Arc::clone(sliced.vram()),
            reserved: (reserved.start.raw(), reserved.end.raw()),
            samples,
            buf: vec![0; CHUNK],
            fills: [
                (FREE_CANARY, vec![FREE_CANARY; CHUNK]),
                (RESERVED_CANARY, vec![RESERVED_CANARY; CHUNK]),
            ],
            bytes_checked: 0,
            checks: 0,
            gpu,
        };
        if let Some(page) = view.table_page_above_zone() {
            return Err(format!(
                "a BAR1 table page at {page:#x}, above the table zone"
            ));
        }
        view.plant(0, ARENA, FREE_CANARY)?;
        for &(at, len) in &view.samples {
            view.plant(at, len, FREE_CANARY)?;
        }
        view.plant(
            view.reserved.0 + TABLE_ZONE,
            view.reserved.1 - view.reserved.0 - TABLE_ZONE,
            RESERVED_CANARY,
        )?;
        Ok(view)
    }

    /// Host VRAM `[at, at + len)` set to `byte` (the host writing free VRAM).
    pub fn plant(&self, at: u64, len: u64, byte: u8) -> Result<(), String> {
        self.gpu
            .emulated()
            .vram()
            .fill(EmuAddr::new(at), len, byte)
            .map_err(|e| format!("planting canaries at {at:#x}: {e}"))
    }

    /// Takes the host registers as they are now as the reference (after the host itself
    /// changed them: adding or removing a guest binds, maps and invalidates).
    pub fn rebaseline(&mut self) {
        let emu = self.gpu.emulated();
        self.registers = emu.registers();
        self.unimplemented = unimplemented_counts(&emu.unimplemented_accesses());
    }

    /// Compares host VRAM from `at` with `expected`; the first difference, described.
    pub fn expect_bytes(&mut self, at: u64, expected: &[u8], what: &str) -> Result<(), String> {
        for (n, want) in expected.chunks(CHUNK).enumerate() {
            let start = at + (n * CHUNK) as u64;
            let got = &mut self.buf[..want.len()];
            self.gpu
                .emulated()
                .vram()
                .read(EmuAddr::new(start), got)
                .map_err(|e| format!("reading host VRAM at {start:#x}: {e}"))?;
            self.bytes_checked += want.len() as u64;
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "{what}: host VRAM {:#x} holds {:#04x}, expected {:#04x}",
                    start + i as u64,
                    got[i],
                    want[i]
                ));
            }
        }
        Ok(())
    }

    /// Host VRAM `[at, at + len)` holds `byte` everywhere.
    pub fn expect_fill(&mut self, at: u64, len: u64, byte: u8, what: &str) -> Result<(), String> {
        let which = self
            .fills
            .iter()
            .position(|(b, _)| *b == byte)
            .unwrap_or_else(|| {
                self.fills[0] = (byte, vec![byte; CHUNK]);
                0
            });
        let fill = std::mem::take(&mut self.fills[which].1);
        let mut result = Ok(());
        let mut done = 0;
        while done < len && result.is_ok() {
            let n = (len - done).min(CHUNK as u64) as usize;
            result = self.expect_bytes(at + done, &fill[..n], what);
            done += n as u64;
        }
        self.fills[which].1 = fill;
        result
    }

    fn table_page_above_zone(&self) -> Option<u64> {
        (self.reserved.0 + TABLE_ZONE..self.reserved.1)
            .step_by(4096)
            .find(|&page| {
                self.vram
                    .is_bar1_table_page(gpu_backend::host_driver::addr::VramAddr::new(page))
            })
    }

    /// Every check: the arena byte for byte (live slices against their models, the rest
    /// canaries), the samples past it, the host-reserved region, the BAR1 translations of
    /// the live windows and of `stale_windows` (removed guests'), and the host registers.
    pub fn check_all(&mut self, live: &[Owned<'_>], stale_windows: &[u64]) -> Result<(), String> {
        self.checks += 1;
        let mut owned: Vec<&Owned<'_>> = live.iter().collect();
        owned.sort_by_key(|o| o.slice.start());
        let mut at = 0u64;
        for o in &owned {
            let (start, end) = (o.slice.start().raw(), o.slice.end());
            if end > ARENA {
                return Err(format!(
                    "{} got {}, past the checked arena",
                    o.label, o.slice
                ));
            }
            if start < at {
                return Err(format!(
                    "{} at {} overlaps another live slice",
                    o.label, o.slice
                ));
            }
            self.expect_fill(at, start - at, FREE_CANARY, "free VRAM")?;
            self.expect_bytes(
                start,
                o.vram,
                &format!("{}'s slice against its model", o.label),
            )?;
            at = end;
        }
        self.expect_fill(at, ARENA - at, FREE_CANARY, "free VRAM")?;
        for (at, len) in self.samples.clone() {
            self.expect_fill(at, len, FREE_CANARY, "free VRAM past the arena")?;
        }
        let (r0, r1) = self.reserved;
        self.expect_fill(
            r0 + TABLE_ZONE,
            r1 - r0 - TABLE_ZONE,
            RESERVED_CANARY,
            "host-reserved VRAM",
        )?;
        if let Some(page) = self.table_page_above_zone() {
            return Err(format!(
                "a BAR1 table page at {page:#x}, above the table zone"
            ));
        }
        self.check_bar1(&owned, stale_windows)?;
        self.check_registers()
    }

    /// The host registers are as the host left them (only its PRAMIN window moves, serving
    /// guests' apertures), and no guest access reached a register the emulator lacks.
    pub fn check_registers(&self) -> Result<(), String> {
        let emu = self.gpu.emulated();
        let mut now = emu.registers();
        now.window = self.registers.window;
        now.window_base = self.registers.window_base;
        if now != self.registers {
            return Err(format!(
                "host registers changed: {now:?}, expected {:?}",
                self.registers
            ));
        }
        let u = unimplemented_counts(&emu.unimplemented_accesses());
        if u != self.unimplemented {
            return Err(format!(
                "unimplemented host registers reached: {u:?}, before {:?}",
                self.unimplemented
            ));
        }
        Ok(())
    }

    /// Each live window translates into its slice, from its first to its last byte, with
    /// unmapped guards around it; a removed guest's window VA reaches nothing, or the same
    /// bytes as the live window that now covers it.
    fn check_bar1(&self, owned: &[&Owned<'_>], stale_windows: &[u64]) -> Result<(), String> {
        let emu = self.gpu.emulated();
        let pa = |va: u64| emu.bar1_translate(va).ok().map(|t| t.pa);
        for o in owned {
            let (va, size, start) = (o.window, o.slice.size(), o.slice.start().raw());
            for (probe, want) in [
                (va, Some(start)),
                (va + size / 2 + 0x123, Some(start + size / 2 + 0x123)),
                (va + size - 1, Some(start + size - 1)),
                (va - 1, None),
                (va + size, None),
            ] {
                let got = pa(probe);
                if got != want {
                    return Err(format!(
                        "BAR1 VA {probe:#x} of {}'s window at {va:#x} translates to {got:x?}, expected {want:x?}",
                        o.label
                    ));
                }
            }
        }
        for &va in stale_windows {
            let covering = owned
                .iter()
                .find(|o| va >= o.window && va < o.window + o.slice.size());
            let want = covering.map(|o| o.slice.start().raw() + (va - o.window));
            let got = pa(va);
            if got != want {
                return Err(format!(
                    "a removed guest's BAR1 VA {va:#x} translates to {got:x?}, expected {want:x?}"
                ));
            }
        }
        Ok(())
    }
}
