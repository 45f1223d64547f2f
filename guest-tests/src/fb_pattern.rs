//! The picture a display guest draws into `/dev/fb0`, shared by the guest program
//! `gpu-guest-fb` (which includes this file with `#[path]`, so it stays a `libc`-only program)
//! and the host harness (which compares QEMU's screenshot and searches the backend's VRAM for
//! the same pixels).
//!
//! Every pixel of a frame up to 2048x2048 is unique, so a row or column shifted, repeated or
//! misplaced shows as a mismatch, and two guests with different tags differ in every pixel:
//!
//! - red = low 8 bits of x, XOR the nonce's low byte (a horizontal gradient, 256-pixel bands);
//! - green = low 8 bits of y, XOR the nonce's high byte (a vertical gradient);
//! - blue = the tag in bits 7..6 (the guest's tint), x / 256 in bits 5..3, y / 256 in bits 2..0.
//!
//! The nonce (random per boot in the guest) tells one boot's picture from the next one's.

/// The largest width and height whose pixels are all distinct.
pub const MAX_UNIQUE: u32 = 2048;

/// Bytes per pixel of the framebuffer format the guest draws (XRGB8888).
pub const BYTES_PER_PIXEL: usize = 4;

/// One guest's picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FbPattern {
    /// The guest's identity, 0..=3 (the blue channel's top bits).
    pub tag: u8,
    /// Varies the picture between boots.
    pub nonce: u16,
}

impl FbPattern {
    /// The pattern of guest `tag` (only its two low bits count) with `nonce`.
    pub fn new(tag: u8, nonce: u16) -> FbPattern {
        FbPattern {
            tag: tag & 3,
            nonce,
        }
    }

    /// Red, green and blue of pixel (`x`, `y`).
    pub fn rgb(&self, x: u32, y: u32) -> [u8; 3] {
        let [lo, hi] = self.nonce.to_le_bytes();
        let r = (x as u8) ^ lo;
        let g = (y as u8) ^ hi;
        let b = (self.tag << 6) | ((((x >> 8) & 7) as u8) << 3) | (((y >> 8) & 7) as u8);
        [r, g, b]
    }

    /// Row `y` as the framebuffer holds it: `width` pixels of XRGB8888, little-endian (blue,
    /// green, red, then 0xFF in the unused byte).
    pub fn xrgb_row(&self, y: u32, width: u32) -> Vec<u8> {
        let mut row = Vec::with_capacity(width as usize * BYTES_PER_PIXEL);
        for x in 0..width {
            let [r, g, b] = self.rgb(x, y);
            row.extend_from_slice(&[b, g, r, 0xFF]);
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_pixel_of_a_frame_is_unique_and_tags_differ_everywhere() {
        let (w, h) = (1280u32, 800u32);
        let p = FbPattern::new(1, 0xbeef);
        let q = FbPattern::new(2, 0xbeef);
        let mut seen = HashSet::new();
        for y in 0..h {
            for x in 0..w {
                assert!(seen.insert(p.rgb(x, y)), "pixel ({x}, {y}) repeats");
                assert_ne!(p.rgb(x, y), q.rgb(x, y));
            }
        }
        // The largest unique frame too, on its last pixels.
        assert_ne!(
            p.rgb(MAX_UNIQUE - 1, MAX_UNIQUE - 1),
            p.rgb(MAX_UNIQUE - 1 - 256, MAX_UNIQUE - 1)
        );
        assert_ne!(p.rgb(5, 5), FbPattern::new(1, 0xbeee).rgb(5, 5), "nonce");
    }

    #[test]
    fn rows_are_bgrx_little_endian() {
        let p = FbPattern::new(3, 0x0102);
        let row = p.xrgb_row(300, 4);
        assert_eq!(row.len(), 16);
        let [r, g, b] = p.rgb(2, 300);
        assert_eq!(&row[8..12], &[b, g, r, 0xFF]);
        assert_eq!(p.rgb(0, 0), [0x02, 0x01, 0xC0]);
        assert_eq!(p.rgb(0x1FF, 0x101)[2], 0xC0 | (1 << 3) | 1);
        assert_eq!(FbPattern::new(7, 0).tag, 3);
    }
}
