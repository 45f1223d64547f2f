//! End-to-end tests: boot a real QEMU guest (TCG) running `gpu-guest-probe`.
//!
//! These tests need QEMU from `qemu-configs/install.sh`; they fail (never skip) if it cannot be
//! installed. Each boot takes about 7-15 s on two cores. One test function per profile, so that
//! the test harness runs them in parallel; the probe, the initramfs and the backend are built
//! once per test process.

use guest_tests::artifacts::backend_binary;
use guest_tests::isolation::{canaries_around, plant, verify};
use guest_tests::{
    boot_guest, boot_guest_with_backend, boot_guest_without_device, with_backend,
    with_sliced_backend, GuestOptions, HostVram, Outcome, ProbeArgs, ProbeReport, ProfileLayout,
    SlicedLayout,
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
