//! The real binary serving an emulated TU102: sliced for two guests (B's slice first, then
//! A's, 64 MiB each: the soak's layout), or whole to one guest.

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

/// A running server with its sockets.
pub struct TwoGuests {
    /// The server.
    pub server: ServeProcess,
    /// A's socket.
    pub a: PathBuf,
    /// B's socket (`None` when the GPU is whole to A).
    pub b: Option<PathBuf>,
    _dir: TempDir,
}

impl TwoGuests {
    /// Start `binary serve --profile tu102-24g --socket A`: the GPU whole to A.
    pub fn whole(binary: &Path) -> TwoGuests {
        let dir = TempDir::new("figures");
        let a = dir.join("a.sock");
        let args: Vec<String> = vec![
            "--profile".into(),
            "tu102-24g".into(),
            "--socket".into(),
            a.display().to_string(),
        ];
        let server = ServeProcess::start(binary, &args, vec![a.clone()], dir.join("serve.log"));
        TwoGuests {
            server,
            a,
            b: None,
            _dir: dir,
        }
    }

    /// Start `binary serve --profile tu102-24g --guest B:64M --guest A:64M`.
    pub fn start(binary: &Path) -> TwoGuests {
        let dir = TempDir::new("figures");
        let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
        let args: Vec<String> = vec![
            "--profile".into(),
            "tu102-24g".into(),
            "--guest".into(),
            format!("{}:64M", b.display()),
            "--guest".into(),
            format!("{}:64M", a.display()),
        ];
        let server = ServeProcess::start(
            binary,
            &args,
            vec![a.clone(), b.clone()],
            dir.join("serve.log"),
        );
        TwoGuests {
            server,
            a,
            b: Some(b),
            _dir: dir,
        }
    }

    /// A negotiated client of `socket`.
    pub fn client(socket: &Path) -> TestClient {
        let mut client = TestClient::connect(socket).expect("connect");
        client.set_reply_timeout(Duration::from_secs(30));
        client.version().expect("VERSION");
        client
    }
}
