//! The host floor of a trapped access: a plain unix-socket ping-pong between two processes with
//! the message sizes of a vfio-user 4-byte `REGION_READ` (a 32-byte request: 16-byte header +
//! 16-byte body; a 36-byte reply: the same plus 4 data bytes).
//!
//! A trapped guest read costs at least this round trip (plus QEMU's own thread hand-offs), so
//! it is the baseline the backend cannot beat by itself.

use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::stats::Latency;

/// Bytes of a vfio-user `REGION_READ` request for 4 bytes.
pub const REQUEST_BYTES: usize = 32;
/// Bytes of its reply (header, body, 4 data bytes).
pub const REPLY_BYTES: usize = 36;

/// Where the two processes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the scheduler puts them.
    Unpinned,
    /// Both pinned to the same CPU.
    SameCpu(usize),
    /// Pinned to two different CPUs.
    CrossCpu(usize, usize),
}

impl Placement {
    /// A short description for tables.
    pub fn describe(&self) -> String {
        match self {
            Placement::Unpinned => "unpinned".into(),
            Placement::SameCpu(c) => format!("both on CPU {c}"),
            Placement::CrossCpu(a, b) => format!("CPU {a} <-> CPU {b}"),
        }
    }

    fn cpus(&self) -> (Option<usize>, Option<usize>) {
        match *self {
            Placement::Unpinned => (None, None),
            Placement::SameCpu(c) => (Some(c), Some(c)),
            Placement::CrossCpu(a, b) => (Some(a), Some(b)),
        }
    }
}

fn cpu_set_of(cpu: usize) -> io::Result<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU out of range",
        ));
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; `cpu` is below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Ok(set)
}

/// The echo side, run in the forked child: read a request, write a reply, until EOF. Only
/// async-signal-safe calls (read, write, _exit), as required after fork in a possibly
/// multi-threaded parent.
fn echo_child(fd: RawFd) -> ! {
    let reply = [0x5au8; REPLY_BYTES];
    let mut buf = [0u8; REQUEST_BYTES];
    loop {
        let mut got = 0;
        while got < REQUEST_BYTES {
            // SAFETY: `buf[got..]` is valid for REQUEST_BYTES - got bytes.
            let n =
                unsafe { libc::read(fd, buf.as_mut_ptr().add(got).cast(), REQUEST_BYTES - got) };
            if n <= 0 {
                // SAFETY: reading errno of this thread right after the failed call.
                if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                    continue;
                }
                // EOF (the parent is done) or an error: leave without running destructors.
                // SAFETY: _exit is async-signal-safe and never returns.
                unsafe { libc::_exit(0) };
            }
            got += n as usize;
        }
        let mut sent = 0;
        while sent < REPLY_BYTES {
            // SAFETY: `reply[sent..]` is valid for REPLY_BYTES - sent bytes.
            let n = unsafe { libc::write(fd, reply.as_ptr().add(sent).cast(), REPLY_BYTES - sent) };
            if n <= 0 {
                // SAFETY: as above.
                if n < 0 && unsafe { *libc::__errno_location() } == libc::EINTR {
                    continue;
                }
                // SAFETY: as above.
                unsafe { libc::_exit(1) };
            }
            sent += n as usize;
        }
    }
}

/// Time `rounds` request/reply round trips (after `warmup` untimed ones) between this process
/// and a forked echo process over a connected `AF_UNIX` stream socket pair.
pub fn ping_pong(rounds: usize, warmup: usize, placement: Placement) -> io::Result<Latency> {
    let (parent_cpu, child_cpu) = placement.cpus();
    let child_set = child_cpu.map(cpu_set_of).transpose()?;
    let (mut ours, theirs) = UnixStream::pair()?;
    let before = crate::affinity::current()?;
    if let Some(cpu) = parent_cpu {
        crate::affinity::set(&[cpu])?;
    }
    // SAFETY: fork has no memory-safety preconditions; the child only runs `echo_child` (and
    // sched_setaffinity/close), which use async-signal-safe system calls only.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child: drop our copy of the parent's end (so that the parent closing
        // it gives us EOF) and pin ourselves; both are plain system calls on valid arguments.
        unsafe {
            libc::close(ours.as_raw_fd());
            if let Some(set) = &child_set {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
            }
        }
        echo_child(theirs.as_raw_fd());
    }
    let fork_error = (pid < 0).then(io::Error::last_os_error);
    drop(theirs);
    let result = match fork_error {
        Some(e) => Err(e),
        None => {
            let request = [0xa5u8; REQUEST_BYTES];
            let mut reply = [0u8; REPLY_BYTES];
            let mut round = |stream: &mut UnixStream| -> io::Result<()> {
                stream.write_all(&request)?;
                stream.read_exact(&mut reply)
            };
            let mut samples = Vec::with_capacity(rounds);
            let mut run = || -> io::Result<()> {
                for _ in 0..warmup {
                    round(&mut ours)?;
                }
                for _ in 0..rounds {
                    let t = Instant::now();
                    round(&mut ours)?;
                    samples.push(t.elapsed().as_nanos() as u64);
                }
                Ok(())
            };
            let r = run();
            drop(ours);
            let mut status = 0;
            // SAFETY: waiting for our own child, which exits on EOF.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            r.and_then(|()| {
                Latency::from_samples(&mut samples)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no rounds"))
            })
        }
    };
    crate::affinity::set(&before)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let l = ping_pong(200, 20, Placement::Unpinned).unwrap();
        assert_eq!(l.n, 200);
        assert!(l.min_ns > 0 && l.min_ns <= l.p50_ns && l.p50_ns <= l.p99_ns);
        let cpu = crate::affinity::current().unwrap()[0];
        assert_eq!(ping_pong(50, 5, Placement::SameCpu(cpu)).unwrap().n, 50);
    }
}
