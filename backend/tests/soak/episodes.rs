//! The hostile client's message-level episodes: fuzzed, lying, truncated and oversized
//! messages, region and aperture accesses, the handshake, reconnects, slow reading and
//! stalling.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::protocol::{
    flags, Command, PeerCapabilities, RegionAccessMsg, VersionMsg, HEADER_SIZE,
};
use gpu_backend::vfio_user::test_client::QEMU_CAPS_JSON;

use crate::hostile::{Answer, Hostile};
use crate::payloads::{
    edgy_u32, edgy_u64, expects_reply, frame, fuzz_command, fuzz_flags, fuzz_payload, structured,
    write_multi,
};

/// BAR0 (registers) and its size.
pub const BAR0: u32 = 0;
const BAR0_SIZE: u64 = 16 << 20;
/// The VRAM BAR and its size (A's slice).
pub const VRAM_BAR: u32 = 1;
/// A guest's slice size in the soak.
pub const SLICE: u64 = 64 << 20;
/// The config space region.
pub const CONFIG: u32 = 7;
/// The Turing BAR0 window register (BASE 23:0 in 64 KiB units, TARGET 25:24).
pub const WINDOW: u64 = 0x1700;
/// The PRAMIN aperture in BAR0, 1 MiB.
pub const APERTURE: u64 = 0x70_0000;
/// The aperture's size.
pub const APERTURE_SIZE: u64 = 1 << 20;

fn region_size(region: u32) -> u64 {
    match region {
        BAR0 => BAR0_SIZE,
        VRAM_BAR => SLICE,
        CONFIG => 4096,
        _ => 0,
    }
}

/// Poll `fd` until the peer hangs up (`POLLRDHUP`/`POLLHUP`), up to `limit`; how long it took.
fn time_until_hangup(fd: RawFd, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Some(started.elapsed());
        }
    }
    None
}

impl Hostile {
    pub(crate) fn fuzz(&mut self) {
        let kit = self.kit.clone();
        let mut expected = Vec::new();
        for _ in 0..self.rng.range(1, 12) {
            let command = fuzz_command(&mut self.rng);
            let msg_flags = fuzz_flags(&mut self.rng);
            let payload = fuzz_payload(&mut self.rng, command, self.max_xfer);
            let id = self.rng.next_u32() as u16;
            let nfds = match self.rng.below(10) {
                0..=6 => 0,
                7 | 8 => self.rng.range(1, 3),
                _ => self.rng.range(15, 20),
            };
            let fds: Vec<BorrowedFd<'_>> = (0..nfds).map(|_| kit.any(&mut self.rng)).collect();
            if !self.send_raw(&frame(id, command, msg_flags, None, &payload), &fds, "fuzz") {
                return;
            }
            if expects_reply(msg_flags) {
                expected.push((id, command));
            }
        }
        for (id, command) in expected {
            if let Answer::Gone = self.answer(id, &format!("fuzz: command {command}")) {
                return;
            }
        }
        self.probe("fuzz: sync probe");
    }

    pub(crate) fn garbage(&mut self) {
        let n = self.rng.range(1, 512) as usize;
        let mut bytes = self.rng.bytes(n);
        if self.rng.chance(1, 2) {
            let size = if self.rng.chance(1, 2) {
                edgy_u32(&mut self.rng)
            } else {
                self.rng.below(64) as u32
            };
            let command = fuzz_command(&mut self.rng);
            let header = frame(self.rng.next_u32() as u16, command, 0, Some(size), &[]);
            let k = header.len().min(n);
            bytes[..k].copy_from_slice(&header[..k]);
        }
        if self.send_raw(&bytes, &[], "garbage") {
            self.drain_and_drop();
        }
    }

