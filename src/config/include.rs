//! Reading a configuration as the master does: the main file, the files
//! it includes (`include = ["conf.d/*.toml"]`, nested, bounded), `${VAR}`
//! expanded in string values, and `"10s"` / `"64KiB"` strings under `*_ms`
//! / `*_bytes` keys turned into integers. The result is ONE self-contained
//! TOML text (no `include` key, no `${`, only integer durations and sizes)
//! that workers parse with [`Config::parse_resolved`], never reading a file
//! or the environment themselves.
//!
//! Each file's text is kept line for line (values are rewritten in place,
//! `include` is blanked), and the files are concatenated, so an error
//! anywhere is reported at its own file, line and column.
//!
//! Owns: include resolution, env expansion and unit conversion at the text
//! level, duplicate clusters and modules across files. Must not: interpret
//! any other setting (that is [`Config::parse_resolved`]'s job).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, Value};

use super::{env, line_col, units, Config, ConfigError, FileConfig};

/// How deep includes may nest (the main file is depth 0).
pub const MAX_INCLUDE_DEPTH: usize = 8;

/// A configuration as the master read it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The resolved, validated configuration.
    pub config: Config,
    /// The resolved text to send to workers ([`Config::parse_resolved`]).
    pub text: String,
    /// The parse of `text` before its checks, for workers
    /// ([`Config::parse_sent`]); `None` if it could not be written.
    pub form: Option<super::Form>,
    /// Every file read, main file first, in the order they were merged.
    pub files: Vec<PathBuf>,
}

/// Reads `path` and what it includes, with the process environment.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line_col: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text, &|name| std::env::var(name).ok())
}

/// Resolves the main file's `text` (read from `path`; includes are
/// relative to its directory) with this environment.
pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
    let mut loader = Loader {
        env,
        parts: Vec::new(),
        seen: Vec::new(),
        clusters: HashMap::new(),
        modules: Vec::new(),
        main_doc: None,
    };
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    loader.file(path, canonical, text.to_string(), 0, &mut Vec::new())?;
    let mut resolved = String::new();
    let mut starts = Vec::with_capacity(loader.parts.len());
    for p in &loader.parts {
        if !resolved.is_empty() && !resolved.ends_with('\n') {
            resolved.push('\n');
        }
        starts.push(resolved.len());
        resolved.push_str(&p.processed);
    }
    let parts = &loader.parts;
    let locate = |offset: usize| {
        let i = starts.iter().rposition(|&s| s <= offset).unwrap_or(0);
        (parts[i].file.clone(), parts[i].locate(offset - starts[i]))
    };
    let file = match loader.main_doc.take() {
        Some(doc) if parts.len() == 1 => FileConfig::read_document(path, doc, &locate)?,
        _ => FileConfig::read(path, &resolved, &locate)?,
    };
    let form = serde_json::to_string(&file).ok();
    let mut config = Config::from_file(path, &resolved, file, &locate)?;
    for m in &mut config.modules {
        if let Some((file, line)) = loader.modules.iter().find(|x| x.0 == m.name).map(|x| (&x.1, x.2)) {
            m.file = file.clone();
            m.line = line;
        }
    }
    Ok(Loaded { config, text: resolved, form, files: loader.parts.iter().map(|p| p.file.clone()).collect() })
}

/// A replaced range: where it is in the processed text and in the original.
#[derive(Debug)]
struct Splice {
    processed: Range<usize>,
    original: Range<usize>,
}

/// One file, processed.
#[derive(Debug)]
struct Part {
    file: PathBuf,
    original: String,
    /// Offset of the start of each line of `original` after the first
    /// (so that locating is a binary search, not a scan of the file: a
    /// file of thousands of clusters locates each of them).
    line_starts: Vec<usize>,
    processed: String,
    /// In text order.
    splices: Vec<Splice>,
}

