//! `gpu-guest-vfio-client`: connects to a `gpu-backend serve ... --guest SOCKET:SIZE` socket
//! (run inside the nested VFIO guest, where the backend drives the GPU through the guest
//! kernel's vfio-pci), runs the sliced-guest checks of [`checks`] and prints a
//! [`ClientReport`](guest_tests::vfio_report::ClientReport) (one JSON line between
//! `GPU-VFIO-CLIENT-REPORT-BEGIN` and `...-END`) with every write it made and every check.
//! Progress goes to stderr. Exit status: 0 all checks passed, 1 a check failed, 2 the device
//! could not be reached.
//!
//! Built static for the guest like the probe:
//!
//! ```text
//! cargo rustc --release -p guest-tests --bin gpu-guest-vfio-client --target x86_64-unknown-linux-gnu \
//!     --target-dir target/guest-static -- -C target-feature=+crt-static
//! ```

mod checks;
mod device;
mod window;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gpu_backend::slice::parse_slice_size;
use guest_tests::vfio_report::{ClientCheck, ClientReport};

/// Sliced-guest checks over vfio-user, with a machine-readable report.
#[derive(Debug, Parser)]
#[command(name = "gpu-guest-vfio-client")]
struct Args {
    /// The guest's vfio-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// The guest's VRAM size, as given to `serve --guest SOCKET:SIZE` (e.g. 64M).
    #[arg(long, value_parser = parse_size)]
    vram_size: u64,
    /// Region index of the VRAM BAR (default: the first region after BAR0 at least
    /// `--vram-size` large).
    #[arg(long)]
    vram_bar: Option<u32>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    parse_slice_size(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (report, code) = match device::Device::connect(&args.socket) {
        Ok(mut dev) => {
            let report = checks::run(&mut dev, args.vram_size, args.vram_bar);
            let code = if report.failures().is_empty() { 0 } else { 1 };
            (report, code)
        }
        Err(e) => {
            eprintln!("gpu-guest-vfio-client: {e}");
            let report = ClientReport {
                vram_size: args.vram_size,
                checks: vec![ClientCheck {
                    name: "connect".into(),
                    passed: false,
                    detail: e.to_string(),
                }],
                ..Default::default()
            };
            (report, 2)
        }
    };
    eprintln!(
        "gpu-guest-vfio-client: {} checks, {} failed, {} writes",
        report.checks.len(),
        report.failures().len(),
        report.writes.len()
    );
    print!("{}", report.framed());
    ExitCode::from(code)
}
