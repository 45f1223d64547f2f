//! What the trapped paths of a sliced guest cost in-process (no socket, no QEMU), against
//! reading the same guest VRAM through the mapped (sparse-mmap) part of its VRAM BAR.
//!
//! Run: `cargo bench -p gpu-backend --bench trap_costs`
//!
//! A guest of 64 MiB on the emulated gh100-80g (next to an 8 MiB guest, so its slice does not
//! start at VRAM 0):
//! - aperture throughput: the guest moves its window register over its 64 MiB and reads each
//!   1 MiB aperture in 4 KiB reads (every access goes through the shared host PRAMIN);
//! - the baseline: the same 64 MiB read from the mapping QEMU would give the guest (the VRAM
//!   memfd at the slice offset).
//! - per-access costs of 4-byte register, aperture and BAR1-translated VRAM-BAR reads.

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use gpu_backend::host_gpu::emulated::EmulatedHostGpu;
use gpu_backend::host_gpu::{HostBarRole, HostGpu};
use gpu_backend::presentation::PresentedFunction;
use gpu_backend::slice::SlicedGpu;

const MIB: u64 = 1 << 20;
const GUEST: u64 = 64 * MIB;
const APERTURE: u64 = 0x70_0000;
const WINDOW: u64 = 0x10_FD40;
const ROUNDS: usize = 3;

fn best_of(mut f: impl FnMut() -> f64) -> f64 {
    (0..ROUNDS).map(|_| f()).fold(f64::MAX, f64::min)
}

fn per_access_ns(n: u64, mut access: impl FnMut(u64)) -> f64 {
    best_of(|| {
        let start = Instant::now();
        for i in 0..n {
            access(i);
        }
        start.elapsed().as_nanos() as f64 / n as f64
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("gh100-80g").unwrap());
    let mut sliced = SlicedGpu::new(host).unwrap();
    sliced.add_guest(8 * MIB).unwrap();
    let function = PresentedFunction::for_guest(sliced.add_guest(GUEST).unwrap()).unwrap();
    let bar = function
        .bars()
        .iter()
        .find(|b| matches!(b.role(), HostBarRole::Vram { .. }))
        .unwrap();
    let bar_index = u32::from(bar.index());
    // Give every page content so neither path reads holes.
    let chunk = vec![0x5Au8; MIB as usize];
    for off in (0..GUEST).step_by(MIB as usize) {
        function.region_write(bar_index, off, &chunk).unwrap();
    }

    // Aperture: window over each MiB, 4 KiB reads.
    let mut buf = vec![0u8; 4096];
    let aperture_secs = best_of(|| {
        let start = Instant::now();
        for mib in 0..GUEST / MIB {
            let base = (mib * MIB) >> 16;
            function
                .region_write(0, WINDOW, &(base as u32).to_le_bytes())
                .unwrap();
            for off in (0..MIB).step_by(4096) {
                function.region_read(0, APERTURE + off, &mut buf).unwrap();
                black_box(&buf);
            }
        }
        start.elapsed().as_secs_f64()
    });

    // Baseline: the mapped part of the VRAM BAR.
    let (area, source) = bar.mappable().expect("the VRAM BAR has a mapped part");
    assert!(area.size >= GUEST);
    // SAFETY: a fresh read-only shared mapping of the VRAM memfd; only read through raw
    // pointers below, and unmapped at the end.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GUEST as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            source.fd.as_raw_fd(),
            source.file_offset as libc::off_t,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let mapped_secs = best_of(|| {
        let start = Instant::now();
        for off in (0..GUEST as usize).step_by(4096) {
            // SAFETY: `off + 4096 <= GUEST`, inside the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.cast::<u8>().add(off), buf.as_mut_ptr(), 4096)
            };
            black_box(&buf);
        }
        start.elapsed().as_secs_f64()
    });
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(ptr, GUEST as usize) };

    let mbs = |secs: f64| GUEST as f64 / secs / 1e6;
    println!("Sliced guest of 64 MiB on the emulated gh100-80g, in-process, best of {ROUNDS}");
    println!();
    println!("| read of the guest's 64 MiB | MB/s | ratio to mapped |");
    println!("|---|---|---|");
    println!(
        "| PRAMIN aperture (window moved per MiB, 4 KiB reads) | {:.0} | {:.4} |",
        mbs(aperture_secs),
        mapped_secs / aperture_secs
    );
    println!(
        "| mapped VRAM BAR (memfd at the slice offset, 4 KiB copies) | {:.0} | 1 |",
        mbs(mapped_secs)
    );

    let mut four = [0u8; 4];
    let passed = per_access_ns(200_000, |_| {
        function.region_read(0, 0, &mut four).unwrap();
    });
    let hidden = per_access_ns(200_000, |_| {
        function.region_read(0, 0xB8_30B0, &mut four).unwrap();
    });
    function
        .region_write(0, WINDOW, &0x10u32.to_le_bytes())
        .unwrap();
    let aperture4 = per_access_ns(200_000, |i| {
        function
            .region_read(0, APERTURE + (i * 4) % MIB, &mut four)
            .unwrap();
    });
    let moved = per_access_ns(100_000, |i| {
        function
            .region_write(0, WINDOW, &((i as u32) % 0x3F0).to_le_bytes())
            .unwrap();
        function.region_read(0, APERTURE, &mut four).unwrap();
    });
    let bar1 = per_access_ns(200_000, |i| {
        function
            .region_read(bar_index, (i * 4) % GUEST, &mut four)
            .unwrap();
    });
    println!();
    println!("| 4-byte access | ns |");
    println!("|---|---|");
    println!("| BAR0 passed register read (BOOT_0) | {passed:.0} |");
    println!("| BAR0 hidden register read | {hidden:.0} |");
    println!("| aperture read, host window in place | {aperture4:.0} |");
    println!("| window write + aperture read (host window moves) | {moved:.0} |");
    println!("| VRAM BAR read through the host BAR1 (MMU-translated) | {bar1:.0} |");
}
