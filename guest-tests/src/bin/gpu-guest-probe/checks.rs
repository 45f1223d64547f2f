//! The checks themselves. Each one ends in exactly one `GPUPROBE check` line; nothing here
//! loops without a bound, and every error becomes a `fail` (or `skip`) line.

use std::fs::File;
use std::io;
use std::time::Instant;

use crate::mem::{self, Window, PAGE};
use crate::out::{fact, fail, pass, set_current, skip};
use crate::params::{pattern_word, Params, Persist};
use crate::pci::{self, Bar, PciDevice};

/// `IORESOURCE_UNSET`: the kernel could not assign an address to the BAR.
const IORESOURCE_UNSET: u64 = 0x2000_0000;
/// `IORESOURCE_PREFETCH`.
const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64`.
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// Value read from padding: every byte 0xFF.
const ALL_ONES: u32 = 0xffff_ffff;
/// Accesses used for the latency facts.
const PERF_ACCESSES: u32 = 256;

/// Run every check that the parameters ask for.
pub fn run(params: &Params) {
    set_current("pci_list");
    let devices = match pci::list() {
        Ok(d) => d,
        Err(e) => return fail("pci_list", &format!("reading /sys/bus/pci/devices: {e}")),
    };
    for d in &devices {
        fact(
            "pci",
            &format!(
                "bdf={} vendor={:#06x} device={:#06x} class={:#08x}",
                d.bdf, d.vendor, d.device, d.class
            ),
        );
    }
    let Some(dev) = identify(params, &devices) else {
        return;
    };
    let bars = match dev.bars() {
        Ok(b) => b,
        Err(e) => return fail("bars_read", &format!("{}/resource: {e}", dev.bdf)),
    };
    check_bars(params, &bars);
    check_boot0(params, &dev, &bars);
    if let Some(vram_bar) = params.vram_bar {
        check_vram(params, &dev, &bars, vram_bar);
    } else {
        skip("vram", "no gpuprobe.vram_bar given");
    }
    if params.window {
        crate::window::run(params, &dev, &bars);
    }
    if params.soak {
        crate::soak::run(params, &dev, &bars);
    }
    if params.bench {
        crate::bench::run(params, &dev, &bars, &devices);
    }
}

/// Find the device and check vendor/device/class.
fn identify(params: &Params, devices: &[PciDevice]) -> Option<PciDevice> {
    set_current("device_found");
    let by_vendor: Vec<&PciDevice> = devices
        .iter()
        .filter(|d| d.vendor == params.vendor)
        .collect();
    let chosen = params
        .device
        .and_then(|id| by_vendor.iter().find(|d| d.device == id))
        .or(by_vendor.first())
        .copied()
        .cloned();
    let Some(dev) = chosen else {
        fail(
            "device_found",
            &format!(
                "no device found with vendor={:#06x} among {} PCI functions",
                params.vendor,
                devices.len()
            ),
        );
        return None;
    };
    fact(
        "device",
        &format!(
            "bdf={} vendor={:#06x} device={:#06x} class={:#08x}",
            dev.bdf, dev.vendor, dev.device, dev.class
        ),
    );
    pass(
        "device_found",
        &format!("bdf={} functions_with_vendor={}", dev.bdf, by_vendor.len()),
    );
    match params.device {
        Some(want) if want == dev.device => pass("device_id", &format!("{:#06x}", dev.device)),
        Some(want) => fail(
            "device_id",
            &format!("got={:#06x} want={want:#06x}", dev.device),
        ),
        None => skip("device_id", "no gpuprobe.device given"),
    }
    match params.class {
        Some(want) if want == dev.class => pass("class", &format!("{:#08x}", dev.class)),
        Some(want) => fail("class", &format!("got={:#08x} want={want:#08x}", dev.class)),
        None => skip("class", "no gpuprobe.class given"),
    }
    Some(dev)
}

/// Print the BARs; check that memory BARs are powers of two, assigned, and of the expected size.
fn check_bars(params: &Params, bars: &[Bar]) {
    set_current("bars");
    for b in bars {
        let kind = if b.index == 6 {
            "rom"
        } else if b.is_mem() {
            "mem"
        } else {
            "io"
        };
        fact(
            "bar",
            &format!(
                "index={} start={:#x} size={} flags={:#x} kind={kind} mem64={} prefetch={}",
                b.index,
                b.start,
                b.size,
                b.flags,
                u8::from(b.flags & IORESOURCE_MEM_64 != 0),
                u8::from(b.flags & IORESOURCE_PREFETCH != 0),
            ),
        );
    }
    let mem_bars: Vec<&Bar> = bars.iter().filter(|b| b.index < 6 && b.is_mem()).collect();
    let not_pow2: Vec<String> = mem_bars
        .iter()
        .filter(|b| !b.size.is_power_of_two())
        .map(|b| format!("bar{}={}", b.index, b.size))
        .collect();
    if mem_bars.is_empty() {
        fail("bar_sizes_pow2", "the device has no memory BAR");
    } else if not_pow2.is_empty() {
        pass("bar_sizes_pow2", &format!("{} memory BARs", mem_bars.len()));
    } else {
        fail(
            "bar_sizes_pow2",
            &format!("not a power of two: {}", not_pow2.join(",")),
        );
    }
    let unassigned: Vec<String> = mem_bars
        .iter()
        .filter(|b| b.start == 0 || b.flags & IORESOURCE_UNSET != 0)
        .map(|b| format!("bar{}", b.index))
        .collect();
    if unassigned.is_empty() {
        pass("bars_assigned", "");
    } else {
        fail(
            "bars_assigned",
            &format!("no address assigned: {}", unassigned.join(",")),
        );
    }
    for (&index, &want) in &params.bar_sizes {
        set_current("bar_size");
        match bars.iter().find(|b| b.index == index) {
            Some(b) if b.size == want => pass("bar_size", &format!("bar{index}={want}")),
            Some(b) => fail(
                "bar_size",
                &format!("bar{index} got={} want={want}", b.size),
            ),
            None => fail("bar_size", &format!("bar{index} missing, want={want}")),
        }
    }
}

/// Nanoseconds per access of `PERF_ACCESSES` reads done by `f`.
fn time_reads(mut f: impl FnMut() -> io::Result<u32>) -> io::Result<u128> {
    let start = Instant::now();
    for _ in 0..PERF_ACCESSES {
        f()?;
    }
    Ok(start.elapsed().as_nanos() / u128::from(PERF_ACCESSES))
}

/// BOOT_0 through mmap of `resourceN` and through `/dev/mem`.
fn check_boot0(params: &Params, dev: &PciDevice, bars: &[Bar]) {
    set_current("boot0_mmap");
    let Some(bar) = bars
        .iter()
        .find(|b| b.index == params.boot0_bar && b.is_mem())
        .copied()
    else {
        let msg = format!("BAR{} is not a memory BAR", params.boot0_bar);
        fail("boot0_mmap", &msg);
        fail("boot0_devmem", &msg);
        return;
    };
    let via_mmap = File::options()
        .read(true)
        .write(true)
        .open(dev.resource_path(bar.index))
        .and_then(|f| Window::map(&f, 0, 4))
        .and_then(|w| {
            let v = w.read32(0)?;
            if let Ok(ns) = time_reads(|| w.read32(0)) {
                fact(
                    "perf",
                    &format!(
                        "name=bar{}_read32_mmap accesses={PERF_ACCESSES} ns_per_access={ns}",
                        bar.index
                    ),
                );
            }
            Ok(v)
        });
    set_current("boot0_devmem");
    let via_devmem = mem::open_rw_sync("/dev/mem")
        .and_then(|f| Window::map(&f, bar.start, 4))
        .and_then(|w| w.read32(bar.start));
    for (name, via, result) in [
        ("boot0_mmap", "mmap", &via_mmap),
        ("boot0_devmem", "devmem", &via_devmem),
    ] {
        set_current(name);
        let v = match result {
            Ok(v) => *v,
            Err(e) => {
                fail(
                    name,
                    &format!("{via} read of BAR{} offset 0: {e}", bar.index),
                );
                continue;
            }
        };
        fact(
            "reg",
            &format!("bar={} offset=0x0 value={v:#010x} via={via}", bar.index),
        );
        match params.boot0 {
            Some(want) if want == v => pass(name, &format!("{v:#010x}")),
            Some(want) => fail(name, &format!("got={v:#010x} want={want:#010x}")),
            None => skip(name, &format!("read {v:#010x}; no gpuprobe.boot0 given")),
        }
    }
}

/// Open handles on the VRAM BAR.
struct VramAccess {
    bar: Bar,
    resource: File,
    devmem: Option<File>,
    /// Why `pread`/`pwrite` on `resourceN` is not usable, if it is not.
    pread_unsupported: Option<String>,
}

impl VramAccess {
    fn mmap_read(&self, off: u64) -> io::Result<u32> {
        Window::map(&self.resource, off, 4)?.read32(off)
    }

    fn mmap_write(&self, off: u64, v: u32) -> io::Result<()> {
        Window::map(&self.resource, off, 4)?.write32(off, v)
    }

    fn devmem_read(&self, off: u64) -> io::Result<u32> {
        let f = self
            .devmem
            .as_ref()
            .ok_or_else(|| io::Error::other("/dev/mem not open"))?;
        let phys = self.bar.start + off;
        Window::map(f, phys, 4)?.read32(phys)
    }

    fn devmem_write(&self, off: u64, v: u32) -> io::Result<()> {
        let f = self
            .devmem
            .as_ref()
            .ok_or_else(|| io::Error::other("/dev/mem not open"))?;
        let phys = self.bar.start + off;
        Window::map(f, phys, 4)?.write32(phys, v)
    }
}

/// Outcome of one access path over a list of offsets: mismatches and errors.
#[derive(Default)]
struct Tally {
    ok: usize,
    bad: Vec<String>,
}

impl Tally {
    fn record(&mut self, off: u64, got: io::Result<u32>, want: u32) {
        match got {
            Ok(v) if v == want => self.ok += 1,
            Ok(v) => self
                .bad
                .push(format!("off={off:#x}:got={v:#010x},want={want:#010x}")),
            Err(e) => self.bad.push(format!("off={off:#x}:error={e}")),
        }
    }

    fn report(&self, name: &'static str, what: &str) {
        if self.bad.is_empty() && self.ok > 0 {
            pass(name, &format!("{what} offsets={}", self.ok));
        } else if self.bad.is_empty() {
            skip(name, "no offsets to test");
        } else {
            let shown: Vec<&str> = self.bad.iter().take(4).map(String::as_str).collect();
            fail(
                name,
                &format!(
                    "{what} bad={}/{} {}",
                    self.bad.len(),
                    self.bad.len() + self.ok,
                    shown.join(" ")
                ),
            );
        }
    }
}

fn test_value(off: u64) -> u32 {
    pattern_word(0x6770_7570_726f_6265, off / 4) | 1
}

/// VRAM aperture: read-back below the real size, 0xFF/dropped writes in the padding,
/// persistence across guests.
fn check_vram(params: &Params, dev: &PciDevice, bars: &[Bar], index: usize) {
    set_current("vram_bar");
    let Some(bar) = bars
        .iter()
        .find(|b| b.index == index && b.is_mem())
        .copied()
    else {
        return fail("vram_bar", &format!("BAR{index} is not a memory BAR"));
    };
    let size = bar.size;
    let real = params.vram_real.unwrap_or(size);
    if real == 0 || real > size {
        return fail(
            "vram_bar",
            &format!("vram_real={real} does not fit BAR{index} size={size}"),
        );
    }
    let resource = match File::options()
        .read(true)
        .write(true)
        .open(dev.resource_path(index))
    {
        Ok(f) => f,
        Err(e) => {
            return fail(
                "vram_bar",
                &format!("open {}: {e}", dev.resource_path(index)),
            )
        }
    };
    pass(
        "vram_bar",
        &format!("bar{index} size={size} real={real} padding={}", size - real),
    );
    let devmem = match mem::open_rw_sync("/dev/mem") {
        Ok(f) => Some(f),
        Err(e) => {
            fact(
                "note",
                &format!("access=devmem result=unavailable detail={e}"),
            );
            None
        }
    };
    set_current("vram_pread_probe");
    let pread_unsupported = match mem::pread32(&resource, 0) {
        Ok(_) => None,
        Err(e) => {
            fact(
                "note",
                &format!(
                    "access=pread result=unsupported path={} detail={e}",
                    dev.resource_path(index)
                ),
            );
            Some(e.to_string())
        }
    };
    let acc = VramAccess {
        bar,
        resource,
        devmem,
        pread_unsupported,
    };

    if let Ok(ns) = Window::map(&acc.resource, 0, 4).and_then(|w| time_reads(|| w.read32(0))) {
        fact(
            "perf",
            &format!("name=bar{index}_read32_mmap accesses={PERF_ACCESSES} ns_per_access={ns}"),
        );
    }
    if let Some(mode) = params.persist {
        check_persist(params, &acc, real, mode);
    }
    check_readback(params, &acc, real);
    if real < size {
        check_padding(&acc, real, size);
    } else {
        skip("vram_padding", "BAR has no padding (vram_real = BAR size)");
    }
}

/// Offsets used for the read-back test: start, a page boundary, middle, and the last words of
/// real memory, excluding the persistence window.
fn readback_offsets(params: &Params, real: u64) -> Vec<u64> {
    let mut offs = vec![
        0,
        0x1ffc,
        0x2000,
        (real / 2) & !3,
        (real - 8) & !3,
        (real - 4) & !3,
    ];
    offs.sort_unstable();
    offs.dedup();
    let (p0, p1) = (
        params.persist_offset,
        params.persist_offset + params.persist_len,
    );
    offs.retain(|&o| o + 4 <= real && !(params.persist.is_some() && o + 4 > p0 && o < p1));
    offs
}

fn check_readback(params: &Params, acc: &VramAccess, real: u64) {
    let offs = readback_offsets(params, real);
    set_current("vram_rw_mmap");
    let mut write_errors = Vec::new();
    for &o in &offs {
        if let Err(e) = acc.mmap_write(o, test_value(o)) {
            write_errors.push(format!("off={o:#x}:write-error={e}"));
        }
    }
    let mut t = Tally::default();
    for &o in &offs {
        t.record(o, acc.mmap_read(o), test_value(o));
    }
    t.bad.extend(write_errors);
    t.report("vram_rw_mmap", "write mmap, read mmap");

    set_current("vram_rw_devmem");
    if acc.devmem.is_some() {
        let mut t = Tally::default();
        for &o in &offs {
            t.record(o, acc.devmem_read(o), test_value(o));
        }
        t.report("vram_rw_devmem", "write mmap, read /dev/mem");
    } else {
        fail("vram_rw_devmem", "/dev/mem could not be opened");
    }

    set_current("vram_rw_pread");
    match &acc.pread_unsupported {
        None => {
            let mut t = Tally::default();
            for &o in &offs {
                t.record(o, mem::pread32(&acc.resource, o), test_value(o));
            }
            t.report("vram_rw_pread", "write mmap, read pread");
            // pwrite, read back through mmap.
            set_current("vram_rw_pwrite");
            let mut t = Tally::default();
            for &o in &offs {
                let v = !test_value(o);
                match mem::pwrite32(&acc.resource, o, v) {
                    Ok(()) => t.record(o, acc.mmap_read(o), v),
                    Err(e) => t.record(o, Err(e), v),
                }
                let _ = acc.mmap_write(o, test_value(o));
            }
            t.report("vram_rw_pwrite", "write pwrite, read mmap");
        }
        Some(why) => {
            skip(
                "vram_rw_pread",
                &format!("sysfs resource read() unsupported: {why}"),
            );
            // Second write path instead: write through /dev/mem, read back through mmap.
            set_current("vram_rw_devmem_write");
            let mut t = Tally::default();
            for &o in &offs {
                let v = !test_value(o);
                match acc.devmem_write(o, v) {
                    Ok(()) => t.record(o, acc.mmap_read(o), v),
                    Err(e) => t.record(o, Err(e), v),
                }
                let _ = acc.mmap_write(o, test_value(o));
            }
            t.report("vram_rw_devmem_write", "write /dev/mem, read mmap");
        }
    }
}

fn check_padding(acc: &VramAccess, real: u64, size: u64) {
    let first = real.next_multiple_of(4);
    let mut offs = vec![
        first,
        first + 4,
        real.next_multiple_of(PAGE) + 0x100,
        size - 4,
    ];
    offs.retain(|&o| o + 4 <= size);
    offs.sort_unstable();
    offs.dedup();
    fact(
        "padding",
        &format!(
            "real={real} size={size} offsets={}",
            offs.iter()
                .map(|o| format!("{o:#x}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );

    set_current("vram_pad_read_devmem");
    let mut t = Tally::default();
    for &o in &offs {
        t.record(o, acc.devmem_read(o), ALL_ONES);
    }
    t.report("vram_pad_read_devmem", "padding reads 0xff via /dev/mem");

    set_current("vram_pad_read_mmap");
    match Window::map(&acc.resource, size - 4, 4) {
        Err(e) => skip(
            "vram_pad_read_mmap",
            &format!("mmap of the BAR tail refused: {e}"),
        ),
        Ok(_) => {
            let mut t = Tally::default();
            for &o in &offs {
                t.record(o, acc.mmap_read(o), ALL_ONES);
                let byte = Window::map(&acc.resource, o, 1)
                    .and_then(|w| w.read8(o))
                    .map(|b| if b == 0xff { ALL_ONES } else { u32::from(b) });
                t.record(o, byte, ALL_ONES);
            }
            t.report(
                "vram_pad_read_mmap",
                "padding reads 0xff via mmap (32- and 8-bit)",
            );
        }
    }

    set_current("vram_pad_read_pread");
    match &acc.pread_unsupported {
        None => {
            let mut t = Tally::default();
            for &o in &offs {
                t.record(o, mem::pread32(&acc.resource, o), ALL_ONES);
            }
            t.report("vram_pad_read_pread", "padding reads 0xff via pread");
        }
        Some(why) => skip(
            "vram_pad_read_pread",
            &format!("sysfs resource read() unsupported: {why}"),
        ),
    }

    // Writes into the padding: through every available path; each must be accepted silently
    // and leave the padding reading all-ones and real memory untouched.
    set_current("vram_pad_write_dropped");
    let mut write_errors = Vec::new();
    for &o in &offs {
        let v = 0x1234_5678 ^ (o as u32);
        if acc.pread_unsupported.is_none() {
            if let Err(e) = mem::pwrite32(&acc.resource, o, v) {
                write_errors.push(format!("off={o:#x}:pwrite-error={e}"));
            }
        }
        if let Err(e) = acc.mmap_write(o, v) {
            write_errors.push(format!("off={o:#x}:mmap-write-error={e}"));
        }
        if acc.devmem.is_some() {
            if let Err(e) = acc.devmem_write(o, v) {
                write_errors.push(format!("off={o:#x}:devmem-write-error={e}"));
            }
        }
    }
    let mut t = Tally::default();
    for &o in &offs {
        t.record(o, acc.devmem_read(o), ALL_ONES);
        t.record(o, acc.mmap_read(o), ALL_ONES);
    }
    t.bad.extend(write_errors);
    let paths = if acc.pread_unsupported.is_none() {
        "pwrite+mmap+devmem"
    } else {
        "mmap+devmem"
    };
    t.report(
        "vram_pad_write_dropped",
        &format!("writes via {paths} dropped, re-read 0xff"),
    );

    // Real memory just below the end must not have been hit by the padding writes (a backend
    // that wraps offsets modulo the real size would corrupt it).
    set_current("vram_pad_write_no_alias");
    let mut t = Tally::default();
    for o in [(real - 4) & !3, 0] {
        t.record(o, acc.mmap_read(o), test_value(o));
    }
    t.report(
        "vram_pad_write_no_alias",
        "real memory unchanged after padding writes",
    );
}

fn check_persist(params: &Params, acc: &VramAccess, real: u64, mode: Persist) {
    let (off, len, seed) = (
        params.persist_offset,
        params.persist_len,
        params.persist_seed,
    );
    let name = match mode {
        Persist::Write => "persist_write",
        Persist::Check => "persist_check",
    };
    set_current(name);
    if off % 4 != 0 || off.checked_add(len).is_none_or(|e| e > real) {
        return fail(
            name,
            &format!("window off={off:#x} len={len} outside real VRAM ({real})"),
        );
    }
    let window = match Window::map(&acc.resource, off, len) {
        Ok(w) => w,
        Err(e) => return fail(name, &format!("mmap off={off:#x} len={len}: {e}")),
    };
    let words = len / 4;
    if mode == Persist::Write {
        for i in 0..words {
            if let Err(e) = window.write32(off + 4 * i, pattern_word(seed, i)) {
                return fail(name, &format!("write at {:#x}: {e}", off + 4 * i));
            }
        }
    }
    let mut bad = 0u64;
    let mut first = String::new();
    for i in 0..words {
        let want = pattern_word(seed, i);
        match window.read32(off + 4 * i) {
            Ok(v) if v == want => {}
            Ok(v) => {
                if bad == 0 {
                    first = format!(
                        "first_bad_off={:#x} got={v:#010x} want={want:#010x}",
                        off + 4 * i
                    );
                }
                bad += 1;
            }
            Err(e) => return fail(name, &format!("read at {:#x}: {e}", off + 4 * i)),
        }
    }
    let what = format!("off={off:#x} len={len} seed={seed:#x}");
    if bad == 0 {
        pass(name, &what);
    } else {
        fail(
            name,
            &format!("{what} mismatched_words={bad}/{words} {first}"),
        );
    }
}
