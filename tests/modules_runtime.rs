//! Switching modules at run time with two workers: `pitcher ctl module
//! disable|enable NAME` takes effect on every worker at once, without a
//! reload, and the switch survives a reload; `pitcher ctl modules` (text and
//! `--json`) shows it; an unknown name is refused with a message.

mod common;

use std::time::Duration;

use common::master::MasterRun;
use common::upstream::{get_new_conn, reload, switches, worker_pids};
use common::*;

/// Requests per check: on new connections, so both workers serve some.
const ROUNDS: usize = 60;

fn config(be: &Backend) -> ConfigBuilder {
    ConfigBuilder::new().top("workers = 2").cluster("app", [be.spec()]).route(None, "/", "app").section(
        "[modules.headers]\nresponse_set = { \"X-Headers\" = \"on\" }\n\n\
         [modules.trace]\nenabled = false\n",
    )
}

/// `ROUNDS` requests on new connections: how many carried `X-Headers`.
/// Every request must succeed; every worker must have served (it woke up
/// for them: its context switches rose).
fn with_header(m: &MasterRun, what: &str) -> usize {
    let pids = worker_pids(m);
    assert_eq!(pids.len(), 2, "two workers expected");
    let before: Vec<u64> = pids.iter().map(|&p| switches(p)).collect();
    let mut n = 0;
    for i in 0..ROUNDS {
        let r = get_new_conn(m.addr(), &format!("/{what}/{i}"), &[]).unwrap_or_else(|e| panic!("{what} {i}: {e}"));
        assert_ok_body(&r, b"ok from a");
        if r.header("x-headers") == Some("on") {
            n += 1;
        }
    }
    let woke: Vec<u64> = pids.iter().zip(&before).map(|(&p, b)| switches(p) - b).collect();
    assert!(woke.iter().all(|&w| w >= 10), "both workers should have served ({what}): context switches {woke:?}");
    n
}

/// `ctl --json modules`: the row of `name`.
fn module_row(m: &MasterRun, name: &str) -> serde_json::Value {
    let out = m.command(&["ctl", "--json", "modules"]);
    assert!(out.status.success(), "ctl --json modules: {out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(v["ok"], serde_json::Value::Bool(true), "{v}");
    let rows = v["data"]["modules"].as_array().unwrap_or_else(|| panic!("no data.modules: {v}"));
    rows.iter().find(|r| r["name"] == name).cloned().unwrap_or_else(|| panic!("no row {name}: {v}"))
}

/// `ctl modules` (text): the line of `name`.
fn module_line(m: &MasterRun, name: &str) -> String {
    let out = m.command(&["ctl", "modules"]);
    assert!(out.status.success(), "ctl modules: {out:?}");
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name}: {}", out.stdout))
        .to_string()
}

fn ctl(m: &MasterRun, args: &[&str]) -> String {
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    let out = m.command(&all);
    assert!(out.status.success(), "{args:?}: {out:?}");
    out.all()
}

#[test]
fn disable_and_enable_take_effect_on_all_workers_and_survive_a_reload() {
    let be = Backend::start("a");
    let mut m = MasterRun::start(&config(&be));

    assert_eq!(with_header(&m, "before"), ROUNDS, "the module is on");
    let line = module_line(&m, "headers");
    assert!(line.contains("on") && !line.contains("disabled"), "{line}");
    assert_eq!(module_row(&m, "headers")["runtime_disabled"], false);
    assert_eq!(module_row(&m, "trace")["enabled"], false, "a configured but disabled module is listed");

    let out = ctl(&m, &["module", "disable", "headers"]);
    assert!(out.contains("headers"), "{out}");
    assert_eq!(with_header(&m, "disabled"), 0, "no worker may run a disabled module");
    let line = module_line(&m, "headers");
    assert!(line.contains("disabled"), "{line}");
    let row = module_row(&m, "headers");
    assert_eq!(row["runtime_disabled"], true, "{row}");
    assert_eq!(row["state"], "disabled", "{row}");

    // A reload keeps the switch (the workers are new configurations; the
    // switch lives in shared memory).
    reload(&mut m, &config(&be));
    assert_eq!(with_header(&m, "reloaded"), 0, "the switch was lost by the reload");
    assert_eq!(module_row(&m, "headers")["runtime_disabled"], true);
    assert!(module_line(&m, "headers").contains("disabled"));

    ctl(&m, &["module", "enable", "headers"]);
    assert_eq!(with_header(&m, "enabled"), ROUNDS, "every worker runs the module again");
    let row = module_row(&m, "headers");
    assert_eq!(row["runtime_disabled"], false, "{row}");
    assert_eq!(row["state"], "on", "{row}");
}

#[test]
fn switching_an_unknown_module_fails_with_a_message() {
    let be = Backend::start("a");
    let m = MasterRun::start(&config(&be));
    for json in [false, true] {
        let mut args = vec!["ctl"];
        if json {
            args.push("--json");
        }
        args.extend(["module", "disable", "nosuch"]);
        let out = m.command(&args);
        assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
        assert!(out.all().contains("nosuch"), "the message names the module: {out:?}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
            assert_eq!(v["ok"], false, "{v}");
        }
    }
    let out = m.command(&["ctl", "module", "frobnicate", "headers"]);
    assert!(!out.status.success(), "{out:?}");
    let out = m.command(&["ctl", "module", "disable"]);
    assert!(!out.status.success(), "{out:?}");
    // Nothing was switched.
    let r = get_new_conn(m.addr(), "/x", &[]).expect("request");
    assert_eq!(r.header("x-headers"), Some("on"));
    assert!(wait_until(Duration::from_secs(1), || module_row(&m, "headers")["runtime_disabled"] == false));
}
