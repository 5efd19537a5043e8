//! `trace`: logs every hook point a request passes, in order, and tells
//! the client which request points it passed (`X-Pitcher-Trace`). For
//! debugging a pipeline; it is also how the tests watch the order.

use std::sync::Arc;

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Connection, Ctx, Finished, Module, Point, SettingsError, Verdict};
use crate::http::{RequestHead, ResponseHead};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

struct Trace;

pub fn build(c: &ModuleConfig, _: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let _: Settings = super::settings(&c.settings)?;
    Ok(Arc::new(Trace))
}

/// Remembers a point in the request's vars (one bit per point).
fn seen(ctx: &mut Ctx<'_>, p: Point) {
    let v = ctx.vars.get(ctx.module) | 1 << p as u64;
    ctx.vars.set(ctx.module, v);
}

impl Module for Trace {
    fn points(&self) -> &'static [Point] {
        &Point::ALL
    }

    fn accept(&self, conn: &Connection, ctx: &mut Ctx<'_>) -> Verdict {
        slog::info!(ctx.log, "hook"; "point" => Point::Accept.name(), "client" => ?conn.client);
        Verdict::Continue
    }

    fn before_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        seen(ctx, Point::BeforeCluster);
        slog::info!(ctx.log, "hook"; "point" => Point::BeforeCluster.name(), "target" => %String::from_utf8_lossy(req.target()));
        Verdict::Continue
    }

    fn after_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        seen(ctx, Point::AfterCluster);
        slog::info!(ctx.log, "hook"; "point" => Point::AfterCluster.name(), "target" => %String::from_utf8_lossy(req.target()),
            "backend" => ctx.backend.unwrap_or(""));
        Verdict::Continue
    }

    fn backend_response(&self, resp: &mut ResponseHead, ctx: &mut Ctx<'_>) -> Verdict {
        seen(ctx, Point::BackendResponse);
        slog::info!(ctx.log, "hook"; "point" => Point::BackendResponse.name(), "status" => resp.status);
        let bits = ctx.vars.get(ctx.module);
        let names: Vec<&str> = Point::ALL.iter().filter(|p| bits & 1 << **p as u64 != 0).map(|p| p.name()).collect();
        resp.head.append("X-Pitcher-Trace", names.join(",").as_bytes());
        Verdict::Continue
    }

    fn request_finish(&self, done: &Finished<'_>, ctx: &mut Ctx<'_>) {
        slog::info!(ctx.log, "hook"; "point" => Point::RequestFinish.name(), "target" => %String::from_utf8_lossy(done.target),
            "status" => done.status);
    }

    fn finish(&self, conn: &Connection, ctx: &mut Ctx<'_>) {
        slog::info!(ctx.log, "hook"; "point" => Point::Finish.name(), "requests" => conn.requests);
    }
}
