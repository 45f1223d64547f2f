//! Guest-side benchmarks (`gpuprobe.bench=1`), run after the checks. The probe only measures
//! and prints; the host harness (`guest_tests::bench`) collects and compares.
//!
//! Output, one line each (times in nanoseconds, measured with `Instant`, i.e. the vDSO clock):
//!
//! ```text
//! GPUPROBE bench name=env clocksource=tsc cpus=2
//! GPUPROBE bench name=timer kind=latency n=.. p50_ns=.. p99_ns=.. mean_ns=.. min_ns=.. max_ns=.. loop_mean_ns=..
//! GPUPROBE bench name=gpu_bar0_read32 kind=latency ...       (trapped: crosses the vfio-user socket)
//! GPUPROBE bench name=edu_bar0_read32 kind=latency ...       (QEMU's in-process edu device)
//! GPUPROBE bench name=gpu_bar0_posted_write kind=burst n=.. issue_ns=.. drain_ns=.. total_ns=..
//! GPUPROBE bench name=edu_bar0_write32 kind=latency ...
//! GPUPROBE bench name=vram_read32 kind=latency ...           (mapped VRAM; also ram_read32)
//! GPUPROBE bench name=vram_seq_read64 kind=bandwidth bytes=.. ns=<best> median_ns=.. first_ns=.. reps=9
//!     (also ram_seq_read64, {vram,ram}_seq_write64, {vram,ram}_memcpy)
//! GPUPROBE bench name=aperture_read64 kind=bandwidth bytes=.. ns=<best> ... windows=16 chunk=65536
//!     (PRAMIN aperture, every load trapped; also aperture_mapped_read64: the same bytes through
//!     the mapped VRAM BAR)
//! ```
//!
//! Latency samples time one access each (so they include the timer's own cost, reported as
//! `timer`); `loop_mean_ns` is the fastest of a few untimed loops of the same accesses, divided
//! by their number. Each benchmark that cannot run prints a `check ... result=fail` line instead.

use std::fs::File;
use std::hint::black_box;
use std::io;
use std::marker::PhantomData;
use std::time::Instant;

use crate::aperture::{Bar0Window, VramChunk, VramView};
use crate::mem::{Window, PAGE};
use crate::out::{fact, fail, pass, set_current};
use crate::params::Params;
use crate::pci::{Bar, PciDevice};

/// QEMU's educational PCI device.
const EDU_VENDOR: u16 = 0x1234;
const EDU_DEVICE: u16 = 0x11e8;
/// edu register 0x04: "card liveness check" (reads back the inverted value written).
const EDU_LIVENESS: u64 = 0x04;
/// Untimed loops per latency benchmark; the fastest is reported as `loop_mean_ns`.
const LOOPS: usize = 5;
/// Posted-write bursts; the median burst is reported.
const BURSTS: usize = 5;
/// Repetitions of each bandwidth pass; the best is reported (with the median and the first).
const BANDWIDTH_REPS: usize = 9;

/// Per-access statistics of `samples` (nanoseconds), sorted in place.
fn stats_fields(samples: &mut [u64], loop_mean: u64) -> String {
    samples.sort_unstable();
    let n = samples.len();
    let pct = |p: usize| samples[((n * p).div_ceil(100)).clamp(1, n) - 1];
    let mean = samples.iter().sum::<u64>() / n as u64;
    format!(
        "kind=latency n={n} p50_ns={} p99_ns={} mean_ns={mean} min_ns={} max_ns={} loop_mean_ns={loop_mean}",
        pct(50),
        pct(99),
        samples[0],
        samples[n - 1]
    )
}

