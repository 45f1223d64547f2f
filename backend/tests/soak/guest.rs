//! The well-behaved guest (B): plants a seeded pattern over its whole slice (through the mapped
//! VRAM BAR, as QEMU maps it, and at a few places through the trapped VRAM BAR and the PRAMIN
//! aperture), then keeps reading it back through every path, times its trapped reads, and
//! checks now and then that it can still map DMA, use an interrupt eventfd and reconnect.
//! Any error, mismatch or refusal is a failure.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{dma_flags, irq_flags};
use gpu_backend::vfio_user::test_client::TestClient;

use crate::episodes::{APERTURE, APERTURE_SIZE, BAR0, SLICE, VRAM_BAR, WINDOW};
use crate::support::fds;
use crate::support::mapping::Mapping;
use crate::support::rng::{pattern, pattern_mismatch, Rng};

/// BOOT_0 of the TU102.
const BOOT_0: [u8; 4] = 0x1620_00a1u32.to_le_bytes();
/// Places written through the trapped paths at the start (4 KiB each).
const TRAPPED_SPOTS: usize = 8;
/// B's guest RAM for its DMA check.
const RAM: u64 = 2 << 20;
/// Its IOVA.
const RAM_IOVA: u64 = 0x8000_0000;
/// How often B maps DMA and fires an interrupt eventfd (things that need server fds).
const FD_CHECK_EVERY: Duration = Duration::from_millis(700);
/// How often B reconnects.
const RECONNECT_EVERY: Duration = Duration::from_secs(3);
/// How often B checks its whole slice through the mapping.
const FULL_CHECK_EVERY: Duration = Duration::from_secs(4);

/// What B measured and found.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// Trapped 4-byte BAR0 register reads (BOOT_0), ns each.
    pub register_ns: Vec<u64>,
    /// Trapped 4-byte PRAMIN aperture reads, ns each.
    pub aperture_ns: Vec<u64>,
    /// Bytes compared with the pattern.
    pub bytes_checked: u64,
    /// Checks of B's whole slice.
    pub full_checks: u64,
    /// DMA map + interrupt checks passed.
    pub fd_checks: u64,
    /// Reconnects, and the longest one.
    pub reconnects: u64,
    /// The longest reconnect.
    pub longest_reconnect: Duration,
    /// The first failure, if any.
    pub failure: Option<String>,
}

/// Guest B.
pub struct WellBehaved {
    socket: PathBuf,
    client: TestClient,
    vram: Mapping,
    seed: u64,
    rng: Rng,
    ram: OwnedFd,
    irq: OwnedFd,
    report: GuestReport,
}

fn connect(socket: &PathBuf) -> Result<TestClient, String> {
    let mut client = TestClient::connect(socket).map_err(|e| format!("connect: {e}"))?;
    client.set_reply_timeout(Duration::from_secs(10));
    client.version().map_err(|e| format!("VERSION: {e}"))?;
    Ok(client)
}

impl WellBehaved {
    /// Connect to B's socket, map its VRAM BAR and plant the pattern `seed`.
    pub fn start(socket: PathBuf, seed: u64) -> Result<WellBehaved, String> {
        let mut client = connect(&socket)?;
        let (info, _, fd) = client
            .region_info(VRAM_BAR, 4096)
            .map_err(|e| format!("VRAM BAR info: {e}"))?;
        let fd = fd.ok_or("the VRAM BAR came without an fd")?;
        if info.size != SLICE {
            return Err(format!("B's VRAM BAR is {:#x} bytes", info.size));
        }
        let vram = Mapping::new(&fd, info.offset, SLICE)?;
        let mut guest = WellBehaved {
            socket,
            client,
            vram,
            seed,
            rng: Rng::new(seed ^ 0xB),
            ram: fds::memfd("guest-b-ram", RAM, fds::GUEST_RAM_SEALS),
            irq: fds::eventfd(),
            report: GuestReport::default(),
        };
        guest.plant()?;
        Ok(guest)
    }

    /// The pattern everywhere: through the mapping except at a few spots, which are written
    /// through the trapped VRAM BAR and the aperture; then the whole slice must match.
    fn plant(&mut self) -> Result<(), String> {
        let seed = self.seed;
        let mut all = vec![0u8; SLICE as usize];
        pattern(seed, 0, &mut all);
        let spots: Vec<u64> = (0..TRAPPED_SPOTS)
            .map(|_| self.rng.below(SLICE / 4096) * 4096)
            .collect();
        for &spot in &spots {
            all[spot as usize..spot as usize + 4096].fill(0);
        }
        self.vram.write(0, &all);
        let mut chunk = [0u8; 4096];
        for (i, &spot) in spots.iter().enumerate() {
            pattern(seed, spot, &mut chunk);
            if i % 2 == 0 {
                self.client
                    .region_write(VRAM_BAR, spot, &chunk, false)
                    .map_err(|e| format!("trapped VRAM BAR write @{spot:#x}: {e}"))?;
            } else {
                let base = spot & !(APERTURE_SIZE - 1);
                self.set_window(base)?;
                self.client
                    .region_write(BAR0, APERTURE + (spot - base), &chunk, false)
                    .map_err(|e| format!("aperture write @{spot:#x}: {e}"))?;
            }
        }
        self.check_all("after planting")
    }

    fn set_window(&mut self, base: u64) -> Result<(), String> {
        self.client
            .region_write(BAR0, WINDOW, &((base >> 16) as u32).to_le_bytes(), false)
            .map(|_| ())
            .map_err(|e| format!("window write: {e}"))
    }

