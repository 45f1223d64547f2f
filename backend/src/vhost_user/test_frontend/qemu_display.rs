//! [`FakeQemuDisplay`]: QEMU's end of the display channel a backend gets with
//! `VHOST_USER_GPU_SET_SOCKET`, played on one end of a socketpair by a thread.
//!
//! The protocol (QEMU `docs/interop/vhost-user-gpu.rst`): each message is a header of three
//! little-endian `u32`s (request, flags, payload size) and the payload. QEMU answers
//! GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO and GET_EDID with the same request code and flag
//! `REPLY` (0x4); everything else is one way. The fake answers as QEMU 11.1.3 was seen to
//! (protocol features 0x3, one enabled 1280x800 output, a 1024-byte EDID), lets a test change
//! the outputs (a resize from QEMU's side), records what it is sent, and can stop reading (a
//! QEMU that stalls).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::FrontendError;

/// Request codes of the display protocol.
pub mod req {
    /// `VHOST_USER_GPU_GET_PROTOCOL_FEATURES`.
    pub const GET_PROTOCOL_FEATURES: u32 = 1;
    /// `VHOST_USER_GPU_SET_PROTOCOL_FEATURES`.
    pub const SET_PROTOCOL_FEATURES: u32 = 2;
    /// `VHOST_USER_GPU_GET_DISPLAY_INFO`.
    pub const GET_DISPLAY_INFO: u32 = 3;
    /// `VHOST_USER_GPU_CURSOR_POS`.
    pub const CURSOR_POS: u32 = 4;
    /// `VHOST_USER_GPU_CURSOR_POS_HIDE`.
    pub const CURSOR_POS_HIDE: u32 = 5;
    /// `VHOST_USER_GPU_CURSOR_UPDATE`.
    pub const CURSOR_UPDATE: u32 = 6;
    /// `VHOST_USER_GPU_SCANOUT`.
    pub const SCANOUT: u32 = 7;
    /// `VHOST_USER_GPU_UPDATE`.
    pub const UPDATE: u32 = 8;
    /// `VHOST_USER_GPU_GET_EDID`.
    pub const GET_EDID: u32 = 11;
}

/// `VHOST_USER_GPU_MSG_FLAG_REPLY`.
pub const FLAG_REPLY: u32 = 0x4;
/// Protocol features QEMU 11.1.3 offers (EDID, DMABUF2).
pub const QEMU_PROTOCOL_FEATURES: u64 = 0x3;
/// Size of a cursor image in a CURSOR_UPDATE (64x64, 4 bytes each).
pub const CURSOR_IMAGE: usize = 64 * 64 * 4;
/// Largest payload the fake accepts (a 16384x16384 update would be 1 GiB; tests stay far
/// below this).
const MAX_PAYLOAD: usize = 64 << 20;

/// A message the backend sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayMsg {
    /// GET_PROTOCOL_FEATURES (answered).
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with the features.
    SetProtocolFeatures(u64),
    /// GET_DISPLAY_INFO (answered with the outputs).
    GetDisplayInfo,
    /// GET_EDID of a scanout (answered with the EDID).
    GetEdid(u32),
    /// SCANOUT: show `width` x `height` on `scanout` (0 x 0: disabled).
    Scanout {
        /// Output.
        scanout: u32,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// UPDATE with its pixels.
    Update {
        /// Output.
        scanout: u32,
        /// Rectangle x, y, width, height.
        rect: (u32, u32, u32, u32),
        /// The pixels (empty when not recording pixels).
        pixels: Vec<u8>,
    },
    /// CURSOR_POS.
    CursorPos {
        /// Output.
        scanout: u32,
        /// Position.
        x: u32,
        /// Position.
        y: u32,
    },
    /// CURSOR_POS_HIDE.
    CursorHide {
        /// Output.
        scanout: u32,
    },
    /// CURSOR_UPDATE with its 64x64 image.
    CursorUpdate {
        /// Output.
        scanout: u32,
        /// Position.
        x: u32,
        /// Position.
        y: u32,
        /// Hot spot.
        hot: (u32, u32),
        /// The image, 64x64 B, G, R, A.
        image: Vec<u8>,
    },
    /// Any other request (code, payload size).
    Other(u32, usize),
}

/// What the fake shows and answers.
#[derive(Debug)]
struct State {
    /// Outputs (width, height, enabled), index = scanout.
    outputs: Vec<(u32, u32, bool)>,
    edid: Vec<u8>,
    /// What the fake keeps.
    log: Vec<DisplayMsg>,
    /// Keep UPDATE pixels (off: only the rectangle).
    keep_pixels: bool,
    /// Messages received, kept or not.
    received: u64,
    /// UPDATE bytes received.
    update_bytes: u64,
    /// Stop reading (a stalled QEMU).
    stalled: bool,
    /// The fake is being dropped.
    closing: bool,
    /// The backend closed its end (or sent garbage).
    ended: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// QEMU's display side of one `VHOST_USER_GPU_SET_SOCKET`.
pub struct FakeQemuDisplay {
    shared: Arc<Shared>,
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeQemuDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeQemuDisplay").finish_non_exhaustive()
    }
}

