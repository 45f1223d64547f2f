//! Hostile clients against the real `gpu-backend serve`: each test acts as a misbehaving
//! QEMU would (issue "Hostile clients cannot crash, starve or stall the backend", defects
//! 1-4), and checks that the server stays up, that another guest keeps working with its data
//! intact, and that the offender only ever gets errnos.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{dma_flags, irq_flags};
use gpu_backend::vfio_user::test_client::{ClientError, TestClient};
use gpu_backend::vfio_user::Errno;

#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

/// The display (vhost-user GPU) rig: two guests with displays.
#[path = "hostile/display_rig.rs"]
mod display_rig;

/// Hostile chains, rings and guest memory at the display's transport.
#[path = "hostile/display_chains.rs"]
mod display_chains;

/// A display flooded or stalled by its guest or its QEMU stalls no other guest.
#[path = "hostile/display_stalls.rs"]
mod display_stalls;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
/// VRAM BAR (BAR1) and instance-memory BAR (BAR3) region indexes.
const VRAM_BAR: u32 = 1;
const INSTANCE_BAR: u32 = 3;
/// MSI-X interrupt index.
const MSIX: u32 = 2;
const RW: u32 = dma_flags::MAP_READ | dma_flags::MAP_WRITE;
/// The default per-connection budget (`Resources::CONNECTION`).
const MAPPED_BYTES_BUDGET: u64 = 4 * TIB;
const MAPPINGS_BUDGET: usize = 4096;

/// A `gpu-backend serve` process, killed if the test fails before stopping it.
struct Serve {
    child: Child,
    dir: PathBuf,
}

impl Serve {
    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gpu-backend-hostile-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `serve --socket`: one guest given the whole GPU.
    fn whole(name: &str) -> (Serve, PathBuf) {
        let dir = Serve::dir(name);
        let socket = dir.join("whole.sock");
        let serve = Serve::spawn(dir, &["--socket".into(), socket.display().to_string()]);
        serve.wait_for(&socket);
        (serve, socket)
    }

    /// `serve --guest a --guest b`: two sliced guests, the hostile one and a good one.
    fn sliced(name: &str) -> (Serve, PathBuf, PathBuf) {
        let dir = Serve::dir(name);
        let (bad, good) = (dir.join("bad.sock"), dir.join("good.sock"));
        let args = [
            "--guest".into(),
            format!("{}:6M", bad.display()),
            "--guest".into(),
            format!("{}:4M", good.display()),
        ];
        let serve = Serve::spawn(dir, &args);
        serve.wait_for(&bad);
        serve.wait_for(&good);
        (serve, bad, good)
    }

    fn spawn(dir: PathBuf, args: &[String]) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
            .args(["serve", "--profile", "tu102-24g"])
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn gpu-backend serve");
        Serve { child, dir }
    }

    fn wait_for(&self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the server died: {status}");
        }
    }

    /// `result` of a request made after an attack; if it failed, whether the server died.
    fn survived<T: std::fmt::Debug>(&mut self, what: &str, result: Result<T, ClientError>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => {
                std::thread::sleep(Duration::from_millis(200));
                let status = self.child.try_wait().unwrap();
                panic!("{what} failed with {e}; server exit status: {status:?}");
            }
        }
    }

    /// Open fds of the server.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// The server's memory mappings (lines of `/proc/PID/maps`).
    fn mappings(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .unwrap()
            .lines()
            .count()
    }

    /// The server's address space, bytes (`VmSize`).
    fn address_space(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// SIGTERM: the server must exit cleanly within `within`, whatever its clients do.
    fn stop_within(mut self, within: Duration) {
        self.assert_running();
        // SAFETY: kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) },
            0
        );
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                break;
            }
            assert!(
                start.elapsed() < within,
                "serve did not stop within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that has done VERSION; retries while the server still refuses (its previous
/// client being torn down).
fn connect(socket: &Path) -> TestClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut client) = TestClient::connect(socket) {
            if client.version().is_ok() {
                return client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "cannot connect to {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn errno_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> i32 {
    match result {
        Err(ClientError::Errno(Errno(e))) => e,
        other => panic!("expected an errno reply, got {other:?}"),
    }
}

fn memfd(name: &std::ffi::CStr, size: u64, seals: libc::c_int) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscalls on our memfd.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), size as libc::off_t), 0);
        assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
    }
    fd
}

