//! What a guest should see for a backend profile, taken from the backend itself
//! (`gpu-backend inspect --profile <name> --json`), turned into [`ProbeArgs`].

use std::process::Command;

use serde_json::Value;

use crate::artifacts::backend_binary;
use crate::error::{HarnessError, Result};
use crate::probe_args::ProbeArgs;

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
}

/// The guest-visible identity and BAR layout of a profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileLayout {
    /// Profile name.
    pub profile: String,
    /// PCI device id.
    pub device_id: u16,
    /// PCI class code.
    pub class_code: u32,
    /// NV_PMC_BOOT_0.
    pub boot0: u32,
    /// The BARs.
    pub bars: Vec<BarExpectation>,
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

impl ProfileLayout {
    /// Parse the JSON printed by `gpu-backend inspect --json`.
    pub fn from_json(profile: &str, text: &str) -> std::result::Result<ProfileLayout, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let num = |path: &[&str]| {
            field(&v, path)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("missing number {}", path.join(".")))
        };
        let mut bars = Vec::new();
        for b in field(&v, &["bars"])
            .and_then(Value::as_array)
            .ok_or("missing bars")?
        {
            let n = |k: &str| {
                b.get(k)
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("bar lacks {k}"))
            };
            bars.push(BarExpectation {
                index: n("index")? as u8,
                role: b
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                real_size: n("real_size")?,
                presented_size: n("presented_size")?,
            });
        }
        Ok(ProfileLayout {
            profile: profile.to_string(),
            device_id: num(&["pci", "device_id"])? as u16,
            class_code: num(&["pci", "class_code"])? as u32,
            boot0: num(&["chip", "boot0"])? as u32,
            bars,
        })
    }

    /// Ask the backend binary for the layout of `profile`.
    pub fn inspect(profile: &str) -> Result<ProfileLayout> {
        let bin = backend_binary()?;
        let err = |reason: String| HarnessError::Backend {
            reason,
            log_tail: String::new(),
        };
        let out = Command::new(&bin)
            .args(["inspect", "--profile", profile, "--json"])
            .output()
            .map_err(|e| err(format!("running {} inspect: {e}", bin.display())))?;
        if !out.status.success() {
            return Err(err(format!(
                "`inspect --profile {profile} --json` failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Self::from_json(profile, &String::from_utf8_lossy(&out.stdout))
            .map_err(|e| err(format!("parsing `inspect --json` of {profile}: {e}")))
    }

    /// The VRAM BAR the probe should exercise: the one with padding if any, else the largest.
    pub fn vram_bar(&self) -> Option<&BarExpectation> {
        self.bars
            .iter()
            .filter(|b| b.role == "vram")
            .max_by_key(|b| (b.presented_size > b.real_size, b.real_size))
    }

    /// Probe arguments checking everything the layout promises: ids, BOOT_0, every BAR's size
    /// and the VRAM BAR's real size.
    pub fn probe_args(&self) -> ProbeArgs {
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
        let json = r#"{"chip":{"name":"x","boot0":402653345},
            "pci":{"vendor_id":4318,"device_id":9026,"class_code":197120},
            "bars":[{"index":0,"role":"registers","real_size":16777216,"presented_size":16777216},
                    {"index":2,"role":"vram","real_size":1073741824,"presented_size":1073741824},
                    {"index":4,"role":"vram","real_size":102005473280,"presented_size":137438953472}]}"#;
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
    }
}
