//! The hostile client (guest A): episodes of misbehaviour chosen by a seeded generator, each
//! on a connection that is made again whenever the server (or the episode) drops it.
//!
//! What A may get back is an answer to each complete message that asked for one, in order,
//! carrying the message's id (a reply, or an error reply of exactly 16 bytes with an errno), or
//! a disconnect. Anything else is a *violation*: no answer within [`REPLY_TIMEOUT`], an answer
//! out of order or to a message that asked for none, a send blocked for [`REPLY_TIMEOUT`], a
//! second client admitted while one is connected, an fd that lets A resize or reach more than
//! its region, data from past A's slice, or a socket A cannot connect to for
//! [`RECONNECT_LIMIT`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{flags, Command, RegionAccessMsg, HEADER_SIZE};
use gpu_backend::vfio_user::socket::SocketError;
use gpu_backend::vfio_user::test_client::{ClientError, Message, TestClient};

use crate::support::fds;
use crate::support::rng::Rng;

/// How long a complete message may wait for its answer, and a send may block.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long A may fail to connect to its own socket.
pub const RECONNECT_LIMIT: Duration = Duration::from_secs(12);
/// Config space: vendor 10de, device 1e02 (TU102), what the sync probe must read.
pub const VENDOR_DEVICE: [u8; 4] = [0xde, 0x10, 0x02, 0x1e];
/// Stop early after this many violations (the first ones are reported).
const MAX_VIOLATIONS: usize = 20;

/// A kind of misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Episode {
    /// Well-framed messages of any command with random, mutated or plausible payloads and
    /// odd fds, pipelined, then a sync probe.
    Fuzz,
    /// Random bytes, then hang up.
    Garbage,
    /// A header whose size is below 16, short of or past its payload.
    LyingSize,
    /// Part of a message, then hang up.
    Truncated,
    /// A message larger than the server takes whole (its payload is skipped): `E2BIG`, then
    /// the stream must still be in step.
    Oversized,
    /// REGION_READ/WRITE of every region, width and offset, posted or not.
    Region,
    /// Window register writes of every width and aperture floods of up to 1 MiB.
    Aperture,
    /// REGION_WRITE_MULTI with lying counts and bad entries.
    WriteMulti,
    /// DMA_MAP/UNMAP of every kind of fd, address, size and flag, then UNMAP_ALL.
    DmaStorm,
    /// DMA_MAPs, each with its own fd (or none), until refused; held, then released.
    DmaFlood,
    /// DMA_MAPs of a sparse 1 TiB memfd until refused; held, then released.
    BigMaps,
    /// SET_IRQS with odd fds (pipes, memfds, sockets, /dev/null, a directory) and trigger
    /// storms.
    Irqs,
    /// GET_REGION_INFO with odd `argsz`, then resizing, sealing and using the fds received.
    RegionFds,
    /// VERSION missing, repeated, of another major, with broken or extreme JSON.
    Handshake,
    /// Hanging up with replies in flight, half-closing, a second concurrent client, quick
    /// connect/close cycles.
    Reconnect,
    /// DEVICE_RESET.
    Reset,
    /// Replies of 1 MiB left unread for up to 1.5 s.
    SlowReader,
    /// Half a message, or replies never read: the server must drop A in bounded time.
    Stall,
}

impl Episode {
    /// Every episode.
    pub const ALL: [Episode; 18] = [
        Episode::Fuzz,
        Episode::Garbage,
        Episode::LyingSize,
        Episode::Truncated,
        Episode::Oversized,
        Episode::Region,
        Episode::Aperture,
        Episode::WriteMulti,
        Episode::DmaStorm,
        Episode::DmaFlood,
        Episode::BigMaps,
        Episode::Irqs,
        Episode::RegionFds,
        Episode::Handshake,
        Episode::Reconnect,
        Episode::Reset,
        Episode::SlowReader,
        Episode::Stall,
    ];

