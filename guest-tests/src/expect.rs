//! What a guest should see for a backend profile, taken from the backend itself
//! (`gpu-backend inspect --profile <name> --json`), turned into [`ProbeArgs`].

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::artifacts::backend_binary;
use crate::error::{HarnessError, Result};
use crate::probe_args::ProbeArgs;
use crate::report::ProbeReport;

/// `64-bit, prefetchable`, `32-bit, non-prefetchable`, ...
pub fn bar_type(is_64bit: bool, prefetchable: bool) -> String {
    format!(
        "{}, {}",
        if is_64bit { "64-bit" } else { "32-bit" },
        if prefetchable {
            "prefetchable"
        } else {
            "non-prefetchable"
        }
    )
}

/// One BAR of the presented function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarExpectation {
    /// BAR index.
    pub index: u8,
    /// `registers`, `vram`, ...
    pub role: String,
    /// Bytes backed by the device.
    pub real_size: u64,
    /// Power-of-two size the guest sees.
    pub presented_size: u64,
    /// A 64-bit memory BAR.
    pub is_64bit: bool,
    /// A prefetchable memory BAR.
    pub prefetchable: bool,
    /// For a VRAM BAR: the guest VRAM address of its first byte.
    pub vram_offset: Option<u64>,
}

impl BarExpectation {
    /// Bytes past the real memory (reads ~0, writes dropped).
    pub fn padding(&self) -> u64 {
        self.presented_size.saturating_sub(self.real_size)
    }
}

/// The guest-visible identity and BAR layout of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileLayout {
    /// Profile name.
    pub profile: String,
    /// Marketing name of the chip, e.g. `NVIDIA GH200 Grace Hopper Superchip (...)`.
    pub description: String,
    /// GPU generation, e.g. `Hopper` (empty if the backend did not say).
    pub generation: String,
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// PCI class code.
    pub class_code: u32,
    /// NV_PMC_BOOT_0.
    pub boot0: u32,
    /// The BARs.
    pub bars: Vec<BarExpectation>,
    /// Bytes of VRAM the guest owns (its slice; all device memory for a GPU given whole), if
    /// the backend said.
    pub guest_vram: Option<u64>,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

