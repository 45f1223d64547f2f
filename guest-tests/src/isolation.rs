//! Host-side checks of a sliced guest's confinement: canaries planted in host VRAM around the
//! guest's slice before it boots, and after it powered off: every canary unchanged, the
//! neighbours' slices and the VRAM past them holding only zeros and canaries, and the guest's
//! own slice holding exactly what the guest said it wrote (`GPUPROBE wrote` lines), at
//! `slice.start + guest offset`, and zeros elsewhere.

use std::ops::Range;

use crate::error::Result;
use crate::host_vram::HostVram;
use crate::pattern::vram_bytes;
use crate::report::{Check, Outcome, ProbeReport};
use crate::slices::{GuestSlice, SlicedLayout};

/// Length of every canary.
pub const CANARY_LEN: usize = 64;
/// Seed of the canaries' bytes (any pattern the guest could not produce by accident).
const CANARY_SEED: u64 = 0xca4a_c1e5;
/// Bytes read per block while scanning host VRAM.
const SCAN_BLOCK: usize = 1 << 20;
/// How much of the free VRAM past the last slice is scanned.
const FREE_SCAN: u64 = 4 << 20;

/// Bytes planted in host VRAM where the guest must not reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canary {
    /// Where it is, in words (`below A`, `inside high, middle`, ...).
    pub name: String,
    /// Host VRAM address.
    pub offset: u64,
    /// The planted bytes.
    pub bytes: Vec<u8>,
}

impl Canary {
    /// A [`CANARY_LEN`]-byte canary at host VRAM `offset` (4-byte aligned).
    pub fn new(name: impl Into<String>, offset: u64) -> Canary {
        Canary {
            name: name.into(),
            offset,
            bytes: vram_bytes(CANARY_SEED, offset, CANARY_LEN),
        }
    }

    fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.bytes.len() as u64
    }
}

/// A range the guest announced (`GPUPROBE wrote via=.. guest_off=.. len=.. seed=..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenRange {
    /// `aperture` or `vram_bar`.
    pub via: String,
    /// Guest VRAM address.
    pub guest_off: u64,
    /// Length in bytes.
    pub len: u64,
    /// Pattern seed (words from [`crate::pattern::vram_word`]).
    pub seed: u64,
}

/// The ranges a guest announced.
pub fn written_ranges(report: &ProbeReport) -> Vec<WrittenRange> {
    report
        .facts_of("wrote")
        .filter_map(|f| {
            Some(WrittenRange {
                via: f.get("via")?.to_string(),
                guest_off: f.num("guest_off")?,
                len: f.num("len")?,
                seed: f.num("seed")?,
            })
        })
        .collect()
}

/// Canaries around `guest` (which must have slices below and above it): the last bytes below
/// its slice and the first above, more inside both neighbours, the free VRAM past the last
/// slice, and the end of the host-reserved region (its start holds the BAR1 page tables).
pub fn canaries_around(layout: &SlicedLayout, guest: &GuestSlice) -> Vec<Canary> {
    let c = CANARY_LEN as u64;
    let mut out = vec![
        Canary::new("just below the slice", guest.start - c),
        Canary::new("one page below the slice", guest.start - 4096),
        Canary::new("just above the slice", guest.end()),
        Canary::new("one page above the slice", guest.end() + 4096),
        Canary::new("1 MiB above the slice", guest.end() + (1 << 20)),
    ];
    for n in layout.guests.iter().filter(|n| n.name != guest.name) {
        out.push(Canary::new(format!("{}: first bytes", n.name), n.start));
        out.push(Canary::new(
            format!("{}: middle", n.name),
            n.start + n.size / 2,
        ));
        out.push(Canary::new(format!("{}: last bytes", n.name), n.end() - c));
    }
    let last = layout.guests.iter().map(GuestSlice::end).max().unwrap_or(0);
    if last + FREE_SCAN <= layout.guest_area_end {
        out.push(Canary::new("free VRAM past the last slice", last));
    }
    let (res, res_len) = layout.host_reserved;
    out.push(Canary::new("host-reserved, last bytes", res + res_len - c));
    out.push(Canary::new(
        "host-reserved, 64 KiB below its end",
        res + res_len - (64 << 10),
    ));
    out.sort_by_key(|c| c.offset);
    out.dedup_by_key(|c| c.offset);
    out
}

/// Write the canaries into host VRAM.
pub fn plant(vram: &HostVram, canaries: &[Canary]) -> Result<()> {
    canaries
        .iter()
        .try_for_each(|c| vram.write(c.offset, &c.bytes))
}

