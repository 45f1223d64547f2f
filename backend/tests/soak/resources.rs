//! The hostile client's resource episodes: DMA map storms and floods (fds, address space,
//! map counts), interrupt fds of the wrong kind with trigger storms, and the fds the server
//! hands out for its regions.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{
    dma_flags, irq_flags, Command, DmaMapMsg, DmaUnmapMsg, IrqInfoMsg, IrqSetMsg, RegionInfoMsg,
};

use crate::hostile::{Answer, Hostile, BIG_MEMFD, SMALL_MEMFD};
use crate::payloads::{edgy_u32, edgy_u64};
use crate::support::fds;
use crate::support::mapping::Mapping;

/// MSI-X: the interrupt type with 16 vectors.
const MSIX: u32 = 2;
/// Maps in flight at once during a flood (their answers are tiny).
const FLOOD_BATCH: usize = 64;
/// How long a flood may go on without being refused.
const FLOOD_TIME: Duration = Duration::from_secs(8);
/// How long a flood's maps are held before they are released.
const HOLD: Duration = Duration::from_millis(1500);

fn dma_map_msg(
    argsz: u32,
    map_flags: u32,
    offset: u64,
    address: u64,
    size: u64,
) -> [u8; DmaMapMsg::SIZE] {
    let mut req = [0u8; DmaMapMsg::SIZE];
    let _ = DmaMapMsg {
        argsz,
        flags: map_flags,
        offset,
        address,
        size,
    }
    .encode(&mut req);
    req
}

fn irq_set_msg(
    irq_flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data_len: usize,
) -> [u8; IrqSetMsg::SIZE] {
    let mut req = [0u8; IrqSetMsg::SIZE];
    let _ = IrqSetMsg {
        argsz: (IrqSetMsg::SIZE + data_len) as u32,
        flags: irq_flags,
        index,
        start,
        count,
    }
    .encode(&mut req);
    req
}

impl Hostile {
    fn unmap(
        &mut self,
        unmap_flags: u32,
        address: u64,
        size: u64,
        argsz: u32,
        what: &str,
    ) -> Answer {
        let mut req = [0u8; DmaUnmapMsg::SIZE];
        let _ = DmaUnmapMsg {
            argsz,
            flags: unmap_flags,
            address,
            size,
        }
        .encode(&mut req);
        self.request(Command::DmaUnmap, &[&req], &[], what)
    }

    /// UNMAP_ALL, which must succeed on a live connection.
    fn unmap_all(&mut self, what: &str) {
        if let Answer::Errno(e) =
            self.unmap(dma_flags::UNMAP_ALL, 0, 0, DmaUnmapMsg::SIZE as u32, what)
        {
            self.violation(format!("{what}: UNMAP_ALL failed with errno {e}"));
        }
    }

