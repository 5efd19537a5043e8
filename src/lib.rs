//! Pitcher: an HTTP/1.1 reverse proxy built as a master process and
//! single-threaded mio workers. See `docs/ARCHITECTURE.md`.
//!
//! Layers point one way: `config` and `http` are pure (no I/O); `net`,
//! `buffer`, `router` and `upstream` are the worker's parts; `worker` is
//! the event loop and proxy state machine on top of them.

pub mod buffer;
pub mod channel;
pub mod config;
pub mod control;
pub mod hooks;
pub mod http;
pub mod log;
pub mod master;
pub mod net;
pub mod router;
pub mod shm;
pub mod syslog;
pub mod timefmt;
pub mod upstream;
pub mod worker;
