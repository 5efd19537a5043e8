//! Where the proxy calls the module pipeline: one function
//! ([`Core::run_point`]) runs a point's modules (skipping those switched
//! off at run time or shed under overload, building each one's context),
//! and one entry per point says which list runs and what each module is
//! given. Each entry returns the modules' verdict; what it means for the
//! session is decided by the state that called it. With no module
//! configured, every entry returns after one check.

use crate::shm::metrics;
use std::time::Instant;

use crate::hooks::{Connection, Ctx, Finished, Module, Point, Vars, Verdict};
use crate::http::{ResponseHead, Version};
use crate::net::Peer;

use super::core::{Core, Snapshot};
use super::session::Session;

fn client_ip(p: Peer) -> Option<std::net::IpAddr> {
    match p {
        Peer::Ip(ip) => Some(ip),
        Peer::Unix => None,
    }
}

/// What a request point's context shows.
#[derive(Clone, Copy)]
struct AtRequest<'a> {
    route: Option<usize>,
    /// The cluster chosen so far (BEFORE_CLUSTER and AFTER_CLUSTER
    /// handlers may choose another one).
    cluster: Option<usize>,
    backend: Option<&'a str>,
}

/// One run of a point's modules.
struct Run<'a> {
    snap: &'a Snapshot,
    point: Point,
    list: &'a [usize],
    peer: Peer,
    vars: &'a mut Vars,
    /// `None` at the connection points (ACCEPT, FINISH).
    request: Option<AtRequest<'a>>,
}

impl Core {
    /// Non-essential modules are off while the worker is overloaded.
    fn shedding(&self) -> bool {
        self.load_level >= 1
    }