/// Host VRAM ranges that must hold nothing but zeros and canaries after `guest` ran: every
/// other guest's slice, the start of the free VRAM, the last MiB of the host-reserved region.
pub fn foreign_ranges(layout: &SlicedLayout, guest: &GuestSlice) -> Vec<(String, Range<u64>)> {
    let mut out: Vec<(String, Range<u64>)> = layout
        .guests
        .iter()
        .filter(|n| n.name != guest.name)
        .map(|n| (format!("slice of {}", n.name), n.start..n.end()))
        .collect();
    let last = layout.guests.iter().map(GuestSlice::end).max().unwrap_or(0);
    let free_end = (last + FREE_SCAN).min(layout.guest_area_end);
    if free_end > last {
        out.push(("free VRAM".into(), last..free_end));
    }
    let (res, res_len) = layout.host_reserved;
    out.push((
        "host-reserved, last MiB".into(),
        res + res_len - (1 << 20)..res + res_len,
    ));
    out
}

/// Nonzero bytes of `range` outside `allowed`: (count, the first few addresses).
pub(crate) fn nonzero_outside(
    vram: &HostVram,
    range: Range<u64>,
    allowed: &[Range<u64>],
) -> Result<(u64, Vec<u64>)> {
    let (mut count, mut first) = (0u64, Vec::new());
    let mut at = range.start;
    while at < range.end {
        let len = (range.end - at).min(SCAN_BLOCK as u64) as usize;
        let block = vram.read(at, len)?;
        if block.iter().any(|&b| b != 0) {
            for (i, &b) in block.iter().enumerate() {
                let addr = at + i as u64;
                if b != 0 && !allowed.iter().any(|r| r.contains(&addr)) {
                    count += 1;
                    if first.len() < 4 {
                        first.push(addr);
                    }
                }
            }
        }
        at += len as u64;
    }
    Ok((count, first))
}

pub(crate) fn check(name: &str, bad: Vec<String>, ok: String) -> Check {
    let outcome = if bad.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    let detail = if bad.is_empty() {
        ok
    } else {
        let shown: Vec<&str> = bad.iter().take(4).map(String::as_str).collect();
        format!("{} problems: {}", bad.len(), shown.join("; "))
    };
    Check {
        name: name.into(),
        outcome,
        detail,
    }
}

/// The host-side checks after `guest` ran (and powered off): `host_canaries_intact`,
/// `host_foreign_vram_untouched`, `host_guest_slice_matches` (what the guest wrote is at
/// `slice.start + guest offset`, nothing else in its slice changed) and `host_guest_wrote`
/// (the guest announced writes through both paths).
pub fn verify(
    vram: &HostVram,
    layout: &SlicedLayout,
    guest: &GuestSlice,
    canaries: &[Canary],
    report: &ProbeReport,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();

    let mut bad = Vec::new();
    for c in canaries {
        let now = vram.read(c.offset, c.bytes.len())?;
        if now != c.bytes {
            let at = now
                .iter()
                .zip(&c.bytes)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bad.push(format!(
                "{} at {:#x}: byte {at} is {:#04x}, planted {:#04x}",
                c.name, c.offset, now[at], c.bytes[at]
            ));
        }
    }
    checks.push(check(
        "host_canaries_intact",
        bad,
        format!(
            "{} canaries of {CANARY_LEN} bytes unchanged",
            canaries.len()
        ),
    ));

    let allowed: Vec<Range<u64>> = canaries.iter().map(Canary::range).collect();
    let mut bad = Vec::new();
    let mut scanned = 0;
    for (what, range) in foreign_ranges(layout, guest) {
        scanned += range.end - range.start;
        let (count, first) = nonzero_outside(vram, range.clone(), &allowed)?;
        if count > 0 {
            bad.push(format!(
                "{what} [{:#x}, {:#x}): {count} nonzero bytes, first at {}",
                range.start,
                range.end,
                hex_list(&first)
            ));
        }
    }
    checks.push(check(
        "host_foreign_vram_untouched",
        bad,
        format!(
            "{} MiB of neighbours' slices, free and host-reserved VRAM: only zeros and canaries",
            scanned >> 20
        ),
    ));

    let ranges = written_ranges(report);
    let mut bad = Vec::new();
    for r in &ranges {
        if r.guest_off
            .checked_add(r.len)
            .is_none_or(|e| e > guest.size)
        {
            bad.push(format!(
                "announced range {:#x}+{} outside the slice",
                r.guest_off, r.len
            ));
            continue;
        }
        let host = guest.start + r.guest_off;
        let now = vram.read(host, r.len as usize)?;
        let want = vram_bytes(r.seed, r.guest_off, r.len as usize);
        if now != want {
            let at = now.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            bad.push(format!(
                "{} write at guest {:#x} (host {host:#x}): byte {at} differs",
                r.via, r.guest_off
            ));
        }
    }
    let own: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| guest.start + r.guest_off..guest.start + r.guest_off + r.len)
        .collect();
    let (count, first) = nonzero_outside(vram, guest.start..guest.end(), &own)?;
    if count > 0 {
        bad.push(format!(
            "{count} nonzero bytes in the slice outside the announced writes, first at host {}",
            hex_list(&first)
        ));
    }
    checks.push(check(
        "host_guest_slice_matches",
        bad,
        format!(
            "{} announced ranges found at host {:#x} + guest offset; the rest of the slice is zero",
            ranges.len(),
            guest.start
        ),
    ));

    let via = |v: &str| ranges.iter().filter(|r| r.via == v).count();
    let (aperture, bar) = (via("aperture"), via("vram_bar"));
    let bad = if aperture >= 3 && bar >= 3 {
        Vec::new()
    } else {
        vec![format!(
            "expected at least 3 ranges written through each path, got aperture={aperture} vram_bar={bar}"
        )]
    };
    checks.push(check(
        "host_guest_wrote",
        bad,
        format!("{aperture} ranges written through the aperture, {bar} through the VRAM BAR"),
    ));
    Ok(checks)
}

