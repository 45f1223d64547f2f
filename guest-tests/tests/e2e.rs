//! End-to-end tests: boot a real QEMU guest (TCG) running `gpu-guest-probe`.
//!
//! These tests need QEMU from `qemu-configs/install.sh`; they fail (never skip) if it cannot be
//! installed. Each boot takes about 7-15 s on two cores.

use guest_tests::{
    boot_guest, boot_guest_without_device, with_backend, GuestOptions, Outcome, ProbeArgs,
    ProfileLayout,
};

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
