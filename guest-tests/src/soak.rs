//! The host side of the probe's soak (`gpuprobe.soak=1`, the probe's `soak` module): its
//! console lines parsed ([`SoakReport`]), what a guest's slice must hold once its write rounds
//! are done ([`SoakLayout::kept_word`]) checked byte for byte in host VRAM
//! ([`check_slice`]), and the ghost pattern a removed guest writes ([`ghost_needles`]), which
//! must be found nowhere in host VRAM.

use std::ops::Range;

use crate::error::Result;
use crate::host_vram::HostVram;
use crate::isolation::{nonzero_outside, Canary};
use crate::pattern::{soak_bytes, soak_word};
use crate::report::{Fact, ProbeReport};

/// Bytes of host VRAM compared at a time.
const BLOCK: usize = 1 << 20;
/// Length of each ghost needle (what [`crate::vram_search`] looks for).
pub const GHOST_NEEDLE: usize = 64;

/// `GPUPROBE soak_start`: where the soak writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoakLayout {
    /// Bytes of guest VRAM filled.
    pub slice_size: u64,
    /// The soak seed.
    pub seed: u64,
    /// Guest VRAM addresses of the aperture chunks.
    pub chunks: Vec<u64>,
    /// Bytes of each aperture chunk.
    pub chunk_len: u64,
}

/// `GPUPROBE soak_kept`: the round whose pattern stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoakKept {
    /// Write rounds done.
    pub rounds: u64,
    /// Seed of the pattern written through the VRAM BARs.
    pub bar_seed: u64,
    /// Seed of the chunks written through the aperture.
    pub aperture_seed: u64,
}

/// A write or verify round: its number and its mismatches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoakRound {
    /// Round number.
    pub n: u64,
    /// Words that did not read back.
    pub bad: u64,
    /// The first of them (`-`: none).
    pub first_bad: String,
    /// How long the round took, in ms.
    pub ms: u64,
    /// A verify round the device went away during (its mismatches do not count).
    pub interrupted: bool,
}

/// `GPUPROBE soak_lost`: what the guest saw once its device was gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoakLost {
    /// Verify rounds done before.
    pub n: u64,
    /// What BOOT_0 read.
    pub boot0: u64,
    /// What the aperture read (`0x..` or `error:..`).
    pub aperture: String,
    /// What the first VRAM BAR word read.
    pub bar_word0: String,
    /// Seed of the ghost pattern.
    pub ghost_seed: u64,
    /// Ghost bytes written through the VRAM BAR from guest address 0.
    pub ghost_bar_bytes: u64,
    /// Ghost bytes written through the aperture at the first chunk.
    pub ghost_aperture_bytes: u64,
    /// The first VRAM BAR word read after the ghost writes.
    pub ghost_read_back: String,
}

/// Everything a soak printed so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoakReport {
    /// Its layout, once started.
    pub layout: Option<SoakLayout>,
    /// The write rounds.
    pub rounds: Vec<SoakRound>,
    /// What stays, once the write rounds are done.
    pub kept: Option<SoakKept>,
    /// The verify rounds.
    pub verifies: Vec<SoakRound>,
    /// The device lost, if it was.
    pub lost: Option<SoakLost>,
}

fn round(f: &Fact) -> Option<SoakRound> {
    Some(SoakRound {
        n: f.num("n")?,
        bad: f.num("bad")?,
        first_bad: f.get("first_bad").unwrap_or("-").to_string(),
        ms: f.num("ms")?,
        interrupted: f.num("interrupted") == Some(1),
    })
}

impl SoakReport {
    /// The soak lines of `report`.
    pub fn parse(report: &ProbeReport) -> SoakReport {
        let layout = report.facts_of("soak_start").find_map(|f| {
            Some(SoakLayout {
                slice_size: f.num("slice_size")?,
                seed: f.num("seed")?,
                chunks: f
                    .get("chunks")?
                    .split(',')
                    .map(crate::report::parse_u64)
                    .collect::<Option<Vec<u64>>>()?,
                chunk_len: f.num("chunk_len")?,
            })
        });
        let kept = report.facts_of("soak_kept").find_map(|f| {
            Some(SoakKept {
                rounds: f.num("rounds")?,
                bar_seed: f.num("bar_seed")?,
                aperture_seed: f.num("aperture_seed")?,
            })
        });
        let lost = report.facts_of("soak_lost").find_map(|f| {
            let text = |k: &str| f.get(k).unwrap_or_default().to_string();
            Some(SoakLost {
                n: f.num("n")?,
                boot0: f.num("boot0")?,
                aperture: text("aperture"),
                bar_word0: text("bar_word0"),
                ghost_seed: f.num("ghost_seed")?,
                ghost_bar_bytes: f.num("ghost_bar_bytes")?,
                ghost_aperture_bytes: f.num("ghost_aperture_bytes")?,
                ghost_read_back: text("ghost_read_back"),
            })
        });
        SoakReport {
            layout,
            rounds: report.facts_of("soak_round").filter_map(round).collect(),
            kept,
            verifies: report.facts_of("soak_verify").filter_map(round).collect(),
            lost,
        }
    }

