//! [`ControlClient`]: the client side of the control socket, behind `gpu-backend ctl`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::protocol::{Answer, ErrorBody, Greeting, Request, MAX_LINE};

/// How long the greeting and the answer to a query (`list`, `stats`, which never wait for
/// adds or removals) may take. An add or a removal is waited for as long as it takes: it
/// scrubs VRAM, minutes per GiB on hardware (interrupting the wait leaves the backend
/// carrying it out).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Commands whose answer waits for a scrub.
const SCRUBBING_COMMANDS: [&str; 2] = ["add", "remove"];

/// Errors of the control client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the server failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not the protocol.
    #[error("the control socket answered something unexpected: {0}")]
    Protocol(String),
    /// The server refused the request.
    #[error("{}", .0.desc)]
    Refused(ErrorBody),
}

/// A connection to a backend's control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Greeting,
}

impl ControlClient {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Result<ControlClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let line = read_line(&mut reader)?;
        let greeting: Greeting = serde_json::from_str(&line)
            .map_err(|e| ClientError::Protocol(format!("greeting {line:?}: {e}")))?;
        Ok(ControlClient {
            reader,
            writer,
            greeting,
        })
    }

    /// What the server announced.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs `command` with `arguments`; returns its result.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ClientError> {
        let request = Request {
            execute: command.to_owned(),
            arguments,
            id: None,
        };
        let text =
            serde_json::to_string(&request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let timeout = (!SCRUBBING_COMMANDS.contains(&command)).then_some(ANSWER_TIMEOUT);
        self.reader.get_ref().set_read_timeout(timeout)?;
        writeln!(self.writer, "{text}")?;
        let line = read_line(&mut self.reader)?;
        match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Return { value, .. }) => Ok(value),
            Ok(Answer::Error { error, .. }) => Err(ClientError::Refused(error)),
            Err(e) => Err(ClientError::Protocol(format!("{line:?}: {e}"))),
        }
    }
}

fn read_line(reader: &mut BufReader<UnixStream>) -> Result<String, ClientError> {
    let mut line = String::new();
    let n = std::io::Read::take(&mut *reader, MAX_LINE as u64 * 64).read_line(&mut line)?;
    if n == 0 {
        return Err(ClientError::Protocol(
            "the server closed the connection".into(),
        ));
    }
    Ok(line)
}
