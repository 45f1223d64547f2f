//! Tests of slicing one emulated GPU between guests: the page-table builder against the
//! emulator's independent MMU walker, the BAR1 windows, scrubbing, unmapping, and isolation
//! of a guest's BAR0 (window register, PRAMIN aperture) and VRAM BAR under random traffic.

use std::sync::Arc;

use gpu_emulation::mmu::translate_with;
use gpu_emulation::{PageSize as EmuPageSize, PteAperture, VramAddr as EmuAddr};
use proptest::prelude::*;

use super::*;
use crate::host_driver::addr::{GpuVa, PageSize, VramAddr, GIB, KIB, MIB};
use crate::host_driver::cursor::PraminCursor;
use crate::host_driver::page_table::builder::{MapOptions, PageTableBuilder};
use crate::host_driver::page_table::format::PageTableFormat;
use crate::host_driver::pramin::Pramin;
use crate::host_driver::vram_alloc::VramAllocator;
use crate::host_gpu::emulated::EmulatedHostGpu;
use crate::host_gpu::{HostBarRole, HostGpu};
use crate::presentation::PresentedFunction;

fn emulated(name: &str) -> (Arc<EmulatedHostGpu>, Arc<dyn HostGpu>) {
    let gpu = Arc::new(EmulatedHostGpu::by_name(name).unwrap());
    let host: Arc<dyn HostGpu> = gpu.clone();
    (gpu, host)
}

fn vram_read(gpu: &EmulatedHostGpu, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    gpu.emulated()
        .vram()
        .read(EmuAddr::new(addr), &mut buf)
        .unwrap();
    buf
}

fn vram_fill(gpu: &EmulatedHostGpu, addr: u64, len: u64, byte: u8) {
    gpu.emulated()
        .vram()
        .fill(EmuAddr::new(addr), len, byte)
        .unwrap();
}

