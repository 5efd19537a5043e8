//! Environment variables in configuration string values: `${VAR}`,
//! `${VAR:-default}` (the default when VAR is unset or empty) and `$$` for
//! a literal `$`. A `$` followed by anything else stays as written. Pure:
//! the caller passes the lookup.

/// Expands `s`; the error says which variable is missing or what is malformed.
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end =
                body.find('}').ok_or_else(|| format!("unterminated \"${{\" in {s:?} (write $$ for a literal $)"))?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(format!(
                    "\"${{{inner}}}\": expected ${{NAME}} or ${{NAME:-default}} (write $$ for a literal $)"
                ));
            }
            match (lookup(name).filter(|v| !(v.is_empty() && default.is_some())), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set (give a default: ${{{name}:-value}})"))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_defaults_and_dollars() {
        assert_eq!(expand("${HOST}:80", &env).unwrap(), "10.0.0.1:80");
        assert_eq!(expand("${PORT:-8080}", &env).unwrap(), "8080");
        assert_eq!(expand("${HOST:-x}", &env).unwrap(), "10.0.0.1");
        assert_eq!(expand("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand("a$$b $x ^/p$", &env).unwrap(), "a$b $x ^/p$");
        assert_eq!(expand("$${HOST}", &env).unwrap(), "${HOST}");
        assert_eq!(expand("${NONE:-}", &env).unwrap(), "");
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(expand("${NONE}", &env).unwrap_err().contains("NONE is not set"));
        assert!(expand("${HOST", &env).unwrap_err().contains("unterminated"));
        assert!(expand("${1X}", &env).unwrap_err().contains("expected ${NAME}"));
        assert!(expand("${}", &env).unwrap_err().contains("expected ${NAME}"));
    }
}