    /// The name used in reports and in `GPU_BACKEND_SOAK_EPISODES`.
    pub fn name(self) -> &'static str {
        match self {
            Episode::Fuzz => "fuzz",
            Episode::Garbage => "garbage",
            Episode::LyingSize => "lying-size",
            Episode::Truncated => "truncated",
            Episode::Oversized => "oversized",
            Episode::Region => "region",
            Episode::Aperture => "aperture",
            Episode::WriteMulti => "write-multi",
            Episode::DmaStorm => "dma-storm",
            Episode::DmaFlood => "dma-flood",
            Episode::BigMaps => "big-maps",
            Episode::Irqs => "irqs",
            Episode::RegionFds => "region-fds",
            Episode::Handshake => "handshake",
            Episode::Reconnect => "reconnect",
            Episode::Reset => "reset",
            Episode::SlowReader => "slow-reader",
            Episode::Stall => "stall",
        }
    }

    /// The episode called `name`.
    pub fn by_name(name: &str) -> Option<Episode> {
        Episode::ALL.into_iter().find(|e| e.name() == name)
    }

    fn weight(self) -> u32 {
        match self {
            Episode::Fuzz => 20,
            Episode::Region => 12,
            Episode::Aperture => 10,
            Episode::DmaStorm | Episode::Irqs => 6,
            Episode::LyingSize => 5,
            Episode::WriteMulti | Episode::Garbage | Episode::Reconnect => 4,
            Episode::Truncated | Episode::RegionFds | Episode::Handshake => 3,
            Episode::Oversized | Episode::Reset | Episode::SlowReader => 2,
            Episode::DmaFlood | Episode::BigMaps | Episode::Stall => 3,
        }
    }

    /// Episodes that take seconds run at most once per this interval.
    fn min_interval(self) -> Duration {
        match self {
            Episode::DmaFlood | Episode::BigMaps => Duration::from_secs(8),
            Episode::Stall => Duration::from_secs(60),
            _ => Duration::ZERO,
        }
    }
}

/// What a request got.
#[derive(Debug)]
pub enum Answer {
    /// A successful reply.
    Reply(Message),
    /// An error reply with this errno.
    Errno(i32),
    /// The connection is gone (dropped by the server, or after a violation).
    Gone,
}

/// What A did and got.
#[derive(Debug, Default)]
pub struct Tally {
    /// Episodes run, by name.
    pub episodes: BTreeMap<&'static str, u64>,
    /// Longest run of each episode kind.
    pub longest: BTreeMap<&'static str, Duration>,
    /// Messages (and raw byte strings) sent.
    pub sent: u64,
    /// Successful replies.
    pub replies: u64,
    /// Error replies, by errno.
    pub errnos: BTreeMap<i32, u64>,
    /// Connections made.
    pub connections: u64,
    /// Connections the server closed on A.
    pub disconnects: u64,
    /// Connection attempts refused (A's previous connection still being served).
    pub refused: u64,
    /// How each DMA flood ended.
    pub flood_results: Vec<String>,
    /// How long the server took to drop A in stall episodes.
    pub stall_drops: Vec<(&'static str, Duration)>,
    /// Violations (the first [`MAX_VIOLATIONS`]).
    pub violations: Vec<String>,
}

/// The fds A sends: right ones and wrong ones.
pub struct FdKit {
    /// 64 KiB memfd sealed like QEMU's guest RAM.
    pub small: OwnedFd,
    /// 64 KiB memfd without seals.
    pub unsealed: OwnedFd,
    /// Sparse 1 TiB memfd sealed like guest RAM.
    pub big: OwnedFd,
    /// An eventfd (the right kind for interrupts).
    pub event: OwnedFd,
    /// A pipe nobody reads: its write end stands in for an eventfd.
    pub pipe: (OwnedFd, OwnedFd),
    /// /dev/null.
    pub null: OwnedFd,
    /// A directory.
    pub dir: OwnedFd,
    /// A connected socket.
    pub socket: UnixStream,
}

/// Size of [`FdKit::big`].
pub const BIG_MEMFD: u64 = 1 << 40;
/// Size of [`FdKit::small`] and [`FdKit::unsealed`].
pub const SMALL_MEMFD: u64 = 64 << 10;

impl FdKit {
    fn new() -> FdKit {
        FdKit {
            small: fds::memfd("hostile-ram", SMALL_MEMFD, fds::GUEST_RAM_SEALS),
            unsealed: fds::memfd("hostile-unsealed", SMALL_MEMFD, 0),
            big: fds::memfd("hostile-big", BIG_MEMFD, fds::GUEST_RAM_SEALS),
            event: fds::eventfd(),
            pipe: fds::pipe(),
            null: fds::open_read_only("/dev/null"),
            dir: fds::open_read_only("/"),
            socket: UnixStream::pair().expect("socketpair").0,
        }
    }

