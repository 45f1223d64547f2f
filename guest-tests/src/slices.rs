//! A sliced GPU as the backend lays it out (`gpu-backend inspect --profile P --guest S:SIZE ...
//! --json`): where each guest's VRAM slice lies in host VRAM, the host-reserved region, and
//! what each guest's function looks like.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::error::{HarnessError, Result};
use crate::expect::ProfileLayout;

/// One guest's slice and function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSlice {
    /// The guest's name (its socket's file stem, as given to [`SlicedLayout::inspect_with`]).
    pub name: String,
    /// Host VRAM address of the slice's first byte (the guest's VRAM address 0).
    pub start: u64,
    /// Slice size in bytes.
    pub size: u64,
    /// The function the guest sees.
    pub layout: ProfileLayout,
}

impl GuestSlice {
    /// One past the slice's last host VRAM byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The partition of host VRAM between guests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicedLayout {
    /// Profile name.
    pub profile: String,
    /// All device memory.
    pub vram_size: u64,
    /// End of the area slices are carved from.
    pub guest_area_end: u64,
    /// The host-reserved region (BAR1 instance block and page tables): offset and size.
    pub host_reserved: (u64, u64),
    /// The guests, in the order given.
    pub guests: Vec<GuestSlice>,
}

impl SlicedLayout {
    /// Parse the JSON of `inspect --guest ... --json`.
    pub fn from_json(profile: &str, text: &str) -> std::result::Result<SlicedLayout, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let num = |v: &Value, path: &[&str]| {
            path.iter()
                .try_fold(v, |v, k| v.get(k))
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("missing number {}", path.join(".")))
        };
        let mut guests = Vec::new();
        for g in v
            .get("guests")
            .and_then(Value::as_array)
            .ok_or("missing guests")?
        {
            let socket = g.get("socket").and_then(Value::as_str).unwrap_or_default();
            let name = Path::new(socket)
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            guests.push(GuestSlice {
                name,
                start: num(g, &["slice", "start"])?,
                size: num(g, &["slice", "size"])?,
                layout: ProfileLayout::from_value(profile, g)?,
            });
        }
        Ok(SlicedLayout {
            profile: profile.to_string(),
            vram_size: num(&v, &["partition", "vram_size"])?,
            guest_area_end: num(&v, &["partition", "guest_area_end"])?,
            host_reserved: (
                num(&v, &["partition", "host_reserved", "offset"])?,
                num(&v, &["partition", "host_reserved", "size"])?,
            ),
            guests,
        })
    }

    /// Ask the backend binary `bin` how it would slice `profile` between `guests` (name, size
    /// in bytes), in that order (the same order [`crate::Backend::spawn_sliced`] uses).
    pub fn inspect_with(bin: &Path, profile: &str, guests: &[(&str, u64)]) -> Result<SlicedLayout> {
        let err = |reason: String| HarnessError::Inspect {
            profile: profile.to_string(),
            reason,
        };
        let mut cmd = Command::new(bin);
        cmd.args(["inspect", "--profile", profile, "--json"]);
        for (name, size) in guests {
            cmd.arg("--guest").arg(format!("{name}.sock:{size}"));
        }
        let out = cmd
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

    /// The guest called `name`.
    pub fn guest(&self, name: &str) -> Option<&GuestSlice> {
        self.guests.iter().find(|g| g.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sliced_inspect_json() {
        let json = r#"{"partition":{"vram_size":1000000000,"guest_area_end":900000000,
              "host_reserved":{"offset":900000000,"size":67108864}},
            "guests":[
              {"socket":"/x/low.sock","chip":{"boot0":1,"generation":"Turing"},
               "pci":{"vendor_id":4318,"device_id":1,"class_code":2},
               "slice":{"start":0,"size":2097152},
               "bars":[{"index":1,"role":"vram","vram_offset":0,"real_size":2097152,
                        "presented_size":2097152}]},
              {"socket":"a.sock","chip":{"boot0":1,"generation":"Turing"},
               "pci":{"vendor_id":4318,"device_id":1,"class_code":2},
               "slice":{"start":2097152,"size":4194304},
               "bars":[]}]}"#;
        let l = SlicedLayout::from_json("tu102-24g", json).unwrap();
        assert_eq!(l.host_reserved, (900_000_000, 64 << 20));
        let a = l.guest("a").unwrap();
        assert_eq!((a.start, a.end()), (2 << 20, 6 << 20));
        assert_eq!(l.guest("low").unwrap().layout.vram_map(), "1:0:2097152");
        assert!(l.guest("b").is_none());
    }
}
