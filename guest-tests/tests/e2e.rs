//! End-to-end tests: boot a real QEMU guest (TCG) running `gpu-guest-probe`.
//!
//! These tests need QEMU from `qemu-configs/install.sh`; they fail (never skip) if it cannot be
//! installed. Each boot takes about 7-15 s on two cores. One test function per profile, so that
//! the test harness runs them in parallel; the probe, the initramfs and the backend are built
//! once per test process.

use std::time::Duration;

use guest_tests::artifacts::backend_binary;
use guest_tests::display::{
    start_display_guest, DisplayGuest, DisplayOptions, Drawn, SETTLE_TIMEOUT,
};
use guest_tests::fb_pattern::FbPattern;
use guest_tests::isolation::{canaries_around, plant, verify};
use guest_tests::qemu::DisplayDevice;
use guest_tests::vram_search::find_all;
use guest_tests::{
    boot_guest, boot_guest_with_backend, boot_guest_without_device, with_backend,
    with_display_backend, with_sliced_backend, with_sliced_display_backend, Backend, GuestOptions,
    HostVram, Outcome, ProbeArgs, ProbeReport, ProfileLayout, SlicedLayout,
};

/// Assert that every named check ran and passed.
fn assert_passed(report: &ProbeReport, checks: &[&str]) {
    for name in checks {
        let c = report
            .check(name)
            .unwrap_or_else(|| panic!("check {name} missing\n{}", report.summary_table()));
        assert_eq!(
            c.outcome,
            Outcome::Pass,
            "{c:?}\n{}",
            report.summary_table()
        );
    }
}

/// The checks every emulated GPU must pass in a guest.
const GUEST_CHECKS: &[&str] = &[
    "device_found",
    "device_id",
    "class",
    "bar_sizes_pow2",
    "bars_assigned",
    "boot0_mmap",
    "boot0_devmem",
    "vram_bar",
    "vram_rw_mmap",
    "vram_rw_devmem",
    "vram_rw_devmem_write",
    "vram_pad_read_devmem",
    "vram_pad_read_mmap",
    "vram_pad_write_dropped",
    "vram_pad_write_no_alias",
];

/// The whole pipeline (QEMU install, kernel, initramfs, static probe, serial parsing, power
/// off) without the vfio-user device: the probe must run to the end and report that it found
/// no NVIDIA device.
#[test]
fn guest_without_device_reports_no_device() {
    let run = boot_guest_without_device(&ProbeArgs::new()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest booted and powered off in {:.1} s",
        run.boot_time.as_secs_f64()
    );
    eprintln!("{}", run.report.summary_table());
    let report = &run.report;
    let done = report.done.expect("probe printed GPUPROBE done");
    let found = report
        .check("device_found")
        .expect("device_found check present");
    assert_eq!(found.outcome, Outcome::Fail, "{found:?}");
    assert!(found.detail.contains("no device found"), "{found:?}");
    assert_eq!(
        done.fail,
        1,
        "only the device_found check fails: {:?}",
        report.failures()
    );
    assert!(report.device.is_none());
    // The q35 machine's own functions were listed, so sysfs was mounted and read.
    assert!(report.facts_of("pci").count() >= 3, "{}", run.serial_log);
}