fn hex_list(values: &[u64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:#x}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expect::ProfileLayout;

    fn layout() -> SlicedLayout {
        let fl = ProfileLayout::from_json(
            "t",
            r#"{"chip":{"boot0":1},"pci":{"vendor_id":1,"device_id":1,"class_code":1},"bars":[]}"#,
        )
        .unwrap();
        let g = |name: &str, start: u64| GuestSlice {
            name: name.into(),
            start,
            size: 2 << 20,
            layout: fl.clone(),
        };
        SlicedLayout {
            profile: "t".into(),
            vram_size: 32 << 20,
            guest_area_end: 16 << 20,
            host_reserved: (16 << 20, 8 << 20),
            guests: vec![g("low", 0), g("a", 2 << 20), g("high", 4 << 20)],
        }
    }

    #[test]
    fn finds_stray_writes_and_changed_canaries() {
        let l = layout();
        let a = l.guest("a").unwrap().clone();
        let path = std::env::temp_dir().join(format!("isolation-test-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(32 << 20))
            .unwrap();
        let vram = HostVram::open_path(path.clone()).unwrap();
        let canaries = canaries_around(&l, &a);
        assert!(canaries
            .iter()
            .any(|c| c.offset == a.start - CANARY_LEN as u64));
        assert!(canaries.iter().any(|c| c.offset == a.end()));
        plant(&vram, &canaries).unwrap();
        // The guest's writes, where it announced them.
        let mut serial = String::new();
        for (via, off, seed) in [("aperture", 0u64, 5u64), ("vram_bar", 0x1000, 6)] {
            vram.write(a.start + off, &vram_bytes(seed, off, 1024))
                .unwrap();
            serial.push_str(&format!(
                "GPUPROBE wrote via={via} guest_off={off:#x} len=1024 seed={seed:#x}\n"
            ));
        }
        let report = ProbeReport::parse(&serial);
        let checks = verify(&vram, &l, &a, &canaries, &report).unwrap();
        let outcome = |n: &str| checks.iter().find(|c| c.name == n).unwrap().outcome;
        assert_eq!(outcome("host_canaries_intact"), Outcome::Pass);
        assert_eq!(outcome("host_foreign_vram_untouched"), Outcome::Pass);
        assert_eq!(outcome("host_guest_slice_matches"), Outcome::Pass);
        assert_eq!(
            outcome("host_guest_wrote"),
            Outcome::Fail,
            "one range per path"
        );

        // A write that escaped into the neighbour, one into the guest's own slice, a canary hit.
        vram.write(a.end() + 0x2000, &[7]).unwrap();
        vram.write(a.start + 0x9000, &[7]).unwrap();
        vram.write(a.start - CANARY_LEN as u64, &[0]).unwrap();
        let checks = verify(&vram, &l, &a, &canaries, &report).unwrap();
        for name in [
            "host_canaries_intact",
            "host_foreign_vram_untouched",
            "host_guest_slice_matches",
        ] {
            let c = checks.iter().find(|c| c.name == name).unwrap();
            assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        }
        std::fs::remove_file(path).unwrap();
    }
}