impl Part {
    /// Line and column in the original file of an offset in `processed`.
    fn locate(&self, p: usize) -> (usize, usize) {
        let mut original = p;
        for s in &self.splices {
            if p < s.processed.start {
                break;
            }
            original = if p < s.processed.end { s.original.start } else { s.original.end + (p - s.processed.end) };
        }
        line_col_in(&self.line_starts, original.min(self.original.len()))
    }
}

/// Line and column of byte `offset` of a file whose lines after the first
/// start at `line_starts`.
fn line_col_in(line_starts: &[usize], offset: usize) -> (usize, usize) {
    let line = line_starts.partition_point(|&s| s <= offset);
    let start = if line == 0 { 0 } else { line_starts[line - 1] };
    (line + 1, offset - start + 1)
}

type Located<T> = Result<T, (Range<usize>, String)>;

struct Loader<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    parts: Vec<Part>,
    /// Canonical path of every file read, and where it was named.
    seen: Vec<(PathBuf, PathBuf)>,
    /// Cluster name → (file, line) of its first definition.
    clusters: HashMap<String, (PathBuf, usize)>,
    /// The parse of the main file when the resolved text is that file as
    /// it is (no include, no `${VAR}`, no unit string): read once, not twice.
    main_doc: Option<ImDocument<String>>,
    /// Module name → (file, line) of its table.
    modules: Vec<(String, PathBuf, usize)>,
}