/// Guest RAM as QEMU's `memory-backend-memfd` makes it (sealed against resizing).
fn guest_ram(size: u64) -> OwnedFd {
    memfd(c"guest-ram", size, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd creation.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn eventfd_count(fd: BorrowedFd<'_>) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: an 8-byte read into a local buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        0
    }
}

fn set_msix_eventfd(
    client: &mut TestClient,
    vector: u32,
    fd: BorrowedFd<'_>,
) -> Result<(), ClientError> {
    client.set_irqs(
        MSIX,
        irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
        vector,
        1,
        &[],
        &[fd],
    )
}

fn trigger_msix(client: &mut TestClient, vector: u32) -> Result<(), ClientError> {
    client.set_irqs(
        MSIX,
        irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
        vector,
        1,
        &[],
        &[],
    )
}

/// The well-behaved guest: maps its RAM, takes an interrupt, and checks that the canary it
/// wrote to its VRAM BAR earlier is intact and that a fresh one reads back.
fn good_guest_works(good: &mut TestClient, canary: &[u8], round: u8) {
    assert_eq!(
        good.region_read(VRAM_BAR, 0x1000, canary.len() as u32)
            .unwrap(),
        canary
    );
    let fresh = [round; 64];
    good.region_write(VRAM_BAR, 0x2000 + u64::from(round) * 64, &fresh, false)
        .unwrap();
    assert_eq!(
        good.region_read(VRAM_BAR, 0x2000 + u64::from(round) * 64, 64)
            .unwrap(),
        fresh
    );
    let ram = guest_ram(2 * MIB);
    let iova = 0x1_0000_0000 + u64::from(round) * 4 * MIB;
    good.dma_map(RW, 0, iova, 2 * MIB, Some(ram.as_fd()))
        .unwrap();
    let irq = eventfd();
    set_msix_eventfd(good, 0, irq.as_fd()).unwrap();
    trigger_msix(good, 0).unwrap();
    assert_eq!(eventfd_count(irq.as_fd()), 1);
    good.dma_unmap(0, iova, 2 * MIB).unwrap();
}

fn plant_canary(good: &mut TestClient) -> Vec<u8> {
    let canary: Vec<u8> = (0..256u32).map(|i| (i * 7 + 3) as u8).collect();
    good.region_write(VRAM_BAR, 0x1000, &canary, false).unwrap();
    canary
}

/// Defect 1: a client that `ftruncate`s a memfd it was handed, then reads the BAR past the
/// new end, must not crash the server (SIGBUS): every memfd handed out is sealed.
#[test]
fn handed_out_memfds_cannot_be_resized_under_the_server() {
    // The whole GPU: VRAM and instance memory come as the emulator's own memfds.
    let (mut serve, socket) = Serve::whole("truncate-whole");
    let mut hostile = connect(&socket);
    for (region, probe) in [(VRAM_BAR, 8192), (INSTANCE_BAR, 8192)] {
        let (info, _, fd) = hostile.region_info(region, 512).unwrap();
        let fd = fd.expect("the BAR is offered for mmap");
        // Shrink the file, then read the BAR past the new end.
        // SAFETY: plain syscall on an fd we were handed.
        let shrunk = unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        let read = hostile.region_read(region, probe, 8);
        assert_eq!(serve.survived("a read past the new end", read).len(), 8);
        let last = hostile.region_read(region, info.size - 4096, 4096);
        assert_eq!(serve.survived("a read at the end", last).len(), 4096);
        assert_eq!(
            (shrunk, errno),
            (-1, Some(libc::EPERM)),
            "BAR {region} shrank"
        );
        // SAFETY: plain syscalls on an fd we were handed; refusing them is the point.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), 0), -1);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), i64::MAX / 2), -1);
        }
    }
    // What the fd maps is exactly the BAR: a byte written through it reads back trapped.
    let (info, _, fd) = hostile.region_info(VRAM_BAR, 512).unwrap();
    let fd = fd.unwrap();
    let at = 0x3000u64;
    // SAFETY: a fresh shared mapping of one page of the handed-out memfd, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            (info.offset + at) as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), p.cast::<u8>(), 6);
        libc::munmap(p, 4096);
    }
    assert_eq!(hostile.region_read(VRAM_BAR, at, 6).unwrap(), b"mapped");
    drop(hostile);
    serve.assert_running();
    serve.stop_within(Duration::from_secs(5));

    // Sliced guests get their slice's own memfd: the same attack, and the other guest's
    // data is untouched.
    let (mut serve, bad, good) = Serve::sliced("truncate-sliced");
    let mut good = connect(&good);
    let canary = plant_canary(&mut good);
    let mut hostile = connect(&bad);
    let (info, _, fd) = hostile.region_info(VRAM_BAR, 512).unwrap();
    let fd = fd.expect("the slice is offered for mmap");
    // SAFETY: plain syscall on an fd we were handed.
    let shrunk = unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) };
    let read = hostile.region_read(VRAM_BAR, 6 * MIB - 8, 8);
    assert_eq!(serve.survived("a read past the new end", read).len(), 8);
    assert_eq!(shrunk, -1);
    assert!(info.size >= 6 * MIB);
    good_guest_works(&mut good, &canary, 1);
    serve.stop_within(Duration::from_secs(5));
}

