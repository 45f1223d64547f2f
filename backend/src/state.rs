//! `serve --state DIR`: the guest table kept on disk, so a restarted backend serves the same
//! guests on the same sockets and scrubs nothing that is assigned.
//!
//! `DIR/guests.json` holds `{"version": 1, "gpu": NAME, "vram_size": BYTES, "guests":
//! [{"socket", "display", "vram_start", "vram_size"}]}`. It is written atomically (a
//! temporary file in DIR, fsynced, renamed over the old one, DIR fsynced), so a crash
//! leaves the old table or the new one, never a mix. A table of a newer version, of another
//! GPU, or that does not parse is refused with the path and the reason; nothing is changed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the state file this backend writes and reads.
pub const STATE_VERSION: u32 = 1;

/// The guest table's file name in the state directory.
pub const STATE_FILE: &str = "guests.json";

/// Largest state file read (a table of thousands of guests is far smaller).
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Errors of the state directory.
#[derive(Debug, Error)]
pub enum StateError {
    /// The directory cannot be created or written.
    #[error("state directory {path} is not usable: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file cannot be read or written.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not parse.
    #[error("state file {path} is corrupt: {reason} (move it away to start with no guests)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The state file was written by a newer backend.
    #[error("state file {path} has version {found}; this backend reads version {STATE_VERSION}")]
    FutureVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The state file describes another GPU.
    #[error("state file {path} is for GPU {found} with {found_vram:#x} bytes of VRAM, not {gpu} with {vram:#x}")]
    OtherGpu {
        /// The file.
        path: PathBuf,
        /// The GPU it names.
        found: String,
        /// Its VRAM size.
        found_vram: u64,
        /// This GPU.
        gpu: String,
        /// This GPU's VRAM size.
        vram: u64,
    },
}

/// One guest as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGuest {
    /// Its vfio-user socket.
    pub socket: PathBuf,
    /// Its display socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<PathBuf>,
    /// Presented without MSI-X (`msix=off`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_msix: bool,
    /// First byte of its slice.
    pub vram_start: u64,
    /// Size of its slice.
    pub vram_size: u64,
}

/// The state file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The GPU's name (profile name or PCI address).
    pub gpu: String,
    /// Its VRAM size.
    pub vram_size: u64,
    /// The guests.
    pub guests: Vec<SavedGuest>,
}

