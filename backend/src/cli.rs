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
use crate::host_gpu::vfio::{DmaBufSupport, VfioHostGpu, VfioHostGpuError};
use crate::host_gpu::HostGpu;
use crate::inspect::{self, GuestLayout, PartitionLayout, SlicedLayout};
use crate::presentation::{
    FunctionLayout, PresentationError, PresentationOptions, PresentedFunction,
};
use crate::serve::{
    present_guests_with, serve, serve_connected, serve_sliced, AllowIds, AllowIdsError,
    ListenOptions, PeerRules, ServeError, ServeOptions,
};
use crate::slice::{parse_slice_size, GuestSpec, HandOut, SpecError};
use crate::state::StateDir;
use crate::vfio_user::{adopt_connected_fd, ServerConfig};

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
    /// A measurement failed.
    #[error(transparent)]
    Measure(#[from] crate::measure::MeasureError),
    /// The GPU given with `--vfio` cannot be driven.
    #[error(transparent)]
    Vfio(#[from] VfioHostGpuError),
    /// The control socket refused the request or could not be reached.
    #[error(transparent)]
    Control(#[from] crate::control::ClientError),
}

impl CliError {
    /// Process exit code: 2 for bad input (usage: unknown profile, guest sizes that do not
    /// fit, duplicate sockets), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::UnknownProfile(_)
            | CliError::Usage(_)
            | CliError::Vfio(_)
            | CliError::Control(_) => 2,
            CliError::Serve(e) if e.is_bad_request() => 2,
            _ if self.is_dma_refused() => 2,
            _ => 1,
        }
    }
}

