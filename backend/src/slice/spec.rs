//! What the command line asks for: guest VRAM sizes (`8G`, `512M`, `2097152`) and guest
//! specifications `SOCKET:SIZE` (one vfio-user socket serving a guest with `SIZE` of VRAM).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use super::partition::SLICE_ALIGN;

/// Errors of parsing sizes and guest specifications.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    /// The text is not a size.
    #[error("`{0}` is not a size (expected a byte count with an optional K/M/G/T suffix, e.g. 8G or 512MiB)")]
    NotASize(String),
    /// The size does not fit 64 bits.
    #[error("size `{0}` is too large")]
    TooLarge(String),
    /// A guest of zero bytes.
    #[error("a guest needs a non-zero VRAM size")]
    Zero,
    /// The size is not a multiple of 2 MiB.
    #[error("guest VRAM size {0:#x} is not a multiple of 2 MiB")]
    NotSliceAligned(u64),
    /// A `--guest` value without `:SIZE`.
    #[error("`{0}` is not SOCKET:SIZE (e.g. /run/g0.sock:8G)")]
    NotAGuest(String),
    /// An empty socket path.
    #[error("`{0}` names no socket path")]
    EmptySocket(String),
    /// A `key=value` guest with a key that is not `socket`, `vram`, `display` or `msix`.
    #[error("unknown key `{key}` in `{text}` (expected socket=SOCKET,vram=SIZE[,display=PATH][,msix=on|off])")]
    UnknownKey {
        /// The key.
        key: String,
        /// The whole value.
        text: String,
    },
    /// A `key=value` guest naming a key twice.
    #[error("`{key}` is given twice in `{text}`")]
    DuplicateKey {
        /// The key.
        key: String,
        /// The whole value.
        text: String,
    },
    /// An on/off key with another value.
    #[error("`{key}={value}`: expected `{key}=on` or `{key}=off`")]
    BadSwitch {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A `key=value` guest without a required key.
    #[error(
        "`{text}` has no `{key}=` (expected socket=SOCKET,vram=SIZE[,display=PATH][,msix=on|off])"
    )]
    MissingKey {
        /// The key.
        key: &'static str,
        /// The whole value.
        text: String,
    },
}

/// Parses a byte count: decimal digits with an optional binary suffix `K`, `M`, `G` or
/// `T` (case-insensitive, optionally followed by `iB` or `B`): `8G` = `8GiB` = 8 × 2^30.
pub fn parse_size(text: &str) -> Result<u64, SpecError> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err(SpecError::NotASize(text.to_owned()));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SpecError::NotASize(text.to_owned())),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| SpecError::TooLarge(text.to_owned()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SpecError::TooLarge(text.to_owned()))
}

/// Parses a guest VRAM size: [`parse_size`], non-zero and a multiple of 2 MiB.
pub fn parse_slice_size(text: &str) -> Result<u64, SpecError> {
    let size = parse_size(text)?;
    if size == 0 {
        return Err(SpecError::Zero);
    }
    if size % SLICE_ALIGN != 0 {
        return Err(SpecError::NotSliceAligned(size));
    }
    Ok(size)
}

/// One guest: the socket it is served on, the size of its VRAM slice and its display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// The vfio-user socket path (`None` for `inspect --slice-size`, which serves nothing).
    pub socket: Option<PathBuf>,
    /// VRAM size in bytes (non-zero, a multiple of 2 MiB).
    pub size: u64,
    /// The vhost-user socket of the guest's display (`vhost-user-gpu-pci`), if it has one.
    pub display: Option<PathBuf>,
    /// Present the guest's function without MSI-X (`msix=off`), so QEMU can hot-unplug it
    /// (see [`PresentationOptions::without_msix`](crate::presentation::PresentationOptions)).
    pub without_msix: bool,
}

impl GuestSpec {
    /// A guest of `size` bytes with no socket.
    pub fn unnamed(size: u64) -> GuestSpec {
        GuestSpec {
            socket: None,
            size,
            display: None,
            without_msix: false,
        }
    }
}

impl FromStr for GuestSpec {
    type Err = SpecError;

    /// `SOCKET:SIZE` (the size follows the last colon, so socket paths may contain colons),
    /// or `socket=SOCKET,vram=SIZE[,display=PATH][,msix=on|off]` (keys in any order; paths
    /// without commas).
    fn from_str(text: &str) -> Result<GuestSpec, SpecError> {
        const KEYS: [&str; 4] = ["socket=", "vram=", "display=", "msix="];
        if KEYS.iter().any(|k| text.starts_with(k)) {
            return parse_keyed(text);
        }
        let (socket, size) = text
            .rsplit_once(':')
            .ok_or_else(|| SpecError::NotAGuest(text.to_owned()))?;
        if socket.is_empty() {
            return Err(SpecError::EmptySocket(text.to_owned()));
        }
        Ok(GuestSpec {
            socket: Some(PathBuf::from(socket)),
            size: parse_slice_size(size)?,
            display: None,
            without_msix: false,
        })
    }
}

