//! A small client of QEMU's machine protocol (QMP) on a unix socket
//! (`-qmp unix:PATH,server=on,wait=off`): the greeting, `qmp_capabilities`, commands and their
//! answers (events that arrive in between are kept), `screendump` and `quit`. Every read has
//! a time limit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one answer may take (a screendump of a large screen in a busy TCG guest included).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting failed until the time limit (QEMU not up, or not listening there).
    #[error("connecting to QMP socket {path} for {secs} s: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long it was tried.
        secs: u64,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed (a read time limit included).
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
    version: String,
}

impl Qmp {
    /// Connect to `path` (retrying until `timeout`: QEMU creates the socket while it starts),
    /// read the greeting and enter command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if start.elapsed() >= timeout => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        secs: timeout.as_secs(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
            version: String::new(),
        };
        let greeting = qmp.read_message()?;
        let version = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QmpError::Protocol(format!("greeting without a version: {greeting}")))?;
        qmp.version = format!(
            "{}.{}.{}",
            version["major"], version["minor"], version["micro"]
        );
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The QEMU version of the greeting, e.g. `11.1.3`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Events received so far (`{"event": ..., "data": ..., "timestamp": ...}`).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Run `command` with `arguments` and return its `return` value; events that arrive
    /// before the answer are kept in [`Qmp::events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let answer = self.read_message()?;
            if answer.get("event").is_some() {
                self.events.push(answer);
                continue;
            }
            if let Some(ret) = answer.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = answer.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(answer.to_string()));
        }
    }

    /// Write what the guest's display shows to `path` as a PPM image.
    pub fn screendump(&mut self, path: &Path) -> Result<(), QmpError> {
        let filename = path.to_string_lossy();
        self.execute(
            "screendump",
            Some(json!({ "filename": filename, "format": "ppm" })),
        )
        .map(drop)
    }

    /// Stop QEMU (`quit`). QEMU may close the socket before or after answering; both are fine.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, answers capabilities, sends an event before answering a command,
    /// answers an unknown command with an error, then closes on `quit`.
    #[test]
    fn speaks_qmp_with_a_fake_server() {
        let dir = std::env::temp_dir().join(format!("qmp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut said = Vec::new();
            let send = |w: &mut UnixStream, v: &str| w.write_all(format!("{v}\n").as_bytes());
            send(&mut w, r#"{"QMP":{"version":{"qemu":{"micro":3,"minor":1,"major":11},"package":""},"capabilities":[]}}"#).unwrap();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                said.push(v.clone());
                match v["execute"].as_str().unwrap() {
                    "qmp_capabilities" => send(&mut w, r#"{"return":{}}"#).unwrap(),
                    "screendump" => {
                        send(&mut w, r#"{"event":"RESET","data":{},"timestamp":{}}"#).unwrap();
                        send(&mut w, r#"{"return":{}}"#).unwrap();
                    }
                    "quit" => break,
                    _ => send(
                        &mut w,
                        r#"{"error":{"class":"CommandNotFound","desc":"nope"}}"#,
                    )
                    .unwrap(),
                }
            }
            said
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version(), "11.1.3");
        q.screendump(Path::new("/tmp/x.ppm")).unwrap();
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.events()[0]["event"], "RESET");
        match q.execute("bogus", None) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("CommandNotFound", "nope"))
            }
            other => panic!("{other:?}"),
        }
        q.quit().unwrap();
        let said = server.join().unwrap();
        assert_eq!(said[1]["arguments"]["format"], "ppm");
        assert_eq!(said[1]["arguments"]["filename"], "/tmp/x.ppm");
        assert_eq!(said.last().unwrap()["execute"], "quit");
        std::fs::remove_dir_all(dir).unwrap();
        let missing = Qmp::connect(Path::new("/nonexistent/q.sock"), Duration::ZERO);
        assert!(
            matches!(missing, Err(QmpError::Connect { .. })),
            "{missing:?}"
        );
    }
}