/// Warm up, then time `n` calls of `f` one by one, then `n` calls in each of [`LOOPS`] untimed
/// loops.
fn measure<T>(params: &Params, mut f: impl FnMut() -> io::Result<T>) -> io::Result<String> {
    for _ in 0..params.bench_warmup {
        black_box(f()?);
    }
    let n = params.bench_n as usize;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        black_box(f()?);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    // The best of a few untimed loops: one host preemption inside a loop of cheap accesses
    // would otherwise double its mean.
    let mut loop_mean = u64::MAX;
    for _ in 0..LOOPS {
        let t = Instant::now();
        for _ in 0..n {
            black_box(f()?);
        }
        loop_mean = loop_mean.min(t.elapsed().as_nanos() as u64 / n as u64);
    }
    Ok(stats_fields(&mut samples, loop_mean))
}

/// A 32-bit location inside a live mapping, accessed with one volatile load or store and no
/// checks on the timed path: under TCG the bounds and alignment checks of `Window::read32`
/// cost 0.05-0.25 µs, as much as a register of QEMU's in-process edu device.
#[derive(Clone, Copy)]
struct Reg<'a> {
    ptr: *mut u32,
    _window: PhantomData<&'a Window>,
}

impl<'a> Reg<'a> {
    /// The word at file offset `offset` of `window` (checked once, here).
    fn new(window: &'a Window, offset: u64) -> io::Result<Reg<'a>> {
        let ptr = window.region(offset, 4)?;
        if ptr as usize % 4 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned register",
            ));
        }
        Ok(Reg {
            ptr: ptr.cast(),
            _window: PhantomData,
        })
    }

    fn read(self) -> u32 {
        // SAFETY: `ptr` is aligned and inside `window`, which outlives `'a` (checked in `new`).
        unsafe { std::ptr::read_volatile(self.ptr) }
    }

    fn write(self, value: u32) {
        // SAFETY: as in `read`; the mapping is writable (PROT_WRITE).
        unsafe { std::ptr::write_volatile(self.ptr, value) }
    }
}

fn open_rw(path: &str) -> io::Result<File> {
    File::options().read(true).write(true).open(path)
}

/// Run every benchmark the parameters allow.
pub fn run(params: &Params, gpu: &PciDevice, bars: &[Bar], devices: &[PciDevice]) {
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    fact(
        "bench",
        &format!("name=env clocksource={clocksource} cpus={cpus}"),
    );

    set_current("bench_timer");
    if let Ok(fields) = measure(params, || Ok(())) {
        fact("bench", &format!("name=timer {fields}"));
    }

    bench_gpu_registers(params, gpu);
    if params.bench_edu {
        bench_edu(params, devices);
    }
    if params.bench_mib > 0 || params.bench_memcpy_mib > 0 {
        match params.vram_bar {
            Some(index) => bench_bandwidth(params, gpu, bars, index),
            None => fail("bench_bandwidth", "no gpuprobe.vram_bar given"),
        }
    }
    if params.bench_aperture_kib > 0 && params.bench_aperture_windows > 0 {
        bench_aperture(params, gpu, bars);
    }
}

