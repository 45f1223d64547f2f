//! The sliced-guest checks, run against a vfio-user device the way a guest driver would
//! reach it: BOOT_0 names the generation, hence the window register; the window is moved
//! over the guest's VRAM and past its end, and patterns go through the PRAMIN aperture and
//! the VRAM BAR and are read back both ways.
//!
//! | check | what |
//! |---|---|
//! | `boot0_generation` | BOOT_0's architecture is a known generation |
//! | `vram_bar_found` | a region after BAR0 at least as large as the guest's VRAM |
//! | `window_register_readback` | the window register reads back each value written (its defined bits) |
//! | `window_aperture_rw` | at bases 0, 64 KiB, the middle and the last MiB a pattern written through the aperture reads back |
//! | `window_moves` | data written under one base is found under another at the shifted aperture offset |
//! | `window_past_end_read` | a window straddling the VRAM end, at it and at the largest base reads 0xFF past the end |
//! | `window_past_end_write` | writes past the end are dropped (re-read 0xFF) and do not wrap into the VRAM |
//! | `vram_bar_rw` | patterns written through the VRAM BAR read back through it |
//! | `vram_bar_to_aperture` | ... and through the aperture at the same VRAM offset |
//! | `aperture_to_vram_bar` | what was written through the aperture reads back through the VRAM BAR |
//! | `written_intact` | at the end every write inside the VRAM still reads back |
//!
//! Every write is recorded in the report (region, offset, VRAM offset, length, pattern seed)
//! so the host can find it in its VRAM.

use guest_tests::pattern::vram_bytes;
use guest_tests::vfio_report::{ClientCheck, ClientReport, ClientWrite, WriteVia};

use crate::device::{Device, DeviceError};
use crate::window::{Generation, WindowRegister, APERTURE, APERTURE_LEN, BOOT_0, WINDOW_STEP};

/// BAR0's region index.
const BAR0: u32 = 0;
/// Bytes of each pattern write inside the VRAM.
const CHUNK: u64 = 1024;
/// First pattern seed (each write takes the next).
const FIRST_SEED: u64 = 0xc11e_0000;
/// Every byte 0xFF: what is read outside the guest's VRAM.
const ONES: u8 = 0xFF;
/// One MiB.
const MIB: u64 = 1 << 20;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The device did not answer.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// It answered something else than expected.
    #[error("{0}")]
    Mismatch(String),
    /// The check could not run.
    #[error("not run: {0}")]
    NotRun(&'static str),
}

type Outcome = Result<String, Failure>;

/// Compare `got` with `want`; describe the first difference.
fn compare(what: &str, got: &[u8], want: &[u8]) -> Result<(), Failure> {
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None if got.len() == want.len() => Ok(()),
        None => Err(Failure::Mismatch(format!(
            "{what}: {} bytes, want {}",
            got.len(),
            want.len()
        ))),
        Some(i) => {
            let word = |b: &[u8]| {
                let at = i & !3;
                b.get(at..at + 4)
                    .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            };
            Err(Failure::Mismatch(format!(
                "{what}: byte {i:#x} differs (word got {:#010x}, want {:#010x})",
                word(got),
                word(want)
            )))
        }
    }
}

/// The checks' state: the device, what is known about it, and the report being filled.
pub struct Session<'a> {
    dev: &'a mut Device,
    window: WindowRegister,
    /// The guest's VRAM size.
    size: u64,
    vram_bar: Option<u32>,
    /// The window's current base (VRAM address).
    base: u64,
    report: &'a mut ClientReport,
}

impl<'a> Session<'a> {
    fn record(&mut self, name: &str, outcome: Outcome) {
        let (passed, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(e) => (false, e.to_string()),
        };
        eprintln!("{} {name}: {detail}", if passed { "PASS" } else { "FAIL" });
        self.report.checks.push(ClientCheck {
            name: name.into(),
            passed,
            detail,
        });
    }

    fn next_seed(&self) -> u64 {
        FIRST_SEED + self.report.writes.len() as u64
    }

    /// Point the window at VRAM address `addr` (64 KiB aligned, fits BASE).
    fn move_window(&mut self, addr: u64) -> Result<(), Failure> {
        let value = self
            .window
            .value_for(addr)
            .ok_or(Failure::NotRun("window base out of the register's range"))?;
        self.dev.write32(BAR0, self.window.offset, value)?;
        self.base = addr;
        Ok(())
    }

