//! Console output: one `GPUPROBE ` line per fact, written with a single `write(2)` each so that
//! lines stay whole on the serial console, plus the pass/fail/skip bookkeeping.
//!
//! The counters and the name of the running check are atomics so that the fatal-signal and
//! watchdog handlers (see `sys`) can still print a final `fail` and `done` line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

/// Prefix of every machine-readable line.
pub const PREFIX: &str = "GPUPROBE ";

static PASS: AtomicU32 = AtomicU32::new(0);
static FAIL: AtomicU32 = AtomicU32::new(0);
static SKIP: AtomicU32 = AtomicU32::new(0);
static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(c"none".as_ptr() as *mut u8);
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(4);

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The device behaved as expected.
    Pass,
    /// It did not.
    Fail,
    /// The check could not run (missing parameter or unsupported access path).
    Skip,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        }
    }
}

/// Write raw bytes to stdout (the serial console) in one system call, retrying on EINTR and
/// short writes. Async-signal-safe.
pub fn write_raw(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid, initialized byte slice for the duration of the call.
        let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            // SAFETY: reading errno right after the failed call on this thread.
            if unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Print one fact: `GPUPROBE <kind> <fields>`.
pub fn fact(kind: &str, fields: &str) {
    let mut line = String::with_capacity(PREFIX.len() + kind.len() + fields.len() + 2);
    line.push_str(PREFIX);
    line.push_str(kind);
    if !fields.is_empty() {
        line.push(' ');
        line.push_str(fields);
    }
    line.push('\n');
    write_raw(line.as_bytes());
}

/// Remember which check is running (reported if the probe dies inside it).
pub fn set_current(name: &'static str) {
    CURRENT_LEN.store(0, Ordering::SeqCst);
    CURRENT_PTR.store(name.as_ptr() as *mut u8, Ordering::SeqCst);
    CURRENT_LEN.store(name.len(), Ordering::SeqCst);
}

/// Report the result of a check. `detail` is free text up to the end of the line; newlines are
/// replaced so that one check stays one line.
pub fn check(name: &'static str, outcome: Outcome, detail: &str) {
    match outcome {
        Outcome::Pass => PASS.fetch_add(1, Ordering::SeqCst),
        Outcome::Fail => FAIL.fetch_add(1, Ordering::SeqCst),
        Outcome::Skip => SKIP.fetch_add(1, Ordering::SeqCst),
    };
    let mut fields = String::new();
    let _ = write!(fields, "name={name} result={}", outcome.as_str());
    if !detail.is_empty() {
        fields.push_str(" detail=");
        fields.extend(
            detail
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
    }
    fact("check", &fields);
}

/// Shorthand for a passing check.
pub fn pass(name: &'static str, detail: &str) {
    check(name, Outcome::Pass, detail);
}

/// Shorthand for a failing check.
pub fn fail(name: &'static str, detail: &str) {
    check(name, Outcome::Fail, detail);
}

/// Shorthand for a skipped check.
pub fn skip(name: &'static str, detail: &str) {
    check(name, Outcome::Skip, detail);
}

/// Print the final `done` line.
pub fn done() {
    fact(
        "done",
        &format!(
            "pass={} fail={} skip={}",
            PASS.load(Ordering::SeqCst),
            FAIL.load(Ordering::SeqCst),
            SKIP.load(Ordering::SeqCst)
        ),
    );
}

/// A fixed-size line buffer usable without allocating (for signal handlers).
pub struct StackLine {
    buf: [u8; 256],
    len: usize,
}

impl StackLine {
    /// An empty line.
    pub const fn new() -> Self {
        StackLine {
            buf: [0; 256],
            len: 0,
        }
    }

    /// Append bytes, truncating at the buffer's end.
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    /// Append a decimal number.
    pub fn num(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    /// Write the line out.
    pub fn emit(&self) {
        write_raw(&self.buf[..self.len]);
    }
}

/// From a signal handler: report the running check as failed with `why`, then print `done`.
/// Uses no allocation and no locks.
pub fn emergency_fail(why: &[u8], signal: i32) {
    FAIL.fetch_add(1, Ordering::SeqCst);
    let ptr = CURRENT_PTR.load(Ordering::SeqCst);
    let len = CURRENT_LEN.load(Ordering::SeqCst);
    // SAFETY: CURRENT_PTR/CURRENT_LEN always describe a &'static str (set_current stores the
    // length last and clears it first, so a torn read yields at most a shorter prefix).
    let current = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    let mut line = StackLine::new();
    line.push(PREFIX.as_bytes())
        .push(b"check name=")
        .push(current)
        .push(b" result=fail detail=")
        .push(why)
        .push(b" signal=")
        .num(signal as u64)
        .push(b"\n");
    line.emit();
    let mut done = StackLine::new();
    done.push(PREFIX.as_bytes())
        .push(b"done pass=")
        .num(PASS.load(Ordering::SeqCst).into())
        .push(b" fail=")
        .num(FAIL.load(Ordering::SeqCst).into())
        .push(b" skip=")
        .num(SKIP.load(Ordering::SeqCst).into())
        .push(b"\n");
    done.emit();
}
