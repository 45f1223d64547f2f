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
