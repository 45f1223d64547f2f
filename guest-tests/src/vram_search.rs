//! Finding byte strings (a guest's framebuffer rows) anywhere in a backend's host VRAM: every
//! range that holds data ([`HostVram::data_ranges`]) is scanned, at every byte offset, so a
//! copy is found wherever and however aligned it lies.
//!
//! The scan reads VRAM one aligned 8-byte word at a time: a needle of at least 16 bytes holds
//! one whole aligned word of any copy of it, and which of its 8 possible words that is depends
//! on the copy's alignment. A word that is one of those (a 64 Ki-bit filter, then an exact
//! table) names the candidate start, which is then compared in full.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::Result;
use crate::host_vram::HostVram;

/// The shortest needle searched.
pub const MIN_NEEDLE: usize = 16;
/// Bytes read from VRAM at a time.
const BLOCK: usize = 8 << 20;

/// A needle found at a host VRAM address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    /// Index of the needle.
    pub needle: usize,
    /// Host VRAM address of its first byte.
    pub addr: u64,
}

/// The aligned words of the needles' copies: word value -> (needle, offset of the word in the
/// needle).
struct WordTable {
    filter: Vec<u64>,
    words: HashMap<u64, Vec<(usize, usize)>>,
}

/// The little-endian word of the first 8 bytes of `bytes` (at least 8 long).
fn word_at(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

fn filter_bit(word: u64) -> usize {
    (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as usize
}

impl WordTable {
    /// The table of the needles at least [`MIN_NEEDLE`] bytes long.
    fn new(needles: &[Vec<u8>]) -> WordTable {
        let mut t = WordTable {
            filter: vec![0; (1 << 16) / 64],
            words: HashMap::new(),
        };
        for (i, n) in needles.iter().enumerate() {
            if n.len() < MIN_NEEDLE {
                continue;
            }
            for k in 0..8 {
                let w = word_at(&n[k..]);
                let bit = filter_bit(w);
                t.filter[bit / 64] |= 1 << (bit % 64);
                t.words.entry(w).or_default().push((i, k));
            }
        }
        t
    }

    fn candidates(&self, word: u64) -> Option<&Vec<(usize, usize)>> {
        let bit = filter_bit(word);
        if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
            return None;
        }
        self.words.get(&word)
    }
}

/// Every place in `vram` where one of `needles` (each at least [`MIN_NEEDLE`] bytes; shorter
/// ones are never found) lies, sorted by needle and address.
pub fn find_all(vram: &HostVram, needles: &[Vec<u8>]) -> Result<Vec<Hit>> {
    find_in(vram, &vram.data_ranges()?, needles)
}

/// [`find_all`] within `ranges` of host VRAM only.
pub fn find_in(vram: &HostVram, ranges: &[Range<u64>], needles: &[Vec<u8>]) -> Result<Vec<Hit>> {
    let table = WordTable::new(needles);
    let mut hits = Vec::new();
    for r in ranges {
        // Whole aligned words inside the range.
        let mut at = r.start.next_multiple_of(8);
        while at + 8 <= r.end {
            let len = ((r.end - at) as usize).min(BLOCK) & !7;
            let block = vram.read(at, len)?;
            for (j, chunk) in block.chunks_exact(8).enumerate() {
                let word = word_at(chunk);
                let Some(cands) = table.candidates(word) else {
                    continue;
                };
                let word_addr = at + 8 * j as u64;
                for &(needle, k) in cands {
                    let n = &needles[needle];
                    let Some(start) = word_addr.checked_sub(k as u64) else {
                        continue;
                    };
                    if start + n.len() as u64 > vram.size() {
                        continue;
                    }
                    if vram.read(start, n.len())? == *n {
                        hits.push(Hit {
                            needle,
                            addr: start,
                        });
                    }
                }
            }
            at += len as u64;
        }
    }
    hits.sort();
    hits.dedup();
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_copies_at_any_alignment_and_nothing_else() {
        let path = std::env::temp_dir().join(format!("vram-search-test-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        let vram = HostVram::open_path(path.clone()).unwrap();
        let a: Vec<u8> = (0..100u32).map(|i| (i * 7 + 3) as u8).collect();
        let b: Vec<u8> = (0..40u32).map(|i| (i * 13 + 1) as u8).collect();
        // a at three alignments (one across a block boundary), b once, a prefix of a that is
        // not a whole copy, and a too-short needle.
        for addr in [0x1003u64, 0x20_0000, (8 << 20) - 37] {
            vram.write(addr, &a).unwrap();
        }
        vram.write(0x3F0_0001, &b).unwrap();
        vram.write(0x300_0000, &a[..50]).unwrap();
        let hits = find_all(&vram, &[a.clone(), b.clone(), vec![1, 2, 3]]).unwrap();
        let want = [
            Hit {
                needle: 0,
                addr: 0x1003,
            },
            Hit {
                needle: 0,
                addr: 0x20_0000,
            },
            Hit {
                needle: 0,
                addr: (8 << 20) - 37,
            },
            Hit {
                needle: 1,
                addr: 0x3F0_0001,
            },
        ];
        assert_eq!(hits, want);
        let ranges = vram.data_ranges().unwrap();
        assert!(ranges.len() >= 4, "{ranges:x?}");
        assert!(
            ranges.iter().all(|r| r.end - r.start < 1 << 20),
            "sparse: {ranges:x?}"
        );
        let first_mib = vec![0..0x10_0000u64, 0x10_0000..0x10_0000];
        assert_eq!(find_in(&vram, &first_mib, &[a]).unwrap().len(), 1);
        std::fs::remove_file(path).unwrap();
    }
}
