//! End-to-end harness for `gpu-backend`: boots a QEMU guest (TCG, q35) whose init runs the
//! static `gpu-guest-probe`, optionally with the backend attached as a `vfio-user-pci` device,
//! and parses the probe's `GPUPROBE` lines into a [`ProbeReport`].
//!
//! ```no_run
//! use guest_tests::{boot_guest_with_backend, ProfileLayout};
//! // Expectations (ids, BOOT_0, BAR sizes, real VRAM size) from `gpu-backend inspect --json`.
//! let args = ProfileLayout::inspect("gh200-96g")?.probe_args();
//! let report = boot_guest_with_backend("gh200-96g", &args)?;
//! assert!(report.all_passed(), "{}", report.summary_table());
//! # Ok::<(), guest_tests::HarnessError>(())
//! ```
//!
//! Modules: [`qemu`] (install via `qemu-configs/install.sh`, argv, run with timeout),
//! [`initramfs`] (newc cpio + gzip), [`artifacts`] (building the probe and the backend),
//! [`backend`] (the `serve` process), [`expect`] (what a profile should look like, from
//! `gpu-backend inspect --json`), [`slices`] (a sliced GPU's partition), [`guest`] (the boot
//! API), [`probe_args`] and [`report`]; for slice isolation: [`host_vram`] (the backend's VRAM
//! memfd from the host), [`isolation`] (canaries and host-side checks) and [`pattern`] (the
//! probe's VRAM patterns); for displays: [`display`] (boot a guest with a display, screenshot
//! and compare), [`display_image`] (its `/init` and image), [`fb_pattern`] (the picture it
//! draws), [`frame_rate`] (the frame rate a guest gets writing its framebuffer), [`vm`] (a
//! QEMU the host acts on while it runs), [`qmp`], [`ppm`] and
//! [`screenshot`] (PPM in, PNG out), [`vram_search`] (a guest's pixels anywhere in host VRAM);
//! for guests added and removed while the backend runs: [`control`] (`gpu-backend ctl`),
//! [`live`] (a probe guest the host acts on while it runs) and [`soak`] (the probe's soak,
//! checked in host VRAM);
//! for the programs: [`demo`] (the tables of `gpu-demo`), [`bench`](mod@bench), [`bench_table`],
//! [`pingpong`], [`stats`] and [`affinity`] (the guest benchmarks of `gpu-guest-bench`).

pub mod affinity;
pub mod artifacts;
pub mod backend;
pub mod bench;
pub mod bench_table;
pub mod control;
pub mod demo;
pub mod display;
pub mod display_image;
pub mod error;
pub mod expect;
pub mod fb_pattern;
pub mod frame_rate;
pub mod guest;
pub mod guest_script;
pub mod host_vram;
pub mod initramfs;
pub mod isolation;
pub mod live;
pub mod nested;
pub mod nested_checks;
pub mod paths;
pub mod pattern;
pub mod pingpong;
pub mod ppm;
pub mod probe_args;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod screenshot;
pub mod slices;
pub mod soak;
pub mod stats;
pub mod vfio_report;
pub mod vm;
pub mod vram_search;

pub use backend::Backend;
pub use error::{HarnessError, Result};
pub use expect::ProfileLayout;
pub use guest::{
    boot_guest, boot_guest_with_backend, boot_guest_without_device, with_backend, with_backend_bin,
    with_display_backend, with_sliced_backend, with_sliced_display_backend, GuestOptions, GuestRun,
};
pub use host_vram::HostVram;
pub use probe_args::ProbeArgs;
pub use qemu::QemuLab;
pub use report::{Check, Outcome, ProbeReport};
pub use slices::{GuestSlice, SlicedLayout};
