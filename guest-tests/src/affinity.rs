//! CPU pinning for measurements: run a closure with the calling thread restricted to some
//! CPUs. Processes started inside the closure (QEMU, the backend) inherit the restriction, which
//! is what `taskset -c <cpus> <command>` does.

use std::io;

use crate::error::{IoContext, Result};

/// The CPUs the calling thread may run on.
pub fn current() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is the empty set; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a valid, writable cpu_set_t.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the capacity of `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Restrict the calling thread to `cpus` (an empty list is rejected by the kernel).
pub fn set(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} out of range"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the given size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` with the calling thread pinned to `cpus` (`None`: no change), then restore the
/// previous set. Child processes started by `f` keep the pinned set for their whole life.
pub fn with_cpus<T>(cpus: Option<&[usize]>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(cpus) = cpus else {
        return f();
    };
    let before = current().ctx(|| "sched_getaffinity".into())?;
    set(cpus).ctx(|| format!("pinning to CPUs {cpus:?}"))?;
    let result = f();
    set(&before).ctx(|| format!("restoring the CPU set {before:?}"))?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_and_restore() {
        let before = current().unwrap();
        assert!(!before.is_empty());
        let first = before[0];
        let inside = with_cpus(Some(&[first]), || Ok(current().unwrap())).unwrap();
        assert_eq!(inside, [first]);
        assert_eq!(current().unwrap(), before);
    }
}
