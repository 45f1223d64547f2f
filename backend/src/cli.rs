//! The command line behind the `gpu-backend` binary: argument parsing and dispatch.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gpu_emulation::{ChipProfile, ProfileError};
use thiserror::Error;

use crate::gsp::{self, BootError, GspReport};
use crate::host_gpu::emulated::{EmulatedHostGpu, EmulatedHostGpuError};
use crate::inspect::{self, GuestLayout, PartitionLayout, SlicedLayout};
use crate::presentation::{FunctionLayout, PresentationError, PresentedFunction};
use crate::serve::{present_guests, serve, serve_functions, ServeError, ServeOptions};
use crate::slice::{parse_slice_size, GuestSpec, SpecError};
use crate::vfio_user::ServerConfig;

/// Errors of the command line.
#[derive(Debug, Error)]
pub enum CliError {
    /// The profile name is not one of the built-in ones.
    #[error(transparent)]
    UnknownProfile(#[from] ProfileError),
    /// The emulated GPU could not be brought up.
    #[error("cannot bring up the emulated GPU: {0}")]
    EmulatedGpu(#[from] EmulatedHostGpuError),
    /// The GPU cannot be presented to a guest.
    #[error("cannot present the GPU: {0}")]
    Presentation(#[from] PresentationError),
    /// Writing the output failed.
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The GSP did not boot.
    #[error("the GSP did not boot: {0}")]
    Gsp(#[from] BootError),
    /// JSON encoding failed.
    #[error("encoding JSON failed: {0}")]
    Json(#[from] serde_json::Error),
    /// The arguments contradict each other.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// Process exit code: 2 for bad input (usage: unknown profile, guest sizes that do not
    /// fit, duplicate sockets), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::UnknownProfile(_) | CliError::Usage(_) => 2,
            CliError::Serve(e) if e.is_bad_request() => 2,
            _ => 1,
        }
    }
}

fn profile_help() -> String {
    let names: Vec<String> = ChipProfile::all()
        .iter()
        .map(|p| format!("  {:<10} {}", p.name(), p.human_name()))
        .collect();
    format!("Emulated GPU profiles:\n{}", names.join("\n"))
}

/// `gpu-backend`: presents a GPU to a QEMU guest over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "gpu-backend", version, about, after_help = profile_help())]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what a guest would see: the chip identity and every BAR with its real size,
    /// presented (power-of-two) size, padding, mappable areas and trapped ranges.
    ///
    /// With `--guest` or `--slice-size` the GPU is sliced as `serve --guest` would slice it,
    /// and every guest's function is shown with its slice of host VRAM.
    Inspect {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Print JSON (stable field names, sizes in bytes) instead of a table.
        #[arg(long)]
        json: bool,
        /// Slice the GPU: one guest of SIZE per flag, in order (the socket is a label here).
        #[arg(long = "guest", value_name = "SOCKET:SIZE", value_parser = parse_guest)]
        guests: Vec<GuestSpec>,
        /// Slice the GPU: one unnamed guest of SIZE per flag, in order.
        #[arg(long = "slice-size", value_name = "SIZE", value_parser = parse_guest_size, conflicts_with = "guests")]
        slice_sizes: Vec<u64>,
    },
    /// Serve the GPU over vfio-user until SIGTERM or SIGINT: whole to one guest on
    /// `--socket`, or sliced between guests, one `--guest SOCKET:SIZE` each.
    Serve {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Socket path for QEMU's `vfio-user-pci`: one guest owns the whole GPU (a stale
        /// socket file is replaced).
        #[arg(long, required_unless_present = "guests", conflicts_with = "guests")]
        socket: Option<PathBuf>,
        /// A guest with SIZE of VRAM (e.g. 8G, 512M; a multiple of 2 MiB) served on SOCKET.
        /// Repeat for more guests: they get consecutive slices of VRAM, scrubbed first.
        #[arg(long = "guest", value_name = "SOCKET:SIZE", value_parser = parse_guest)]
        guests: Vec<GuestSpec>,
        /// File mode of the socket(s), in octal.
        #[arg(long, default_value = "600", value_parser = parse_mode)]
        socket_mode: u32,
        /// After each message, busy-poll the socket this many microseconds (at most 1000)
        /// before sleeping: a trapped access that follows soon skips the server's wake-up, at
        /// the cost of CPU time. 0 (the default) never spins.
        #[arg(long, default_value = "0", value_parser = clap::value_parser!(u64).range(0..=1000))]
        poll_spin_us: u64,
        /// Whole-GPU mode: offer no VRAM BAR for mmap, so every VRAM access is trapped and
        /// translated by BAR1 as the guest set it up. Needed by a guest that puts BAR1 in
        /// virtual mode (e.g. a nested gpu-backend slicing the GPU); mapped VRAM is physical.
        #[arg(long, conflicts_with = "guests")]
        trap_vram: bool,
    },
}

fn parse_guest(text: &str) -> Result<GuestSpec, SpecError> {
    text.parse()
}

fn parse_guest_size(text: &str) -> Result<u64, SpecError> {
    parse_slice_size(text)
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|e| format!("not an octal file mode: {e}"))?;
    if mode > 0o777 {
        return Err(format!("{mode:o} is not a permission mode (at most 777)"));
    }
    Ok(mode)
}

fn parse_profile(name: &str) -> Result<&'static ChipProfile, ProfileError> {
    ChipProfile::by_name(name)
}

