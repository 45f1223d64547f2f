//! Message bytes for the hostile client: payloads that look right for their command, the same
//! with a field or a bit broken, plausible small numbers, and noise; and framing with a header
//! that may lie about the size.

use gpu_backend::vfio_user::protocol::{
    dma_flags, irq_flags, Command, DeviceInfoMsg, DmaMapMsg, DmaUnmapMsg, Header, IrqInfoMsg,
    IrqSetMsg, RegionAccessMsg, RegionInfoMsg, RegionIoFdsMsg, VersionMsg, WriteMultiEntry,
    WriteMultiMsg, HEADER_SIZE,
};
use gpu_backend::vfio_user::test_client::QEMU_CAPS_JSON;

use crate::support::rng::Rng;

/// VERSION data a client might send: QEMU's, odd limits, broken JSON.
const VERSION_JSON: &[&str] = &[
    QEMU_CAPS_JSON,
    "{}",
    "",
    "not json",
    "[1,2,3]",
    r#"{"capabilities":{"max_data_xfer_size":0,"max_msg_fds":0}}"#,
    r#"{"capabilities":{"max_data_xfer_size":4096,"max_dma_maps":1}}"#,
    r#"{"capabilities":{"max_data_xfer_size":18446744073709551615,"max_dma_maps":4294967296,"max_msg_fds":1000}}"#,
    r#"{"capabilities":{"migration":{"pgsize":-1},"pgsizes":"x","write_multiple":1}}"#,
    r#"{"capabilities":"#,
];

/// A value that often sits on an edge: 0, 1, page sizes, powers of two, the top of the range.
pub fn edgy_u64(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2 => 4096 * rng.range(1, 16),
        3 => 1 << rng.below(64),
        4 => (1 << rng.below(64)) - 1,
        5 => u64::MAX - rng.below(4096),
        6 => rng.below(0x1_0000),
        7 => rng.below(1 << 30),
        _ => rng.next_u64(),
    }
}

/// A 32-bit value on an edge.
pub fn edgy_u32(rng: &mut Rng) -> u32 {
    match rng.below(6) {
        0 => 0,
        1 => rng.below(17) as u32,
        2 => u32::MAX - rng.below(16) as u32,
        3 => 1 << rng.below(32),
        _ => rng.next_u32(),
    }
}

/// Small words, so counts, indexes and sizes are often plausible.
pub fn plausible_words(rng: &mut Rng) -> Vec<u8> {
    let words = rng.below(14) as usize;
    (0..words)
        .flat_map(|_| {
            let w = match rng.below(10) {
                0..=3 => 0,
                4..=6 => rng.below(16) as u32,
                7 | 8 => rng.below(0x2000) as u32,
                _ => rng.next_u32(),
            };
            w.to_le_bytes()
        })
        .collect()
}

fn encoded<const N: usize>(encode: impl FnOnce(&mut [u8]) -> Option<()>) -> Vec<u8> {
    let mut buf = [0u8; N];
    encode(&mut buf).expect("encode into a buffer of the struct's size");
    buf.to_vec()
}

