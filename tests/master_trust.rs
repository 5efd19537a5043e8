//! Trust boundaries of the process model: a configuration far larger than
//! one socket message reaches the workers and a new master; the control
//! socket serves only root and the master's user, and a silent or
//! oversized client cannot stall the master; the pid file is locked by its
//! master, so a second master refuses to start and `-s` never signals a
//! process that is not a Pitcher master.

mod common;

use std::time::Duration;

use common::master::{alive, wait_gone, MasterRun};
use common::*;

/// Routes `/route-N/` for N in 0..count, all to cluster `a`, each with a
/// long name: 9000 routes make about 4.5 MiB of TOML, more than one socket
/// message can carry even where `net.core.wmem_max` was raised to 4 MiB.
fn many_routes(a: &Backend, count: usize) -> ConfigBuilder {
    let mut b = ConfigBuilder::new()
        .top("workers = 2")
        .top("drain_timeout_ms = 1500")
        .top("upgrade_timeout_ms = 10000")
        .cluster("a", [a.spec()]);
    for i in 0..count {
        b = b.section(&format!(
            "[[routes]]\nname = \"route-{i:05}-{}\"\npath_prefix = \"/route-{i}/\"\ncluster = \"a\"",
            "of-a-configuration-larger-than-one-socket-message-".repeat(9)
        ));
    }
    b
}

#[test]
fn a_configuration_of_more_than_a_mebibyte_starts_reloads_and_upgrades() {
    let a = Backend::start("A");
    let builder = many_routes(&a, 9000);
    let mut m = MasterRun::start(&builder);
    let size = std::fs::metadata(m.config_path()).unwrap().len();
    assert!(size >= 4 << 20, "the configuration is {size} bytes");
    let get = |m: &MasterRun, path: &str| get_once(m.addr(), "t.example", path).status;
    assert_eq!(get(&m, "/route-4321/x"), 200, "{}", m.log());
    assert_eq!(get(&m, "/route-9000/x"), 404, "no such route");

    // Reload with one more route: every worker takes the new file.
    let builder = many_routes(&a, 9001);
    m.write_config(&builder);
    let out = m.signal_cmd("reload");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert_eq!(get(&m, "/route-9000/x"), 200);
    assert_eq!(get(&m, "/route-17/x"), 200);

    let old = m.pid().unwrap();
    let out = m.signal_cmd("upgrade");
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let new = m.pid().unwrap();
    m.track(new);
    assert_ne!(new, old);
    assert!(wait_gone(old, Duration::from_secs(10)), "the old master exits");
    m.wait_ready(common::master::READY_TIMEOUT).expect("the new generation is ready");
    assert_eq!(get(&m, "/route-8999/x"), 200);
    assert_eq!(get(&m, "/route-9001/x"), 404);
    assert!(alive(new));
}
