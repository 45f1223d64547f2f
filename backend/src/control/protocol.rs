//! The control protocol: one JSON object per line, in the spirit of QMP.
//!
//! The server greets each connection with
//! `{"gpu-backend": {"version": "0.1.0", "protocol": 1, "capabilities": [...]}}`; each
//! request is `{"execute": COMMAND, "arguments": {...}, "id": ANY}` (`arguments` and `id`
//! optional) and gets `{"return": ..., "id": ...}` or
//! `{"error": {"class": CLASS, "desc": TEXT}, "id": ...}`. Commands and their arguments are
//! in `docs/control.md`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of this protocol (the greeting's `protocol`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// What the server announces first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Greeting {
    /// The greeting body.
    #[serde(rename = "gpu-backend")]
    pub body: GreetingBody,
}

/// The greeting's contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GreetingBody {
    /// The backend's version.
    pub version: String,
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// What this backend can do.
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// This backend's greeting.
    pub fn ours() -> Greeting {
        Greeting {
            body: GreetingBody {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: PROTOCOL_VERSION,
                capabilities: vec!["guests".into(), "displays".into()],
            },
        }
    }
}

/// A request as it arrives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The command.
    pub execute: String,
    /// Its arguments (an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// Echoed in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// Arguments of `add`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    /// The vfio-user socket to create.
    pub socket: String,
    /// VRAM: bytes, or a size string (`"512M"`, `"8G"`); a multiple of 2 MiB.
    pub vram: Size,
    /// The display socket to create, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// Offer MSI-X (the default). `false` presents the function with INTx only, which QEMU
    /// 11.1.3 needs to hot-unplug it without aborting.
    #[serde(default = "offer_msix")]
    pub msix: bool,
}

/// MSI-X is offered unless asked otherwise.
pub(crate) fn offer_msix() -> bool {
    true
}

/// A size as the protocol carries it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// A size string with a K/M/G/T suffix.
    Text(String),
}

/// Arguments of `remove`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveArgs {
    /// The guest's vfio-user socket.
    pub socket: String,
    /// Disconnect a connected guest.
    #[serde(default)]
    pub force: bool,
}

/// Arguments of `stats`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatsArgs {
    /// Only this guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// Error classes of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// The line is not a request (bad JSON, not an object, unknown fields, too long).
    InvalidRequest,
    /// No such command.
    CommandNotFound,
    /// Arguments missing, of the wrong type, or out of range.
    InvalidParameter,
    /// The guest or path named does not exist or is taken.
    NotFound,
    /// The guest is in use (connected) and the request did not force it.
    Busy,
    /// The request was well formed but could not be carried out.
    GenericError,
}

/// An error answer's body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Its class.
    pub class: ErrorClass,
    /// What went wrong.
    pub desc: String,
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// Success.
    Return {
        /// The result.
        #[serde(rename = "return")]
        value: Value,
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// Failure.
    Error {
        /// What went wrong.
        error: ErrorBody,
        /// The request's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

impl Answer {
    /// An error answer.
    pub fn error(class: ErrorClass, desc: impl Into<String>, id: Option<Value>) -> Answer {
        Answer::Error {
            error: ErrorBody {
                class,
                desc: desc.into(),
            },
            id,
        }
    }
}
