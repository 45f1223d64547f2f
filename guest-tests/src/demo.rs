//! The tables `gpu-demo` prints: the device and its BARs as a guest sees them (with the real
//! sizes from the backend's layout), every check in plain words with pass/fail, the display
//! guest's screenshot (where its PNG is), and a verdict.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::expect::{bar_type, ProfileLayout};
use crate::guest::GuestRun;
use crate::report::{Check, Outcome};

/// `16 MiB`, `128 GiB`, `23.65 GiB`, `0 B`.
pub fn size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            if bytes % (1 << shift) == 0 {
                return format!("{} {unit}", bytes >> shift);
            }
            return format!("{:.2} {unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes} B")
}

/// The PCI class name of a 24-bit class code (display controllers only).
pub fn class_name(class: u32) -> &'static str {
    match class >> 8 {
        0x0300 => "VGA compatible controller",
        0x0302 => "3D controller",
        0x0380 => "display controller",
        _ => "other",
    }
}

/// A check in plain words: (what was checked, how the detail should be read).
pub fn describe(check: &Check) -> String {
    let d = check.detail.as_str();
    match check.name.as_str() {
        "device_found" => "GPU found on the guest's PCI bus".into(),
        "device_id" => "device id is the profile's".into(),
        "class" => "class code is the profile's".into(),
        "bar_sizes_pow2" => "every memory BAR is a power of two".into(),
        "bars_assigned" => "every BAR got a guest address".into(),
        "bar_size" => match d.split_once('=') {
            Some((bar, _)) => format!("{} has the presented size", bar.to_uppercase()),
            None => "BAR has the presented size".into(),
        },
        "bar_layout" => "BAR sizes and types match `gpu-backend inspect`".into(),
        "boot0_mmap" => "BOOT_0 read through BAR0 (sysfs resource0 mmap)".into(),
        "boot0_devmem" => "BOOT_0 read through BAR0 (/dev/mem)".into(),
        "vram_bar" => "VRAM BAR present, real size inside it".into(),
        "persist_write" => "VRAM pattern written (for the next guest)".into(),
        "persist_check" => "new guest finds the earlier guest's VRAM pattern".into(),
        "vram_rw_mmap" => "VRAM below the real size reads back what was written".into(),
        "vram_rw_devmem" => "... and reads the same through /dev/mem".into(),
        "vram_rw_devmem_write" => "VRAM written through /dev/mem reads back via mmap".into(),
        "vram_rw_pread" => "VRAM read-back through pread() on resourceN".into(),
        "vram_pad_read_pread" => "padding reads 0xFF through pread() on resourceN".into(),
        "vram_pad_read_devmem" => "padding reads 0xFF (/dev/mem)".into(),
        "vram_pad_read_mmap" => "padding reads 0xFF (mmap, 32- and 8-bit)".into(),
        "vram_pad_write_dropped" => "padding writes are dropped (still read 0xFF)".into(),
        "vram_pad_write_no_alias" => "padding writes do not land in real VRAM".into(),
        "vram" | "vram_padding" => "VRAM checks".into(),
        other => other.replace('_', " "),
    }
}

/// The probe's detail text made easier to read: sizes in binary units, `offsets=N` as
/// `N offsets`.
pub fn friendly_detail(check: &Check) -> String {
    let d = check.detail.trim();
    let num = |key: &str| {
        d.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(crate::report::parse_u64)
    };
    match check.name.as_str() {
        "bar_size" => {
            if let Some(v) = d
                .split_once('=')
                .and_then(|(_, v)| crate::report::parse_u64(v))
            {
                return size(v);
            }
        }
        "vram_bar" => {
            if let (Some(total), Some(real)) = (num("size="), num("real=")) {
                let bar = d.split_whitespace().next().unwrap_or("").to_uppercase();
                return format!(
                    "{bar}: {} real + {} padding = {}",
                    size(real),
                    size(total - real),
                    size(total)
                );
            }
        }
        "device_found" => {
            if let Some(bdf) = d.split_whitespace().find_map(|w| w.strip_prefix("bdf=")) {
                return bdf.to_string();
            }
        }
        _ => {}
    }
    let mut words: Vec<String> = Vec::new();
    let mut offsets = None;
    for w in d.split_whitespace() {
        match w.strip_prefix("offsets=") {
            Some(n) => offsets = Some(n.to_string()),
            None => words.push(w.to_string()),
        }
    }
    let text = words.join(" ");
    match offsets {
        Some(n) if text.is_empty() => format!("{n} offsets"),
        Some(n) => format!("{n} offsets; {text}"),
        None => text,
    }
}