/// Only the version, read first so a future format is refused as such.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating it, mode 0700, if missing) and checks that the directory is writable.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        let dir_err = |source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        // Never through a link somebody planted under the predictable name.
        let _ = fs::remove_file(&probe);
        exclusive_file(&probe).map_err(dir_err)?;
        fs::remove_file(&probe).map_err(dir_err)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The state file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved table, `None` if there is none yet. A table for another GPU than
    /// `gpu`/`vram_size` is refused.
    pub fn load(&self, gpu: &str, vram_size: u64) -> Result<Option<SavedState>, StateError> {
        let path = self.file();
        // Non-blocking, so a FIFO planted under the name cannot hang the start; only a
        // regular file is read.
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        let is_file = file
            .metadata()
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?
            .is_file();
        if !is_file {
            return Err(corrupt("not a regular file".to_owned()));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_STATE_BYTES), &mut text)
            .map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        let version: VersionOnly =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if version.version > STATE_VERSION {
            return Err(StateError::FutureVersion {
                path,
                found: version.version,
            });
        }
        if version.version != STATE_VERSION {
            return Err(corrupt(format!("unknown version {}", version.version)));
        }
        let state: SavedState = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        // Every guest has at least 2 MiB of its own: more guests than that are a forged file
        // (which would otherwise cost minutes of checks and thousands of threads).
        let most = vram_size / (2 << 20);
        if state.guests.len() as u64 > most {
            return Err(corrupt(format!(
                "{} guests, more than {most} slices of 2 MiB fit in the GPU",
                state.guests.len()
            )));
        }
        if state.gpu != gpu || state.vram_size != vram_size {
            return Err(StateError::OtherGpu {
                path,
                found: state.gpu,
                found_vram: state.vram_size,
                gpu: gpu.to_owned(),
                vram: vram_size,
            });
        }
        Ok(Some(state))
    }

    /// Puts the table back as it was before a failed start: `original`, or no file at all.
    pub fn put_back(&self, original: Option<&SavedState>) -> Result<(), StateError> {
        match original {
            Some(state) => self.save(state),
            None => match fs::remove_file(self.file()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateError::Io {
                    path: self.file(),
                    source: e,
                }),
                _ => Ok(()),
            },
        }
    }

    /// Writes `state` atomically (see the module docs).
    pub fn save(&self, state: &SavedState) -> Result<(), StateError> {
        let path = self.file();
        let tmp = self
            .dir
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(state).map_err(|e| io(std::io::Error::other(e)))?;
        let written = (|| {
            // A leftover of a crashed run, or something planted under the name: gone, and
            // the file made anew (never opened through a link).
            let _ = fs::remove_file(&tmp);
            let mut f = exclusive_file(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io)
    }
}

/// Creates `path` (mode 0600) for writing; fails if anything, a symbolic link included,
/// already has the name.
fn exclusive_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gpu-backend-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn sample() -> SavedState {
        SavedState {
            version: STATE_VERSION,
            gpu: "tu102-24g".into(),
            vram_size: 24 << 30,
            guests: vec![
                SavedGuest {
                    socket: "/run/g0.sock".into(),
                    display: Some("/run/d0.sock".into()),
                    no_msix: false,
                    vram_start: 0,
                    vram_size: 2 << 20,
                },
                SavedGuest {
                    socket: "/run/g1.sock".into(),
                    display: None,
                    no_msix: true,
                    vram_start: 2 << 20,
                    vram_size: 2 << 20,
                },
            ],
        }
    }

    #[test]
    fn saves_and_loads_atomically() {
        let dir = temp_dir("roundtrip");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(state.load("tu102-24g", 24 << 30).unwrap(), None);
        state.save(&sample()).unwrap();
        assert_eq!(state.load("tu102-24g", 24 << 30).unwrap(), Some(sample()));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [STATE_FILE], "no temporary file left");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Names somebody planted in the directory: a FIFO as the state file does not hang the
    /// start, and a link under the temporary file's predictable name is not written
    /// through; a forged file with more guests than the GPU holds is refused.
    #[test]
    fn planted_files_neither_hang_nor_redirect_the_backend() {
        let dir = temp_dir("planted");
        let state = StateDir::open(&dir).unwrap();
        let fifo =
            std::ffi::CString::new(state.file().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = state.load("tu102-24g", 24 << 30).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        fs::remove_file(state.file()).unwrap();

        let victim = dir.join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let tmp = dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        state.save(&sample()).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(state.load("tu102-24g", 24 << 30).unwrap(), Some(sample()));

        let mut forged = sample();
        forged.vram_size = 4 << 20;
        forged.guests = (0..3)
            .map(|i| SavedGuest {
                socket: format!("/run/f{i}.sock").into(),
                display: None,
                no_msix: false,
                vram_start: 0,
                vram_size: 2 << 20,
            })
            .collect();
        state.save(&forged).unwrap();
        let e = state.load("tu102-24g", 4 << 20).unwrap_err().to_string();
        assert!(e.contains("more than 2 slices"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_future_and_foreign_tables_are_refused() {
        let dir = temp_dir("bad");
        let state = StateDir::open(&dir).unwrap();
        for (text, want) in [
            ("{", "corrupt"),
            ("[]", "corrupt"),
            (r#"{"version": 9, "whatever": true}"#, "version 9"),
            (r#"{"version": 0}"#, "unknown version"),
            (
                r#"{"version": 1, "gpu": "tu102-24g", "vram_size": 1, "guests": []}"#,
                "not tu102",
            ),
            (
                r#"{"version": 1, "gpu": "tu102-24g", "vram_size": 25769803776, "guests": [{"socket": 3}]}"#,
                "corrupt",
            ),
        ] {
            fs::write(state.file(), text).unwrap();
            let e = state.load("tu102-24g", 24 << 30).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert_eq!(
                fs::read_to_string(state.file()).unwrap(),
                text,
                "left as it was"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_directory_is_refused() {
        let file = temp_dir("file");
        fs::write(&file, b"x").unwrap();
        assert!(StateDir::open(&file).is_err(), "a file is not a directory");
        let _ = fs::remove_file(&file);
    }
}
