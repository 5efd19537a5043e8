//! Where the worker calls the hook pipeline: building each handler's
//! context from the session, skipping modules switched off (at run time,
//! or shed under overload), and turning a handler's verdict into the
//! session's next step. With no module configured, every entry point
//! returns after one check.
// missing_docs: documented in the proxy/ restructuring (issue 10)
#![allow(missing_docs)]

use std::time::Instant;

use crate::hooks::{Connection, Ctx, Finished, Modules, Point, Response, Verdict};
use crate::http::Version;
use crate::net::Peer;

use super::session::{Session, Step};
use super::Core;

fn client_ip(p: Peer) -> Option<std::net::IpAddr> {
    match p {
        Peer::Ip(ip) => Some(ip),
        Peer::Unix => None,
    }
}

impl Core {
    /// Non-essential modules are off while the worker is overloaded.
    fn shedding(&self) -> bool {
        self.load_level >= 1
    }

    /// ACCEPT. `Err(None)`: a module closed the connection; `Err(Some(r))`:
    /// a module answers it with `r` (then it is closed: no request was read).
    pub(super) fn hook_accept(&mut self, s: &mut Session) -> Result<(), Option<Response>> {
        if s.snap.modules.global.at(Point::Accept).is_empty() {
            return Ok(());
        }
        let snap = s.snap.clone();
        let m: &Modules = &snap.modules;
        let conn = Connection { client: client_ip(s.peer), requests: 0, duration: Default::default() };
        for &i in m.global.at(Point::Accept) {
            if !m.active(i, self.shared, self.shedding()) {
                continue;
            }
            let mut ctx = self.ctx(s.peer, &mut s.vars, i, &snap);
            match m.loaded[i].module.accept(&conn, &mut ctx) {
                Verdict::Continue => {}
                Verdict::Close => return Err(None),
                Verdict::Respond(r) => return Err(Some(r)),
            }
        }
        Ok(())
    }

    /// BEFORE_CLUSTER and AFTER_CLUSTER: handlers may rewrite the request,
    /// choose the cluster (before), or answer. `Some(step)`: they answered
    /// or closed.
    pub(super) fn hook_request(&mut self, s: &mut Session, point: Point) -> Option<Step> {
        if s.snap.modules.pipeline_for(s.ex.route).at(point).is_empty() {
            return None;
        }
        let snap = s.snap.clone();
        let m = &snap.modules;
        let list = m.pipeline_for(s.ex.route).at(point);
        let backend = self.backend_name(s);
        for &i in list {
            if !m.active(i, self.shared, self.shedding()) {
                continue;
            }
            let cluster = s.ex.cluster_chosen.then_some(s.ex.cluster);
            let mut ctx = self.request_ctx(s.peer, &mut s.vars, i, &snap, (s.ex.route, cluster, backend.as_deref()));
            let module = &m.loaded[i].module;
            let verdict = match point {
                Point::BeforeCluster => module.before_cluster(&mut s.req, &mut ctx),
                _ => module.after_cluster(&mut s.req, &mut ctx),
            };
            if let Some(c) = ctx.cluster {
                s.ex.cluster = c;
                s.ex.cluster_chosen = true;
            }
            match verdict {
                Verdict::Continue => {}
                Verdict::Respond(r) => return Some(self.respond_module(s, &r)),
                Verdict::Close => {
                    self.release_upstream(s, false);
                    return Some(Step::Close);
                }
            }
        }
        None
    }

    /// BACKEND_RESPONSE. `Some(step)`: a module replaced the response or
    /// closed; the backend's response is dropped.
    pub(super) fn hook_response(&mut self, s: &mut Session) -> Option<Step> {
        if s.snap.modules.pipeline_for(s.ex.route).at(Point::BackendResponse).is_empty() {
            return None;
        }
        let snap = s.snap.clone();
        let m = &snap.modules;
        let list = m.pipeline_for(s.ex.route).at(Point::BackendResponse);
        let backend = self.backend_name(s);
        for &i in list {
            if !m.active(i, self.shared, self.shedding()) {
                continue;
            }
            let cluster = s.ex.cluster_chosen.then_some(s.ex.cluster);
            let mut ctx = self.request_ctx(s.peer, &mut s.vars, i, &snap, (s.ex.route, cluster, backend.as_deref()));
            match m.loaded[i].module.backend_response(&mut s.resp, &mut ctx) {
                Verdict::Continue => {}
                // respond_module gives the backend connection up (unpooled).
                Verdict::Respond(r) => return Some(self.respond_module(s, &r)),
                Verdict::Close => {
                    self.release_upstream(s, false);
                    return Some(Step::Close);
                }
            }
        }
        None
    }

