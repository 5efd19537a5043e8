//! The normalised form of a request path, which routing and route-scoped
//! modules match, so that `//admin`, `/%61dmin` and `/x/../admin` cannot
//! pass a rule written for `/admin` (nginx does the same before matching
//! its locations).
//!
//! Owns: percent-decoding of unreserved bytes, merging of repeated
//! slashes, removal of dot-segments (RFC 3986 §5.2.4). Must not: allocate
//! (the caller passes a buffer it keeps), or decide what the backend
//! receives (that is `RequestHead`'s and the configuration's business).

use super::HttpError;

/// RFC 3986 §2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`. Decoding these
/// never changes what a path means (§6.2.2.2).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Writes the normalised form of `path` (a target without its query) to
/// `out`, which is cleared first:
///
/// * `%XX` of an unreserved byte is decoded (`%61` → `a`, `%2e` → `.`);
///   any other escape stays, with upper-case hex (`%2f` → `%2F`, so an
///   encoded `/` never becomes a separator); a `%` without two hex digits
///   is refused (nginx answers it with 400 too);
/// * repeated slashes are merged (nginx's `merge_slashes on`), before
///   dot-segments are removed, as nginx does: `/a//../b` → `/b`;
/// * `.` and `..` segments are removed as RFC 3986 §5.2.4 says, except
///   that a `..` with nothing left to remove is refused instead of being
///   dropped (`/../x`: a backend that maps paths to files must not be
///   asked for it), as nginx does;
/// * a path ending in a `.` or `..` segment keeps a final `/` (§5.2.4 B, C).
///
/// A target that is not a path (`*` of `OPTIONS *`) is copied as it is.
/// Linear in the length of `path`.
pub fn normalize(path: &[u8], out: &mut Vec<u8>) -> Result<(), HttpError> {
    out.clear();
    if path.first() != Some(&b'/') {
        out.extend_from_slice(path);
        return Ok(());
    }
    let mut i = 0;
    loop {
        // Here `path[i]` is a '/' (or the end): merge the run of slashes.
        while path.get(i) == Some(&b'/') {
            i += 1;
        }
        if i == path.len() {
            // The path ends with a slash (or is "/").
            if out.last() != Some(&b'/') {
                out.push(b'/');
            }
            return Ok(());
        }
        out.push(b'/');
        let seg_start = out.len();
        while let Some(&b) = path.get(i).filter(|&&b| b != b'/') {
            if b == b'%' {
                let hi = path.get(i + 1).copied().and_then(hex_value);
                let lo = path.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else { return Err(HttpError::BadTarget) };
                let v = hi << 4 | lo;
                if is_unreserved(v) {
                    out.push(v);
                } else {
                    out.extend_from_slice(&[b'%', path[i + 1].to_ascii_uppercase(), path[i + 2].to_ascii_uppercase()]);
                }
                i += 3;
            } else {
                out.push(b);
                i += 1;
            }
        }
        let last = i == path.len();
        match &out[seg_start..] {
            // §5.2.4 B: "/./" → "/", a final "/." → "/".
            b"." => out.truncate(if last { seg_start } else { seg_start - 1 }),
            // §5.2.4 C: "/../" → "/" and the last output segment removed;
            // a final "/.." likewise, keeping the "/".
            b".." => {
                out.truncate(seg_start - 1);
                let Some(prev) = out.iter().rposition(|&b| b == b'/') else {
                    return Err(HttpError::BadTarget);
                };
                out.truncate(if last { prev + 1 } else { prev });
            }
            // §5.2.4 E: the segment moves to the output as it is.
            _ => {}
        }
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, HttpError> {
        let mut out = Vec::new();
        normalize(p.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).expect("ascii in, ascii out"))
    }

    fn same(cases: &[(&str, &str)]) {
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(*want), "{input}");
        }
    }

    #[test]
    fn plain_paths_are_unchanged() {
        same(&[
            ("/", "/"),
            ("/a", "/a"),
            ("/a/b/", "/a/b/"),
            ("/a.b/c..d/.e/..f/...", "/a.b/c..d/.e/..f/..."),
            ("/a;p=1/b", "/a;p=1/b"),
            ("*", "*"),
        ]);
    }

    #[test]
    fn rule_b_single_dot_segments_are_removed() {
        // RFC 3986 §5.2.4 B: "/./" and a final "/." become "/".
        same(&[
            ("/./a", "/a"),
            ("/a/./b", "/a/b"),
            ("/a/.", "/a/"),
            ("/.", "/"),
            ("/a/./", "/a/"),
            ("/././a/./.", "/a/"),
        ]);
    }

    #[test]
    fn rule_c_double_dot_segments_remove_the_previous_segment() {
        // §5.2.4 C: "/../" and a final "/.." become "/" and remove the last
        // segment already in the output.
        same(&[
            ("/x/../admin", "/admin"),
            ("/x/./../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a/..", "/"),
            ("/a/b/c/../../d", "/a/d"),
            // The example of §5.2.4 itself.
            ("/a/b/c/./../../g", "/a/g"),
        ]);
    }

    #[test]
    fn rules_a_and_d_concern_relative_references_only() {
        // §5.2.4 A ("../", "./" prefixes) and D (a path of only "." or "..")
        // apply to relative references; a request path starts with "/", so
        // such segments reach the normaliser after a slash, where B and C
        // apply.
        same(&[("/./", "/"), ("/.", "/"), ("/./a/..", "/")]);
        assert_eq!(norm("/.."), Err(HttpError::BadTarget));
        assert_eq!(norm("/../"), Err(HttpError::BadTarget));
        // Not a path (RequestHead refuses such a target first): copied.
        assert_eq!(norm("."), Ok(".".into()));
    }

    #[test]
    fn rule_e_other_segments_move_as_they_are() {
        same(&[("/a/b/c", "/a/b/c"), ("/..a/b..", "/..a/b.."), ("/a/.../b", "/a/.../b")]);
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for p in ["/..", "/../admin", "/a/../..", "/a/../../b", "/a/b/../../../c", "/%2e%2e/x", "/.%2E/x", "//../x"] {
            assert_eq!(norm(p), Err(HttpError::BadTarget), "{p}");
        }
    }

    #[test]
    fn repeated_slashes_are_merged_before_dot_segments() {
        same(&[("//admin", "/admin"), ("/a//b///c", "/a/b/c"), ("/a//", "/a/"), ("//", "/"), ("/a//../b", "/b")]);
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept_upper_case() {
        same(&[
            ("/%61dmin", "/admin"),
            ("/%41%7a%30%2D%5f%7E", "/Az0-_~"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/..", "/"),
            ("/%20%c3%a9", "/%20%C3%A9"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/x/%2e/admin", "/x/admin"),
            ("/%2e%2e%2fadmin", "/..%2Fadmin"),
        ]);
        for p in ["/%", "/%4", "/%zz", "/a%g1", "/%%41"] {
            assert_eq!(norm(p), Err(HttpError::BadTarget), "{p}");
        }
    }

    #[test]
    fn the_output_buffer_is_reused() {
        let mut out = Vec::with_capacity(64);
        let cap = out.capacity();
        normalize(b"/a/b/../c", &mut out).unwrap();
        normalize(b"/x", &mut out).unwrap();
        assert_eq!(out, b"/x");
        assert_eq!(out.capacity(), cap);
    }
}
