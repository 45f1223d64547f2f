//! Queue elements (gpu-facts 3.2): message header, RPC header and payload; encoding,
//! verification and the checksum.
//!
//! Layout: a 48-byte message header (`authTagBuffer` 16, `aadBuffer` 16, `checkSum`,
//! `seqNum`, `elemCount`, `pad`), a 32-byte RPC header (`header_version` 0x03000000,
//! `signature` "VRPC", `length` = 32 + payload, `function`, `rpc_result`,
//! `rpc_result_private`, `sequence`, `spare`), then the payload. An element fills
//! `ceil((48 + length) / 4096)` slots, at most 16.
//!
//! Checksum: XOR of the little-endian 64-bit words of the first `48 + length` bytes (the
//! last word zero-padded), folded (high 32 bits XOR low 32 bits). The sender stores the
//! value computed with `checkSum = 0`, so the receiver's sum over the same bytes is 0.

use thiserror::Error;

use super::queue::SLOT_SIZE;

/// Bytes of the message header.
pub const MESSAGE_HEADER_SIZE: usize = 48;
/// Bytes of the RPC header.
pub const RPC_HEADER_SIZE: usize = 32;
/// Most slots one element may span.
pub const MAX_ELEMENT_SLOTS: u32 = 16;
/// Largest payload of one element: 16 slots less both headers (65,456 bytes).
pub const MAX_PAYLOAD: usize =
    MAX_ELEMENT_SLOTS as usize * SLOT_SIZE as usize - MESSAGE_HEADER_SIZE - RPC_HEADER_SIZE;
/// `rpc.header_version`: major 3 (bits 31:24), minor 0 (bits 23:16).
pub const RPC_HEADER_VERSION: u32 = 0x0300_0000;
/// `rpc.signature`: NV_VGPU_MSG_SIGNATURE_VALID, the bytes "VRPC".
pub const RPC_SIGNATURE: u32 = u32::from_le_bytes(*b"VRPC");
/// `rpc_result` / `rpc_result_private` of a command (not yet answered).
pub const RESULT_PENDING: u32 = 0xFFFF_FFFF;

/// Errors of element encoding and verification.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ElementError {
    /// The payload does not fit one element (continuation records are not implemented).
    #[error("payload of {0} bytes exceeds one element ({MAX_PAYLOAD} bytes)")]
    TooLarge(usize),
    /// `rpc.length` is impossible, or `elemCount` disagrees with it.
    #[error("impossible element: elemCount {elem_count}, rpc.length {length}")]
    ImpossibleLength {
        /// `elemCount` as found.
        elem_count: u32,
        /// `rpc.length` as found.
        length: u32,
    },
    /// The element claims more slots than the producer published.
    #[error("element claims {claimed} slots, only {available} published")]
    BeyondWritePointer {
        /// `elemCount`.
        claimed: u32,
        /// Slots between the read and write pointers.
        available: u32,
    },
    /// The checksum does not come out zero.
    #[error("checksum mismatch: the element sums to {0:#010x}, not 0")]
    Checksum(u32),
    /// Wrong `header_version` or `signature`.
    #[error("bad RPC header: version {version:#010x}, signature {signature:#010x}")]
    BadRpcHeader {
        /// `rpc.header_version`.
        version: u32,
        /// `rpc.signature`.
        signature: u32,
    },
}

/// The message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageHeader {
    /// `authTagBuffer` (confidential compute only; zero otherwise).
    pub auth_tag: [u8; 16],
    /// `aadBuffer` (confidential compute only; zero otherwise).
    pub aad: [u8; 16],
    /// `checkSum`.
    pub checksum: u32,
    /// `seqNum`: the sender's per-queue message counter.
    pub seq_num: u32,
    /// `elemCount`: slots used.
    pub elem_count: u32,
    /// `pad`.
    pub pad: u32,
}

/// The RPC header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RpcHeader {
    /// `header_version`.
    pub header_version: u32,
    /// `signature`.
    pub signature: u32,
    /// `length`: 32 + payload bytes.
    pub length: u32,
    /// `function`: function or event number ([`super::rpc::Function`]).
    pub function: u32,
    /// `rpc_result`: NV_STATUS of a reply.
    pub rpc_result: u32,
    /// `rpc_result_private`.
    pub rpc_result_private: u32,
    /// `sequence`: the request's sequence, echoed by the reply.
    pub sequence: u32,
    /// `spare` / `cpuRmGfid`.
    pub spare: u32,
}