    /// Any fd of the kit, right or wrong for the purpose.
    pub fn any(&self, rng: &mut Rng) -> BorrowedFd<'_> {
        match rng.below(9) {
            0 => self.small.as_fd(),
            1 => self.unsealed.as_fd(),
            2 => self.big.as_fd(),
            3 => self.event.as_fd(),
            4 => self.pipe.1.as_fd(),
            5 => self.pipe.0.as_fd(),
            6 => self.null.as_fd(),
            7 => self.dir.as_fd(),
            _ => self.socket.as_fd(),
        }
    }
}

/// Whether a socket error means the peer hung up.
pub fn is_disconnect(error: &SocketError) -> bool {
    match error {
        SocketError::Eof | SocketError::Closed => true,
        SocketError::Io(e) => matches!(
            e.raw_os_error(),
            Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ENOTCONN)
        ),
        _ => false,
    }
}

/// Guest A.
pub struct Hostile {
    socket: PathBuf,
    /// The episode generator.
    pub rng: Rng,
    conn: Option<TestClient>,
    /// `max_data_xfer_size` negotiated on the current connection.
    pub max_xfer: u32,
    /// What happened.
    pub tally: Tally,
    violations_total: usize,
    /// The fds A sends (shared, so episodes can borrow them while sending).
    pub kit: Arc<FdKit>,
    allowed: Vec<Episode>,
    last_run: BTreeMap<Episode, Instant>,
    wedged: bool,
}

impl Hostile {
    /// A hostile client of `socket`, seeded, limited to `allowed` episodes.
    pub fn new(socket: PathBuf, seed: u64, allowed: Vec<Episode>) -> Hostile {
        Hostile {
            socket,
            rng: Rng::new(seed),
            conn: None,
            max_xfer: 1 << 20,
            tally: Tally::default(),
            violations_total: 0,
            kit: Arc::new(FdKit::new()),
            allowed,
            last_run: BTreeMap::new(),
            wedged: false,
        }
    }

    /// Run episodes until `until` (the last one finishes), then hang up. Returns the fds A
    /// sent too: the caller keeps them (the pipe nobody reads, above all) until the server
    /// has been stopped, so closing them cannot unblock a server thread stuck on them.
    pub fn run(mut self, until: Instant) -> (Tally, Arc<FdKit>) {
        while Instant::now() < until && self.violations_total < MAX_VIOLATIONS && !self.wedged {
            let Some(episode) = self.choose() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            *self.tally.episodes.entry(episode.name()).or_default() += 1;
            let started = Instant::now();
            self.last_run.insert(episode, started);
            self.episode(episode);
            let took = started.elapsed();
            let longest = self.tally.longest.entry(episode.name()).or_default();
            *longest = (*longest).max(took);
        }
        self.drop_conn();
        (self.tally, self.kit)
    }

    fn choose(&mut self) -> Option<Episode> {
        let now = Instant::now();
        let weights: Vec<u32> = self
            .allowed
            .iter()
            .map(|&e| {
                let rested = self
                    .last_run
                    .get(&e)
                    .is_none_or(|&t| now.duration_since(t) >= e.min_interval());
                if rested {
                    e.weight()
                } else {
                    0
                }
            })
            .collect();
        if weights.iter().all(|&w| w == 0) {
            return None;
        }
        Some(self.allowed[self.rng.weighted(&weights)])
    }

    fn episode(&mut self, episode: Episode) {
        match episode {
            Episode::Fuzz => self.fuzz(),
            Episode::Garbage => self.garbage(),
            Episode::LyingSize => self.lying_size(),
            Episode::Truncated => self.truncated(),
            Episode::Oversized => self.oversized(),
            Episode::Region => self.region(),
            Episode::Aperture => self.aperture(),
            Episode::WriteMulti => self.write_multi(),
            Episode::DmaStorm => self.dma_storm(),
            Episode::DmaFlood => self.dma_flood(),
            Episode::BigMaps => self.big_maps(),
            Episode::Irqs => self.irqs(),
            Episode::RegionFds => self.region_fds(),
            Episode::Handshake => self.handshake(),
            Episode::Reconnect => self.reconnect(),
            Episode::Reset => self.reset(),
            Episode::SlowReader => self.slow_reader(),
            Episode::Stall => self.stall(),
        }
    }

    // -----------------------------------------------------------------------------------
    // The connection

