//! Pixel conversion for the display channel: QEMU's vhost-user-gpu shows scanout updates
//! and cursor images as `PIXMAN_x8r8g8b8` / `PIXMAN_a8r8g8b8`, which on a little-endian
//! host are the bytes B, G, R, X/A in memory, the virtio format `B8G8R8X8`/`B8G8R8A8`.
//! Resources in another of the 2D formats are converted on the way out.

use super::gpu::resources::Format;

/// Where blue, green, red and alpha (`None`: an X byte, shown opaque) sit in a pixel of
/// `format`. The virtio format names list the bytes in memory order.
fn layout(format: Format) -> ([usize; 3], Option<usize>) {
    match format {
        Format::B8G8R8A8 => ([0, 1, 2], Some(3)),
        Format::B8G8R8X8 => ([0, 1, 2], None),
        Format::A8R8G8B8 => ([3, 2, 1], Some(0)),
        Format::X8R8G8B8 => ([3, 2, 1], None),
        Format::R8G8B8A8 => ([2, 1, 0], Some(3)),
        Format::R8G8B8X8 => ([2, 1, 0], None),
        Format::A8B8G8R8 => ([1, 2, 3], Some(0)),
        Format::X8B8G8R8 => ([1, 2, 3], None),
    }
}

/// Rewrites `pixels` (4 bytes each, in `format`) in place as B, G, R, A bytes: what QEMU
/// expects. B8G8R8X8 and B8G8R8A8, the formats the Linux driver uses, are left as they are.
/// A trailing partial pixel is left alone.
pub fn to_bgra(format: Format, pixels: &mut [u8]) {
    let ([b, g, r], a) = layout(format);
    if [b, g, r] == [0, 1, 2] {
        return;
    }
    for px in pixels.chunks_exact_mut(4) {
        let alpha = a.map_or(0xff, |i| px[i]);
        let out = [px[b], px[g], px[r], alpha];
        px.copy_from_slice(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_becomes_bgra() {
        // Pure red with alpha 0x80 (or an X byte of 0x11), written in each format.
        let cases: [(Format, [u8; 4], [u8; 4]); 8] = [
            (Format::B8G8R8A8, [0, 0, 0xff, 0x80], [0, 0, 0xff, 0x80]),
            (Format::B8G8R8X8, [0, 0, 0xff, 0x11], [0, 0, 0xff, 0x11]),
            (Format::A8R8G8B8, [0x80, 0xff, 0, 0], [0, 0, 0xff, 0x80]),
            (Format::X8R8G8B8, [0x11, 0xff, 0, 0], [0, 0, 0xff, 0xff]),
            (Format::R8G8B8A8, [0xff, 0, 0, 0x80], [0, 0, 0xff, 0x80]),
            (Format::R8G8B8X8, [0xff, 0, 0, 0x11], [0, 0, 0xff, 0xff]),
            (Format::A8B8G8R8, [0x80, 0, 0, 0xff], [0, 0, 0xff, 0x80]),
            (Format::X8B8G8R8, [0x11, 0, 0, 0xff], [0, 0, 0xff, 0xff]),
        ];
        for (format, input, want) in cases {
            let mut px = [input, input].concat();
            px.push(7); // a partial pixel stays as it is
            to_bgra(format, &mut px);
            assert_eq!(&px[..4], &want, "{format:?}");
            assert_eq!(&px[4..8], &want, "{format:?}");
            assert_eq!(px[8], 7);
        }
    }
}