/// The slot of the guest's VRAM BAR at VRAM offset 0.
fn vram_bar(function: &PresentedFunction) -> u32 {
    function
        .bars()
        .iter()
        .find(|b| b.role() == HostBarRole::Vram { vram_offset: 0 })
        .map(|b| u32::from(b.index()))
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// The builder's tables against the emulator's walker (two independent implementations).

#[derive(Debug, Clone)]
struct Req {
    va: u64,
    pa: u64,
    len: u64,
    max: PageSize,
}

fn requests() -> impl Strategy<Value = Vec<Req>> {
    let one = (
        0u64..8,
        0u64..4096,
        1u64..1200,
        0u64..(1 << 18),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(region, page, pages, pa_page, congruent, max)| {
            // Eight 1 GiB regions spread over the VA space; up to ~4.7 MiB or ~300 MiB long.
            let va = region * (1 << 36) + region * GIB + page * 4 * KIB;
            let len = pages * 4 * KIB * if pages % 4 == 0 { 64 } else { 1 };
            let pa = if congruent {
                (pa_page % 256) * 2 * MIB + va % (2 * MIB)
            } else {
                pa_page * 4 * KIB
            };
            Req {
                va,
                pa,
                len,
                max: PageSize::ALL[max],
            }
        });
    proptest::collection::vec(one, 1..10)
}

fn builder_agrees_with_walker(
    name: &str,
    reqs: Vec<Req>,
    probes: Vec<u64>,
) -> Result<(), TestCaseError> {
    let (gpu, host) = emulated(name);
    let format = PageTableFormat::for_generation(host.identity().generation);
    let mut pramin = Pramin::new(host).unwrap();
    let mut cursor = PraminCursor::new(&mut pramin);
    // Data below 2 GiB; tables above it.
    let alloc =
        VramAllocator::new(VramAddr::new(2 * GIB), VramAddr::new(2 * GIB + 64 * MIB)).unwrap();
    let mut b = PageTableBuilder::new(&mut cursor, format, alloc).unwrap();
    let mut points = Vec::new();
    for r in &reqs {
        let mapped = b.map_with(
            &mut cursor,
            GpuVa::new(r.va),
            VramAddr::new(r.pa),
            r.len,
            MapOptions {
                max_page_size: r.max,
            },
        );
        if mapped.is_ok() {
            points.extend([
                r.va,
                r.va + r.len - 1,
                r.va + r.len,
                r.va.wrapping_sub(1),
                r.va + r.len / 2,
            ]);
        }
    }
    // Random probes near every mapping and anywhere in the first regions.
    for (i, p) in probes.iter().enumerate() {
        if let Some(&base) = points.get(i % points.len().max(1)) {
            points.push(base.wrapping_add(p % (4 * MIB)).wrapping_sub(2 * MIB));
        }
        points.push(p % (8 * (1u64 << 36)));
    }
    let root = EmuAddr::new(b.root().raw());
    for va in points {
        if va >> format.va_bits() != 0 {
            continue;
        }
        let expected = b.lookup(GpuVa::new(va));
        let walked = translate_with(gpu.emulated(), root, va);
        match (expected, walked) {
            (Some(pa), Ok(t)) => {
                prop_assert_eq!(t.pa, pa.raw(), "{} va {:#x}", name, va);
                prop_assert_eq!(t.aperture, PteAperture::VideoMemory);
                prop_assert!(!t.read_only);
            }
            (None, Err(_)) => {}
            (e, w) => prop_assert!(false, "{name} va {va:#x}: builder {e:?}, walker {w:?}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn page_tables_agree_with_the_emulator_walker_v2(reqs in requests(), probes in proptest::collection::vec(any::<u64>(), 0..64)) {
        builder_agrees_with_walker("tu102-24g", reqs, probes)?;
    }

    #[test]
    fn page_tables_agree_with_the_emulator_walker_v3(reqs in requests(), probes in proptest::collection::vec(any::<u64>(), 0..64)) {
        builder_agrees_with_walker("gh100-80g", reqs, probes)?;
    }
}

// ---------------------------------------------------------------------------------------
// BAR1 windows.

#[test]
fn each_bar1_window_translates_only_into_its_slice() {
    for name in ["tu102-24g", "gh100-80g"] {
        let (gpu, host) = emulated(name);
        let mut sliced = SlicedGpu::new(host.clone()).unwrap();
        let guests: Vec<GuestSlice> = [64 * MIB, 2 * MIB, GIB, 6 * MIB]
            .into_iter()
            .map(|size| sliced.add_guest(size).unwrap())
            .collect();
        let (root, inst) = sliced.vram().bar1_tables().unwrap();
        let reserved = sliced.partition().host_reserved();
        assert!(root >= reserved.start && root < reserved.end, "{name}");
        assert!(inst >= reserved.start && inst < reserved.end, "{name}");
        let emu = gpu.emulated();
        assert_eq!(
            emu.bar1_binding().mode,
            gpu_emulation::BarMode::Virtual,
            "{name}"
        );
        let root = EmuAddr::new(root.raw());
        // Walk every 2 MiB of the BAR1 aperture: mapped VAs are exactly the windows, each
        // into its own slice, with 2 MiB pages.
        let aperture = host.identity().bar1_aperture().unwrap().size;
        let mut mapped = 0;
        for va in (0..aperture).step_by(2 * MIB as usize) {
            let owner = guests.iter().find(|g| {
                let w = g.bar1_window().unwrap().raw();
                va >= w && va < w + g.slice().size()
            });
            match (owner, translate_with(emu, root, va + 0x123)) {
                (Some(g), Ok(t)) => {
                    let off = va - g.bar1_window().unwrap().raw();
                    assert_eq!(
                        t.pa,
                        g.slice().start().raw() + off + 0x123,
                        "{name} va {va:#x}"
                    );
                    assert!(g.slice().contains(VramAddr::new(t.pa)));
                    assert_eq!(t.page_size, EmuPageSize::Huge2M);
                    // The bound instance block translates the same way.
                    assert_eq!(emu.bar1_translate(va + 0x123).unwrap().pa, t.pa);
                    mapped += 1;
                }
                (None, Err(_)) => {}
                (o, t) => panic!("{name} va {va:#x}: owner {o:?}, walk {t:?}"),
            }
        }
        let total: u64 = guests.iter().map(|g| g.slice().size()).sum();
        assert_eq!(mapped * 2 * MIB, total, "{name}");
        // Guards: the bytes right before and after each window fault.
        for g in &guests {
            let w = g.bar1_window().unwrap().raw();
            assert!(w >= BAR1_GUARD);
            assert!(translate_with(emu, root, w - 1).is_err());
            assert!(translate_with(emu, root, w + g.slice().size()).is_err());
        }
    }
}

#[test]
fn removed_guest_window_has_no_stale_mapping() {
    let (gpu, host) = emulated("gh100-80g");
    let mut sliced = SlicedGpu::new(host.clone()).unwrap();
    let a = sliced.add_guest(4 * MIB).unwrap();
    let b = sliced.add_guest(4 * MIB).unwrap();
    let va = a.bar1_window().unwrap().raw();
    // Warm the TLB with the window's translation.
    host.bar1_write(va + 0x40, &[7; 8]).unwrap();
    let mut buf = [0u8; 8];
    host.bar1_read(va + 0x40, &mut buf).unwrap();
    assert_eq!(buf, [7; 8]);
    let faults = gpu.emulated().bar1_stats().read_faults;
    sliced.remove_guest(&a).unwrap();
    host.bar1_read(va + 0x40, &mut buf).unwrap();
    assert_eq!(buf, [0xFF; 8], "stale translation after unmap");
    assert!(gpu.emulated().bar1_stats().read_faults > faults);
    host.bar1_write(va + 0x40, &[9; 8]).unwrap();
    assert_eq!(vram_read(&gpu, a.slice().start().raw() + 0x40, 8), [7; 8]);
    // B is untouched and a new guest gets a fresh, scrubbed window.
    let vb = b.bar1_window().unwrap().raw();
    host.bar1_write(vb, &[3; 4]).unwrap();
    let c = sliced.add_guest(4 * MIB).unwrap();
    assert_eq!(c.slice(), a.slice(), "first fit reuses the hole");
    let vc = c.bar1_window().unwrap().raw();
    host.bar1_read(vc + 0x40, &mut buf).unwrap();
    assert_eq!(buf, [0; 8], "scrubbed");
    assert!(matches!(
        sliced.remove_guest(&a),
        Err(SetupError::NotAGuest(_))
    ));
    sliced.remove_guest(&c).unwrap();
}

// ---------------------------------------------------------------------------------------
// Scrubbing and sizes.

#[test]
fn a_slice_handed_to_a_new_guest_is_scrubbed_and_stays_sparse() {
    let (gpu, host) = emulated("tu102-24g");
    vram_fill(&gpu, 0, 16 * MIB, 0xAB);
    let before = gpu.emulated().vram().allocated_bytes().unwrap();
    let mut sliced = SlicedGpu::new(host).unwrap();
    let g0 = sliced.add_guest(8 * MIB).unwrap();
    // (Measured before reading the range back: reading a hole of a shared memfd mapping
    // allocates the page again.)
    let after = gpu.emulated().vram().allocated_bytes().unwrap();
    assert!(
        after + 8 * MIB <= before + MIB,
        "scrub punched holes: {before} -> {after}"
    );
    assert!(vram_read(&gpu, 0, 8 * MIB as usize).iter().all(|&b| b == 0));
    assert_eq!(
        vram_read(&gpu, 8 * MIB, 4),
        [0xAB; 4],
        "only the slice is scrubbed"
    );
    // The guest writes; the next guest of the same range reads zero.
    let f0 = PresentedFunction::for_guest(g0.clone()).unwrap();
    let bar = vram_bar(&f0);
    f0.region_write(bar, 0x1000, &[0x11; 64]).unwrap();
    assert_eq!(vram_read(&gpu, 0x1000, 4), [0x11; 4]);
    sliced.remove_guest(&g0).unwrap();
    let g1 = sliced.add_guest(8 * MIB).unwrap();
    assert_eq!(g1.slice(), g0.slice());
    let f1 = PresentedFunction::for_guest(g1).unwrap();
    let mut buf = [0xEEu8; 64];
    f1.region_read(bar, 0x1000, &mut buf).unwrap();
    assert_eq!(buf, [0; 64]);
}

/// Maps `len` bytes of `fd` shared; the caller unmaps.
fn map_shared(fd: &std::os::fd::OwnedFd, len: u64) -> *mut u8 {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping chosen by the kernel; callers access it only through
    // raw pointers within `len` and unmap it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// A removed guest's QEMU may keep its mapping of the slice's memfd: the next guest of the
/// same range gets a fresh memfd, and the old mapping reaches nothing of it either way.
#[test]
fn a_removed_guests_memfd_is_not_reused_for_the_next_guest() {
    let (gpu, host) = emulated("tu102-24g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    let a = sliced.add_guest(4 * MIB).unwrap();
    let fa = PresentedFunction::for_guest(a.clone()).unwrap();
    let bar = vram_bar(&fa);
    let fd_a = Arc::clone(&fa.bar(bar).unwrap().mappable().unwrap().1.fd);
    let pa = map_shared(&fd_a, 4 * MIB);
    fa.region_write(bar, 0x100, &[0xA1; 16]).unwrap();
    // SAFETY: inside the 4 MiB mapping made above (unmapped at the end).
    assert_eq!(unsafe { std::ptr::read_volatile(pa.add(0x100)) }, 0xA1);
    sliced.remove_guest(&a).unwrap();
    drop(fa);

    let b = sliced.add_guest(4 * MIB).unwrap();
    assert_eq!(b.slice(), a.slice(), "first fit reuses the range");
    let fb = PresentedFunction::for_guest(b.clone()).unwrap();
    let fd_b = Arc::clone(&fb.bar(bar).unwrap().mappable().unwrap().1.fd);
    assert!(
        !Arc::ptr_eq(&fd_a, &fd_b),
        "the old memfd was handed out again"
    );
    let ino = |fd: &std::os::fd::OwnedFd| {
        use std::os::unix::fs::MetadataExt;
        std::fs::File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino()
    };
    assert_ne!(ino(&fd_a), ino(&fd_b));
    // B writes (trapped, and through its own mapping); A's old mapping sees none of it.
    fb.region_write(bar, 0x100, &[0xB2; 16]).unwrap();
    let pb = map_shared(&fd_b, 4 * MIB);
    // SAFETY: inside the two 4 MiB mappings made above, unmapped here.
    unsafe {
        std::ptr::write_volatile(pb.add(0x2000), 0xB3);
        for at in [0x100, 0x10F, 0x2000] {
            assert_ne!(std::ptr::read_volatile(pa.add(at)) & 0xF0, 0xB0, "{at:#x}");
        }
        // A writes through its old mapping; B's VRAM does not change.
        std::ptr::write_bytes(pa, 0xAA, (4 * MIB) as usize);
        libc::munmap(pb.cast(), (4 * MIB) as usize);
        libc::munmap(pa.cast(), (4 * MIB) as usize);
    }
    let start = b.slice().start().raw();
    assert_eq!(vram_read(&gpu, start + 0x100, 16), [0xB2; 16]);
    assert_eq!(vram_read(&gpu, start + 0x2000, 1), [0xB3]);
    assert!(vram_read(&gpu, start, 0x100).iter().all(|&x| x == 0));
    let mut buf = [0u8; 16];
    fb.region_read(bar, 0x100, &mut buf).unwrap();
    assert_eq!(buf, [0xB2; 16]);
}

/// A guest that sees its function revoked (as its driver does: BOOT_0 reads ~0) no longer
/// sees its VRAM through its QEMU's mapping of the slice's memfd either: the memfd is cut
/// off in the same step as the revocation. Before, a guest could read its old VRAM through
/// the mapping for as long as its servers took to stop (seen once in the QEMU e2e test).
#[test]
fn a_guest_that_sees_itself_revoked_sees_no_vram_through_its_mapping() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for round in 0..20 {
        let (_gpu, host) = emulated("tu102-24g");
        let mut sliced = SlicedGpu::new(host).unwrap();
        let a = sliced.add_guest(4 * MIB).unwrap();
        let fa = PresentedFunction::for_guest(a.clone()).unwrap();
        let bar = vram_bar(&fa);
        let fd = Arc::clone(&fa.bar(bar).unwrap().mappable().unwrap().1.fd);
        let mapped = map_shared(&fd, 4 * MIB) as usize;
        fa.region_write(bar, 0, &[0xA5; 4096]).unwrap();
        let started = AtomicBool::new(false);
        let access = Arc::clone(a.access());
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let p = mapped as *const u8;
                loop {
                    started.store(true, Ordering::Release);
                    if access.with_live(|| ()).is_none() {
                        // SAFETY: inside the 4 MiB mapping made above (unmapped below,
                        // after this thread ended).
                        return unsafe { std::ptr::read_volatile(p) };
                    }
                }
            });
            while !started.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            sliced.remove_guest(&a).unwrap();
            let seen = watcher.join().unwrap();
            assert_eq!(
                seen, 0,
                "round {round}: VRAM seen through the mapping after revocation"
            );
        });
        // SAFETY: the mapping made above; nothing uses it any more.
        unsafe { libc::munmap(mapped as *mut libc::c_void, (4 * MIB) as usize) };
    }
}