/// An `inspect` report with what the GSP reported after booting, under `gsp`.
#[derive(serde::Serialize)]
struct WithGsp<T: serde::Serialize> {
    #[serde(flatten)]
    layout: T,
    gsp: GspReport,
}

/// Parses the process arguments, runs the command and returns the exit code.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gpu-backend: error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Inspect {
            profile,
            json,
            guests,
            slice_sizes,
        } => {
            let host = Arc::new(EmulatedHostGpu::new(profile)?);
            let gsp = gsp::boot_and_report(host.as_ref())?;
            let mut out = std::io::stdout().lock();
            let mut guests = guests;
            guests.extend(slice_sizes.into_iter().map(GuestSpec::unnamed));
            if guests.is_empty() {
                let function = PresentedFunction::new(host)?;
                let layout = FunctionLayout::of(&function);
                if json {
                    let report = WithGsp { layout, gsp };
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    writeln!(out)?;
                } else {
                    inspect::write_table(&mut out, &layout)?;
                    writeln!(out)?;
                    writeln!(out, "{gsp}")?;
                }
                return Ok(());
            }
            let (gpu, functions) = present_guests(host, &guests)?;
            let layout = SlicedLayout {
                partition: PartitionLayout::of(&gpu),
                guests: guests
                    .iter()
                    .zip(&functions)
                    .map(|(spec, function)| GuestLayout {
                        socket: spec.socket.as_ref().map(|s| s.display().to_string()),
                        function: FunctionLayout::of(function),
                    })
                    .collect(),
            };
            if json {
                let report = WithGsp { layout, gsp };
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                inspect::write_sliced_table(&mut out, &layout)?;
                writeln!(out)?;
                writeln!(out, "{gsp}")?;
            }
            Ok(())
        }
        Command::Serve {
            profile,
            socket,
            guests,
            socket_mode,
            poll_spin_us,
            trap_vram,
        } => {
            let server_config = ServerConfig {
                poll_spin: Duration::from_micros(poll_spin_us),
                ..ServerConfig::default()
            };
            let host = Arc::new(EmulatedHostGpu::new(profile)?);
            if guests.is_empty() {
                let socket = socket.ok_or_else(|| {
                    CliError::Usage("serve needs --socket or at least one --guest".to_owned())
                })?;
                serve(
                    host,
                    &ServeOptions {
                        socket,
                        socket_mode,
                        server_config,
                        trap_vram,
                    },
                )?;
                return Ok(());
            }
            let (_gpu, functions) = present_guests(host, &guests)?;
            let served = guests
                .iter()
                .zip(functions)
                .enumerate()
                .map(|(i, (spec, function))| {
                    spec.socket
                        .clone()
                        .map(|socket| (socket, function))
                        .ok_or(ServeError::NoSocket(i))
                })
                .collect::<Result<Vec<_>, _>>()?;
            serve_functions(served, socket_mode, server_config)?;
            Ok(())
        }
    }
}
