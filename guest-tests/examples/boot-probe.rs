//! Boot one guest running the probe and print its report; a manual tool for trying the
//! harness against any device.
//!
//! ```text
//! cargo run -p guest-tests --example boot-probe -- [--socket PATH] [--qemu-arg ARG]... \
//!     [--append WORD]... [key=value]...
//! ```
//!
//! `key=value` words become `gpuprobe.key=value` probe parameters. Example against QEMU's
//! in-process `edu` device, no backend needed:
//!
//! ```text
//! cargo run -p guest-tests --example boot-probe -- --qemu-arg -device --qemu-arg edu \
//!     vendor=0x1234 device=0x11e8 boot0=0x010000ed
//! ```

use guest_tests::{boot_guest, GuestOptions, ProbeArgs};

fn main() {
    let mut probe = ProbeArgs::new();
    let mut opts = GuestOptions::new(ProbeArgs::new()).label("boot-probe");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => opts.vfio_user_socket = args.next().map(Into::into),
            "--qemu-arg" => opts.extra_qemu_args.extend(args.next()),
            "--append" => {
                if let Some(w) = args.next() {
                    opts.extra_kernel_args =
                        format!("{} {w}", opts.extra_kernel_args).trim().to_string();
                }
            }
            kv => match kv.split_once('=') {
                Some((k, v)) => probe = probe.set(k, v),
                None => {
                    eprintln!("usage: boot-probe [--socket PATH] [--qemu-arg ARG]... [--append WORD]... [key=value]...");
                    std::process::exit(2);
                }
            },
        }
    }
    opts.probe = probe;
    match boot_guest(&opts) {
        Ok(run) => {
            println!("{}", run.report.summary_table());
            println!(
                "boot time {:.1} s; logs in {}",
                run.boot_time.as_secs_f64(),
                run.run_dir.display()
            );
            std::process::exit(if run.report.all_passed() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