    /// Write `len` pattern bytes at `offset` of `region` aimed at VRAM `vram_offset`; record it.
    fn write_pattern(
        &mut self,
        via: WriteVia,
        region: u32,
        offset: u64,
        vram_offset: u64,
        len: u64,
    ) -> Result<ClientWrite, Failure> {
        let w = ClientWrite {
            via,
            region,
            offset,
            len,
            seed: self.next_seed(),
            vram_offset,
            inside: vram_offset + len <= self.size,
        };
        // Record before writing: a write that fails half-way may still have landed.
        self.report.writes.push(w.clone());
        self.dev.write(
            region,
            offset,
            &vram_bytes(w.seed, vram_offset, len as usize),
        )?;
        Ok(w)
    }

    /// Write through the aperture at aperture offset `o` under the current window.
    fn aperture_write(&mut self, o: u64, len: u64) -> Result<ClientWrite, Failure> {
        let vram = self.base + o;
        self.write_pattern(WriteVia::Aperture, BAR0, APERTURE + o, vram, len)
    }

    fn aperture_read(&mut self, o: u64, len: u64) -> Result<Vec<u8>, Failure> {
        Ok(self.dev.read(BAR0, APERTURE + o, len as usize)?)
    }

    /// Read the VRAM range of `w` through the aperture (moving the window) and compare.
    fn check_via_aperture(&mut self, w: &ClientWrite) -> Result<(), Failure> {
        let base = w.vram_offset / WINDOW_STEP * WINDOW_STEP;
        self.move_window(base)?;
        let got = self.aperture_read(w.vram_offset - base, w.len)?;
        compare(
            &format!("VRAM {:#x} via the aperture", w.vram_offset),
            &got,
            &vram_bytes(w.seed, w.vram_offset, w.len as usize),
        )
    }

    /// Read the VRAM range of `w` through the VRAM BAR and compare.
    fn check_via_bar(&mut self, w: &ClientWrite) -> Result<(), Failure> {
        let bar = self.vram_bar.ok_or(Failure::NotRun("no VRAM BAR"))?;
        let got = self.dev.read(bar, w.vram_offset, w.len as usize)?;
        compare(
            &format!("VRAM {:#x} via region {bar}", w.vram_offset),
            &got,
            &vram_bytes(w.seed, w.vram_offset, w.len as usize),
        )
    }

    fn expect_ones(&mut self, what: &str, o: u64, len: u64) -> Result<(), Failure> {
        let got = self.aperture_read(o, len)?;
        compare(what, &got, &vec![ONES; len as usize])
    }

    /// Base of the window covering the last MiB of VRAM.
    fn last_mib_base(&self) -> u64 {
        self.size.saturating_sub(MIB) / WINDOW_STEP * WINDOW_STEP
    }

    fn middle_base(&self) -> u64 {
        self.size / 2 / WINDOW_STEP * WINDOW_STEP
    }

    fn register_readback(&mut self) -> Outcome {
        let mut bases = vec![
            0,
            WINDOW_STEP,
            self.middle_base(),
            self.last_mib_base(),
            self.size,
            self.window.max_base(),
        ];
        bases.dedup();
        for &addr in &bases {
            self.move_window(addr)?;
            let want = self.window.value_for(addr).unwrap_or_default();
            let got = self.dev.read32(BAR0, self.window.offset)? & self.window.defined_mask();
            if got != want {
                return Err(Failure::Mismatch(format!(
                    "base {addr:#x}: wrote {want:#x}, read back {got:#x}"
                )));
            }
        }
        Ok(format!(
            "{} values at BAR0 {:#x} read back",
            bases.len(),
            self.window.offset
        ))
    }

    fn aperture_rw(&mut self) -> Outcome {
        let mut targets = vec![
            (0, 0x800),
            (WINDOW_STEP, 0x800),
            (self.middle_base(), 0x800),
            (self.last_mib_base(), 0x800),
            (
                self.last_mib_base(),
                self.size - CHUNK - self.last_mib_base(),
            ),
        ];
        targets.dedup();
        for (base, o) in targets.iter().copied() {
            self.move_window(base)?;
            let w = self.aperture_write(o, CHUNK)?;
            let got = self.aperture_read(o, CHUNK)?;
            compare(
                &format!("base {base:#x} aperture {o:#x}"),
                &got,
                &vram_bytes(w.seed, w.vram_offset, CHUNK as usize),
            )?;
        }
        Ok(format!(
            "{} KiB patterns at bases 0, 64 KiB, middle, last MiB (incl. the last KiB) read back",
            targets.len()
        ))
    }