/// (a) trapped BOOT_0 reads and (e) posted writes to a harmless register, via resource mmap.
fn bench_gpu_registers(params: &Params, gpu: &PciDevice) {
    set_current("bench_gpu_read");
    let bar = params.boot0_bar;
    let file = match open_rw(&gpu.resource_path(bar)) {
        Ok(f) => f,
        Err(e) => return fail("bench_gpu_read", &format!("open resource{bar}: {e}")),
    };
    let window = match Window::map(&file, 0, 4) {
        Ok(w) => w,
        Err(e) => return fail("bench_gpu_read", &format!("mmap resource{bar}: {e}")),
    };
    let boot0 = match Reg::new(&window, 0) {
        Ok(r) => r,
        Err(e) => return fail("bench_gpu_read", &format!("BAR{bar} offset 0: {e}")),
    };
    match measure(params, || Ok(boot0.read())) {
        Ok(fields) => {
            fact("bench", &format!("name=gpu_bar{bar}_read32 {fields}"));
            pass("bench_gpu_read", "");
        }
        Err(e) => fail("bench_gpu_read", &format!("read BAR{bar} offset 0: {e}")),
    }

    let Some(reg) = params.bench_reg else {
        return;
    };
    set_current("bench_gpu_posted_write");
    let result = Window::map(&file, reg, 4).and_then(|w| {
        let target = Reg::new(&w, reg)?;
        let value = target.read();
        // One small burst first so that the connection is warm.
        for _ in 0..params.bench_warmup {
            target.write(value);
        }
        boot0.read();
        let n = params.bench_n;
        let mut bursts = Vec::with_capacity(BURSTS);
        for _ in 0..BURSTS {
            let t0 = Instant::now();
            for _ in 0..n {
                target.write(value);
            }
            let t1 = Instant::now();
            black_box(boot0.read());
            let t2 = Instant::now();
            bursts.push((
                (t2 - t0).as_nanos(),
                (t1 - t0).as_nanos(),
                (t2 - t1).as_nanos(),
            ));
        }
        bursts.sort_unstable();
        let (total, issue, drain) = bursts[BURSTS / 2];
        let after = target.read();
        Ok((value, after, n, total, issue, drain))
    });
    match result {
        Ok((value, after, n, total, issue, drain)) => {
            fact(
                "bench",
                &format!(
                    "name=gpu_bar{bar}_posted_write kind=burst reg={reg:#x} n={n} bursts={BURSTS} \
                     issue_ns={issue} drain_ns={drain} total_ns={total}"
                ),
            );
            if after == value {
                pass(
                    "bench_gpu_posted_write",
                    &format!("reg={reg:#x} value={value:#010x} unchanged"),
                );
            } else {
                fail(
                    "bench_gpu_posted_write",
                    &format!(
                        "reg={reg:#x} was {value:#010x}, reads {after:#010x} after rewriting it"
                    ),
                );
            }
        }
        Err(e) => fail(
            "bench_gpu_posted_write",
            &format!("BAR{bar} offset {reg:#x}: {e}"),
        ),
    }
}

/// (b) the same accesses on QEMU's in-process edu device.
fn bench_edu(params: &Params, devices: &[PciDevice]) {
    set_current("bench_edu");
    let Some(edu) = devices
        .iter()
        .find(|d| d.vendor == EDU_VENDOR && d.device == EDU_DEVICE)
    else {
        return fail(
            "bench_edu",
            "no edu device (1234:11e8); add `-device edu` to QEMU",
        );
    };
    let result = open_rw(&edu.resource_path(0))
        .and_then(|f| Window::map(&f, 0, PAGE))
        .and_then(|w| {
            let (id_reg, liveness_reg) = (Reg::new(&w, 0)?, Reg::new(&w, EDU_LIVENESS)?);
            let id = id_reg.read();
            let read = measure(params, || Ok(id_reg.read()))?;
            let write = measure(params, || {
                liveness_reg.write(0x5a5a_0000);
                Ok(())
            })?;
            let liveness = liveness_reg.read();
            Ok((id, read, write, liveness))
        });
    match result {
        Ok((id, read, write, liveness)) => {
            fact("bench", &format!("name=edu_bar0_read32 {read}"));
            fact("bench", &format!("name=edu_bar0_write32 {write}"));
            pass(
                "bench_edu",
                &format!("bdf={} id={id:#010x} liveness={liveness:#010x}", edu.bdf),
            );
        }
        Err(e) => fail("bench_edu", &format!("{}: {e}", edu.bdf)),
    }
}

/// A private anonymous mapping of `len` bytes, populated (guest RAM).
struct AnonBuffer {
    ptr: *mut u8,
    len: usize,
}

