//! Thin wrappers over the system calls the probe needs: mounting the pseudo file systems,
//! powering off, and the fatal-signal / watchdog handlers that make sure the probe never hangs
//! and never dies silently.

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::out;

/// Whether the handlers and `finish` power the machine off (false with `--no-poweroff`).
static POWER_OFF: AtomicBool = AtomicBool::new(true);

/// Choose whether `finish` and the signal handlers power off the machine.
pub fn set_power_off(on: bool) {
    POWER_OFF.store(on, Ordering::SeqCst);
}

/// Mount `fstype` on `target` unless `probe` already exists (meaning it is mounted).
pub fn mount_if_missing(fstype: &CStr, target: &CStr, probe: &str) -> io::Result<bool> {
    if std::path::Path::new(probe).exists() {
        return Ok(false);
    }
    let _ = std::fs::create_dir_all(target.to_str().unwrap_or("/"));
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Flush file systems and power off (or exit with `code` when power-off is disabled or fails).
pub fn finish(code: i32) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if POWER_OFF.load(Ordering::SeqCst) {
        // SAFETY: reboot with POWER_OFF has no memory-safety preconditions; it only returns on
        // error (e.g. not privileged), in which case we fall through to exit.
        unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    }
    std::process::exit(code)
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    let why: &[u8] = match sig {
        libc::SIGALRM => b"watchdog-timeout",
        libc::SIGBUS => b"SIGBUS",
        libc::SIGSEGV => b"SIGSEGV",
        libc::SIGILL => b"SIGILL",
        libc::SIGFPE => b"SIGFPE",
        libc::SIGABRT => b"SIGABRT",
        _ => b"signal",
    };
    out::emergency_fail(why, sig);
    // SAFETY: sync, reboot and _exit are async-signal-safe system calls.
    unsafe {
        libc::sync();
        if POWER_OFF.load(Ordering::SeqCst) {
            libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
        }
        libc::_exit(3);
    }
}

/// Install handlers for fatal signals and arm a watchdog of `timeout_secs` seconds: whatever
/// happens, a final `fail` + `done` line is printed and the machine powers off.
pub fn install_guards(timeout_secs: u32) {
    for sig in [
        libc::SIGALRM,
        libc::SIGBUS,
        libc::SIGSEGV,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
    ] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern "C"
        // function that only uses async-signal-safe operations.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(timeout_secs) };
}
