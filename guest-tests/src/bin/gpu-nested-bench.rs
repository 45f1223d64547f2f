//! `gpu-nested-bench`: the VFIO path's figures, measured inside a nested guest where the
//! emulated GPU is bound to the guest kernel's vfio-pci, side by side with the same
//! measurements on an emulated GPU in the same guest (the in-process baseline: same TCG
//! CPU, same kernel, no VFIO).
//!
//! ```text
//! cargo run --release -p guest-tests --bin gpu-nested-bench [-- --profile tu102-24g]
//! ```
//!
//! In the guest: `gpu-guest-vfio-bench` (BOOT_0 through the VFIO BAR0 mmap and through
//! `pread`), `gpu-backend measure --vfio 0000:00:05.0` and `gpu-backend measure --profile P`.
//! Prints one table with the ratios; exit status 0 only if every measurement ran.

use std::process::ExitCode;

use guest_tests::artifacts::{backend_binary_for, BuildProfile};
use guest_tests::guest_script::{GuestCommand, DEVICE_BDF};
use guest_tests::nested::{boot_nested, NestedOptions};
use guest_tests::vfio_report::{BenchReport, ReadPath};
use guest_tests::Backend;

const USAGE: &str = "\
usage: gpu-nested-bench [--profile NAME]

Boots a nested guest (TCG, intel-iommu) against `gpu-backend serve --profile NAME --trap-vram`,
binds the GPU to the guest's vfio-pci and measures, inside the guest, register reads through the
VFIO BAR0 mmap and through pread, then `gpu-backend measure` over VFIO and on an emulated GPU of
the same profile in the same guest. Default profile: tu102-24g.";

/// Register reads per measurement (each is a trapped vfio-user round trip under TCG).
const READS: u32 = 2000;
/// Bytes mapped with 4 KiB pages in the page-table build.
const MAP_SIZE: &str = "8M";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut profile = "tu102-24g".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--profile" => match args.next() {
                Some(p) => profile = p,
                None => return usage_error("--profile needs a value"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    match run(&profile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-nested-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("gpu-nested-bench: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

fn run(profile: &str) -> Result<(), String> {
    let bin = backend_binary_for(BuildProfile::Release).map_err(|e| e.to_string())?;
    let log_dir = std::env::temp_dir().join(format!("gpu-nested-bench-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let backend = Backend::spawn_with(
        &bin,
        profile,
        &log_dir.join("backend.log"),
        &["--trap-vram".to_owned()],
    )
    .map_err(|e| e.to_string())?;
    let measure = |args: &str| {
        format!("gpu-backend measure {args} --reads {READS} --map-size {MAP_SIZE} --json")
    };
    let commands = vec![
        GuestCommand::run(
            "bench",
            format!("gpu-guest-vfio-bench --device {DEVICE_BDF} --iterations {READS}"),
        ),
        GuestCommand::run("vfio", measure(&format!("--vfio {DEVICE_BDF}"))),
        GuestCommand::run("in-process", measure(&format!("--profile {profile}"))),
    ];
    eprintln!("booting the nested guest ({profile}); this takes a minute or two under TCG");
    let run = boot_nested(
        backend,
        &NestedOptions::new(commands).label(&format!("nested-bench-{profile}")),
    )
    .map_err(|e| e.to_string())?;
    let output = |name: &str| -> Result<String, String> {
        let r = run
            .results
            .get(name)
            .ok_or_else(|| format!("no result for {name}\n{}", run.summary()))?;
        if !r.success() {
            return Err(format!("{name} failed: {}", r.summary()));
        }
        Ok(r.stdout_text())
    };
    let bench = BenchReport::parse(&output("bench")?).map_err(|e| e.to_string())?;
    let vfio: serde_json::Value =
        serde_json::from_str(&output("vfio")?).map_err(|e| format!("vfio measure: {e}"))?;
    let local: serde_json::Value = serde_json::from_str(&output("in-process")?)
        .map_err(|e| format!("in-process measure: {e}"))?;

    let figure = |name: &str, path| {
        bench
            .figure(name, path)
            .map(|f| f.mean_ns)
            .ok_or_else(|| format!("bench has no {name} via {path:?}"))
    };
    let mmap = figure("bar0_boot0", ReadPath::Mmap)?;
    let pread = figure("bar0_boot0", ReadPath::Pread)?;
    let vram_mmap = figure("vram_bar_word0", ReadPath::Mmap)?;
    let vram_pread = figure("vram_bar_word0", ReadPath::Pread)?;
    let num = |v: &serde_json::Value, path: &[&str]| -> Result<f64, String> {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("measure output lacks {}", path.join(".")))
    };
    println!(
        "nested VFIO figures, profile {profile}, {READS} reads, {MAP_SIZE} mapped with 4 KiB pages"
    );
    println!(
        "{:<52} {:>14} {:>14} {:>8}",
        "measurement", "VFIO", "baseline", "ratio"
    );
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!(
            "{name:<52} {:>11.2} {unit:<2} {:>11.2} {unit:<2} {:>8.2}",
            a,
            b,
            a / b.max(f64::MIN_POSITIVE)
        );
    };
    row(
        "BAR0 BOOT_0 read: mmap (VFIO) vs pread (baseline)",
        mmap / 1e3,
        pread / 1e3,
        "us",
    );
    row(
        "VRAM BAR word read: mmap vs pread",
        vram_mmap / 1e3,
        vram_pread / 1e3,
        "us",
    );
    row(
        "BOOT_0 read via HostGpu (VFIO vs in-process, mean)",
        num(&vfio, &["register_read", "mean_ns"])? / 1e3,
        num(&local, &["register_read", "mean_ns"])? / 1e3,
        "us",
    );
    row(
        "GSP boot to static info (VFIO vs in-process)",
        num(&vfio, &["gsp_boot_micros"])? / 1e3,
        num(&local, &["gsp_boot_micros"])? / 1e3,
        "ms",
    );
    row(
        "page-table build, 4 KiB pages (VFIO vs in-process)",
        num(&vfio, &["page_table_build", "micros"])? / 1e3,
        num(&local, &["page_table_build", "micros"])? / 1e3,
        "ms",
    );
    row(
        "scrub 2 MiB: PRAMIN over VFIO vs emulated hole punch",
        num(&vfio, &["scrub", "micros"])? / 1e3,
        num(&local, &["scrub", "micros"])? / 1e3,
        "ms",
    );
    let pramin_rate = num(&vfio, &["scrub", "bytes_per_second"])?;
    println!(
        "scrub through PRAMIN over VFIO: {:.2} MB/s, so a 24 GiB GPU would take {:.1} h here",
        pramin_rate / 1e6,
        (24u64 << 30) as f64 / pramin_rate / 3600.0
    );
    println!(
        "page-table entries: {} over VFIO, {} in-process",
        num(&vfio, &["page_table_build", "entries"])?,
        num(&local, &["page_table_build", "entries"])?
    );
    println!(
        "boot to power-off: {:.1} s; logs in {}",
        run.boot_time.as_secs_f64(),
        run.run_dir.display()
    );
    Ok(())
}