impl AnonBuffer {
    fn new(len: usize) -> io::Result<AnonBuffer> {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel; only accessed inside
        // its bounds and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonBuffer {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for AnonBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Fill `len` bytes at `p` with 8-byte volatile stores; nanoseconds taken.
///
/// # Safety
/// `p` must be 8-byte aligned and valid for writes of `len` bytes.
unsafe fn write_seq64(p: *mut u8, len: usize) -> u128 {
    let words = p.cast::<u64>();
    let t = Instant::now();
    for i in 0..len / 8 {
        // SAFETY: i * 8 + 8 <= len, inside the region the caller vouches for.
        unsafe {
            std::ptr::write_volatile(words.add(i), (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        };
    }
    t.elapsed().as_nanos()
}

/// Read `len` bytes at `p` with 8-byte volatile loads; (nanoseconds, xor of the words).
///
/// # Safety
/// `p` must be 8-byte aligned and valid for reads of `len` bytes.
unsafe fn read_seq64(p: *const u8, len: usize) -> (u128, u64) {
    let words = p.cast::<u64>();
    let mut acc = 0u64;
    let t = Instant::now();
    for i in 0..len / 8 {
        // SAFETY: i * 8 + 8 <= len, inside the region the caller vouches for.
        acc ^= unsafe { std::ptr::read_volatile(words.add(i)) };
    }
    (t.elapsed().as_nanos(), black_box(acc))
}

/// (d) sequential bandwidth: the mapped (real) part of the VRAM BAR against guest RAM.
fn bench_bandwidth(params: &Params, gpu: &PciDevice, bars: &[Bar], index: usize) {
    set_current("bench_bandwidth");
    let Some(bar) = bars.iter().find(|b| b.index == index && b.is_mem()) else {
        return fail(
            "bench_bandwidth",
            &format!("BAR{index} is not a memory BAR"),
        );
    };
    let real = params.vram_real.unwrap_or(bar.size);
    let len = (params.bench_mib.max(params.bench_memcpy_mib) << 20).min(real) as usize;
    let seq = (params.bench_mib << 20).min(len as u64) as usize;
    let copy = (params.bench_memcpy_mib << 20).min(len as u64) as usize;
    let vram = match open_rw(&gpu.resource_path(index)).and_then(|f| Window::map(&f, 0, len as u64))
    {
        Ok(w) => w,
        Err(e) => {
            return fail(
                "bench_bandwidth",
                &format!("mmap {len} bytes of BAR{index}: {e}"),
            )
        }
    };
    let (vram_ptr, ram, dst) = match (
        vram.region(0, len),
        AnonBuffer::new(len),
        AnonBuffer::new(copy.max(PAGE as usize)),
    ) {
        (Ok(p), Ok(r), Ok(d)) => (p, r, d),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return fail("bench_bandwidth", &format!("buffers of {len} bytes: {e}"))
        }
    };
    // Alternate VRAM and RAM passes and keep every repetition: the best shows what the path can
    // do despite other load on the host, the first VRAM write also pays for populating the
    // backend's sparse VRAM memfd.
    let mut times: Vec<(String, usize, Vec<u128>)> = Vec::new();
    let mut record = |name: String, bytes: usize, ns: u128| match times
        .iter_mut()
        .find(|(n, _, _)| *n == name)
    {
        Some(entry) => entry.2.push(ns),
        None => times.push((name, bytes, vec![ns])),
    };
    let mut sums = [None, None];
    for _ in 0..BANDWIDTH_REPS {
        for (slot, (what, p)) in [("vram", vram_ptr), ("ram", ram.ptr)]
            .into_iter()
            .enumerate()
        {
            if seq > 0 {
                // SAFETY: `p` is page aligned and `seq <= len` bytes of a live read-write mapping.
                let w = unsafe { write_seq64(p, seq) };
                // SAFETY: as above.
                let (r, sum) = unsafe { read_seq64(p, seq) };
                sums[slot] = Some(sum);
                record(format!("{what}_seq_write64"), seq, w);
                record(format!("{what}_seq_read64"), seq, r);
            }
            if copy > 0 {
                let t = Instant::now();
                // SAFETY: both regions are at least `copy` bytes, distinct mappings.
                unsafe { std::ptr::copy_nonoverlapping(p.cast_const(), dst.ptr, copy) };
                let ns = t.elapsed().as_nanos();
                black_box(dst.ptr);
                record(format!("{what}_memcpy"), copy, ns);
            }
        }
    }
    // Single 4-byte reads of the (now populated) mapped VRAM and of guest RAM, timed like the
    // register reads: the per-access cost of the direct mapping, without the streaming.
    if seq > 0 {
        set_current("bench_mapped_read");
        if let Ok(fields) = Reg::new(&vram, 0).and_then(|r| measure(params, || Ok(r.read()))) {
            fact("bench", &format!("name=vram_read32 {fields}"));
        }
        let ram_word = ram.ptr.cast::<u32>();
        // SAFETY: `ram_word` is the first, aligned word of the live anonymous mapping.
        if let Ok(fields) = measure(params, || Ok(unsafe { std::ptr::read_volatile(ram_word) })) {
            fact("bench", &format!("name=ram_read32 {fields}"));
        }
        set_current("bench_bandwidth");
    }
    for (name, bytes, ns) in times {
        let first = ns[0];
        let mut sorted = ns;
        sorted.sort_unstable();
        fact(
            "bench",
            &format!(
                "name={name} kind=bandwidth bytes={bytes} ns={} median_ns={} first_ns={first} reps={}",
                sorted[0],
                sorted[sorted.len() / 2],
                sorted.len()
            ),
        );
    }
    if let [Some(v), Some(r)] = sums {
        if v != r {
            return fail(
                "bench_bandwidth",
                &format!("VRAM read back differently from RAM: xor {v:#x} vs {r:#x}"),
            );
        }
    }
    pass(
        "bench_bandwidth",
        &format!(
            "BAR{index} {seq} bytes sequential, {copy} bytes memcpy, {BANDWIDTH_REPS} passes each"
        ),
    );
}

/// Fill `len` bytes at `p` with 8-byte volatile stores of a sequence depending on `salt`.
///
/// # Safety
/// `p` must be 8-byte aligned and valid for writes of `len` bytes.
unsafe fn fill_seq64(p: *mut u8, len: usize, salt: u64) {
    let words = p.cast::<u64>();
    for i in 0..len / 8 {
        let v = (salt << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        // SAFETY: i * 8 + 8 <= len, inside the region the caller vouches for.
        unsafe { std::ptr::write_volatile(words.add(i), v) };
    }
}

/// Best, median and first of `ns`, as bench fields.
fn bandwidth_fields(bytes: u64, ns: &[u128]) -> String {
    let mut sorted = ns.to_vec();
    sorted.sort_unstable();
    format!(
        "kind=bandwidth bytes={bytes} ns={} median_ns={} first_ns={} reps={}",
        sorted[0],
        sorted[sorted.len() / 2],
        ns[0],
        ns.len()
    )
}

/// (f) Sequential 8-byte reads through the PRAMIN aperture (the window moved over
/// `bench_aperture_windows` places 1 MiB apart, `bench_aperture_kib` read at each; every load
/// is a trapped vfio-user round trip) against the same bytes through the mapped VRAM BAR.
fn bench_aperture(params: &Params, gpu: &PciDevice, bars: &[Bar]) {
    const NAME: &str = "bench_aperture";
    set_current(NAME);
    let Some(reg) = params.window_reg else {
        return fail(NAME, "no gpuprobe.window_reg given");
    };
    let chunk = (params.bench_aperture_kib << 10).min(1 << 20);
    let windows = params.bench_aperture_windows;
    let bar_size = params
        .vram_bar
        .and_then(|i| bars.iter().find(|b| b.index == i))
        .map_or(0, |b| b.size);
    let setup = || -> io::Result<(Bar0Window, Vec<VramChunk>, *mut u8)> {
        let win = Bar0Window::open(gpu, params.boot0_bar, reg)?;
        let view = VramView::open(gpu, params, bar_size)?;
        let chunks = (0..windows)
            .map(|i| view.chunk(i << 20, chunk))
            .collect::<io::Result<Vec<_>>>()?;
        for (i, c) in chunks.iter().enumerate() {
            // SAFETY: the chunk's mapping is page aligned and `chunk` bytes long.
            unsafe { fill_seq64(c.ptr()?, chunk as usize, i as u64 + 1) };
        }
        let aperture = win.region(0, chunk as usize)?;
        Ok((win, chunks, aperture))
    };
    let (win, chunks, aperture) = match setup() {
        Ok(x) => x,
        Err(e) => return fail(NAME, &format!("{windows} x {chunk} bytes of VRAM: {e}")),
    };
    let len = chunk as usize;
    // Single aperture loads with the window parked over chunk 0, timed like the BOOT_0 reads.
    if win.set_base(0).is_ok() {
        let (p32, p64) = (aperture.cast::<u32>(), aperture.cast::<u64>());
        // SAFETY: the aperture mapping is page aligned, so its first word is aligned and live.
        if let Ok(fields) = measure(params, || Ok(unsafe { std::ptr::read_volatile(p32) })) {
            fact("bench", &format!("name=gpu_aperture_read32 {fields}"));
        }
        // SAFETY: as above, for the first 8 bytes.
        if let Ok(fields) = measure(params, || Ok(unsafe { std::ptr::read_volatile(p64) })) {
            fact("bench", &format!("name=gpu_aperture_read64 {fields}"));
        }
    }
    let mut aperture_ns = Vec::new();
    let mut aperture_sums = Vec::new();
    for _ in 0..params.bench_aperture_reps {
        let mut sums = Vec::with_capacity(chunks.len());
        let t = Instant::now();
        for i in 0..windows {
            if let Err(e) = win.set_base(i << 20) {
                let _ = win.set(0);
                return fail(NAME, &format!("moving the window: {e}"));
            }
            // SAFETY: the aperture mapping is page aligned with at least `len` bytes.
            sums.push(unsafe { read_seq64(aperture, len) }.1);
        }
        aperture_ns.push(t.elapsed().as_nanos());
        aperture_sums = sums;
    }
    let _ = win.set(0);
    let mut mapped_ns = Vec::new();
    let mut mapped_sums = Vec::new();
    for _ in 0..BANDWIDTH_REPS {
        let mut sums = Vec::with_capacity(chunks.len());
        let t = Instant::now();
        for c in &chunks {
            match c.ptr() {
                // SAFETY: the chunk's mapping is page aligned and `len` bytes long.
                Ok(p) => sums.push(unsafe { read_seq64(p, len) }.1),
                Err(e) => return fail(NAME, &format!("VRAM chunk: {e}")),
            }
        }
        mapped_ns.push(t.elapsed().as_nanos());
        mapped_sums = sums;
    }
    let bytes = windows * chunk;
    let extra = format!("windows={windows} chunk={chunk}");
    fact(
        "bench",
        &format!(
            "name=aperture_read64 {} {extra}",
            bandwidth_fields(bytes, &aperture_ns)
        ),
    );
    fact(
        "bench",
        &format!(
            "name=aperture_mapped_read64 {} {extra}",
            bandwidth_fields(bytes, &mapped_ns)
        ),
    );
    match aperture_sums.iter().zip(&mapped_sums).position(|(a, m)| a != m) {
        None => pass(
            NAME,
            &format!("{windows} windows x {chunk} bytes read the same through the aperture and the VRAM BAR"),
        ),
        Some(i) => fail(
            NAME,
            &format!(
                "window {i} (guest VRAM {:#x}): aperture xor {:#x}, VRAM BAR xor {:#x}",
                (i as u64) << 20,
                aperture_sums[i],
                mapped_sums[i]
            ),
        ),
    }
}