/// A 1024-byte EDID blob as QEMU sends it: a recognizable base block (header, then bytes
/// counting up) padded with zeros.
pub fn qemu_edid() -> Vec<u8> {
    let mut edid = vec![0u8; 1024];
    edid[..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    for (i, b) in edid[8..128].iter_mut().enumerate() {
        *b = i as u8;
    }
    edid
}

impl FakeQemuDisplay {
    /// A fake display and the backend's end of its socket (to send with
    /// `VHOST_USER_GPU_SET_SOCKET`).
    pub fn new() -> Result<(FakeQemuDisplay, UnixStream), FrontendError> {
        let (ours, theirs) = UnixStream::pair()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                outputs: vec![(1280, 800, true)],
                edid: qemu_edid(),
                log: Vec::new(),
                keep_pixels: true,
                received: 0,
                update_bytes: 0,
                stalled: false,
                closing: false,
                ended: false,
            }),
            changed: Condvar::new(),
        });
        let reader = ours.try_clone()?;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("fake-qemu-display".into())
                .spawn(move || serve(reader, &shared))?
        };
        Ok((
            FakeQemuDisplay {
                shared,
                stream: ours,
                thread: Some(thread),
            },
            theirs,
        ))
    }

    /// Sets scanout `scanout`'s output (what the next GET_DISPLAY_INFO answers).
    pub fn set_output(&self, scanout: usize, width: u32, height: u32, enabled: bool) {
        let mut state = self.shared.lock();
        if state.outputs.len() <= scanout {
            state.outputs.resize(scanout + 1, (0, 0, false));
        }
        state.outputs[scanout] = (width, height, enabled);
    }

    /// Keep the pixels of UPDATE messages (the default) or only their rectangles.
    pub fn keep_pixels(&self, keep: bool) {
        self.shared.lock().keep_pixels = keep;
    }

    /// Stop reading the socket (`true`: a stalled QEMU) or go on.
    pub fn stall(&self, stalled: bool) {
        self.handle().stall(stalled);
    }

    /// A handle for another thread.
    pub fn handle(&self) -> DisplayHandle {
        DisplayHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The messages kept so far.
    pub fn messages(&self) -> Vec<DisplayMsg> {
        self.shared.lock().log.clone()
    }

    /// Takes the messages kept so far.
    pub fn take_messages(&self) -> Vec<DisplayMsg> {
        std::mem::take(&mut self.shared.lock().log)
    }

    /// Messages received in all (kept or not) and UPDATE bytes received.
    pub fn received(&self) -> (u64, u64) {
        self.handle().received()
    }

    /// Whether the backend closed its end.
    pub fn ended(&self) -> bool {
        self.shared.lock().ended
    }

    /// Waits up to `timeout` until `found` returns something for the kept messages.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut found: impl FnMut(&[DisplayMsg]) -> Option<T>,
    ) -> Result<T, FrontendError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(t) = found(&state.log) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout("a display message"));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A handle on a [`FakeQemuDisplay`] usable from another thread (its frontend elsewhere).
#[derive(Clone)]
pub struct DisplayHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DisplayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisplayHandle").finish_non_exhaustive()
    }
}

impl DisplayHandle {
    /// Stop reading the socket (`true`: a stalled QEMU) or go on.
    pub fn stall(&self, stalled: bool) {
        self.shared.lock().stalled = stalled;
        self.shared.changed.notify_all();
    }

    /// Messages received in all and UPDATE bytes received.
    pub fn received(&self) -> (u64, u64) {
        let state = self.shared.lock();
        (state.received, state.update_bytes)
    }

    /// Forgets the messages kept so far.
    pub fn clear(&self) {
        self.shared.lock().log.clear();
    }
}