impl Loader<'_> {
    fn file(
        &mut self,
        path: &Path,
        canonical: PathBuf,
        text: String,
        depth: usize,
        stack: &mut Vec<PathBuf>,
    ) -> Result<(), ConfigError> {
        let at = |text: &str, span: Option<Range<usize>>, reason: String| ConfigError {
            file: path.to_path_buf(),
            line_col: span.map(|s| line_col(text, s.start)),
            reason,
        };
        let doc = ImDocument::parse(text.clone()).map_err(|e| at(&text, e.span(), e.message().to_string()))?;
        let root = doc.as_table();
        if depth > 0 {
            for (key, item) in root.iter() {
                if !allowed_in_include(key, item) {
                    let span = root.get_key_value(key).and_then(|(k, _)| k.span()).or_else(|| item.span());
                    return Err(at(
                        &text,
                        span,
                        format!("{key}: an included file may hold only [[clusters]], [[routes]], [modules.NAME] tables and include"),
                    ));
                }
            }
        }
        let mut edits: Vec<(Range<usize>, String)> = Vec::new();
        let mut includes: Vec<(String, Range<usize>)> = Vec::new();
        for (key, item) in root.iter() {
            if key == "include" {
                let kv = root.get_key_value(key).and_then(|(k, v)| Some(k.span()?.start..v.span()?.end));
                let Some(kv) = kv else { continue };
                includes = self.include_list(item).map_err(|(s, e)| at(&text, Some(s), e))?;
                let blank: String =
                    text[kv.clone()].chars().map(|c| if c == '\n' || c == '\r' { c } else { ' ' }).collect();
                edits.push((kv, blank));
                continue;
            }
            self.walk_item(&text, Some(key), item, &mut edits).map_err(|(s, e)| at(&text, Some(s), e))?;
        }
        let line_starts: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
        // From this parse too: the processed text differs only in values
        // that are neither cluster names nor module tables' keys.
        self.names(path, &line_starts, root)?;
        if depth == 0 && edits.is_empty() {
            // The main file as it is: its parse serves the typed read too
            // unless it includes files (then `edits` blanks `include`).
            self.main_doc = Some(doc);
        } else {
            drop(doc);
        }
        edits.sort_by_key(|e| e.0.start);
        let mut processed = String::with_capacity(text.len());
        let mut splices = Vec::with_capacity(edits.len());
        let mut pos = 0;
        for (range, with) in edits {
            processed.push_str(&text[pos..range.start]);
            let start = processed.len();
            processed.push_str(&with);
            splices.push(Splice { processed: start..processed.len(), original: range.clone() });
            pos = range.end;
        }
        processed.push_str(&text[pos..]);
        let part = Part { file: path.to_path_buf(), original: text.clone(), line_starts, processed, splices };
        self.parts.push(part);
        self.seen.push((canonical.clone(), path.to_path_buf()));

        stack.push(canonical);
        let base = path.parent().unwrap_or(Path::new(""));
        for (pattern, span) in includes {
            let here = |reason: String| at(&text, Some(span.clone()), reason);
            let files = matching_files(base, &pattern).map_err(here)?;
            for file in files {
                let canon = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
                if stack.contains(&canon) {
                    return Err(here(format!("include cycle: {} includes itself through {pattern:?}", file.display())));
                }
                if let Some((_, first)) = self.seen.iter().find(|s| s.0 == canon) {
                    return Err(here(format!(
                        "{} is included twice (it was read already as {})",
                        file.display(),
                        first.display()
                    )));
                }
                if depth + 1 > MAX_INCLUDE_DEPTH {
                    return Err(here(format!("includes nest deeper than {MAX_INCLUDE_DEPTH} files")));
                }
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| here(format!("{}: cannot read: {e}", file.display())))?;
                self.file(&file, canon, text, depth + 1, stack)?;
            }
        }
        stack.pop();
        Ok(())
    }

    /// The patterns of `include = [...]` (or one string), expanded.
    fn include_list(&self, item: &Item) -> Located<Vec<(String, Range<usize>)>> {
        let span = item.span().unwrap_or(0..0);
        let bad =
            || (span.clone(), "include must be a list of file names or patterns, like [\"conf.d/*.toml\"]".to_string());
        let values: Vec<&Value> = match item {
            Item::Value(Value::Array(a)) => a.iter().collect(),
            Item::Value(v @ Value::String(_)) => vec![v],
            _ => return Err(bad()),
        };
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let (Value::String(s), Some(sp)) = (v, v.span()) else { return Err(bad()) };
            let p = env::expand(s.value(), self.env).map_err(|e| (sp.clone(), e))?;
            out.push((p, sp));
        }
        Ok(out)
    }

    fn walk_item(
        &self,
        text: &str,
        key: Option<&str>,
        item: &Item,
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Located<()> {
        match item {
            Item::None => Ok(()),
            Item::Value(v) => self.walk_value(text, key, v, edits),
            Item::Table(t) => t.iter().try_for_each(|(k, i)| self.walk_item(text, Some(k), i, edits)),
            Item::ArrayOfTables(a) => {
                a.iter().try_for_each(|t| t.iter().try_for_each(|(k, i)| self.walk_item(text, Some(k), i, edits)))
            }
        }
    }

    fn walk_value(
        &self,
        text: &str,
        key: Option<&str>,
        v: &Value,
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Located<()> {
        match v {
            Value::String(s) => {
                let Some(span) = s.span() else { return Ok(()) };
                let raw = s.value();
                let expanded = if raw.contains('$') {
                    Some(env::expand(raw, self.env).map_err(|e| (span.clone(), e))?)
                } else {
                    None
                };
                let value = expanded.as_deref().unwrap_or(raw);
                if let Some(unit) = key.and_then(units::unit_of_key) {
                    let n =
                        units::parse(unit, value).map_err(|e| (span.clone(), format!("{}: {e}", key.unwrap_or(""))))?;
                    edits.push((span, n.to_string()));
                } else if let Some(e) = expanded {
                    let multi_line = text[span.clone()].matches('\n').count();
                    edits.push((span, toml_string(&e, multi_line)));
                }
                Ok(())
            }
            Value::Array(a) => a.iter().try_for_each(|x| self.walk_value(text, None, x, edits)),
            Value::InlineTable(t) => t.iter().try_for_each(|(k, x)| self.walk_value(text, Some(k), x, edits)),
            _ => Ok(()),
        }
    }

    /// Records the clusters and modules a file defines (`root`: its parse,
    /// `line_starts`: where its lines start); one defined in an earlier
    /// file (or earlier in this one) is an error that names both places.
    /// A cluster name is taken with `${VAR}` expanded, as the worker sees
    /// it.
    fn names(&mut self, file: &Path, line_starts: &[usize], root: &toml_edit::Table) -> Result<(), ConfigError> {
        let here = |p: usize, reason: String| ConfigError {
            file: file.to_path_buf(),
            line_col: Some(line_col_in(line_starts, p)),
            reason,
        };
        let mut clusters: Vec<(String, usize)> = Vec::new();
        let mut name_of = |v: &Value| {
            let Value::String(s) = v else { return };
            let at = v.span().map(|s| s.start).unwrap_or(0);
            let raw = s.value();
            // An expansion that fails was reported by `walk_value` already.
            let name = if raw.contains('$') { env::expand(raw, self.env).unwrap_or_default() } else { raw.clone() };
            clusters.push((name, at));
        };
        match root.get("clusters") {
            Some(Item::ArrayOfTables(a)) => {
                for t in a.iter() {
                    if let Some(Item::Value(v)) = t.get("name") {
                        name_of(v);
                    }
                }
            }
            Some(Item::Value(Value::Array(a))) => {
                for t in a.iter().filter_map(Value::as_inline_table) {
                    if let Some(v) = t.get("name") {
                        name_of(v);
                    }
                }
            }
            _ => {}
        }
        for (name, at) in clusters {
            if let Some((file, line)) = self.clusters.get(&name) {
                return Err(here(
                    at,
                    format!("cluster {name:?} is defined twice; the first is at {}:{line}", file.display()),
                ));
            }
            self.clusters.insert(name, (file.to_path_buf(), line_col_in(line_starts, at).0));
        }
        if let Some(m) = root.get("modules").and_then(Item::as_table_like) {
            for (name, item) in m.iter() {
                if name == "order" {
                    continue;
                }
                let at = m.get_key_value(name).and_then(|(k, _)| k.span()).or_else(|| item.span()).map(|s| s.start);
                let at = at.unwrap_or(0);
                if let Some((_, first, line)) = self.modules.iter().find(|x| x.0 == name) {
                    return Err(here(
                        at,
                        format!(
                            "module {name:?} is configured twice; the first [modules.{name}] is at {}:{line}",
                            first.display()
                        ),
                    ));
                }
                self.modules.push((name.to_string(), file.to_path_buf(), line_col_in(line_starts, at).0));
            }
        }
        Ok(())
    }
}

/// What an included file may hold at its top level: `include`,
/// `[[clusters]]`, `[[routes]]` and `[modules.NAME]` tables (no `[modules]`
/// of its own: `order` belongs to the main file). Everything else (listeners,
/// timeouts, top-level settings) stays in the main file.
fn allowed_in_include(key: &str, item: &Item) -> bool {
    match (key, item) {
        ("include", _) => true,
        ("clusters" | "routes", Item::ArrayOfTables(_)) => true,
        ("modules", Item::Table(t)) => {
            t.is_implicit() && !t.is_dotted() && t.iter().all(|(_, i)| matches!(i, Item::Table(s) if !s.is_dotted()))
        }
        _ => false,
    }
}

/// A TOML basic string holding `s`. When the value it replaces spanned
/// `newlines` lines, a multi-line string that ends in a line-ending
/// backslash keeps the line count (so later lines keep their numbers).
fn toml_string(s: &str, newlines: usize) -> String {
    let mut body = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '"' => body.push_str("\\\""),
            '\\' => body.push_str("\\\\"),
            '\n' => body.push_str("\\n"),
            '\r' => body.push_str("\\r"),
            '\t' => body.push_str("\\t"),
            c if c.is_control() => body.push_str(&format!("\\u{:04X}", c as u32)),
            c => body.push(c),
        }
    }
    if newlines == 0 {
        format!("\"{body}\"")
    } else {
        format!("\"\"\"{body}\\{}\"\"\"", "\n".repeat(newlines))
    }
}