/// The emulated GH200 (95 GiB usable VRAM in a 128 GiB BAR) served by `gpu-backend serve`:
/// a first guest checks identity, BOOT_0, BAR sizes, VRAM read-back, the all-ones padding and
/// dropped padding writes, and leaves a pattern in VRAM; a second guest against the same
/// backend process finds that pattern.
#[test]
fn emulated_gh200_in_guest_and_vram_persists_across_guests() {
    const PROFILE: &str = "gh200-96g";
    const OFFSET: u64 = 0x10000;
    const SEED: u64 = 0x5eed;
    let layout = ProfileLayout::inspect(PROFILE).unwrap_or_else(|e| panic!("{e}"));
    let (first, second) = with_backend(PROFILE, |backend| {
        let boot = |args: ProbeArgs, label: &str| {
            boot_guest(
                &GuestOptions::new(args)
                    .with_socket(backend.socket())
                    .label(label),
            )
        };
        let first = boot(
            layout.probe_args().persist_write(OFFSET, SEED),
            "gh200-write",
        )?;
        let second = boot(
            layout.probe_args().persist_check(OFFSET, SEED),
            "gh200-check",
        )?;
        Ok((first, second))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for run in [&first, &second] {
        eprintln!("boot to power-off: {:.1} s", run.boot_time.as_secs_f64());
        eprintln!("{}", run.report.summary_table());
        assert!(
            run.report.all_passed(),
            "failed checks: {:#?}\nlogs: {}",
            run.report.failures(),
            run.run_dir.display()
        );
        assert_passed(&run.report, GUEST_CHECKS);
        assert_eq!(layout.bar_mismatches(&run.report), Vec::<String>::new());
    }
    for (run, check) in [
        (&first, "persist_write"),
        (&first, "vram_pad_write_dropped"),
        (&first, "boot0_devmem"),
        (&second, "persist_check"),
    ] {
        let c = run
            .report
            .check(check)
            .unwrap_or_else(|| panic!("{check} missing"));
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
    }
}

/// A pre-Hopper GPU: the emulated TITAN RTX (Turing TU102). Its BAR layout differs from the
/// Hopper profiles: a 32-bit, non-prefetchable register BAR0, the VRAM aperture in BAR1 (23.65 GiB
/// of memory presented as a 32 GiB BAR, 8.35 GiB of padding) and a 32 MiB instance-memory BAR3.
/// One guest: ids, BOOT_0, power-of-two BARs of the expected sizes and types, VRAM read-back
/// below the real size, 0xFF padding and dropped padding writes.
#[test]
fn emulated_tu102_turing_in_guest() {
    const PROFILE: &str = "tu102-24g";
    let layout = ProfileLayout::inspect(PROFILE).unwrap_or_else(|e| panic!("{e}"));
    // The facts the test is about, stated independently of `inspect`.
    assert_eq!(layout.boot0, 0x1620_00a1, "TU102 BOOT_0");
    assert_eq!((layout.vendor_id, layout.device_id), (0x10de, 0x1e02));
    let bar0 = layout.bar(0).expect("BAR0");
    assert_eq!(
        (
            bar0.role.as_str(),
            bar0.presented_size,
            bar0.is_64bit,
            bar0.prefetchable
        ),
        ("registers", 16 << 20, false, false)
    );
    let vram = layout.vram_bar().expect("a VRAM BAR");
    assert_eq!(
        (vram.index, vram.real_size, vram.presented_size),
        (1, 25_396_510_720, 32 << 30)
    );
    let bar3 = layout.bar(3).expect("BAR3");
    assert_eq!(bar3.presented_size, 32 << 20);

    let report =
        boot_guest_with_backend(PROFILE, &layout.probe_args()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", report.summary_table());
    assert!(
        report.all_passed(),
        "failed checks: {:#?}",
        report.failures()
    );
    assert_passed(&report, GUEST_CHECKS);
    assert_eq!(layout.bar_mismatches(&report), Vec::<String>::new());
    let device = report.device.as_ref().expect("device");
    assert_eq!(
        (device.vendor, device.device, device.class),
        (0x10de, 0x1e02, 0x030000)
    );
    let bar0 = report
        .bars
        .iter()
        .find(|b| b.index == 0)
        .expect("BAR0 in the guest");
    assert!(!bar0.is_64bit() && !bar0.is_prefetchable(), "{bar0:?}");
    assert!(bar0.start < 1 << 32, "a 32-bit BAR below 4 GiB: {bar0:?}");
    let padding = report
        .facts_of("padding")
        .next()
        .expect("padding offsets were probed");
    assert_eq!(padding.num("real"), Some(25_396_510_720));
    assert_eq!(padding.num("size"), Some(32 << 30));
}

/// The probe's window checks (`gpuprobe.window=1`).
const WINDOW_CHECKS: &[&str] = &[
    "window_reg_readback",
    "window_aperture_rw",
    "window_bar_to_aperture",
    "window_move_order",
    "window_past_end_read",
    "window_past_end_write",
    "window_target_sysmem",
    "window_written_intact",
];

/// The trapped BAR0 window in a sliced GPU, seen from a real guest. `serve` carves three
/// 64 MiB slices from a TU102 (Turing: the window register has a TARGET field); the guest
/// under test owns the middle one, so its VRAM address 0 is host VRAM 64 MiB and it has a
/// neighbour on each side. Before it boots, the host plants canaries through the backend's
/// VRAM memfd: the last bytes below its slice, the first above, inside both neighbours, in the
/// free VRAM and at the end of the host-reserved region. The guest moves the window over its
/// VRAM (base 0, middle, last MiB) and writes and reads through the aperture and the VRAM BAR
/// both ways; straddles its VRAM end, points past it and far past it (reads 0xFF, writes
/// dropped); points TARGET at system memory (reads 0xFF); checks the register reads back.
/// After it powered off the host finds every canary intact, only zeros and canaries in the
/// neighbours, the free and the host-reserved VRAM, and the guest's slice holding exactly what
/// the guest wrote, at slice start + guest offset.
#[test]
fn window_trap_confines_a_sliced_guest() {
    const PROFILE: &str = "tu102-24g";
    const SLICE: u64 = 64 << 20;
    let guests = [("low", SLICE), ("a", SLICE), ("high", SLICE)];
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let sliced =
        SlicedLayout::inspect_with(&bin, PROFILE, &guests).unwrap_or_else(|e| panic!("{e}"));
    let a = sliced.guest("a").expect("guest a").clone();
    assert_eq!((a.start, a.size), (SLICE, SLICE), "the middle slice");
    assert_eq!(a.layout.generation, "Turing");
    let canaries = canaries_around(&sliced, &a);
    let args = a
        .layout
        .window_probe_args(a.layout.identity_probe_args(), a.size);

    let (run, host_checks) = with_sliced_backend(&bin, PROFILE, &guests, |backend| {
        let pid = backend.pid().expect("backend running");
        let vram = HostVram::open(pid)?;
        assert_eq!(vram.size(), sliced.vram_size, "the whole VRAM memfd");
        let starts: Vec<u64> = sliced.guests.iter().map(|g| g.start).collect();
        assert_eq!(
            vram.slice_starts(),
            starts,
            "each slice in a memfd of its own"
        );
        plant(&vram, &canaries)?;
        let socket = backend.socket_of("a").expect("socket of a");
        let run = boot_guest(
            &GuestOptions::new(args.clone())
                .with_socket(socket)
                .label("window-a"),
        )?;
        let checks = verify(&vram, &sliced, &a, &canaries, &run.report)?;
        Ok((run, checks))
    })
    .unwrap_or_else(|e| panic!("{e}"));

    eprintln!("boot to power-off: {:.1} s", run.boot_time.as_secs_f64());
    eprintln!("{}", run.report.summary_table());
    for c in &host_checks {
        eprintln!("  host: {:<28} {:?}  {}", c.name, c.outcome, c.detail);
    }
    assert!(
        run.report.all_passed(),
        "failed checks: {:#?}\nlogs: {}",
        run.report.failures(),
        run.run_dir.display()
    );
    assert_passed(&run.report, &["device_found", "device_id", "boot0_mmap"]);
    assert_passed(&run.report, WINDOW_CHECKS);
    assert_eq!(a.layout.bar_mismatches(&run.report), Vec::<String>::new());
    for c in &host_checks {
        assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
    }
    assert_eq!(host_checks.len(), 4);
}

/// `gpu-guest-vfio-client` (the host build) against the emulated backend's sliced GPU, where
/// the nested tests run it against `serve --vfio`: its checks must pass, and on the host every
/// write it reported must be in the slice at slice start + offset (the slice is the second,
/// so start + offset is not the offset), the dropped ones nowhere, canaries intact. Turing and
/// Hopper, for both window register layouts.
#[test]
fn vfio_client_checks_hold_on_an_emulated_sliced_gpu() {
    use guest_tests::nested_checks::{canaries_outside, verify_vram};
    use guest_tests::vfio_report::ClientReport;
    const SLICE: u64 = 64 << 20;
    let guests = [("low", SLICE), ("g0", SLICE)];
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    for profile in ["tu102-24g", "gh100-80g"] {
        let layout =
            SlicedLayout::inspect_with(&bin, profile, &guests).unwrap_or_else(|e| panic!("{e}"));
        let g0 = layout.guest("g0").expect("g0").clone();
        assert_eq!(g0.start, SLICE, "the second slice");
        let canaries = canaries_outside(&layout, &g0);
        let (report, checks) = with_sliced_backend(&bin, profile, &guests, |backend| {
            let vram = HostVram::open(backend.pid().expect("running"))?;
            plant(&vram, &canaries)?;
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-guest-vfio-client"))
                .arg("--socket")
                .arg(backend.socket_of("g0").expect("socket of g0"))
                .args(["--vram-size", &SLICE.to_string()])
                .output()
                .expect("running gpu-guest-vfio-client");
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{profile}: client failed: {out:?}");
            let report = ClientReport::parse(&String::from_utf8_lossy(&out.stdout))
                .unwrap_or_else(|e| panic!("{e}"));
            let (res, len) = layout.host_reserved;
            let checks = verify_vram(
                &vram,
                g0.start..g0.end(),
                res..res + len,
                &canaries,
                &report,
            )?;
            Ok((report, checks))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.generation, g0.layout.generation, "{profile}");
        assert_eq!(u64::from(report.boot0), u64::from(g0.layout.boot0));
        assert_eq!(
            report.vram_bar,
            g0.layout.vram_bar().map(|b| u32::from(b.index))
        );
        assert_eq!(report.checks.len(), 11, "{:#?}", report.checks);
        assert!(report.failures().is_empty(), "{:#?}", report.failures());
        assert!(report.writes.iter().filter(|w| !w.inside).count() >= 3);
        for c in &checks {
            assert_eq!(c.outcome, Outcome::Pass, "{profile}: {c:?}");
        }
        assert_eq!(checks.len(), 4);
    }
}

/// VRAM of the inner backend's one guest in the nested VFIO tests.
const NESTED_SLICE: u64 = 2 << 20;
/// Its socket inside the nested guest.
const NESTED_SOCKET: &str = "/tmp/g0.sock";
/// Extra arguments of the outer `gpu-backend serve` of the nested VFIO tests.
const NESTED_OUTER_ARGS: &[&str] = &["--trap-vram"];

/// One assertion of a nested test, collected so that every part is reported before failing.
struct Verdict {
    lines: Vec<(&'static str, String, bool, String)>,
}

impl Verdict {
    fn new() -> Self {
        Verdict { lines: Vec::new() }
    }

    fn check(&mut self, part: &'static str, name: &str, ok: bool, detail: impl Into<String>) {
        self.lines.push((part, name.into(), ok, detail.into()));
    }

    /// Print every line; panic listing the failures.
    fn finish(self, title: &str) {
        eprintln!("--- {title} ---");
        for (part, name, ok, detail) in &self.lines {
            let d: String = detail.chars().take(300).collect();
            eprintln!(
                "{} {part:<4} {name:<34} {d}",
                if *ok { "PASS" } else { "FAIL" }
            );
        }
        let failed: Vec<String> = self
            .lines
            .iter()
            .filter(|l| !l.2)
            .map(|(part, name, _, detail)| format!("({part}) {name}: {detail}"))
            .collect();
        assert!(
            failed.is_empty(),
            "{title}: {} failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
}

/// `gpu-backend inspect --profile <profile> --json` of the host's backend, as JSON.
fn host_inspect_json(profile: &str) -> serde_json::Value {
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(&bin)
        .args(["inspect", "--profile", profile, "--json"])
        .output()
        .expect("running gpu-backend inspect");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

/// The nested VFIO test of one profile: the outer backend serves `profile` whole; in the guest
/// the device is bound to vfio-pci and driven by the static `gpu-backend` through the kernel's
/// VFIO UAPI.
/// (a) the modules load in order, the bind works and `/dev/vfio/<group>` exists; the bench
///     reads BOOT_0 through the VFIO BAR0 mmap and through `pread` (figures for the report);
/// (b) `inspect --vfio 0000:00:05.0 --json` in the guest shows the host's `inspect --profile`
///     identity and BARs, and GSP framebuffer regions;
/// (c) `serve --vfio ... --guest /tmp/g0.sock:64M` in the background, `gpu-guest-vfio-client`
///     runs the sliced-guest checks against it; on the host, every write it reported is in
///     the outer VRAM at slice start + offset, nothing else is in the slice, dropped writes
///     are nowhere and canaries outside the slice are intact.
fn nested_vfio(profile: &str) {
    use guest_tests::guest_script::{GuestCommand, DEVICE_BDF, MODULES};
    use guest_tests::nested::{boot_nested, spawn_outer_backend, NestedOptions};
    use guest_tests::nested_checks::{
        canaries_outside, gsp_fb_regions, identity_mismatches, verify_vram,
    };
    use guest_tests::vfio_report::{BenchReport, ClientReport, ReadPath};

    let started = std::time::Instant::now();
    let host_json = host_inspect_json(profile);
    let boot0 = host_json["chip"]["boot0"].as_u64().expect("boot0");
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let host_sliced = SlicedLayout::inspect_with(&bin, profile, &[("g0", NESTED_SLICE)])
        .unwrap_or_else(|e| panic!("{e}"));
    let canaries = canaries_outside(&host_sliced, &host_sliced.guests[0]);
    let outer_args: Vec<String> = NESTED_OUTER_ARGS.iter().map(|s| s.to_string()).collect();
    let backend = spawn_outer_backend(profile, &outer_args, &format!("nested-{profile}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = backend.pid().expect("outer backend running");
    let vram = HostVram::open(pid).unwrap_or_else(|e| panic!("{e}"));
    plant(&vram, &canaries).unwrap_or_else(|e| panic!("{e}"));
    drop(vram);
    eprintln!(
        "nested {profile}: host inspect, outer backend and canaries in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let slice = format!("{NESTED_SOCKET}:{NESTED_SLICE}");
    let commands = vec![
        GuestCommand::run(
            "bench",
            format!("gpu-guest-vfio-bench --device {DEVICE_BDF} --iterations 2000"),
        ),
        GuestCommand::run(
            "inspect",
            format!("gpu-backend inspect --vfio {DEVICE_BDF} --json"),
        ),
        GuestCommand::run(
            "inspect-sliced",
            format!("gpu-backend inspect --vfio {DEVICE_BDF} --guest {slice} --json"),
        ),
        GuestCommand::spawn(
            "serve",
            format!("RUST_LOG=info exec gpu-backend serve --vfio {DEVICE_BDF} --guest {slice}"),
        ),
        GuestCommand::wait_for_socket("wait-serve", NESTED_SOCKET, "serve", 180),
        GuestCommand::run(
            "client",
            format!("gpu-guest-vfio-client --socket {NESTED_SOCKET} --vram-size {NESTED_SLICE}"),
        ),
        GuestCommand::stop("serve"),
    ];
    let run = boot_nested(
        backend,
        &NestedOptions::new(commands).label(&format!("nested-{profile}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nested {profile}: boot to power-off {:.1} s (logs: {})\n{}",
        run.boot_time.as_secs_f64(),
        run.run_dir.display(),
        run.summary()
    );
    let result = |name: &str| {
        run.results
            .get(name)
            .unwrap_or_else(|| panic!("no result for {name}\n{}", run.summary()))
    };
    let said = |r: &guest_tests::guest_script::CommandResult| {
        format!(
            "rc={:?} stdout={:?} stderr={:?}",
            r.exit_code,
            r.stdout_text().trim(),
            r.stderr_text().trim()
        )
    };
    let mut v = Verdict::new();

    // (a) setup: modules, bind, group.
    for m in MODULES {
        let r = result(&format!("insmod-{m}"));
        v.check("a", &format!("insmod {m}"), r.success(), said(r));
    }
    let bind = result("bind");
    v.check(
        "a",
        "bound to vfio-pci",
        bind.success() && bind.stdout_text().trim().ends_with("/vfio-pci"),
        said(bind),
    );
    let group = result("vfio-group");
    v.check(
        "a",
        "/dev/vfio/<group> exists",
        group.success() && group.stdout_text().contains("group="),
        said(group),
    );

    // (a) the bench: BOOT_0 through the VFIO BAR0 mmap and through pread.
    let bench = result("bench");
    v.check("a", "bench ran", bench.success(), bench.stderr_text());
    match BenchReport::parse(&bench.stdout_text()) {
        Ok(report) => {
            for path in [ReadPath::Mmap, ReadPath::Pread] {
                let f = report.figure("bar0_boot0", path);
                v.check(
                    "a",
                    &format!("BOOT_0 via VFIO {path:?}"),
                    f.is_some_and(|f| u64::from(f.value) == boot0),
                    f.map_or("missing".into(), |f| {
                        format!("{:#010x} (want {boot0:#010x})", f.value)
                    }),
                );
            }
            for f in &report.figures {
                eprintln!(
                    "nested {profile} bench: {:<15} via {:<5?} mean {:>9.0} ns  min {:>8} ns  ({} reads)",
                    f.name, f.path, f.mean_ns, f.min_ns, f.iterations
                );
            }
        }
        Err(e) => v.check("a", "bench report", false, e.to_string()),
    }

    // (b) inspect --vfio against the host's inspect --profile.
    let inspect = result("inspect");
    v.check("b", "inspect --vfio ran", inspect.success(), said(inspect));
    match serde_json::from_slice::<serde_json::Value>(&inspect.stdout) {
        Ok(guest_json) => {
            let m = identity_mismatches(&guest_json, &host_json);
            v.check("b", "identity and BARs match", m.is_empty(), m.join("; "));
            let n = gsp_fb_regions(&guest_json);
            v.check("b", "gsp lists fb regions", n > 0, format!("{n} regions"));
        }
        Err(e) => v.check("b", "inspect --vfio JSON", false, e.to_string()),
    }

    // (c) the sliced inner backend and the client.
    let sliced = result("inspect-sliced");
    v.check(
        "c",
        "inspect --vfio --guest ran",
        sliced.success(),
        said(sliced),
    );
    let layout = SlicedLayout::from_json(profile, &sliced.stdout_text());
    let slice_of = layout
        .as_ref()
        .ok()
        .and_then(|l| l.guest("g0").map(|g| (g.start, g.size, l.host_reserved)));
    v.check(
        "c",
        "inner slice layout",
        slice_of.is_some_and(|(_, size, _)| size == NESTED_SLICE),
        format!("{slice_of:?} {:?}", layout.as_ref().err()),
    );
    let wait = result("wait-serve");
    v.check(
        "c",
        "serve --vfio socket appeared",
        wait.success(),
        said(wait),
    );
    let client = result("client");
    v.check("c", "client ran", client.success(), client.stderr_text());
    let report = ClientReport::parse(&client.stdout_text());
    match &report {
        Ok(r) => {
            for c in &r.checks {
                v.check(
                    "c",
                    &format!("client {}", c.name),
                    c.passed,
                    c.detail.clone(),
                );
            }
            v.check(
                "c",
                "client checks complete",
                r.checks.len() >= 11,
                format!("{} checks", r.checks.len()),
            );
        }
        Err(e) => v.check("c", "client report", false, e.to_string()),
    }
    let serve = result("serve");
    v.check(
        "c",
        "serve --vfio stopped cleanly",
        serve.success(),
        said(serve),
    );
    // The outer VRAM as it is now (a fresh look: the backend may have carved ranges since).
    let vram_after = run
        .backend
        .pid()
        .ok_or_else(|| "the outer backend exited".to_string())
        .and_then(|pid| HostVram::open(pid).map_err(|e| e.to_string()));
    match (&report, slice_of, vram_after) {
        (Ok(report), Some((start, size, (res, res_len))), Ok(vram)) => {
            match verify_vram(
                &vram,
                start..start + size,
                res..res + res_len,
                &canaries,
                report,
            ) {
                Ok(checks) => {
                    for c in checks {
                        v.check("c", &c.name, c.outcome == Outcome::Pass, c.detail);
                    }
                }
                Err(e) => v.check("c", "host VRAM readable", false, e.to_string()),
            }
        }
        (_, _, Err(e)) => v.check("c", "outer VRAM after the run", false, e),
        _ => v.check(
            "c",
            "host VRAM checks",
            false,
            "not run: no client report or no inner slice layout",
        ),
    }
    eprintln!(
        "nested {profile}: whole test {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ok = v.lines.iter().all(|l| l.2);
    v.finish(&format!("nested VFIO {profile}"));
    if ok {
        run.discard_logs();
    }
}

/// Nested VFIO, Turing: TU102 (window register 0x1700 with TARGET, VRAM in BAR1).
#[test]
fn nested_vfio_tu102() {
    nested_vfio("tu102-24g");
}

/// Nested VFIO, Hopper: GH100 (window register 0x10FD40, 64-bit BAR0, VRAM in BAR2).
#[test]
fn nested_vfio_gh100() {
    nested_vfio("gh100-80g");
}

/// How long a rebooting display guest holds each picture: longer than the screenshot retries
/// ([`REBOOT_SETTLE`]), so the host compares before the guest reboots.
const REBOOT_HOLD: Duration = Duration::from_secs(12);
/// The screenshot retries of a rebooting display guest.
const REBOOT_SETTLE: Duration = Duration::from_secs(8);

/// Wait for the guest's next picture and a screenshot showing it; panic with the first
/// mismatching pixel (and the logs) otherwise.
fn expect_picture(guest: &mut DisplayGuest, name: &str, settle: Duration) -> Drawn {
    let drawn = guest.wait_drawn().unwrap_or_else(|e| panic!("{name}: {e}"));
    let shot = guest
        .screenshot_matching(&drawn, name, settle)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: {drawn:?}\n{name}: {}", shot.verdict());
    assert!(
        shot.matches(),
        "{name}: {}\nlogs: {}",
        shot.verdict(),
        guest.run_dir().display()
    );
    drawn
}

/// The profile of the display tests (the smallest VRAM of the profiles).
const DISPLAY_PROFILE: &str = "tu102-24g";
/// VRAM of each guest of the sliced display test: room for a 1280x800 resource (4000 KiB).
const DISPLAY_SLICE: u64 = 64 << 20;

/// A guest drawing on `display` reboots itself after each picture: the first and the second
/// boot's pictures (different nonces) each show in QEMU's screenshot.
fn display_survives_reboot(
    display: DisplayDevice,
    vfio_user: Option<&std::path::Path>,
    label: &str,
) {
    let mut opts = DisplayOptions::new(display, 1)
        .rebooting_after(REBOOT_HOLD)
        .label(label);
    if let Some(socket) = vfio_user {
        opts = opts.with_vfio_user(socket);
    }
    let mut guest = start_display_guest(&opts).unwrap_or_else(|e| panic!("{e}"));
    let first = expect_picture(&mut guest, "boot1", REBOOT_SETTLE);
    let second = expect_picture(&mut guest, "boot2", REBOOT_SETTLE);
    assert_eq!(
        (first.width, first.height),
        (1280, 800),
        "QEMU's default output"
    );
    assert_eq!(first.bpp, 32);
    assert_ne!(
        first.pattern, second.pattern,
        "a new nonce after the reboot"
    );
    let serial = guest.serial();
    assert_eq!(serial.matches("GPUFB reboot").count(), 1, "{serial}");
    guest.finish().unwrap_or_else(|e| panic!("{e}"));
}

/// The guest side of the display tests against QEMU's own virtio-gpu device (the reference
/// the backend's vhost-user GPU is held to): the guest loads the Debian kernel's virtio-gpu
/// driver, draws its picture into `/dev/fb0`, QEMU's screenshot shows exactly that picture;
/// the guest reboots itself, draws a picture with a new nonce, and the screenshot shows the new
/// one.
#[test]
fn display_reference_qemu_virtio_gpu_shows_the_guest_picture_across_a_reboot() {
    display_survives_reboot(
        DisplayDevice::QemuVirtioGpu,
        None,
        "display-qemu-virtio-gpu",
    );
}

/// (a) One guest, the whole emulated GPU and its display from `gpu-backend serve --profile P
/// --socket S --display D` (QEMU: vfio-user-pci on S, vhost-user-gpu-pci on D): the guest's
/// stock virtio_gpu driver probes the backend's device, the guest draws its picture into
/// /dev/fb0, and QEMU's screenshot equals it pixel for pixel.
#[test]
fn display_whole_gpu_shows_the_guest_picture() {
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    with_display_backend(&bin, DISPLAY_PROFILE, |backend| {
        let display = backend
            .display_socket()
            .expect("display socket")
            .to_path_buf();
        let opts = DisplayOptions::new(DisplayDevice::VhostUser(display), 0)
            .with_vfio_user(backend.socket())
            .label("display-whole");
        let mut guest = start_display_guest(&opts)?;
        let drawn = expect_picture(&mut guest, "screen", SETTLE_TIMEOUT);
        assert_eq!((drawn.width, drawn.height, drawn.bpp), (1280, 800, 32));
        guest.finish()?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Host VRAM needles of a picture: rows 0, the middle and the last, as the framebuffer (and
/// so the resource) holds them.
fn picture_rows(d: &Drawn) -> Vec<(u32, Vec<u8>)> {
    [0, d.height / 2, d.height - 1]
        .into_iter()
        .map(|y| (y, d.pattern.xrgb_row(y, d.width)))
        .collect()
}

/// (b) Two guests at once on two slices of one backend (`--guest
/// socket=..,vram=..,display=..` twice), each drawing its own picture (tags 1 and 2, which
/// differ in every pixel): each screenshot equals its own guest's picture and has no pixel of
/// the other's; and while both pictures are up, each guest's rows (first, middle, last) are
/// found in host VRAM inside its own slice, and nowhere else: not in the other guest's slice,
/// not outside the slices (every written byte of the backend's VRAM memfds is searched, at any
/// alignment).
#[test]
fn display_two_sliced_guests_each_see_only_their_own_picture_kept_in_their_own_slice() {
    let guests = [("g1", DISPLAY_SLICE), ("g2", DISPLAY_SLICE)];
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let layout = SlicedLayout::inspect_with(&bin, DISPLAY_PROFILE, &guests)
        .unwrap_or_else(|e| panic!("{e}"));
    let slice = |name: &str| {
        let g = layout.guest(name).expect("slice");
        g.start..g.end()
    };
    let slices = [slice("g1"), slice("g2")];
    with_sliced_display_backend(&bin, DISPLAY_PROFILE, &guests, |backend| {
        // Both guests boot at once.
        let mut running = Vec::new();
        for (i, (name, _)) in guests.iter().enumerate() {
            let display = backend.display_of(name).expect("display socket").to_path_buf();
            let opts = DisplayOptions::new(DisplayDevice::VhostUser(display), i as u8 + 1)
                .with_vfio_user(backend.socket_of(name).expect("socket"))
                .label(&format!("display-{name}"));
            running.push(start_display_guest(&opts)?);
        }
        let mut drawn = Vec::new();
        for (guest, (name, _)) in running.iter_mut().zip(&guests) {
            drawn.push(expect_picture(guest, name, SETTLE_TIMEOUT));
        }
        assert_ne!(drawn[0].pattern.tag, drawn[1].pattern.tag);
        for (i, guest) in running.iter_mut().enumerate() {
            let other: FbPattern = drawn[1 - i].pattern;
            let (image, path) = guest.screenshot(&format!("check-{i}"))?;
            let foreign = image.count_equal(|x, y| other.rgb(x, y));
            assert_eq!(foreign, 0, "{}: pixels of the other guest's picture", path.display());
        }

        let vram = HostVram::open(backend.pid().expect("backend running"))?;
        let needles: Vec<(usize, u32, Vec<u8>)> = drawn
            .iter()
            .enumerate()
            .flat_map(|(g, d)| picture_rows(d).into_iter().map(move |(y, r)| (g, y, r)))
            .collect();
        let bytes: Vec<Vec<u8>> = needles.iter().map(|n| n.2.clone()).collect();
        let t = std::time::Instant::now();
        let data: u64 = vram.data_ranges()?.iter().map(|r| r.end - r.start).sum();
        let hits = find_all(&vram, &bytes)?;
        eprintln!(
            "searched {} MiB of written host VRAM for {} rows in {:.2} s: {} hits",
            data >> 20,
            bytes.len(),
            t.elapsed().as_secs_f64(),
            hits.len()
        );
        for (n, (g, y, row)) in needles.iter().enumerate() {
            let at: Vec<u64> = hits.iter().filter(|h| h.needle == n).map(|h| h.addr).collect();
            let own = &slices[*g];
            let inside = |a: &u64| own.contains(a) && a + row.len() as u64 <= own.end;
            assert!(
                at.iter().any(inside),
                "guest {} row {y} is not in its slice {own:#x?}; found at {at:#x?}",
                g + 1
            );
            let stray: Vec<&u64> = at.iter().filter(|a| !inside(a)).collect();
            assert!(
                stray.is_empty(),
                "guest {} row {y} found outside its slice {own:#x?}: at {stray:#x?} (other slice {:#x?})",
                g + 1,
                slices[1 - *g]
            );
        }
        for guest in running {
            guest.finish()?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// (c) The backend's display survives the guest rebooting itself (`reboot -f`; QEMU resets
/// the machine, the device is reset and the driver probes it again): the second boot's
/// picture shows, not the first's.
#[test]
fn display_survives_the_guest_rebooting() {
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    with_display_backend(&bin, DISPLAY_PROFILE, |backend| {
        let display = backend
            .display_socket()
            .expect("display socket")
            .to_path_buf();
        display_survives_reboot(
            DisplayDevice::VhostUser(display),
            Some(backend.socket()),
            "display-reboot",
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The profile of the tests of guests added and removed at run time (issue 11).
const LIVE_PROFILE: &str = "tu102-24g";
/// VRAM of each of their guests.
const LIVE_SLICE: u64 = 16 << 20;
/// Guest RAM of their guests (three QEMUs may run at once).
const LIVE_MEMORY_MIB: u32 = 256;
/// Bound of each wait on a live guest (boots on two loaded cores included).
const LIVE_WAIT: Duration = Duration::from_secs(150);

/// Probe arguments of a soaking guest on `slice` (its identity and BAR sizes, the window
/// register and VRAM map the soak needs, `write_s` seconds of write rounds, then `verify`
/// verify rounds, 0: until the device is lost).
fn soak_args(slice: &guest_tests::GuestSlice, seed: u64, write_s: u64, verify: u64) -> ProbeArgs {
    slice
        .layout
        .window_probe_args(slice.layout.identity_probe_args(), slice.size)
        .set("window", 0)
        .set("soak", 1)
        .set("soak_seed", format!("{seed:#x}"))
        .set("soak_write_s", write_s)
        .set("soak_verify", verify)
        .set("timeout", 600)
}

/// Options of a live guest on `socket`.
fn live_options(args: ProbeArgs, socket: &std::path::Path, label: &str) -> GuestOptions {
    let mut o = GuestOptions::new(args)
        .with_socket(socket)
        .smp(1)
        .label(label);
    o.memory_mib = LIVE_MEMORY_MIB;
    o
}

/// The checks every soaking guest passes.
const SOAK_CHECKS: &[&str] = &[
    "device_found",
    "device_id",
    "class",
    "bar_sizes_pow2",
    "bars_assigned",
    "boot0_mmap",
    "boot0_devmem",
    "soak_write",
];

/// Canaries outside the guests' slices (which end at `end`): the free VRAM right after them,
/// a page and 1 MiB further, the last bytes of the guest area, the end of the host-reserved
/// region; and the ranges that must hold only zeros and canaries: the first 4 MiB of free
/// VRAM and the last MiB of the host-reserved region.
fn live_canaries(
    layout: &SlicedLayout,
    end: u64,
) -> (
    Vec<guest_tests::isolation::Canary>,
    Vec<(String, std::ops::Range<u64>)>,
) {
    use guest_tests::isolation::{Canary, CANARY_LEN};
    let (res, res_len) = layout.host_reserved;
    let c = CANARY_LEN as u64;
    let canaries = vec![
        Canary::new("free VRAM right after the slices", end),
        Canary::new("free VRAM a page after the slices", end + 4096),
        Canary::new("free VRAM 1 MiB after the slices", end + (1 << 20)),
        Canary::new("last bytes of the guest area", layout.guest_area_end - c),
        Canary::new("host-reserved, last bytes", res + res_len - c),
        Canary::new(
            "host-reserved, 64 KiB below its end",
            res + res_len - (64 << 10),
        ),
    ];
    let zero = vec![
        ("free VRAM".to_string(), end..end + (4 << 20)),
        (
            "host-reserved, last MiB".to_string(),
            res + res_len - (1 << 20)..res + res_len,
        ),
    ];
    (canaries, zero)
}

/// Host VRAM of `backend` as it is now (slices carved since an earlier look included).
fn vram_now(backend: &Backend) -> HostVram {
    HostVram::open(backend.pid().expect("backend running")).unwrap_or_else(|e| panic!("{e}"))
}

/// The soak of a guest, asserting its write rounds passed and the slice at host
/// `slice_start` holds exactly what it left.
fn assert_soak_kept(
    name: &str,
    guest: &guest_tests::live::LiveGuest,
    vram: &HostVram,
    slice_start: u64,
) -> guest_tests::soak::SoakReport {
    use guest_tests::soak::{check_slice, SoakReport};
    let report = guest.report();
    assert_passed(&report, SOAK_CHECKS);
    let soak = SoakReport::parse(&report);
    let (Some(layout), Some(kept)) = (&soak.layout, &soak.kept) else {
        panic!("{name}: no soak_start / soak_kept line\n{}", guest.serial());
    };
    assert_eq!(layout.slice_size, LIVE_SLICE, "{name}");
    assert!(
        soak.rounds.iter().all(|r| r.bad == 0),
        "{name}: {:?}",
        soak.rounds
    );
    assert_eq!(soak.rounds.len() as u64, kept.rounds, "{name}");
    let c = check_slice(vram, slice_start, layout, kept).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        c.matches(),
        "{name}: host VRAM of its slice at {slice_start:#x} is not what it wrote: {} bad words, \
         first (guest address, found, expected) {:#x?}",
        c.bad_words,
        c.first
    );
    soak
}

/// (a) Two QEMU guests at once on two slices of one backend started with `--control`: guest
/// A given by `--guest`, guest B added through the control socket (`gpu-backend ctl add`).
/// Each soaks its VRAM (write rounds over its whole VRAM BAR and through its PRAMIN aperture,
/// read back both ways, then verify rounds) while the host keeps checking canaries in the
/// free VRAM and the host-reserved region through the backend's VRAM; once both wrote, the
/// host finds each slice holding exactly its guest's pattern (each guest's pattern is the
/// other's canary). Then A is removed while its QEMU runs: refused without `--force`, done
/// with it; A's guest then reads BOOT_0 and its aperture as ~0 and its VRAM BAR no longer
/// holds its data, and the "ghost" pattern it writes afterwards is nowhere in host VRAM; the
/// backend logs the removal. A is added again on the same socket (the same, scrubbed slice)
/// and a fresh QEMU boots on it and soaks. B runs throughout: its verify rounds never miss a
/// word, one more starts after A's new guest is done, and its slice still holds its pattern.
#[test]
fn two_live_guests_one_removed_and_re_added_while_the_other_keeps_its_data() {
    use guest_tests::control::Ctl;
    use guest_tests::live::start_probe_guest;
    use guest_tests::soak::{check_outside, ghost_needles, SoakReport};
    use std::time::Instant;

    let started = Instant::now();
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let layout =
        SlicedLayout::inspect_with(&bin, LIVE_PROFILE, &[("a", LIVE_SLICE), ("b", LIVE_SLICE)])
            .unwrap_or_else(|e| panic!("{e}"));
    let a = layout.guest("a").expect("a").clone();
    let b = layout.guest("b").expect("b").clone();
    assert_eq!(
        (a.start, b.start),
        (0, LIVE_SLICE),
        "first fit from the bottom"
    );
    let run_dir = guest_tests::paths::new_run_dir("backend-live").unwrap_or_else(|e| panic!("{e}"));
    let backend = Backend::spawn_with_control(
        &bin,
        LIVE_PROFILE,
        &run_dir.join("backend.log"),
        &[("a", LIVE_SLICE)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ctl = Ctl::new(&bin, backend.control_socket().expect("control socket"));
    let sock_a = backend.socket_of("a").expect("socket of a").to_path_buf();
    let sock_b = backend.path_of("b");
    let fail = |what: String| -> ! {
        panic!(
            "{what}\n--- backend log ({}) ---\n{}",
            backend.log_path().display(),
            guest_tests::error::tail(&backend.log_text(), 40)
        )
    };

    // B through the control socket, next to A.
    let added = ctl
        .add(&sock_b, LIVE_SLICE)
        .unwrap_or_else(|e| fail(e.to_string()));
    assert_eq!((added.vram_start, added.vram_size), (b.start, LIVE_SLICE));
    let list = ctl.list().unwrap_or_else(|e| fail(e.to_string()));
    let starts: Vec<(u64, bool)> = list
        .guests
        .iter()
        .map(|g| (g.vram_start, g.connected))
        .collect();
    assert_eq!(starts, [(a.start, false), (b.start, false)]);

    let (canaries, zero) = live_canaries(&layout, b.end());
    guest_tests::isolation::plant(&vram_now(&backend), &canaries).unwrap_or_else(|e| panic!("{e}"));
    let outside_ok = |when: &str| {
        let bad =
            check_outside(&vram_now(&backend), &canaries, &zero).unwrap_or_else(|e| panic!("{e}"));
        assert!(bad.is_empty(), "{when}: {bad:#?}");
    };

    // Both guests at once; the host checks the canaries while they write.
    let boot = |args, socket: &std::path::Path, label: &str| {
        start_probe_guest(&live_options(args, socket, label)).unwrap_or_else(|e| panic!("{e}"))
    };
    let mut ga = boot(soak_args(&a, 0x5eed_a001, 4, 0), &sock_a, "live-a");
    let mut gb = boot(soak_args(&b, 0x5eed_b002, 4, 0), &sock_b, "live-b");
    let mut outside_checks = 0;
    let deadline = Instant::now() + LIVE_WAIT;
    while ga.count_lines("GPUPROBE soak_kept") + gb.count_lines("GPUPROBE soak_kept") < 2 {
        assert!(
            Instant::now() < deadline,
            "the guests did not finish their write rounds in {LIVE_WAIT:?}\n--- a ---\n{}\n--- b ---\n{}",
            guest_tests::error::tail(&ga.serial(), 30),
            guest_tests::error::tail(&gb.serial(), 30)
        );
        assert!(ga.is_running() && gb.is_running(), "a QEMU exited early");
        outside_ok("while the guests write");
        outside_checks += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let written_at = started.elapsed();
    let vram = vram_now(&backend);
    let soak_a = assert_soak_kept("a", &ga, &vram, a.start);
    let soak_b = assert_soak_kept("b", &gb, &vram, b.start);
    outside_ok("after the write rounds");
    let listed = ctl.list().unwrap_or_else(|e| fail(e.to_string()));
    assert!(listed.guests.iter().all(|g| g.connected), "{listed:?}");
    for g in &listed.guests {
        assert!(
            g.traps.aperture_bytes_written >= 3 * 4096 && g.traps.window_writes > 0,
            "{}: {:?}",
            g.socket,
            g.traps
        );
    }

    // A removed while its QEMU runs: refused, then forced.
    let refused = ctl
        .run(&guest_tests::control::remove_args(&sock_a, false))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("connected"), "{refused:?}");
    assert!(ctl
        .guest(&sock_a)
        .unwrap_or_else(|e| panic!("{e}"))
        .is_some_and(|g| g.connected));
    let removed_at = Instant::now();
    let removed = ctl
        .remove(&sock_a, true)
        .unwrap_or_else(|e| fail(e.to_string()));
    eprintln!(
        "ctl remove --force took {:.0} ms",
        removed.elapsed.as_secs_f64() * 1e3
    );
    assert!(ctl
        .guest(&sock_a)
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
    let log = backend.log_text();
    assert!(
        log.contains(&format!("guest removed: {}", sock_a.display())),
        "the backend logs the removal:\n{log}"
    );

    // A's guest loses its device and its data, and its ghost writes land nowhere.
    ga.wait_for_line("GPUPROBE done", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("a after its removal: {e}"));
    let lost_after = removed_at.elapsed();
    let a_soak = SoakReport::parse(&ga.report());
    let lost = a_soak
        .lost
        .clone()
        .unwrap_or_else(|| panic!("a never saw its device go\n{}", ga.serial()));
    assert_eq!(
        lost.boot0, 0xffff_ffff,
        "BOOT_0 of a removed guest reads ~0"
    );
    assert_eq!(lost.aperture, "0xffffffff", "{lost:?}");
    let a_layout = soak_a.layout.clone().expect("layout");
    let a_kept = soak_a.kept.expect("kept");
    assert_ne!(
        lost.bar_word0,
        format!("{:#x}", a_layout.kept_word(&a_kept, 0)),
        "a removed guest no longer sees its VRAM"
    );
    assert!(
        lost.ghost_bar_bytes > 0 && lost.ghost_aperture_bytes > 0,
        "{lost:?}"
    );
    assert!(a_soak.failed_verifies().is_empty(), "{:?}", a_soak.verifies);
    let a_out = ga.wait_exit(LIVE_WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(a_out.status.success(), "a powered off: {:?}", a_out.status);
    let vram = vram_now(&backend);
    let needles = ghost_needles(&lost, &a_layout);
    let hits = find_all(&vram, &needles).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        hits.is_empty(),
        "a's ghost writes reached host VRAM: {hits:#x?}"
    );
    let b_mid = check_slice_now(&vram, b.start, &soak_b);
    assert!(b_mid, "b's slice after a's removal");
    outside_ok("after a's removal");

    // A again, on the same socket: the same slice, scrubbed; a fresh QEMU works on it.
    let again = ctl
        .add(&sock_a, LIVE_SLICE)
        .unwrap_or_else(|e| fail(e.to_string()));
    assert_eq!(again.vram_start, a.start, "the lowest free range again");
    let vram = vram_now(&backend);
    let nonzero = vram
        .read(a.start, LIVE_SLICE as usize)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .filter(|&&x| x != 0)
        .count();
    assert_eq!(nonzero, 0, "the re-added slice is scrubbed");
    let a2_started = Instant::now();
    let mut ga2 = boot(soak_args(&a, 0x5eed_a003, 2, 2), &sock_a, "live-a2");
    ga2.wait_for_line("GPUPROBE done", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("a's second guest: {e}"));
    let vram = vram_now(&backend);
    let soak_a2 = assert_soak_kept("a again", &ga2, &vram, a.start);
    assert_passed(&ga2.report(), &["soak_verify"]);
    assert_eq!(soak_a2.clean_verifies(), 2);
    assert!(soak_a2.lost.is_none());
    let a2_out = ga2.wait_exit(LIVE_WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(a2_out.status.success());
    let a2_took = a2_started.elapsed();

    // B ran throughout: one more verify round that started after A's second guest was done.
    let seen = gb.count_lines("GPUPROBE soak_verify ");
    gb.wait_for_line("GPUPROBE soak_verify ", seen + 1, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("b: {e}"));
    let b_soak = SoakReport::parse(&gb.report());
    assert!(
        b_soak.lost.is_none(),
        "b lost its device: {:?}",
        b_soak.lost
    );
    assert!(
        b_soak.verifies.iter().all(|v| v.bad == 0 && !v.interrupted),
        "b's verify rounds: {:?}",
        b_soak.verifies
    );
    let vram = vram_now(&backend);
    assert!(
        check_slice_now(&vram, b.start, &soak_b),
        "b's slice at the end"
    );
    outside_ok("at the end");
    let hits = find_all(&vram, &needles).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        hits.is_empty(),
        "a's ghost in host VRAM at the end: {hits:#x?}"
    );
    let b_verifies = b_soak.verifies.len();
    gb.quit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "live guests: both wrote after {:.1} s ({} and {} write rounds, {outside_checks} canary \
         checks meanwhile); a saw its device gone {:.1} s after the removal; a's new guest \
         booted, soaked and powered off in {:.1} s; b verified its 16 MiB {b_verifies} times \
         without a miss; whole test {:.1} s",
        written_at.as_secs_f64(),
        soak_a.rounds.len(),
        soak_b.rounds.len(),
        lost_after.as_secs_f64(),
        a2_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(backend);
    if !guest_tests::paths::keep_runs() {
        let _ = std::fs::remove_dir_all(run_dir);
    }
}

/// Whether `soak`'s guest's slice at host `start` holds exactly what it left.
fn check_slice_now(vram: &HostVram, start: u64, soak: &guest_tests::soak::SoakReport) -> bool {
    let (Some(layout), Some(kept)) = (&soak.layout, &soak.kept) else {
        return false;
    };
    let c =
        guest_tests::soak::check_slice(vram, start, layout, kept).unwrap_or_else(|e| panic!("{e}"));
    if !c.matches() {
        eprintln!(
            "slice at {start:#x}: {} bad words, first {:#x?}",
            c.bad_words, c.first
        );
    }
    c.matches()
}

/// The bridge windows a `pcie-root-port` must reserve for `layout`'s function to be
/// hot-plugged behind it (the firmware sizes an empty port's windows at boot, aligned to
/// 1 MiB only): twice its non-prefetchable and twice its prefetchable BARs' sizes, each sum
/// rounded up to a power of two, so a window holds them at their natural alignment wherever
/// it starts. (Reserving exactly the sum, 16 MiB for a 16 MiB BAR, left the BARs unassigned:
/// "can't assign; no space".)
fn root_port_reserves(layout: &guest_tests::ProfileLayout) -> (u64, u64) {
    let sum = |pref: bool| {
        2 * layout
            .bars
            .iter()
            .filter(|b| b.prefetchable == pref)
            .map(|b| b.presented_size)
            .sum::<u64>()
            .max(1 << 20)
            .next_power_of_two()
    };
    (sum(false), sum(true))
}

/// (b) QEMU hot-plug. A guest boots with an empty `pcie-root-port` (its bridge windows
/// reserved for the GPU's BARs) and waits; the control socket creates a guest socket
/// (`gpu-backend ctl add --no-msix`); QMP `device_add` of a `vfio-user-pci` on it behind the
/// port; the guest's kernel finds the GPU on its PCI bus by itself (ACPI hot-plug on q35, no
/// rescan), assigns its BARs and the probe checks ids, BAR sizes and BOOT_0 through the
/// sysfs `resource0` mmap and `/dev/mem`; the backend lists the guest connected with BAR0
/// reads counted. Then QMP `device_del`: the guest sees the GPU go and powers off cleanly,
/// the backend notices the client left (listed not connected), keeps serving, and the guest
/// can be removed without force.
///
/// `--no-msix` is what makes the unplug clean: QEMU 11.1.3 aborts finalizing an unplugged
/// `vfio-user-pci` that has MSI-X (`memory_region_del_subregion: Assertion
/// 'subregion->container == mr' failed`: its vfio-user PBA teardown removes a region the
/// BAR's own teardown already took down), every time here.
#[test]
fn hot_plug_and_unplug_through_a_pcie_root_port() {
    use guest_tests::control::Ctl;
    use guest_tests::live::start_probe_guest;
    use serde_json::json;
    use std::time::Instant;

    let started = Instant::now();
    let bin = backend_binary().unwrap_or_else(|e| panic!("{e}"));
    let layout = SlicedLayout::inspect_with(&bin, LIVE_PROFILE, &[("hp", LIVE_SLICE)])
        .unwrap_or_else(|e| panic!("{e}"));
    let slice = layout.guest("hp").expect("hp").clone();
    let run_dir =
        guest_tests::paths::new_run_dir("backend-hotplug").unwrap_or_else(|e| panic!("{e}"));
    let backend =
        Backend::spawn_with_control(&bin, LIVE_PROFILE, &run_dir.join("backend.log"), &[])
            .unwrap_or_else(|e| panic!("{e}"));
    let ctl = Ctl::new(&bin, backend.control_socket().expect("control socket"));
    let socket = backend.path_of("hp");
    let (mem, pref) = root_port_reserves(&slice.layout);
    let args = slice.layout.identity_probe_args().set("hotplug", 1);
    let opts = live_options(args, &socket, "hotplug");
    let opts = GuestOptions {
        vfio_user_socket: None,
        ..opts
    }
    .qemu_args([
        "-device".to_string(),
        format!("pcie-root-port,id=rp1,chassis=1,slot=1,mem-reserve={mem},pref64-reserve={pref}"),
    ]);
    let mut guest = start_probe_guest(&opts).unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("GPUHOTPLUG ready", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let booted = started.elapsed();

    // The control socket creates the guest's socket; QEMU plugs the GPU in on it.
    assert!(ctl
        .list()
        .unwrap_or_else(|e| panic!("{e}"))
        .guests
        .is_empty());
    let added = ctl
        .add_without_msix(&socket, LIVE_SLICE)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (added.vram_start, added.connected, added.msix),
        (slice.start, false, false)
    );
    let plugged_at = Instant::now();
    let device = json!({
        "driver": "vfio-user-pci",
        "id": "gpu1",
        "bus": "rp1",
        "socket": {"type": "unix", "path": socket.to_string_lossy()},
    });
    guest
        .qmp()
        .and_then(|q| Ok(q.execute("device_add", Some(device))?))
        .unwrap_or_else(|e| panic!("device_add: {e}"));
    let appeared = guest
        .wait_for_line("GPUHOTPLUG appeared", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("GPUPROBE done", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let used_after = plugged_at.elapsed();
    let report = guest.report();
    eprintln!("{}", report.summary_table());
    assert_passed(
        &report,
        &[
            "device_found",
            "device_id",
            "class",
            "bar_sizes_pow2",
            "bars_assigned",
            "boot0_mmap",
            "boot0_devmem",
        ],
    );
    assert!(report.all_passed(), "{:#?}", report.failures());
    assert_eq!(slice.layout.bar_mismatches(&report), Vec::<String>::new());
    let bdf = report.device.as_ref().expect("device").bdf.clone();
    assert!(bdf.starts_with("0000:01:"), "behind the root port: {bdf}");
    let listed = ctl
        .guest(&socket)
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("listed");
    assert!(
        listed.connected && listed.traps.passed_reads > 0,
        "{listed:?}"
    );

    // Unplugged: the guest sees the GPU go, then powers off; QEMU ends cleanly.
    guest
        .qmp()
        .and_then(|q| Ok(q.execute("device_del", Some(json!({"id": "gpu1"})))?))
        .unwrap_or_else(|e| panic!("device_del: {e}"));
    let unplugged_at = Instant::now();
    let gone = guest
        .wait_for_line("GPUHOTPLUG gone", 0, LIVE_WAIT)
        .unwrap_or_else(|e| panic!("the guest did not see the GPU go: {e}"));
    let gone_after = unplugged_at.elapsed();

    // The backend noticed, and goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = ctl
            .guest(&socket)
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("still listed");
        if !g.connected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backend still lists the guest connected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl.remove(&socket, false)
        .unwrap_or_else(|e| panic!("removing the unplugged guest: {e}"));
    assert!(ctl
        .list()
        .unwrap_or_else(|e| panic!("{e}"))
        .guests
        .is_empty());
    guest.discard_logs();
    let ended = guest.wait_exit(LIVE_WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ended.status.success() && !ended.stderr.contains("Assertion"),
        "QEMU did not end cleanly after the unplug ({}):\n{}",
        ended.status,
        ended.stderr
    );
    eprintln!(
        "hot-plug: guest ready after {:.1} s; GPU seen ({appeared}) and probed {:.1} s after \
         device_add; unplugged ({gone}) {:.1} s after device_del; whole test {:.1} s",
        booted.as_secs_f64(),
        used_after.as_secs_f64(),
        gone_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(backend);
    if !guest_tests::paths::keep_runs() {
        let _ = std::fs::remove_dir_all(run_dir);
    }
}
