//! Runs the unit tests of `examples/deny_path.rs` in the normal `cargo
//! test` (an example's own tests run only with `cargo test --examples`).

#[allow(dead_code)]
#[path = "../examples/deny_path.rs"]
mod deny_path;