/// Little-endian field access on a byte buffer.
fn get32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

impl MessageHeader {
    const CHECKSUM: usize = 0x20;
    const SEQ_NUM: usize = 0x24;
    const ELEM_COUNT: usize = 0x28;
    const PAD: usize = 0x2C;

    /// Decodes the header at the start of `b` (at least 48 bytes).
    pub fn decode(b: &[u8]) -> MessageHeader {
        MessageHeader {
            auth_tag: b[0x00..0x10].try_into().expect("16 bytes"),
            aad: b[0x10..0x20].try_into().expect("16 bytes"),
            checksum: get32(b, Self::CHECKSUM),
            seq_num: get32(b, Self::SEQ_NUM),
            elem_count: get32(b, Self::ELEM_COUNT),
            pad: get32(b, Self::PAD),
        }
    }

    /// Encodes the header into the start of `b`.
    pub fn encode_into(&self, b: &mut [u8]) {
        b[0x00..0x10].copy_from_slice(&self.auth_tag);
        b[0x10..0x20].copy_from_slice(&self.aad);
        set32(b, Self::CHECKSUM, self.checksum);
        set32(b, Self::SEQ_NUM, self.seq_num);
        set32(b, Self::ELEM_COUNT, self.elem_count);
        set32(b, Self::PAD, self.pad);
    }
}

impl RpcHeader {
    /// Decodes the RPC header of an element (bytes 48..80 of `b`).
    pub fn decode(b: &[u8]) -> RpcHeader {
        let w = |i: usize| get32(b, MESSAGE_HEADER_SIZE + 4 * i);
        RpcHeader {
            header_version: w(0),
            signature: w(1),
            length: w(2),
            function: w(3),
            rpc_result: w(4),
            rpc_result_private: w(5),
            sequence: w(6),
            spare: w(7),
        }
    }

    /// Encodes the RPC header into bytes 48..80 of `b`.
    pub fn encode_into(&self, b: &mut [u8]) {
        let words = [
            self.header_version,
            self.signature,
            self.length,
            self.function,
            self.rpc_result,
            self.rpc_result_private,
            self.sequence,
            self.spare,
        ];
        for (i, w) in words.iter().enumerate() {
            set32(b, MESSAGE_HEADER_SIZE + 4 * i, *w);
        }
    }
}

/// A verified element, owned (copied out of shared memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The message header.
    pub header: MessageHeader,
    /// The RPC header.
    pub rpc: RpcHeader,
    /// The payload (`rpc.length − 32` bytes).
    pub payload: Vec<u8>,
}

/// Slots an element with RPC length `length` occupies.
pub const fn slots_for_length(length: u32) -> u32 {
    (MESSAGE_HEADER_SIZE as u32 + length).div_ceil(SLOT_SIZE as u32)
}

/// Slots an element with a payload of `payload_len` bytes occupies.
pub const fn slots_for_payload(payload_len: usize) -> u32 {
    slots_for_length((RPC_HEADER_SIZE + payload_len) as u32)
}

/// The checksum of `bytes`: XOR of little-endian 64-bit words (last one zero-padded),
/// folded to 32 bits.
pub fn checksum(bytes: &[u8]) -> u32 {
    let sum = bytes.chunks(8).fold(0u64, |acc, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        acc ^ u64::from_le_bytes(word)
    });
    ((sum >> 32) ^ (sum & 0xFFFF_FFFF)) as u32
}

/// What a command carries besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing<'a> {
    /// Function number.
    pub function: u32,
    /// RPC sequence (matched by the reply).
    pub sequence: u32,
    /// Payload.
    pub payload: &'a [u8],
}

