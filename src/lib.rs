//! Pitcher: an HTTP/1.1 reverse proxy built as a master process and
//! single-threaded mio workers. See `docs/ARCHITECTURE.md`.
//!
//! Layers point one way: `config` and `http` are pure (no I/O); `net`,
//! `buffer`, `shm`, `router`, `upstream`, `hooks` and `tls` (TLS between a
//! client socket and its session) are the proxy's parts; `fleet` (limits
//! shared by hosts through Redis) sits on `shm`: its lease threads run in
//! the master, its admission in the workers;
//! `proxy` is the state machine of client connections on them; `worker`
//! is the process and event loop around `proxy`; `master` (which imports
//! nothing of the engine) and the binary sit on top.

pub mod buffer;
pub mod channel;
pub mod config;
pub mod control;
pub mod dns;
pub mod fleet;
pub mod hooks;
pub mod http;
pub mod log;
pub mod master;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod router;
pub mod shm;
pub mod syslog;
pub mod timefmt;
pub mod tls;
pub mod upstream;
pub mod worker;