/// The files an include pattern names, relative to `base`. Wildcards (`*`,
/// `?`) are allowed in the file name only; a leading '.' must be matched
/// literally. A pattern with no match gives no file; a plain path that
/// does not exist is an error.
fn matching_files(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let glob = |s: &str| s.contains(['*', '?']);
    let dir = full.parent().unwrap_or(Path::new(""));
    if glob(&dir.to_string_lossy()) {
        return Err(format!("include {pattern:?}: wildcards are allowed only in the file name"));
    }
    let name = full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !glob(&name) {
        return if full.is_file() {
            Ok(vec![full])
        } else {
            Err(format!("include {pattern:?}: {} is not a file", full.display()))
        };
    }
    let entries = match std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("include {pattern:?}: cannot list {}: {e}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| glob_match(name.as_bytes(), n.as_bytes()) && dir.join(n).is_file())
        .collect();
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// `*` (any run) and `?` (one byte) against a file name; a name starting
/// with '.' matches only a pattern starting with '.'.
fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pat.first() != Some(&b'.') {
        return false;
    }
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MAIN: &str = r#"workers = 1
include = ["conf.d/*.toml"]
[[listeners]]
address = "127.0.0.1:8080"
[[clusters]]
name = "main"
backends = ["127.0.0.1:9000"]
[[routes]]
cluster = "main"
[modules.degrade]
window_ms = "2s"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// A directory with `main.toml` and `conf.d/<name>` files.
    fn tree(main: &str, included: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        for (name, text) in included {
            std::fs::write(dir.path().join("conf.d").join(name), text).unwrap();
        }
        let main_path = dir.path().join("main.toml");
        std::fs::write(&main_path, main).unwrap();
        (dir, main_path)
    }

    fn load_env(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
        parse(path, &std::fs::read_to_string(path).unwrap(), env)
    }

    const APP: &str = "# the app\n[[clusters]]\nname = \"app\"\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\nhost = \"app.example.com\"\ncluster = \"app\"\n";
    const WEB: &str = "[[routes]]\nhost = \"web.example.com\"\ncluster = \"app\"\n[modules.headers]\nrequest_set = { \"X-A\" = \"b\" }\n";

    #[test]
    fn includes_merge_in_order_and_resolve_to_one_text() {
        let (_d, main) = tree(MAIN, &[("20-web.toml", WEB), ("10-app.toml", APP), ("notes.txt", "x")]);
        let l = load_env(&main, &no_env).unwrap();
        let names: Vec<&str> = l.files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["main.toml", "10-app.toml", "20-web.toml"]);
        let c = &l.config;
        assert_eq!(c.clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["main", "app"]);
        let hosts: Vec<&HostMatch> = c.routes.iter().map(|r| &r.host).collect();
        assert_eq!(
            hosts,
            [&HostMatch::Any, &HostMatch::Exact("app.example.com".into()), &HostMatch::Exact("web.example.com".into())]
        );
        let headers = c.modules.iter().find(|m| m.name == "headers").unwrap();
        assert!(headers.file.ends_with("conf.d/20-web.toml"), "{:?}", headers.file);
        assert_eq!(headers.line, 4);
        // The worker's view: the same configuration from the text alone.
        assert!(!l.text.contains("include") && !l.text.contains("\"2s\""), "{}", l.text);
        let again = Config::parse_resolved(&main, &l.text).unwrap();
        assert_eq!(again.clusters, c.clusters);
        assert_eq!(again.routes, c.routes);
        assert_eq!(
            again.modules.iter().map(|m| &m.settings).collect::<Vec<_>>(),
            c.modules.iter().map(|m| &m.settings).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_error_in_the_second_included_file_names_that_file_and_line() {
        let bad = WEB.replace("cluster = \"app\"", "cluster = \"app\"\nbogus = 1");
        let (_d, main) = tree(MAIN, &[("10-app.toml", APP), ("20-web.toml", &bad)]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("conf.d/20-web.toml"), "{e}");
        assert_eq!(e.line_col, Some((4, 1)), "{e}");
        let bad = WEB.replace("cluster = \"app\"", "cluster = \"nope\"");
        let (_d, main) = tree(MAIN, &[("10-app.toml", APP), ("20-web.toml", &bad)]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("conf.d/20-web.toml") && e.line_col.unwrap().0 == 3, "{e}");
        let bad = APP.replace("9001\"]", "9001\"]\nslow_start_ms = \"3 parsecs\"");
        let (_d, main) = tree(MAIN, &[("10-app.toml", &bad), ("20-web.toml", WEB)]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("conf.d/10-app.toml"), "{e}");
        assert_eq!(e.line_col, Some((5, 17)), "{e}");
        assert!(e.reason.contains("expected a duration like \"10s\" or \"250ms\""), "{e}");
    }

    #[test]
    fn duplicates_name_both_files() {
        let (_d, main) =
            tree(MAIN, &[("10-app.toml", APP), ("20-again.toml", &APP.replace("app.example", "x.example"))]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("20-again.toml") && e.reason.contains("10-app.toml:3"), "{e}");
        let (_d, main) = tree(MAIN, &[("10-app.toml", APP), ("20-m.toml", "[modules.degrade]\nwindow_ms = 5\n")]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("20-m.toml") && e.reason.contains("main.toml:10"), "{e}");
    }

    #[test]
    fn included_files_hold_only_clusters_routes_and_modules() {
        for bad in [
            "workers = 2\n",
            "[[listeners]]\naddress = \"127.0.0.1:1\"\n",
            "[modules]\norder = []\n",
            "[timeouts]\nclient_body_ms = 1\n",
        ] {
            let (_d, main) = tree(MAIN, &[("10-x.toml", bad)]);
            let e = load_env(&main, &no_env).unwrap_err();
            assert!(e.file.ends_with("10-x.toml") && e.line_col.is_some(), "{bad:?}: {e}");
            assert!(e.reason.contains("an included file may hold only"), "{e}");
        }
    }

    #[test]
    fn plain_paths_must_exist_globs_may_match_nothing_cycles_and_depth_are_refused() {
        let (_d, main) = tree(MAIN, &[]);
        assert_eq!(load_env(&main, &no_env).unwrap().files.len(), 1);
        let (_d, main) = tree(&MAIN.replace("conf.d/*.toml", "conf.d/app.toml"), &[]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("main.toml") && e.line_col.unwrap().0 == 2 && e.reason.contains("not a file"), "{e}");
        let (_d, main) = tree(MAIN, &[("a.toml", "include = [\"b.toml\"]\n"), ("b.toml", "include = [\"a.toml\"]\n")]);
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.file.ends_with("b.toml") && e.reason.contains("cycle"), "{e}");
        let (_d, main) = tree(MAIN, &[("a.toml", "include = [\"../main.toml\"]\n")]);
        assert!(load_env(&main, &no_env).unwrap_err().reason.contains("cycle"));
        let (d, main) = tree(&MAIN.replace("conf.d/*.toml", "conf.d/0.toml"), &[]);
        for i in 0..=MAX_INCLUDE_DEPTH {
            std::fs::write(d.path().join(format!("conf.d/{i}.toml")), format!("include = [\"{}.toml\"]\n", i + 1))
                .unwrap();
        }
        assert!(load_env(&main, &no_env).unwrap_err().reason.contains("nest deeper"));
    }

    #[test]
    fn environment_variables_in_values() {
        let env = |n: &str| (n == "APP_BACKEND").then(|| "127.0.0.1:7000".to_string());
        let text = MAIN.replace("127.0.0.1:9000", "${APP_BACKEND}").replace("workers = 1", "workers = 1\nerror_log = \"\"\"\n${LOG:-/var/log/p}$$.log\"\"\"")
            + "[modules.headers]\nrequest_set = { \"X-Id\" = \"${ID:-none}\" }\n[timeouts]\nupstream_read_ms = \"${READ_MS:-1500}\"\nbogus = 1\n";
        let (_d, main) = tree(&text, &[]);
        let e = load_env(&main, &env).unwrap_err();
        // Lines after a multi-line string that was rewritten keep their numbers.
        assert_eq!(e.line_col.map(|l| l.0), text.lines().position(|l| l == "bogus = 1").map(|i| i + 1), "{e}");
        let (_d, main) = tree(&text.replace("bogus = 1\n", ""), &[]);
        let c = load_env(&main, &env).unwrap().config;
        assert_eq!(c.clusters[0].backends[0].addr.to_string(), "127.0.0.1:7000");
        assert_eq!(c.error_log, LogTarget::File("/var/log/p$.log".into()));
        assert_eq!(c.timeouts.upstream_read, Duration::from_millis(1500));
        let headers = c.modules.iter().find(|m| m.name == "headers").unwrap();
        assert_eq!(headers.settings["request_set"]["X-Id"].as_str(), Some("none"));
        let e = load_env(&main, &no_env).unwrap_err();
        assert!(e.reason.contains("APP_BACKEND is not set"), "{e}");
        let line = text.lines().position(|l| l.contains("${APP_BACKEND}")).unwrap() + 1;
        assert_eq!(e.line_col, Some((line, 13)), "{e}");
    }

    /// Every `*_ms` and `*_bytes` key of the shipped example also takes a
    /// string with a unit, and means the same.
    #[test]
    fn every_unit_field_of_the_example_takes_a_string_with_a_unit() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pitcher.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let plain = Config::parse(path, &text).unwrap();
        let mut n = 0;
        let mut with_units = String::new();
        for line in text.split_inclusive('\n') {
            let mut out = line.to_string();
            for (suffix, unit) in [("_ms = ", "ms"), ("_bytes = ", "B")] {
                let mut rest = line;
                let mut rewritten = String::new();
                while let Some(i) = rest.find(suffix) {
                    let (head, tail) = rest.split_at(i + suffix.len());
                    let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                    rewritten.push_str(head);
                    if digits > 0 {
                        rewritten.push_str(&format!("\"{}{unit}\"", &tail[..digits]));
                        n += 1;
                    }
                    rest = &tail[digits..];
                }
                if !rewritten.is_empty() {
                    rewritten.push_str(rest);
                    out = rewritten;
                    break;
                }
            }
            with_units.push_str(&out);
        }
        assert!(n >= 20, "only {n} fields rewritten");
        let strings = Config::parse(path, &with_units).unwrap_or_else(|e| panic!("{e}\n{with_units}"));
        assert_eq!(strings, plain);
        let seconds = text.replace("client_header_ms = 10000", "client_header_ms = \"10s\"");
        assert_eq!(Config::parse(path, &seconds).unwrap(), plain);
    }

    #[test]
    fn a_bad_duration_has_its_place_and_a_hint() {
        let bad = MAIN.replace("window_ms = \"2s\"", "[timeouts]\nclient_header_ms = \"5 sec\"");
        let e = Config::parse(Path::new("t.toml"), &bad).unwrap_err();
        assert_eq!(e.line_col, Some((12, 20)), "{e}");
        assert!(e.to_string().contains("expected a duration like \"10s\" or \"250ms\""), "{e}");
        let bad = MAIN.replace("window_ms = \"2s\"", "[limits]\nmax_body_bytes = \"1 lot\"");
        let e = Config::parse(Path::new("t.toml"), &bad).unwrap_err();
        assert!(e.to_string().starts_with("t.toml:12:18: ") && e.reason.contains("64KiB"), "{e}");
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*.toml", b"a.toml"));
        assert!(!glob_match(b"*.toml", b".a.toml"));
        assert!(glob_match(b".*.toml", b".a.toml"));
        assert!(glob_match(b"a?c*", b"abcdef"));
        assert!(!glob_match(b"*.toml", b"a.toml.bak"));
        assert!(glob_match(b"*a*b", b"xxaxxab"));
    }

    use super::super::{HostMatch, LogTarget};
}
