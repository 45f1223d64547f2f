//! The device behind a vfio-user socket, through the backend's test client: connection,
//! region discovery and region reads and writes (each answered by the server before the next).

use std::path::Path;

use gpu_backend::vfio_user::test_client::{ClientError, TestClient};
use guest_tests::vfio_report::RegionSummary;

/// Bytes per `REGION_READ`/`REGION_WRITE` message (well below the 1 MiB transfer limit).
const CHUNK: usize = 4096;
/// `argsz` of `DEVICE_GET_REGION_INFO`: room for the sparse-mmap capability.
const REGION_INFO_ARGSZ: u32 = 1024;
/// PCI regions worth looking at: BAR0..BAR5 and the ROM (config space and VGA follow).
const PCI_REGIONS: u32 = 7;

/// Errors of talking to the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The socket could not be connected.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vfio-user request failed.
    #[error("{what}: {source}")]
    Request {
        /// The request.
        what: String,
        /// The client's error.
        #[source]
        source: ClientError,
    },
    /// A read returned fewer bytes than asked.
    #[error("region {region} read at {offset:#x}: {got} of {want} bytes")]
    Short {
        /// Region.
        region: u32,
        /// Offset.
        offset: u64,
        /// Bytes returned.
        got: usize,
        /// Bytes asked for.
        want: usize,
    },
}

/// A connected vfio-user device.
pub struct Device {
    client: TestClient,
    regions: Vec<RegionSummary>,
}

fn request<T>(what: impl FnOnce() -> String, r: Result<T, ClientError>) -> Result<T, DeviceError> {
    r.map_err(|source| DeviceError::Request {
        what: what(),
        source,
    })
}

impl Device {
    /// Connect, negotiate the version and read the device and region info.
    pub fn connect(path: &Path) -> Result<Device, DeviceError> {
        let mut client = TestClient::connect(path).map_err(|source| DeviceError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        request(|| "VERSION".into(), client.version())?;
        let info = request(|| "DEVICE_GET_INFO".into(), client.device_info())?;
        let mut regions = Vec::new();
        for index in 0..info.num_regions.min(PCI_REGIONS) {
            let (r, _, fd) = request(
                || format!("DEVICE_GET_REGION_INFO {index}"),
                client.region_info(index, REGION_INFO_ARGSZ),
            )?;
            regions.push(RegionSummary {
                index,
                size: r.size,
                flags: r.flags,
                has_fd: fd.is_some(),
            });
        }
        Ok(Device { client, regions })
    }

    /// The regions (BARs and ROM) as the server described them.
    pub fn regions(&self) -> &[RegionSummary] {
        &self.regions
    }

    /// Read `len` bytes of `region` at `offset`.
    pub fn read(&mut self, region: u32, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let at = offset + out.len() as u64;
            let want = (len - out.len()).min(CHUNK);
            let data = request(
                || format!("REGION_READ {region} at {at:#x}+{want}"),
                self.client.region_read(region, at, want as u32),
            )?;
            if data.len() != want {
                return Err(DeviceError::Short {
                    region,
                    offset: at,
                    got: data.len(),
                    want,
                });
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// Write `data` to `region` at `offset`, waiting for each reply.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let at = offset + (i * CHUNK) as u64;
            request(
                || format!("REGION_WRITE {region} at {at:#x}+{}", chunk.len()),
                self.client.region_write(region, at, chunk, false),
            )?;
        }
        Ok(())
    }

    /// A 32-bit read.
    pub fn read32(&mut self, region: u32, offset: u64) -> Result<u32, DeviceError> {
        let b = self.read(region, offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit write.
    pub fn write32(&mut self, region: u32, offset: u64, value: u32) -> Result<(), DeviceError> {
        self.write(region, offset, &value.to_le_bytes())
    }
}
