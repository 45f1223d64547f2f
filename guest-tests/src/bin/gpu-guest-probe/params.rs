//! Probe parameters, read from `gpuprobe.<key>=<value>` words of the kernel command line
//! (`/proc/cmdline`; the kernel does not pass dotted parameters to init).
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `vendor` | PCI vendor id to look for | `0x10de` |
//! | `device` | expected PCI device id (also narrows the search) | any |
//! | `class` | expected 24-bit class code | not checked |
//! | `boot0` | expected 32-bit value of BAR`boot0_bar` offset 0 (NV_PMC_BOOT_0) | not checked |
//! | `boot0_bar` | BAR index of the register BAR | `0` |
//! | `barN_size` | expected size in bytes of BAR N | not checked |
//! | `vram_bar` | BAR index of the VRAM aperture | VRAM checks skipped |
//! | `vram_real` | bytes of real memory at the start of the VRAM BAR; the rest is padding | BAR size |
//! | `persist` | `write` or `check` a seed-derived pattern (persistence across guests) | off |
//! | `persist_offset` | VRAM BAR offset of the pattern | `0x10000` |
//! | `persist_len` | pattern length in bytes (multiple of 4) | `4096` |
//! | `persist_seed` | pattern seed | `1` |
//! | `timeout` | watchdog, seconds | `120` |
//! | `shell` | `1`: `/init` starts a shell after the probe instead of powering off | off |
//! | `hotplug` | `1`: `/init` waits for the GPU to be hot-plugged, runs the probe, waits for it to go | off |
//! | `bench` | `1`: after the checks, run the benchmarks (see `bench`) | off |
//! | `bench_n` | timed accesses per latency benchmark | `2000` |
//! | `bench_warmup` | untimed accesses before each latency benchmark | `200` |
//! | `bench_mib` | MiB read/written by the bandwidth benchmarks (`0`: skip) | `64` |
//! | `bench_memcpy_mib` | MiB copied by the `memcpy` bandwidth benchmarks (`0`: skip) | `0` |
//! | `bench_reg` | BAR`boot0_bar` offset of a register safe to rewrite (posted writes) | skipped |
//! | `bench_edu` | `1`: also measure QEMU's `edu` device (1234:11e8) as a baseline | `1` |
//! | `bench_aperture_kib` | KiB read through the PRAMIN aperture per window position (`0`: skip) | `64` |
//! | `bench_aperture_windows` | window positions (1 MiB apart) per aperture pass | `16` |
//! | `bench_aperture_reps` | aperture passes (the best is reported) | `2` |
//! | `window` | `1`: run the BAR0 window / PRAMIN aperture checks (see `window`) | off |
//! | `window_reg` | BAR`boot0_bar` offset of the window register (`0x1700`, `0x10fd40`) | none |
//! | `window_mask` | the register's defined bits (what an all-ones write reads back as) | none |
//! | `window_target` | `1`: the register has the TARGET field 25:24 (Turing–Ada) | `0` |
//! | `slice_size` | bytes of VRAM the guest owns (the window's reach) | none |
//! | `vram_map` | which BAR shows which guest VRAM: `BAR:OFFSET:LEN[,BAR:OFFSET:LEN...]` | `vram_bar` at 0 |
//! | `window_seed` | seed of the patterns the window checks write | `0x77696e` |
//! | `soak` | `1`: after the checks, the soak (see `soak`): write rounds, then verify rounds | off |
//! | `soak_seed` | seed of the soak's patterns | `0x50a4` |
//! | `soak_write_s` | seconds of write rounds (at least one round) | `5` |
//! | `soak_verify` | verify rounds after the write rounds (`0`: until the device is lost) | `0` |
//! | `soak_pause_ms` | pause between two verify rounds | `200` |
//!
//! Numbers are decimal or `0x` hexadecimal; sizes also accept `K`, `M`, `G`, `T` suffixes (binary).

use std::collections::BTreeMap;

/// What a persistence run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persist {
    /// Write the pattern.
    Write,
    /// Verify a pattern written by an earlier guest.
    Check,
}