    pub(crate) fn dma_storm(&mut self) {
        let kit = self.kit.clone();
        let base = 0x1_0000_0000 * self.rng.range(1, 64);
        let mut next = base;
        for _ in 0..self.rng.range(1, 300) {
            let fd: Option<BorrowedFd<'_>> = match self.rng.below(8) {
                0..=2 => Some(kit.small.as_fd()),
                3 => Some(kit.unsealed.as_fd()),
                5 => Some(kit.any(&mut self.rng)),
                6 => Some(kit.big.as_fd()),
                _ => None,
            };
            let size = match self.rng.below(6) {
                0..=2 => 4096 * self.rng.range(1, 16),
                3 => 0,
                4 => self.rng.range(1, 8191),
                _ => edgy_u64(&mut self.rng),
            };
            let offset = match self.rng.below(5) {
                0..=2 => 4096 * self.rng.below(16),
                3 => SMALL_MEMFD,
                _ => edgy_u64(&mut self.rng),
            };
            let address = match self.rng.below(6) {
                0..=3 => {
                    let at = next;
                    next = next.wrapping_add(size.clamp(4096, 1 << 30).next_multiple_of(4096));
                    at
                }
                4 => base + 4096 * self.rng.below(4096),
                _ => edgy_u64(&mut self.rng),
            };
            let map_flags = match self.rng.below(8) {
                0..=4 => dma_flags::MAP_READ | dma_flags::MAP_WRITE,
                5 => dma_flags::MAP_READ,
                6 => dma_flags::MAP_WRITE,
                _ => edgy_u32(&mut self.rng),
            };
            let argsz = if self.rng.chance(1, 16) {
                edgy_u32(&mut self.rng)
            } else {
                DmaMapMsg::SIZE as u32
            };
            let req = dma_map_msg(argsz, map_flags, offset, address, size);
            let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
            if let Answer::Gone = self.request(Command::DmaMap, &[&req], &fds, "DMA storm: map") {
                return;
            }
        }
        for _ in 0..self.rng.range(0, 20) {
            let unmap_flags = match self.rng.below(6) {
                0..=3 => 0,
                4 => dma_flags::UNMAP_ALL,
                _ => edgy_u32(&mut self.rng),
            };
            let address = if self.rng.chance(3, 4) {
                base + 4096 * self.rng.below((next.wrapping_sub(base) / 4096).max(1))
            } else {
                edgy_u64(&mut self.rng)
            };
            let size = if self.rng.chance(3, 4) {
                4096 * self.rng.range(1, 256)
            } else {
                edgy_u64(&mut self.rng)
            };
            let argsz = if self.rng.chance(1, 16) {
                edgy_u32(&mut self.rng)
            } else {
                DmaUnmapMsg::SIZE as u32
            };
            if let Answer::Gone = self.unmap(unmap_flags, address, size, argsz, "DMA storm: unmap")
            {
                return;
            }
        }
        self.unmap_all("DMA storm");
        self.probe("DMA storm: sync probe");
    }

    /// Map `map(i)` for i = 0, 1, ... in pipelined batches until refused, `limit` or
    /// [`FLOOD_TIME`]; the
    /// number accepted and the errno that stopped it. `None` if the connection went away.
    fn map_until_refused(
        &mut self,
        limit: usize,
        fd: Option<BorrowedFd<'_>>,
        map: impl Fn(usize) -> [u8; DmaMapMsg::SIZE],
        what: &str,
    ) -> Option<(usize, Option<i32>)> {
        let (mut accepted, mut sent, mut refused) = (0usize, 0usize, None);
        let deadline = Instant::now() + FLOOD_TIME;
        while sent < limit && refused.is_none() && Instant::now() < deadline {
            let mut ids = Vec::with_capacity(FLOOD_BATCH);
            for _ in 0..FLOOD_BATCH.min(limit - sent) {
                let req = map(sent);
                sent += 1;
                let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
                ids.push(self.send(Command::DmaMap as u16, 0, &[&req], &fds, what)?);
            }
            for id in ids {
                match self.answer(id, what) {
                    Answer::Reply(_) => accepted += 1,
                    Answer::Errno(e) => refused = refused.or(Some(e)),
                    Answer::Gone => return None,
                }
            }
        }
        Some((accepted, refused))
    }

    /// Hold what A has mapped for [`HOLD`] (the other guest works meanwhile), then release it
    /// by UNMAP_ALL or by hanging up.
    fn hold_and_release(&mut self, what: &str) {
        let until = Instant::now() + HOLD;
        while Instant::now() < until && self.connected() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.rng.chance(1, 2) {
            let started = Instant::now();
            self.unmap_all(what);
            let took = started.elapsed();
            if took > Duration::from_secs(2) {
                self.tally
                    .flood_results
                    .push(format!("{what}: UNMAP_ALL took {took:.1?}"));
            }
        } else {
            self.drop_conn();
        }
    }

    pub(crate) fn dma_flood(&mut self) {
        let kit = self.kit.clone();
        let with_fd = self.rng.chance(2, 3);
        let (limit, fd, name) = if with_fd {
            (25_000, Some(kit.small.as_fd()), "DMA flood, one fd per map")
        } else {
            (70_000, None, "DMA flood, no fd")
        };
        let rw = dma_flags::MAP_READ | dma_flags::MAP_WRITE;
        let base = 0x10_0000_0000;
        let map =
            |i: usize| dma_map_msg(DmaMapMsg::SIZE as u32, rw, 0, base + 4096 * i as u64, 4096);
        let started = Instant::now();
        let Some((accepted, refused)) = self.map_until_refused(limit, fd, map, name) else {
            return;
        };
        self.tally.flood_results.push(format!(
            "{name}: {accepted} accepted, then {} ({:.1?})",
            refused.map_or("no refusal".into(), |e| format!("errno {e}")),
            started.elapsed()
        ));
        self.hold_and_release(name);
    }

    /// Maps of a sparse 1 TiB memfd until refused, then of halving sizes down to 4 KiB, each
    /// until refused: every hole of the server's address space that a map fits.
    pub(crate) fn big_maps(&mut self) {
        let kit = self.kit.clone();
        let name = "DMA flood, maps of a sparse 1 TiB memfd";
        let rw = dma_flags::MAP_READ | dma_flags::MAP_WRITE;
        let (mut accepted, mut mapped, mut first_refusal) = (0usize, 0u64, None);
        let mut next = BIG_MEMFD;
        let mut size = BIG_MEMFD;
        while size >= 4096 {
            let at = next;
            let map =
                |i: usize| dma_map_msg(DmaMapMsg::SIZE as u32, rw, 0, at + size * i as u64, size);
            let Some((n, refused)) = self.map_until_refused(200, Some(kit.big.as_fd()), map, name)
            else {
                return;
            };
            accepted += n;
            mapped += n as u64 * size;
            next += size * (n as u64 + 1);
            if first_refusal.is_none() {
                first_refusal = refused.map(|e| (accepted, e));
            }
            if refused.is_none() {
                break;
            }
            size /= 2;
        }
        self.tally.flood_results.push(format!(
            "{name}: {accepted} maps of {mapped:#x} bytes accepted, first refusal {}",
            first_refusal.map_or("none".into(), |(n, e)| format!("after {n} maps: errno {e}"))
        ));
        self.hold_and_release(name);
    }

    pub(crate) fn irqs(&mut self) {
        let kit = self.kit.clone();
        for _ in 0..self.rng.range(0, 3) {
            let mut req = [0u8; IrqInfoMsg::SIZE];
            let _ = IrqInfoMsg {
                argsz: if self.rng.chance(7, 8) {
                    IrqInfoMsg::SIZE as u32
                } else {
                    edgy_u32(&mut self.rng)
                },
                index: self.rng.below(7) as u32,
                ..Default::default()
            }
            .encode(&mut req);
            if let Answer::Gone = self.request(Command::DeviceGetIrqInfo, &[&req], &[], "IRQ info")
            {
                return;
            }
        }
        // Interrupt fds of every kind; the same pipe behind every vector a quarter of the time.
        let index = match self.rng.below(8) {
            0..=4 => MSIX,
            5 => edgy_u32(&mut self.rng),
            _ => self.rng.below(5) as u32,
        };
        let start = if self.rng.chance(3, 4) {
            0
        } else {
            self.rng.below(17) as u32
        };
        let count = self.rng.range(1, 16) as u32;
        let fds: Vec<BorrowedFd<'_>> = match self.rng.below(4) {
            0 => vec![kit.pipe.1.as_fd(); count as usize],
            1 => (0..count).map(|_| kit.any(&mut self.rng)).collect(),
            2 => vec![kit.event.as_fd(); count as usize],
            _ => (0..self.rng.range(1, 18))
                .map(|_| kit.any(&mut self.rng))
                .collect(),
        };
        let req = irq_set_msg(
            irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
            index,
            start,
            count,
            0,
        );
        if let Answer::Gone = self.request(
            Command::DeviceSetIrqs,
            &[&req],
            &fds,
            "SET_IRQS with odd fds",
        ) {
            return;
        }
        // Masks, bools and flag combinations that make no sense.
        for _ in 0..self.rng.range(0, 6) {
            let data = *self.rng.pick(&[
                irq_flags::DATA_NONE,
                irq_flags::DATA_BOOL,
                irq_flags::DATA_EVENTFD,
                0,
                irq_flags::DATA_MASK,
            ]);
            let action = *self.rng.pick(&[
                irq_flags::ACTION_MASK,
                irq_flags::ACTION_UNMASK,
                irq_flags::ACTION_TRIGGER,
                0,
                irq_flags::ACTION_MASK_ALL,
            ]);
            let count = self.rng.below(18) as u32;
            let bools = self.rng.bytes(if data == irq_flags::DATA_BOOL {
                count as usize
            } else {
                0
            });
            let req = irq_set_msg(
                data | action,
                index,
                self.rng.below(18) as u32,
                count,
                bools.len(),
            );
            let fds: Vec<BorrowedFd<'_>> = if self.rng.chance(1, 4) {
                vec![kit.any(&mut self.rng)]
            } else {
                Vec::new()
            };
            if let Answer::Gone =
                self.request(Command::DeviceSetIrqs, &[&req, &bools], &fds, "SET_IRQS")
            {
                return;
            }
        }
        // A trigger storm over all 16 vectors.
        let storm = if self.rng.chance(1, 3) {
            self.rng.range(100, 700)
        } else {
            self.rng.range(1, 50)
        };
        let trigger = irq_set_msg(
            irq_flags::DATA_NONE | irq_flags::ACTION_TRIGGER,
            MSIX,
            0,
            16,
            0,
        );
        let mut left = storm;
        while left > 0 {
            let batch = left.min(32);
            left -= batch;
            let mut ids = Vec::new();
            for _ in 0..batch {
                match self.send(
                    Command::DeviceSetIrqs as u16,
                    0,
                    &[&trigger],
                    &[],
                    "trigger storm",
                ) {
                    Some(id) => ids.push(id),
                    None => return,
                }
            }
            for id in ids {
                if let Answer::Gone = self.answer(id, "trigger storm") {
                    return;
                }
            }
        }
        let _ = fds::eventfd_take(&kit.event);
        if self.rng.chance(1, 2) {
            let req = irq_set_msg(
                irq_flags::DATA_EVENTFD | irq_flags::ACTION_TRIGGER,
                MSIX,
                0,
                16,
                0,
            );
            if let Answer::Gone = self.request(Command::DeviceSetIrqs, &[&req], &[], "deassign") {
                return;
            }
        }
        self.probe("IRQs: sync probe");
    }

    /// Try to shrink, grow and seal a region fd, and use it within its size; violations if
    /// it can be resized or reaches past its region.
    fn abuse_region_fd(&mut self, index: u32, info: &RegionInfoMsg, fd: &OwnedFd) {
        let Some(size) = fds::file_size(fd) else {
            return;
        };
        let reach = info.offset.saturating_add(info.size);
        if size > reach.next_multiple_of(4096) {
            self.violation(format!(
                "region {index}: its fd is {size:#x} bytes, the region ends at {reach:#x}"
            ));
            return;
        }
        for new_size in [size / 2, size + 4096] {
            // SAFETY: ftruncate on an fd we own.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), new_size as libc::off_t) } == 0 {
                self.violation(format!(
                    "region {index}: A resized the server's fd from {size:#x} to {new_size:#x}"
                ));
                // SAFETY: as above, putting the size back.
                unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
                return;
            }
        }
        if self.rng.chance(1, 8) {
            // Sealing A's own slice against writes can only hurt A.
            // SAFETY: F_ADD_SEALS with an int argument.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) };
        }
        let len = size.min(1 << 20) as usize;
        if len == 0 {
            return;
        }
        let Ok(mapping) = Mapping::new(fd, 0, len as u64) else {
            return;
        };
        let at = self.rng.below(len as u64);
        let byte = self.rng.next_u32() as u8;
        mapping.write(at, &[byte]);
        let mut last = [0u8];
        mapping.read(len as u64 - 1, &mut last);
        std::hint::black_box(last);
    }

    pub(crate) fn region_fds(&mut self) {
        for _ in 0..self.rng.range(1, 10) {
            let index = if self.rng.chance(7, 8) {
                self.rng.below(10) as u32
            } else {
                edgy_u32(&mut self.rng)
            };
            let argsz = *self
                .rng
                .pick(&[0u32, 8, 16, 32, 33, 64, 512, 4096, u32::MAX]);
            let mut req = [0u8; RegionInfoMsg::SIZE];
            let _ = RegionInfoMsg {
                argsz,
                index,
                ..Default::default()
            }
            .encode(&mut req);
            match self.request(Command::DeviceGetRegionInfo, &[&req], &[], "region info") {
                Answer::Reply(mut msg) => {
                    let info = RegionInfoMsg::decode(&msg.payload).unwrap_or_default();
                    if let Some(fd) = msg.fds.pop() {
                        self.abuse_region_fd(index, &info, &fd);
                    }
                }
                Answer::Errno(_) => {}
                Answer::Gone => return,
            }
        }
        self.probe("region fds: sync probe");
    }
}