/// Defect 2: a pipe given as an interrupt eventfd is refused; an eventfd the client makes
/// blocking and fills cannot wedge the connection thread; SIGTERM still ends the process.
#[test]
fn interrupt_fds_that_are_not_well_behaved_eventfds_cannot_wedge_anything() {
    let (mut serve, bad, good) = Serve::sliced("pipe-irq");
    let mut good = connect(&good);
    let canary = plant_canary(&mut good);
    let mut hostile = connect(&bad);

    let (_read_end, write_end) = std::io::pipe().unwrap();
    assert_eq!(
        errno_of(set_msix_eventfd(&mut hostile, 0, write_end.as_fd())),
        libc::EINVAL
    );
    // Other kinds of fd are refused too: a socket, a regular file, a timerfd.
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let ram = guest_ram(4096);
    // SAFETY: plain timerfd creation.
    let tfd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    // SAFETY: a fresh fd we own.
    let tfd = unsafe { OwnedFd::from_raw_fd(tfd) };
    for fd in [sock.as_fd(), ram.as_fd(), tfd.as_fd()] {
        assert_eq!(
            errno_of(set_msix_eventfd(&mut hostile, 0, fd)),
            libc::EINVAL
        );
    }
    // The attack: 8193 triggers; nothing is configured, so nothing is written.
    let start = Instant::now();
    for _ in 0..8193 {
        trigger_msix(&mut hostile, 0).unwrap();
    }
    // A real eventfd, then made blocking (the client's description) and filled: each
    // write would block forever. The first trigger gives up after the write bound and drops
    // the fd; the rest cost nothing.
    let efd = eventfd();
    set_msix_eventfd(&mut hostile, 0, efd.as_fd()).unwrap();
    set_msix_eventfd(&mut hostile, 1, efd.as_fd()).unwrap();
    // SAFETY: fcntl/write on our own eventfd.
    unsafe {
        assert_eq!(libc::fcntl(efd.as_raw_fd(), libc::F_SETFL, 0), 0);
        let full = (u64::MAX - 1).to_ne_bytes();
        assert_eq!(libc::write(efd.as_raw_fd(), full.as_ptr().cast(), 8), 8);
    }
    for i in 0..8193u32 {
        trigger_msix(&mut hostile, i % 2).unwrap();
        if i % 1024 == 0 {
            good_guest_works(&mut good, &canary, (i / 1024) as u8 + 1);
        }
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "16386 triggers took {took:?}"
    );
    assert_eq!(
        eventfd_count(efd.as_fd()),
        u64::MAX - 1,
        "the counter is the client's"
    );
    // The hostile connection still answers, and so does the good one.
    assert_eq!(hostile.region_read(VRAM_BAR, 0, 4).unwrap().len(), 4);
    good_guest_works(&mut good, &canary, 20);
    serve.assert_running();
    // Both clients still connected: SIGTERM ends the process promptly all the same.
    serve.stop_within(Duration::from_secs(5));
}

