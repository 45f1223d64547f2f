//! [`ProbeReport`]: the `GPUPROBE` lines of a guest's serial log, parsed.
//!
//! Line grammar: `GPUPROBE <kind> key=value key=value ...`, where a `detail=` field takes the
//! rest of the line. The prefix may appear after other console output on the same line.

use std::fmt::Write as _;

/// Line prefix printed by the guest probe.
pub const PREFIX: &str = "GPUPROBE ";

/// One `GPUPROBE` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// The word after the prefix (`device`, `bar`, `check`, `done`, ...).
    pub kind: String,
    /// `key=value` fields in order.
    pub fields: Vec<(String, String)>,
}

impl Fact {
    /// Parse the text after `GPUPROBE `.
    pub fn parse(text: &str) -> Option<Fact> {
        let text = text.trim_end();
        let (kind, mut rest) = text.split_once(' ').unwrap_or((text, ""));
        if kind.is_empty() {
            return None;
        }
        let mut fields = Vec::new();
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            if let Some(detail) = rest.strip_prefix("detail=") {
                fields.push(("detail".to_string(), detail.to_string()));
                break;
            }
            let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            fields.push((k.to_string(), v.to_string()));
            rest = tail;
        }
        Some(Fact {
            kind: kind.to_string(),
            fields,
        })
    }

    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Field `key` as a number (decimal or `0x` hex).
    pub fn num(&self, key: &str) -> Option<u64> {
        parse_u64(self.get(key)?)
    }
}

/// Parse a decimal or `0x` hexadecimal number.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Not run (missing parameter or access path unavailable).
    Skip,
}

/// One `GPUPROBE check` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Check name, e.g. `boot0_mmap`.
    pub name: String,
    /// Its outcome.
    pub outcome: Outcome,
    /// Free-text detail (may be empty).
    pub detail: String,
}

/// The found device (`GPUPROBE device` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// PCI address.
    pub bdf: String,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u32,
}

/// One `GPUPROBE bar` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Resource index (6 = ROM).
    pub index: u8,
    /// Guest-physical start address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kernel resource flags.
    pub flags: u64,
    /// `mem`, `io` or `rom`.
    pub kind: String,
}

