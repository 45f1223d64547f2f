//! A guest's screen as the host sees it: QEMU's `screendump` read into an [`RgbImage`],
//! compared pixel by pixel with what the guest drew ([`RgbImage::compare`]), and saved as PNG
//! for people to look at ([`RgbImage::write_png`]).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::fb_pattern::FbPattern;
use crate::ppm::{self, PpmError};

/// Errors of reading or writing a screenshot.
#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    /// Reading or creating the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a PPM image the reader accepts.
    #[error("{path}: {source}")]
    Ppm {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: PpmError,
    },
    /// Encoding the PNG failed.
    #[error("writing PNG {path}: {source}")]
    Png {
        /// The file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: png::EncodingError,
    },
}

/// An 8-bit RGB image, rows top to bottom, no padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

/// Where a screenshot first differs from the expected picture, and how much of it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Column of the first differing pixel (rows scanned top to bottom).
    pub x: u32,
    /// Its row.
    pub y: u32,
    /// What the screenshot shows there.
    pub got: [u8; 3],
    /// What was drawn there.
    pub want: [u8; 3],
    /// How many pixels differ in all.
    pub count: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |c: [u8; 3]| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        write!(
            f,
            "{} pixels differ; the first at (x={}, y={}): got {}, want {}",
            self.count,
            self.x,
            self.y,
            hex(self.got),
            hex(self.want)
        )
    }
}

impl RgbImage {
    /// An image of `width` x `height` from `rgb` (3 bytes per pixel); `None` if the length
    /// does not match.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Option<RgbImage> {
        let len = (width as usize)
            .checked_mul(height as usize)?
            .checked_mul(3)?;
        (rgb.len() == len).then_some(RgbImage { width, height, rgb })
    }

    /// The picture `pattern` draws on a `width` x `height` screen.
    pub fn from_pattern(pattern: &FbPattern, width: u32, height: u32) -> RgbImage {
        let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&pattern.rgb(x, y));
            }
        }
        RgbImage { width, height, rgb }
    }

    /// Read a PPM file (what QEMU's `screendump` writes).
    pub fn read_ppm(path: &Path) -> Result<RgbImage, ScreenshotError> {
        let data = std::fs::read(path).map_err(|source| ScreenshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ppm::parse(&data).map_err(|source| ScreenshotError::Ppm {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixel at (`x`, `y`), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]])
    }

    /// Compare every pixel with `want(x, y)`: `None` if all are equal, else the first
    /// difference (top to bottom, left to right) and the number of differing pixels.
    pub fn compare(&self, want: impl Fn(u32, u32) -> [u8; 3]) -> Option<Mismatch> {
        let mut first: Option<Mismatch> = None;
        let mut count = 0;
        for (i, got) in self.rgb.chunks_exact(3).enumerate() {
            let (x, y) = (
                (i % self.width as usize) as u32,
                (i / self.width as usize) as u32,
            );
            let want = want(x, y);
            if got != want {
                count += 1;
                if first.is_none() {
                    first = Some(Mismatch {
                        x,
                        y,
                        got: [got[0], got[1], got[2]],
                        want,
                        count: 0,
                    });
                }
            }
        }
        first.map(|m| Mismatch { count, ..m })
    }

    /// How many pixels equal `want(x, y)`.
    pub fn count_equal(&self, want: impl Fn(u32, u32) -> [u8; 3]) -> u64 {
        let total = u64::from(self.width) * u64::from(self.height);
        total - self.compare(want).map_or(0, |m| m.count)
    }

    /// Save as an 8-bit RGB PNG.
    pub fn write_png(&self, path: &Path) -> Result<(), ScreenshotError> {
        let png_err = |source| ScreenshotError::Png {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(|source| ScreenshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut enc = png::Encoder::new(BufWriter::new(file), self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&self.rgb).map_err(png_err)?;
        writer.finish().map_err(png_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_the_first_mismatch_and_the_count() {
        let p = FbPattern::new(1, 7);
        let img = RgbImage::from_pattern(&p, 16, 8);
        assert_eq!(img.compare(|x, y| p.rgb(x, y)), None);
        let mut bad = img.clone();
        // Row 5 replaced by row 4: a misplaced row.
        let row = 16 * 3;
        let (r4, r5) = (4 * row, 5 * row);
        bad.rgb.copy_within(r4..r4 + row, r5);
        let m = bad.compare(|x, y| p.rgb(x, y)).unwrap();
        assert_eq!((m.x, m.y, m.count), (0, 5, 16));
        assert_eq!(m.got, p.rgb(0, 4));
        assert_eq!(m.want, p.rgb(0, 5));
        assert!(m.to_string().contains("(x=0, y=5)"), "{m}");
        let other = FbPattern::new(2, 7);
        assert_eq!(img.count_equal(|x, y| other.rgb(x, y)), 0);
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_none());
        assert!(RgbImage::new(u32::MAX, u32::MAX, Vec::new()).is_none());
    }

    #[test]
    fn png_round_trips_through_the_decoder() {
        let p = FbPattern::new(3, 0x1234);
        let img = RgbImage::from_pattern(&p, 40, 30);
        let path = std::env::temp_dir().join(format!("screenshot-test-{}.png", std::process::id()));
        img.write_png(&path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (40, 30));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &img.rgb[..]);
        std::fs::remove_file(path).unwrap();
    }
}