/// Encodes `msg` as message number `seq_num` into whole zero-padded slots, checksummed.
pub fn encode(msg: Outgoing<'_>, seq_num: u32) -> Result<Vec<u8>, ElementError> {
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(ElementError::TooLarge(msg.payload.len()));
    }
    let length = (RPC_HEADER_SIZE + msg.payload.len()) as u32;
    let slots = slots_for_length(length);
    let mut b = vec![0u8; slots as usize * SLOT_SIZE as usize];
    RpcHeader {
        header_version: RPC_HEADER_VERSION,
        signature: RPC_SIGNATURE,
        length,
        function: msg.function,
        rpc_result: RESULT_PENDING,
        rpc_result_private: RESULT_PENDING,
        sequence: msg.sequence,
        spare: 0,
    }
    .encode_into(&mut b);
    let body = MESSAGE_HEADER_SIZE + RPC_HEADER_SIZE;
    b[body..body + msg.payload.len()].copy_from_slice(msg.payload);
    let mut header = MessageHeader {
        seq_num,
        elem_count: slots,
        ..MessageHeader::default()
    };
    header.encode_into(&mut b);
    header.checksum = checksum(&b[..MESSAGE_HEADER_SIZE + length as usize]);
    header.encode_into(&mut b);
    Ok(b)
}

/// From an element's first slot: the slot count it claims, checked against its RPC
/// length and against the `available` slots the producer has published.
pub fn claimed_slots(first_slot: &[u8], available: u32) -> Result<u32, ElementError> {
    let header = MessageHeader::decode(first_slot);
    let length = RpcHeader::decode(first_slot).length;
    let possible = (RPC_HEADER_SIZE..=RPC_HEADER_SIZE + MAX_PAYLOAD).contains(&(length as usize));
    if !possible || header.elem_count != slots_for_length(length) {
        return Err(ElementError::ImpossibleLength {
            elem_count: header.elem_count,
            length,
        });
    }
    if header.elem_count > available {
        return Err(ElementError::BeyondWritePointer {
            claimed: header.elem_count,
            available,
        });
    }
    Ok(header.elem_count)
}

