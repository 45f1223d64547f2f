//! `gpu-backend ctl`: the command-line client of the control socket. Prints a table by
//! default, the backend's JSON answer with `--json`.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::cli::{CliError, CtlAction};
use crate::control::ControlClient;
use crate::guests::{GpuReport, GuestInfo};
use crate::units::human_size;

/// Runs one `ctl` action against the control socket at `control`.
pub fn run(control: &Path, json_out: bool, action: CtlAction) -> Result<(), CliError> {
    let mut client = ControlClient::connect(control)?;
    let (command, arguments) = match &action {
        CtlAction::List => ("list", None),
        CtlAction::Add {
            socket,
            vram,
            display,
            no_msix,
        } => {
            let mut args = json!({"socket": wire_path(socket)?, "vram": vram});
            if let Some(d) = display {
                args["display"] = json!(wire_path(d)?);
            }
            if *no_msix {
                args["msix"] = json!(false);
            }
            ("add", Some(args))
        }
        CtlAction::Remove { socket, force } => (
            "remove",
            Some(json!({"socket": wire_path(socket)?, "force": force})),
        ),
        CtlAction::Stats { socket } => (
            "stats",
            socket
                .as_deref()
                .map(wire_path)
                .transpose()?
                .map(|s| json!({ "socket": s })),
        ),
    };
    let answer = client.execute(command, arguments)?;
    let mut out = std::io::stdout().lock();
    if json_out {
        serde_json::to_writer_pretty(&mut out, &answer)?;
        writeln!(out)?;
        return Ok(());
    }
    let decode_err = |e: serde_json::Error| {
        CliError::Control(crate::control::ClientError::Protocol(e.to_string()))
    };
    match action {
        CtlAction::List => {
            let report: GpuReport = serde_json::from_value(answer).map_err(decode_err)?;
            write_report(&mut out, &report)?;
        }
        CtlAction::Add { .. } => {
            let guest: GuestInfo = serde_json::from_value(answer).map_err(decode_err)?;
            writeln!(
                out,
                "added {}: VRAM [{:#x}, {:#x}) ({}){}{}",
                guest.socket,
                guest.vram_start,
                guest.vram_start + guest.vram_size,
                human_size(guest.vram_size),
                guest
                    .display
                    .map(|d| format!(", display {d}"))
                    .unwrap_or_default(),
                if guest.msix { "" } else { ", no MSI-X" }
            )?;
        }
        CtlAction::Remove { socket, .. } => {
            writeln!(out, "removed {}", socket.display())?;
        }
        CtlAction::Stats { .. } => write_stats(&mut out, &answer)?,
    }
    Ok(())
}

/// A path as the protocol carries it: absolute (the backend's working directory is not
/// ours) and UTF-8 (JSON strings are).
fn wire_path(path: &Path) -> Result<String, CliError> {
    let absolute = std::path::absolute(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    absolute
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::Usage(format!("{} is not UTF-8", path.display())))
}

fn write_report(out: &mut impl Write, r: &GpuReport) -> std::io::Result<()> {
    writeln!(out, "{} ({})", r.name, r.description)?;
    writeln!(
        out,
        "VRAM {}, guest area [0x0, {:#x}), free {} in {} range(s)",
        human_size(r.vram_size),
        r.guest_area_end,
        human_size(r.free_bytes),
        r.free_ranges.len()
    )?;
    for f in &r.free_ranges {
        writeln!(
            out,
            "  free [{:#x}, {:#x}) {}",
            f.start,
            f.start + f.size,
            human_size(f.size)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<32} {:<30} {:>10}  {:<9}  {:<5}  display",
        "socket", "VRAM", "size", "connected", "MSI-X"
    )?;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    for g in &r.guests {
        writeln!(
            out,
            "{:<32} {:<30} {:>10}  {:<9}  {:<5}  {}",
            g.socket,
            format!("[{:#x}, {:#x})", g.vram_start, g.vram_start + g.vram_size),
            human_size(g.vram_size),
            yes_no(g.connected),
            yes_no(g.msix),
            g.display.as_deref().unwrap_or("-")
        )?;
    }
    if r.guests.is_empty() {
        writeln!(out, "(no guests)")?;
    }
    Ok(())
}

fn write_stats(out: &mut impl Write, answer: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:<9} {:>12} {:>12} {:>10} {:>14} {:>14} {:>14}",
        "socket",
        "connected",
        "reg reads",
        "hidden",
        "window wr",
        "aperture rd",
        "aperture wr",
        "refused"
    )?;
    let guests = answer["guests"].as_array().cloned().unwrap_or_default();
    for g in guests {
        let t = &g["traps"];
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        writeln!(
            out,
            "{:<32} {:<9} {:>12} {:>12} {:>10} {:>14} {:>14} {:>14}",
            g["socket"].as_str().unwrap_or("?"),
            if g["connected"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            n("passed_reads"),
            n("hidden_reads"),
            n("window_writes"),
            n("aperture_bytes_read"),
            n("aperture_bytes_written"),
            n("aperture_bytes_refused")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::FreeRange;

    fn guest(socket: &str, start: u64, msix: bool, display: Option<&str>) -> GuestInfo {
        GuestInfo {
            socket: socket.to_owned(),
            display: display.map(str::to_owned),
            vram_start: start,
            vram_size: 4 << 20,
            connected: start == 0,
            msix,
            traps: Default::default(),
        }
    }

    #[test]
    fn the_list_table_has_a_row_per_guest() {
        let report = GpuReport {
            name: "tu102-24g".into(),
            description: "TU102".into(),
            vram_size: 24 << 30,
            guest_area_end: 16 << 20,
            free_bytes: 8 << 20,
            free_ranges: vec![FreeRange {
                start: 8 << 20,
                size: 8 << 20,
            }],
            guests: vec![
                guest("/run/g0.sock", 0, true, Some("/run/d0.sock")),
                guest("/run/g1.sock", 4 << 20, false, None),
            ],
        };
        let mut out = Vec::new();
        write_report(&mut out, &report).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.starts_with("/run/"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                [
                    "/run/g0.sock",
                    "[0x0,",
                    "0x400000)",
                    "4",
                    "MiB",
                    "yes",
                    "yes",
                    "/run/d0.sock"
                ],
                [
                    "/run/g1.sock",
                    "[0x400000,",
                    "0x800000)",
                    "4",
                    "MiB",
                    "no",
                    "no",
                    "-"
                ],
            ],
            "{text}"
        );
        assert!(text.contains("free [0x800000, 0x1000000) 8 MiB"), "{text}");
        let empty = GpuReport {
            guests: Vec::new(),
            ..report
        };
        let mut out = Vec::new();
        write_report(&mut out, &empty).unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with("(no guests)\n"));
    }
}