    fn window_moves(&mut self) -> Outcome {
        // Written at base 64 KiB + 0x800 and at the last KiB: seen under other bases.
        let at_64k = WINDOW_STEP + 0x800;
        let last_kib = self.size - CHUNK;
        let writes: Vec<ClientWrite> = self
            .report
            .writes
            .iter()
            .filter(|w| w.vram_offset == at_64k || w.vram_offset == last_kib)
            .cloned()
            .collect();
        if writes.len() < 2 {
            return Err(Failure::NotRun("the aperture writes it reads are missing"));
        }
        for w in &writes {
            // Under base 0 (for the first) and under the window straddling the end.
            let base = if w.vram_offset < MIB {
                0
            } else {
                self.size - WINDOW_STEP
            };
            self.move_window(base)?;
            let got = self.aperture_read(w.vram_offset - base, w.len)?;
            compare(
                &format!("VRAM {:#x} under base {base:#x}", w.vram_offset),
                &got,
                &vram_bytes(w.seed, w.vram_offset, w.len as usize),
            )?;
        }
        Ok("writes found under other window bases at the shifted offsets".into())
    }

    fn past_end_read(&mut self) -> Outcome {
        // Straddling the end: the last word inside, the rest 0xFF.
        let straddle = self.size - WINDOW_STEP;
        self.move_window(straddle)?;
        let last = self.aperture_read(WINDOW_STEP - 4, 8)?;
        if last[4..] != [ONES; 4] || last[..4] == [ONES; 4] {
            return Err(Failure::Mismatch(format!(
                "8 bytes across the VRAM end read {last:02x?}: want data then 0xFF"
            )));
        }
        self.expect_ones("the first 64 bytes past the end", WINDOW_STEP, 64)?;
        self.expect_ones("the aperture's last word", APERTURE_LEN - 4, 4)?;
        // At the end and at the largest base: all 0xFF.
        for base in [self.size, self.window.max_base()] {
            self.move_window(base)?;
            for o in [0, 0x8000, APERTURE_LEN - 4] {
                self.expect_ones(&format!("base {base:#x} aperture {o:#x}"), o, 4)?;
            }
        }
        Ok("past the VRAM end, at it and at the largest base: 0xFF".into())
    }

    fn past_end_write(&mut self) -> Outcome {
        let mut dropped = Vec::new();
        let straddle = self.size - WINDOW_STEP;
        for (base, o, len) in [
            (self.size, 0x100, 256),
            (straddle, WINDOW_STEP, 8),
            (self.window.max_base(), 0x40, 64),
        ] {
            self.move_window(base)?;
            let w = self.aperture_write(o, len)?;
            self.expect_ones(
                &format!("re-read of the dropped write at base {base:#x}"),
                o,
                len,
            )?;
            dropped.push(w);
        }
        // Nothing wrapped around into the VRAM (VRAM offset modulo the size).
        self.move_window(0)?;
        for w in &dropped {
            let wrapped = w.vram_offset % self.size;
            if wrapped + w.len > APERTURE_LEN {
                continue;
            }
            let got = self.aperture_read(wrapped, w.len)?;
            if got == vram_bytes(w.seed, w.vram_offset, w.len as usize) {
                return Err(Failure::Mismatch(format!(
                    "the write aimed at VRAM {:#x} appeared at {wrapped:#x}",
                    w.vram_offset
                )));
            }
        }
        Ok(format!(
            "{} writes past the end dropped, none wrapped",
            dropped.len()
        ))
    }

    fn bar_writes(&mut self) -> Result<Vec<ClientWrite>, Failure> {
        let bar = self.vram_bar.ok_or(Failure::NotRun("no VRAM BAR"))?;
        let mut out = Vec::new();
        for off in [
            0x2000,
            self.middle_base() + 0x3000,
            self.size - 2 * CHUNK - 0x1000,
        ] {
            let w = self.write_pattern(WriteVia::VramBar, bar, off, off, CHUNK)?;
            self.check_via_bar(&w)?;
            out.push(w);
        }
        Ok(out)
    }

    fn writes_via(&self, via: WriteVia) -> Vec<ClientWrite> {
        self.report
            .writes
            .iter()
            .filter(|w| w.via == via && w.inside)
            .cloned()
            .collect()
    }
}

/// Pick the VRAM BAR: `wanted`, else the first region after BAR0 at least `size` large.
fn pick_vram_bar(report: &ClientReport, size: u64, wanted: Option<u32>) -> Option<u32> {
    match wanted {
        Some(i) => report
            .regions
            .iter()
            .find(|r| r.index == i)
            .map(|r| r.index),
        None => report
            .regions
            .iter()
            .find(|r| (1..=5).contains(&r.index) && r.size >= size)
            .map(|r| r.index),
    }
}

