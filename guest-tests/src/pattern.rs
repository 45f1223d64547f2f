//! The data patterns the guest probe writes into VRAM, shared by the probe (which includes this
//! file with `#[path]`, so it stays a `libc`-only program) and the host harness (which checks
//! the same bytes in host VRAM).
//!
//! A pattern is a sequence of little-endian 32-bit words from a splitmix64 sequence of a seed.
//! [`vram_word`] ties a word to its guest VRAM address, so any range written by the guest can be
//! checked from the host knowing only the seed and the range.

/// Word `index` of the pattern of `seed`. The index is mixed in so that shifted copies do not
/// match.
pub fn pattern_word(seed: u64, index: u64) -> u32 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index.wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// The word of `seed` belonging at guest VRAM address `guest_addr` (rounded down to 4 bytes).
/// Never 0 and never all-ones, so it can be told apart from untouched VRAM and from the 0xFF
/// bytes of a dropped access.
pub fn vram_word(seed: u64, guest_addr: u64) -> u32 {
    neither_zero_nor_ones(pattern_word(seed, guest_addr / 4))
}

/// `w` with bit 0 set, and all-ones made `0x7fff_ffff`: a word no dropped or refused access
/// can be mistaken for.
fn neither_zero_nor_ones(w: u32) -> u32 {
    match w | 1 {
        u32::MAX => 0x7fff_ffff,
        w => w,
    }
}

/// The little-endian bytes of `word` for guest VRAM `[guest_addr, guest_addr + len)`.
fn words_to_bytes(guest_addr: u64, len: usize, word: impl Fn(u64) -> u32) -> Vec<u8> {
    (0..len as u64 / 4)
        .flat_map(|i| word(guest_addr + 4 * i).to_le_bytes())
        .collect()
}

/// The bytes of `seed`'s pattern for guest VRAM `[guest_addr, guest_addr + len)`; `guest_addr`
/// and `len` multiples of 4.
pub fn vram_bytes(seed: u64, guest_addr: u64, len: usize) -> Vec<u8> {
    words_to_bytes(guest_addr, len, |a| vram_word(seed, a))
}

/// The soak's word of `seed` at guest VRAM address `guest_addr` (rounded down to 4 bytes): a
/// multiplicative hash of the word index xor the seed's low half, cheap enough for a TCG guest
/// to fill and check a whole VRAM BAR with in a second. Like [`vram_word`], never 0 and never
/// all-ones. Two seeds whose folded halves (`seed ^ seed >> 32`, low 32 bits) differ in
/// some bit from 1 to 30 give different words at every address below 16 GiB.
pub fn soak_word(seed: u64, guest_addr: u64) -> u32 {
    let index = (guest_addr / 4) as u32;
    neither_zero_nor_ones(index.wrapping_mul(0x9e37_79b1) ^ (seed as u32) ^ ((seed >> 32) as u32))
}

/// The bytes of `seed`'s soak pattern for guest VRAM `[guest_addr, guest_addr + len)`;
/// `guest_addr` and `len` multiples of 4.
pub fn soak_bytes(seed: u64, guest_addr: u64, len: usize) -> Vec<u8> {
    words_to_bytes(guest_addr, len, |a| soak_word(seed, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_depend_on_seed_and_address() {
        // Pinned: the probe and the harness must agree on these forever.
        assert_eq!(pattern_word(1, 0), pattern_word(1, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(1, 1));
        assert_eq!(vram_word(7, 0x1003), vram_word(7, 0x1000));
        assert_ne!(vram_word(7, 0x1000), vram_word(7, 0x1004));
        let b = vram_bytes(7, 0x1000, 8);
        assert_eq!(b[..4], vram_word(7, 0x1000).to_le_bytes());
        assert_eq!(b[4..], vram_word(7, 0x1004).to_le_bytes());
        assert!((0..4096).all(|a| {
            let w = vram_word(3, 4 * a);
            w != 0 && w != u32::MAX
        }));
    }

    #[test]
    fn soak_words_depend_on_seed_and_address() {
        assert_eq!(soak_word(5, 0x1002), soak_word(5, 0x1000));
        assert_ne!(soak_word(5, 0x1000), soak_word(5, 0x1004));
        let (a, b) = (0x1234_5678_0000_0001, 0x1234_5678_0000_0003);
        assert!((0..4096u64).all(|i| soak_word(a, 4 * i) != soak_word(b, 4 * i)));
        assert!((0..4096u64).all(|i| {
            let w = soak_word(9, 4 * i);
            w != 0 && w != u32::MAX
        }));
        assert_eq!(soak_bytes(9, 8, 4), soak_word(9, 8).to_le_bytes());
    }
}