impl ProfileLayout {
    /// Parse the JSON printed by `gpu-backend inspect --json`.
    pub fn from_json(profile: &str, text: &str) -> std::result::Result<ProfileLayout, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        Self::from_value(profile, &v)
    }

    /// Parse one function's JSON object (the whole output of `inspect --json`, or one entry of
    /// its `guests` array when sliced).
    pub fn from_value(profile: &str, v: &Value) -> std::result::Result<ProfileLayout, String> {
        let num = |path: &[&str]| {
            field(v, path)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("missing number {}", path.join(".")))
        };
        let mut bars = Vec::new();
        for b in field(v, &["bars"])
            .and_then(Value::as_array)
            .ok_or("missing bars")?
        {
            let n = |k: &str| {
                b.get(k)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("bar lacks {k}"))
            };
            let flag = |k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
            bars.push(BarExpectation {
                index: n("index")? as u8,
                role: b
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                real_size: n("real_size")?,
                presented_size: n("presented_size")?,
                is_64bit: flag("is_64bit"),
                prefetchable: flag("prefetchable"),
                vram_offset: b.get("vram_offset").and_then(Value::as_u64),
            });
        }
        let text_of = |path: &[&str]| {
            field(v, path)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(ProfileLayout {
            profile: profile.to_string(),
            description: text_of(&["chip", "description"]),
            generation: text_of(&["chip", "generation"]),
            vendor_id: num(&["pci", "vendor_id"])? as u16,
            device_id: num(&["pci", "device_id"])? as u16,
            class_code: num(&["pci", "class_code"])? as u32,
            boot0: num(&["chip", "boot0"])? as u32,
            bars,
            guest_vram: field(v, &["slice", "size"])
                .or_else(|| field(v, &["chip", "vram_size"]))
                .and_then(Value::as_u64),
        })
    }

    /// Ask the backend binary (the debug build, see [`backend_binary`]) for the layout of
    /// `profile`.
    pub fn inspect(profile: &str) -> Result<ProfileLayout> {
        Self::inspect_with(&backend_binary()?, profile)
    }

    /// Ask the backend binary `bin` for the layout of `profile`.
    pub fn inspect_with(bin: &Path, profile: &str) -> Result<ProfileLayout> {
        let err = |reason: String| HarnessError::Inspect {
            profile: profile.to_string(),
            reason,
        };
        let out = Command::new(bin)
            .args(["inspect", "--profile", profile, "--json"])
            .output()
            .map_err(|e| err(format!("running {}: {e}", bin.display())))?;
        if !out.status.success() {
            return Err(err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Self::from_json(profile, &String::from_utf8_lossy(&out.stdout))
            .map_err(|e| err(format!("parsing its JSON: {e}")))
    }

    /// The VRAM BAR the probe should exercise: the one with padding if any, else the largest.
    pub fn vram_bar(&self) -> Option<&BarExpectation> {
        self.bars
            .iter()
            .filter(|b| b.role == "vram")
            .max_by_key(|b| (b.presented_size > b.real_size, b.real_size))
    }

    /// The BAR0 offset of the generation's BAR0 window register (`NV_PBUS_BAR0_WINDOW` at
    /// `0x1700` up to Ada, `NV_XAL_EP_BAR0_WINDOW` at `0x10FD40` on Hopper and Blackwell): a
    /// register a guest may rewrite with its current value without side effects.
    pub fn window_register(&self) -> u32 {
        match self.generation.as_str() {
            "Hopper" | "Blackwell" => 0x10_FD40,
            _ => 0x1700,
        }
    }

    /// The bits of the window register that latch (what an all-ones write reads back as):
    /// BASE 23:0 + TARGET 25:24 up to Ada, BASE 21:0 on Hopper, BASE 22:0 on Blackwell
    /// (docs/registers.md).
    pub fn window_register_mask(&self) -> u32 {
        match self.generation.as_str() {
            "Hopper" => 0x003f_ffff,
            "Blackwell" => 0x007f_ffff,
            _ => 0x03ff_ffff,
        }
    }

    /// Whether the window register has the TARGET field (Turing–Ada).
    pub fn window_has_target(&self) -> bool {
        !matches!(self.generation.as_str(), "Hopper" | "Blackwell")
    }

    /// `gpuprobe.vram_map`: which BAR shows which guest VRAM (`BAR:OFFSET:LEN,...`), from the
    /// VRAM BARs' offsets and real sizes.
    pub fn vram_map(&self) -> String {
        self.bars
            .iter()
            .filter(|b| b.role == "vram")
            .map(|b| format!("{}:{}:{}", b.index, b.vram_offset.unwrap_or(0), b.real_size))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Probe arguments of the window checks (`gpuprobe.window=1`) for a guest owning
    /// `vram_size` bytes of VRAM: the window register, its defined bits and TARGET field, the
    /// VRAM map. Add them to [`ProfileLayout::probe_args`] or to bare identity checks.
    pub fn window_probe_args(&self, args: ProbeArgs, vram_size: u64) -> ProbeArgs {
        args.set("window", 1)
            .set("window_reg", format!("{:#x}", self.window_register()))
            .set("window_mask", format!("{:#x}", self.window_register_mask()))
            .set("window_target", u8::from(self.window_has_target()))
            .set("slice_size", vram_size)
            .set("vram_map", self.vram_map())
    }

    /// Probe arguments checking the identity and the BAR sizes only (no VRAM writes by the
    /// regular checks).
    pub fn identity_probe_args(&self) -> ProbeArgs {
        let mut a = ProbeArgs::new()
            .device(self.device_id)
            .class(self.class_code)
            .boot0(self.boot0);
        if let Some(reg) = self.bars.iter().find(|b| b.role == "registers") {
            a = a.boot0_bar(reg.index);
        }
        for b in &self.bars {
            a = a.bar_size(b.index, b.presented_size);
        }
        a
    }

    /// The BAR with `index`, if the profile has it.
    pub fn bar(&self, index: u8) -> Option<&BarExpectation> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// Compare the BARs a guest saw with the layout: every expected BAR present with the
    /// presented size and the same 64-bit / prefetchable type bits. Returns one line per
    /// mismatch (empty: everything matches).
    pub fn bar_mismatches(&self, report: &ProbeReport) -> Vec<String> {
        let mut bad = Vec::new();
        for want in &self.bars {
            let Some(got) = report.bars.iter().find(|b| b.index == want.index) else {
                bad.push(format!("BAR{} missing in the guest", want.index));
                continue;
            };
            if got.size != want.presented_size {
                bad.push(format!(
                    "BAR{} size {} (want {})",
                    want.index, got.size, want.presented_size
                ));
            }
            if (got.is_64bit(), got.is_prefetchable()) != (want.is_64bit, want.prefetchable) {
                bad.push(format!(
                    "BAR{} type {} (want {})",
                    want.index,
                    bar_type(got.is_64bit(), got.is_prefetchable()),
                    bar_type(want.is_64bit, want.prefetchable)
                ));
            }
        }
        bad
    }

    /// Probe arguments checking everything the layout promises: ids, BOOT_0, every BAR's size
    /// and the VRAM BAR's real size.
    pub fn probe_args(&self) -> ProbeArgs {
        let mut a = self.identity_probe_args();
        if let Some(v) = self.vram_bar() {
            a = a.vram(v.index, v.real_size);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inspect_json() {
        let json = r#"{"chip":{"name":"x","boot0":402653345,"generation":"Hopper"},
            "pci":{"vendor_id":4318,"device_id":9026,"class_code":197120},
            "bars":[{"index":0,"role":"registers","real_size":16777216,"presented_size":16777216,
                     "is_64bit":true,"prefetchable":true},
                    {"index":2,"role":"vram","real_size":1073741824,"presented_size":1073741824},
                    {"index":4,"role":"vram","real_size":102005473280,"presented_size":137438953472,
                     "is_64bit":true,"prefetchable":true}]}"#;
        let l = ProfileLayout::from_json("x", json).unwrap();
        assert_eq!(
            (l.device_id, l.class_code, l.boot0),
            (0x2342, 0x030200, 0x1800_00a1)
        );
        assert_eq!(l.vram_bar().unwrap().index, 4);
        let args = l.probe_args();
        assert_eq!(args.get("vram_real"), Some("102005473280"));
        assert_eq!(args.get("bar4_size"), Some("137438953472"));
        assert_eq!(args.get("boot0_bar"), Some("0"));
        assert_eq!(l.window_register(), 0x10_FD40);
        assert!(l.bar(0).unwrap().is_64bit && !l.bar(2).unwrap().prefetchable);
        assert_eq!(l.bar(4).unwrap().padding(), 33 << 30);
        assert_eq!(l.window_register_mask(), 0x3f_ffff);
        assert!(!l.window_has_target());
    }

    #[test]
    fn window_arguments() {
        let json = r#"{"chip":{"boot0":1,"generation":"Turing"},
            "pci":{"vendor_id":4318,"device_id":1,"class_code":2},
            "bars":[{"index":0,"role":"registers","real_size":4096,"presented_size":4096},
                    {"index":1,"role":"vram","vram_offset":0,"real_size":67108864,
                     "presented_size":67108864},
                    {"index":2,"role":"vram","vram_offset":67108864,"real_size":2097152,
                     "presented_size":2097152}]}"#;
        let l = ProfileLayout::from_json("t", json).unwrap();
        assert_eq!(l.vram_map(), "1:0:67108864,2:67108864:2097152");
        let a = l.window_probe_args(l.identity_probe_args(), 69206016);
        assert_eq!(a.get("window_reg"), Some("0x1700"));
        assert_eq!(a.get("window_mask"), Some("0x3ffffff"));
        assert_eq!(a.get("window_target"), Some("1"));
        assert_eq!(a.get("slice_size"), Some("69206016"));
        assert_eq!(a.get("vram_bar"), None, "identity only: no VRAM checks");
    }

    #[test]
    fn compares_guest_bars() {
        let json = r#"{"chip":{"boot0":1},"pci":{"vendor_id":4318,"device_id":1,"class_code":2},
            "bars":[{"index":0,"role":"registers","real_size":4096,"presented_size":4096,
                     "is_64bit":false,"prefetchable":false},
                    {"index":1,"role":"vram","real_size":6144,"presented_size":8192,
                     "is_64bit":true,"prefetchable":true}]}"#;
        let l = ProfileLayout::from_json("t", json).unwrap();
        assert_eq!(l.window_register(), 0x1700);
        let report = ProbeReport::parse(
            "GPUPROBE bar index=0 start=0x1000 size=4096 flags=0x40200 kind=mem\n\
             GPUPROBE bar index=1 start=0x8000 size=8192 flags=0x14220c kind=mem\n",
        );
        assert_eq!(l.bar_mismatches(&report), Vec::<String>::new());
        let report = ProbeReport::parse(
            "GPUPROBE bar index=0 start=0x1000 size=4096 flags=0x14220c kind=mem\n",
        );
        assert_eq!(
            l.bar_mismatches(&report),
            [
                "BAR0 type 64-bit, prefetchable (want 32-bit, non-prefetchable)",
                "BAR1 missing in the guest"
            ]
        );
    }
}
