//! Pitcher: an HTTP/1.1 reverse proxy built as a master process and
//! single-threaded mio workers. See `docs/ARCHITECTURE.md`.
//!
//! Layers point one way: `http` and `config` are pure (no I/O); `net`,
//! `buffer`, `shm` and `router` sit on them; `upstream` and `hooks` on
//! those; `worker` (the event loop and proxy state machine) and `master`
//! on top, with `channel`, `control` and `log` between them. The master
//! imports nothing of the engine (see `docs/ARCHITECTURE.md`).

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
pub mod upstream;
pub mod worker;
