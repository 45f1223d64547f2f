//! Where the server refuses a guest's DMA maps, and what it holds at that point: fds, mapped
//! and resident bytes and mappings read from `/proc/<pid>`, and whether the other guest can
//! still map DMA, wire an interrupt eventfd and reconnect.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{dma_flags, irq_flags};
use gpu_backend::vfio_user::test_client::{ClientError, TestClient};

use crate::guests::{TwoGuests, MIB};
use crate::support::fds;
use crate::support::proc_stats::{human, proc_stats, ProcStats};

/// No flood goes on longer than this.
const FLOOD_TIME: Duration = Duration::from_secs(120);
const RW: u32 = dma_flags::MAP_READ | dma_flags::MAP_WRITE;

/// How a flood ended.
struct Refusal {
    maps: usize,
    bytes: u64,
    errno: Option<String>,
    took: Duration,
    at_limit: ProcStats,
}

fn errno_of(e: &ClientError) -> String {
    match e {
        ClientError::Errno(errno) => format!("{errno}"),
        other => format!("{other}"),
    }
}

/// Map `size(i)` bytes at `iova(i)` for i = 0, 1, ... until refused: once per size while the
/// size function keeps yielding; `next_size` gives the size to go on with after a refusal
/// (`None`: stop).
fn flood(
    client: &mut TestClient,
    pid: u32,
    fd: Option<BorrowedFd<'_>>,
    base: u64,
    first_size: u64,
    next_size: impl Fn(u64) -> Option<u64>,
    limit: usize,
) -> Refusal {
    let started = Instant::now();
    let (mut maps, mut bytes, mut errno, mut at) = (0usize, 0u64, None, base);
    let mut size = first_size;
    loop {
        if maps >= limit || started.elapsed() > FLOOD_TIME {
            break;
        }
        match client.dma_map(RW, 0, at, size, fd) {
            Ok(()) => {
                maps += 1;
                bytes += size;
                at += size;
            }
            Err(e) => {
                if errno.is_none() {
                    errno = Some(format!("{} after {maps} maps", errno_of(&e)));
                }
                match next_size(size) {
                    Some(s) => size = s,
                    None => break,
                }
            }
        }
    }
    let at_limit = proc_stats(pid).expect("server stats");
    Refusal {
        maps,
        bytes,
        errno,
        took: started.elapsed(),
        at_limit,
    }
}

/// What the other guest could still do: DMA_MAP, SET_IRQS with an eventfd, reconnect.
fn neighbour(b: &mut Option<TestClient>, socket: &Path, ram: &OwnedFd, irq: &OwnedFd) -> String {
    let mut out = Vec::new();
    if let Some(client) = b.as_mut() {
        match client.dma_map(RW, 0, 0x8000_0000, 2 * MIB, Some(ram.as_fd())) {
            Ok(()) => {
                let _ = client.dma_unmap(0, 0x8000_0000, 2 * MIB);
                out.push("DMA_MAP ok".to_string());
            }
            Err(e) => out.push(format!("DMA_MAP {}", errno_of(&e))),
        }
        let assign = irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER;
        match client.set_irqs(2, assign, 0, 1, &[], &[irq.as_fd()]) {
            Ok(()) => {
                let _ = client.set_irqs(2, assign, 0, 1, &[], &[]);
                out.push("eventfd ok".to_string());
            }
            Err(e) => out.push(format!("eventfd {}", errno_of(&e))),
        }
        let _ = client.stream().shutdown(std::net::Shutdown::Both);
    }
    *b = None;
    let reconnected = TestClient::connect(socket)
        .map_err(|e| e.to_string())
        .and_then(|mut c| {
            c.set_reply_timeout(Duration::from_secs(10));
            c.version().map_err(|e| errno_of(&e))?;
            Ok(c)
        });
    match reconnected {
        Ok(c) => {
            *b = Some(c);
            out.push("reconnect ok".to_string());
        }
        Err(e) => out.push(format!("reconnect failed: {e}")),
    }
    out.join(", ")
}