/// A payload that is well formed for `command`, with plausible values (`max_xfer` bounds
/// data).
pub fn structured(rng: &mut Rng, command: u16, max_xfer: u32) -> Vec<u8> {
    let region = *rng.pick(&[0u32, 0, 0, 1, 1, 7, 2, 6, 8, 9]);
    let offset = match rng.below(4) {
        0 => rng.below(0x1000),
        1 => 0x70_0000 + rng.below(0x10_0000),
        2 => rng.below(1 << 26),
        _ => edgy_u64(rng),
    };
    let count = *rng.pick(&[1u32, 2, 4, 4, 8, 16, 64, 4096]);
    match Command::from_u16(command) {
        Some(Command::Version) => {
            let mut p = encoded::<{ VersionMsg::SIZE }>(|b| {
                VersionMsg {
                    major: if rng.chance(1, 8) { 1 } else { 0 },
                    minor: rng.below(3) as u16,
                }
                .encode(b)
            });
            p.extend_from_slice(rng.pick(VERSION_JSON).as_bytes());
            if rng.chance(3, 4) {
                p.push(0);
            }
            p
        }
        Some(Command::DmaMap) => encoded::<{ DmaMapMsg::SIZE }>(|b| {
            DmaMapMsg {
                argsz: DmaMapMsg::SIZE as u32,
                flags: dma_flags::MAP_READ | dma_flags::MAP_WRITE,
                offset: 4096 * rng.below(16),
                address: 0x1000_0000 + 4096 * rng.below(4096),
                size: 4096 * rng.range(1, 16),
            }
            .encode(b)
        }),
        Some(Command::DmaUnmap) => encoded::<{ DmaUnmapMsg::SIZE }>(|b| {
            let all = rng.chance(1, 4);
            DmaUnmapMsg {
                argsz: DmaUnmapMsg::SIZE as u32,
                flags: if all { dma_flags::UNMAP_ALL } else { 0 },
                address: if all {
                    0
                } else {
                    0x1000_0000 + 4096 * rng.below(4096)
                },
                size: if all { 0 } else { 4096 * rng.range(1, 64) },
            }
            .encode(b)
        }),
        Some(Command::DeviceGetInfo) => encoded::<{ DeviceInfoMsg::SIZE }>(|b| {
            DeviceInfoMsg {
                argsz: DeviceInfoMsg::SIZE as u32,
                ..Default::default()
            }
            .encode(b)
        }),
        Some(Command::DeviceGetRegionInfo) => encoded::<{ RegionInfoMsg::SIZE }>(|b| {
            RegionInfoMsg {
                argsz: *rng.pick(&[32u32, 512, 4096]),
                index: rng.below(10) as u32,
                ..Default::default()
            }
            .encode(b)
        }),
        Some(Command::DeviceGetRegionIoFds) => encoded::<{ RegionIoFdsMsg::SIZE }>(|b| {
            RegionIoFdsMsg {
                argsz: RegionIoFdsMsg::SIZE as u32,
                flags: 0,
                index: rng.below(10) as u32,
                count: 0,
            }
            .encode(b)
        }),
        Some(Command::DeviceGetIrqInfo) => encoded::<{ IrqInfoMsg::SIZE }>(|b| {
            IrqInfoMsg {
                argsz: IrqInfoMsg::SIZE as u32,
                index: rng.below(6) as u32,
                ..Default::default()
            }
            .encode(b)
        }),
        Some(Command::DeviceSetIrqs) => {
            let data = *rng.pick(&[
                irq_flags::DATA_NONE,
                irq_flags::DATA_BOOL,
                irq_flags::DATA_EVENTFD,
            ]);
            let action = *rng.pick(&[
                irq_flags::ACTION_MASK,
                irq_flags::ACTION_UNMASK,
                irq_flags::ACTION_TRIGGER,
            ]);
            let count = rng.below(17) as u32;
            let bools = if data == irq_flags::DATA_BOOL {
                rng.bytes(count as usize)
            } else {
                Vec::new()
            };
            let mut p = encoded::<{ IrqSetMsg::SIZE }>(|b| {
                IrqSetMsg {
                    argsz: (IrqSetMsg::SIZE + bools.len()) as u32,
                    flags: data | action,
                    index: *rng.pick(&[0u32, 1, 2, 2, 2, 3, 4, 5]),
                    start: rng.below(17) as u32,
                    count,
                }
                .encode(b)
            });
            p.extend_from_slice(&bools);
            p
        }
        Some(Command::RegionRead) => encoded::<{ RegionAccessMsg::SIZE }>(|b| {
            RegionAccessMsg {
                offset,
                region,
                count,
            }
            .encode(b)
        }),
        Some(Command::RegionWrite) => {
            let count = count.min(max_xfer);
            let mut p = encoded::<{ RegionAccessMsg::SIZE }>(|b| {
                RegionAccessMsg {
                    offset,
                    region,
                    count,
                }
                .encode(b)
            });
            p.extend_from_slice(&rng.bytes(count as usize));
            p
        }
        Some(Command::RegionWriteMulti) => {
            let entries = rng.below(8) as usize;
            write_multi(rng, entries)
        }
        Some(Command::DeviceReset) => Vec::new(),
        _ => plausible_words(rng),
    }
}

