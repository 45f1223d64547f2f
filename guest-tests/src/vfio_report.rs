//! The reports of the nested VFIO guest programs, shared by the programs (which print them) and
//! the host harness (which parses them from the captured stdout): `gpu-guest-vfio-client`'s
//! [`ClientReport`] (every write it made and every check) and `gpu-guest-vfio-bench`'s
//! [`BenchReport`] (register read cost through the VFIO BAR0 mmap and through `pread`).
//!
//! Each report is one line of JSON between a begin and an end marker line, so it can be found
//! in output that also holds log lines.

use serde::{Deserialize, Serialize};

/// Line before the client's JSON report.
pub const CLIENT_BEGIN: &str = "GPU-VFIO-CLIENT-REPORT-BEGIN";
/// Line after the client's JSON report.
pub const CLIENT_END: &str = "GPU-VFIO-CLIENT-REPORT-END";
/// Line before the bench's JSON report.
pub const BENCH_BEGIN: &str = "GPU-VFIO-BENCH-REPORT-BEGIN";
/// Line after the bench's JSON report.
pub const BENCH_END: &str = "GPU-VFIO-BENCH-REPORT-END";

/// Errors of finding and decoding a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The begin marker, the JSON line or the end marker is missing.
    #[error("no `{begin}` / JSON / `{end}` lines in the output")]
    Missing {
        /// Expected begin marker.
        begin: &'static str,
        /// Expected end marker.
        end: &'static str,
    },
    /// The JSON line does not decode.
    #[error("the report does not decode: {0}")]
    Json(#[from] serde_json::Error),
}

/// The JSON line between `begin` and `end` in `text` (the last such report if several).
pub fn between_markers<'a>(
    text: &'a str,
    begin: &'static str,
    end: &'static str,
) -> Result<&'a str, ReportError> {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines
        .windows(3)
        .rev()
        .find(|w| w[0] == begin && w[2] == end)
        .map(|w| w[1])
        .ok_or(ReportError::Missing { begin, end })
}

/// `begin`, the JSON of `value` and `end`, one per line.
fn framed<T: Serialize>(value: &T, begin: &str, end: &str) -> String {
    let json = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    format!("{begin}\n{json}\n{end}\n")
}

/// Through which path a write reached the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteVia {
    /// BAR0's PRAMIN aperture, under the BAR0 window.
    Aperture,
    /// The VRAM BAR.
    VramBar,
}

/// One write the client made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientWrite {
    /// Path.
    pub via: WriteVia,
    /// vfio-user region index (0 = BAR0).
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// Bytes written (a multiple of 4).
    pub len: u64,
    /// Pattern seed: the bytes are `pattern::vram_bytes(seed, vram_offset, len)`.
    pub seed: u64,
    /// The guest VRAM address (offset in the slice) the write is aimed at: window base +
    /// aperture offset, or the VRAM BAR offset.
    pub vram_offset: u64,
    /// Whether the write lies inside the guest's VRAM (false: past its end, to be dropped).
    pub inside: bool,
}

/// One check of the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCheck {
    /// Name, e.g. `window_aperture_rw`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What was checked, or what went wrong.
    pub detail: String,
}

/// One region of the device as the client saw it (`DEVICE_GET_REGION_INFO`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSummary {
    /// Region index.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Whether the server passed an fd to map it.
    pub has_fd: bool,
}

/// What `gpu-guest-vfio-client` did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    /// NV_PMC_BOOT_0 as read through BAR0.
    pub boot0: u32,
    /// Its architecture field (bits 28:24).
    pub architecture: u32,
    /// `Turing`, `Ampere`, `Ada`, `Hopper`, `Blackwell` (empty if unknown).
    pub generation: String,
    /// BAR0 offset of the window register used.
    pub window_register: u64,
    /// The region used as the VRAM BAR, if one was found.
    pub vram_bar: Option<u32>,
    /// The guest's VRAM size (from the command line).
    pub vram_size: u64,
    /// The device's regions.
    pub regions: Vec<RegionSummary>,
    /// Every write, in order.
    pub writes: Vec<ClientWrite>,
    /// Every check, in order.
    pub checks: Vec<ClientCheck>,
}

