//! [`boot_and_report`]: boot the GSP and describe what it reported, for `gpu-backend
//! inspect` (table via `Display`, JSON via `serde`).

use std::fmt;

use super::boot::{boot, BootError};
use super::client::{ClientStats, GspTimeouts};
use super::cmdq::QueueStats;
use super::rpc::{FbRegionKind, InternalHandles};
use crate::host_gpu::HostGpu;
use crate::units::human_size;

/// The RPC numbering the host driver uses.
pub const RPC_NUMBERING: &str = "r570";

/// One framebuffer region as reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FbRegionReport {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Bytes.
    pub size: u64,
    /// Purpose.
    pub kind: FbRegionKind,
    /// Not accessible to the CPU.
    pub protected: bool,
}

/// What the GSP reported at boot. Sizes and addresses in bytes; no timings, so the JSON is
/// stable for a given profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GspReport {
    /// The chip (profile name for the emulated GPU).
    pub chip: String,
    /// RPC function/event numbering spoken ("r570").
    pub rpc_numbering: &'static str,
    /// Framebuffer bytes the GSP reports.
    pub fb_size: u64,
    /// Bytes of usable VRAM (sum of the usable regions).
    pub usable_vram: u64,
    /// Bytes of reserved ranges (board carve-outs and firmware).
    pub reserved: u64,
    /// The framebuffer regions, in address order.
    pub fb_regions: Vec<FbRegionReport>,
    /// Internal RM handles.
    pub internal_handles: InternalHandles,
    /// Events received up to and including GSP_INIT_DONE, by name.
    pub boot_events: Vec<String>,
    /// Queue counters after boot.
    pub queue: QueueStats,
    /// Client counters after boot.
    pub client: ClientStats,
}

/// Boots the GSP of `host` (default timeouts) and reports what it said. The GSP is
/// stopped again before this returns (the session ends).
pub fn boot_and_report(host: &dyn HostGpu) -> Result<GspReport, BootError> {
    let session = boot(host, GspTimeouts::default())?;
    let info = session.static_info();
    let fb_regions = info
        .fb_regions
        .iter()
        .map(|r| FbRegionReport {
            start: r.start.raw(),
            end: r.end.raw(),
            size: r.size(),
            kind: r.kind,
            protected: r.protected,
        })
        .collect();
    Ok(GspReport {
        chip: host.identity().name.clone(),
        rpc_numbering: RPC_NUMBERING,
        fb_size: info.fb_size,
        usable_vram: info.usable_bytes(),
        reserved: info.reserved_regions().map(|r| r.size()).sum(),
        fb_regions,
        internal_handles: info.handles,
        boot_events: session
            .boot_trace()
            .events
            .iter()
            .map(|e| e.function.name().to_owned())
            .collect(),
        queue: session.client().cmdq().stats(),
        client: session.client().stats(),
    })
}

impl fmt::Display for GspReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "GSP ({}, {} numbering): usable VRAM {} ({} bytes), reserved {}, framebuffer {}",
            self.chip,
            self.rpc_numbering,
            human_size(self.usable_vram),
            self.usable_vram,
            human_size(self.reserved),
            human_size(self.fb_size)
        )?;
        writeln!(
            f,
            "{:<16} {:<20} {:>12}  protected",
            "kind", "range", "size"
        )?;
        for r in &self.fb_regions {
            let kind = match r.kind {
                FbRegionKind::Usable => "usable",
                FbRegionKind::BoardReserved => "board-reserved",
                FbRegionKind::Firmware => "firmware",
            };
            writeln!(
                f,
                "{:<16} {:<20} {:>12}  {}",
                kind,
                format!("[{:#x}, {:#x})", r.start, r.end),
                human_size(r.size),
                if r.protected { "yes" } else { "no" }
            )?;
        }
        write!(f, "boot events: {}", self.boot_events.join(", "))
    }
}
