//! vfio-user server benchmarks, each against a baseline measured in the same run.
//!
//! Run: `cargo bench -p gpu-backend --bench vfio_user_server`
//!
//! 1. The server's own cost of a 4-byte REGION_READ of BAR0 (BOOT_0) on the emulated
//!    gh200-96g, in-process:
//!    - `dispatch`: parse + validate + device read + reply encoding, no syscalls;
//!    - `server step`: one recvmsg, the handling, one sendmsg, against the bare
//!      recv + send of the same message sizes on the same socketpair (baseline);
//!    - `threaded`: a full round trip to the connection thread, against a plain two-thread
//!      ping-pong of the same sizes over a socketpair (baseline).
//! 2. The floor of a trapped guest read: a plain unix-socket ping-pong between two
//!    processes (reported for `docs/performance.md`, where the guest-observed read is set
//!    against it).
//! 3. Posted writes: time per posted 4-byte BAR0 write until a following read returns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::gpu_device::GpuDevice;
use gpu_backend::host_gpu::emulated::EmulatedHostGpu;
use gpu_backend::presentation::PresentedFunction;
use gpu_backend::vfio_user::{bench_posted_writes, bench_region_read, BenchMode, LatencyStats};

const ITERATIONS: usize = 200_000;
const REQUEST: usize = 32; // header 16 + region access 16
const REPLY: usize = 36; // header 16 + region access 16 + 4 data bytes
const PEER_ENV: &str = "GPU_BACKEND_BENCH_ECHO_PEER";

fn device() -> Arc<GpuDevice> {
    let host = Arc::new(EmulatedHostGpu::by_name("gh200-96g").expect("emulated GPU"));
    Arc::new(GpuDevice::new(
        PresentedFunction::new(host).expect("presented"),
    ))
}

fn stats(mut samples: Vec<u64>) -> LatencyStats {
    LatencyStats::from_nanos(&mut samples)
}

/// recv(REQUEST) + send(REPLY) on one socket, the peer's messages pre-queued: the bare syscall
/// cost of one server step.
fn bare_step() -> LatencyStats {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let mut samples = Vec::with_capacity(ITERATIONS);
    let req = [0u8; REQUEST];
    let mut buf = [0u8; REPLY];
    for _ in 0..ITERATIONS + ITERATIONS / 10 {
        a.write_all(&req).unwrap();
        let start = Instant::now();
        b.read_exact(&mut buf[..REQUEST]).unwrap();
        b.write_all(&buf).unwrap();
        samples.push(start.elapsed().as_nanos() as u64);
        a.read_exact(&mut buf).unwrap();
    }
    samples.drain(..ITERATIONS / 10);
    stats(samples)
}

fn echo(mut peer: impl Read + Write) {
    let mut buf = [0u8; REPLY];
    while peer.read_exact(&mut buf[..REQUEST]).is_ok() {
        if peer.write_all(&buf).is_err() {
            break;
        }
    }
}

fn ping_pong(mut client: UnixStream, iterations: usize) -> LatencyStats {
    let mut samples = Vec::with_capacity(iterations);
    let req = [0u8; REQUEST];
    let mut buf = [0u8; REPLY];
    for i in 0..iterations + iterations / 10 {
        let start = Instant::now();
        client.write_all(&req).unwrap();
        client.read_exact(&mut buf).unwrap();
        if i >= iterations / 10 {
            samples.push(start.elapsed().as_nanos() as u64);
        }
    }
    stats(samples)
}

fn thread_ping_pong() -> LatencyStats {
    let (a, b) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || echo(b));
    let result = ping_pong(a, ITERATIONS);
    peer.join().unwrap();
    result
}

fn process_ping_pong(iterations: usize) -> LatencyStats {
    let dir = std::env::temp_dir().join(format!("gpu-backend-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("echo.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(PEER_ENV, &path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    let result = ping_pong(stream, iterations);
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn row(name: &str, measured: &LatencyStats, baseline: &LatencyStats, baseline_name: &str) {
    println!(
        "| {name} | {:.2} | {:.2} | {baseline_name} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
        us(measured.p50),
        us(measured.p99),
        us(baseline.p50),
        us(baseline.p99),
        measured.p50.as_nanos() as f64 / baseline.p50.as_nanos().max(1) as f64,
        measured.p99.as_nanos() as f64 / baseline.p99.as_nanos().max(1) as f64,
    );
}

fn main() {
    if let Ok(path) = std::env::var(PEER_ENV) {
        echo(UnixStream::connect(path).unwrap());
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` support
    }
    let dev = device();
    let read = |mode| {
        bench_region_read(dev.clone(), 0, 0, 4, ITERATIONS, mode).expect("REGION_READ bench")
    };
    let dispatch = read(BenchMode::Dispatch);
    let step = read(BenchMode::ServerStep);
    let bare = bare_step();
    let threaded = read(BenchMode::Threaded);
    let threads = thread_ping_pong();
    let processes = process_ping_pong(50_000);
    let posted = bench_posted_writes(dev.clone(), 0, 0x1700, 100_000).expect("posted writes");

    println!("4-byte REGION_READ of BAR0 BOOT_0 (emulated gh200-96g), {ITERATIONS} samples, µs");
    println!();
    println!("| measured | p50 | p99 | baseline | p50 | p99 | p50 ratio | p99 ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| dispatch (no syscalls) | {:.3} | {:.3} | - | - | - | - | - |",
        us(dispatch.p50),
        us(dispatch.p99)
    );
    row(
        "server step (recvmsg + handle + sendmsg)",
        &step,
        &bare,
        "bare recv + send",
    );
    row(
        "threaded round trip",
        &threaded,
        &threads,
        "two-thread socket ping-pong",
    );
    println!(
        "| two-process socket ping-pong (guest-read floor) | {:.2} | {:.2} | - | - | - | - | - |",
        us(processes.p50),
        us(processes.p99)
    );
    println!();
    println!(
        "posted 4-byte BAR0 writes, drained: {:.3} µs per write",
        us(posted)
    );
}