impl ClientReport {
    /// The checks that failed.
    pub fn failures(&self) -> Vec<&ClientCheck> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&ClientCheck> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The report as printed: marker, JSON line, marker.
    pub fn framed(&self) -> String {
        framed(self, CLIENT_BEGIN, CLIENT_END)
    }

    /// Find and decode the report in a program's output.
    pub fn parse(text: &str) -> Result<ClientReport, ReportError> {
        Ok(serde_json::from_str(between_markers(
            text,
            CLIENT_BEGIN,
            CLIENT_END,
        )?)?)
    }
}

/// How a register was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPath {
    /// A load from the region mmapped from the VFIO device fd.
    Mmap,
    /// `pread` on the VFIO device fd at the region's offset (the kernel does the access).
    Pread,
}

/// One timed read loop of the bench.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchFigure {
    /// What was read, e.g. `bar0_boot0`.
    pub name: String,
    /// How.
    pub path: ReadPath,
    /// VFIO region index.
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// Reads timed.
    pub iterations: u64,
    /// Mean time per read in nanoseconds.
    pub mean_ns: f64,
    /// Fastest read in nanoseconds.
    pub min_ns: u64,
    /// Slowest read in nanoseconds.
    pub max_ns: u64,
    /// The value the first read returned.
    pub value: u32,
}

/// What `gpu-guest-vfio-bench` measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The device's PCI address.
    pub device: String,
    /// Its IOMMU group.
    pub group: u32,
    /// BAR0's size as VFIO reports it.
    pub bar0_size: u64,
    /// The timed loops.
    pub figures: Vec<BenchFigure>,
}

impl BenchReport {
    /// The figure of `name` read through `path`.
    pub fn figure(&self, name: &str, path: ReadPath) -> Option<&BenchFigure> {
        self.figures
            .iter()
            .find(|f| f.name == name && f.path == path)
    }

    /// The report as printed: marker, JSON line, marker.
    pub fn framed(&self) -> String {
        framed(self, BENCH_BEGIN, BENCH_END)
    }

    /// Find and decode the report in a program's output.
    pub fn parse(text: &str) -> Result<BenchReport, ReportError> {
        Ok(serde_json::from_str(between_markers(
            text,
            BENCH_BEGIN,
            BENCH_END,
        )?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_report_round_trips_through_log_noise() {
        let report = ClientReport {
            boot0: 0x1620_00a1,
            architecture: 0x16,
            generation: "Turing".into(),
            window_register: 0x1700,
            vram_bar: Some(1),
            vram_size: 64 << 20,
            regions: vec![RegionSummary {
                index: 0,
                size: 16 << 20,
                flags: 3,
                has_fd: false,
            }],
            writes: vec![ClientWrite {
                via: WriteVia::Aperture,
                region: 0,
                offset: 0x70_0000,
                len: 1024,
                seed: 7,
                vram_offset: 0x1_0000,
                inside: true,
            }],
            checks: vec![ClientCheck {
                name: "x".into(),
                passed: false,
                detail: "bad".into(),
            }],
        };
        let text = format!("log line\n{}[INFO] more\n", report.framed());
        let back = ClientReport::parse(&text).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.failures().len(), 1);
        assert!(text.contains(r#""via":"aperture""#));
        assert!(matches!(
            ClientReport::parse("nothing"),
            Err(ReportError::Missing { .. })
        ));
        let broken = format!("{CLIENT_BEGIN}\n{{\n{CLIENT_END}\n");
        assert!(matches!(
            ClientReport::parse(&broken),
            Err(ReportError::Json(_))
        ));
    }

    #[test]
    fn bench_report_finds_figures() {
        let mut r = BenchReport {
            device: "0000:00:05.0".into(),
            group: 3,
            ..Default::default()
        };
        r.figures.push(BenchFigure {
            name: "bar0_boot0".into(),
            path: ReadPath::Pread,
            region: 0,
            offset: 0,
            iterations: 10,
            mean_ns: 1.5,
            min_ns: 1,
            max_ns: 2,
            value: 5,
        });
        let back = BenchReport::parse(&r.framed()).unwrap();
        assert_eq!(back, r);
        assert!(back.figure("bar0_boot0", ReadPath::Pread).is_some());
        assert!(back.figure("bar0_boot0", ReadPath::Mmap).is_none());
    }
}
