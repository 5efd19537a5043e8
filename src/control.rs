//! The control socket protocol (`pitcher -s ...`, `pitcher ctl ...`): one
//! JSON request line (at most 64 KiB, sent within 2 s), one JSON reply
//! line, over the master's Unix socket (mode 0600; root and the master's
//! user only). The client side is here too; the master answers in
//! `master::control`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A command to the master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// `reload`, `upgrade`, `quit`, `stop`, `reopen`, `status`.
    pub cmd: String,
    /// The command's arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// The master's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Done (`false`: refused or failed).
    pub ok: bool,
    /// One line for the operator.
    pub message: String,
    /// Structured details (`ctl --json`), or null.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Reply {
    /// A success with `message`.
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply { ok: true, message: message.into(), data: serde_json::Value::Null }
    }
    /// A refusal or failure with `message`.
    pub fn err(message: impl Into<String>) -> Reply {
        Reply { ok: false, message: message.into(), data: serde_json::Value::Null }
    }
}

/// How long a client waits for the master's answer (a reload waits for
/// every worker, an upgrade for the new master).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one command to the master listening at `socket`.
pub fn send(socket: &Path, req: &Request) -> io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    if let Err(e) = s.write_all(&line) {
        // A master that refuses us may answer and close before we wrote:
        // its answer says why, so read it.
        if e.kind() != io::ErrorKind::BrokenPipe {
            return Err(e);
        }
    }
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the master closed the control connection"));
    }
    serde_json::from_str(&reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
