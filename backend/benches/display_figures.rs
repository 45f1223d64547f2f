//! Figures for `docs/performance.md` ("Display (vhost-user GPU)"), against the real
//! `gpu-backend serve` binary (release build) with the project's test frontend
//! (`vhost_user::test_frontend`) playing QEMU in this process:
//!
//! 1. `frame`: a full 1280x800 frame (TRANSFER_TO_HOST_2D + RESOURCE_FLUSH, posted together and
//!    kicked once) timed from the kick until both used-ring entries are back and the UPDATE is
//!    fully received by the fake QEMU; against a baseline of a plain memcpy of the same
//!    4,096,000 bytes plus one send of them over a unix socketpair, received fully by a thread
//!    on the other side (which answers with one byte). Each round times `--frames` of each,
//!    interleaved; the median of each round is kept, and the ratio is taken per round.
//! 2. `rss`: resident memory (`VmRSS`) of the server with four 64 MiB guests and no displays,
//!    with four displays listening, and with the four displays connected (each started by a
//!    frontend and asked for its display info).
//!
//! Run: `cargo bench -p gpu-backend --bench display_figures [-- frame|rss] [--rounds N]
//! [--frames N]`

#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpu_backend::vhost_user::test_frontend::requests::{self as rq, resp};
use gpu_backend::vhost_user::test_frontend::{
    Chain, DisplayFrontend, DisplayMsg, FrontendOptions, CONTROL,
};
use support::proc_stats::{human, proc_stats};
use support::serve_process::{ServeProcess, TempDir};

const W: u32 = 1280;
const H: u32 = 800;
const FRAME: usize = (W * H * 4) as usize;
const WAIT: Duration = Duration::from_secs(60);

fn arg_value(args: &[String], name: &str) -> Option<usize> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `serve --profile tu102-24g` with `guests` 64 MiB guests, displays if `displays`.
fn serve(
    binary: &Path,
    dir: &TempDir,
    guests: usize,
    displays: bool,
) -> (ServeProcess, Vec<PathBuf>) {
    let mut args = vec!["--profile".to_owned(), "tu102-24g".to_owned()];
    let mut sockets = Vec::new();
    let mut display_paths = Vec::new();
    for i in 0..guests {
        let socket = dir.join(&format!("g{i}.sock"));
        let spec = if displays {
            let d = dir.join(&format!("d{i}.sock"));
            display_paths.push(d.clone());
            sockets.push(d.clone());
            format!(
                "socket={},vram=64M,display={}",
                socket.display(),
                d.display()
            )
        } else {
            format!("socket={},vram=64M", socket.display())
        };
        sockets.push(socket);
        args.push("--guest".to_owned());
        args.push(spec);
    }
    let log = dir.join(&format!("serve-{guests}-{displays}.log"));
    (
        ServeProcess::start(binary, &args, sockets, log),
        display_paths,
    )
}

fn connect(path: &Path) -> DisplayFrontend {
    let deadline = Instant::now() + WAIT;
    loop {
        match DisplayFrontend::connect(path) {
            Ok(fe) => return fe,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

fn ok(fe: &mut DisplayFrontend, request: &[u8]) {
    let response = fe.request(request).expect("request");
    assert_eq!(rq::resp_type(&response), Some(resp::OK_NODATA));
}

/// Kick to both used entries and the whole UPDATE at the fake QEMU; also the time to the
/// transfer's own used entry.
fn time_frame(
    fe: &mut DisplayFrontend,
    updates_before: usize,
    rect: rq::Rect,
) -> (Duration, Duration) {
    let transfer = Chain::request(&rq::transfer(1, rect, 0), rq::RESPONSE_MAX);
    let flush = Chain::request(&rq::flush(1, rect), rq::RESPONSE_MAX);
    fe.submit(CONTROL, &transfer).unwrap();
    fe.submit(CONTROL, &flush).unwrap();
    let start = Instant::now();
    fe.kick(CONTROL).unwrap();
    fe.wait_used(CONTROL, WAIT).unwrap();
    let transferred = start.elapsed();
    fe.wait_used(CONTROL, WAIT).unwrap();
    fe.display()
        .unwrap()
        .wait_for(WAIT, |m| {
            let updates = m
                .iter()
                .filter(|m| matches!(m, DisplayMsg::Update { .. }))
                .count();
            (updates > updates_before).then_some(())
        })
        .unwrap();
    (start.elapsed(), transferred)
}

/// The baseline: memcpy of a frame, then one send of it over a socketpair; the receiver reads
/// it whole into its buffer and answers one byte.
struct Baseline {
    src: Vec<u8>,
    dst: Vec<u8>,
    socket: UnixStream,
    receiver: Option<std::thread::JoinHandle<()>>,
}

impl Baseline {
    fn new() -> Baseline {
        let (socket, mut theirs) = UnixStream::pair().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; FRAME];
            while theirs.read_exact(&mut buf).is_ok() {
                if theirs.write_all(&[buf[FRAME - 1]]).is_err() {
                    return;
                }
            }
        });
        Baseline {
            src: (0..FRAME).map(|i| i as u8).collect(),
            dst: vec![0u8; FRAME],
            socket,
            receiver: Some(receiver),
        }
    }

    /// The whole baseline, and the memcpy alone.
    fn time(&mut self) -> (Duration, Duration) {
        let start = Instant::now();
        self.dst.copy_from_slice(std::hint::black_box(&self.src));
        let copied = start.elapsed();
        self.socket.write_all(&self.dst).unwrap();
        let mut ack = [0u8; 1];
        self.socket.read_exact(&mut ack).unwrap();
        let took = start.elapsed();
        std::hint::black_box(ack);
        (took, copied)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
    }
}