    pub(crate) fn lying_size(&mut self) {
        let command = fuzz_command(&mut self.rng);
        let payload = structured(&mut self.rng, command, self.max_xfer);
        let real = (HEADER_SIZE + payload.len()) as u64;
        let size = match self.rng.below(4) {
            0 => self.rng.below(HEADER_SIZE as u64) as u32,
            1 if real > HEADER_SIZE as u64 => self.rng.range(HEADER_SIZE as u64, real - 1) as u32,
            2 => (real + self.rng.range(1, 4096)) as u32,
            _ => edgy_u32(&mut self.rng),
        };
        let id = self.rng.next_u32() as u16;
        if !self.send_raw(
            &frame(id, command, 0, Some(size), &payload),
            &[],
            "lying size",
        ) {
            return;
        }
        if (size as usize) < HEADER_SIZE {
            // The stream cannot be followed: an EINVAL answer, then the server hangs up.
            match self.answer(id, "header size below 16") {
                Answer::Errno(libc::EINVAL) | Answer::Gone => {}
                Answer::Errno(e) => {
                    self.violation(format!("header size {size}: errno {e}, not EINVAL"))
                }
                Answer::Reply(_) => self.violation(format!("header size {size} was served")),
            }
            self.drain_and_drop();
            return;
        }
        if self.rng.chance(1, 2) {
            let n = self.rng.below(256) as usize;
            let more = self.rng.bytes(n);
            if !self.send_raw(&more, &[], "lying size: more bytes") {
                return;
            }
        }
        self.drain_and_drop();
    }

    pub(crate) fn truncated(&mut self) {
        let command = fuzz_command(&mut self.rng);
        let payload = structured(&mut self.rng, command, self.max_xfer);
        let message = frame(self.rng.next_u32() as u16, command, 0, None, &payload);
        let cut = self.rng.range(1, message.len() as u64 - 1) as usize;
        if self.send_raw(&message[..cut], &[], "truncated") {
            if self.rng.chance(1, 4) {
                std::thread::sleep(Duration::from_millis(self.rng.range(1, 200)));
            }
            self.drop_conn();
        }
    }

    pub(crate) fn oversized(&mut self) {
        let max_message = HEADER_SIZE as u64 + u64::from(self.max_xfer) + 4096;
        let size = max_message + self.rng.range(1, 64 << 10);
        let mut payload = self.rng.bytes((size - HEADER_SIZE as u64) as usize);
        let _ = RegionAccessMsg {
            offset: self.rng.below(SLICE),
            region: VRAM_BAR,
            count: (size - 32) as u32,
        }
        .encode(&mut payload);
        let command = if self.rng.chance(3, 4) {
            Command::RegionWrite as u16
        } else {
            fuzz_command(&mut self.rng)
        };
        let posted = self.rng.chance(1, 4);
        let msg_flags = if posted { flags::NO_REPLY } else { 0 };
        let id = self.rng.next_u32() as u16;
        if !self.send_raw(
            &frame(id, command, msg_flags, None, &payload),
            &[],
            "oversized",
        ) {
            return;
        }
        if !posted {
            match self.answer(id, "oversized message") {
                Answer::Errno(libc::E2BIG) | Answer::Gone => {}
                Answer::Errno(e) => self.violation(format!("oversized message: errno {e}")),
                Answer::Reply(_) => self.violation("an oversized message was served".into()),
            }
        }
        self.probe("oversized: sync probe");
    }

    fn write_lying_count(&mut self, region: u32, offset: u64, count: u32, data_len: usize) {
        let mut req = [0u8; RegionAccessMsg::SIZE];
        let _ = RegionAccessMsg {
            offset,
            region,
            count,
        }
        .encode(&mut req);
        let data = self.rng.bytes(data_len);
        if let Some(id) = self.send(
            Command::RegionWrite as u16,
            0,
            &[&req, &data],
            &[],
            "lying count",
        ) {
            if let Answer::Reply(_) = self.answer(id, "REGION_WRITE with a lying count") {
                self.violation(format!(
                    "REGION_WRITE of count {count} with {data_len} data bytes was served"
                ));
            }
        }
    }