/// Run every check against `dev`, whose guest owns `size` bytes of VRAM.
pub fn run(dev: &mut Device, size: u64, vram_bar: Option<u32>) -> ClientReport {
    let mut report = ClientReport {
        vram_size: size,
        regions: dev.regions().to_vec(),
        ..Default::default()
    };
    let generation = match dev.read32(BAR0, BOOT_0) {
        Ok(boot0) => {
            report.boot0 = boot0;
            report.architecture = Generation::architecture(boot0);
            Generation::from_boot0(boot0)
        }
        Err(e) => {
            report.checks.push(ClientCheck {
                name: "boot0_generation".into(),
                passed: false,
                detail: e.to_string(),
            });
            return report;
        }
    };
    let Some(generation) = generation else {
        report.checks.push(ClientCheck {
            name: "boot0_generation".into(),
            passed: false,
            detail: format!(
                "BOOT_0 {:#010x}: architecture {:#x} is not a known generation",
                report.boot0, report.architecture
            ),
        });
        return report;
    };
    let window = generation.window();
    report.generation = generation.name().into();
    report.window_register = window.offset;
    report.vram_bar = pick_vram_bar(&report, size, vram_bar);
    let mut s = Session {
        dev,
        window,
        size,
        vram_bar: report.vram_bar,
        base: 0,
        report: &mut report,
    };
    s.record(
        "boot0_generation",
        Ok(format!(
            "BOOT_0 {:#010x}: {} (architecture {:#x}), window register at BAR0 {:#x}",
            s.report.boot0,
            generation.name(),
            s.report.architecture,
            window.offset
        )),
    );
    let bar = s
        .vram_bar
        .map(|i| format!("region {i}"))
        .ok_or(Failure::NotRun("no region after BAR0 holds the VRAM size"));
    s.record("vram_bar_found", bar);
    let r = s.register_readback();
    s.record("window_register_readback", r);
    let r = s.aperture_rw();
    s.record("window_aperture_rw", r);
    let r = s.window_moves();
    s.record("window_moves", r);
    let r = s.past_end_read();
    s.record("window_past_end_read", r);
    let r = s.past_end_write();
    s.record("window_past_end_write", r);
    let bar_writes = s.bar_writes();
    let r = bar_writes
        .as_ref()
        .map(|w| format!("{} KiB patterns read back through the VRAM BAR", w.len()))
        .map_err(|e| Failure::Mismatch(e.to_string()));
    s.record("vram_bar_rw", r);
    let r = match bar_writes {
        Ok(writes) => writes
            .iter()
            .try_for_each(|w| s.check_via_aperture(w))
            .map(|()| {
                format!(
                    "{} VRAM BAR writes read back through the aperture",
                    writes.len()
                )
            }),
        Err(_) => Err(Failure::NotRun("the VRAM BAR writes failed")),
    };
    s.record("vram_bar_to_aperture", r);
    let writes = s.writes_via(WriteVia::Aperture);
    let r = writes
        .iter()
        .try_for_each(|w| s.check_via_bar(w))
        .map(|()| {
            format!(
                "{} aperture writes read back through the VRAM BAR",
                writes.len()
            )
        });
    s.record("aperture_to_vram_bar", r);
    let mut all = s.writes_via(WriteVia::Aperture);
    all.extend(s.writes_via(WriteVia::VramBar));
    let r = all
        .iter()
        .try_for_each(|w| {
            if s.vram_bar.is_some() {
                s.check_via_bar(w)
            } else {
                s.check_via_aperture(w)
            }
        })
        .map(|()| format!("all {} writes inside the VRAM read back", all.len()));
    s.record("written_intact", r);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_tests::vfio_report::RegionSummary;

    #[test]
    fn compare_names_the_first_difference() {
        assert!(compare("x", &[1, 2, 3, 4], &[1, 2, 3, 4]).is_ok());
        let e = compare("x", &[1, 2, 3, 4, 9, 9, 9, 9], &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap_err();
        assert!(e.to_string().contains("byte 0x4"), "{e}");
        assert!(compare("x", &[1], &[1, 2]).is_err());
    }

    #[test]
    fn vram_bar_is_the_first_large_enough_region_after_bar0() {
        let region = |index, size| RegionSummary {
            index,
            size,
            flags: 0,
            has_fd: true,
        };
        let report = ClientReport {
            regions: vec![
                region(0, 16 << 20),
                region(1, 64 << 20),
                region(3, 32 << 20),
            ],
            ..Default::default()
        };
        assert_eq!(pick_vram_bar(&report, 64 << 20, None), Some(1));
        assert_eq!(pick_vram_bar(&report, 128 << 20, None), None);
        assert_eq!(pick_vram_bar(&report, 32 << 20, Some(3)), Some(3));
        assert_eq!(pick_vram_bar(&report, 32 << 20, Some(2)), None);
    }
}
