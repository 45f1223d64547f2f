//! The display rig of the hostile tests: the real `gpu-backend serve` with two sliced guests
//! that both have a display (vhost-user GPU), guest A the hostile one and guest B the good
//! one, driven by the project's test frontend (`vhost_user::test_frontend`) playing QEMU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::test_client::TestClient;
use gpu_backend::vhost_user::test_frontend::requests::{self as rq, resp};
use gpu_backend::vhost_user::test_frontend::{
    Chain, DisplayFrontend, FrontendOptions, Submitted, Used, CONTROL,
};

use crate::support::serve_process::{ServeProcess, TempDir};

/// How long a good request may take, even on a loaded machine.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The server and the guests' sockets.
pub struct DisplayRig {
    /// The server.
    pub serve: ServeProcess,
    /// vfio-user sockets of A and B.
    pub sockets: [PathBuf; 2],
    /// Display sockets of A and B.
    pub displays: [PathBuf; 2],
    _dir: TempDir,
}

impl DisplayRig {
    /// `serve --guest socket=a,vram=VRAM_A,display=da --guest socket=b,vram=VRAM_B,display=db`.
    pub fn start(tag: &str, vram: [&str; 2]) -> DisplayRig {
        let dir = TempDir::new(tag);
        let sockets = [dir.join("a.sock"), dir.join("b.sock")];
        let displays = [dir.join("a-display.sock"), dir.join("b-display.sock")];
        let mut args = vec!["--profile".to_owned(), "tu102-24g".to_owned()];
        for i in 0..2 {
            args.push("--guest".to_owned());
            args.push(format!(
                "socket={},vram={},display={}",
                sockets[i].display(),
                vram[i],
                displays[i].display()
            ));
        }
        let mut waited: Vec<PathBuf> = sockets.to_vec();
        waited.extend(displays.iter().cloned());
        let serve = ServeProcess::start(
            Path::new(env!("CARGO_BIN_EXE_gpu-backend")),
            &args,
            waited,
            dir.join("serve.log"),
        );
        DisplayRig {
            serve,
            sockets,
            displays,
            _dir: dir,
        }
    }

    /// A started frontend on guest `i`'s display (retrying while the server tears down the
    /// previous connection).
    pub fn display(&self, i: usize, options: FrontendOptions) -> DisplayFrontend {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = DisplayFrontend::connect_idle(&self.displays[i], options)
                .and_then(|mut fe| fe.start().map(|_| ()).map(|()| fe));
            match attempt {
                Ok(fe) => return fe,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A vfio-user client of guest `i` that has done VERSION.
    pub fn vfio(&self, i: usize) -> TestClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut client) = TestClient::connect(&self.sockets[i]) {
                if client.version().is_ok() {
                    return client;
                }
            }
            assert!(Instant::now() < deadline, "cannot connect to guest {i}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server runs and nothing in it panicked.
    pub fn assert_alive(&mut self, after: &str) {
        if let Some(status) = self.serve.exited() {
            panic!(
                "after {after}: the server died ({status}):\n{}",
                self.serve.log_tail(20)
            );
        }
        let log = self.serve.log_text();
        assert!(
            !log.contains("panicked"),
            "after {after}: a thread panicked:\n{}",
            self.serve.log_tail(40)
        );
    }

    /// Guest B's display answers and its vfio-user side reads BAR0, each within
    /// [`ANSWER_WITHIN`].
    pub fn good_guest_served(&mut self, good: &mut DisplayFrontend, after: &str) {
        self.assert_alive(after);
        if let Err(e) = answers(good, ANSWER_WITHIN) {
            panic!("after {after}: guest B's display: {e}");
        }
        let mut vfio = self.vfio(1);
        let start = Instant::now();
        let boot0 = vfio.region_read(0, 0, 4).expect("B's BAR0 read");
        assert_eq!(boot0.len(), 4);
        assert!(start.elapsed() < ANSWER_WITHIN, "{:?}", start.elapsed());
    }
}

/// Submits `chain` on the control queue, kicks and waits up to `within` for its used entry
/// (`None`: no entry came).
pub fn post(
    fe: &mut DisplayFrontend,
    chain: &Chain,
    within: Duration,
) -> (Submitted, Option<Used>) {
    let submitted = fe.submit(CONTROL, chain).expect("submit");
    fe.kick(CONTROL).expect("kick");
    let used = fe.wait_used(CONTROL, within).ok();
    (submitted, used)
}

/// GET_DISPLAY_INFO is answered with OK_DISPLAY_INFO within `within`; how long it took.
pub fn answers(fe: &mut DisplayFrontend, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let chain = Chain::request(&rq::get_display_info(), rq::RESPONSE_MAX);
    let (submitted, used) = post(fe, &chain, within);
    let used = used.ok_or_else(|| format!("no answer within {within:?}"))?;
    if used.id != u32::from(submitted.head) {
        return Err(format!("used entry {used:?} for head {}", submitted.head));
    }
    let response = submitted
        .response(fe.ram(), used.len)
        .map_err(|e| e.to_string())?;
    match rq::resp_type(&response) {
        Some(resp::OK_DISPLAY_INFO) => Ok(start.elapsed()),
        other => Err(format!("answered {other:x?}")),
    }
}