impl CliError {
    /// Whether the host refused DMA memory somewhere down the chain (RLIMIT_MEMLOCK on
    /// hardware): the user's to fix, like any other bad setup.
    fn is_dma_refused(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if matches!(
                e.downcast_ref::<crate::host_gpu::HostGpuError>(),
                Some(crate::host_gpu::HostGpuError::DmaRefused(_))
            ) {
                return true;
            }
            cause = e.source();
        }
        false
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
        /// Drive the real GPU at this PCI address (DDDD:BB:DD.F), bound to vfio-pci,
        /// instead of an emulated one.
        #[arg(long, value_name = "PCI_ADDRESS", conflicts_with = "profile")]
        vfio: Option<String>,
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
    /// Time the host-driver paths on the GPU: BAR0 register reads (and, over VFIO, the
    /// same reads through pread), a GSP boot, and a page-table build with 4 KiB pages
    /// through PRAMIN. Writes page tables into VRAM and restarts the GSP: only for a GPU
    /// no guest is using.
    Measure {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Measure the real GPU at this PCI address (DDDD:BB:DD.F), bound to vfio-pci.
        #[arg(long, value_name = "PCI_ADDRESS", conflicts_with = "profile")]
        vfio: Option<String>,
        /// Register reads to time (each way).
        #[arg(long, default_value = "10000", value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        reads: u32,
        /// Bytes to map in the page-table build (e.g. 8M; a multiple of 2 MiB).
        #[arg(long, default_value = "8M", value_parser = parse_guest_size)]
        map_size: u64,
        /// Bytes of VRAM to scrub (from address 0), as a guest's slice is scrubbed.
        #[arg(long, default_value = "2M", value_parser = parse_guest_size)]
        scrub_size: u64,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Serve the GPU over vfio-user until SIGTERM or SIGINT: whole to one guest on
    /// `--socket`, or sliced between guests, one `--guest SOCKET:SIZE` each.
    Serve {
        /// Emulated GPU profile.
        #[arg(long, default_value = "gh200-96g", value_parser = parse_profile)]
        profile: &'static ChipProfile,
        /// Serve the real GPU at this PCI address (DDDD:BB:DD.F), bound to vfio-pci,
        /// instead of an emulated one.
        #[arg(long, value_name = "PCI_ADDRESS", conflicts_with = "profile")]
        vfio: Option<String>,
        /// Socket path for QEMU's `vfio-user-pci`: one guest owns the whole GPU (a stale
        /// socket file is replaced).
        #[arg(long, required_unless_present_any = ["guests", "fd", "control", "state"], conflicts_with_all = ["guests", "control"])]
        socket: Option<PathBuf>,
        /// Serve the one client at the other end of fd N, a connected unix stream socket the
        /// launcher passed (e.g. libvirt): the GPU is whole to it, and the process ends when
        /// it leaves.
        #[arg(long, value_name = "N", conflicts_with_all = ["socket", "guests"])]
        fd: Option<i32>,
        /// Only peers running as one of these uids (or with an allowed gid) may connect,
        /// checked with SO_PEERCRED on accept; others are closed at once. `UID[,UID..]`
        /// applies to every socket, `SOCKET=UID[,UID..]` to that guest's socket only (added
        /// to the former). Repeatable. Without any `--allow-uid`/`--allow-gid`, the socket's
        /// file mode alone decides.
        #[arg(long = "allow-uid", value_name = "[SOCKET=]UID[,UID..]", value_parser = parse_allow)]
        allow_uids: Vec<AllowIds>,
        /// Like `--allow-uid`, for the peer's effective group id (supplementary groups do not
        /// count).
        #[arg(long = "allow-gid", value_name = "[SOCKET=]GID[,GID..]", value_parser = parse_allow)]
        allow_gids: Vec<AllowIds>,
        /// A guest with SIZE of VRAM (e.g. 8G, 512M; a multiple of 2 MiB) served on SOCKET.
        /// Repeat for more guests: they get consecutive slices of VRAM, scrubbed first.
        /// `socket=SOCKET,vram=SIZE,display=PATH` also gives the guest a display: a
        /// vhost-user socket for QEMU's `vhost-user-gpu-pci` (paths without commas).
        #[arg(long = "guest", value_name = "SOCKET:SIZE | socket=SOCKET,vram=SIZE[,display=PATH]", value_parser = parse_guest)]
        guests: Vec<GuestSpec>,
        /// Whole-GPU mode: give the guest a display on this vhost-user socket, for QEMU's
        /// `-chardev socket,id=gpu0,path=PATH -device vhost-user-gpu-pci,chardev=gpu0`. Its
        /// resources live in the guest's VRAM. With `--guest`, name each guest's display
        /// with `display=PATH` instead.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["guests", "fd"])]
        display: Option<PathBuf>,
        /// Open a control socket at PATH (mode 0600) through which guests are listed, added
        /// and removed while the backend runs (`gpu-backend ctl`, `docs/control.md`). Slices
        /// the GPU; with no `--guest` the backend starts with no guest.
        #[arg(long, value_name = "PATH", conflicts_with = "fd")]
        control: Option<PathBuf>,
        /// Keep the guest table in DIR (created if missing) and, for the emulated GPU, VRAM
        /// in DIR/vram instead of an anonymous memfd: restarted with the same DIR, the
        /// backend serves the same guests on the same sockets with their VRAM intact,
        /// scrubbing only slices it hands out anew. Emulated VRAM in a file is never mapped
        /// into QEMU (every VRAM access is trapped). Slices the GPU.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["fd", "socket"])]
        state: Option<PathBuf>,
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
        /// Whole-GPU mode: present the GPU without its MSI-X capability (INTx only), so
        /// QEMU can hot-unplug it: QEMU 11.1.3 aborts on `device_del` of a `vfio-user-pci`
        /// with MSI-X. Sliced guests take `msix=off` in `--guest` instead.
        #[arg(long, conflicts_with = "guests")]
        no_msix: bool,
    },
    /// Talk to a running backend's control socket (`serve --control PATH`): list, add and
    /// remove guests, show their statistics. Errors exit 2 with the backend's message.
    Ctl {
        /// The control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the backend's JSON answer instead of a table.
        #[arg(long, global = true)]
        json: bool,
        /// What to do.
        #[command(subcommand)]
        action: CtlAction,
    },
}

/// `gpu-backend ctl` actions.
#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// The GPU, its free VRAM and every guest.
    List,
    /// Add a guest: a slice of VRAM (the lowest free range that fits, scrubbed) served on a
    /// new vfio-user socket, with a display if asked.
    Add {
        /// The guest's vfio-user socket (must not exist, or be a stale socket).
        #[arg(long)]
        socket: PathBuf,
        /// Its VRAM (e.g. 512M, 8G; a multiple of 2 MiB).
        #[arg(long)]
        vram: String,
        /// Its display's vhost-user socket.
        #[arg(long)]
        display: Option<PathBuf>,
        /// Present it without MSI-X (INTx only), so QEMU 11.1.3 can hot-unplug it with
        /// `device_del` (it aborts unplugging a `vfio-user-pci` that has MSI-X).
        #[arg(long)]
        no_msix: bool,
    },
    /// Remove a guest: refused while its QEMU is connected unless `--force`, which revokes
    /// its slice first (its function then reads ~0), disconnects it, scrubs and frees the
    /// slice.
    Remove {
        /// The guest's vfio-user socket.
        #[arg(long)]
        socket: PathBuf,
        /// Disconnect a connected guest.
        #[arg(long)]
        force: bool,
    },
    /// Per-guest statistics (connection, BAR0 trap counters).
    Stats {
        /// Only this guest.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

fn parse_guest(text: &str) -> Result<GuestSpec, SpecError> {
    text.parse()
}

fn parse_allow(text: &str) -> Result<AllowIds, AllowIdsError> {
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

/// An `inspect` report with what the GSP reported after booting, under `gsp`, and for a
/// GPU behind VFIO how its VRAM reaches QEMU, under `vfio`.
#[derive(serde::Serialize)]
struct WithGsp<T: serde::Serialize> {
    #[serde(flatten)]
    layout: T,
    gsp: GspSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    vfio: Option<VfioReport>,
}

/// What the GSP said, or why it did not boot.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum GspSection {
    /// It booted.
    Booted(GspReport),
    /// It did not: the layout is still shown, and the command fails afterwards.
    Failed {
        /// Why.
        error: String,
    },
}

impl GspSection {
    fn of(result: &Result<GspReport, BootError>) -> GspSection {
        match result {
            Ok(report) => GspSection::Booted(report.clone()),
            Err(e) => GspSection::Failed {
                error: e.to_string(),
            },
        }
    }
}

impl std::fmt::Display for GspSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GspSection::Booted(report) => write!(f, "{report}"),
            GspSection::Failed { error } => writeln!(f, "GSP: did not boot: {error}"),
        }
    }
}