fn row(name: &str, before: &ProcStats, r: &Refusal, b: &str, release: Duration) {
    println!(
        "| {name} | {} ({}) | {} | {} -> {} | {} -> {} | {} | {} -> {} | {b} | {:.2?} | {:.1?} |",
        r.maps,
        human(r.bytes),
        r.errno.as_deref().unwrap_or("not refused"),
        before.fds,
        r.at_limit.fds,
        human(before.vm_size),
        human(r.at_limit.vm_size),
        human(r.at_limit.vm_rss),
        before.maps,
        r.at_limit.maps,
        release,
        r.took,
    );
}

/// One scenario on a fresh server: A floods (then B, if `both`), B is checked, A releases.
fn scenario(binary: &Path, name: &str, both: bool, run: &dyn Fn(&mut TestClient, u32) -> Refusal) {
    let guests = TwoGuests::start(binary);
    let pid = guests.server.pid();
    let ram = fds::memfd("figures-b-ram", 2 * MIB, fds::GUEST_RAM_SEALS);
    let irq = fds::eventfd();
    let mut b = Some(TwoGuests::client(&guests.b));
    let mut a = TwoGuests::client(&guests.a);
    let before = proc_stats(pid).expect("server stats");
    let refusal = run(&mut a, pid);
    let neighbour_a = neighbour(&mut b, &guests.b, &ram, &irq);
    if both {
        let b_client = b.as_mut().expect("B reconnected");
        let b_refusal = run(b_client, pid);
        let neighbour_b = neighbour(&mut b, &guests.b, &ram, &irq);
        row(
            &format!("{name}: A"),
            &before,
            &refusal,
            &neighbour_a,
            Duration::ZERO,
        );
        row(
            &format!("{name}: then B"),
            &before,
            &b_refusal,
            &neighbour_b,
            Duration::ZERO,
        );
    } else {
        let started = Instant::now();
        let released = a.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).is_ok();
        let release = started.elapsed();
        assert!(released, "UNMAP_ALL failed");
        row(name, &before, &refusal, &neighbour_a, release);
    }
    drop((a, b));
    let mut server = guests.server;
    if let Err(e) = server.stop(libc::SIGTERM, Duration::from_secs(30)) {
        println!("(server: {e})");
    }
}

/// Run every scenario and print the table.
pub fn run(binary: &Path) {
    let small = fds::memfd("figures-ram", 64 << 10, fds::GUEST_RAM_SEALS);
    let big = fds::memfd("figures-big", 1 << 40, fds::GUEST_RAM_SEALS);
    println!("DMA maps until refused, emulated tu102-24g, two 64 MiB guests; server figures from /proc/<pid>");
    println!();
    println!("| flood | maps accepted | refused with | fds | VmSize | VmRSS | mappings | the other guest then | UNMAP_ALL | flood took |");
    println!("|---|---:|---|---:|---:|---:|---:|---|---:|---:|");
    let one_fd_each = |c: &mut TestClient, pid: u32| {
        flood(
            c,
            pid,
            Some(small.as_fd()),
            0x10_0000_0000,
            4096,
            |_| None,
            70_000,
        )
    };
    scenario(binary, "4 KiB maps, one fd each", false, &one_fd_each);
    scenario(
        binary,
        "4 KiB maps, no fd",
        false,
        &|c: &mut TestClient, pid: u32| flood(c, pid, None, 0x10_0000_0000, 4096, |_| None, 70_000),
    );
    scenario(
        binary,
        "1 TiB maps of a sparse memfd, then halving sizes",
        false,
        &|c: &mut TestClient, pid: u32| {
            flood(
                c,
                pid,
                Some(big.as_fd()),
                1 << 40,
                1 << 40,
                |s| (s > 4096).then_some(s / 2),
                10_000,
            )
        },
    );
    scenario(
        binary,
        "4 KiB maps, one fd each, both guests",
        true,
        &one_fd_each,
    );
}