/// Parsed probe parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Vendor id to look for.
    pub vendor: u16,
    /// Expected device id.
    pub device: Option<u16>,
    /// Expected class code.
    pub class: Option<u32>,
    /// Expected BOOT_0 value.
    pub boot0: Option<u32>,
    /// BAR holding BOOT_0.
    pub boot0_bar: usize,
    /// Expected BAR sizes by index.
    pub bar_sizes: BTreeMap<usize, u64>,
    /// VRAM BAR index.
    pub vram_bar: Option<usize>,
    /// Real VRAM bytes.
    pub vram_real: Option<u64>,
    /// Persistence mode.
    pub persist: Option<Persist>,
    /// Persistence pattern offset.
    pub persist_offset: u64,
    /// Persistence pattern length.
    pub persist_len: u64,
    /// Persistence pattern seed.
    pub persist_seed: u64,
    /// Watchdog seconds.
    pub timeout: u32,
    /// Run the benchmarks.
    pub bench: bool,
    /// Timed accesses per latency benchmark.
    pub bench_n: u32,
    /// Untimed warm-up accesses per latency benchmark.
    pub bench_warmup: u32,
    /// MiB for the sequential bandwidth benchmarks (0: skip).
    pub bench_mib: u64,
    /// MiB for the memcpy bandwidth benchmarks (0: skip).
    pub bench_memcpy_mib: u64,
    /// Register offset for the posted-write benchmark.
    pub bench_reg: Option<u64>,
    /// Measure the `edu` device too.
    pub bench_edu: bool,
    /// KiB read through the aperture per window position (0: skip the aperture benchmark).
    pub bench_aperture_kib: u64,
    /// Window positions per aperture pass.
    pub bench_aperture_windows: u64,
    /// Aperture passes.
    pub bench_aperture_reps: u64,
    /// Run the window checks.
    pub window: bool,
    /// BAR0 offset of the window register.
    pub window_reg: Option<u64>,
    /// Defined bits of the window register.
    pub window_mask: Option<u32>,
    /// The window register has a TARGET field.
    pub window_target: bool,
    /// Bytes of VRAM the guest owns.
    pub slice_size: Option<u64>,
    /// Guest VRAM ranges and the BARs showing them: (BAR index, guest VRAM offset, length).
    pub vram_map: Vec<(usize, u64, u64)>,
    /// Seed of the window checks' patterns.
    pub window_seed: u64,
    /// Run the soak.
    pub soak: bool,
    /// Seed of the soak's patterns.
    pub soak_seed: u64,
    /// Seconds of soak write rounds.
    pub soak_write_s: u64,
    /// Soak verify rounds (0: until the device is lost).
    pub soak_verify: u64,
    /// Pause between two soak verify rounds, in ms.
    pub soak_pause_ms: u64,
    /// Parameters that could not be understood (reported as a failed check).
    pub errors: Vec<String>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            vendor: 0x10de,
            device: None,
            class: None,
            boot0: None,
            boot0_bar: 0,
            bar_sizes: BTreeMap::new(),
            vram_bar: None,
            vram_real: None,
            persist: None,
            persist_offset: 0x10000,
            persist_len: 4096,
            persist_seed: 1,
            timeout: 120,
            bench: false,
            bench_n: 2000,
            bench_warmup: 200,
            bench_mib: 64,
            bench_memcpy_mib: 0,
            bench_reg: None,
            bench_edu: true,
            bench_aperture_kib: 64,
            bench_aperture_windows: 16,
            bench_aperture_reps: 2,
            window: false,
            window_reg: None,
            window_mask: None,
            window_target: false,
            slice_size: None,
            vram_map: Vec::new(),
            window_seed: 0x77_696e,
            soak: false,
            soak_seed: 0x50a4,
            soak_write_s: 5,
            soak_verify: 0,
            soak_pause_ms: 200,
            errors: Vec::new(),
        }
    }
}

/// Parse a decimal or `0x` number with an optional binary size suffix.
pub fn parse_num(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let v = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    v.checked_mul(1u64 << shift)
}

