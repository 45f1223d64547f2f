//! The command line behind the `gpu-backend` binary: argument parsing and dispatch.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use gpu_emulation::{ChipProfile, ProfileError};
use thiserror::Error;

use crate::host_gpu::emulated::{EmulatedHostGpu, EmulatedHostGpuError};
use crate::inspect;
use crate::presentation::{FunctionLayout, PresentationError, PresentedFunction};
use crate::serve::{serve, ServeError, ServeOptions};

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
    /// JSON encoding failed.
    #[error("encoding JSON failed: {0}")]
    Json(#[from] serde_json::Error),
}

impl CliError {
    /// Process exit code: 2 for bad input (usage), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::UnknownProfile(_) => 2,
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
    Inspect {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Print JSON (stable field names, sizes in bytes) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the GPU over vfio-user on a unix socket until SIGTERM or SIGINT.
    Serve {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Socket path for QEMU's `vfio-user-pci` (a stale socket file is replaced).
        #[arg(long)]
        socket: PathBuf,
        /// File mode of the socket, in octal.
        #[arg(long, default_value = "600", value_parser = parse_mode)]
        socket_mode: u32,
    },
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
        Command::Inspect { profile, json } => {
            let host = Arc::new(EmulatedHostGpu::new(profile)?);
            let function = PresentedFunction::new(host)?;
            let layout = FunctionLayout::of(&function);
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &layout)?;
                writeln!(out)?;
            } else {
                inspect::write_table(&mut out, &layout)?;
            }
            Ok(())
        }
        Command::Serve {
            profile,
            socket,
            socket_mode,
        } => {
            let host = Arc::new(EmulatedHostGpu::new(profile)?);
            serve(
                host,
                &ServeOptions {
                    socket,
                    socket_mode,
                },
            )?;
            Ok(())
        }
    }
}