/// A removed guest's slice handle cannot be presented again: before this was refused, the
/// stale handle got the memfd of whoever held the range now (the next guest's VRAM, mapped
/// by the removed guest's QEMU), or carved free VRAM for itself. Found by the churn soak
/// (`backend/tests/soak/churn`).
#[test]
fn a_removed_guests_slice_cannot_be_presented_again() {
    for name in ["tu102-24g", "gh100-80g"] {
        let (gpu, host) = emulated(name);
        let mut sliced = SlicedGpu::new(host).unwrap();
        let a = sliced.add_guest(4 * MIB).unwrap();
        drop(PresentedFunction::for_guest(a.clone()).unwrap());
        sliced.remove_guest(&a).unwrap();
        // The next guest gets the same range and is presented: its own memfd.
        let b = sliced.add_guest(4 * MIB).unwrap();
        assert_eq!(b.slice(), a.slice(), "{name}: first fit reuses the range");
        let fb = PresentedFunction::for_guest(b.clone()).unwrap();
        let bar = vram_bar(&fb);
        fb.region_write(bar, 0x100, &[0xB2; 16]).unwrap();
        let err = PresentedFunction::for_guest(a.clone())
            .map(|stale| stale.bar(bar).and_then(|b| b.mappable()).is_some())
            .expect_err("a removed guest's slice was presented again");
        assert!(
            matches!(err, crate::presentation::PresentationError::Removed(s) if s == a.slice()),
            "{name}: {err}"
        );
        assert_eq!(err.errno(), libc::ENODEV);
        // Removed and not handed out again: still refused, and nothing was carved (the
        // range's canaries stay).
        sliced.remove_guest(&b).unwrap();
        vram_fill(&gpu, b.slice().start().raw(), b.slice().size(), 0x5A);
        assert!(PresentedFunction::for_guest(b.clone()).is_err(), "{name}");
        assert!(vram_read(&gpu, b.slice().start().raw(), 4 * MIB as usize)
            .iter()
            .all(|&x| x == 0x5A));
    }
}

/// The emulated GPU, except that the first VRAM mmap source asked for once armed waits (up
/// to [`SlowHost::WAIT`]) until the test says the guest was removed: a presentation caught
/// between its check that the guest is live and the making of its memfd; and that scrubs
/// take [`SlowHost::scrub_ms`] each, as on hardware.
pub(crate) struct SlowHost {
    inner: EmulatedHostGpu,
    armed: std::sync::atomic::AtomicBool,
    entered: std::sync::atomic::AtomicBool,
    removed: std::sync::atomic::AtomicBool,
    /// Releasing an mmap source fails (an uncarve the kernel refused).
    fail_release: std::sync::atomic::AtomicBool,
    /// How long each scrub takes, in milliseconds.
    pub(crate) scrub_ms: std::sync::atomic::AtomicU64,
}

impl SlowHost {
    const WAIT: std::time::Duration = std::time::Duration::from_millis(300);

    /// An emulated TU102, disarmed, scrubbing at once.
    pub(crate) fn tu102() -> SlowHost {
        SlowHost {
            inner: EmulatedHostGpu::by_name("tu102-24g").unwrap(),
            armed: false.into(),
            entered: false.into(),
            removed: false.into(),
            fail_release: false.into(),
            scrub_ms: 0.into(),
        }
    }
}

