//! Byte counts for people: `95 GiB`, `23.65 GiB`, `16 MiB`.

/// Formats a byte count as `N GiB`/`N MiB`/`N KiB`/`N B`, with two decimals when inexact.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return if bytes % scale == 0 {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{:.2} {unit}", bytes as f64 / scale as f64)
            };
        }
    }
    "0 B".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(128 << 30), "128 GiB");
        assert_eq!(human_size(95 << 30), "95 GiB");
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(1536 << 20), "1.50 GiB");
        assert_eq!(human_size(0), "0 B");
    }

    #[test]
    fn inexact_sizes_keep_two_decimals() {
        assert_eq!(human_size(24_220 << 20), "23.65 GiB");
        assert_eq!(human_size(256 << 20), "256 MiB");
    }
}