    pub(crate) fn region(&mut self) {
        for _ in 0..self.rng.range(1, 24) {
            let region = match self.rng.below(16) {
                0..=4 => BAR0,
                5..=8 => VRAM_BAR,
                9 | 10 => CONFIG,
                11 => edgy_u32(&mut self.rng),
                _ => self.rng.range(2, 9) as u32,
            };
            let size = region_size(region);
            let offset = match self.rng.below(7) {
                0 => self.rng.below(size.max(1)),
                1 => size.saturating_sub(self.rng.below(9)),
                2 => size + self.rng.below(16),
                3 => self.rng.below(0x1000),
                4 => edgy_u64(&mut self.rng),
                5 => self.rng.below(size.max(1)) & !7,
                _ => WINDOW + self.rng.below(8),
            };
            let max = self.max_xfer;
            let count = match self.rng.below(16) {
                0 => 0,
                1..=8 => *self.rng.pick(&[1u32, 2, 3, 4, 5, 6, 7, 8, 16]),
                9 => 64,
                10 => 4096,
                11 => self.rng.below(u64::from(max)) as u32,
                12 => max,
                13 => max + 1,
                _ => edgy_u32(&mut self.rng),
            };
            let what = format!("region {region} @{offset:#x} +{count}");
            if self.rng.chance(1, 2) {
                if self.read(region, offset, count, &what) == Err(0) {
                    return;
                }
            } else if count > max {
                let n = self.rng.below(64) as usize;
                self.write_lying_count(region, offset, count, n);
            } else {
                let data = self.rng.bytes(count as usize);
                let posted = self.rng.chance(1, 3);
                if !self.write(region, offset, &data, posted, &what) {
                    return;
                }
            }
        }
        self.probe("region: sync probe");
    }

    /// Read the window register; `Some(guest VRAM base)` if it points at VRAM.
    fn window_base(&mut self) -> Option<Option<u64>> {
        let value = self.read(BAR0, WINDOW, 4, "window read").ok()?;
        let value = u32::from_le_bytes(value.try_into().ok()?);
        let target = (value >> 24) & 3;
        Some((target == 0).then_some(u64::from(value & 0xFF_FFFF) << 16))
    }

