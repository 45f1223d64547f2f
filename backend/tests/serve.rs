//! `gpu-backend serve` as a process: socket lifecycle, signals, idle memory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::test_client::TestClient;

const MIB: u64 = 1 << 20;

fn temp_socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpu-backend-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn start(profile: &str, socket: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", profile, "--socket"])
        .arg(socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpu-backend serve")
}

fn wait_for_socket(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "socket {} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn terminate(child: &mut Child, signal: i32) -> std::process::ExitStatus {
    // SAFETY: kill(2) on a child pid we own; no memory is involved.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not stop after signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_gh200_serve_stays_under_64_mib_resident_and_stops_cleanly_on_sigterm() {
    let socket = temp_socket("gh200.sock");
    let mut child = start("gh200-96g", &socket);
    wait_for_socket(&socket, &mut child);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    std::thread::sleep(Duration::from_millis(300));
    let rss = resident_kib(child.id());
    eprintln!("idle serve --profile gh200-96g: VmRSS {rss} KiB");
    assert!(rss < 64 * 1024, "idle RSS {rss} KiB >= 64 MiB");
    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn sigint_stops_serve_and_a_live_socket_is_refused() {
    let socket = temp_socket("live.sock");
    let mut first = start("tu102-24g", &socket);
    wait_for_socket(&socket, &mut first);
    // A second server on the same live socket must refuse, not steal it.
    let second = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("error"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(socket.exists(), "the live socket must stay");
    let status = terminate(&mut first, libc::SIGINT);
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let socket = temp_socket("stale.sock");
    // A socket file nobody listens on: bind and drop the listener.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut child = start("gb202-32g", &socket);
    // The stale file exists from the start; wait until the server accepts connections.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(terminate(&mut child, libc::SIGTERM).success());
}

#[test]
fn serve_with_two_guests_isolates_them_and_stops_on_sigterm() {
    let dir = temp_socket("guests").with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let (s0, s1) = (dir.join("g0.sock"), dir.join("g1.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g", "--guest"])
        .arg(format!("{}:6M", s0.display()))
        .arg("--guest")
        .arg(format!("{}:4M", s1.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&s0, &mut child);
    wait_for_socket(&s1, &mut child);
    let mut g0 = TestClient::connect(&s0).unwrap();
    g0.version().unwrap();
    let mut g1 = TestClient::connect(&s1).unwrap();
    g1.version().unwrap();
    // Guest 0 fills its VRAM BAR and its aperture; guest 1 sees none of it at the same
    // guest addresses, and its aperture past its 4 MiB reads ~0.
    g0.region_write(1, 0, &[0x66; 4096], false).unwrap();
    g0.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap(); // guest 4 MiB
    g0.region_write(0, 0x70_0000, &[0x77; 64], false).unwrap();
    assert_eq!(g1.region_read(1, 0, 64).unwrap(), vec![0; 64]);
    g1.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(g1.region_read(0, 0x70_0000, 64).unwrap(), vec![0xFF; 64]);
    g1.region_write(0, 0x1700, &0x3Fu32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(
        g1.region_read(0, 0x70_FFFC, 8).unwrap(),
        [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]
    );
    // Guest 0 reads its own data back; its 6 MiB BAR is presented as 8 MiB.
    g0.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(g0.region_read(0, 0x70_0000, 64).unwrap(), vec![0x77; 64]);
    assert_eq!(
        g0.region_read(1, 6 * MIB - 2, 4).unwrap(),
        [0x00, 0x00, 0xFF, 0xFF]
    );
    drop((g0, g1));
    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(!s0.exists() && !s1.exists(), "sockets left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_trap_vram_offers_no_vram_bar_for_mmap() {
    use gpu_backend::vfio_user::protocol::region_flags;
    let socket = temp_socket("trap-vram.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g", "--trap-vram", "--socket"])
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut child);
    let mut client = TestClient::connect(&socket).unwrap();
    client.version().unwrap();
    // BAR1 (VRAM, the BAR1 aperture): no mmap, no fd; every access is trapped.
    let (vram, _, fd) = client.region_info(1, 512).unwrap();
    assert_eq!(vram.flags & region_flags::MMAP, 0);
    assert!(fd.is_none());
    client.region_write(1, 0x1000, b"trapped", false).unwrap();
    assert_eq!(client.region_read(1, 0x1000, 7).unwrap(), b"trapped");
    // BAR3 (instance memory) is still offered for mmap.
    let (instance, _, fd) = client.region_info(3, 512).unwrap();
    assert_ne!(instance.flags & region_flags::MMAP, 0);
    assert!(fd.is_some());
    drop(client);
    assert!(terminate(&mut child, libc::SIGTERM).success());
}

/// The capability IDs in the config space (region 7) a client reads, in list order.
fn capability_ids(client: &mut TestClient) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut next = client.region_read(7, 0x34, 1).unwrap()[0];
    while next != 0 && ids.len() < 48 {
        let header = client.region_read(7, u64::from(next), 2).unwrap();
        ids.push(header[0]);
        next = header[1];
    }
    ids
}

#[test]
fn serve_no_msix_presents_the_whole_gpu_without_msix() {
    const MSIX_IRQ_INDEX: u32 = 2;
    const MSIX_CAP_ID: u8 = 0x11;
    for (extra, msix) in [(None, true), (Some("--no-msix"), false)] {
        let socket = temp_socket("no-msix.sock");
        let mut args = vec!["--socket".to_owned(), socket.display().to_string()];
        args.extend(extra.map(str::to_owned));
        let mut child = spawn_serve(&args);
        wait_for_socket(&socket, &mut child);
        let mut client = TestClient::connect(&socket).unwrap();
        client.version().unwrap();
        let ids = capability_ids(&mut client);
        assert_eq!(ids.contains(&MSIX_CAP_ID), msix, "{extra:?}: {ids:x?}");
        let vectors = client.irq_info(MSIX_IRQ_INDEX).unwrap().count;
        assert_eq!(vectors > 0, msix, "{extra:?}: {vectors} MSI-X vectors");
        drop(client);
        assert!(terminate(&mut child, libc::SIGTERM).success());
    }
}

// ---- Hostile or failing peers: one guest's trouble stays that guest's ----

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// `gpu-backend serve --profile tu102-24g ARGS..`, logging warnings and errors to a pipe.
fn spawn_serve(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpu-backend serve")
}

fn guest_arg(socket: &Path, size: &str) -> [String; 2] {
    ["--guest".into(), format!("{}:{size}", socket.display())]
}

/// Waits up to `within` for the child to exit.
fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything the (exited) child logged.
fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// Waits (at most 5 s) until a new client on `socket` gets its VERSION answered.
fn wait_until_served(socket: &Path) {
    wait_until("the next client is served", Duration::from_secs(5), || {
        // Kept until the answer is in: dropping it sooner would hang up first.
        let mut client = TestClient::connect(socket).unwrap();
        client.version().is_ok()
    });
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the server closed `stream` (POLLHUP), waiting up to `within`.
fn hung_up_within(stream: &UnixStream, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, within.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

/// A client whose connection the server accepts and closes at once sees EOF.
fn refused(socket: &Path) -> bool {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    matches!((&stream).read(&mut byte), Ok(0))
}

/// A canary a guest writes into its VRAM and reads back (over its own connection).
fn canary_holds(client: &mut TestClient, at: u64, value: u8) -> bool {
    client.region_read(1, at, 64).unwrap() == vec![value; 64]
}

/// Makes the listening socket bound at `socket` in process `pid` fail the way a broken
/// listener does: takes a duplicate of its fd (pidfd_getfd; the test is the parent) and
/// shuts the socket down. It then polls readable (POLLHUP) and accepts nothing for ever.
fn break_listener(pid: u32, socket: &Path) {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    // Num RefCount Protocol Flags Type St Inode Path; listening sockets have __SO_ACCEPTCON.
    let inode = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 8 && f[3] == "00010000" && Path::new(f[7]) == socket)
        .map(|f| f[6].to_owned())
        .expect("the listening socket");
    let link = format!("socket:[{inode}]");
    let fd: i32 = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .expect("the listener's fd");
    // SAFETY: plain syscalls on fds this function opens and closes.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        assert_eq!(libc::shutdown(dup, libc::SHUT_RDWR), 0);
        libc::close(dup);
        libc::close(pidfd);
    }
}

#[test]
fn a_guest_whose_listener_fails_leaves_the_other_guest_served() {
    let dir = temp_socket("listener-fails").with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let (s0, s1) = (dir.join("g0.sock"), dir.join("g1.sock"));
    let mut args = guest_arg(&s0, "4M").to_vec();
    args.extend(guest_arg(&s1, "4M"));
    let mut child = spawn_serve(&args);
    wait_for_socket(&s0, &mut child);
    wait_for_socket(&s1, &mut child);
    let mut g1 = TestClient::connect(&s1).unwrap();
    g1.version().unwrap();
    g1.region_write(1, 0x2000, &[0x5C; 64], false).unwrap();

    break_listener(child.id(), &s0);
    wait_until("guest 0's socket removed", Duration::from_secs(5), || {
        !s0.exists()
    });
    // Guest 1 goes on: its connection, its data, and a new connection of its own.
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the backend exited");
    assert!(canary_holds(&mut g1, 0x2000, 0x5C));
    drop(g1);
    let mut again = None;
    wait_until("guest 1 reconnects", Duration::from_secs(5), || {
        let mut c = TestClient::connect(&s1).unwrap();
        let ok = c.version().is_ok();
        again = Some(c);
        ok
    });
    let mut g1 = again.unwrap();
    assert!(canary_holds(&mut g1, 0x2000, 0x5C));
    drop(g1);

    // The last guest's listener failing leaves nothing to serve: the backend exits 1.
    break_listener(child.id(), &s1);
    let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(!s1.exists());
    let log = stderr_of(&mut child);
    let said = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(said("g0.sock: listener error"), 1, "{log}");
    assert_eq!(said("g1.sock: listener error"), 1, "{log}");
    assert_eq!(said("1 other server(s) go on"), 1, "{log}");
    assert_eq!(said("no server is left"), 1, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_of_a_second_client_are_logged_once_per_episode() {
    let socket = temp_socket("second-client.sock");
    let mut child = spawn_serve(&["--socket".into(), socket.display().to_string()]);
    wait_for_socket(&socket, &mut child);
    let mut first = TestClient::connect(&socket).unwrap();
    first.version().unwrap();
    for _ in 0..300 {
        assert!(refused(&socket), "a second client was served");
    }
    drop(first);
    wait_until_served(&socket);
    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    let log = stderr_of(&mut child);
    let said = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(said("refusing a second client"), 1, "{log}");
    assert_eq!(
        said("refused 299 more client(s) while one was connected"),
        1,
        "{log}"
    );
    assert!(log.lines().count() < 10, "{log}");
}

/// Connects, negotiates and asks for 1 MiB replies it never reads.
fn client_that_stops_reading(socket: &Path) -> TestClient {
    let mut client = TestClient::connect(socket).unwrap();
    client.version().unwrap();
    for i in 0..8u64 {
        client.send_region_read(1, i << 20, 1 << 20).unwrap();
    }
    client
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_5_s_message_timeout() {
    let socket = temp_socket("stops-reading.sock");
    let mut child = spawn_serve(&["--socket".into(), socket.display().to_string()]);
    wait_for_socket(&socket, &mut child);
    let started = Instant::now();
    let client = client_that_stops_reading(&socket);
    assert!(
        hung_up_within(client.stream(), Duration::from_secs(15)),
        "never dropped"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_millis(7500),
        "dropped after {took:?}, not 5 s"
    );
    drop(client);
    // The server is fine: the next client is served.
    wait_until_served(&socket);
    assert!(terminate(&mut child, libc::SIGTERM).success());
    let log = stderr_of(&mut child);
    assert!(log.contains("timed out"), "{log}");
}

#[test]
fn sigterm_ends_serve_at_once_while_a_client_is_not_reading() {
    let socket = temp_socket("sigterm-not-reading.sock");
    let mut child = spawn_serve(&["--socket".into(), socket.display().to_string()]);
    wait_for_socket(&socket, &mut child);
    let client = client_that_stops_reading(&socket);
    // The connection thread is now blocked sending a reply nobody reads.
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    let status = terminate(&mut child, libc::SIGTERM);
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    assert!(!socket.exists(), "socket left behind");
    drop(client);
}

fn my_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid have no preconditions.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// A uid and a gid that are not this process's.
fn other_ids() -> (u32, u32) {
    let (uid, gid) = my_ids();
    (if uid == 4242 { 4243 } else { 4242 }, gid ^ 1)
}

/// Whether a client on `socket` gets through VERSION.
fn served(socket: &Path) -> bool {
    let mut client = TestClient::connect(socket).unwrap();
    client.set_reply_timeout(Duration::from_secs(5));
    client.version().is_ok()
}

#[test]
fn allow_uid_and_gid_decide_who_is_served() {
    let (uid, gid) = my_ids();
    let (other_uid, other_gid) = other_ids();
    let socket = temp_socket("allow.sock");
    let path = socket.display().to_string();
    let run = |allow: &[String], expect_served: bool| -> String {
        let mut args = vec!["--socket".to_owned(), path.clone()];
        args.extend_from_slice(allow);
        let mut child = spawn_serve(&args);
        wait_for_socket(&socket, &mut child);
        for _ in 0..3 {
            assert_eq!(served(&socket), expect_served, "{allow:?}");
        }
        assert!(terminate(&mut child, libc::SIGTERM).success());
        stderr_of(&mut child)
    };
    // A uid that is not ours: refused at once, logged once for the three attempts.
    let log = run(&["--allow-uid".into(), other_uid.to_string()], false);
    let refusals = log.lines().filter(|l| l.contains("refusing a client"));
    assert_eq!(refusals.clone().count(), 1, "{log}");
    assert!(
        refusals
            .clone()
            .all(|l| l.contains(&format!("uid {uid} gid {gid}"))),
        "{log}"
    );
    // Ours, in a list.
    run(&["--allow-uid".into(), format!("{other_uid},{uid}")], true);
    // Not our uid, but our gid.
    run(
        &[
            "--allow-uid".into(),
            other_uid.to_string(),
            "--allow-gid".into(),
            gid.to_string(),
        ],
        true,
    );
    run(&["--allow-gid".into(), other_gid.to_string()], false);
}

#[test]
fn allow_uid_per_guest_socket() {
    let (uid, _) = my_ids();
    let (other_uid, _) = other_ids();
    let dir = temp_socket("allow-guests").with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let (s0, s1) = (dir.join("g0.sock"), dir.join("g1.sock"));
    let mut args = guest_arg(&s0, "4M").to_vec();
    args.extend(guest_arg(&s1, "4M"));
    args.extend([
        "--allow-uid".into(),
        format!("{}={other_uid}", s0.display()),
        "--allow-uid".into(),
        format!("{}={uid}", s1.display()),
    ]);
    let mut child = spawn_serve(&args);
    wait_for_socket(&s0, &mut child);
    wait_for_socket(&s1, &mut child);
    assert!(!served(&s0), "guest 0 admits only another uid");
    assert!(served(&s1), "guest 1 admits ours");
    assert!(terminate(&mut child, libc::SIGTERM).success());

    // An allow list for a socket no guest is served on is a usage error.
    let mut args = guest_arg(&s0, "4M").to_vec();
    args.extend([
        "--allow-uid".into(),
        format!("{}=1", dir.join("typo.sock").display()),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g"])
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest's socket"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `serve --fd 3 ARGS..` with `theirs` as fd 3 of the child.
fn spawn_with_fd(theirs: &impl AsRawFd, args: &[&str]) -> Child {
    use std::os::unix::process::CommandExt;
    let raw = theirs.as_raw_fd();
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpu-backend"));
    command
        .args(["serve", "--profile", "tu102-24g", "--fd", "3"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child between fork and
    // exec and touch nothing but fd 3. dup2 clears close-on-exec on the copy; when the socket
    // already is fd 3, dup2 does nothing and close-on-exec is cleared by hand (else the child
    // would exec without it).
    unsafe {
        command.pre_exec(move || {
            let rc = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().expect("spawn gpu-backend serve --fd")
}

#[test]
fn serve_fd_serves_exactly_the_connection_it_is_given() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut child = spawn_with_fd(&theirs, &[]);
    drop(theirs);
    let mut client = TestClient::new(ours);
    client.set_reply_timeout(Duration::from_secs(20));
    client.version().unwrap();
    client
        .region_write(1, 0x1000, b"through fd 3", false)
        .unwrap();
    assert_eq!(client.region_read(1, 0x1000, 12).unwrap(), b"through fd 3");
    assert!(child.try_wait().unwrap().is_none());
    // The client leaving ends the process.
    drop(client);
    let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
    assert!(status.success(), "{status}");

    // SIGTERM ends it too.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut child = spawn_with_fd(&theirs, &[]);
    drop(theirs);
    let mut client = TestClient::new(ours);
    client.set_reply_timeout(Duration::from_secs(20));
    client.version().unwrap();
    assert!(terminate(&mut child, libc::SIGTERM).success());
}

#[test]
fn serve_fd_refuses_what_is_not_an_allowed_connected_socket() {
    let (other_uid, _) = other_ids();
    // A peer the allow list does not admit.
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let mut child = spawn_with_fd(&theirs, &["--allow-uid", &other_uid.to_string()]);
    drop(theirs);
    let status = exit_within(&mut child, Duration::from_secs(20)).expect("still running");
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(stderr_of(&mut child).contains("is not allowed"));
    // A listening socket.
    let listening = std::os::unix::net::UnixListener::bind(temp_socket("fd-listen.sock"));
    let listening = listening.unwrap();
    let mut child = spawn_with_fd(&listening, &[]);
    let status = exit_within(&mut child, Duration::from_secs(20)).expect("still running");
    assert_eq!(status.code(), Some(2), "{status}");
    assert!(stderr_of(&mut child).contains("a listening socket"));
    let _ = std::fs::remove_file(temp_socket("fd-listen.sock"));
    // No such fd.
    let out = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g", "--fd", "999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an open file descriptor"));
}

/// Sets process `pid`'s soft fd limit to `n` (at most its hard limit), keeping the hard one.
fn set_fd_limit(pid: u32, n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on a child we own: reads its limits into `limit`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut limit,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    limit.rlim_cur = n.min(limit.rlim_max);
    // SAFETY: as above, setting a soft limit within the hard one.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn a_failing_accept_is_logged_once_per_episode() {
    let socket = temp_socket("accept-fails.sock");
    let mut child = spawn_serve(&["--socket".into(), socket.display().to_string()]);
    wait_for_socket(&socket, &mut child);
    std::thread::sleep(Duration::from_millis(200));
    // No fd number left for accept (the limit is the lowest free one): it fails (EMFILE)
    // and is retried every 50 ms.
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    set_fd_limit(child.id(), lowest_free);
    let mut client = TestClient::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    set_fd_limit(child.id(), 4096);
    // Once fds are there again the waiting client is served.
    client.set_reply_timeout(Duration::from_secs(10));
    let served = client.version();
    drop(client);
    assert!(terminate(&mut child, libc::SIGTERM).success());
    let log = stderr_of(&mut child);
    assert!(served.is_ok(), "{served:?}: {log}");
    let said = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(said("accept failed"), 1, "{log}");
    assert!(log.contains("Too many open files"), "{log}");
    assert!(log.lines().count() < 5, "{log}");
}

/// Runs `gpu-backend ctl --control CONTROL ARGS...`.
fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["ctl", "--control"])
        .arg(control)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gpu-backend ctl")
}

/// `ctl --json ARGS` that must succeed: its JSON answer.
fn ctl_json(control: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(control, &all);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ctl ARGS` that must fail with exit 2 and a message containing `message`.
fn ctl_refused(control: &Path, args: &[&str], message: &str) {
    let out = ctl(control, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "ctl {args:?}: {err}");
    assert!(err.contains(message), "ctl {args:?}: {err}");
}

fn guest_sockets(list: &serde_json::Value) -> Vec<String> {
    list["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["socket"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn guests_are_added_listed_and_removed_through_the_control_socket() {
    let dir = temp_socket("control").with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let path = |n: &str| dir.join(n);
    let (control, s0, s1, s2, d1) = (
        path("ctl.sock"),
        path("g0.sock"),
        path("g1.sock"),
        path("g2.sock"),
        path("d1.sock"),
    );
    let mut child = spawn_serve(&[
        "--guest".into(),
        format!("{}:4M", s0.display()),
        "--control".into(),
        control.display().to_string(),
    ]);
    wait_for_socket(&control, &mut child);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let list = ctl_json(&control, &["list"]);
    assert_eq!(guest_sockets(&list), [s0.display().to_string()]);
    let free_before = list["free_bytes"].as_u64().unwrap();

    // Add a guest with a display: it gets the free VRAM after guest 0, scrubbed, and serves.
    let s1_text = s1.display().to_string();
    let d1_text = d1.display().to_string();
    let added = ctl_json(
        &control,
        &[
            "add",
            "--socket",
            &s1_text,
            "--vram",
            "8M",
            "--display",
            &d1_text,
        ],
    );
    assert_eq!(added["vram_start"].as_u64(), Some(4 * MIB));
    assert_eq!(added["vram_size"].as_u64(), Some(8 * MIB));
    assert!(s1.exists() && d1.exists());
    let mut g1 = TestClient::connect(&s1).unwrap();
    g1.version().unwrap();
    assert_eq!(g1.region_read(1, 0, 64).unwrap(), vec![0; 64], "scrubbed");
    g1.region_write(1, 0x1000, &[0x3C; 64], false).unwrap();

    // Bad requests change nothing.
    ctl_refused(
        &control,
        &["add", "--socket", &s1_text, "--vram", "2M"],
        "already used",
    );
    ctl_refused(
        &control,
        &[
            "add",
            "--socket",
            &path("g9.sock").display().to_string(),
            "--vram",
            "3M",
        ],
        "2 MiB",
    );
    ctl_refused(
        &control,
        &[
            "add",
            "--socket",
            &path("g9.sock").display().to_string(),
            "--vram",
            "64G",
        ],
        "",
    );
    let file = path("precious");
    std::fs::write(&file, b"keep").unwrap();
    ctl_refused(
        &control,
        &[
            "add",
            "--socket",
            &file.display().to_string(),
            "--vram",
            "2M",
        ],
        "not a socket",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    ctl_refused(
        &control,
        &["remove", "--socket", "/nonexistent.sock"],
        "no guest",
    );
    // Connected: refused without --force.
    ctl_refused(&control, &["remove", "--socket", &s1_text], "connected");
    let list = ctl_json(&control, &["list"]);
    assert_eq!(guest_sockets(&list).len(), 2);
    assert_eq!(list["free_bytes"].as_u64(), Some(free_before - 8 * MIB));
    assert!(
        canary_holds(&mut g1, 0x1000, 0x3C),
        "the guest kept its data"
    );
    let stats = ctl_json(&control, &["stats", "--socket", &s1_text]);
    assert_eq!(stats["guests"][0]["connected"], true);

    // Forced removal: the connected client loses its slice and is disconnected; the
    // sockets go away; the slice is scrubbed and free again.
    let out = ctl(&control, &["remove", "--socket", &s1_text, "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s1.exists() && !d1.exists());
    assert!(
        g1.region_read(1, 0x1000, 64)
            .map_or(true, |bytes| bytes == vec![0xFF; 64]),
        "a removed guest reads ~0 or is disconnected"
    );
    drop(g1);
    let list = ctl_json(&control, &["list"]);
    assert_eq!(list["free_bytes"].as_u64(), Some(free_before));
    // A new guest gets the same range, scrubbed.
    let s2_text = s2.display().to_string();
    let again = ctl_json(&control, &["add", "--socket", &s2_text, "--vram", "8M"]);
    assert_eq!(again["vram_start"].as_u64(), Some(4 * MIB));
    let mut g2 = TestClient::connect(&s2).unwrap();
    g2.version().unwrap();
    assert_eq!(g2.region_read(1, 0x1000, 64).unwrap(), vec![0; 64]);
    drop(g2);
    // Guest 0 is untouched by all of it and can be removed while idle.
    ctl_json(&control, &["remove", "--socket", &s0.display().to_string()]);
    assert!(!s0.exists());
    let table = ctl(&control, &["list"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&s2_text) && text.contains("free"), "{text}");

    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(!control.exists() && !s2.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_control_socket_answers_malformed_requests_with_errors_and_keeps_serving() {
    use std::io::{BufRead, BufReader, Write};
    let dir = temp_socket("control-bad").with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("ctl.sock");
    let s0 = dir.join("g0.sock");
    let mut child = spawn_serve(&[
        "--guest".into(),
        format!("{}:2M", s0.display()),
        "--control".into(),
        control.display().to_string(),
    ]);
    wait_for_socket(&control, &mut child);
    let stream = UnixStream::connect(&control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut answer = |line: &str| -> serde_json::Value {
        let mut text = String::new();
        if !line.is_empty() {
            writeln!(writer, "{line}").unwrap();
        }
        reader.read_line(&mut text).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    };
    let greeting = answer("");
    assert_eq!(greeting["gpu-backend"]["protocol"], 1);
    let class = |v: &serde_json::Value| v["error"]["class"].as_str().unwrap_or("").to_owned();
    for (line, want) in [
        ("{", "InvalidRequest"),
        ("[1,2]", "InvalidRequest"),
        ("\"list\"", "InvalidRequest"),
        (r#"{"execute":"list","extra":1}"#, "InvalidRequest"),
        (r#"{"execute":"format-vram"}"#, "CommandNotFound"),
        (r#"{"execute":"add"}"#, "InvalidParameter"),
        (
            r#"{"execute":"add","arguments":{"socket":1,"vram":"2M"}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute":"add","arguments":{"socket":"/tmp/x.sock","vram":-2}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute":"add","arguments":{"socket":"/tmp/x.sock","vram":"18446744073709551615T"}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute":"add","arguments":{"socket":"","vram":"2M"}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute":"remove","arguments":{"socket":"/nope"}}"#,
            "NotFound",
        ),
        (
            r#"{"execute":"remove","arguments":{"socket":"/nope","force":"yes"}}"#,
            "InvalidParameter",
        ),
    ] {
        let a = answer(line);
        assert_eq!(class(&a), want, "{line}: {a}");
        assert!(a["error"]["desc"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // The id is echoed; a good request still works on the same connection.
    let a = answer(r#"{"execute":"list","id":{"n":7}}"#);
    assert_eq!(a["id"]["n"], 7);
    assert_eq!(a["return"]["guests"].as_array().unwrap().len(), 1);
    // A line over 64 KiB gets an error and the connection is closed; the server goes on.
    let long = format!("{{\"execute\":\"{}\"}}", "x".repeat(70 * 1024));
    let a = answer(&long);
    assert_eq!(class(&a), "InvalidRequest");
    let list = ctl_json(&control, &["list"]);
    assert_eq!(guest_sockets(&list), [s0.display().to_string()]);
    let mut g0 = TestClient::connect(&s0).unwrap();
    g0.version().unwrap();
    drop(g0);
    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_with_the_same_state_directory_serves_the_same_guests_with_their_vram() {
    let dir = temp_socket("state").with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let (control, s0, s1, d1) = (
        dir.join("ctl.sock"),
        dir.join("g0.sock"),
        dir.join("g1.sock"),
        dir.join("d1.sock"),
    );
    let args = || {
        vec![
            "--guest".to_owned(),
            format!("{}:4M", s0.display()),
            "--control".to_owned(),
            control.display().to_string(),
            "--state".to_owned(),
            state.display().to_string(),
        ]
    };
    let mut child = spawn_serve(&args());
    wait_for_socket(&control, &mut child);
    let s1_text = s1.display().to_string();
    ctl_json(
        &control,
        &[
            "add",
            "--socket",
            &s1_text,
            "--vram",
            "6M",
            "--display",
            &d1.display().to_string(),
            "--no-msix",
        ],
    );
    for (socket, byte) in [(&s0, 0xA0u8), (&s1, 0xA1)] {
        let mut c = TestClient::connect(socket).unwrap();
        c.version().unwrap();
        c.region_write(1, 0x3000, &[byte; 64], false).unwrap();
    }
    let before = ctl_json(&control, &["list"]);
    let msix: Vec<bool> = before["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["msix"].as_bool().unwrap())
        .collect();
    assert_eq!(msix, [true, false], "guest 1 was added with --no-msix");
    // A socket in the state directory could be replaced by the saved table: refused.
    let inside = state.join("guests.json").display().to_string();
    ctl_refused(
        &control,
        &["add", "--socket", &inside, "--vram", "2M"],
        "inside the state directory",
    );
    // A crash, not a clean stop: nothing is written on the way out.
    let status = terminate(&mut child, libc::SIGKILL);
    assert!(!status.success());
    for stale in [&control, &s0, &s1, &d1] {
        assert!(
            stale.exists(),
            "a killed backend leaves {} behind",
            stale.display()
        );
    }

    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let file_before = inode(&state.join("guests.json"));
    let mut child = spawn_serve(&args());
    wait_for_socket(&s1, &mut child);
    wait_until(
        "the control socket is back",
        Duration::from_secs(20),
        || UnixStream::connect(&control).is_ok(),
    );
    // Restoring rewrites nothing (a rewrite after each restored guest would leave a file
    // without the guests not restored yet, if the start were cut short).
    assert_eq!(inode(&state.join("guests.json")), file_before);
    let after = ctl_json(&control, &["list"]);
    assert_eq!(
        after["guests"], before["guests"],
        "same guests, sockets and slices"
    );
    for (socket, byte, vectors) in [(&s0, 0xA0u8, 1..u32::MAX), (&s1, 0xA1, 0..1)] {
        let mut c = TestClient::connect(socket).unwrap();
        c.version().unwrap();
        assert!(
            canary_holds(&mut c, 0x3000, byte),
            "{} kept its VRAM",
            socket.display()
        );
        // Restored as it was presented: guest 1 still without MSI-X vectors.
        let msix = c.irq_info(2).unwrap();
        assert!(
            vectors.contains(&msix.count),
            "{}: {msix:?}",
            socket.display()
        );
    }
    // A removal is recorded too: the next start serves only guest 1.
    ctl_json(&control, &["remove", "--socket", &s0.display().to_string()]);
    let status = terminate(&mut child, libc::SIGTERM);
    assert!(status.success(), "{status}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("guests.json")).unwrap()).unwrap();
    let sockets: Vec<&str> = saved["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["socket"].as_str().unwrap())
        .collect();
    assert_eq!(sockets, [s1_text.as_str()]);

    // A --guest that contradicts the state, and a corrupt or future state file: exit 2,
    // nothing served, the file left as it was.
    // (Guest 1 is 6M, with a display, without MSI-X: another size, or MSI-X, contradicts.)
    for guest in [
        format!("{}:8M", s1.display()),
        format!("socket={},vram=6M,display={}", s1.display(), d1.display()),
    ] {
        let conflicting = spawn_serve(&[
            "--guest".into(),
            guest.clone(),
            "--state".into(),
            state.display().to_string(),
        ]);
        let out = conflicting.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{guest}: {err}");
        assert!(
            err.contains("differs from the guest the state file has"),
            "{guest}: {err}"
        );
    }
    for (text, message) in [
        ("{\"version\": 1,", "corrupt"),
        ("{\"version\": 7}", "version 7"),
    ] {
        std::fs::write(state.join("guests.json"), text).unwrap();
        let out = spawn_serve(&["--state".into(), state.display().to_string()])
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(message), "{err}");
        assert_eq!(
            std::fs::read_to_string(state.join("guests.json")).unwrap(),
            text
        );
        assert!(!s1.exists(), "nothing served");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