/// `socket=SOCKET,vram=SIZE[,display=PATH][,msix=on|off]`.
fn parse_keyed(text: &str) -> Result<GuestSpec, SpecError> {
    let (mut socket, mut size, mut display, mut msix) = (None, None, None, None);
    for part in text.split(',') {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let slot_taken = match key {
            "socket" => socket.replace(value).is_some(),
            "vram" => size.replace(value).is_some(),
            "display" => display.replace(value).is_some(),
            "msix" => msix.replace(value).is_some(),
            _ => {
                return Err(SpecError::UnknownKey {
                    key: key.to_owned(),
                    text: text.to_owned(),
                })
            }
        };
        if slot_taken {
            return Err(SpecError::DuplicateKey {
                key: key.to_owned(),
                text: text.to_owned(),
            });
        }
    }
    let missing = |key| SpecError::MissingKey {
        key,
        text: text.to_owned(),
    };
    let socket = socket.ok_or_else(|| missing("socket"))?;
    let size = size.ok_or_else(|| missing("vram"))?;
    if socket.is_empty() {
        return Err(SpecError::EmptySocket(text.to_owned()));
    }
    if display.is_some_and(str::is_empty) {
        return Err(SpecError::EmptySocket(text.to_owned()));
    }
    let without_msix = match msix {
        None | Some("on") => false,
        Some("off") => true,
        Some(other) => {
            return Err(SpecError::BadSwitch {
                key: "msix",
                value: other.to_owned(),
            })
        }
    };
    Ok(GuestSpec {
        socket: Some(PathBuf::from(socket)),
        size: parse_slice_size(size)?,
        display: display.map(PathBuf::from),
        without_msix,
    })
}

impl fmt::Display for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.socket {
            Some(socket) => write!(f, "{}:{:#x}", socket.display(), self.size)?,
            None => write!(f, "{:#x}", self.size)?,
        }
        if let Some(display) = &self.display {
            write!(f, " (display {})", display.display())?;
        }
        if self.without_msix {
            write!(f, " (no MSI-X)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2097152").unwrap(), 2 << 20);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        for bad in ["", "G", "8X", "-1G", "1.5G", "8 G G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SpecError::TooLarge(_))
        ));
        assert_eq!(parse_slice_size("0"), Err(SpecError::Zero));
        assert_eq!(
            parse_slice_size("3M"),
            Err(SpecError::NotSliceAligned(3 << 20))
        );
        assert_eq!(parse_slice_size("6M").unwrap(), 6 << 20);
    }

    #[test]
    fn guest_specs() {
        let g: GuestSpec = "/run/g0.sock:8G".parse().unwrap();
        assert_eq!(
            g.socket.as_deref(),
            Some(std::path::Path::new("/run/g0.sock"))
        );
        assert_eq!(g.size, 8 << 30);
        let g: GuestSpec = "/tmp/a:b.sock:2M".parse().unwrap();
        assert_eq!(g.socket.unwrap().to_str(), Some("/tmp/a:b.sock"));
        assert!(matches!(
            "/run/g0.sock".parse::<GuestSpec>(),
            Err(SpecError::NotAGuest(_))
        ));
        assert!(matches!(
            ":8G".parse::<GuestSpec>(),
            Err(SpecError::EmptySocket(_))
        ));
        assert_eq!("/s:0".parse::<GuestSpec>(), Err(SpecError::Zero));
        assert!(matches!(
            "/s:1M".parse::<GuestSpec>(),
            Err(SpecError::NotSliceAligned(_))
        ));
    }

    #[test]
    fn keyed_guest_specs() {
        let g: GuestSpec = "socket=/run/g0.sock,vram=8G,display=/run/d0.sock"
            .parse()
            .unwrap();
        assert_eq!(
            g.socket.as_deref(),
            Some(std::path::Path::new("/run/g0.sock"))
        );
        assert_eq!(g.size, 8 << 30);
        assert_eq!(
            g.display.as_deref(),
            Some(std::path::Path::new("/run/d0.sock"))
        );
        let g: GuestSpec = "vram=2M,socket=/a:b".parse().unwrap();
        assert_eq!((g.size, g.display), (2 << 20, None));
        assert_eq!(g.socket.unwrap().to_str(), Some("/a:b"));
        assert!(!g.without_msix, "MSI-X unless asked otherwise");
        let g: GuestSpec = "msix=off,socket=/s,vram=2M".parse().unwrap();
        assert!(g.without_msix);
        assert!(g.to_string().ends_with("(no MSI-X)"), "{g}");
        let g: GuestSpec = "socket=/s,vram=2M,msix=on".parse().unwrap();
        assert!(!g.without_msix);
        for (bad, what) in [
            (
                "socket=/s,vram=2M,msix=no",
                "expected `msix=on` or `msix=off`",
            ),
            ("socket=/s,vram=2M,msix=off,msix=on", "twice"),
            ("socket=/s,vram=2M,gpu=1", "unknown key"),
            ("socket=/s,vram=2M,vram=4M", "twice"),
            ("socket=/s,display=/d", "no `vram=`"),
            ("vram=2M,display=/d", "no `socket=`"),
            ("socket=,vram=2M", "names no socket"),
            ("socket=/s,vram=2M,display=", "names no socket"),
            ("socket=/s,vram=3M", "not a multiple"),
            ("socket=/s,vram", "not a size"),
        ] {
            let e = bad.parse::<GuestSpec>().unwrap_err().to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }
}
