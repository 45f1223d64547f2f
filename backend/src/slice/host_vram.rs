//! [`HostVram`]: the host's one PRAMIN window, shared by every guest's trapped aperture and by
//! the BAR1 page-table builder, behind one lock.
//!
//! The window register is a single piece of device state, so nobody moves the window while
//! somebody else reads through it: a guest's aperture read moves the host window over
//! `slice.start + guest address` and reads through the host aperture under the lock (see
//! [`crate::host_driver::pramin`] on why the lock lives here, at the layer that shares the
//! device, and not inside `Pramin`). The BAR1 address space ([`Bar1Space`]) lives under the
//! same lock because building page tables is PRAMIN work too.
//!
//! # Bounded holds
//!
//! A guest decides how large its aperture accesses are (up to 1 MiB per REGION_READ/WRITE,
//! posted writes included) and how often it makes them, so a guest's access never holds the
//! lock for more than [`LOCK_CHUNK`] bytes: [`HostVram::read`], [`HostVram::write`] and
//! [`HostVram::scrub`] work in chunks that end at multiples of [`LOCK_CHUNK`] in VRAM and,
//! between two chunks, hand the lock to a waiting user if there is one (a *fair* hand-over,
//! `parking_lot`'s `bump`: with a plain mutex the thread that just unlocked usually takes it
//! straight back and a waiter can starve). So another guest's aperture access waits for at
//! most one chunk of a hammering guest's access, however large or frequent its accesses are.
//! Each chunk re-derives the window from its own address (the cursor moves the window only if
//! the chunk is not already shown), so a chunk after a hand-over sees the window wherever the
//! other user left it. An access is not atomic towards other guests' accesses: it never was
//! for the guest (its own vCPUs' accesses are not ordered against a large one either), and
//! guests share no VRAM. An aligned access of up to 8 bytes never crosses a chunk end.
//!
//! The bound, 256 bytes, is 64 dword accesses: on hardware a PRAMIN read is a non-posted
//! PCIe read of roughly 0.5-1 µs (an estimate, not measured on this project's hardware), so
//! a chunk is about 30-65 µs of reads (writes are posted and cheaper), the order of one
//! trapped round trip; on the emulated GPU it is about 3 µs. The cost per chunk without a
//! waiter is one atomic operation in the hand-over check, nothing against 64 register
//! accesses. The BAR1 operations (window map/unmap, table setup) hold the lock for their
//! whole page-table update: they run when a guest is added or removed, never on a guest's
//! request.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use thiserror::Error;

use super::bar1::{Bar1Error, Bar1Space};
use super::partition::{Slice, VramRange};
use crate::host_driver::addr::{GpuVa, VramAddr};
use crate::host_driver::cursor::{CursorError, PraminCursor};
use crate::host_driver::pramin::{Pramin, PraminError};
use crate::host_gpu::{HostGpu, HostGpuError};

/// Most bytes of one access (or scrub) done per hold of the window lock; chunks end at
/// multiples of it in VRAM (see the module docs for why 256).
pub const LOCK_CHUNK: u64 = 256;

/// Splits `[addr, addr + len)` (already range-checked) at multiples of [`LOCK_CHUNK`]:
/// `(bytes done before the chunk, chunk length)`, in ascending order.
fn lock_chunks(addr: VramAddr, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = addr.raw().wrapping_add(done);
        let n = (LOCK_CHUNK - at % LOCK_CHUNK).min(len - done);
        let chunk = (done, n);
        done += n;
        Some(chunk)
    })
}