    /// Verify rounds that found every word.
    pub fn clean_verifies(&self) -> usize {
        self.verifies.iter().filter(|r| r.bad == 0).count()
    }

    /// Verify rounds that missed words while the device was there (what must never happen).
    pub fn failed_verifies(&self) -> Vec<&SoakRound> {
        self.verifies
            .iter()
            .filter(|r| r.bad > 0 && !r.interrupted)
            .collect()
    }
}

impl SoakLayout {
    /// The word at guest address `g` once the round of `kept` is done (what the probe's
    /// verify rounds expect).
    pub fn kept_word(&self, kept: &SoakKept, g: u64) -> u32 {
        let in_chunk = self
            .chunks
            .iter()
            .any(|&c| (c..c + self.chunk_len).contains(&g));
        soak_word(
            if in_chunk {
                kept.aperture_seed
            } else {
                kept.bar_seed
            },
            g,
        )
    }
}

/// How a slice compares with what the soak left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceCheck {
    /// Bytes compared.
    pub bytes: u64,
    /// 4-byte words that differ.
    pub bad_words: u64,
    /// The first few differences: (guest address, found, expected).
    pub first: Vec<(u64, u32, u32)>,
}

impl SliceCheck {
    /// Whether every word is what the soak left.
    pub fn matches(&self) -> bool {
        self.bad_words == 0 && self.bytes > 0
    }
}

/// Compare the guest's slice at host VRAM `slice_start` (its guest address 0) with what the
/// soak of `layout` left after `kept`'s round, word by word.
pub fn check_slice(
    vram: &HostVram,
    slice_start: u64,
    layout: &SoakLayout,
    kept: &SoakKept,
) -> Result<SliceCheck> {
    let mut c = SliceCheck {
        bytes: 0,
        bad_words: 0,
        first: Vec::new(),
    };
    let mut g = 0;
    while g < layout.slice_size {
        let n = (layout.slice_size - g).min(BLOCK as u64);
        let block = vram.read(slice_start + g, n as usize)?;
        for (i, w) in block.chunks_exact(4).enumerate() {
            let a = g + 4 * i as u64;
            let got = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let want = layout.kept_word(kept, a);
            if got != want {
                c.bad_words += 1;
                if c.first.len() < 4 {
                    c.first.push((a, got, want));
                }
            }
        }
        c.bytes += n;
        g += n;
    }
    Ok(c)
}

/// Needles of the ghost pattern `lost` wrote (through the VRAM BAR from guest address 0 and
/// through the aperture at the first chunk of `layout`), [`GHOST_NEEDLE`] bytes each: the
/// first, middle and last of the BAR's and the first of the aperture's.
pub fn ghost_needles(lost: &SoakLost, layout: &SoakLayout) -> Vec<Vec<u8>> {
    let n = GHOST_NEEDLE as u64;
    let mut at = Vec::new();
    if lost.ghost_bar_bytes >= n {
        let last = (lost.ghost_bar_bytes - n) & !3;
        at.extend([0, (lost.ghost_bar_bytes / 2) & !3, last]);
    }
    if let (Some(&chunk), true) = (layout.chunks.first(), lost.ghost_aperture_bytes >= n) {
        at.push(chunk);
    }
    at.dedup();
    at.into_iter()
        .map(|g| soak_bytes(lost.ghost_seed, g, GHOST_NEEDLE))
        .collect()
}