fn frame(binary: &Path, rounds: usize, frames: usize) {
    let dir = TempDir::new("display-figures-frame");
    let (server, displays) = serve(binary, &dir, 1, true);
    let mut fe = connect(&displays[0]);
    let options = FrontendOptions::default();
    let backing = fe.ram_mut().reserve(FRAME as u64).unwrap();
    assert!(backing + FRAME as u64 <= options.ram_size);
    let pixels: Vec<u8> = (0..FRAME).map(|i| (i * 7) as u8).collect();
    fe.ram().write(backing, &pixels).unwrap();
    ok(&mut fe, &rq::create_2d(1, rq::FORMAT_B8G8R8X8, W, H, 0));
    ok(&mut fe, &rq::attach_backing(1, &[(backing, FRAME as u32)]));
    ok(&mut fe, &rq::set_scanout(0, 1, (0, 0, W, H)));
    fe.display().unwrap().keep_pixels(false);
    let mut baseline = Baseline::new();
    let full = (0, 0, W, H);
    // Warm up both paths.
    let mut updates = 0;
    for _ in 0..2 {
        time_frame(&mut fe, updates, full);
        updates += 1;
        baseline.time();
    }
    println!("## frame: 1280x800 B8G8R8X8 (4,096,000 bytes), {rounds} rounds x {frames}");
    println!(
        "| round | frame (kick to UPDATE received) | of which the transfer | 64x64 frame | \
         baseline (memcpy + socket) | of which the memcpy | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for round in 0..rounds {
        let (mut f, mut t, mut small, mut b, mut c) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..frames {
            let (whole, transfer) = time_frame(&mut fe, updates, full);
            updates += 1;
            f.push(whole);
            t.push(transfer);
            small.push(time_frame(&mut fe, updates, (0, 0, 64, 64)).0);
            updates += 1;
            let (base, copy) = baseline.time();
            b.push(base);
            c.push(copy);
        }
        let (f, t, small, b, c) = (median(f), median(t), median(small), median(b), median(c));
        let ratio = f.as_secs_f64() / b.as_secs_f64();
        all.push((f, b, ratio));
        println!(
            "| {round} | {:.2} ms | {:.2} ms | {:.3} ms | {:.3} ms | {:.3} ms | {ratio:.1}x |",
            ms(f),
            ms(t),
            ms(small),
            ms(b),
            ms(c)
        );
    }
    let ratios: Vec<f64> = all.iter().map(|r| r.2).collect();
    let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
    let hi = ratios.iter().copied().fold(0.0, f64::max);
    let f = median(all.iter().map(|r| r.0).collect());
    let b = median(all.iter().map(|r| r.1).collect());
    println!(
        "frame median {:.2} ms ({:.0} frames/s, {:.0} MB/s of pixels), baseline median {:.3} ms \
         ({:.0} MB/s); ratio {lo:.1}-{hi:.1}x",
        ms(f),
        1.0 / f.as_secs_f64(),
        FRAME as f64 / f.as_secs_f64() / 1e6,
        ms(b),
        FRAME as f64 / b.as_secs_f64() / 1e6
    );
    drop(fe);
    drop(server);
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn rss(binary: &Path) {
    let dir = TempDir::new("display-figures-rss");
    println!("## rss: four 64 MiB guests on the emulated tu102-24g");
    println!("| server | VmRSS | threads |");
    println!("|---|---:|---:|");
    let row = |what: &str, server: &ServeProcess| {
        let stats = proc_stats(server.pid()).unwrap();
        println!("| {what} | {} | {} |", human(stats.vm_rss), stats.threads);
        stats.vm_rss
    };
    let (plain, _) = serve(binary, &dir, 4, false);
    settle();
    let base = row("4 guests, no displays", &plain);
    drop(plain);
    let (with, displays) = serve(binary, &dir, 4, true);
    settle();
    let idle = row("4 guests, 4 displays listening", &with);
    let mut frontends: Vec<DisplayFrontend> = displays.iter().map(|d| connect(d)).collect();
    for fe in &mut frontends {
        let info = fe.request(&rq::get_display_info()).unwrap();
        assert_eq!(rq::resp_type(&info), Some(resp::OK_DISPLAY_INFO));
    }
    settle();
    let connected = row("4 guests, 4 displays connected (idle)", &with);
    println!(
        "displays listening: +{}; connected: +{} over no displays",
        human(idle.saturating_sub(base)),
        human(connected.saturating_sub(base))
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` support
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_gpu-backend"));
    let only = |name: &str| {
        let picked: Vec<&String> = args
            .iter()
            .filter(|a| *a == "frame" || *a == "rss")
            .collect();
        picked.is_empty() || picked.iter().any(|a| *a == name)
    };
    if only("frame") {
        let rounds = arg_value(&args, "--rounds").unwrap_or(5);
        let frames = arg_value(&args, "--frames").unwrap_or(10);
        frame(binary, rounds, frames);
    }
    if only("rss") {
        rss(binary);
    }
}