/// Errors of host VRAM access.
#[derive(Debug, Error)]
pub enum HostVramError {
    /// Taking the window register failed.
    #[error(transparent)]
    Pramin(#[from] PraminError),
    /// A VRAM access through PRAMIN failed.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The BAR1 address space failed.
    #[error(transparent)]
    Bar1(#[from] Bar1Error),
    /// The host failed to scrub VRAM.
    #[error("scrubbing VRAM: {0}")]
    Scrub(#[source] HostGpuError),
    /// A BAR1 operation before the BAR1 address space was set up.
    #[error("the BAR1 address space is not set up")]
    NoBar1,
}

/// What the lock protects: the window owner and the BAR1 address space.
#[derive(Debug)]
struct State {
    pramin: Pramin,
    bar1: Option<Bar1Space>,
}

/// The host PRAMIN window (and the BAR1 address space) of one GPU, shared by all guests.
pub struct HostVram {
    host: Arc<dyn HostGpu>,
    state: Mutex<State>,
}

impl std::fmt::Debug for HostVram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostVram")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl HostVram {
    /// Takes ownership of `host`'s window register. Nothing else may write the register
    /// afterwards (guests reach it only through their virtual copy).
    pub fn new(host: Arc<dyn HostGpu>) -> Result<HostVram, HostVramError> {
        let pramin = Pramin::new(Arc::clone(&host))?;
        Ok(HostVram {
            host,
            state: Mutex::new(State { pramin, bar1: None }),
        })
    }

    /// The GPU.
    pub fn host(&self) -> &Arc<dyn HostGpu> {
        &self.host
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock unlocks it: every access re-derives the window from
        // the cached base, and the page-table builder poisons itself on device errors, so
        // nothing is left half-done that matters more than refusing service.
        self.state.lock()
    }

    /// `[addr, addr + len)` inside VRAM, or the cursor's out-of-range error (checked before
    /// any chunk is done, so a refused access touches nothing).
    fn check(&self, addr: VramAddr, len: u64) -> Result<(), HostVramError> {
        let vram_size = self.host.identity().vram_size;
        match addr.raw().checked_add(len) {
            Some(end) if end <= vram_size => Ok(()),
            _ => Err(CursorError::OutOfRange {
                addr,
                len,
                vram_size,
            }
            .into()),
        }
    }

    /// Runs `f(cursor, chunk address, bytes done before it, chunk length)` for each
    /// [`LOCK_CHUNK`] of `[addr, addr + len)` (checked), handing the lock over fairly
    /// between two chunks if someone waits for it.
    fn for_each_chunk(
        &self,
        addr: VramAddr,
        len: u64,
        mut f: impl FnMut(&mut PraminCursor<'_>, VramAddr, usize, usize) -> Result<(), CursorError>,
    ) -> Result<(), HostVramError> {
        self.check(addr, len)?;
        let mut state = self.lock();
        for (done, n) in lock_chunks(addr, len) {
            if done > 0 {
                MutexGuard::bump(&mut state);
            }
            // Inside VRAM (checked above), so neither the address nor the lengths overflow.
            let at = VramAddr::new(addr.raw() + done);
            f(
                &mut PraminCursor::new(&mut state.pramin),
                at,
                done as usize,
                n as usize,
            )?;
        }
        Ok(())
    }

    /// Copies host VRAM `[addr, addr + buf.len())` into `buf` through the host PRAMIN, one
    /// [`LOCK_CHUNK`] per lock hold.
    pub fn read(&self, addr: VramAddr, buf: &mut [u8]) -> Result<(), HostVramError> {
        self.for_each_chunk(addr, buf.len() as u64, |cursor, at, done, n| {
            cursor.read_bytes(at, &mut buf[done..done + n])
        })
    }

    /// Copies `data` to host VRAM at `addr` through the host PRAMIN, in ascending order,
    /// one [`LOCK_CHUNK`] per lock hold.
    pub fn write(&self, addr: VramAddr, data: &[u8]) -> Result<(), HostVramError> {
        self.for_each_chunk(addr, data.len() as u64, |cursor, at, done, n| {
            cursor.write_bytes(at, &data[done..done + n])
        })
    }

    /// Sets host VRAM `[addr, addr + len)` to zero. A host that can scrub without the
    /// window (the emulated GPU punches holes in its memfd) does so; otherwise the range is
    /// zeroed through the host PRAMIN window, the window register's one writer, one
    /// [`LOCK_CHUNK`] per lock hold like a guest's access, so guests' aperture accesses wait
    /// for one chunk at most, not for the whole scrub.
    pub fn scrub(&self, addr: VramAddr, len: u64) -> Result<(), HostVramError> {
        match self.host.scrub_vram(addr, len) {
            Err(HostGpuError::Io(e)) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            other => return other.map_err(HostVramError::Scrub),
        }
        self.for_each_chunk(addr, len, |cursor, at, _, n| cursor.fill_zero(at, n as u64))
    }

    /// Host window register writes so far (window moves).
    pub fn window_moves(&self) -> u64 {
        self.lock().pramin.window_moves()
    }

    /// Builds the BAR1 address space with tables in `reserved`, binds BAR1 to it in virtual
    /// mode and invalidates the TLB (see [`Bar1Space::new`]). Replaces nothing: a second
    /// call is an error.
    pub fn set_up_bar1(&self, reserved: VramRange) -> Result<(), HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        if bar1.is_some() {
            return Err(Bar1Error::AlreadySetUp.into());
        }
        let mut cursor = PraminCursor::new(pramin);
        *bar1 = Some(Bar1Space::new(
            &mut cursor,
            Arc::clone(&self.host),
            reserved,
        )?);
        Ok(())
    }

    /// Maps `slice` into BAR1 (largest pages, TLB invalidated) and returns its window's
    /// first BAR1 virtual address.
    pub fn map_bar1_window(&self, slice: Slice) -> Result<GpuVa, HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        let bar1 = bar1.as_mut().ok_or(HostVramError::NoBar1)?;
        Ok(bar1.map_window(&mut PraminCursor::new(pramin), slice)?)
    }

    /// Unmaps the BAR1 window starting at `va`, invalidates the TLB and frees its tables.
    pub fn unmap_bar1_window(&self, va: GpuVa) -> Result<Slice, HostVramError> {
        let mut state = self.lock();
        let State { pramin, bar1 } = &mut *state;
        let bar1 = bar1.as_mut().ok_or(HostVramError::NoBar1)?;
        Ok(bar1.unmap_window(&mut PraminCursor::new(pramin), va)?)
    }

    /// The root page directory and instance block of the BAR1 address space, if set up.
    pub fn bar1_tables(&self) -> Option<(VramAddr, VramAddr)> {
        let state = self.lock();
        state.bar1.as_ref().map(|b| (b.root(), b.instance_block()))
    }

    /// The BAR1 windows mapped: (first VA, slice), by VA.
    pub fn bar1_windows(&self) -> Vec<(GpuVa, Slice)> {
        self.lock()
            .bar1
            .as_ref()
            .map(|b| b.windows().collect())
            .unwrap_or_default()
    }

    /// Whether host VRAM `addr` is a page allocated for BAR1 tables or the instance block.
    pub fn is_bar1_table_page(&self, addr: VramAddr) -> bool {
        self.lock()
            .bar1
            .as_ref()
            .is_some_and(|b| b.is_table_page(addr))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::*;
    use crate::host_driver::addr::MIB;
    use crate::host_driver::pramin::PRAMIN_APERTURE;
    use crate::host_gpu::emulated::EmulatedHostGpu;
    use crate::host_gpu::{AccessWidth, ChipIdentity, HostMemory, MmapSource};

    /// Name of the thread making the large access.
    const BIG: &str = "big-access";

    /// The emulated GPU without a scrub of its own (so scrubs go through PRAMIN), logging
    /// which thread made each PRAMIN aperture access. The large access's first aperture
    /// access waits until the small access's thread is blocked on the window lock.
    struct Recorder {
        inner: EmulatedHostGpu,
        log: std::sync::Mutex<Vec<String>>,
        /// Thread id of the small access, once it is about to take the lock.
        small_tid: AtomicI32,
        /// Set once the large access holds the lock: the small access may start.
        go: AtomicBool,
        /// Set once the large access has waited for the small one.
        waited: AtomicBool,
    }

    impl Recorder {
        fn new() -> Recorder {
            Recorder {
                inner: EmulatedHostGpu::by_name("tu102-24g").unwrap(),
                log: std::sync::Mutex::new(Vec::new()),
                small_tid: AtomicI32::new(0),
                go: AtomicBool::new(false),
                waited: AtomicBool::new(false),
            }
        }

        fn record(&self, offset: u64) {
            if !(PRAMIN_APERTURE..PRAMIN_APERTURE + MIB).contains(&offset) {
                return;
            }
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name == BIG && !self.waited.swap(true, Ordering::SeqCst) {
                self.go.store(true, Ordering::SeqCst);
                wait_until_blocked(&self.small_tid);
            }
            self.log.lock().unwrap().push(name);
        }
    }

    /// Waits until the thread whose id `tid` will hold sleeps (blocked on the lock).
    fn wait_until_blocked(tid: &AtomicI32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "the small access never blocked");
            let id = tid.load(Ordering::SeqCst);
            if id != 0 {
                let stat = std::fs::read_to_string(format!("/proc/self/task/{id}/stat"))
                    .unwrap_or_default();
                // The state follows the parenthesized command name.
                let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
                if state == Some('S') {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    impl HostGpu for Recorder {
        fn identity(&self) -> &ChipIdentity {
            self.inner.identity()
        }
        fn bar0_read(&self, offset: u64, width: AccessWidth) -> Result<u64, HostGpuError> {
            self.record(offset);
            self.inner.bar0_read(offset, width)
        }
        fn bar0_write(
            &self,
            offset: u64,
            width: AccessWidth,
            value: u64,
        ) -> Result<(), HostGpuError> {
            self.record(offset);
            self.inner.bar0_write(offset, width, value)
        }
        fn memory_bar(&self, index: u8) -> Option<Arc<dyn HostMemory>> {
            self.inner.memory_bar(index)
        }
        fn reset(&self) -> Result<(), HostGpuError> {
            self.inner.reset()
        }
        fn scrub_vram(&self, _: VramAddr, _: u64) -> Result<(), HostGpuError> {
            Err(HostGpuError::Io(std::io::Error::from_raw_os_error(
                libc::ENOTSUP,
            )))
        }
        fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostGpuError> {
            self.inner.bar1_read(offset, buf)
        }
        fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), HostGpuError> {
            self.inner.bar1_write(offset, data)
        }
        fn vram_mmap_source(&self, addr: VramAddr, len: u64) -> Option<MmapSource> {
            self.inner.vram_mmap_source(addr, len)
        }
    }

    const BIG_AT: VramAddr = VramAddr::new(MIB);
    const BIG_LEN: usize = 64 << 10;
    const SMALL_AT: VramAddr = VramAddr::new(5 * MIB + 0x40);
    /// Aperture accesses of one whole [`LOCK_CHUNK`] in dwords.
    const DWORDS_PER_CHUNK: usize = (LOCK_CHUNK / 4) as usize;

    /// A recorded GPU with `BIG_LEN` bytes of a pattern at [`BIG_AT`] and a marker at
    /// [`SMALL_AT`]; returns the pattern too.
    fn set_up() -> (Arc<Recorder>, HostVram, Vec<u8>) {
        let host = Arc::new(Recorder::new());
        let vram = HostVram::new(Arc::clone(&host) as Arc<dyn HostGpu>).unwrap();
        let pattern: Vec<u8> = (0..BIG_LEN).map(|i| (i * 7 + 3) as u8).collect();
        vram.write(BIG_AT, &pattern).unwrap();
        vram.write(SMALL_AT, &0x5A5A_0001u32.to_le_bytes()).unwrap();
        host.log.lock().unwrap().clear();
        (host, vram, pattern)
    }

    /// Runs `big` on its own thread and, once it holds the lock, a 4-byte read of
    /// [`SMALL_AT`] on another; returns the small read's value and how many aperture
    /// accesses of the large one came before it.
    fn small_read_during(
        host: &Recorder,
        vram: &HostVram,
        big: impl FnOnce(&HostVram) + Send,
    ) -> (u32, usize) {
        let small = std::thread::scope(|s| {
            let small = s.spawn(|| {
                while !host.go.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // SAFETY: gettid(2) has no preconditions.
                let tid = unsafe { libc::gettid() };
                host.small_tid.store(tid, Ordering::SeqCst);
                let mut buf = [0u8; 4];
                vram.read(SMALL_AT, &mut buf).unwrap();
                u32::from_le_bytes(buf)
            });
            std::thread::Builder::new()
                .name(BIG.into())
                .spawn_scoped(s, || big(vram))
                .unwrap()
                .join()
                .unwrap();
            small.join().unwrap()
        });
        let log = host.log.lock().unwrap();
        let before = log.iter().take_while(|who| *who == BIG).count();
        assert!(log.len() > before, "the small read was not logged");
        (small, before)
    }

    #[test]
    fn a_large_read_hands_the_lock_to_a_waiting_access_after_one_chunk() {
        let (host, vram, pattern) = set_up();
        let mut back = vec![0u8; BIG_LEN];
        let (small, before) = small_read_during(&host, &vram, |vram| {
            vram.read(BIG_AT, &mut back).unwrap();
        });
        assert_eq!(small, 0x5A5A_0001);
        assert_eq!(before, DWORDS_PER_CHUNK, "waited for more than one chunk");
        // The window moved to the small access and back between two chunks: the large
        // read still returned its own data.
        assert!(back == pattern, "the large read came back wrong");
    }

    #[test]
    fn a_large_write_hands_the_lock_over_after_one_chunk() {
        let (host, vram, _) = set_up();
        let data: Vec<u8> = (0..BIG_LEN).map(|i| (i * 13 + 1) as u8).collect();
        let (small, before) = small_read_during(&host, &vram, |vram| {
            vram.write(BIG_AT, &data).unwrap();
        });
        assert_eq!(small, 0x5A5A_0001);
        assert_eq!(before, DWORDS_PER_CHUNK, "waited for more than one chunk");
        let mut back = vec![0u8; BIG_LEN];
        vram.read(BIG_AT, &mut back).unwrap();
        assert!(back == data, "the large write landed wrong");
    }

    #[test]
    fn a_scrub_through_pramin_hands_the_lock_over_after_one_chunk() {
        let (host, vram, _) = set_up();
        let (small, before) = small_read_during(&host, &vram, |vram| {
            vram.scrub(BIG_AT, BIG_LEN as u64).unwrap();
        });
        assert_eq!(small, 0x5A5A_0001);
        assert_eq!(before, DWORDS_PER_CHUNK, "waited for more than one chunk");
        let mut back = vec![0xFFu8; BIG_LEN];
        vram.read(BIG_AT, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "the scrub left data behind");
    }

    #[test]
    fn an_access_past_vram_touches_nothing() {
        let (host, vram, _) = set_up();
        let end = host.identity().vram_size;
        let err = vram
            .write(VramAddr::new(end - 0x100), &[1u8; 0x200])
            .unwrap_err();
        assert!(
            matches!(err, HostVramError::Cursor(CursorError::OutOfRange { .. })),
            "{err}"
        );
        assert!(vram
            .read(VramAddr::new(u64::MAX - 1), &mut [0u8; 4])
            .is_err());
        assert!(
            host.log.lock().unwrap().is_empty(),
            "a refused access went out"
        );
    }

    #[test]
    fn chunks_end_at_multiples_of_the_bound() {
        let chunks: Vec<_> = lock_chunks(VramAddr::new(0x3F0), 0x220).collect();
        assert_eq!(
            chunks,
            vec![(0, 0x10), (0x10, 0x100), (0x110, 0x100), (0x210, 0x10)]
        );
        assert_eq!(lock_chunks(VramAddr::new(0x100), 4).count(), 1);
        assert_eq!(lock_chunks(VramAddr::ZERO, 0).count(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Chunked writes and reads at any address and length (across chunk and window
        /// ends) land exactly where asked and read back what was written.
        #[test]
        fn chunked_accesses_read_back_what_was_written(
            at in (MIB - 0x2000)..(MIB + 0x2000),
            data in proptest::collection::vec(any::<u8>(), 0..0x1200),
        ) {
            let host: Arc<dyn HostGpu> = Arc::new(EmulatedHostGpu::by_name("tu102-24g").unwrap());
            let vram = HostVram::new(host).unwrap();
            let around = VramAddr::new(at - 0x10);
            vram.write(around, &[0xEE; 0x10]).unwrap();
            vram.write(VramAddr::new(at + data.len() as u64), &[0xEE; 0x10]).unwrap();
            vram.write(VramAddr::new(at), &data).unwrap();
            let mut back = vec![0u8; data.len() + 0x20];
            vram.read(around, &mut back).unwrap();
            prop_assert_eq!(&back[..0x10], &[0xEE; 0x10][..]);
            prop_assert_eq!(&back[0x10..0x10 + data.len()], &data[..]);
            prop_assert_eq!(&back[0x10 + data.len()..], &[0xEE; 0x10][..]);
        }
    }
}