    /// A new client on A's socket (not negotiated); retried while the server refuses.
    pub fn connect_raw(&mut self) -> Option<TestClient> {
        let started = Instant::now();
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(stream) => {
                    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
                    let mut client = TestClient::new(stream);
                    client.set_reply_timeout(REPLY_TIMEOUT);
                    self.tally.connections += 1;
                    return Some(client);
                }
                Err(_) => self.tally.refused += 1,
            }
            if started.elapsed() > RECONNECT_LIMIT {
                self.violation(format!(
                    "cannot connect to A's socket for {RECONNECT_LIMIT:?}"
                ));
                self.wedged = true;
                return None;
            }
            std::thread::sleep(Duration::from_millis(self.rng.range(1, 20)));
        }
    }

    /// The current connection, made (and negotiated with QEMU's capabilities) if needed.
    pub fn conn(&mut self) -> Option<&mut TestClient> {
        if self.conn.is_none() {
            let started = Instant::now();
            loop {
                let mut client = self.connect_raw()?;
                match client.version() {
                    Ok((_, caps)) => {
                        self.max_xfer = caps.max_data_xfer_size.unwrap_or(1 << 20) as u32;
                        self.conn = Some(client);
                        break;
                    }
                    // Accepted and closed at once: the previous connection is still served.
                    Err(ClientError::Socket(e)) if is_disconnect(&e) => self.tally.refused += 1,
                    Err(e) => {
                        self.violation(format!("VERSION with QEMU's capabilities: {e}"));
                        return None;
                    }
                }
                if started.elapsed() > RECONNECT_LIMIT {
                    self.violation(format!(
                        "A's socket refused every client for {RECONNECT_LIMIT:?}"
                    ));
                    self.wedged = true;
                    return None;
                }
                std::thread::sleep(Duration::from_millis(self.rng.range(1, 20)));
            }
        }
        self.conn.as_mut()
    }

    /// Use `client` as the current connection (one made with [`Hostile::connect_raw`]).
    pub fn adopt(&mut self, client: TestClient, max_xfer: u32) {
        self.conn = Some(client);
        self.max_xfer = max_xfer;
    }

    /// Whether a connection is open.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Hang up.
    pub fn drop_conn(&mut self) {
        self.conn = None;
    }

    /// The server closed A's connection.
    pub fn gone(&mut self) {
        self.tally.disconnects += 1;
        self.conn = None;
    }

    /// Record a violation and hang up (the stream can no longer be trusted).
    pub fn violation(&mut self, what: String) {
        self.violations_total += 1;
        if self.tally.violations.len() < MAX_VIOLATIONS {
            self.tally.violations.push(what);
        }
        self.conn = None;
    }

    fn send_failed(&mut self, error: ClientError, what: &str) {
        match error {
            ClientError::Socket(e) if is_disconnect(&e) => self.gone(),
            e => self.violation(format!("{what}: send failed: {e}")),
        }
    }

    /// Send raw bytes (with fds) on the current connection; false if it is gone.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>], what: &str) -> bool {
        if self.conn().is_none() {
            return false;
        }
        self.tally.sent += 1;
        let Some(client) = self.conn.as_mut() else {
            return false;
        };
        let sent = if fds.len() > 16 {
            // More than the test client sends: the fds with the first bytes, then the rest.
            fds::send_with_many_fds(client.stream().as_fd(), bytes, fds)
                .map_err(|e| ClientError::Socket(SocketError::Io(e)))
                .and_then(|n| client.send_raw(&bytes[n..], &[]))
        } else {
            client.send_raw(bytes, fds)
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                self.send_failed(e, what);
                false
            }
        }
    }

    /// Send a well-framed command; its id, or `None` if the connection is gone.
    pub fn send(
        &mut self,
        command: u16,
        msg_flags: u32,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        what: &str,
    ) -> Option<u16> {
        if fds.len() > 16 {
            // More fds than the test client sends in one message: framed here.
            let id = self.rng.next_u32() as u16;
            let payload = parts.concat();
            let message = crate::payloads::frame(id, command, msg_flags, None, &payload);
            return self.send_raw(&message, fds, what).then_some(id);
        }
        self.conn()?;
        self.tally.sent += 1;
        let client = self.conn.as_mut()?;
        match client.send(command, msg_flags, parts, fds) {
            Ok(id) => Some(id),
            Err(e) => {
                self.send_failed(e, what);
                None
            }
        }
    }

    /// Wait for the answer to message `id`.
    pub fn answer(&mut self, id: u16, what: &str) -> Answer {
        let Some(client) = self.conn.as_mut() else {
            return Answer::Gone;
        };
        match client.recv() {
            Ok(msg) => {
                let h = msg.header;
                if h.id != id || h.msg_type() != flags::TYPE_REPLY {
                    self.violation(format!(
                        "{what}: expected the answer to id {id}, got id {} command {} flags {:#x}",
                        h.id, h.command, h.flags
                    ));
                    return Answer::Gone;
                }
                if h.flags & flags::ERROR != 0 {
                    if h.size as usize != HEADER_SIZE || !msg.payload.is_empty() || h.error == 0 {
                        self.violation(format!(
                            "{what}: malformed error reply (size {}, errno {})",
                            h.size, h.error
                        ));
                        return Answer::Gone;
                    }
                    *self.tally.errnos.entry(h.error as i32).or_default() += 1;
                    return Answer::Errno(h.error as i32);
                }
                self.tally.replies += 1;
                Answer::Reply(msg)
            }
            Err(ClientError::Socket(e)) if is_disconnect(&e) => {
                self.gone();
                Answer::Gone
            }
            Err(ClientError::Socket(SocketError::Timeout)) => {
                self.violation(format!("{what}: no answer within {REPLY_TIMEOUT:?}"));
                Answer::Gone
            }
            Err(e) => {
                self.violation(format!("{what}: {e}"));
                Answer::Gone
            }
        }
    }

    /// Send a well-framed command and wait for its answer.
    pub fn request(
        &mut self,
        command: Command,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        what: &str,
    ) -> Answer {
        match self.send(command as u16, 0, parts, fds, what) {
            Some(id) => self.answer(id, what),
            None => Answer::Gone,
        }
    }

    /// REGION_READ; the data, `Err(errno)`, or `Err(0)` if the connection is gone. A reply
    /// with more data than asked for is a violation.
    pub fn read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
        what: &str,
    ) -> Result<Vec<u8>, i32> {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        let _ = RegionAccessMsg {
            offset,
            region,
            count,
        }
        .encode(&mut req);
        match self.request(Command::RegionRead, &[&req], &[], what) {
            Answer::Reply(msg) => {
                let served = RegionAccessMsg::decode(&msg.payload).map_or(u32::MAX, |m| m.count);
                let data = msg.payload.get(RegionAccessMsg::SIZE..).unwrap_or(&[]);
                if served > count || data.len() != served as usize {
                    self.violation(format!(
                        "{what}: asked {count} bytes, reply says {served} and carries {}",
                        data.len()
                    ));
                    return Err(0);
                }
                Ok(data.to_vec())
            }
            Answer::Errno(e) => Err(e),
            Answer::Gone => Err(0),
        }
    }

    /// REGION_WRITE, posted (`NO_REPLY`) or answered; false if the connection is gone.
    pub fn write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
        what: &str,
    ) -> bool {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        let _ = RegionAccessMsg {
            offset,
            region,
            count: data.len() as u32,
        }
        .encode(&mut req);
        let msg_flags = if posted { flags::NO_REPLY } else { 0 };
        let Some(id) = self.send(
            Command::RegionWrite as u16,
            msg_flags,
            &[&req, data],
            &[],
            what,
        ) else {
            return false;
        };
        posted || !matches!(self.answer(id, what), Answer::Gone)
    }

    /// The sync probe: config space must read the vendor and device id, in step.
    pub fn probe(&mut self, what: &str) {
        if self.conn.is_none() {
            return;
        }
        match self.read(7, 0, 4, what) {
            Ok(data) if data == VENDOR_DEVICE => {}
            Ok(data) => self.violation(format!("{what}: config space reads {data:02x?}")),
            Err(0) => {}
            Err(e) => self.violation(format!("{what}: config read failed with errno {e}")),
        }
    }

    /// Read whatever the server still sends for a moment, then hang up (after bytes that may
    /// have put the stream out of step).
    pub fn drain_and_drop(&mut self) {
        if let Some(client) = self.conn.as_mut() {
            client.set_reply_timeout(Duration::from_millis(50));
            for _ in 0..64 {
                if client.recv().is_err() {
                    break;
                }
            }
        }
        self.conn = None;
    }
}
