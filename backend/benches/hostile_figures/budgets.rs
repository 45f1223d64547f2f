//! Where the server refuses a guest's DMA maps, and what it holds at that point: fds, mapped
//! and resident bytes and mappings read from `/proc/<pid>`, and whether the other guest can
//! still map DMA, wire an interrupt eventfd and reconnect.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{dma_flags, irq_flags};
use gpu_backend::vfio_user::test_client::{ClientError, TestClient};

use crate::guests::{Served, MIB};
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

/// Map consecutive IOVAs from `base`, `first_size` bytes each (with `fd`, at offset 0), until
/// refused; after a refusal go on with `next_size(size)` (`None`: stop). At most `limit` maps
/// or [`FLOOD_TIME`]. The server's figures are read at the end.
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

fn row(name: &str, before: &ProcStats, r: &Refusal, other: &str, release: Option<Duration>) {
    println!(
        "| {name} | {} ({}) | {} | {} -> {} | {} -> {} | {} | {} -> {} | {other} | {} | {:.1?} |",
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
        release.map_or("-".to_string(), |d| format!("{d:.2?}")),
        r.took,
    );
}

/// A flood: what A maps, given the server's pid.
type Flood<'a> = &'a dyn Fn(&mut TestClient, u32) -> Refusal;

/// The GPU whole to A: A floods; A itself then wires an eventfd, releases everything
/// (timed) and maps again.
fn whole(binary: &Path, name: &str, run: Flood<'_>) {
    let guests = Served::whole(binary);
    let pid = guests.server.pid();
    let irq = fds::eventfd();
    let ram = fds::memfd("figures-a-ram", 2 * MIB, fds::GUEST_RAM_SEALS);
    let mut a = Served::client(&guests.sockets[0]);
    let before = proc_stats(pid).expect("server stats");
    let refusal = run(&mut a, pid);
    let assign = irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER;
    let eventfd = match a.set_irqs(2, assign, 0, 1, &[], &[irq.as_fd()]) {
        Ok(()) => "eventfd ok".to_string(),
        Err(e) => format!("eventfd {}", errno_of(&e)),
    };
    let started = Instant::now();
    a.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).expect("UNMAP_ALL");
    let release = started.elapsed();
    let again = match a.dma_map(RW, 0, 0x8000_0000, 2 * MIB, Some(ram.as_fd())) {
        Ok(()) => "DMA_MAP after UNMAP_ALL ok".to_string(),
        Err(e) => format!("DMA_MAP after UNMAP_ALL {}", errno_of(&e)),
    };
    row(
        &format!("whole GPU: {name}"),
        &before,
        &refusal,
        &format!("(one guest) {eventfd}, {again}"),
        Some(release),
    );
    drop(a);
    stop(guests);
}

/// Two guests: A floods, then B is checked and A releases everything (timed).
fn sliced(binary: &Path, name: &str, run: Flood<'_>) {
    let guests = Served::sliced(binary, 2, "64M");
    let pid = guests.server.pid();
    let b_socket = guests.sockets[0].clone();
    let ram = fds::memfd("figures-b-ram", 2 * MIB, fds::GUEST_RAM_SEALS);
    let irq = fds::eventfd();
    let mut b = Some(Served::client(&b_socket));
    let mut a = Served::client(&guests.sockets[1]);
    let before = proc_stats(pid).expect("server stats");
    let refusal = run(&mut a, pid);
    let neighbour = neighbour(&mut b, &b_socket, &ram, &irq);
    let started = Instant::now();
    a.dma_unmap(dma_flags::UNMAP_ALL, 0, 0).expect("UNMAP_ALL");
    let release = started.elapsed();
    row(
        &format!("two guests: {name}"),
        &before,
        &refusal,
        &neighbour,
        Some(release),
    );
    drop((a, b));
    stop(guests);
}

/// The process-wide budget: `flooders` guests each map until refused (the first ones by their
/// own budget, the last ones by the process's), then an idle guest is checked.
fn process_budget(binary: &Path, flooders: usize, run: Flood<'_>) {
    let guests = Served::sliced(binary, flooders + 1, "2M");
    let pid = guests.server.pid();
    let b_socket = guests.sockets[0].clone();
    let ram = fds::memfd("figures-b-ram", 2 * MIB, fds::GUEST_RAM_SEALS);
    let irq = fds::eventfd();
    let mut b = Some(Served::client(&b_socket));
    let before = proc_stats(pid).expect("server stats");
    let started = Instant::now();
    let mut clients = Vec::new();
    let mut total = Refusal {
        maps: 0,
        bytes: 0,
        errno: None,
        took: Duration::ZERO,
        at_limit: before,
    };
    for (i, socket) in guests.sockets[1..].iter().enumerate() {
        let mut client = Served::client(socket);
        let r = run(&mut client, pid);
        total.maps += r.maps;
        total.bytes += r.bytes;
        if let Some(e) = r.errno {
            total.errno = Some(format!("guest {}: {e}", i + 1));
        }
        total.at_limit = r.at_limit;
        clients.push(client);
    }
    total.took = started.elapsed();
    let neighbour = neighbour(&mut b, &b_socket, &ram, &irq);
    row(
        &format!("{flooders} guests together (process budget), then an idle one"),
        &before,
        &total,
        &neighbour,
        None,
    );
    drop((clients, b));
    stop(guests);
}

fn stop(guests: Served) {
    let mut server = guests.server;
    if let Err(e) = server.stop(libc::SIGTERM, Duration::from_secs(30)) {
        println!("(server: {e})");
    }
}

/// Run every scenario and print the table.
pub fn run(binary: &Path) {
    let small = fds::memfd("figures-ram", 64 << 10, fds::GUEST_RAM_SEALS);
    let big = fds::memfd("figures-big", 1 << 40, fds::GUEST_RAM_SEALS);
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
    let no_fd =
        |c: &mut TestClient, pid: u32| flood(c, pid, None, 0x10_0000_0000, 4096, |_| None, 70_000);
    let sparse = |c: &mut TestClient, pid: u32| {
        flood(
            c,
            pid,
            Some(big.as_fd()),
            1 << 40,
            1 << 40,
            |s| (s > 4096).then_some(s / 2),
            70_000,
        )
    };
    println!("DMA maps until refused, emulated tu102-24g (whole, or two 64 MiB guests); server figures from /proc/<pid> before -> at the refusal");
    println!();
    println!("| flood | maps accepted | refused with | fds | VmSize | VmRSS | mappings | then | UNMAP_ALL | flood took |");
    println!("|---|---:|---|---:|---:|---:|---:|---|---:|---:|");
    let floods: [(&str, Flood<'_>); 3] = [
        ("4 KiB maps, one fd each", &one_fd_each),
        ("1 TiB maps of a sparse memfd, then halving sizes", &sparse),
        ("4 KiB maps, no fd", &no_fd),
    ];
    for (name, run) in floods {
        whole(binary, name, run);
    }
    for (name, run) in floods {
        sliced(binary, name, run);
    }
    process_budget(binary, 17, &no_fd);
}