/// Verifies an element copied out of the ring (`bytes` holds all its slots) and takes it
/// apart.
pub fn decode(bytes: &[u8]) -> Result<Element, ElementError> {
    let slots = claimed_slots(bytes, (bytes.len() as u64 / SLOT_SIZE) as u32)?;
    debug_assert!(slots as usize * SLOT_SIZE as usize <= bytes.len());
    let rpc = RpcHeader::decode(bytes);
    let end = MESSAGE_HEADER_SIZE + rpc.length as usize;
    let residue = checksum(&bytes[..end]);
    if residue != 0 {
        return Err(ElementError::Checksum(residue));
    }
    if rpc.header_version != RPC_HEADER_VERSION || rpc.signature != RPC_SIGNATURE {
        return Err(ElementError::BadRpcHeader {
            version: rpc.header_version,
            signature: rpc.signature,
        });
    }
    Ok(Element {
        header: MessageHeader::decode(bytes),
        rpc,
        payload: bytes[MESSAGE_HEADER_SIZE + RPC_HEADER_SIZE..end].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn out(payload: &[u8]) -> Outgoing<'_> {
        Outgoing {
            function: 103,
            sequence: 77,
            payload,
        }
    }

    #[test]
    fn constants_match_the_fact_sheet() {
        assert_eq!(RPC_SIGNATURE, 0x4350_5256);
        assert_eq!(MAX_PAYLOAD, 65_456);
        assert_eq!(slots_for_payload(0), 1);
        assert_eq!(slots_for_payload(4096 - 80), 1);
        assert_eq!(slots_for_payload(4096 - 79), 2);
        assert_eq!(slots_for_payload(MAX_PAYLOAD), 16);
    }

    #[test]
    fn encoded_element_layout() {
        let b = encode(out(&[0xAA; 5]), 3).unwrap();
        assert_eq!(b.len(), 4096);
        let h = MessageHeader::decode(&b);
        assert_eq!((h.seq_num, h.elem_count, h.pad), (3, 1, 0));
        let r = RpcHeader::decode(&b);
        assert_eq!(r.header_version, 0x0300_0000);
        assert_eq!(&b[0x34..0x38], b"VRPC");
        assert_eq!((r.length, r.function, r.sequence), (37, 103, 77));
        assert_eq!((r.rpc_result, r.rpc_result_private), (u32::MAX, u32::MAX));
        assert_eq!(&b[0x50..0x55], &[0xAA; 5]);
        assert!(b[0x55..].iter().all(|&x| x == 0));
        // The whole padded slot sums to zero as well (nouveau's formulation).
        assert_eq!(checksum(&b), 0);
        assert_eq!(
            encode(out(&vec![0; MAX_PAYLOAD + 1]), 0),
            Err(ElementError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn checksum_folds_and_pads() {
        assert_eq!(checksum(&[]), 0);
        assert_eq!(checksum(&[1, 0, 0, 0, 2, 0, 0, 0]), 3);
        assert_eq!(checksum(&[1, 0, 0, 0, 2]), 3);
        assert_eq!(checksum(&[0xFF; 16]), 0);
    }

    #[test]
    fn verification_rejects_damage() {
        let good = encode(out(&[7; 3000]), 1).unwrap();
        assert!(decode(&good).is_ok());
        let mut b = good.clone();
        b[0x70] ^= 0x80;
        assert!(matches!(decode(&b), Err(ElementError::Checksum(_))));
        let mut b = good.clone();
        set32(&mut b, 0x38, 16);
        assert!(matches!(
            decode(&b),
            Err(ElementError::ImpossibleLength { .. })
        ));
        let mut b = good.clone();
        set32(&mut b, 0x38, 0x0010_0000);
        assert!(matches!(
            claimed_slots(&b, 62),
            Err(ElementError::ImpossibleLength { .. })
        ));
        let mut b = good.clone();
        set32(&mut b, 0x28, 0);
        assert!(matches!(
            claimed_slots(&b, 62),
            Err(ElementError::ImpossibleLength { .. })
        ));
        let big = encode(out(&[1; 9000]), 1).unwrap();
        assert_eq!(
            claimed_slots(&big, 2),
            Err(ElementError::BeyondWritePointer {
                claimed: 3,
                available: 2
            })
        );
        let mut b = good;
        set32(&mut b, 0x34, 0);
        set32(&mut b, 0x20, 0);
        let c = checksum(&b[..MESSAGE_HEADER_SIZE + 3032]);
        set32(&mut b, 0x20, c);
        assert!(matches!(decode(&b), Err(ElementError::BadRpcHeader { .. })));
    }

    #[test]
    fn the_emulated_gsp_codec_agrees() {
        // The emulated GSP has its own codec; both must produce and accept the same bytes.
        use gpu_emulation::gsp::wire;
        let ours = encode(out(&[9; 5000]), 12).unwrap();
        let (h, m) = wire::decode(&ours).unwrap();
        assert_eq!(
            (h.seq_num, m.function, m.sequence, m.payload.len()),
            (12, 103, 77, 5000)
        );
        let theirs =
            wire::encode(&wire::WireMessage::from_gsp(0x1001, 0, 4, vec![3; 70]), 8).unwrap();
        let e = decode(&theirs).unwrap();
        assert_eq!(
            (
                e.header.seq_num,
                e.rpc.function,
                e.rpc.rpc_result,
                e.payload
            ),
            (8, 0x1001, 0, vec![3; 70])
        );
    }

    proptest! {
        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..20_000), seq in any::<u32>(), f in any::<u32>(), s in any::<u32>()) {
            let b = encode(Outgoing { function: f, sequence: s, payload: &payload }, seq).unwrap();
            prop_assert_eq!(b.len() as u32, slots_for_payload(payload.len()) * 4096);
            let e = decode(&b).unwrap();
            prop_assert_eq!(e.header.seq_num, seq);
            prop_assert_eq!(e.rpc.function, f);
            prop_assert_eq!(e.rpc.sequence, s);
            prop_assert_eq!(e.payload, payload);
        }

        #[test]
        fn any_single_bit_flip_in_the_checked_range_is_caught(len in 0usize..6000, bit in any::<u32>()) {
            let payload = vec![0x5Au8; len];
            let mut b = encode(out(&payload), 1).unwrap();
            let checked = MESSAGE_HEADER_SIZE + RPC_HEADER_SIZE + len;
            let at = bit as usize % (checked * 8);
            b[at / 8] ^= 1 << (at % 8);
            prop_assert!(decode(&b).is_err());
        }
    }
}
