//! A reader of binary PPM (`P6`) images, the format QEMU's `screendump` writes: a header of
//! `P6`, width, height and maximum value (whitespace-separated, `#` comments allowed), one
//! whitespace byte, then `width * height` RGB triplets of one byte each (maximum value 255).

use crate::screenshot::RgbImage;

/// Errors of reading a PPM image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PpmError {
    /// The file does not start with `P6`.
    #[error("not a binary PPM (P6) image")]
    NotP6,
    /// A header field is missing or not a number.
    #[error("PPM header field {0} is missing or not a number")]
    BadHeader(&'static str),
    /// Only one byte per channel is read.
    #[error("PPM maximum value {0} is not 255")]
    MaxValue(u32),
    /// Width or height is zero or the image would not fit in memory.
    #[error("PPM size {width}x{height} is empty or too large")]
    Size {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The pixel data is shorter than the header says.
    #[error("PPM pixel data holds {got} bytes, the header needs {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        want: usize,
    },
}

/// The largest image read: 16384 x 16384 pixels.
pub const MAX_SIDE: u32 = 16384;

/// Skip whitespace and `#` comments from `*pos`, then read a decimal number.
fn number(data: &[u8], pos: &mut usize, field: &'static str) -> Result<u32, PpmError> {
    loop {
        match data.get(*pos) {
            Some(b) if b.is_ascii_whitespace() => *pos += 1,
            Some(b'#') => {
                while data.get(*pos).is_some_and(|&b| b != b'\n') {
                    *pos += 1;
                }
            }
            _ => break,
        }
    }
    let start = *pos;
    while data.get(*pos).is_some_and(u8::is_ascii_digit) {
        *pos += 1;
    }
    std::str::from_utf8(&data[start..*pos])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(PpmError::BadHeader(field))
}

/// Parse a P6 image with maximum value 255.
pub fn parse(data: &[u8]) -> Result<RgbImage, PpmError> {
    if !data.starts_with(b"P6") {
        return Err(PpmError::NotP6);
    }
    let mut pos = 2;
    let width = number(data, &mut pos, "width")?;
    let height = number(data, &mut pos, "height")?;
    let max = number(data, &mut pos, "maximum value")?;
    if max != 255 {
        return Err(PpmError::MaxValue(max));
    }
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PpmError::Size { width, height });
    }
    // Exactly one whitespace byte separates the header from the pixels.
    if !data.get(pos).is_some_and(u8::is_ascii_whitespace) {
        return Err(PpmError::BadHeader("separator"));
    }
    pos += 1;
    let want = width as usize * height as usize * 3;
    let pixels = data.get(pos..pos + want).ok_or(PpmError::Truncated {
        got: data.len() - pos,
        want,
    })?;
    RgbImage::new(width, height, pixels.to_vec()).ok_or(PpmError::Size { width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_qemu_writes_and_comments() {
        let mut data = b"P6\n# made by hand\n2 1\n255\n".to_vec();
        data.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let img = parse(&data).unwrap();
        assert_eq!((img.width(), img.height()), (2, 1));
        assert_eq!(img.pixel(1, 0), Some([4, 5, 6]));
        assert_eq!(img.pixel(2, 0), None);
    }

    #[test]
    fn refuses_bad_images_without_panicking() {
        assert_eq!(parse(b"P5\n1 1\n255\n\0"), Err(PpmError::NotP6));
        assert_eq!(parse(b"P6\n1"), Err(PpmError::BadHeader("height")));
        assert_eq!(parse(b"P6 1 1 65535\n\0\0"), Err(PpmError::MaxValue(65535)));
        assert_eq!(
            parse(b"P6 0 1 255\n"),
            Err(PpmError::Size {
                width: 0,
                height: 1
            })
        );
        assert_eq!(
            parse(b"P6 99999999999 1 255\n"),
            Err(PpmError::BadHeader("width"))
        );
        assert_eq!(
            parse(b"P6 2 2 255\n\0\0\0"),
            Err(PpmError::Truncated { got: 3, want: 12 })
        );
        assert_eq!(parse(b"P6 1 1 255"), Err(PpmError::BadHeader("separator")));
    }
}