/// `IORESOURCE_PREFETCH` in the kernel's resource flags.
pub const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64` in the kernel's resource flags.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

impl BarInfo {
    /// A 64-bit memory BAR (from the kernel's resource flags).
    pub fn is_64bit(&self) -> bool {
        self.flags & IORESOURCE_MEM_64 != 0
    }

    /// A prefetchable memory BAR (from the kernel's resource flags).
    pub fn is_prefetchable(&self) -> bool {
        self.flags & IORESOURCE_PREFETCH != 0
    }
}

/// The final `GPUPROBE done` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Passed checks.
    pub pass: u32,
    /// Failed checks.
    pub fail: u32,
    /// Skipped checks.
    pub skip: u32,
}

/// Everything the probe printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// All facts in order.
    pub facts: Vec<Fact>,
    /// The device, if found.
    pub device: Option<DeviceInfo>,
    /// The device's BARs.
    pub bars: Vec<BarInfo>,
    /// All checks in order.
    pub checks: Vec<Check>,
    /// The last `done` line.
    pub done: Option<Done>,
}

impl ProbeReport {
    /// Parse the `GPUPROBE` lines out of a serial log.
    pub fn parse(serial: &str) -> ProbeReport {
        let mut r = ProbeReport::default();
        for line in serial.lines() {
            let Some(pos) = line.find(PREFIX) else {
                continue;
            };
            let Some(fact) = Fact::parse(&line[pos + PREFIX.len()..]) else {
                continue;
            };
            match fact.kind.as_str() {
                "device" => {
                    r.device = Some(DeviceInfo {
                        bdf: fact.get("bdf").unwrap_or_default().to_string(),
                        vendor: fact.num("vendor").unwrap_or(0) as u16,
                        device: fact.num("device").unwrap_or(0) as u16,
                        class: fact.num("class").unwrap_or(0) as u32,
                    })
                }
                "bar" => r.bars.push(BarInfo {
                    index: fact.num("index").unwrap_or(0) as u8,
                    start: fact.num("start").unwrap_or(0),
                    size: fact.num("size").unwrap_or(0),
                    flags: fact.num("flags").unwrap_or(0),
                    kind: fact.get("kind").unwrap_or_default().to_string(),
                }),
                "check" => {
                    let outcome = match fact.get("result") {
                        Some("pass") => Outcome::Pass,
                        Some("skip") => Outcome::Skip,
                        _ => Outcome::Fail,
                    };
                    r.checks.push(Check {
                        name: fact.get("name").unwrap_or("?").to_string(),
                        outcome,
                        detail: fact.get("detail").unwrap_or_default().to_string(),
                    });
                }
                "done" => {
                    r.done = Some(Done {
                        pass: fact.num("pass").unwrap_or(0) as u32,
                        fail: fact.num("fail").unwrap_or(0) as u32,
                        skip: fact.num("skip").unwrap_or(0) as u32,
                    })
                }
                _ => {}
            }
            r.facts.push(fact);
        }
        r
    }

    /// True if the probe printed its `done` line.
    pub fn is_complete(&self) -> bool {
        self.done.is_some()
    }

    /// The first check called `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// All failed checks.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .collect()
    }

    /// True if the probe finished, reported no failure, and its counts match the check lines.
    pub fn all_passed(&self) -> bool {
        let Some(done) = self.done else {
            return false;
        };
        done.fail == 0
            && self.failures().is_empty()
            && done.pass as usize == self.count(Outcome::Pass)
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    /// All facts of kind `kind`.
    pub fn facts_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Fact> + 'a {
        self.facts.iter().filter(move |f| f.kind == kind)
    }

    /// A human-readable summary (device, BARs, registers, checks, totals) for demos and logs.
    pub fn summary_table(&self) -> String {
        let mut s = String::new();
        match &self.device {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "device {}  {:04x}:{:04x}  class {:06x}",
                    d.bdf, d.vendor, d.device, d.class
                );
            }
            None => s.push_str("device: not found\n"),
        }
        if !self.bars.is_empty() {
            let _ = writeln!(
                s,
                "  {:<4} {:<20} {:>12}  {:<5} flags",
                "BAR", "start", "size", "kind"
            );
            for b in &self.bars {
                let _ = writeln!(
                    s,
                    "  {:<4} {:<#20x} {:>12}  {:<5} {:#x}",
                    b.index,
                    b.start,
                    human_size(b.size),
                    b.kind,
                    b.flags
                );
            }
        }
        for f in self
            .facts_of("reg")
            .chain(self.facts_of("perf"))
            .chain(self.facts_of("note"))
        {
            let fields: Vec<String> = f.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  {}: {}", f.kind, fields.join(" "));
        }
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(s, "  {:<width$}  result  detail", "check");
        for c in &self.checks {
            let result = match c.outcome {
                Outcome::Pass => "pass",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            let _ = writeln!(s, "  {:<width$}  {result:<6}  {}", c.name, c.detail);
        }
        match self.done {
            Some(d) => {
                let _ = writeln!(
                    s,
                    "  total: {} pass, {} fail, {} skip",
                    d.pass, d.fail, d.skip
                );
            }
            None => s.push_str("  total: probe did not finish\n"),
        }
        s
    }
}

/// `137438953472` -> `128 GiB`; exact multiples only, else bytes.
pub fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    1.0] random kernel line\r
GPUPROBE start probe=0.1.0 pid=1\r
GPUPROBE device bdf=0000:00:05.0 vendor=0x10de device=0x2342 class=0x030200\r
GPUPROBE bar index=4 start=0xc000000000 size=137438953472 flags=0x14220c kind=mem mem64=1 prefetch=1\r
GPUPROBE check name=device_found result=pass detail=bdf=0000:00:05.0 functions_with_vendor=1\r
[    2.0] noise GPUPROBE check name=vram_pad_read_devmem result=fail detail=off=0x10:got=0x0 want=0xffffffff\r
GPUPROBE check name=class result=skip\r
GPUPROBE done pass=1 fail=1 skip=1\r
";

    #[test]
    fn parses_lines() {
        let r = ProbeReport::parse(LOG);
        let d = r.device.as_ref().unwrap();
        assert_eq!((d.vendor, d.device, d.class), (0x10de, 0x2342, 0x030200));
        assert_eq!(r.bars[0].size, 128 << 30);
        assert_eq!(r.checks.len(), 3);
        assert_eq!(
            r.check("device_found").unwrap().detail,
            "bdf=0000:00:05.0 functions_with_vendor=1"
        );
        assert_eq!(r.failures()[0].name, "vram_pad_read_devmem");
        assert_eq!(r.check("class").unwrap().outcome, Outcome::Skip);
        assert_eq!(
            r.done,
            Some(Done {
                pass: 1,
                fail: 1,
                skip: 1
            })
        );
        assert!(r.is_complete() && !r.all_passed());
        assert!(r.summary_table().contains("128 GiB"));
    }
}
