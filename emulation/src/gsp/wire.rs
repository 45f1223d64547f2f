//! The GSP's own codec for queue elements (gpu-facts 3.2). Deliberately written apart from
//! the host driver's codec (`gpu-backend`'s `gsp::element`), so the two check each other.
//!
//! An element is a 48-byte message header (auth tag and AAD, 16 bytes each, used only in
//! confidential-compute mode; checksum; sequence number; slot count; padding), a 32-byte
//! RPC header, and the payload. It fills `ceil((48 + rpc.length) / 4096)` slots of 4 KiB
//! (at most 16). The checksum is chosen so that the XOR of all little-endian 64-bit words
//! of the first `48 + rpc.length` bytes (zero-padded to 8), folded to 32 bits, is zero.

use thiserror::Error;

/// Size of one queue slot.
pub const SLOT_SIZE: usize = 0x1000;
/// Most slots one element may use.
pub const MAX_ELEMENT_SLOTS: u32 = 16;
/// Size of the message header in front of the RPC header.
pub const MESSAGE_HEADER_SIZE: usize = 0x30;
/// Size of the RPC header.
pub const RPC_HEADER_SIZE: usize = 0x20;
/// `rpc.header_version`: major 3, minor 0.
pub const RPC_HEADER_VERSION: u32 = 0x0300_0000;
/// `rpc.signature`: the bytes "VRPC".
pub const RPC_SIGNATURE: u32 = 0x4350_5256;
/// Largest payload one element carries.
pub const MAX_PAYLOAD: usize =
    MAX_ELEMENT_SLOTS as usize * SLOT_SIZE - MESSAGE_HEADER_SIZE - RPC_HEADER_SIZE;

/// Errors of decoding an element.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The payload does not fit one element.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte element limit")]
    TooLarge(usize),
    /// `elemCount` is 0, above 16, or disagrees with `rpc.length`.
    #[error("element claims {elem_count} slot(s) for an RPC of length {length}")]
    BadLength {
        /// `elemCount` as read.
        elem_count: u32,
        /// `rpc.length` as read.
        length: u32,
    },
    /// The checksum does not come out zero.
    #[error("element checksum mismatch (residue {0:#010x})")]
    Checksum(u32),
    /// Wrong RPC header version or signature.
    #[error("bad RPC header: version {version:#010x}, signature {signature:#010x}")]
    BadRpcHeader {
        /// `rpc.header_version`.
        version: u32,
        /// `rpc.signature`.
        signature: u32,
    },
}

/// The message header (first 48 bytes of an element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ElementHeader {
    /// Confidential-compute authentication tag (zero otherwise).
    pub auth_tag: [u8; 16],
    /// Confidential-compute additional authenticated data (zero otherwise).
    pub aad: [u8; 16],
    /// Checksum making the element's XOR sum zero.
    pub checksum: u32,
    /// Sender's per-queue sequence number.
    pub seq_num: u32,
    /// Slots used.
    pub elem_count: u32,
    /// Padding.
    pub pad: u32,
}

/// The RPC header (48 bytes into an element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RpcHeader {
    /// 0x03000000.
    pub header_version: u32,
    /// "VRPC".
    pub signature: u32,
    /// 32 + payload length.
    pub length: u32,
    /// Function or event number.
    pub function: u32,
    /// NV_STATUS of a reply (0xFFFFFFFF in a command).
    pub rpc_result: u32,
    /// Private status (0xFFFFFFFF in a command).
    pub rpc_result_private: u32,
    /// Request sequence, echoed in the reply.
    pub sequence: u32,
    /// Spare / cpuRmGfid.
    pub spare: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

