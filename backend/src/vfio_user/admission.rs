//! Who may connect to a server ([`PeerPolicy`], checked with `SO_PEERCRED`), and warnings
//! that a client can make repeat ([`RepeatedWarning`], [`RefusedPeers`]) logged once per
//! episode or per peer rather than once per attempt.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How often a warning that keeps repeating is summarized.
pub const REPEAT_PERIOD: Duration = Duration::from_secs(60);

/// Most distinct refused uids logged one by one per server; later ones are logged once
/// together (a peer cannot make the set grow without bound).
const MAX_LOGGED_PEERS: usize = 64;

/// The credentials of a connected peer (`SO_PEERCRED`): those of the process that called
/// `connect()` (or created the socket pair), as of that call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id (supplementary groups are not reported).
    pub gid: u32,
}

impl PeerCred {
    /// The credentials of `stream`'s peer.
    pub fn of(stream: &UnixStream) -> io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and `len` is `cred`'s size.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }
}

/// Which peers a server serves: anyone who can open the socket (no ids given), or only
/// peers whose uid or gid is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl PeerPolicy {
    /// Anyone who can open the socket (its file mode decides).
    pub fn anyone() -> PeerPolicy {
        PeerPolicy::default()
    }

    /// Also admits peers running as any of `uids`.
    pub fn allow_uids(mut self, uids: impl IntoIterator<Item = u32>) -> PeerPolicy {
        self.uids.extend(uids);
        self.uids.sort_unstable();
        self.uids.dedup();
        self
    }

    /// Also admits peers whose effective gid is any of `gids`.
    pub fn allow_gids(mut self, gids: impl IntoIterator<Item = u32>) -> PeerPolicy {
        self.gids.extend(gids);
        self.gids.sort_unstable();
        self.gids.dedup();
        self
    }

    /// The ids of both policies (an open policy adds none: an open policy united with a
    /// restricted one is the restricted one).
    pub fn union(&self, other: &PeerPolicy) -> PeerPolicy {
        self.clone()
            .allow_uids(other.uids.iter().copied())
            .allow_gids(other.gids.iter().copied())
    }

    /// Whether no ids are given (the socket's file mode is the only check).
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    /// The allowed uids.
    pub fn uids(&self) -> &[u32] {
        &self.uids
    }

    /// The allowed gids.
    pub fn gids(&self) -> &[u32] {
        &self.gids
    }

    /// Whether a peer with `cred` is served.
    pub fn admits(&self, cred: &PeerCred) -> bool {
        self.is_open()
            || self.uids.binary_search(&cred.uid).is_ok()
            || self.gids.binary_search(&cred.gid).is_ok()
    }
}

impl std::fmt::Display for PeerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_open() {
            return write!(f, "anyone who can open the socket");
        }
        write!(f, "uid {:?} or gid {:?}", self.uids, self.gids)
    }
}

/// What to do with one more occurrence of a repeated warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    /// The first of an episode: log it.
    First,
    /// A period has passed since the last report: log that this many more happened (this
    /// one included).
    Summary(u64),
    /// Counted, not logged.
    Counted,
}

/// A warning a peer can make repeat (a refused second client, a failing `accept`): the
/// first of an episode is logged, the rest counted and summarized at most once per period
/// and when the episode ends.
#[derive(Debug, Clone)]
pub struct RepeatedWarning {
    period: Duration,
    /// When the last report was made; `None`: no episode.
    reported: Option<Instant>,
    /// Occurrences since that report.
    unreported: u64,
}

impl RepeatedWarning {
    /// A warning summarized every `period`.
    pub fn new(period: Duration) -> RepeatedWarning {
        RepeatedWarning {
            period,
            reported: None,
            unreported: 0,
        }
    }

    /// One more occurrence at `now`.
    pub fn occur(&mut self, now: Instant) -> Occurrence {
        match self.reported {
            None => {
                self.reported = Some(now);
                Occurrence::First
            }
            Some(at) => {
                self.unreported += 1;
                if now.saturating_duration_since(at) >= self.period {
                    self.reported = Some(now);
                    Occurrence::Summary(std::mem::take(&mut self.unreported))
                } else {
                    Occurrence::Counted
                }
            }
        }
    }