    fn check(&mut self, at: u64, data: &[u8], path: &str) -> Result<(), String> {
        self.report.bytes_checked += data.len() as u64;
        match pattern_mismatch(self.seed, at, data) {
            None => Ok(()),
            Some(bad) => Err(format!("B's VRAM at {bad:#x} is wrong ({path})")),
        }
    }

    fn check_all(&mut self, when: &str) -> Result<(), String> {
        self.report.full_checks += 1;
        let seed = self.seed;
        self.report.bytes_checked += SLICE;
        let mut all = vec![0u8; SLICE as usize];
        self.vram.read(0, &mut all);
        match pattern_mismatch(seed, 0, &all) {
            None => Ok(()),
            Some(bad) => Err(format!("B's VRAM at {bad:#x} is wrong ({when}, mapping)")),
        }
    }

    /// One round: a timed register read, a timed aperture read, and now and then a larger
    /// read through the trapped VRAM BAR and the aperture.
    fn round(&mut self, n: u64) -> Result<(), String> {
        let started = Instant::now();
        let boot0 = self
            .client
            .region_read(BAR0, 0, 4)
            .map_err(|e| format!("BOOT_0 read: {e}"))?;
        self.report
            .register_ns
            .push(started.elapsed().as_nanos() as u64);
        if boot0 != BOOT_0 {
            return Err(format!("BOOT_0 reads {boot0:02x?}"));
        }
        let at = self.rng.below(SLICE / 4) * 4;
        let base = at & !(APERTURE_SIZE - 1);
        self.set_window(base)?;
        let started = Instant::now();
        let word = self
            .client
            .region_read(BAR0, APERTURE + (at - base), 4)
            .map_err(|e| format!("aperture read: {e}"))?;
        self.report
            .aperture_ns
            .push(started.elapsed().as_nanos() as u64);
        self.check(at, &word, "aperture")?;
        if n % 16 == 0 {
            let len = 4096 * self.rng.range(1, 16);
            let at = self.rng.below((SLICE - len) / 4096) * 4096;
            let data = self
                .client
                .region_read(VRAM_BAR, at, len as u32)
                .map_err(|e| format!("VRAM BAR read: {e}"))?;
            self.check(at, &data, "trapped VRAM BAR")?;
            let off = self.rng.below(APERTURE_SIZE / 4096 - 1) * 4096;
            let data = self
                .client
                .region_read(BAR0, APERTURE + off, 4096)
                .map_err(|e| format!("aperture 4 KiB read: {e}"))?;
            self.check(base + off, &data, "aperture 4 KiB")?;
        }
        Ok(())
    }

    /// B maps its guest RAM for DMA, wires an interrupt eventfd and fires it: things that need
    /// fds and address space in the server.
    fn fd_check(&mut self) -> Result<(), String> {
        let rw = dma_flags::MAP_READ | dma_flags::MAP_WRITE;
        self.client
            .dma_map(rw, 0, RAM_IOVA, RAM, Some(self.ram.as_fd()))
            .map_err(|e| format!("B's DMA_MAP: {e}"))?;
        self.client
            .dma_unmap(0, RAM_IOVA, RAM)
            .map_err(|e| format!("B's DMA_UNMAP: {e}"))?;
        let vector = self.rng.below(16) as u32;
        let assign = irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER;
        self.client
            .set_irqs(2, assign, vector, 1, &[], &[self.irq.as_fd()])
            .map_err(|e| format!("B's SET_IRQS eventfd: {e}"))?;
        self.client
            .set_irqs(
                2,
                irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
                vector,
                1,
                &[],
                &[],
            )
            .map_err(|e| format!("B's SET_IRQS trigger: {e}"))?;
        if fds::eventfd_take(&self.irq) == 0 {
            return Err(format!(
                "B's MSI-X vector {vector} fired but its eventfd stayed 0"
            ));
        }
        self.client
            .set_irqs(2, assign, vector, 1, &[], &[])
            .map_err(|e| format!("B's SET_IRQS deassign: {e}"))?;
        self.report.fd_checks += 1;
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), String> {
        let started = Instant::now();
        // Hang up first: the server serves one client per socket.
        let _ = self.client.stream().shutdown(std::net::Shutdown::Both);
        self.client = connect(&self.socket)?;
        let took = started.elapsed();
        self.report.reconnects += 1;
        self.report.longest_reconnect = self.report.longest_reconnect.max(took);
        Ok(())
    }

    /// Rounds until `until` and until `stop` is set (A is done), then a last check of
    /// everything.
    pub fn run(mut self, until: Instant, stop: &AtomicBool) -> GuestReport {
        let result = self.run_inner(until, stop);
        self.report.failure = result.err();
        self.report
    }

    fn run_inner(&mut self, until: Instant, stop: &AtomicBool) -> Result<(), String> {
        let (mut fd_check, mut reconnect, mut full) =
            (Instant::now(), Instant::now(), Instant::now());
        let mut n = 0;
        while Instant::now() < until || !stop.load(Ordering::SeqCst) {
            self.round(n)?;
            n += 1;
            if fd_check.elapsed() >= FD_CHECK_EVERY {
                self.fd_check()?;
                fd_check = Instant::now();
            }
            if reconnect.elapsed() >= RECONNECT_EVERY {
                self.reconnect()?;
                reconnect = Instant::now();
            }
            if full.elapsed() >= FULL_CHECK_EVERY {
                self.check_all("during the soak")?;
                full = Instant::now();
            }
        }
        self.fd_check()?;
        self.check_all("at the end")
    }
}
