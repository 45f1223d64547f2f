//! [`PciAddress`]: a PCI function's address, `DDDD:BB:DD.F`, as sysfs names it.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A malformed PCI address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "'{text}' is not a PCI address: expected DDDD:BB:DD.F (domain, bus, device, function in \
     hex, e.g. 0000:01:00.0), {why}"
)]
pub struct AddressError {
    text: String,
    why: &'static str,
}

/// The address of one PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = AddressError;

    /// Parses `DDDD:BB:DD.F`, or `BB:DD.F` for domain 0.
    fn from_str(text: &str) -> Result<PciAddress, AddressError> {
        let error = |why| AddressError {
            text: text.to_owned(),
            why,
        };
        let hex = |field: &str, digits: usize, what| {
            if field.len() != digits || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error(what));
            }
            u32::from_str_radix(field, 16).map_err(|_| error(what))
        };
        let (prefix, function) = text.rsplit_once('.').ok_or_else(|| error("no '.F'"))?;
        let parts: Vec<&str> = prefix.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] => (hex(domain, 4, "bad domain")?, *bus, *device),
            [bus, device] => (0, *bus, *device),
            _ => return Err(error("wrong number of ':'")),
        };
        let bus = hex(bus, 2, "bad bus")?;
        let device = hex(device, 2, "bad device")?;
        let function = hex(function, 1, "bad function")?;
        if device >= 32 {
            return Err(error("device number above 0x1f"));
        }
        if function >= 8 {
            return Err(error("function number above 7"));
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_sysfs_form() {
        let a: PciAddress = "0000:00:05.0".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.device, a.function), (0, 0, 5, 0));
        assert_eq!(a.to_string(), "0000:00:05.0");
        let b: PciAddress = "1f:1F.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:1f:1f.7");
        let c: PciAddress = "abcd:ef:00.1".parse().unwrap();
        assert_eq!(c.domain, 0xabcd);
    }

    #[test]
    fn rejects_what_sysfs_would_not_name() {
        for bad in [
            "",
            "0000:00:05",
            "0000:00:20.0",
            "0000:00:05.8",
            "00000:00:05.0",
            "0000:0:05.0",
            "0000:00:05.0.1",
            "gg:00.0",
            "0000:00:05.-1",
            "/sys/bus/pci/devices/0000:00:05.0",
            "0000:00:05.0 ",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} accepted");
        }
    }
}