impl ElementHeader {
    /// Parses the first 48 bytes of `b` (which must hold at least that many).
    pub fn parse(b: &[u8]) -> ElementHeader {
        let mut auth_tag = [0; 16];
        let mut aad = [0; 16];
        auth_tag.copy_from_slice(&b[0..16]);
        aad.copy_from_slice(&b[16..32]);
        ElementHeader {
            auth_tag,
            aad,
            checksum: u32_at(b, 0x20),
            seq_num: u32_at(b, 0x24),
            elem_count: u32_at(b, 0x28),
            pad: u32_at(b, 0x2C),
        }
    }

    fn store(&self, b: &mut [u8]) {
        b[0..16].copy_from_slice(&self.auth_tag);
        b[16..32].copy_from_slice(&self.aad);
        put_u32(b, 0x20, self.checksum);
        put_u32(b, 0x24, self.seq_num);
        put_u32(b, 0x28, self.elem_count);
        put_u32(b, 0x2C, self.pad);
    }
}

impl RpcHeader {
    /// Parses the RPC header of the element in `b` (at least 80 bytes).
    pub fn parse(b: &[u8]) -> RpcHeader {
        let f = |i: usize| u32_at(b, MESSAGE_HEADER_SIZE + 4 * i);
        RpcHeader {
            header_version: f(0),
            signature: f(1),
            length: f(2),
            function: f(3),
            rpc_result: f(4),
            rpc_result_private: f(5),
            sequence: f(6),
            spare: f(7),
        }
    }

    fn store(&self, b: &mut [u8]) {
        let fields = [
            self.header_version,
            self.signature,
            self.length,
            self.function,
            self.rpc_result,
            self.rpc_result_private,
            self.sequence,
            self.spare,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            put_u32(b, MESSAGE_HEADER_SIZE + 4 * i, v);
        }
    }
}

/// One decoded RPC (command or message), owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    /// Function or event number.
    pub function: u32,
    /// `rpc_result` (NV_STATUS of a reply).
    pub result: u32,
    /// `rpc_result_private`.
    pub result_private: u32,
    /// Request sequence.
    pub sequence: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl WireMessage {
    /// A reply or event from the GSP: result `status`, private result equal to it.
    pub fn from_gsp(function: u32, status: u32, sequence: u32, payload: Vec<u8>) -> WireMessage {
        WireMessage {
            function,
            result: status,
            result_private: status,
            sequence,
            payload,
        }
    }
}

/// Slots an element with RPC length `length` occupies.
pub fn slots_for(length: u32) -> u32 {
    (MESSAGE_HEADER_SIZE as u32 + length).div_ceil(SLOT_SIZE as u32)
}

/// XOR of the little-endian 64-bit words of `bytes` (the last word zero-padded), folded to
/// 32 bits (high half XOR low half).
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut acc = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        acc ^= u64::from_le_bytes(w);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        acc ^= u64::from_le_bytes(w);
    }
    (acc >> 32) as u32 ^ acc as u32
}

/// Encodes `msg` with message sequence number `seq_num` into whole, zero-padded slots with
/// a valid checksum.
pub fn encode(msg: &WireMessage, seq_num: u32) -> Result<Vec<u8>, WireError> {
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLarge(msg.payload.len()));
    }
    let length = (RPC_HEADER_SIZE + msg.payload.len()) as u32;
    let elem_count = slots_for(length);
    let mut b = vec![0u8; elem_count as usize * SLOT_SIZE];
    let mut header = ElementHeader {
        seq_num,
        elem_count,
        ..ElementHeader::default()
    };
    header.store(&mut b);
    RpcHeader {
        header_version: RPC_HEADER_VERSION,
        signature: RPC_SIGNATURE,
        length,
        function: msg.function,
        rpc_result: msg.result,
        rpc_result_private: msg.result_private,
        sequence: msg.sequence,
        spare: 0,
    }
    .store(&mut b);
    let start = MESSAGE_HEADER_SIZE + RPC_HEADER_SIZE;
    b[start..start + msg.payload.len()].copy_from_slice(&msg.payload);
    header.checksum = checksum(&b[..MESSAGE_HEADER_SIZE + length as usize]);
    header.store(&mut b);
    Ok(b)
}

