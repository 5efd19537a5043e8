//! `headers`: sets, appends or removes request and response header fields,
//! for every route that runs it, plus rules for named routes.
//!
//! ```toml
//! [modules.headers]
//! request_set = { "X-Env" = "prod" }
//! request_remove = ["X-Debug"]
//! response_append = { "Via" = "1.1 pitcher" }
//! [modules.headers.routes.api]        # only for the route named "api"
//! response_set = { "Cache-Control" = "no-store" }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ModuleConfig;
use crate::hooks::{Build, Ctx, Module, Point, SettingsError, Verdict};
use crate::http::{Head, RequestHead, ResponseHead};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rules {
    #[serde(default)]
    request_set: BTreeMap<String, String>,
    #[serde(default)]
    request_append: BTreeMap<String, String>,
    #[serde(default)]
    request_remove: Vec<String>,
    #[serde(default)]
    response_set: BTreeMap<String, String>,
    #[serde(default)]
    response_append: BTreeMap<String, String>,
    #[serde(default)]
    response_remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(flatten)]
    all: Rules,
    #[serde(default)]
    routes: BTreeMap<String, Rules>,
}

struct Headers {
    all: Rules,
    routes: BTreeMap<String, Rules>,
}

pub fn build(c: &ModuleConfig, b: &Build) -> Result<Arc<dyn Module>, SettingsError> {
    let s: Settings = super::settings(&c.settings)?;
    for r in std::iter::once(&s.all).chain(s.routes.values()) {
        for (k, v) in r.request_set.iter().chain(&r.request_append).chain(&r.response_set).chain(&r.response_append) {
            if k.is_empty() || !k.bytes().all(crate::http::head::is_tchar) {
                return Err(format!("header name {k:?} is not a token").into());
            }
            if v.bytes().any(|c| c < 0x20 && c != b'\t' || c == 0x7f) {
                return Err(format!("header {k:?}: the value has control characters").into());
            }
        }
    }
    for name in s.routes.keys() {
        if !b.config.routes.iter().any(|r| &r.name == name) {
            return Err(format!("routes.{name}: no route has that name").into());
        }
    }
    Ok(Arc::new(Headers { all: s.all, routes: s.routes }))
}

fn apply(head: &mut Head, set: &BTreeMap<String, String>, append: &BTreeMap<String, String>, remove: &[String]) {
    for n in remove {
        head.remove(n);
    }
    for (n, v) in set {
        head.set(n, v.as_bytes());
    }
    for (n, v) in append {
        head.append(n, v.as_bytes());
    }
}

impl Headers {
    fn rule_sets<'a>(&'a self, ctx: &Ctx<'_>) -> impl Iterator<Item = &'a Rules> {
        let route = ctx.route.and_then(|r| self.routes.get(&r.name));
        std::iter::once(&self.all).chain(route)
    }
}

impl Module for Headers {
    fn points(&self) -> &'static [Point] {
        &[Point::BeforeCluster, Point::BackendResponse]
    }

    fn before_cluster(&self, req: &mut RequestHead, ctx: &mut Ctx<'_>) -> Verdict {
        for r in self.rule_sets(ctx) {
            apply(&mut req.head, &r.request_set, &r.request_append, &r.request_remove);
        }
        Verdict::Continue
    }

    fn backend_response(&self, resp: &mut ResponseHead, ctx: &mut Ctx<'_>) -> Verdict {
        for r in self.rule_sets(ctx) {
            apply(&mut resp.head, &r.response_set, &r.response_append, &r.response_remove);
        }
        Verdict::Continue
    }
}