/// A short reason for a skipped check.
fn skip_reason(check: &Check) -> String {
    if check.detail.contains("read() unsupported") {
        "Linux implements read() on resourceN only for I/O BARs".into()
    } else {
        check.detail.clone()
    }
}

/// One of the probe's BAR0 window checks (`gpuprobe.window=1`).
fn is_window_check(check: &Check) -> bool {
    check.name.starts_with("window")
}

/// The window checks in one row: the trapped window register and the PRAMIN aperture.
fn window_row(checks: &[Check]) -> Option<Row> {
    let window: Vec<&Check> = checks.iter().filter(|c| is_window_check(c)).collect();
    if window.is_empty() {
        return None;
    }
    let failed: Vec<&str> = window
        .iter()
        .filter(|c| c.outcome == Outcome::Fail)
        .map(|c| c.name.as_str())
        .collect();
    let passed = window.iter().filter(|c| c.outcome == Outcome::Pass).count();
    let accesses: u64 = window
        .iter()
        .filter_map(|c| {
            c.detail
                .split_whitespace()
                .find_map(|w| w.strip_prefix("accesses="))
                .and_then(crate::report::parse_u64)
        })
        .sum();
    Some(Row {
        guest: 1,
        what: "BAR0 window trap: the PRAMIN aperture shows the guest's VRAM and nothing else"
            .into(),
        outcome: if failed.is_empty() {
            Outcome::Pass
        } else {
            Outcome::Fail
        },
        detail: if failed.is_empty() {
            format!(
                "{passed} checks, {accesses} trapped accesses: aperture = VRAM BAR at 3 bases, \
                 0xFF and dropped writes past the end"
            )
        } else {
            format!("failed: {}", failed.join(", "))
        },
    })
}

/// One row of the checks table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Which guest (1 or 2) or 0 for the host.
    pub guest: u8,
    /// What was checked, in words.
    pub what: String,
    /// Pass, fail or skip.
    pub outcome: Outcome,
    /// Values or the reason.
    pub detail: String,
}

/// What the display guest showed: its picture in QEMU's screenshot, saved as PNG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoDisplay {
    /// The screenshot, as PNG.
    pub png: PathBuf,
    /// Screen width in pixels.
    pub width: u32,
    /// Screen height.
    pub height: u32,
    /// True if every pixel equals the guest's picture.
    pub matches: bool,
    /// The comparison in words (the first mismatching pixel, if any).
    pub verdict: String,
}

/// The demo's findings: one or two guests against one backend.
pub struct DemoReport<'a> {
    /// The profile's layout from `gpu-backend inspect`.
    pub layout: &'a ProfileLayout,
    /// The first guest (all checks, writes the persistence pattern).
    pub first: &'a GuestRun,
    /// The second guest, if any (finds the pattern).
    pub second: Option<&'a GuestRun>,
    /// The display guest's screenshot, if one was taken.
    pub display: Option<&'a DemoDisplay>,
    /// QEMU version.
    pub qemu_version: &'a str,
    /// Use ANSI colours for pass/fail.
    pub color: bool,
}

