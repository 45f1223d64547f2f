//! [`ProbeArgs`]: what the guest probe should expect, turned into `gpuprobe.*` kernel
//! command-line parameters (see the probe's `params` module for their meaning).

use std::fmt::Write as _;

/// A builder of the probe's kernel command-line parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeArgs {
    params: Vec<(String, String)>,
}

impl ProbeArgs {
    /// No expectations: the probe looks for vendor 0x10de and reports what it finds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `gpuprobe.<key>=<value>`, replacing an earlier value of the same key.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        let value = value.to_string();
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.params.push((key.to_string(), value)),
        }
        self
    }

    /// The value set for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// PCI vendor id to look for (default 0x10de).
    pub fn vendor(self, id: u16) -> Self {
        self.set("vendor", format!("{id:#06x}"))
    }

    /// Expected PCI device id.
    pub fn device(self, id: u16) -> Self {
        self.set("device", format!("{id:#06x}"))
    }

    /// Expected 24-bit class code (e.g. 0x030200 for a 3D controller).
    pub fn class(self, class: u32) -> Self {
        self.set("class", format!("{class:#08x}"))
    }

    /// Expected value of the 32-bit register at offset 0 of BAR0 (NV_PMC_BOOT_0).
    pub fn boot0(self, value: u32) -> Self {
        self.set("boot0", format!("{value:#010x}"))
    }

    /// BAR index holding BOOT_0 (default 0).
    pub fn boot0_bar(self, index: u8) -> Self {
        self.set("boot0_bar", index)
    }

    /// Expected size in bytes of BAR `index`.
    pub fn bar_size(self, index: u8, size: u64) -> Self {
        self.set(&format!("bar{index}_size"), size)
    }

    /// The VRAM aperture is BAR `index`; its first `real` bytes are memory, the rest padding.
    pub fn vram(self, index: u8, real: u64) -> Self {
        self.set("vram_bar", index).set("vram_real", real)
    }

    /// Write the persistence pattern of `seed` at VRAM offset `offset`.
    pub fn persist_write(self, offset: u64, seed: u64) -> Self {
        self.set("persist", "write")
            .set("persist_offset", format!("{offset:#x}"))
            .set("persist_seed", seed)
    }

    /// Check that an earlier guest's pattern of `seed` is still at VRAM offset `offset`.
    pub fn persist_check(self, offset: u64, seed: u64) -> Self {
        self.set("persist", "check")
            .set("persist_offset", format!("{offset:#x}"))
            .set("persist_seed", seed)
    }

    /// Length in bytes of the persistence pattern (default 4096).
    pub fn persist_len(self, len: u64) -> Self {
        self.set("persist_len", len)
    }

    /// The probe's own watchdog in seconds (default 120).
    pub fn watchdog_secs(self, secs: u32) -> Self {
        self.set("timeout", secs)
    }

    /// The parameters as kernel command-line words (`gpuprobe.k=v gpuprobe.k2=v2`).
    pub fn kernel_args(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.params {
            if !s.is_empty() {
                s.push(' ');
            }
            let _ = write!(s, "gpuprobe.{k}={v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_kernel_args() {
        let a = ProbeArgs::new()
            .device(0x2342)
            .boot0(0x1800_00a1)
            .vram(4, 96 << 30)
            .persist_write(0x10000, 7)
            .device(0x2345);
        assert_eq!(
            a.kernel_args(),
            "gpuprobe.device=0x2345 gpuprobe.boot0=0x180000a1 gpuprobe.vram_bar=4 \
             gpuprobe.vram_real=103079215104 gpuprobe.persist=write gpuprobe.persist_offset=0x10000 \
             gpuprobe.persist_seed=7"
        );
    }
}