/// Checks the slot count and length claimed by an element's first slot, before the rest is
/// copied: returns the slot count.
pub fn claimed_slots(first_slot: &[u8]) -> Result<u32, WireError> {
    let header = ElementHeader::parse(first_slot);
    let rpc = RpcHeader::parse(first_slot);
    let sane = (RPC_HEADER_SIZE as u32..=(MAX_PAYLOAD + RPC_HEADER_SIZE) as u32)
        .contains(&rpc.length)
        && header.elem_count == slots_for(rpc.length);
    if sane {
        Ok(header.elem_count)
    } else {
        Err(WireError::BadLength {
            elem_count: header.elem_count,
            length: rpc.length,
        })
    }
}

/// Decodes and verifies an element copied out of the ring (all of its slots).
pub fn decode(element: &[u8]) -> Result<(ElementHeader, WireMessage), WireError> {
    let slots = claimed_slots(element)?;
    let header = ElementHeader::parse(element);
    let rpc = RpcHeader::parse(element);
    if element.len() < slots as usize * SLOT_SIZE {
        return Err(WireError::BadLength {
            elem_count: header.elem_count,
            length: rpc.length,
        });
    }
    let end = MESSAGE_HEADER_SIZE + rpc.length as usize;
    let residue = checksum(&element[..end]);
    if residue != 0 {
        return Err(WireError::Checksum(residue));
    }
    if rpc.header_version != RPC_HEADER_VERSION || rpc.signature != RPC_SIGNATURE {
        return Err(WireError::BadRpcHeader {
            version: rpc.header_version,
            signature: rpc.signature,
        });
    }
    let msg = WireMessage {
        function: rpc.function,
        result: rpc.rpc_result,
        result_private: rpc.rpc_result_private,
        sequence: rpc.sequence,
        payload: element[MESSAGE_HEADER_SIZE + RPC_HEADER_SIZE..end].to_vec(),
    };
    Ok((header, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: usize) -> WireMessage {
        WireMessage {
            function: 76,
            result: u32::MAX,
            result_private: u32::MAX,
            sequence: 9,
            payload: (0..len).map(|i| (i * 7 + 3) as u8).collect(),
        }
    }

    #[test]
    fn round_trip_and_slot_counts() {
        for (len, slots) in [(0, 1), (4096 - 80, 1), (4096 - 79, 2), (MAX_PAYLOAD, 16)] {
            let b = encode(&msg(len), 5).unwrap();
            assert_eq!(b.len(), slots * SLOT_SIZE, "{len}");
            let (h, m) = decode(&b).unwrap();
            assert_eq!((h.seq_num, h.elem_count), (5, slots as u32));
            assert_eq!(m, msg(len));
        }
        assert_eq!(
            encode(&msg(MAX_PAYLOAD + 1), 0),
            Err(WireError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn corruption_is_detected() {
        let mut b = encode(&msg(100), 1).unwrap();
        b[0x60] ^= 1;
        assert!(matches!(decode(&b), Err(WireError::Checksum(_))));
        let mut b = encode(&msg(100), 1).unwrap();
        put_u32(&mut b, 0x28, 2);
        assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
        let mut b = encode(&msg(100), 1).unwrap();
        put_u32(&mut b, 0x38, 0x10_0000);
        assert!(matches!(
            claimed_slots(&b),
            Err(WireError::BadLength { .. })
        ));
        // A bad signature with a fixed-up checksum is still rejected.
        let mut b = encode(&msg(0), 1).unwrap();
        put_u32(&mut b, 0x34, 0x1234_5678);
        put_u32(&mut b, 0x20, 0);
        let c = checksum(&b[..80]);
        put_u32(&mut b, 0x20, c);
        assert!(matches!(decode(&b), Err(WireError::BadRpcHeader { .. })));
    }
}