/// Defect 3: ~20,000 DMA maps, each with its own small sealed memfd, must not use up the
/// server's fds: a map keeps no fd, and the maps themselves are budgeted.
#[test]
fn twenty_thousand_dma_maps_with_their_own_fds_hold_no_fds() {
    const MAPS: u64 = 20_000;
    // Sliced: the maps are recorded (a sliced guest's memory is never mapped), all accepted
    // within the DMA map budget, and none keeps an fd.
    let (mut serve, bad, good) = Serve::sliced("fds-sliced");
    let mut good_client = connect(&good);
    let canary = plant_canary(&mut good_client);
    let fds_before = serve.fds();
    let mut hostile = connect(&bad);
    for i in 0..MAPS {
        let fd = memfd(c"hostile", 4096, libc::F_SEAL_SHRINK);
        hostile
            .dma_map(RW, 0, 0x1000_0000 + i * 4096, 4096, Some(fd.as_fd()))
            .unwrap();
    }
    let held = serve.fds();
    assert!(
        held <= fds_before + 8,
        "the server holds {held} fds, {fds_before} before 20,000 maps"
    );
    // Others still connect, map their RAM and take eventfds.
    drop(good_client);
    let mut good_client = connect(&good);
    good_guest_works(&mut good_client, &canary, 1);
    hostile.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).unwrap();
    serve.assert_running();
    serve.stop_within(Duration::from_secs(5));

    // The whole GPU maps guest memory (it is lent to the GPU): mapped maps are held to the
    // mappings budget; the rest are kept but reached over the socket (a guest with a vIOMMU
    // legitimately makes thousands), still without keeping their fds.
    let (mut serve, socket) = Serve::whole("fds-whole");
    let fds_before = serve.fds();
    let mappings_before = serve.mappings();
    let mut hostile = connect(&socket);
    for i in 0..MAPS {
        let fd = memfd(c"hostile", 4096, libc::F_SEAL_SHRINK);
        let mapped = hostile.dma_map(RW, 0, 0x1000_0000 + i * 4096, 4096, Some(fd.as_fd()));
        serve.survived(&format!("map {i}"), mapped);
    }
    let mappings = serve.mappings();
    assert!(
        mappings <= mappings_before + MAPPINGS_BUDGET + 64,
        "{mappings} mappings, {mappings_before} before {MAPS} maps"
    );
    let held = serve.fds();
    assert!(
        held <= fds_before + 8,
        "{held} fds held, {fds_before} before"
    );
    // The offender can still do everything else.
    assert_eq!(hostile.region_read(VRAM_BAR, 0, 4).unwrap().len(), 4);
    drop(hostile);
    // Its budget went with it: the next client of the GPU maps its RAM.
    let mut next = connect(&socket);
    let canary = plant_canary(&mut next);
    good_guest_works(&mut next, &canary, 1);
    serve.assert_running();
    serve.stop_within(Duration::from_secs(5));
}

/// Defect 4: one sparse, sealed 2^46-byte memfd mapped 92 times (far more than the 128 TiB of
/// a process's address space) must not fill the server's address space.
#[test]
fn a_sparse_huge_memfd_mapped_over_and_over_is_held_to_the_address_space_budget() {
    const HUGE: u64 = 1 << 46;
    let sizes: Vec<u64> = (0..92u32).map(|i| (HUGE >> (i / 4)).max(1 << 24)).collect();
    let asked: u64 = sizes.iter().sum();
    assert!(asked >= 128 * TIB);
    let attack = |client: &mut TestClient| -> (u64, usize) {
        let fd = memfd(c"sparse", HUGE, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        let (mut iova, mut accepted, mut refused) = (0u64, 0u64, 0);
        for &size in &sizes {
            match client.dma_map(RW, 0, iova, size, Some(fd.as_fd())) {
                Ok(()) => accepted += size,
                Err(ClientError::Errno(Errno(libc::ENOMEM))) => refused += 1,
                Err(e) => panic!("map of {size:#x} at {iova:#x}: {e}"),
            }
            iova += size;
        }
        (accepted, refused)
    };

    // The whole GPU: mapped maps held to the connection's 4 TiB of address space; the rest
    // are kept but reached over the socket.
    let (mut serve, socket) = Serve::whole("va-whole");
    let before = serve.address_space();
    let mut hostile = connect(&socket);
    let (accepted, refused) = attack(&mut hostile);
    assert_eq!((accepted, refused), (asked, 0));
    let grown = serve.address_space().saturating_sub(before);
    assert!(
        grown <= MAPPED_BYTES_BUDGET + 4 * GIB,
        "address space grew by {grown:#x}"
    );
    assert_eq!(hostile.region_read(VRAM_BAR, 0, 4).unwrap().len(), 4);
    drop(hostile);
    // The next client of the GPU maps its RAM, and the address space went back.
    let mut next = connect(&socket);
    let canary = plant_canary(&mut next);
    good_guest_works(&mut next, &canary, 1);
    let grown = serve.address_space().saturating_sub(before);
    assert!(grown < 4 * GIB, "address space still grown by {grown:#x}");
    serve.assert_running();
    serve.stop_within(Duration::from_secs(5));

    // Sliced guests: nothing of theirs is mapped, so the same attack costs no address space
    // at all, and the other guest never notices.
    let (mut serve, bad, good) = Serve::sliced("va-sliced");
    let mut good = connect(&good);
    let canary = plant_canary(&mut good);
    let before = serve.address_space();
    let mut hostile = connect(&bad);
    let (accepted, refused) = attack(&mut hostile);
    assert_eq!((accepted, refused), (asked, 0));
    let grown = serve.address_space().saturating_sub(before);
    assert!(grown < 4 * GIB, "address space grew by {grown:#x}");
    good_guest_works(&mut good, &canary, 1);
    serve.assert_running();
    serve.stop_within(Duration::from_secs(5));
}