impl HostGpu for SlowHost {
    fn identity(&self) -> &crate::host_gpu::ChipIdentity {
        self.inner.identity()
    }
    fn bar0_read(
        &self,
        offset: u64,
        width: crate::host_gpu::AccessWidth,
    ) -> Result<u64, crate::host_gpu::HostGpuError> {
        self.inner.bar0_read(offset, width)
    }
    fn bar0_write(
        &self,
        offset: u64,
        width: crate::host_gpu::AccessWidth,
        value: u64,
    ) -> Result<(), crate::host_gpu::HostGpuError> {
        self.inner.bar0_write(offset, width, value)
    }
    fn memory_bar(&self, index: u8) -> Option<Arc<dyn crate::host_gpu::HostMemory>> {
        self.inner.memory_bar(index)
    }
    fn reset(&self) -> Result<(), crate::host_gpu::HostGpuError> {
        self.inner.reset()
    }
    fn scrub_vram(&self, addr: VramAddr, len: u64) -> Result<(), crate::host_gpu::HostGpuError> {
        let ms = self.scrub_ms.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        self.inner.scrub_vram(addr, len)
    }
    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), crate::host_gpu::HostGpuError> {
        self.inner.bar1_read(offset, buf)
    }
    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), crate::host_gpu::HostGpuError> {
        self.inner.bar1_write(offset, data)
    }
    fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<crate::host_gpu::MmapSource> {
        use std::sync::atomic::Ordering;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Self::WAIT;
            while !self.removed.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        self.inner.vram_mmap_source(addr, len)
    }
    fn release_vram_mmap_source(
        &self,
        addr: VramAddr,
        len: u64,
    ) -> Result<(), crate::host_gpu::HostGpuError> {
        if self.fail_release.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::host_gpu::HostGpuError::Io(
                std::io::Error::from_raw_os_error(libc::ENOMEM),
            ));
        }
        self.inner.release_vram_mmap_source(addr, len)
    }
    fn dma_alloc(
        &self,
        len: u64,
    ) -> Result<Arc<dyn crate::host_gpu::dma::DmaBuffer>, crate::host_gpu::HostGpuError> {
        self.inner.dma_alloc(len)
    }
}

/// A guest removed while it is being presented: the removal waits until the presentation
/// has made its memfd, and releases that one too. Before, the removal went first and the
/// presentation carved the range afterwards, a memfd that stayed connected to the VRAM the
/// next guest got (and that the next guest was handed too).
#[test]
fn a_guest_removed_while_it_is_being_presented_keeps_no_live_memfd() {
    use std::sync::atomic::Ordering;
    let gpu = Arc::new(SlowHost::tu102());
    let host: Arc<dyn HostGpu> = gpu.clone();
    let mut sliced = SlicedGpu::new(host).unwrap();
    let a = sliced.add_guest(4 * MIB).unwrap();
    gpu.armed.store(true, Ordering::SeqCst);
    let presented = std::thread::scope(|s| {
        let presenter = s.spawn(|| PresentedFunction::for_guest(a.clone()));
        while !gpu.entered.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The presentation is making its memfd now.
        sliced.remove_guest(&a).unwrap();
        gpu.removed.store(true, Ordering::SeqCst);
        presenter.join().unwrap()
    });
    let start = a.slice().start().raw();
    vram_fill(&gpu.inner, start, 4 * MIB, 0x5A);
    let fd_a = presented.ok().map(|f| {
        let fd = Arc::clone(&f.bar(vram_bar(&f)).unwrap().mappable().unwrap().1.fd);
        let p = map_shared(&fd, 4 * MIB);
        // SAFETY: inside the 4 MiB mapping made above, unmapped here.
        unsafe {
            std::ptr::write_bytes(p, 0xA1, 4096);
            libc::munmap(p.cast(), (4 * MIB) as usize);
        }
        fd
    });
    assert_eq!(
        vram_read(&gpu.inner, start, 4096),
        [0x5A; 4096],
        "the removed guest's memfd still reaches VRAM"
    );
    let b = sliced.add_guest(4 * MIB).unwrap();
    assert_eq!(b.slice(), a.slice());
    let fb = PresentedFunction::for_guest(b).unwrap();
    let fd_b = &fb.bar(vram_bar(&fb)).unwrap().mappable().unwrap().1.fd;
    assert!(
        fd_a.is_none_or(|fd| !Arc::ptr_eq(&fd, fd_b)),
        "the next guest got the removed guest's memfd"
    );
}

#[test]
fn a_slice_whose_memfd_cannot_be_cut_off_is_never_handed_out_again() {
    use std::sync::atomic::Ordering;
    let gpu = Arc::new(SlowHost::tu102());
    let host: Arc<dyn HostGpu> = gpu.clone();
    let mut sliced = SlicedGpu::new(host).unwrap();
    let a = sliced.add_guest(4 * MIB).unwrap();
    let free = sliced.partition().free_bytes();
    gpu.fail_release.store(true, Ordering::SeqCst);
    let err = sliced.remove_guest(&a).unwrap_err();
    assert!(
        matches!(err, SetupError::Quarantined { slice, .. } if slice == a.slice()),
        "{err}"
    );
    assert!(
        a.access().is_revoked(),
        "cut off from its old guest all the same"
    );
    assert_eq!(sliced.partition().free_bytes(), free, "kept out of use");
    gpu.fail_release.store(false, Ordering::SeqCst);
    let b = sliced.add_guest(4 * MIB).unwrap();
    assert!(
        !b.slice().overlaps(&a.slice()),
        "{} got {}",
        b.slice(),
        a.slice()
    );
}

