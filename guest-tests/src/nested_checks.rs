//! Host-side checks of a nested VFIO run: the inner backend's `inspect --vfio --json` against
//! the host's `inspect --profile --json` ([`identity_mismatches`]), and after the in-guest
//! client ran against the inner backend's slice, the outer backend's VRAM ([`verify_vram`]):
//! every write the client reported inside its VRAM is at slice start + VRAM offset, the writes
//! past its end are nowhere, the rest of the slice holds zeros, and canaries planted outside
//! the slice before the guest booted ([`canaries_outside`]) are unchanged.

use std::ops::Range;

use serde_json::{json, Value};

use crate::error::Result;
use crate::host_vram::HostVram;
use crate::isolation::{check, nonzero_outside, Canary, CANARY_LEN};
use crate::pattern::vram_bytes;
use crate::report::Check;
use crate::slices::{GuestSlice, SlicedLayout};
use crate::vfio_report::ClientReport;

/// The identity `inspect --json` reports that must not depend on how the GPU is reached
/// (emulated in-process or through VFIO): chip generation and ids, PCI ids and the BARs.
pub fn inspect_identity(v: &Value) -> Value {
    let pick = |obj: &Value, keys: &[&str]| {
        Value::Object(
            keys.iter()
                .map(|k| (k.to_string(), obj.get(k).cloned().unwrap_or(Value::Null)))
                .collect(),
        )
    };
    let bars: Vec<Value> = v
        .get("bars")
        .and_then(Value::as_array)
        .map(|bars| {
            bars.iter()
                .map(|b| {
                    pick(
                        b,
                        &[
                            "index",
                            "role",
                            "real_size",
                            "presented_size",
                            "is_64bit",
                            "prefetchable",
                        ],
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "chip": pick(v.get("chip").unwrap_or(&Value::Null), &["generation", "boot0", "boot42"]),
        "pci": pick(
            v.get("pci").unwrap_or(&Value::Null),
            &["vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id", "class_code", "revision"],
        ),
        "bars": bars,
    })
}

/// Where the identities of `guest` and `host` differ, as `path: guest X, host Y` lines.
pub fn identity_mismatches(guest: &Value, host: &Value) -> Vec<String> {
    let (g, h) = (inspect_identity(guest), inspect_identity(host));
    let mut out = Vec::new();
    for section in ["chip", "pci"] {
        if let (Some(go), Some(ho)) = (g[section].as_object(), h[section].as_object()) {
            for (k, hv) in ho {
                let gv = go.get(k).unwrap_or(&Value::Null);
                if gv != hv || hv.is_null() {
                    out.push(format!("{section}.{k}: guest {gv}, host {hv}"));
                }
            }
        }
    }
    let (gb, hb) = (
        g["bars"].as_array().cloned().unwrap_or_default(),
        h["bars"].as_array().cloned().unwrap_or_default(),
    );
    if gb.len() != hb.len() {
        out.push(format!("bars: guest has {}, host {}", gb.len(), hb.len()));
    }
    for (gv, hv) in gb.iter().zip(&hb) {
        if gv != hv {
            out.push(format!("bar: guest {gv}, host {hv}"));
        }
    }
    out
}

/// The framebuffer regions `inspect --json` lists under `gsp.fb_regions`.
pub fn gsp_fb_regions(v: &Value) -> usize {
    v.get("gsp")
        .and_then(|g| g.get("fb_regions"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// Canaries in host VRAM around `g`'s slice of `layout` that none of its writes may reach:
/// below the slice (if it does not start at 0), just above it, a page, a MiB and a slice size
/// above it, in the middle of the free VRAM and at the end of the guest area. (Other guests'
/// slices may hold some; they stay untouched too.)
pub fn canaries_outside(layout: &SlicedLayout, g: &GuestSlice) -> Vec<Canary> {
    let c = CANARY_LEN as u64;
    let mut out = Vec::new();
    if g.start >= c {
        out.push(Canary::new("just below the slice", g.start - c));
    }
    let end = g.end();
    for (name, at) in [
        ("just above the slice", end),
        ("one page above the slice", end + 4096),
        ("1 MiB above the slice", end + (1 << 20)),
        ("one slice size above the slice", end + g.size),
        (
            "middle of the free VRAM",
            (end + (layout.guest_area_end - end) / 2) & !4095,
        ),
        ("last bytes of the guest area", layout.guest_area_end - c),
    ] {
        if at >= end && at + c <= layout.guest_area_end {
            out.push(Canary::new(name, at));
        }
    }
    out.sort_by_key(|c| c.offset);
    out.dedup_by_key(|c| c.offset);
    out
}

/// After the client ran: its writes against the outer backend's VRAM (`slice` = the inner
/// guest's slice in host VRAM, `host_reserved` = the inner backend's own region, where it may
/// write). Checks: `host_writes_found`, `host_dropped_writes_absent`, `host_slice_only_writes`,
/// `host_canaries_intact`.
pub fn verify_vram(
    vram: &HostVram,
    slice: Range<u64>,
    host_reserved: Range<u64>,
    canaries: &[Canary],
    report: &ClientReport,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let size = slice.end - slice.start;

    let (mut bad, mut own) = (Vec::new(), Vec::new());
    let inside: Vec<_> = report.writes.iter().filter(|w| w.inside).collect();
    for w in &inside {
        if w.vram_offset.checked_add(w.len).is_none_or(|e| e > size) {
            bad.push(format!(
                "write at VRAM {:#x}+{} claims to be inside a {size:#x}-byte slice",
                w.vram_offset, w.len
            ));
            continue;
        }
        let host = slice.start + w.vram_offset;
        own.push(host..host + w.len);
        let now = vram.read(host, w.len as usize)?;
        let want = vram_bytes(w.seed, w.vram_offset, w.len as usize);
        if now != want {
            let at = now.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            bad.push(format!(
                "{:?} write at VRAM {:#x} (host {host:#x}): byte {at} is {:#04x}, want {:#04x}",
                w.via, w.vram_offset, now[at], want[at]
            ));
        }
    }
    if inside.is_empty() {
        bad.push("the client reported no write inside its VRAM".into());
    }
    checks.push(check(
        "host_writes_found",
        bad,
        format!(
            "{} writes found at host {:#x} + VRAM offset",
            inside.len(),
            slice.start
        ),
    ));

    let mut bad = Vec::new();
    let mut looked = 0;
    for w in report.writes.iter().filter(|w| !w.inside) {
        let host = slice.start.checked_add(w.vram_offset);
        let Some(host) = host.filter(|h| h.checked_add(w.len).is_some_and(|e| e <= vram.size()))
        else {
            continue;
        };
        looked += 1;
        if vram.read(host, w.len as usize)? == vram_bytes(w.seed, w.vram_offset, w.len as usize) {
            bad.push(format!(
                "the dropped write aimed at VRAM {:#x} is at host {host:#x}",
                w.vram_offset
            ));
        }
    }
    checks.push(check(
        "host_dropped_writes_absent",
        bad,
        format!("{looked} writes past the slice end are not in host VRAM"),
    ));

    let (count, first) = nonzero_outside(vram, slice.clone(), &own)?;
    let bad = if count > 0 {
        vec![format!(
            "{count} nonzero bytes in the slice outside the client's writes, first at host {first:#x?}"
        )]
    } else {
        Vec::new()
    };
    checks.push(check(
        "host_slice_only_writes",
        bad,
        format!(
            "the slice [{:#x}, {:#x}) holds the client's writes and zeros",
            slice.start, slice.end
        ),
    ));

    let mut bad = Vec::new();
    let mut kept = 0;
    for c in canaries {
        let r = c.offset..c.offset + c.bytes.len() as u64;
        let overlaps = |o: &Range<u64>| r.start < o.end && o.start < r.end;
        if overlaps(&slice) || overlaps(&host_reserved) {
            continue;
        }
        kept += 1;
        if vram.read(c.offset, c.bytes.len())? != c.bytes {
            bad.push(format!("{} at {:#x} changed", c.name, c.offset));
        }
    }
    if kept == 0 {
        bad.push("no canary lies outside the slice and the host-reserved region".into());
    }
    checks.push(check(
        "host_canaries_intact",
        bad,
        format!("{kept} canaries outside the slice unchanged"),
    ));
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expect::ProfileLayout;
    use crate::isolation::plant;
    use crate::report::Outcome;
    use crate::vfio_report::{ClientWrite, WriteVia};

    #[test]
    fn identity_ignores_everything_but_ids_and_bars() {
        let host = json!({"chip": {"generation": "Turing", "boot0": 1, "boot42": 2, "name": "x"},
            "pci": {"vendor_id": 1, "device_id": 2, "subsystem_vendor_id": 3, "subsystem_id": 4,
                    "class_code": 5, "revision": 6},
            "bars": [{"index": 0, "role": "registers", "real_size": 16, "presented_size": 16,
                      "is_64bit": false, "prefetchable": false, "trapped": []}],
            "gsp": {"fb_regions": [{}, {}]}});
        let mut guest = host.clone();
        guest["chip"]["name"] = json!("other");
        guest["bars"][0]["trapped"] = json!([1]);
        assert_eq!(identity_mismatches(&guest, &host), Vec::<String>::new());
        assert_eq!(gsp_fb_regions(&host), 2);
        guest["chip"]["boot42"] = json!(9);
        guest["bars"][0]["real_size"] = json!(8);
        let m = identity_mismatches(&guest, &host);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].starts_with("chip.boot42"));
        assert_eq!(identity_mismatches(&json!({}), &host).len(), 10);
    }

    #[test]
    fn finds_writes_and_misplaced_bytes() {
        const MIB: u64 = 1 << 20;
        let fl = ProfileLayout::from_json(
            "t",
            r#"{"chip":{"boot0":1},"pci":{"vendor_id":1,"device_id":1,"class_code":1},"bars":[]}"#,
        )
        .unwrap();
        let layout = SlicedLayout {
            profile: "t".into(),
            vram_size: 64 * MIB,
            guest_area_end: 48 * MIB,
            host_reserved: (48 * MIB, 8 * MIB),
            guests: vec![GuestSlice {
                name: "g0".into(),
                start: 2 * MIB,
                size: 4 * MIB,
                layout: fl,
            }],
        };
        let path = std::env::temp_dir().join(format!("nested-checks-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 * MIB))
            .unwrap();
        let vram = HostVram::open_path(path.clone()).unwrap();
        let canaries = canaries_outside(&layout, &layout.guests[0]);
        assert!(canaries.iter().any(|c| c.offset == 2 * MIB - 64));
        assert!(canaries.iter().any(|c| c.offset == 6 * MIB));
        assert!(canaries.iter().all(|c| c.offset + 64 <= 48 * MIB));
        plant(&vram, &canaries).unwrap();
        let write = |vram_offset, inside, seed| ClientWrite {
            via: WriteVia::VramBar,
            region: 1,
            offset: vram_offset,
            len: 256,
            seed,
            vram_offset,
            inside,
        };
        let report = ClientReport {
            writes: vec![write(0x1000, true, 1), write(4 * MIB + 0x100, false, 2)],
            ..Default::default()
        };
        vram.write(2 * MIB + 0x1000, &vram_bytes(1, 0x1000, 256))
            .unwrap();
        let run = |vram: &HostVram| {
            verify_vram(
                vram,
                2 * MIB..6 * MIB,
                48 * MIB..56 * MIB,
                &canaries,
                &report,
            )
            .unwrap()
        };
        for c in run(&vram) {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
        // The dropped write landed past the slice (over a canary), and a stray byte in it.
        vram.write(6 * MIB + 0x100, &vram_bytes(2, 4 * MIB + 0x100, 256))
            .unwrap();
        vram.write(6 * MIB, &[0]).unwrap();
        vram.write(3 * MIB, &[1]).unwrap();
        let failed: Vec<String> = run(&vram)
            .into_iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            failed,
            [
                "host_dropped_writes_absent",
                "host_slice_only_writes",
                "host_canaries_intact"
            ]
        );
        std::fs::remove_file(path).unwrap();
    }
}
