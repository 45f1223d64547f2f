//! A seeded xorshift64* generator (deterministic, no dependency) and the data pattern the
//! well-behaved guest writes and checks.

/// SplitMix64's finaliser: a good 64-bit mix of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64* (Vigna): small, fast, and plenty for choosing test actions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix64(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// An index drawn with the given weights (which must not all be 0).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut at = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if at < u64::from(w) {
                return i;
            }
            at -= u64::from(w);
        }
        weights.len() - 1
    }

    /// Random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }
}

/// The bytes of the pattern `seed` at addresses `[at, at + buf.len())`: byte `a` is byte
/// `a % 8` of `splitmix64(seed ^ a / 8)`, so any range can be produced and checked alone.
pub fn pattern(seed: u64, at: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let addr = at + i as u64;
        let word = splitmix64(seed ^ (addr / 8)).to_le_bytes();
        let from = (addr % 8) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[from..from + n]);
        i += n;
    }
}

/// The first address in `[at, at + data.len())` where `data` differs from the pattern.
pub fn pattern_mismatch(seed: u64, at: u64, data: &[u8]) -> Option<u64> {
    let mut expected = [0u8; 4096];
    for (n, chunk) in data.chunks(expected.len()).enumerate() {
        let start = at + (n * expected.len()) as u64;
        let want = &mut expected[..chunk.len()];
        pattern(seed, start, want);
        if let Some(i) = chunk.iter().zip(want.iter()).position(|(a, b)| a != b) {
            return Some(start + i as u64);
        }
    }
    None
}

#[test]
fn pattern_pieces_match_the_whole() {
    let mut whole = [0u8; 64];
    pattern(7, 3, &mut whole);
    let mut piece = [0u8; 13];
    pattern(7, 3 + 21, &mut piece);
    assert_eq!(&whole[21..34], &piece);
    assert_eq!(pattern_mismatch(7, 3, &whole), None);
    whole[40] ^= 1;
    assert_eq!(pattern_mismatch(7, 3, &whole), Some(43));
}