impl Drop for FakeQemuDisplay {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn reply(stream: &mut UnixStream, request: u32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&FLAG_REPLY.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

/// The fake's thread: reads and answers until the socket ends or the fake is dropped.
fn serve(mut stream: UnixStream, shared: &Shared) {
    let ended = run(&mut stream, shared);
    log::debug!("fake QEMU display: {ended:?}");
    shared.lock().ended = true;
    shared.changed.notify_all();
}

fn run(stream: &mut UnixStream, shared: &Shared) -> std::io::Result<()> {
    // Where the pixels of updates go when they are not kept.
    let mut scratch = Vec::new();
    loop {
        let keep_pixels = {
            let mut state = shared.lock();
            while state.stalled && !state.closing {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.closing {
                return Ok(());
            }
            state.keep_pixels
        };
        let mut hdr = [0u8; 12];
        stream.read_exact(&mut hdr)?;
        let (request, size) = (u32_at(&hdr, 0), u32_at(&hdr, 8) as usize);
        if size > MAX_PAYLOAD {
            return Err(std::io::Error::other(format!("payload of {size} bytes")));
        }
        let (msg, update_bytes) = if request == req::UPDATE && size >= 20 {
            // The pixels are read straight into their own buffer.
            let mut head = [0u8; 20];
            stream.read_exact(&mut head)?;
            let n = size - 20;
            let pixels = if keep_pixels {
                let mut pixels = vec![0u8; n];
                stream.read_exact(&mut pixels)?;
                pixels
            } else {
                scratch.resize(n, 0);
                stream.read_exact(&mut scratch[..n])?;
                Vec::new()
            };
            let msg = DisplayMsg::Update {
                scanout: u32_at(&head, 0),
                rect: (
                    u32_at(&head, 4),
                    u32_at(&head, 8),
                    u32_at(&head, 12),
                    u32_at(&head, 16),
                ),
                pixels,
            };
            (msg, n as u64)
        } else {
            let mut payload = vec![0u8; size];
            stream.read_exact(&mut payload)?;
            let (msg, answer) = decode(shared, request, &payload);
            if let Some(body) = answer {
                // Recorded before the answer, so a backend that got it finds it recorded.
                record(shared, msg, 0);
                reply(stream, request, &body)?;
                continue;
            }
            (msg, 0)
        };
        record(shared, msg, update_bytes);
    }
}

fn record(shared: &Shared, msg: DisplayMsg, update_bytes: u64) {
    let mut state = shared.lock();
    state.received += 1;
    state.update_bytes += update_bytes;
    state.log.push(msg);
    drop(state);
    shared.changed.notify_all();
}

/// Decodes one message (not an UPDATE) and, if it asks for one, the answer's body.
fn decode(shared: &Shared, request: u32, p: &[u8]) -> (DisplayMsg, Option<Vec<u8>>) {
    let msg = match request {
        req::GET_PROTOCOL_FEATURES => {
            return (
                DisplayMsg::GetProtocolFeatures,
                Some(QEMU_PROTOCOL_FEATURES.to_le_bytes().to_vec()),
            )
        }
        req::SET_PROTOCOL_FEATURES => {
            let mut v = [0u8; 8];
            if let Some(b) = p.get(..8) {
                v.copy_from_slice(b);
            }
            DisplayMsg::SetProtocolFeatures(u64::from_le_bytes(v))
        }
        req::GET_DISPLAY_INFO => {
            // struct virtio_gpu_resp_display_info: a 24-byte header, then 16 pmodes.
            let outputs = shared.lock().outputs.clone();
            let mut body = vec![0u8; 24 + 16 * 24];
            body[..4].copy_from_slice(&0x1101u32.to_le_bytes());
            for (i, (w, h, enabled)) in outputs.iter().take(16).enumerate() {
                let at = 24 + i * 24;
                body[at + 8..at + 12].copy_from_slice(&w.to_le_bytes());
                body[at + 12..at + 16].copy_from_slice(&h.to_le_bytes());
                body[at + 16..at + 20].copy_from_slice(&u32::from(*enabled).to_le_bytes());
            }
            return (DisplayMsg::GetDisplayInfo, Some(body));
        }
        req::GET_EDID => {
            // struct virtio_gpu_resp_edid: header, size, padding, 1024 bytes.
            let edid = shared.lock().edid.clone();
            let mut body = vec![0u8; 24 + 8 + 1024];
            body[..4].copy_from_slice(&0x1104u32.to_le_bytes());
            let n = edid.len().min(1024);
            body[24..28].copy_from_slice(&(n as u32).to_le_bytes());
            body[32..32 + n].copy_from_slice(&edid[..n]);
            return (DisplayMsg::GetEdid(u32_at(p, 0)), Some(body));
        }
        req::SCANOUT => DisplayMsg::Scanout {
            scanout: u32_at(p, 0),
            width: u32_at(p, 4),
            height: u32_at(p, 8),
        },
        req::CURSOR_POS => DisplayMsg::CursorPos {
            scanout: u32_at(p, 0),
            x: u32_at(p, 4),
            y: u32_at(p, 8),
        },
        req::CURSOR_POS_HIDE => DisplayMsg::CursorHide {
            scanout: u32_at(p, 0),
        },
        req::CURSOR_UPDATE => DisplayMsg::CursorUpdate {
            scanout: u32_at(p, 0),
            x: u32_at(p, 4),
            y: u32_at(p, 8),
            hot: (u32_at(p, 12), u32_at(p, 16)),
            image: p.get(20..).map(<[u8]>::to_vec).unwrap_or_default(),
        },
        other => DisplayMsg::Other(other, p.len()),
    };
    (msg, None)
}