/// A `REGION_WRITE_MULTI` payload of `entries` random writes (regions, offsets and counts
/// often wrong) whose `wr_cnt` may lie.
pub fn write_multi(rng: &mut Rng, entries: usize) -> Vec<u8> {
    let wr_cnt = match rng.below(6) {
        0 => edgy_u64(rng),
        1 => entries as u64 + 1,
        _ => entries as u64,
    };
    let mut p = encoded::<{ WriteMultiMsg::SIZE }>(|b| WriteMultiMsg { wr_cnt }.encode(b));
    for _ in 0..entries {
        let mut data = [0u8; 8];
        rng.fill(&mut data);
        let entry = WriteMultiEntry {
            offset: match rng.below(3) {
                0 => rng.below(0x1000),
                1 => 0x70_0000 + rng.below(0x10_0000),
                _ => edgy_u64(rng),
            },
            region: *rng.pick(&[0u32, 0, 1, 7, 3, 9, u32::MAX]),
            count: *rng.pick(&[0u32, 1, 2, 4, 4, 8, 9, 4096]),
            data,
        };
        p.extend(encoded::<{ WriteMultiEntry::SIZE }>(|b| entry.encode(b)));
    }
    p
}

/// Break `payload`: a bit flipped, a word set to an edge value, cut short or extended.
pub fn mutate(rng: &mut Rng, payload: &mut Vec<u8>) {
    for _ in 0..rng.range(1, 3) {
        match rng.below(5) {
            0 if !payload.is_empty() => {
                let at = rng.below(payload.len() as u64) as usize;
                payload[at] ^= 1 << rng.below(8);
            }
            1 if payload.len() >= 8 => {
                let at = (rng.below(payload.len() as u64 / 8) * 8) as usize;
                payload[at..at + 8].copy_from_slice(&edgy_u64(rng).to_le_bytes());
            }
            2 if payload.len() >= 4 => {
                let at = (rng.below(payload.len() as u64 / 4) * 4) as usize;
                payload[at..at + 4].copy_from_slice(&edgy_u32(rng).to_le_bytes());
            }
            3 => {
                let cut = rng.below(payload.len() as u64 + 1) as usize;
                payload.truncate(cut);
            }
            _ => {
                let extra = rng.below(64) as usize;
                payload.extend(rng.bytes(extra));
            }
        }
    }
}

/// A payload for `command`: well formed, mutated, small words or noise.
pub fn fuzz_payload(rng: &mut Rng, command: u16, max_xfer: u32) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => structured(rng, command, max_xfer),
        4..=7 => {
            let mut p = structured(rng, command, max_xfer);
            mutate(rng, &mut p);
            p
        }
        8 => plausible_words(rng),
        _ => {
            let n = rng.below(200) as usize;
            rng.bytes(n)
        }
    }
}

/// Command numbers: mostly valid (1..=18), sometimes anything.
pub fn fuzz_command(rng: &mut Rng) -> u16 {
    if rng.chance(9, 10) {
        rng.range(1, 18) as u16
    } else {
        rng.next_u32() as u16
    }
}

/// Header flags: mostly a command, sometimes `NO_REPLY`, a reply, an error, or anything.
pub fn fuzz_flags(rng: &mut Rng) -> u32 {
    use gpu_backend::vfio_user::protocol::flags;
    match rng.below(14) {
        0..=7 => flags::TYPE_COMMAND,
        8..=10 => flags::NO_REPLY,
        11 => flags::TYPE_REPLY,
        12 => flags::TYPE_REPLY | flags::ERROR,
        _ => rng.next_u32(),
    }
}

/// Whether the server answers a complete message carrying these header flags (every command
/// that did not ask for no reply, and every message of an unknown type; never a reply).
pub fn expects_reply(msg_flags: u32) -> bool {
    use gpu_backend::vfio_user::protocol::flags;
    msg_flags & flags::NO_REPLY == 0 && msg_flags & flags::TYPE_MASK != flags::TYPE_REPLY
}

/// A message: a header declaring `size` (the true size if `None`) and `payload`.
pub fn frame(id: u16, command: u16, msg_flags: u32, size: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_SIZE];
    Header {
        id,
        command,
        size: size.unwrap_or((HEADER_SIZE + payload.len()) as u32),
        flags: msg_flags,
        error: 0,
    }
    .encode(&mut out)
    .expect("a header fits 16 bytes");
    out.extend_from_slice(payload);
    out
}
