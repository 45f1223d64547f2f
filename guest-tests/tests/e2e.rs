//! End-to-end tests: boot a real QEMU guest (TCG) running `gpu-guest-probe`.
//!
//! These tests need QEMU from `qemu-configs/install.sh`; they fail (never skip) if it cannot be
//! installed. Tests against the backend (`gpu-backend serve`) use
//! [`guest_tests::boot_guest_with_backend`] / [`guest_tests::with_backend`].

use guest_tests::{boot_guest_without_device, Outcome, ProbeArgs};

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