#[test]
fn sizes_that_do_not_fit_are_bad_requests() {
    let (_gpu, host) = emulated("tu102-24g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    let area = sliced.partition().guest_area_end();
    for size in [0, 3 * MIB, area + 2 * MIB] {
        let e = sliced.add_guest(size).unwrap_err();
        assert!(e.is_bad_request(), "{size:#x}: {e}");
    }
    sliced.add_guest(area).unwrap();
    assert!(sliced.add_guest(2 * MIB).unwrap_err().is_bad_request());
}

#[test]
fn sliced_guest_sees_only_its_vram_bars() {
    // GH200: the resmem BAR (VRAM at 95 GiB) shows nothing of a small slice: dropped.
    let (_gpu, host) = emulated("gh200-96g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    let g = sliced.add_guest(6 * MIB).unwrap();
    let f = PresentedFunction::for_guest(g.clone()).unwrap();
    assert!(f.bar(2).is_none());
    assert_eq!(f.region_size(2), 0);
    let usemem = f.bar(4).unwrap();
    assert_eq!(
        (usemem.real_size(), usemem.presented_size()),
        (6 * MIB, 8 * MIB)
    );
    let (area, source) = usemem.mappable().unwrap();
    assert_eq!((area.offset, area.size), (0, 6 * MIB));
    // The slice's own memfd, from its start: nothing else of VRAM can be mapped from it.
    assert_eq!(source.file_offset, 0);
    assert_eq!(fd_len(&source.fd), 6 * MIB);
    // TU102: the instance-memory BAR belongs to the host.
    let (_gpu, host) = emulated("tu102-24g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    sliced.add_guest(2 * MIB).unwrap();
    let g = sliced.add_guest(4 * MIB).unwrap();
    let f = PresentedFunction::for_guest(g.clone()).unwrap();
    assert!(f.bar(3).is_none());
    let (_, source) = f.bar(1).unwrap().mappable().unwrap();
    assert_eq!(source.file_offset, 0);
    assert_eq!(fd_len(&source.fd), 4 * MIB);
    assert_eq!(g.slice().start().raw(), 2 * MIB);
}

fn fd_len(fd: &std::os::fd::OwnedFd) -> u64 {
    std::fs::File::from(fd.try_clone().unwrap())
        .metadata()
        .unwrap()
        .len()
}

// ---------------------------------------------------------------------------------------
// The trapped BAR0 of one guest.

const APERTURE: u64 = 0x70_0000;

#[test]
fn window_is_relative_to_the_slice_and_confined_to_it() {
    for (name, window) in [("tu102-24g", 0x1700u64), ("gh100-80g", 0x10_FD40)] {
        let (gpu, host) = emulated(name);
        let mut sliced = SlicedGpu::new(host).unwrap();
        let _g0 = sliced.add_guest(4 * MIB).unwrap();
        let g1 = sliced.add_guest(2 * MIB).unwrap();
        let _g2 = sliced.add_guest(4 * MIB).unwrap();
        vram_fill(&gpu, 0, 4 * MIB, 0xB5);
        vram_fill(&gpu, 6 * MIB, 4 * MIB, 0xB5);
        let f = PresentedFunction::for_guest(g1).unwrap();
        // Base 0x10 (1 MiB into the guest's VRAM): writes land at slice.start + 1 MiB.
        f.region_write(0, window, &0x10u32.to_le_bytes()).unwrap();
        f.region_write(0, APERTURE + 8, &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            vram_read(&gpu, 4 * MIB + MIB + 8, 4),
            [1, 2, 3, 4],
            "{name}"
        );
        let mut four = [0u8; 4];
        f.region_read(0, window, &mut four).unwrap();
        assert_eq!(
            u32::from_le_bytes(four),
            0x10,
            "the guest reads its own value"
        );
        // The host register holds the host's window, not the guest's.
        let host_window = gpu.emulated().registers().window_base.raw();
        assert_eq!(host_window, (4 * MIB + MIB) & !0xFFFF);
        // Base 0x18: the last 512 KiB of the 2 MiB slice, then nothing.
        f.region_write(0, window, &0x18u32.to_le_bytes()).unwrap();
        let mut buf = vec![0u8; 16];
        f.region_read(0, APERTURE + 512 * KIB - 8, &mut buf)
            .unwrap();
        assert_eq!(&buf[..8], &[0; 8]);
        assert_eq!(&buf[8..], &[0xFF; 8], "past the guest's VRAM reads ~0");
        f.region_write(0, APERTURE + 512 * KIB - 4, &[0x77; 8])
            .unwrap();
        assert_eq!(vram_read(&gpu, 6 * MIB - 4, 4), [0x77; 4]);
        assert_eq!(
            vram_read(&gpu, 6 * MIB, 4),
            [0xB5; 4],
            "neighbour untouched"
        );
        // Bases far away (what would be the neighbour's or the host's VRAM) reach nothing.
        for base in [0x20u32, 0x40, 0x3F_FFFF, 0xFF_FFFF] {
            f.region_write(0, window, &base.to_le_bytes()).unwrap();
            f.region_write(0, APERTURE, &[0; 16]).unwrap();
            f.region_read(0, APERTURE, &mut buf).unwrap();
            assert_eq!(buf, [0xFF; 16], "{name} base {base:#x}");
        }
        assert!(vram_read(&gpu, 6 * MIB, 4 * MIB as usize)
            .iter()
            .all(|&b| b == 0xB5));
        assert!(vram_read(&gpu, 0, 4 * MIB as usize)
            .iter()
            .all(|&b| b == 0xB5));
        let stats = f.trap_stats();
        assert!(stats.aperture_bytes_refused >= 4 * 32 + 8, "{stats:?}");
        assert!(stats.window_writes >= 6);
    }
}

/// A presented function that outlives its guest's removal reaches nothing: its aperture
/// and its trapped VRAM BAR read ~0 and drop writes, even with the slice (and possibly its
/// BAR1 window) given to the next guest.
#[test]
fn a_removed_guests_function_reaches_nothing() {
    for name in ["tu102-24g", "gh100-80g"] {
        let (gpu, host) = emulated(name);
        let mut sliced = SlicedGpu::new(host).unwrap();
        let a = sliced.add_guest(4 * MIB).unwrap();
        let fa = PresentedFunction::for_guest(a.clone()).unwrap();
        let bar = vram_bar(&fa);
        fa.region_write(0, APERTURE + 0x40, &[0xA1; 8]).unwrap();
        fa.region_write(bar, 0x80, &[0xA2; 8]).unwrap();
        assert!(!a.access().is_revoked());
        sliced.remove_guest(&a).unwrap();
        assert!(a.access().is_revoked());

        let b = sliced.add_guest(4 * MIB).unwrap();
        assert_eq!(b.slice(), a.slice(), "{name}: first fit reuses the range");
        assert!(!b.access().is_revoked());
        let fb = PresentedFunction::for_guest(b.clone()).unwrap();
        fb.region_write(0, APERTURE + 0x40, &[0xB1; 8]).unwrap();
        fb.region_write(bar, 0x80, &[0xB2; 8]).unwrap();

        let mut buf = [0u8; 8];
        fa.region_read(0, APERTURE + 0x40, &mut buf).unwrap();
        assert_eq!(buf, [0xFF; 8], "{name}: A's aperture");
        fa.region_read(bar, 0x80, &mut buf).unwrap();
        assert_eq!(buf, [0xFF; 8], "{name}: A's VRAM BAR");
        // Its registers too: BOOT_0 reads ~0, not the host's value.
        let mut boot0 = [0u8; 4];
        fa.region_read(0, 0, &mut boot0).unwrap();
        assert_eq!(boot0, [0xFF; 4], "{name}: A's BOOT_0");
        fa.region_write(0, APERTURE + 0x40, &[0xA3; 8]).unwrap();
        fa.region_write(bar, 0x80, &[0xA4; 8]).unwrap();

        let start = b.slice().start().raw();
        assert_eq!(vram_read(&gpu, start + 0x40, 8), [0xB1; 8], "{name}");
        assert_eq!(vram_read(&gpu, start + 0x80, 8), [0xB2; 8], "{name}");
        fb.region_read(0, APERTURE + 0x40, &mut buf).unwrap();
        assert_eq!(buf, [0xB1; 8], "{name}: B's aperture");
        fb.region_read(bar, 0x80, &mut buf).unwrap();
        assert_eq!(buf, [0xB2; 8], "{name}: B's VRAM BAR");
    }
}

#[test]
fn sysmem_target_reads_ones_and_drops_writes() {
    let (gpu, host) = emulated("tu102-24g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    let g = sliced.add_guest(2 * MIB).unwrap();
    let f = PresentedFunction::for_guest(g).unwrap();
    f.region_write(0, APERTURE, &[5; 4]).unwrap();
    for target in [1u8, 2, 3] {
        // TARGET via a byte write of bits 31:24, as a field update would do.
        f.region_write(0, 0x1703, &[target]).unwrap();
        let mut buf = [0u8; 4];
        f.region_read(0, APERTURE, &mut buf).unwrap();
        assert_eq!(buf, [0xFF; 4], "target {target}");
        f.region_write(0, APERTURE, &[6; 4]).unwrap();
    }
    f.region_write(0, 0x1703, &[0]).unwrap();
    let mut buf = [0u8; 4];
    f.region_read(0, APERTURE, &mut buf).unwrap();
    assert_eq!(buf, [5; 4]);
    assert_eq!(vram_read(&gpu, 0, 4), [5; 4]);
}

#[test]
fn hidden_registers_never_reach_the_host() {
    for name in ["tu102-24g", "gh100-80g"] {
        let (gpu, host) = emulated(name);
        let mut sliced = SlicedGpu::new(host.clone()).unwrap();
        let g = sliced.add_guest(2 * MIB).unwrap();
        let f = PresentedFunction::for_guest(g).unwrap();
        let emu = gpu.emulated();
        let registers = emu.registers();
        let unimplemented = emu.unimplemented_accesses();
        let dangerous: [u64; 14] = [
            0xB8_0F40, 0xB8_0F48, 0xB8_0F50, 0xB8_0F60, 0xB8_0F64, 0xB8_0F70, 0xB8_0F74, 0xB8_30A0,
            0xB8_30A4, 0xB8_30B0, 0x11_0C00, 0x1704, 0x10_FD40, 0x1700,
        ];
        let window = if name == "tu102-24g" {
            0x1700
        } else {
            0x10_FD40
        };
        for &offset in &dangerous {
            f.region_write(0, offset, &u32::MAX.to_le_bytes()).unwrap();
            f.region_write(0, offset, &u64::MAX.to_le_bytes()).unwrap();
            let mut buf = [0xAAu8; 4];
            f.region_read(0, offset, &mut buf).unwrap();
            if offset != window {
                assert_eq!(buf, [0; 4], "{name} {offset:#x} reads 0");
            }
        }
        // BOOT_0 passes; a write to it is dropped.
        f.region_write(0, 0, &[0; 4]).unwrap();
        let mut boot0 = [0u8; 4];
        f.region_read(0, 0, &mut boot0).unwrap();
        assert_eq!(u32::from_le_bytes(boot0), host.identity().boot0);
        let mut after = emu.registers();
        // Only the host window moved (the guest's aperture is served through it) — and
        // here not even that: the guest made no aperture access.
        assert_eq!(after.window, registers.window, "{name}");
        after.window_base = registers.window_base;
        assert_eq!(after, registers, "{name}: host register state changed");
        let u = emu.unimplemented_accesses();
        assert_eq!(
            (u.reads, u.writes),
            (unimplemented.reads, unimplemented.writes)
        );
        let stats = f.trap_stats();
        assert!(stats.dropped_writes >= 2 * 13, "{stats:?}");
        assert!(stats.hidden_offsets.contains(&0xB8_30B0));
    }
}

// ---------------------------------------------------------------------------------------
// Isolation under random traffic: guest A (the middle one of three) against canaries.

const MARKER: u8 = 0xB5;
const CANARY: u8 = 0x5A;

#[derive(Debug, Clone)]
enum Op {
    /// A write near the window register: offset from it, bytes.
    Window(i64, Vec<u8>),
    /// A read near the window register.
    WindowRead(i64, usize),
    /// Aperture read at an offset, length.
    ApertureRead(u64, usize),
    /// Aperture write.
    ApertureWrite(u64, Vec<u8>),
    /// An aperture access ending `back` bytes before the end of the guest's VRAM under
    /// the current window (straddling it when the access is longer), if the window shows
    /// the end; a plain access at `back` otherwise. Write?
    ApertureAtEnd(u64, Vec<u8>, bool),
    /// VRAM BAR read at a fraction of the presented size.
    BarRead(u64, usize),
    /// VRAM BAR write.
    BarWrite(u64, Vec<u8>),
    /// Any BAR0 access: offset, length, write?
    Bar0(u64, Vec<u8>, bool),
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    // Never the marker, so a read of it can only come from another slice.
    proptest::collection::vec(
        any::<u8>().prop_map(|b| if b == MARKER { 0 } else { b }),
        1..24,
    )
}

fn window_value(size: u64) -> impl Strategy<Value = Vec<u8>> {
    let pages = size >> 16;
    prop_oneof![
        any::<u32>().prop_map(|v| v.to_le_bytes().to_vec()),
        any::<u64>().prop_map(|v| v.to_le_bytes().to_vec()),
        // Windows whose 1 MiB ends past the guest's VRAM: accesses straddle its end.
        (pages.saturating_sub(16)..pages + 1).prop_map(|base| (base as u32).to_le_bytes().to_vec()),
        (0..pages + 32, 0u32..4).prop_map(|(base, target)| {
            // Mostly VID_MEM, sometimes another target.
            let target = if target == 3 { 2 } else { 0 };
            ((base as u32) | target << 24).to_le_bytes().to_vec()
        }),
        (0..pages + 32).prop_map(|base| (base as u32).to_le_bytes().to_vec()),
    ]
}

/// Host registers whose change would break isolation (BAR binds, TLB invalidate, GSP
/// doorbell, both generations' window registers and their neighbours).
const HOST_STATE: [u64; 14] = [
    0xB8_0F40, 0xB8_0F48, 0xB8_0F50, 0xB8_0F60, 0xB8_0F64, 0xB8_0F70, 0xB8_0F74, 0xB8_30A0,
    0xB8_30A4, 0xB8_30B0, 0x11_0C00, 0x1704, 0x10_FD40, 0x1700,
];

/// Aperture offsets: anywhere, or just below a 64 KiB boundary (where, with a window near
/// the end of the guest's VRAM, an access straddles its last byte).
fn aperture_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..MIB,
        (1u64..17, 1u64..24).prop_map(|(j, d)| (j * 64 * KIB - d).min(MIB - 1)),
    ]
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let presented = size.next_power_of_two();
    let op = prop_oneof![
        3 => window_value(size).prop_map(|v| Op::Window(0, v)),
        1 => (-4i64..8, window_value(size)).prop_map(|(d, v)| Op::Window(d, v)),
        3 => (0u64..24, data(), any::<bool>()).prop_map(|(b, d, w)| Op::ApertureAtEnd(b, d, w)),
        1 => (-4i64..8, data()).prop_map(|(d, v)| Op::Window(d, v)),
        1 => (-4i64..8, 1usize..9).prop_map(|(d, n)| Op::WindowRead(d, n)),
        3 => (aperture_offset(), 1usize..24).prop_map(|(o, n)| Op::ApertureRead(o, n)),
        3 => (aperture_offset(), data()).prop_map(|(o, d)| Op::ApertureWrite(o, d)),
        2 => (0..presented, 1usize..24).prop_map(|(o, n)| Op::BarRead(o, n)),
        2 => (0..presented, data()).prop_map(|(o, d)| Op::BarWrite(o, d)),
        1 => (0..(16 * MIB), data(), any::<bool>()).prop_map(|(o, d, w)| Op::Bar0(o, d, w)),
        1 => (prop::sample::select(HOST_STATE.to_vec()), data(), any::<bool>())
            .prop_map(|(o, d, w)| Op::Bar0(o, d, w)),
    ];
    proptest::collection::vec(op, 1..40)
}

/// The model of guest A: its VRAM and its window register.
struct Model {
    vram: Vec<u8>,
    window: u32,
    /// Defined bits of the window register.
    defined: u32,
    /// BASE bits.
    base_mask: u32,
    has_target: bool,
    window_offset: u64,
}

impl Model {
    fn aperture_byte(&self, o: u64) -> Option<u64> {
        if self.has_target && (self.window >> 24) & 3 != 0 {
            return None;
        }
        let g = (u64::from(self.window & self.base_mask) << 16) + o;
        (g < self.vram.len() as u64).then_some(g)
    }

    fn write_bar0(&mut self, at: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = at + i as u64;
            if a >= self.window_offset && a < self.window_offset + 4 {
                let shift = 8 * (a - self.window_offset);
                self.window = (self.window & !(0xFF << shift)) | (u32::from(b) << shift);
            }
        }
        self.window &= self.defined;
        for (i, &b) in data.iter().enumerate() {
            let a = at + i as u64;
            if (APERTURE..APERTURE + MIB).contains(&a) {
                if let Some(g) = self.aperture_byte(a - APERTURE) {
                    self.vram[g as usize] = b;
                }
            }
        }
    }

    /// The expected byte of a BAR0 read at `a`, if the model knows it.
    fn read_bar0(&self, a: u64) -> Option<u8> {
        if a >= self.window_offset && a < self.window_offset + 4 {
            return Some((self.window >> (8 * (a - self.window_offset))) as u8);
        }
        if (APERTURE..APERTURE + MIB).contains(&a) {
            return Some(match self.aperture_byte(a - APERTURE) {
                Some(g) => self.vram[g as usize],
                None => 0xFF,
            });
        }
        None
    }
}

struct World {
    gpu: Arc<EmulatedHostGpu>,
    a: PresentedFunction,
    others: Vec<Slice>,
    canaries: Vec<(u64, u64)>,
    reserved: (u64, Vec<u8>),
}

fn world(name: &str, sizes: [u64; 3]) -> World {
    let (gpu, host) = emulated(name);
    let mut sliced = SlicedGpu::new(host).unwrap();
    let guests: Vec<GuestSlice> = sizes
        .iter()
        .map(|&s| sliced.add_guest(s).unwrap())
        .collect();
    let others = vec![guests[0].slice(), guests[2].slice()];
    for s in &others {
        vram_fill(&gpu, s.start().raw(), s.size(), MARKER);
    }
    // Canaries: right after the last slice, right below the host-reserved region, the top
    // of VRAM, and the unused tail of the host-reserved region.
    let p = sliced.partition();
    let reserved = p.host_reserved();
    let end = guests[2].slice().end();
    let canaries = vec![
        (end, 64 * KIB),
        (p.guest_area_end() - 64 * KIB, 64 * KIB),
        (p.vram_size() - 64 * KIB, 64 * KIB),
        (reserved.end.raw() - 64 * KIB, 64 * KIB),
    ];
    for &(at, len) in &canaries {
        assert!(!sliced.vram().is_bar1_table_page(VramAddr::new(at)));
        vram_fill(&gpu, at, len, CANARY);
    }
    // The BAR1 tables sit at the bottom of the host-reserved region (bump allocation):
    // snapshot that first MiB; the rest of the region is covered by the tail canary.
    let tables = MIB;
    assert!(!sliced
        .vram()
        .is_bar1_table_page(VramAddr::new(reserved.start.raw() + tables)));
    let snapshot = vram_read(&gpu, reserved.start.raw(), tables as usize);
    World {
        a: PresentedFunction::for_guest(guests[1].clone()).unwrap(),
        gpu,
        others,
        canaries,
        reserved: (reserved.start.raw(), snapshot),
    }
}

fn isolation(name: &str, sizes: [u64; 3], ops: Vec<Op>) -> Result<(), TestCaseError> {
    let w = world(name, sizes);
    let f = &w.a;
    let generation = f.identity().generation;
    let window = crate::presentation::window::WindowRegister::for_generation(generation);
    let (defined, base_mask, has_target) = match name {
        "tu102-24g" => (0x03FF_FFFF, 0x00FF_FFFF, true),
        _ => (0x003F_FFFF, 0x003F_FFFF, false),
    };
    prop_assert_eq!(window.defined_mask(), defined);
    let mut m = Model {
        vram: vec![0; sizes[1] as usize],
        window: 0,
        defined,
        base_mask,
        has_target,
        window_offset: window.offset(),
    };
    let bar = vram_bar(f);
    let presented = f.bar(bar).unwrap().presented_size();
    let emu = w.gpu.emulated();
    let registers = emu.registers();
    let unimplemented = emu.unimplemented_accesses();
    for op in ops {
        match op {
            Op::Window(d, bytes) => {
                let at = m.window_offset.wrapping_add_signed(d);
                prop_assert_eq!(f.region_write(0, at, &bytes).unwrap(), bytes.len());
                m.write_bar0(at, &bytes);
            }
            Op::WindowRead(d, n) => {
                let at = m.window_offset.wrapping_add_signed(d);
                let mut buf = vec![0u8; n];
                f.region_read(0, at, &mut buf).unwrap();
                for (i, &b) in buf.iter().enumerate() {
                    if let Some(e) = m.read_bar0(at + i as u64) {
                        prop_assert_eq!(b, e, "byte {:#x}", at + i as u64);
                    }
                }
            }
            Op::ApertureRead(o, n) => {
                let at = APERTURE + o;
                let mut buf = vec![0u8; n];
                let got = f.region_read(0, at, &mut buf).unwrap();
                prop_assert_eq!(got, n);
                for (i, &b) in buf.iter().enumerate() {
                    prop_assert_ne!(b, MARKER, "another slice's data at {:#x}", at + i as u64);
                    if let Some(e) = m.read_bar0(at + i as u64) {
                        prop_assert_eq!(b, e, "aperture byte {:#x}", at + i as u64);
                    }
                }
            }
            Op::ApertureWrite(o, bytes) => {
                let at = APERTURE + o;
                f.region_write(0, at, &bytes).unwrap();
                m.write_bar0(at, &bytes);
            }
            Op::ApertureAtEnd(back, bytes, write) => {
                let shown = match m.aperture_byte(0) {
                    Some(g0) => (m.vram.len() as u64 - g0).checked_sub(back + 1),
                    None => None,
                };
                let o = shown.filter(|&o| o < MIB).unwrap_or(back);
                let at = APERTURE + o;
                let n = bytes.len().min((MIB - o) as usize);
                if write {
                    f.region_write(0, at, &bytes[..n]).unwrap();
                    m.write_bar0(at, &bytes[..n]);
                } else {
                    let mut buf = vec![0u8; n];
                    f.region_read(0, at, &mut buf).unwrap();
                    for (i, &b) in buf.iter().enumerate() {
                        prop_assert_ne!(b, MARKER, "another slice's data at {:#x}", at + i as u64);
                        prop_assert_eq!(
                            Some(b),
                            m.read_bar0(at + i as u64),
                            "aperture byte {:#x}",
                            at + i as u64
                        );
                    }
                }
            }
            Op::BarRead(o, n) => {
                let mut buf = vec![0u8; n];
                let got = f.region_read(bar, o, &mut buf).unwrap();
                prop_assert_eq!(got as u64, (n as u64).min(presented - o));
                for (i, &b) in buf[..got].iter().enumerate() {
                    let at = o as usize + i;
                    let e = m.vram.get(at).copied().unwrap_or(0xFF);
                    prop_assert_eq!(b, e, "VRAM BAR byte {:#x}", at);
                }
            }
            Op::BarWrite(o, bytes) => {
                let got = f.region_write(bar, o, &bytes).unwrap();
                for (i, &b) in bytes[..got].iter().enumerate() {
                    if let Some(v) = m.vram.get_mut(o as usize + i) {
                        *v = b;
                    }
                }
            }
            Op::Bar0(o, bytes, write) => {
                let n = bytes.len().min((16 * MIB - o) as usize);
                if write {
                    f.region_write(0, o, &bytes[..n]).unwrap();
                    m.write_bar0(o, &bytes[..n]);
                } else {
                    let mut buf = vec![0u8; n];
                    f.region_read(0, o, &mut buf).unwrap();
                    for (i, &b) in buf.iter().enumerate() {
                        if let Some(e) = m.read_bar0(o + i as u64) {
                            prop_assert_eq!(b, e, "BAR0 byte {:#x}", o + i as u64);
                        }
                    }
                }
            }
        }
    }
    // A's VRAM is exactly the model; nothing else changed.
    let a = f.guest().slice();
    prop_assert!(
        vram_read(&w.gpu, a.start().raw(), a.size() as usize) == m.vram,
        "guest A's VRAM differs from the model"
    );
    for s in &w.others {
        prop_assert!(
            vram_read(&w.gpu, s.start().raw(), s.size() as usize)
                .iter()
                .all(|&b| b == MARKER),
            "another slice {s} changed"
        );
    }
    for &(at, len) in &w.canaries {
        prop_assert!(
            vram_read(&w.gpu, at, len as usize)
                .iter()
                .all(|&b| b == CANARY),
            "canary at {at:#x} changed"
        );
    }
    let (start, snapshot) = &w.reserved;
    prop_assert!(
        vram_read(&w.gpu, *start, snapshot.len()) == *snapshot,
        "host-reserved region changed"
    );
    let mut after = emu.registers();
    after.window = registers.window;
    after.window_base = registers.window_base;
    prop_assert_eq!(after, registers, "host registers changed");
    // Nothing reached a register the host models not either (the emulator counts those).
    let u = emu.unimplemented_accesses();
    prop_assert_eq!(
        (u.reads, u.writes),
        (unimplemented.reads, unimplemented.writes)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn guest_a_never_reaches_outside_its_slice_tu102(ops in ops(6 * MIB)) {
        isolation("tu102-24g", [4 * MIB, 6 * MIB, 2 * MIB], ops)?;
    }

    #[test]
    fn guest_a_never_reaches_outside_its_slice_gh100(ops in ops(6 * MIB)) {
        isolation("gh100-80g", [2 * MIB, 6 * MIB, 4 * MIB], ops)?;
    }
}

// ---------------------------------------------------------------------------------------
// Cost of the trapped paths, in process (no socket).

#[test]
fn the_partition_is_bounded_by_the_usable_region_the_gsp_reports() {
    let (gpu, host) = emulated("gh200-96g");
    let sliced = SlicedGpu::new(host).unwrap();
    let partition = sliced.partition();
    // The GSP reports 95 GiB usable and the 1 GiB nvgrace carve-out as board-reserved: the
    // host-reserved region ends at the usable end and no slice can reach the carve-out.
    let usable = gpu.emulated().profile().usable_vram_size();
    assert_eq!(partition.usable(), usable);
    assert_eq!(partition.host_reserved().end.raw(), usable);
    assert!(partition.guest_area_end() < usable);
    assert!(gpu.emulated().gsp().state().is_some_and(|s| s.init_done));
}

/// A guest taken back but not yet released keeps its range and its BAR1 window's VA out of
/// use: its QEMU may still map that window (a dma-buf on hardware) until its servers have
/// stopped, so no guest added meanwhile may get either. Released, both are free again.
#[test]
fn a_guest_taken_back_keeps_its_range_and_window_until_released() {
    let (_gpu, host) = emulated("tu102-24g");
    let mut sliced = SlicedGpu::new(host).unwrap();
    let a = sliced.add_guest(4 * MIB).unwrap();
    let a_va = a.bar1_window().unwrap();
    let taken = sliced.take_back_guest(&a).unwrap();
    assert!(a.access().is_revoked());
    assert_eq!(taken.slice(), a.slice());
    let b = sliced.add_guest(4 * MIB).unwrap();
    assert_ne!(b.slice(), a.slice(), "the range is still out of use");
    assert_ne!(
        b.bar1_window(),
        Some(a_va),
        "the window's VA is still out of use"
    );
    assert!(sliced
        .vram()
        .bar1_windows()
        .iter()
        .any(|&(va, slice)| va == a_va && slice == a.slice()));
    sliced.release_taken(taken).unwrap();
    assert!(sliced
        .vram()
        .bar1_windows()
        .iter()
        .all(|&(va, _)| va != a_va));
    let c = sliced.add_guest(4 * MIB).unwrap();
    assert_eq!(
        c.slice(),
        a.slice(),
        "first fit reuses the range once released"
    );
    assert_eq!(c.bar1_window(), Some(a_va), "and the window's VA");
}