    /// An aperture read whose bytes past A's slice (or under a window that is not VRAM) must
    /// read ~0.
    fn checked_aperture_read(&mut self, offset: u64, count: u32) -> bool {
        let Some(base) = self.window_base() else {
            return false;
        };
        let what = format!("aperture read @{offset:#x} +{count}");
        let data = match self.read(BAR0, APERTURE + offset, count, &what) {
            Ok(data) => data,
            Err(0) => return false,
            Err(_) => return true,
        };
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if at >= APERTURE_SIZE {
                break; // past the aperture: other registers
            }
            let outside = base.is_none_or(|b| b + at >= SLICE);
            if outside && byte != 0xFF {
                self.violation(format!(
                    "{what}: byte {i} reads {byte:#x} past A's slice (window base {base:x?})"
                ));
                return false;
            }
        }
        true
    }

    fn move_window(&mut self) -> bool {
        let value: u32 = match self.rng.below(6) {
            0..=2 => self.rng.below(SLICE >> 16) as u32,
            3 => self.rng.range(SLICE >> 16, 0xFF_FFFF) as u32,
            4 => (self.rng.below(4) as u32) << 24 | self.rng.below(SLICE >> 16) as u32,
            _ => edgy_u32(&mut self.rng),
        };
        let posted = self.rng.chance(1, 2);
        match self.rng.below(4) {
            0 => {
                let width = *self.rng.pick(&[1usize, 2]);
                let at = self.rng.below(4);
                let bytes = value.to_le_bytes();
                let n = width.min(4 - at as usize);
                self.write(
                    BAR0,
                    WINDOW + at,
                    &bytes[..n],
                    posted,
                    "window sub-dword write",
                )
            }
            1 => {
                let data = u64::from(value) << 32 | u64::from(self.rng.next_u32());
                self.write(
                    BAR0,
                    WINDOW - 4,
                    &data.to_le_bytes(),
                    posted,
                    "window 8-byte write",
                )
            }
            _ => self.write(BAR0, WINDOW, &value.to_le_bytes(), posted, "window write"),
        }
    }

    pub(crate) fn aperture(&mut self) {
        let flood = self.rng.chance(1, 3);
        for _ in 0..self.rng.range(1, if flood { 32 } else { 12 }) {
            if (!flood || self.rng.chance(1, 8)) && !self.move_window() {
                return;
            }
            let max = u64::from(self.max_xfer);
            let count = if flood {
                APERTURE_SIZE.min(max)
            } else {
                let any = self.rng.range(1, max);
                *self
                    .rng
                    .pick(&[1, 2, 4, 8, 4096, 64 << 10, APERTURE_SIZE.min(max), any])
            };
            let offset = if flood {
                0
            } else if self.rng.chance(1, 4) {
                APERTURE_SIZE - self.rng.below(count.min(64) + 1)
            } else {
                self.rng.below(APERTURE_SIZE)
            };
            if self.rng.chance(1, 2) {
                if !self.checked_aperture_read(offset, count as u32) {
                    return;
                }
            } else {
                let data = self.rng.bytes(count as usize);
                let posted = self.rng.chance(1, 2);
                if !self.write(BAR0, APERTURE + offset, &data, posted, "aperture write") {
                    return;
                }
            }
        }
        self.probe("aperture: sync probe");
    }

    pub(crate) fn write_multi(&mut self) {
        let entries = self.rng.below(40) as usize;
        let payload = write_multi(&mut self.rng, entries);
        let posted = self.rng.chance(1, 3);
        let msg_flags = if posted { flags::NO_REPLY } else { 0 };
        let Some(id) = self.send(
            Command::RegionWriteMulti as u16,
            msg_flags,
            &[&payload],
            &[],
            "write multi",
        ) else {
            return;
        };
        if !posted {
            if let Answer::Gone = self.answer(id, "REGION_WRITE_MULTI") {
                return;
            }
        }
        self.probe("write multi: sync probe");
    }

    pub(crate) fn handshake(&mut self) {
        self.drop_conn();
        let Some(client) = self.connect_raw() else {
            return;
        };
        self.adopt(client, 1 << 20);
        let mut negotiated = false;
        for _ in 0..self.rng.range(1, 4) {
            match self.rng.below(4) {
                0 => {
                    // Anything but VERSION first.
                    let command = self.rng.range(2, 18) as u16;
                    let payload = structured(&mut self.rng, command, 4096);
                    let Some(id) = self.send(command, 0, &[&payload], &[], "before VERSION") else {
                        return;
                    };
                    match self.answer(id, "command before VERSION") {
                        Answer::Reply(_) if !negotiated => {
                            self.violation(format!("command {command} was served before VERSION"))
                        }
                        Answer::Gone => return,
                        _ => {}
                    }
                }
                _ => {
                    let payload = structured(&mut self.rng, Command::Version as u16, 4096);
                    let Some(id) =
                        self.send(Command::Version as u16, 0, &[&payload], &[], "VERSION")
                    else {
                        return;
                    };
                    match self.answer(id, "odd VERSION") {
                        Answer::Reply(msg) if negotiated => {
                            let _ = msg;
                            self.violation("a second VERSION was accepted".into());
                            return;
                        }
                        Answer::Reply(msg) => {
                            negotiated = true;
                            let caps = msg
                                .payload
                                .get(VersionMsg::SIZE..)
                                .and_then(|d| PeerCapabilities::parse(d).ok())
                                .unwrap_or_default();
                            self.max_xfer = caps.max_data_xfer_size.unwrap_or(1 << 20) as u32;
                        }
                        Answer::Errno(_) => {}
                        Answer::Gone => return,
                    }
                }
            }
        }
        if !negotiated {
            // A proper VERSION must still work on this connection.
            let mut payload = vec![0u8; VersionMsg::SIZE];
            payload.extend_from_slice(QEMU_CAPS_JSON.as_bytes());
            payload.push(0);
            let Some(id) = self.send(
                Command::Version as u16,
                0,
                &[&payload],
                &[],
                "VERSION after odd ones",
            ) else {
                return;
            };
            match self.answer(id, "VERSION after odd ones") {
                Answer::Reply(_) => self.max_xfer = 1 << 20,
                Answer::Errno(e) => {
                    self.violation(format!("a proper VERSION after refused ones: errno {e}"))
                }
                Answer::Gone => return,
            }
        }
        self.probe("handshake: sync probe");
    }

    pub(crate) fn reconnect(&mut self) {
        match self.rng.below(4) {
            0 => {
                // Hang up with big replies in flight.
                for _ in 0..self.rng.range(1, 4) {
                    let mut req = [0u8; RegionAccessMsg::SIZE];
                    let _ = RegionAccessMsg {
                        offset: 0,
                        region: VRAM_BAR,
                        count: self.max_xfer,
                    }
                    .encode(&mut req);
                    if self
                        .send(
                            Command::RegionRead as u16,
                            0,
                            &[&req],
                            &[],
                            "read in flight",
                        )
                        .is_none()
                    {
                        return;
                    }
                }
                self.drop_conn();
            }
            1 => {
                // Half-close after a request: its answer (or a hang-up) must still come.
                let mut req = [0u8; RegionAccessMsg::SIZE];
                let _ = RegionAccessMsg {
                    offset: 0,
                    region: CONFIG,
                    count: 4,
                }
                .encode(&mut req);
                let Some(id) = self.send(Command::RegionRead as u16, 0, &[&req], &[], "half-close")
                else {
                    return;
                };
                if let Some(client) = self.conn() {
                    let _ = client.stream().shutdown(std::net::Shutdown::Write);
                }
                let _ = self.answer(id, "answer after half-close");
                self.drop_conn();
            }
            2 => {
                // A second client while A is connected must be refused.
                if self.conn().is_none() {
                    return;
                }
                if let Some(mut second) = self.connect_raw() {
                    if second.version().is_ok() {
                        self.violation("a second concurrent client was served".into());
                        return;
                    }
                }
                self.probe("after a refused second client");
            }
            _ => {
                self.drop_conn();
                for _ in 0..self.rng.range(5, 30) {
                    let Some(mut client) = self.connect_raw() else {
                        return;
                    };
                    if self.rng.chance(1, 2) {
                        let _ = client.version();
                    }
                }
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        if let Answer::Gone = self.request(Command::DeviceReset, &[], &[], "DEVICE_RESET") {
            return;
        }
        self.probe("reset: sync probe");
    }

    pub(crate) fn slow_reader(&mut self) {
        let mut ids = Vec::new();
        for _ in 0..self.rng.range(2, 8) {
            let (region, offset) = if self.rng.chance(1, 2) {
                (VRAM_BAR, self.rng.below(SLICE - APERTURE_SIZE))
            } else {
                (BAR0, APERTURE)
            };
            let mut req = [0u8; RegionAccessMsg::SIZE];
            let _ = RegionAccessMsg {
                offset,
                region,
                count: self.max_xfer.min(APERTURE_SIZE as u32),
            }
            .encode(&mut req);
            match self.send(Command::RegionRead as u16, 0, &[&req], &[], "slow reader") {
                Some(id) => ids.push(id),
                None => return,
            }
        }
        std::thread::sleep(Duration::from_millis(self.rng.range(300, 1500)));
        for id in ids {
            if let Answer::Gone = self.answer(id, "slow reader") {
                return;
            }
        }
        self.probe("slow reader: sync probe");
    }

    pub(crate) fn stall(&mut self) {
        const LIMIT: Duration = Duration::from_secs(8);
        let half_message = self.rng.chance(1, 2);
        let name = if half_message {
            "half a message"
        } else {
            "replies never read"
        };
        if half_message {
            let payload = structured(&mut self.rng, Command::RegionWrite as u16, 4096);
            let message = frame(
                self.rng.next_u32() as u16,
                Command::RegionWrite as u16,
                0,
                None,
                &payload,
            );
            if !self.send_raw(&message[..HEADER_SIZE + 4], &[], "stall") {
                return;
            }
        } else {
            for _ in 0..16 {
                let mut req = [0u8; RegionAccessMsg::SIZE];
                let _ = RegionAccessMsg {
                    offset: 0,
                    region: VRAM_BAR,
                    count: self.max_xfer,
                }
                .encode(&mut req);
                if self
                    .send(Command::RegionRead as u16, 0, &[&req], &[], "stall")
                    .is_none()
                {
                    return;
                }
            }
        }
        let Some(client) = self.conn() else {
            return;
        };
        let fd = client.stream().as_raw_fd();
        let dropped = time_until_hangup(fd, LIMIT + Duration::from_secs(7));
        match dropped {
            Some(after) => {
                self.tally.stall_drops.push((name, after));
                if after > LIMIT {
                    self.violation(format!(
                        "a stalled client ({name}) was dropped only after {after:.1?} (limit {LIMIT:?})"
                    ));
                }
            }
            None => self.violation(format!("a stalled client ({name}) was never dropped")),
        }
        self.drop_conn();
    }
}