    /// Runs the modules of `run.list` in order, calling each through
    /// `call` with its context, until one returns something other than
    /// `Continue`. A module switched off (or shed) is skipped, except at
    /// REQUEST_FINISH for a module that ran before it (a quota gives back
    /// what it took).
    fn run_point(&self, run: &mut Run<'_>, mut call: impl FnMut(&dyn Module, &mut Ctx<'_>) -> Verdict) -> Verdict {
        let m = &run.snap.modules;
        let shedding = self.shedding();
        let chooses = matches!(run.point, Point::BeforeCluster | Point::AfterCluster);
        for &i in run.list {
            let ran_before = run.point == Point::RequestFinish && run.vars.get(i) != 0;
            if !m.active(i, self.shared, shedding) && !ran_before {
                continue;
            }
            let mut ctx = Ctx::new(&run.snap.config, self.shared, &self.log, run.vars);
            ctx.now = self.now;
            ctx.client = client_ip(run.peer);
            ctx.module = i;
            ctx.load_level = self.load_level;
            ctx.worker = self.place;
            if let Some(r) = &run.request {
                ctx.route = r.route.map(|r| &run.snap.config.routes[r]);
                ctx.cluster = r.cluster;
                ctx.backend = r.backend;
            }
            let verdict = call(&*m.loaded[i].module, &mut ctx);
            let chosen = ctx.cluster;
            if let (true, Some(c), Some(r)) = (chooses, chosen, run.request.as_mut()) {
                r.cluster = Some(c);
            }
            if !matches!(verdict, Verdict::Continue) {
                return verdict;
            }
        }
        Verdict::Continue
    }

    /// ACCEPT: `Respond` or `Close` end the connection (no request was read).
    pub(super) fn hook_accept(&mut self, s: &mut Session) -> Verdict {
        if s.snap.modules.global.at(Point::Accept).is_empty() {
            return Verdict::Continue;
        }
        let snap = s.snap.clone();
        let conn = Connection { client: client_ip(s.peer), requests: 0, duration: Default::default() };
        let list = snap.modules.global.at(Point::Accept);
        let mut run = Run { snap: &snap, point: Point::Accept, list, peer: s.peer, vars: &mut s.vars, request: None };
        self.run_point(&mut run, |m, ctx| m.accept(&conn, ctx))
    }

    /// BEFORE_CLUSTER and AFTER_CLUSTER: handlers may rewrite the request,
    /// choose the cluster, or answer.
    pub(super) fn hook_request(&mut self, s: &mut Session, point: Point) -> Verdict {
        if s.snap.modules.pipeline_for(s.ex.route).at(point).is_empty() {
            return Verdict::Continue;
        }
        let snap = s.snap.clone();
        let backend = self.backend_name(s);
        let at = at_request(s, backend);
        let list = snap.modules.pipeline_for(s.ex.route).at(point);
        let mut run = Run { snap: &snap, point, list, peer: s.peer, vars: &mut s.vars, request: Some(at) };
        let req = &mut s.req;
        let verdict = self.run_point(&mut run, |m, ctx| match point {
            Point::BeforeCluster => m.before_cluster(req, ctx),
            _ => m.after_cluster(req, ctx),
        });
        if let Some(c) = run.request.and_then(|r| r.cluster) {
            s.ex.cluster = c;
            s.ex.cluster_chosen = true;
        }
        verdict
    }

    /// BACKEND_RESPONSE: handlers may rewrite the response head, answer
    /// instead of the backend, or close.
    pub(super) fn hook_response(&mut self, s: &mut Session, resp: &mut ResponseHead) -> Verdict {
        if s.snap.modules.pipeline_for(s.ex.route).at(Point::BackendResponse).is_empty() {
            return Verdict::Continue;
        }
        let snap = s.snap.clone();
        let backend = self.backend_name(s);
        let at = at_request(s, backend);
        let list = snap.modules.pipeline_for(s.ex.route).at(Point::BackendResponse);
        let point = Point::BackendResponse;
        let mut run = Run { snap: &snap, point, list, peer: s.peer, vars: &mut s.vars, request: Some(at) };
        self.run_point(&mut run, |m, ctx| m.backend_response(resp, ctx))
    }

    /// REQUEST_FINISH, once per exchange that was started.
    pub(super) fn hook_request_finish(&mut self, s: &mut Session) {
        if !s.finish_pending() {
            return;
        }
        s.ex.finish_pending = false;
        // The loop's clock (read once per turn, as nginx's cached time):
        // no clock read per request for the figures.
        count_finished(s, self.now);
        if s.snap.modules.pipeline_for(s.ex.route).at(Point::RequestFinish).is_empty() {
            return;
        }
        let now = Instant::now();
        let snap = s.snap.clone();
        let backend = self.backend_name(s);
        let done = Finished {
            method: s.req.method(),
            target: s.req.target(),
            version: match s.req.version() {
                Version::Http10 => "HTTP/1.0",
                Version::Http11 => "HTTP/1.1",
            },
            host: s.req.host(),
            status: s.ex.status,
            bytes: s.ex.bytes_out,
            duration: s.ex.started.map_or_else(Default::default, |t| now.saturating_duration_since(t)),
            upstream_time: s.ex.upstream_started.map(|t| now.saturating_duration_since(t)),
            backend,
            headers: &s.req.head,
            tls: s.stream.tls_params(),
        };
        let at = at_request(s, backend);
        let list = snap.modules.pipeline_for(s.ex.route).at(Point::RequestFinish);
        let point = Point::RequestFinish;
        let mut run = Run { snap: &snap, point, list, peer: s.peer, vars: &mut s.vars, request: Some(at) };
        self.run_point(&mut run, |m, ctx| {
            m.request_finish(&done, ctx);
            Verdict::Continue
        });
    }

    /// FINISH: the client connection is closing (REQUEST_FINISH first, if
    /// it is still owed).
    pub(super) fn hook_finish(&mut self, s: &mut Session) {
        self.hook_request_finish(s);
        if s.snap.modules.global.at(Point::Finish).is_empty() {
            return;
        }
        let snap = s.snap.clone();
        let conn = Connection { client: client_ip(s.peer), requests: s.requests, duration: s.accepted.elapsed() };
        let list = snap.modules.global.at(Point::Finish);
        let mut run = Run { snap: &snap, point: Point::Finish, list, peer: s.peer, vars: &mut s.vars, request: None };
        self.run_point(&mut run, |m, ctx| {
            m.finish(&conn, ctx);
            Verdict::Continue
        });
    }

    /// The backend the exchange went to (it may have been released already).
    fn backend_name(&self, s: &Session) -> Option<&str> {
        s.ex.upstream_started?;
        let member = s.snap.clusters.get(s.ex.cluster)?.members.get(s.ex.backend)?;
        Some(self.backends.get(member.id).name.as_str())
    }
}

/// A request ended: its figures in this worker's block of the shared
/// region (by route and cluster series; durations in microseconds).
fn count_finished(s: &Session, now: Instant) {
    let route = s.ex.route.and_then(|r| s.snap.route_series.get(r).copied()).unwrap_or(0);
    let cluster = if s.ex.cluster_chosen { s.snap.cluster_series.get(s.ex.cluster).copied().unwrap_or(0) } else { 0 };
    let micros = |t: Instant| now.saturating_duration_since(t).as_micros() as u64;
    let duration = s.ex.started.map_or(0, micros);
    metrics::here().finished(route, cluster, s.ex.status, duration, s.ex.upstream_started.map(micros));
}

/// What modules at a request point learn of the request's routing.
fn at_request<'a>(s: &Session, backend: Option<&'a str>) -> AtRequest<'a> {
    AtRequest { route: s.ex.route, cluster: s.ex.cluster_chosen.then_some(s.ex.cluster), backend }
}
