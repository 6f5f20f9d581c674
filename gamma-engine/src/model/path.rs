//! Request paths as RFC 3986 says they are equivalent: the form requests are matched in, and
//! route path values are kept in.

/// A request path as RFC 3986 §6.2.2 says it is equivalent, which is what a backend resolves
/// it to and what routes must match: percent-encoded unreserved characters decoded (`%61` is
/// `a`), the hex digits of the other encodings upper-cased, then dot segments removed (§5.2.4:
/// `/public/../admin` is `/admin`). Without it a route for `/admin` missed a request its backend
/// served as `/admin`. `%2F` stays encoded, and `//` stays (merging slashes changes meaning).
/// Envoy's `normalize_path` and Istio's default do the same. `None`: the path is already so.
pub fn normalize_path(path: &str) -> Option<String> {
    // Most paths have neither a `%` nor a `.`: one pass over the bytes tells (every request's
    // path comes here).
    if !path.starts_with('/') || !path.bytes().any(|b| b == b'%' || b == b'.') {
        return None;
    }
    let has_dot_segment = || path.split('/').any(|s| s == "." || s == "..");
    if !path.contains('%') && !has_dot_segment() {
        return None;
    }
    let normal = remove_dot_segments(&decode_unreserved(path));
    (normal != path).then_some(normal)
}

/// Whether `path` has a dot segment (`.` or `..`), written so or percent-encoded (`%2e%2E`).
pub fn has_dot_segment(path: &str) -> bool {
    let is_dot = |segment: &str| segment == "." || segment == "..";
    path.split('/').any(is_dot) || decode_unreserved(path).split('/').any(is_dot)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let offset = path.len() - rest.len() + at;
        let hex = bytes.get(offset + 1..offset + 3).and_then(|h| {
            let digits = std::str::from_utf8(h).ok()?;
            u8::from_str_radix(digits, 16)
                .ok()
                .filter(|_| h.iter().all(u8::is_ascii_hexdigit))
        });
        match hex {
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(b));
            }
            Some(b) => out.push_str(&format!("%{b:02X}")),
            // A `%` not followed by two hex digits: left as it came.
            None => {
                out.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments go, `..` takes the one before with it (never
/// above the root); a path ending in either ends with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." | ".." => {
                if segment == ".." {
                    kept.pop();
                }
                if last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    format!("/{}", kept.join("/"))
}