/// How a GPU behind VFIO is reached.
#[derive(Debug, Clone, serde::Serialize)]
struct VfioReport {
    /// The PCI address.
    address: String,
    /// Whether guests' VRAM is mapped by QEMU (dma-buf export) or served over the socket.
    vram_mapping: DmaBufSupport,
}

impl VfioReport {
    fn line(&self) -> String {
        match &self.vram_mapping {
            DmaBufSupport::Mappable => format!(
                "VFIO {}: guests' VRAM is mapped by QEMU through dma-buf exports of their range",
                self.address
            ),
            DmaBufSupport::Unavailable(why) => format!(
                "VFIO {}: guests' VRAM is served through the socket (every access trapped): {why}",
                self.address
            ),
        }
    }
}

/// Brings up the GPU to drive: the one at `vfio` if given, else an emulated `profile`.
fn open_host(
    profile: &'static ChipProfile,
    vfio: Option<&str>,
) -> Result<(Arc<dyn HostGpu>, Option<VfioReport>), CliError> {
    match vfio {
        Some(address) => {
            let gpu = VfioHostGpu::open(address)?;
            let report = VfioReport {
                address: gpu.identity().name.clone(),
                vram_mapping: gpu.dma_buf_support().clone(),
            };
            log::info!("{}", report.line());
            Ok((Arc::new(gpu), Some(report)))
        }
        None => Ok((Arc::new(EmulatedHostGpu::new(profile)?), None)),
    }
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
            vfio,
            json,
            guests,
            slice_sizes,
        } => {
            let (host, vfio) = open_host(profile, vfio.as_deref())?;
            let booted = gsp::boot_and_report(host.as_ref());
            let gsp = GspSection::of(&booted);
            let mut out = std::io::stdout().lock();
            let mut guests = guests;
            guests.extend(slice_sizes.into_iter().map(GuestSpec::unnamed));
            if guests.is_empty() {
                // Describing the layout hands nothing out: no scrub (which on hardware
                // runs through PRAMIN at minutes per GiB).
                let function = PresentedFunction::new_with(
                    host,
                    PresentationOptions {
                        handout: HandOut::Unscrubbed,
                        ..PresentationOptions::default()
                    },
                )?;
                let layout = FunctionLayout::of(&function);
                if json {
                    let report = WithGsp { layout, gsp, vfio };
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    writeln!(out)?;
                } else {
                    inspect::write_table(&mut out, &layout)?;
                    writeln!(out)?;
                    writeln!(out, "{gsp}")?;
                    if let Some(vfio) = &vfio {
                        writeln!(out, "{}", vfio.line())?;
                    }
                }
                // The layout was worth showing; a GSP that did not boot still fails the command.
                booted?;
                return Ok(());
            }
            booted?;
            let (gpu, functions) = present_guests_with(host, &guests, HandOut::Unscrubbed)?;
            let layout = SlicedLayout {
                partition: PartitionLayout::of(&gpu),
                guests: guests
                    .iter()
                    .zip(&functions)
                    .map(|(spec, function)| GuestLayout {
                        socket: spec.socket.as_ref().map(|s| s.display().to_string()),
                        display: spec.display.as_ref().map(|d| d.display().to_string()),
                        function: FunctionLayout::of(function),
                    })
                    .collect(),
            };
            if json {
                let report = WithGsp { layout, gsp, vfio };
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                inspect::write_sliced_table(&mut out, &layout)?;
                writeln!(out)?;
                writeln!(out, "{gsp}")?;
                if let Some(vfio) = &vfio {
                    writeln!(out, "{}", vfio.line())?;
                }
            }
            Ok(())
        }
        Command::Measure {
            profile,
            vfio,
            reads,
            map_size,
            scrub_size,
            json,
        } => {
            let measurement = match vfio {
                Some(address) => {
                    let gpu = Arc::new(VfioHostGpu::open(&address)?);
                    let pread_gpu = Arc::clone(&gpu);
                    let pread = move || pread_gpu.bar0_read_pread(0);
                    crate::measure::measure(gpu, reads, Some(&pread), map_size, scrub_size)?
                }
                None => crate::measure::measure(
                    Arc::new(EmulatedHostGpu::new(profile)?),
                    reads,
                    None,
                    map_size,
                    scrub_size,
                )?,
            };
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &measurement)?;
                writeln!(out)?;
            } else {
                crate::measure::write_summary(&mut out, &measurement)?;
            }
            Ok(())
        }
        Command::Serve {
            profile,
            vfio,
            socket,
            fd,
            allow_uids,
            allow_gids,
            guests,
            display,
            control,
            state,
            socket_mode,
            poll_spin_us,
            trap_vram,
            no_msix,
        } => {
            let presentation = PresentationOptions {
                trap_vram,
                without_msix: no_msix,
                ..PresentationOptions::default()
            };
            // Before the budgets are sized from it (ServerConfig::default).
            match crate::limits::raise_fd_limit() {
                Ok(fds) => log::debug!("fd limit {fds}"),
                Err(e) => log::warn!("{e}: serving with the fd limit as it is"),
            }
            let server_config = ServerConfig {
                poll_spin: Duration::from_micros(poll_spin_us),
                ..ServerConfig::default()
            };
            let listen = ListenOptions {
                socket_mode,
                server_config,
                peers: PeerRules::from_flags(&allow_uids, &allow_gids),
            };
            if let Some(fd) = fd {
                // Per-socket ids name no socket here.
                listen.peers.check_sockets(&[]).map_err(CliError::Serve)?;
                // SAFETY: `fd` is inherited from the launcher and taken once, here, before
                // anything in this process could have come to own it.
                let stream = unsafe { adopt_connected_fd(fd) }.map_err(ServeError::from)?;
                let (host, _) = open_host(profile, vfio.as_deref())?;
                let peers = listen.peers.for_any_socket();
                serve_connected(host, stream, server_config, peers, presentation)?;
                return Ok(());
            }
            let state = state
                .as_deref()
                .map(StateDir::open)
                .transpose()
                .map_err(ServeError::from)?;
            let host: Arc<dyn HostGpu> = match (&state, &vfio) {
                // Emulated VRAM lives in the state directory, so it outlives the process.
                (Some(dir), None) => Arc::new(EmulatedHostGpu::with_vram_file(
                    profile,
                    Some(&dir.path().join("vram")),
                )?),
                _ => open_host(profile, vfio.as_deref())?.0,
            };
            if guests.is_empty() && control.is_none() && state.is_none() {
                let socket = socket.ok_or_else(|| {
                    CliError::Usage("serve needs --socket or at least one --guest".to_owned())
                })?;
                serve(
                    host,
                    &ServeOptions {
                        socket,
                        display,
                        listen,
                        presentation,
                    },
                )?;
                return Ok(());
            }
            serve_sliced(host, &guests, control.as_deref(), state, &listen)?;
            Ok(())
        }
        Command::Ctl {
            control,
            json,
            action,
        } => crate::ctl::run(&control, json, action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gsp::shmem::ShmemError;
    use crate::host_gpu::HostGpuError;

    #[test]
    fn refused_dma_anywhere_down_the_chain_is_the_users_to_fix() {
        let refused = CliError::Gsp(BootError::Shared(ShmemError::Alloc(
            HostGpuError::DmaRefused("raise RLIMIT_MEMLOCK".to_owned()),
        )));
        assert_eq!(refused.exit_code(), 2);
        assert!(refused.to_string().contains("GSP"), "{refused}");
        let io = CliError::Gsp(BootError::Shared(ShmemError::Alloc(HostGpuError::Io(
            std::io::Error::other("device error"),
        ))));
        assert_eq!(io.exit_code(), 1);
    }
}
