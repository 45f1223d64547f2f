//! The real binary serving an emulated TU102: sliced for several guests (in socket order,
//! so with two the first is B and the second A: the soak's layout), or whole to one guest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gpu_backend::vfio_user::test_client::TestClient;

use crate::support::serve_process::{ServeProcess, TempDir};

/// BAR0, its window register and the PRAMIN aperture.
pub const BAR0: u32 = 0;
/// The Turing window register.
pub const WINDOW: u64 = 0x1700;
/// The aperture.
pub const APERTURE: u64 = 0x70_0000;
/// The VRAM BAR.
pub const VRAM_BAR: u32 = 1;
/// MiB.
pub const MIB: u64 = 1 << 20;

/// A running server and its sockets.
pub struct Served {
    /// The server.
    pub server: ServeProcess,
    /// One socket per guest, in slice order.
    pub sockets: Vec<PathBuf>,
    _dir: TempDir,
}

impl Served {
    fn start(binary: &Path, mode: &[String], sockets: Vec<PathBuf>, dir: TempDir) -> Served {
        Served::start_profile(binary, "tu102-24g", mode, sockets, dir)
    }

    fn start_profile(
        binary: &Path,
        profile: &str,
        mode: &[String],
        sockets: Vec<PathBuf>,
        dir: TempDir,
    ) -> Served {
        let mut args: Vec<String> = vec!["--profile".into(), profile.into()];
        args.extend_from_slice(mode);
        let server = ServeProcess::start(binary, &args, sockets.clone(), dir.join("serve.log"));
        Served {
            server,
            sockets,
            _dir: dir,
        }
    }

    /// `serve --socket S`: the GPU whole to one guest.
    pub fn whole(binary: &Path) -> Served {
        let dir = TempDir::new("figures");
        let socket = dir.join("g0.sock");
        let mode = vec!["--socket".to_string(), socket.display().to_string()];
        Served::start(binary, &mode, vec![socket], dir)
    }

    /// `serve --guest S0:SIZE --guest S1:SIZE ...`: `guests` slices of `size` (e.g. "64M").
    pub fn sliced(binary: &Path, guests: usize, size: &str) -> Served {
        Served::sliced_profile(binary, "tu102-24g", guests, size)
    }

    /// [`Served::sliced`] on another emulated profile.
    pub fn sliced_profile(binary: &Path, profile: &str, guests: usize, size: &str) -> Served {
        let dir = TempDir::new("figures");
        let sockets: Vec<PathBuf> = (0..guests)
            .map(|i| dir.join(&format!("g{i}.sock")))
            .collect();
        let mode: Vec<String> = sockets
            .iter()
            .flat_map(|s| ["--guest".to_string(), format!("{}:{size}", s.display())])
            .collect();
        Served::start_profile(binary, profile, &mode, sockets, dir)
    }

    /// A negotiated client of `socket`.
    pub fn client(socket: &Path) -> TestClient {
        let mut client = TestClient::connect(socket).expect("connect");
        client.set_reply_timeout(Duration::from_secs(30));
        client.version().expect("VERSION");
        client
    }
}