    /// REQUEST_FINISH, once per exchange that was started.
    pub(super) fn hook_request_finish(&mut self, s: &mut Session) {
        if !std::mem::take(&mut s.ex.finish_pending)
            || s.snap.modules.pipeline_for(s.ex.route).at(Point::RequestFinish).is_empty()
        {
            return;
        }
        let snap = s.snap.clone();
        let m = &snap.modules;
        let list = m.pipeline_for(s.ex.route).at(Point::RequestFinish);
        let backend = self.backend_name(s);
        let now = Instant::now();
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
            backend: backend.as_deref(),
            user_agent: s.req.head.get("user-agent").unwrap_or(b""),
            referer: s.req.head.get("referer").unwrap_or(b""),
            request_id: s.req.head.get("x-request-id").unwrap_or(b""),
        };
        for &i in list {
            // REQUEST_FINISH always runs for a module that ran before it
            // (a quota gives back what it took), even if it was switched
            // off in the meantime.
            if !m.active(i, self.shared, self.shedding()) && s.vars.get(i) == 0 {
                continue;
            }
            let cluster = s.ex.cluster_chosen.then_some(s.ex.cluster);
            let mut ctx = self.request_ctx(s.peer, &mut s.vars, i, &snap, (s.ex.route, cluster, backend.as_deref()));
            m.loaded[i].module.request_finish(&done, &mut ctx);
        }
    }

    /// FINISH: the client connection is closing.
    pub(super) fn hook_finish(&mut self, s: &mut Session) {
        self.hook_request_finish(s);
        if s.snap.modules.global.at(Point::Finish).is_empty() {
            return;
        }
        let snap = s.snap.clone();
        let m = &snap.modules;
        let list = m.global.at(Point::Finish);
        let conn = Connection { client: client_ip(s.peer), requests: s.requests, duration: s.accepted.elapsed() };
        for &i in list {
            if !m.active(i, self.shared, self.shedding()) {
                continue;
            }
            let mut ctx = self.ctx(s.peer, &mut s.vars, i, &snap);
            m.loaded[i].module.finish(&conn, &mut ctx);
        }
    }

    /// The context of a connection point (ACCEPT, FINISH): no request.
    fn ctx<'a>(&'a self, peer: Peer, vars: &'a mut crate::hooks::Vars, i: usize, snap: &'a super::Snapshot) -> Ctx<'a> {
        let mut ctx = Ctx::new(&snap.config, self.shared, &self.log, vars);
        ctx.now = self.now;
        ctx.client = client_ip(peer);
        ctx.module = i;
        ctx.load_level = self.load_level;
        ctx.worker = self.place;
        ctx
    }

    /// The context of a request point: (route, cluster, backend) so far.
    fn request_ctx<'a>(
        &'a self,
        peer: Peer,
        vars: &'a mut crate::hooks::Vars,
        i: usize,
        snap: &'a super::Snapshot,
        (route, cluster, backend): (Option<usize>, Option<usize>, Option<&'a str>),
    ) -> Ctx<'a> {
        let mut ctx = self.ctx(peer, vars, i, snap);
        ctx.route = route.map(|r| &snap.config.routes[r]);
        ctx.cluster = cluster;
        ctx.backend = backend;
        ctx
    }

    /// The backend the exchange went to (it may have been released already).
    fn backend_name(&self, s: &Session) -> Option<String> {
        s.ex.upstream_started?;
        let member = s.snap.clusters.get(s.ex.cluster)?.members.get(s.ex.backend)?;
        Some(self.backends.get(member.id).name.clone())
    }

    /// Answers with a module's response.
    fn respond_module(&mut self, s: &mut Session, r: &Response) -> Step {
        self.respond_with(s, r.status, &r.headers, &r.body)
    }
}