    /// The count to summarize at `now` if a period has passed with unreported occurrences
    /// (the episode goes on).
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        let at = self.reported?;
        if self.unreported > 0 && now.saturating_duration_since(at) >= self.period {
            self.reported = Some(now);
            return Some(std::mem::take(&mut self.unreported));
        }
        None
    }

    /// How long from `now` until [`RepeatedWarning::due`] has something to report.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        let at = self.reported?;
        (self.unreported > 0).then(|| (at + self.period).saturating_duration_since(now))
    }

    /// The episode ended: the occurrences not yet reported, if any.
    pub fn end(&mut self) -> Option<u64> {
        self.reported.take()?;
        Some(std::mem::take(&mut self.unreported)).filter(|&n| n > 0)
    }
}

/// Peers refused for their credentials: each uid is logged once per server.
#[derive(Debug, Default)]
pub struct RefusedPeers {
    logged: HashSet<u32>,
    overflowed: bool,
}

impl RefusedPeers {
    /// A peer with `cred` was refused: whether to log it (the first refusal of its uid, or
    /// the first refusal past the per-server limit of distinct uids logged).
    pub fn should_log(&mut self, cred: &PeerCred) -> bool {
        if self.logged.contains(&cred.uid) {
            return false;
        }
        if self.logged.len() >= MAX_LOGGED_PEERS {
            return !std::mem::replace(&mut self.overflowed, true);
        }
        self.logged.insert(cred.uid);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(uid: u32, gid: u32) -> PeerCred {
        PeerCred { pid: 1, uid, gid }
    }

    #[test]
    fn a_policy_admits_listed_uids_or_gids_and_an_empty_one_admits_anyone() {
        assert!(PeerPolicy::anyone().admits(&cred(1234, 5678)));
        let p = PeerPolicy::anyone().allow_uids([107, 0]).allow_gids([36]);
        assert!(p.admits(&cred(107, 1)));
        assert!(p.admits(&cred(0, 1)));
        assert!(p.admits(&cred(5, 36)));
        assert!(!p.admits(&cred(5, 37)));
        assert!(!p.is_open());
        let q = PeerPolicy::anyone().allow_uids([5]).union(&p);
        assert!(q.admits(&cred(5, 1)) && q.admits(&cred(107, 1)) && !q.admits(&cred(6, 1)));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = PeerCred::of(&a).unwrap();
        // SAFETY: getuid/getgid/getpid have no preconditions.
        let (uid, gid, pid) = unsafe { (libc::geteuid(), libc::getegid(), libc::getpid()) };
        assert_eq!(c, PeerCred { pid, uid, gid });
    }

    #[test]
    fn a_repeated_warning_is_logged_once_then_summarized_per_period() {
        let t0 = Instant::now();
        let mut w = RepeatedWarning::new(Duration::from_secs(60));
        assert_eq!(w.next_due(t0), None);
        assert_eq!(w.occur(t0), Occurrence::First);
        for i in 1..5000 {
            assert_eq!(w.occur(t0 + Duration::from_millis(i)), Occurrence::Counted);
        }
        assert_eq!(
            w.next_due(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(w.due(t0 + Duration::from_secs(59)), None);
        assert_eq!(w.due(t0 + Duration::from_secs(60)), Some(4999));
        assert_eq!(w.due(t0 + Duration::from_secs(200)), None);
        assert_eq!(
            w.occur(t0 + Duration::from_secs(121)),
            Occurrence::Summary(1)
        );
        assert_eq!(w.occur(t0 + Duration::from_secs(122)), Occurrence::Counted);
        assert_eq!(w.end(), Some(1));
        assert_eq!(w.end(), None);
        // A new episode starts with a logged warning again.
        assert_eq!(w.occur(t0 + Duration::from_secs(130)), Occurrence::First);
        assert_eq!(w.end(), None);
    }

    #[test]
    fn refused_peers_are_logged_once_per_uid_and_the_set_stays_bounded() {
        let mut r = RefusedPeers::default();
        assert!(r.should_log(&cred(1000, 1)));
        assert!(!r.should_log(&cred(1000, 2)));
        assert!(r.should_log(&cred(1001, 1)));
        let logged = (2000..3000).filter(|&u| r.should_log(&cred(u, 1))).count();
        assert_eq!(logged, MAX_LOGGED_PEERS - 2 + 1);
        assert!(r.logged.len() <= MAX_LOGGED_PEERS);
    }
}