/// What is wrong outside the guests' slices: every canary of `canaries` must hold its bytes,
/// and every range of `zero` nothing but zeros and canaries. One line per problem (empty:
/// all is well).
pub fn check_outside(
    vram: &HostVram,
    canaries: &[Canary],
    zero: &[(String, Range<u64>)],
) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for c in canaries {
        let now = vram.read(c.offset, c.bytes.len())?;
        if now != c.bytes {
            bad.push(format!("canary {} at {:#x} changed", c.name, c.offset));
        }
    }
    let allowed: Vec<Range<u64>> = canaries
        .iter()
        .map(|c| c.offset..c.offset + c.bytes.len() as u64)
        .collect();
    for (what, range) in zero {
        let (count, first) = nonzero_outside(vram, range.clone(), &allowed)?;
        if count > 0 {
            bad.push(format!(
                "{what} [{:#x}, {:#x}): {count} nonzero bytes, first at {first:#x?}",
                range.start, range.end
            ));
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERIAL: &str = "\
GPUPROBE soak_start slice_size=4194304 seed=0x50a4 write_s=1 chunks=0x2000,0x202000 chunk_len=4096
GPUPROBE soak_round n=0 bar_seed=0xb0050a4 aperture_seed=0x1050a0 bad=0 first_bad=- ms=812
GPUPROBE soak_kept rounds=1 bar_seed=0xb0050a4 aperture_seed=0x1050a0
GPUPROBE check name=soak_write result=pass detail=rounds=1 bad=0 seconds=1
GPUPROBE soak_verify n=0 bad=0 first_bad=- boot0=0x162000a1 ms=300
GPUPROBE soak_verify n=1 bad=2 first_bad=bar@0x10:got=0x0/want=0x5 boot0=0x162000a1 ms=310
GPUPROBE soak_verify n=2 bad=9 first_bad=bar@0x0:got=0x0/want=0x5 boot0=0x162000a1 ms=310 interrupted=1
GPUPROBE soak_lost n=3 boot0=0xffffffff aperture=0xffffffff bar_word0=0x0 ghost_seed=0x60000006800a0ac ghost_bar_bytes=65536 ghost_aperture_bytes=256 ghost_read_back=0x6b
";

    #[test]
    fn parses_the_soak_lines() {
        let s = SoakReport::parse(&ProbeReport::parse(SERIAL));
        let layout = s.layout.clone().unwrap();
        assert_eq!(layout.chunks, [0x2000, 0x20_2000]);
        assert_eq!((layout.slice_size, layout.chunk_len), (4 << 20, 4096));
        assert_eq!(s.rounds.len(), 1);
        let kept = s.kept.unwrap();
        assert_eq!((kept.rounds, kept.bar_seed), (1, 0xb00_50a4));
        assert_eq!(s.verifies.len(), 3);
        assert_eq!(s.clean_verifies(), 1);
        assert_eq!(
            s.failed_verifies().len(),
            1,
            "the interrupted round does not count"
        );
        assert!(s.verifies[2].interrupted);
        assert_eq!(s.verifies[1].first_bad, "bar@0x10:got=0x0/want=0x5");
        let lost = s.lost.clone().unwrap();
        assert_eq!((lost.n, lost.boot0), (3, 0xffff_ffff));
        assert_eq!(lost.aperture, "0xffffffff");
        assert_eq!(
            layout.kept_word(&kept, 0x2000),
            soak_word(kept.aperture_seed, 0x2000)
        );
        assert_eq!(
            layout.kept_word(&kept, 0x3000),
            soak_word(kept.bar_seed, 0x3000)
        );
        let needles = ghost_needles(&lost, &layout);
        assert_eq!(needles.len(), 4);
        assert_eq!(needles[0], soak_bytes(lost.ghost_seed, 0, GHOST_NEEDLE));
        assert_eq!(
            needles[3],
            soak_bytes(lost.ghost_seed, 0x2000, GHOST_NEEDLE)
        );
    }

    #[test]
    fn checks_a_slice_word_by_word() {
        let path = std::env::temp_dir().join(format!("soak-slice-{}", std::process::id()));
        let layout = SoakLayout {
            slice_size: 2 << 20,
            seed: 1,
            chunks: vec![0x2000],
            chunk_len: 4096,
        };
        let kept = SoakKept {
            rounds: 1,
            bar_seed: 0x10,
            aperture_seed: 0x20,
        };
        // The slice at host 1 MiB of a 4 MiB file.
        let mut bytes = vec![0u8; 4 << 20];
        for g in (0..layout.slice_size).step_by(4) {
            let at = (1 << 20) + g as usize;
            bytes[at..at + 4].copy_from_slice(&layout.kept_word(&kept, g).to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let vram = HostVram::open_path(path.clone()).unwrap();
        let c = check_slice(&vram, 1 << 20, &layout, &kept).unwrap();
        assert!(c.matches(), "{c:?}");
        vram.write((1 << 20) + 0x2004, &[0, 0, 0, 0]).unwrap();
        let c = check_slice(&vram, 1 << 20, &layout, &kept).unwrap();
        assert_eq!((c.bad_words, c.first[0].0), (1, 0x2004));
        let shifted = check_slice(&vram, 0, &layout, &kept).unwrap();
        assert!(shifted.bad_words > 1000);
        std::fs::remove_file(path).unwrap();
    }
}