impl DemoReport<'_> {
    /// Every check as a row: guest 1's checks, the host-side layout comparison, and guest 2's
    /// persistence check (guest 2's other checks are summarized in one row).
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let report = &self.first.report;
        let mut layout_done = false;
        for c in report.checks.iter().filter(|c| !is_window_check(c)) {
            if c.name.starts_with("vram") && !layout_done {
                rows.push(self.layout_row());
                layout_done = true;
            }
            let detail = match c.outcome {
                Outcome::Skip => skip_reason(c),
                _ => friendly_detail(c),
            };
            rows.push(Row {
                guest: 1,
                what: describe(c),
                outcome: c.outcome,
                detail,
            });
        }
        if !layout_done {
            rows.push(self.layout_row());
        }
        rows.extend(window_row(&report.checks));
        if let Some(second) = self.second {
            let r = &second.report;
            for c in r.checks.iter().filter(|c| c.name == "persist_check") {
                rows.push(Row {
                    guest: 2,
                    what: describe(c),
                    outcome: c.outcome,
                    detail: c.detail.clone(),
                });
            }
            let others: Vec<&Check> = r
                .checks
                .iter()
                .filter(|c| c.name != "persist_check")
                .collect();
            let failed: Vec<&str> = others
                .iter()
                .filter(|c| c.outcome == Outcome::Fail)
                .map(|c| c.name.as_str())
                .collect();
            rows.push(Row {
                guest: 2,
                what: "the same checks again in the second guest".into(),
                outcome: if failed.is_empty() && r.all_passed() {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                },
                detail: if failed.is_empty() {
                    format!(
                        "{} passed",
                        others.iter().filter(|c| c.outcome == Outcome::Pass).count()
                    )
                } else {
                    format!("failed: {}", failed.join(", "))
                },
            });
        }
        if let Some(d) = self.display {
            rows.push(Row {
                guest: 3,
                what: "QEMU's screenshot is the picture the guest drew in /dev/fb0".into(),
                outcome: if d.matches {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                },
                detail: if d.matches {
                    format!(
                        "{}x{}, every pixel (vhost-user display of the backend)",
                        d.width, d.height
                    )
                } else {
                    d.verdict.clone()
                },
            });
        }
        rows
    }

    fn layout_row(&self) -> Row {
        let bad = self.layout.bar_mismatches(&self.first.report);
        Row {
            guest: 0,
            what: describe(&Check {
                name: "bar_layout".into(),
                outcome: Outcome::Pass,
                detail: String::new(),
            }),
            outcome: if bad.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail
            },
            detail: if bad.is_empty() {
                format!("{} BARs", self.layout.bars.len())
            } else {
                bad.join("; ")
            },
        }
    }

    /// True if every row passed or was skipped and every guest finished its probe.
    pub fn all_passed(&self) -> bool {
        self.first.report.all_passed()
            && self.second.is_none_or(|s| s.report.all_passed())
            && self.rows().iter().all(|r| r.outcome != Outcome::Fail)
    }

    fn paint(&self, outcome: Outcome) -> String {
        let word = match outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        self.paint_word(word, outcome)
    }

    fn paint_word(&self, word: &str, outcome: Outcome) -> String {
        let code = match outcome {
            Outcome::Pass => "32",
            Outcome::Fail => "1;31",
            Outcome::Skip => "33",
        };
        if self.color {
            format!("\x1b[{code}m{word}\x1b[0m")
        } else {
            word.to_string()
        }
    }

    /// The device block and the BAR table.
    pub fn device_table(&self) -> String {
        let mut s = String::new();
        let l = self.layout;
        let _ = writeln!(
            s,
            "{}: {}{}",
            l.profile,
            l.description,
            if l.generation.is_empty() {
                String::new()
            } else {
                format!(", {} generation", l.generation)
            }
        );
        let _ = writeln!(
            s,
            "as seen by a QEMU {} guest (TCG, q35) through vfio-user from `gpu-backend serve`\n",
            self.qemu_version
        );
        let report = &self.first.report;
        match &report.device {
            Some(d) => {
                let _ = writeln!(s, "Device");
                let _ = writeln!(s, "  PCI address     {}", d.bdf);
                let _ = writeln!(
                    s,
                    "  vendor:device   {:04x}:{:04x}{}",
                    d.vendor,
                    d.device,
                    if d.vendor == 0x10de { "  (NVIDIA)" } else { "" }
                );
                let _ = writeln!(
                    s,
                    "  class           {:06x}  ({})",
                    d.class,
                    class_name(d.class)
                );
                if let Some(v) = report
                    .facts_of("reg")
                    .find(|f| f.get("offset") == Some("0x0"))
                    .and_then(|f| f.get("value"))
                {
                    let _ = writeln!(s, "  BOOT_0          {v}");
                }
            }
            None => s.push_str("Device: NOT FOUND on the guest's PCI bus\n"),
        }
        let bars: Vec<_> = report.bars.iter().filter(|b| b.index < 6).collect();
        if !bars.is_empty() {
            let _ = writeln!(
                s,
                "\nBARs\n  {:<4} {:<16} {:>10} {:>11} {:>11}  {:<28} role",
                "BAR", "guest address", "presented", "real", "padding", "type"
            );
            for b in bars {
                let want = l.bar(b.index);
                let real = want.map_or("?".into(), |w| size(w.real_size));
                let padding = want.map_or("?".into(), |w| {
                    if w.padding() == 0 {
                        "-".into()
                    } else {
                        size(w.padding())
                    }
                });
                let _ = writeln!(
                    s,
                    "  {:<4} {:<16} {:>10} {:>11} {:>11}  {:<28} {}",
                    b.index,
                    format!("{:#x}", b.start),
                    size(b.size),
                    real,
                    padding,
                    bar_type(b.is_64bit(), b.is_prefetchable()),
                    want.map_or("", |w| w.role.as_str())
                );
            }
        }
        s
    }

    /// The checks table.
    pub fn checks_table(&self) -> String {
        let rows = self.rows();
        let width = rows.iter().map(|r| r.what.len()).max().unwrap_or(5);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nChecks{}{}",
            if self.second.is_some() {
                " (guest 1, then a second guest against the same backend)"
            } else {
                ""
            },
            if self.display.is_some() {
                "; guest 3 draws on its display"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "  {:<6} {:<5} {:<width$}  detail",
            "result", "guest", "check"
        );
        for r in &rows {
            let guest = match r.guest {
                0 => "host".to_string(),
                g => g.to_string(),
            };
            // Every result word is 4 characters wide; escape codes take no width.
            let _ = writeln!(
                s,
                "  {}   {guest:<5} {:<width$}  {}",
                self.paint(r.outcome),
                r.what,
                r.detail
            );
        }
        s
    }

    /// The one-line verdict.
    pub fn verdict(&self) -> String {
        let rows = self.rows();
        let count = |o: Outcome| rows.iter().filter(|r| r.outcome == o).count();
        let (pass, fail, skip) = (
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip),
        );
        let skipped = if skip > 0 {
            format!(", {skip} skipped (not applicable)")
        } else {
            String::new()
        };
        if self.all_passed() {
            format!(
                "Verdict: {} - the guest sees {} exactly as presented: {pass} checks passed{skipped}.",
                self.paint_word("PASS", Outcome::Pass),
                self.layout.profile
            )
        } else {
            let failed: Vec<String> = rows
                .iter()
                .filter(|r| r.outcome == Outcome::Fail)
                .map(|r| r.what.clone())
                .collect();
            format!(
                "Verdict: {} - {fail} of {} checks failed ({}); logs in {}",
                self.paint(Outcome::Fail),
                pass + fail,
                failed.join("; "),
                self.first.run_dir.display()
            )
        }
    }

    /// Where the display guest's screenshot is, if there is one.
    pub fn screenshot_line(&self) -> String {
        self.display.map_or_else(String::new, |d| {
            format!("Screenshot of guest 3's display: {}\n", d.png.display())
        })
    }

    /// Everything: device, BARs, checks, the screenshot's path, verdict.
    pub fn render(&self) -> String {
        format!(
            "{}{}\n{}{}\n",
            self.device_table(),
            self.checks_table(),
            self.screenshot_line(),
            self.verdict()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size(25_396_510_720), "23.65 GiB");
        assert_eq!(size(0), "0 B");
        assert_eq!(class_name(0x030200), "3D controller");
        assert_eq!(class_name(0x030000), "VGA compatible controller");
        let c = Check {
            name: "bar_size".into(),
            outcome: Outcome::Pass,
            detail: "bar4=137438953472".into(),
        };
        assert_eq!(describe(&c), "BAR4 has the presented size");
        assert_eq!(friendly_detail(&c), "128 GiB");
        let v = Check {
            name: "vram_bar".into(),
            outcome: Outcome::Pass,
            detail: "bar1 size=34359738368 real=25396510720 padding=8963227648".into(),
        };
        assert_eq!(
            friendly_detail(&v),
            "BAR1: 23.65 GiB real + 8.35 GiB padding = 32 GiB"
        );
        let o = Check {
            name: "vram_rw_mmap".into(),
            outcome: Outcome::Pass,
            detail: "write mmap, read mmap offsets=6".into(),
        };
        assert_eq!(friendly_detail(&o), "6 offsets; write mmap, read mmap");
    }

    #[test]
    fn window_checks_fold_into_one_row() {
        let check = |name: &str, outcome, detail: &str| Check {
            name: name.into(),
            outcome,
            detail: detail.into(),
        };
        assert_eq!(window_row(&[check("boot0_mmap", Outcome::Pass, "")]), None);
        let row = window_row(&[
            check("window_reg_readback", Outcome::Pass, "x accesses=13"),
            check("window_aperture_rw", Outcome::Pass, "y accesses=100"),
            check("window_target_sysmem", Outcome::Skip, "no TARGET field"),
        ])
        .unwrap();
        assert_eq!(row.outcome, Outcome::Pass);
        assert!(
            row.detail.starts_with("2 checks, 113 trapped accesses"),
            "{}",
            row.detail
        );
        let row = window_row(&[
            check("window_reg_readback", Outcome::Pass, ""),
            check("window_past_end_read", Outcome::Fail, "bad"),
        ])
        .unwrap();
        assert_eq!(
            (row.outcome, row.detail.as_str()),
            (Outcome::Fail, "failed: window_past_end_read")
        );
    }
}