impl Params {
    /// Parse the words of a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Params {
        let mut p = Params::default();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("gpuprobe.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            if let Err(e) = p.set(key, value) {
                p.errors.push(format!("{word}: {e}"));
            }
        }
        p
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), &'static str> {
        let num = || parse_num(value).ok_or("not a number");
        let narrow = |v: u64, max: u64| if v <= max { Ok(v) } else { Err("out of range") };
        match key {
            "vendor" => self.vendor = narrow(num()?, 0xffff)? as u16,
            "device" => self.device = Some(narrow(num()?, 0xffff)? as u16),
            "class" => self.class = Some(narrow(num()?, 0xff_ffff)? as u32),
            "boot0" => self.boot0 = Some(narrow(num()?, 0xffff_ffff)? as u32),
            "boot0_bar" => self.boot0_bar = narrow(num()?, 5)? as usize,
            "vram_bar" => self.vram_bar = Some(narrow(num()?, 5)? as usize),
            "vram_real" => self.vram_real = Some(num()?),
            "persist" => {
                self.persist = match value {
                    "write" => Some(Persist::Write),
                    "check" => Some(Persist::Check),
                    "off" | "" => None,
                    _ => return Err("expected write or check"),
                }
            }
            "persist_offset" => self.persist_offset = num()?,
            "persist_len" => {
                let len = num()?;
                if len == 0 || len % 4 != 0 || len > 1 << 20 {
                    return Err("must be a non-zero multiple of 4, at most 1M");
                }
                self.persist_len = len;
            }
            "persist_seed" => self.persist_seed = num()?,
            "timeout" => self.timeout = narrow(num()?, 86_400)?.max(1) as u32,
            "bench" => self.bench = narrow(num()?, 1)? == 1,
            "bench_n" => self.bench_n = narrow(num()?, 10_000_000)?.max(1) as u32,
            "bench_warmup" => self.bench_warmup = narrow(num()?, 10_000_000)? as u32,
            "bench_mib" => self.bench_mib = narrow(num()?, 1024)?,
            "bench_memcpy_mib" => self.bench_memcpy_mib = narrow(num()?, 1024)?,
            "bench_reg" => self.bench_reg = Some(narrow(num()?, 0xff_fffc)?),
            "bench_edu" => self.bench_edu = narrow(num()?, 1)? == 1,
            "bench_aperture_kib" => self.bench_aperture_kib = narrow(num()?, 1024)?,
            "bench_aperture_windows" => self.bench_aperture_windows = narrow(num()?, 1024)?,
            "bench_aperture_reps" => self.bench_aperture_reps = narrow(num()?, 100)?.max(1),
            "window" => self.window = narrow(num()?, 1)? == 1,
            "window_reg" => self.window_reg = Some(narrow(num()?, 0xff_fffc)?),
            "window_mask" => self.window_mask = Some(narrow(num()?, 0xffff_ffff)? as u32),
            "window_target" => self.window_target = narrow(num()?, 1)? == 1,
            "slice_size" => self.slice_size = Some(num()?),
            "vram_map" => self.vram_map = parse_vram_map(value)?,
            "window_seed" => self.window_seed = num()?,
            "soak" => self.soak = narrow(num()?, 1)? == 1,
            "soak_seed" => self.soak_seed = num()?,
            "soak_write_s" => self.soak_write_s = narrow(num()?, 3600)?,
            "soak_verify" => self.soak_verify = narrow(num()?, 1_000_000)?,
            "soak_pause_ms" => self.soak_pause_ms = narrow(num()?, 60_000)?,
            // Read by /init (a shell after the probe; waiting for a hot-plugged GPU), not by
            // the probe.
            "shell" | "hotplug" => {}
            _ => {
                let idx = key
                    .strip_prefix("bar")
                    .and_then(|k| k.strip_suffix("_size"))
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|i| *i <= 5)
                    .ok_or("unknown parameter")?;
                self.bar_sizes.insert(idx, num()?);
            }
        }
        Ok(())
    }
}

/// The persistence pattern: `len / 4` little-endian words from a splitmix64 sequence of `seed`
/// (shared with the host harness, see `pattern`).
pub use crate::pattern::pattern_word;

