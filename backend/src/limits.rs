//! Process resource limits the server depends on: the fd limit.
//!
//! Every guest connection holds a few fds (its socket and clones of it, its interrupt
//! eventfds, the fds of a message being handled), so a server of several guests wants the
//! most fds it may have. [`raise_fd_limit`] raises the soft `RLIMIT_NOFILE` to the hard limit
//! at start; the process-wide client-fd budget ([`Resources::process_default`]) then takes
//! half of it, leaving the other half as headroom for accepting connections and the
//! process's own fds, so accept never fails because one client holds too many.
//!
//! [`Resources::process_default`]: crate::vfio_user::budget::Resources::process_default

/// Fd limit assumed when the soft limit is unlimited (the kernel's `nr_open` default).
const UNLIMITED_FDS: u64 = 1 << 20;

/// Errors of changing the limits.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// `getrlimit`/`setrlimit(RLIMIT_NOFILE)` failed.
    #[error("{call}(RLIMIT_NOFILE) failed: {source}")]
    Rlimit {
        /// The failing call.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn get() -> Result<libc::rlimit, LimitsError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid local it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(LimitsError::Rlimit {
            call: "getrlimit",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(limit)
}

// `rlim_t` is `u64` on 64-bit Linux but not on every target: keep the conversion.
#[allow(clippy::useless_conversion)]
fn as_count(value: libc::rlim_t) -> u64 {
    if value == libc::RLIM_INFINITY {
        UNLIMITED_FDS
    } else {
        u64::try_from(value).unwrap_or(UNLIMITED_FDS)
    }
}

/// Raises the soft fd limit to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Result<u64, LimitsError> {
    let mut limit = get()?;
    if limit.rlim_cur != limit.rlim_max {
        let before = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(LimitsError::Rlimit {
                call: "setrlimit",
                source: std::io::Error::last_os_error(),
            });
        }
        log::debug!(
            "raised the soft fd limit from {} to {}",
            as_count(before),
            as_count(limit.rlim_cur)
        );
    }
    Ok(as_count(limit.rlim_cur))
}

/// The soft fd limit now (what `open` and `accept` are held to).
pub fn fd_limit() -> u64 {
    get().map_or(1024, |limit| as_count(limit.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let hard = as_count(get().unwrap().rlim_max);
        assert_eq!(raise_fd_limit().unwrap(), hard);
        assert_eq!(fd_limit(), hard);
        // Idempotent.
        assert_eq!(raise_fd_limit().unwrap(), hard);
    }
}
