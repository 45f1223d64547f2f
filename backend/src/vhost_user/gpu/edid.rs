//! A generated EDID for an output that has none from the display side: a 128-byte EDID 1.4
//! base block (VESA E-EDID, release A rev. 2) whose preferred mode is the output's size at
//! 60 Hz. GET_EDID (per the virtio 1.2 spec, section 5.7.6.8, "VIRTIO_GPU_CMD_GET_EDID")
//! answers with it when the transport passed no blob.
//!
//! The blanking figures are simple reduced-blanking-like values, not a CVT computation: a
//! virtual display only needs the active size to reach the guest's mode list.

/// Size of the base block.
pub const EDID_BLOCK: usize = 128;
/// Horizontal blanking, front porch and sync width, in pixels.
const H_BLANK: u32 = 160;
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
/// Vertical blanking, front porch and sync width, in lines.
const V_BLANK: u32 = 30;
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 6;
/// Refresh rate of the preferred mode.
const REFRESH_HZ: u64 = 60;
/// Largest active size a detailed timing descriptor holds (12 bits).
const MAX_ACTIVE: u32 = 4095;

/// The base block for a `width` x `height` output, or `None` if the mode does not fit a
/// detailed timing descriptor (a side over 4095 pixels or a pixel clock over 655.35 MHz).
pub fn generate(width: u32, height: u32) -> Option<Vec<u8>> {
    if width == 0 || height == 0 || width > MAX_ACTIVE || height > MAX_ACTIVE {
        return None;
    }
    let total = u64::from(width + H_BLANK) * u64::from(height + V_BLANK);
    let clock_10khz = u16::try_from(total * REFRESH_HZ / 10_000).ok()?;
    // Image size at about 96 dpi.
    let (w_mm, h_mm) = (width * 254 / 960, height * 254 / 960);

    let mut e = vec![0u8; EDID_BLOCK];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "GPB", 5-bit letters, big-endian.
    let id = [b'G', b'P', b'B']
        .iter()
        .fold(0u16, |acc, c| (acc << 5) | u16::from(c - b'A' + 1));
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[17] = 36; // model year 2026
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0x80; // digital input
    e[21] = u8::try_from(w_mm.div_ceil(10)).unwrap_or(u8::MAX); // cm
    e[22] = u8::try_from(h_mm.div_ceil(10)).unwrap_or(u8::MAX);
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB default, preferred timing is native
                  // sRGB chromaticity coordinates.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; the 8 standard timings unused (0x01 0x01).
    e[38..54].fill(0x01);
    e[54..72].copy_from_slice(&timing(clock_10khz, width, height, w_mm, h_mm));
    // Display product name descriptor.
    let mut name = [0x20u8; 13];
    name[..12].copy_from_slice(b"gpu-backend\n");
    e[72..77].copy_from_slice(&[0, 0, 0, 0xfc, 0]);
    e[77..90].copy_from_slice(&name);
    // Two dummy descriptors.
    e[93] = 0x10;
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    Some(e)
}

/// An 18-byte detailed timing descriptor; every value fits its field (checked by the caller
/// for the active sizes; the blanking constants are small).
fn timing(clock: u16, w: u32, h: u32, w_mm: u32, h_mm: u32) -> [u8; 18] {
    let lo = |v: u32| (v & 0xff) as u8;
    let hi4 = |v: u32| ((v >> 8) & 0x0f) as u8;
    let c = clock.to_le_bytes();
    [
        c[0],
        c[1],
        lo(w),
        lo(H_BLANK),
        (hi4(w) << 4) | hi4(H_BLANK),
        lo(h),
        lo(V_BLANK),
        (hi4(h) << 4) | hi4(V_BLANK),
        lo(H_FRONT),
        lo(H_SYNC),
        (((V_FRONT & 0xf) << 4) | (V_SYNC & 0xf)) as u8,
        0, // high bits of the porches and syncs: all small
        lo(w_mm),
        lo(h_mm),
        (hi4(w_mm) << 4) | hi4(h_mm),
        0,
        0,
        0x1e, // digital separate sync, +hsync +vsync
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_block_is_valid_and_names_the_mode() {
        let e = generate(1280, 800).unwrap();
        assert_eq!(e.len(), EDID_BLOCK);
        assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        let d = &e[54..72];
        let clock = u16::from_le_bytes([d[0], d[1]]);
        assert_eq!(u32::from(clock), 1440 * 830 * 60 / 10_000);
        let hact = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
        let vact = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
        assert_eq!((hact, vact), (1280, 800));
        assert_eq!(&e[77..88], b"gpu-backend");
        let e = generate(3840, 2160).unwrap();
        let d = &e[54..72];
        assert_eq!(u32::from(d[2]) | (u32::from(d[4] >> 4) << 8), 3840);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn modes_a_descriptor_cannot_hold_are_refused() {
        assert!(generate(0, 800).is_none());
        assert!(generate(4096, 800).is_none());
        assert!(generate(1280, u32::MAX).is_none());
        assert!(
            generate(4095, 4095).is_none(),
            "pixel clock over 655.35 MHz"
        );
    }
}