/// Parse `BAR:OFFSET:LEN[,BAR:OFFSET:LEN...]` (guest VRAM `[OFFSET, OFFSET + LEN)` is BAR `BAR`
/// from its offset 0).
pub fn parse_vram_map(value: &str) -> Result<Vec<(usize, u64, u64)>, &'static str> {
    const BAD: &str = "expected BAR:OFFSET:LEN[,BAR:OFFSET:LEN...]";
    value
        .split(',')
        .map(|entry| {
            let mut it = entry.split(':');
            let (Some(bar), Some(off), Some(len), None) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(BAD);
            };
            let bar = parse_num(bar).filter(|b| *b <= 5).ok_or(BAD)? as usize;
            let (off, len) = (parse_num(off).ok_or(BAD)?, parse_num(len).ok_or(BAD)?);
            if len == 0 || off.checked_add(len).is_none() {
                return Err("empty or overflowing VRAM range");
            }
            Ok((bar, off, len))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_command_line() {
        let p = Params::from_cmdline(
            "console=ttyS0 quiet gpuprobe.device=0x2342 gpuprobe.vram_bar=4 gpuprobe.vram_real=95G \
             gpuprobe.bar0_size=16M gpuprobe.persist=check gpuprobe.persist_seed=7 gpuprobe.bogus=1 \
             gpuprobe.vendor=0x12345",
        );
        assert_eq!(p.device, Some(0x2342));
        assert_eq!(p.vram_bar, Some(4));
        assert_eq!(p.vram_real, Some(95 << 30));
        assert_eq!(p.bar_sizes.get(&0), Some(&(16 << 20)));
        assert_eq!(p.persist, Some(Persist::Check));
        assert_eq!(p.persist_seed, 7);
        assert_eq!(p.vendor, 0x10de, "out-of-range vendor rejected");
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(!p.bench);
        let b =
            Params::from_cmdline("gpuprobe.bench=1 gpuprobe.bench_n=500 gpuprobe.bench_reg=0x1700");
        assert!(b.bench && b.bench_edu);
        assert_eq!(
            (b.bench_n, b.bench_reg, b.bench_mib),
            (500, Some(0x1700), 64)
        );
    }

    #[test]
    fn window_parameters() {
        let p = Params::from_cmdline(
            "gpuprobe.window=1 gpuprobe.window_reg=0x1700 gpuprobe.window_mask=0x3ffffff \
             gpuprobe.window_target=1 gpuprobe.slice_size=64M gpuprobe.vram_map=4:0:95G,2:95G:1G",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(p.window && p.window_target);
        assert_eq!(
            (p.window_reg, p.window_mask, p.slice_size),
            (Some(0x1700), Some(0x3ff_ffff), Some(64 << 20))
        );
        assert_eq!(p.vram_map, [(4, 0, 95 << 30), (2, 95 << 30, 1 << 30)]);
        for bad in ["4:0", "9:0:1M", "1:0:0", "1:x:1", "1:0:1:2"] {
            assert!(parse_vram_map(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn soak_parameters() {
        let p = Params::from_cmdline(
            "gpuprobe.soak=1 gpuprobe.soak_seed=0xab gpuprobe.soak_write_s=3 \
             gpuprobe.soak_verify=7 gpuprobe.soak_pause_ms=50",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(p.soak);
        assert_eq!(
            (p.soak_seed, p.soak_write_s, p.soak_verify, p.soak_pause_ms),
            (0xab, 3, 7, 50)
        );
        let d = Params::from_cmdline("");
        assert!(!d.soak);
        assert_eq!((d.soak_write_s, d.soak_verify), (5, 0));
        let bad = Params::from_cmdline("gpuprobe.soak=2 gpuprobe.soak_pause_ms=99999999");
        assert_eq!(bad.errors.len(), 2, "{:?}", bad.errors);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_num("0x10"), Some(16));
        assert_eq!(parse_num("128G"), Some(128 << 30));
        assert_eq!(parse_num("1T"), Some(1 << 40));
        assert_eq!(parse_num("x"), None);
        assert_eq!(parse_num("99999999999T"), None);
    }

    #[test]
    fn pattern_depends_on_seed_and_index() {
        assert_eq!(pattern_word(1, 0), pattern_word(1, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(1, 1));
    }
}
