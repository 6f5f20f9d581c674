//! What filters do to a request or a response: header modifiers, redirects, URL rewrites.

use crate::model::{HeaderModifier, PathMatch, PathModifier, RequestRedirect, UrlRewrite};
use http::header::{HeaderValue, HOST};
use http::{HeaderMap, Uri};

impl HeaderModifier {
    /// `set` overwrites, `add` appends to the existing value (comma-joined, so the backend sees
    /// one header), `remove` deletes. Names are case-insensitive (`HeaderName` is lower-case).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            let joined = headers
                .get_all(name)
                .iter()
                .fold(None::<Vec<u8>>, |acc, v| {
                    let mut acc = acc.unwrap_or_default();
                    if !acc.is_empty() {
                        acc.push(b',');
                    }
                    acc.extend_from_slice(v.as_bytes());
                    Some(acc)
                });
            let value = match joined {
                None => value.clone(),
                Some(mut existing) => {
                    existing.push(b',');
                    existing.extend_from_slice(value.as_bytes());
                    HeaderValue::from_bytes(&existing).unwrap_or_else(|_| value.clone())
                }
            };
            headers.insert(name.clone(), value);
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Replaces the matched prefix of `path` (segment-wise), as `ReplacePrefixMatch` does:
/// `/foo/bar` matched by `/foo` and replaced with `/xyz` gives `/xyz/bar`; with `/` gives `/bar`.
pub fn replace_prefix(path: &str, matched_prefix: &str, replacement: &str) -> String {
    let rest = path.strip_prefix(matched_prefix).unwrap_or(path);
    let mut out = replacement.trim_end_matches('/').to_string();
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The new path a path modifier gives, for a request matched by `matched`.
pub fn modified_path(modifier: &PathModifier, path: &str, matched: &PathMatch) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(full) => full.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => match matched {
            PathMatch::Prefix(prefix) => replace_prefix(path, prefix, replacement),
            // Refused at conversion: ReplacePrefixMatch needs a PathPrefix match.
            _ => path.to_string(),
        },
    }
}

/// The authority a request was sent with: the Host header, or the URI's authority (HTTP/2).
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(|a| a.to_string()))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

impl RequestRedirect {
    /// The `Location` of the redirect. `listener_port` is the Service port the request was sent
    /// to: with neither scheme nor port set, the redirect keeps it (spec).
    pub fn location(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        matched: &PathMatch,
        listener_port: u16,
    ) -> String {
        let request_scheme = uri.scheme_str().unwrap_or("http");
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let host = self
            .hostname
            .clone()
            .or_else(|| request_host(uri, headers).map(|h| strip_port(&h).to_string()))
            .unwrap_or_default();
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) if s == "https" => 443,
            (None, Some(_)) => 80,
            (None, None) => listener_port,
        };
        let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
        let path = self.path.as_ref().map_or_else(
            || uri.path().to_string(),
            |p| modified_path(p, uri.path(), matched),
        );
        let mut location = format!("{scheme}://{host}");
        if !default_port {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        location
    }
}

impl UrlRewrite {
    /// Rewrites the request's path and Host in place.
    pub fn apply(&self, parts: &mut http::request::Parts, matched: &PathMatch) {
        if let Some(hostname) = &self.hostname {
            if let Ok(v) = HeaderValue::from_str(hostname) {
                parts.headers.insert(HOST, v);
            }
        }
        if let Some(modifier) = &self.path {
            let mut path_and_query = modified_path(modifier, parts.uri.path(), matched);
            if let Some(q) = parts.uri.query() {
                path_and_query.push('?');
                path_and_query.push_str(q);
            }
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = path_and_query.parse().ok();
            parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_table_from_the_spec() {
        // (matched prefix as stored, request path, replacement, expected)
        for (prefix, path, replacement, expected) in [
            ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/bar", "/xyz", "/xyz"),
            ("/foo/bar", "/foo/bar/baz", "/xyz", "/xyz/baz"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo", "/foo/", "/xyz", "/xyz/"),
            ("/foo", "/foo/bar", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/foo", "/foo/", "/", "/"),
            ("", "/foo", "/xyz", "/xyz/foo"),
        ] {
            assert_eq!(
                replace_prefix(path, prefix, replacement),
                expected,
                "{prefix} {path} {replacement}"
            );
        }
    }

    #[test]
    fn header_modifier_set_add_remove() {
        let mut headers = HeaderMap::new();
        headers.insert("x-keep", "1".parse().unwrap());
        headers.insert("x-add", "a".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        let m = HeaderModifier {
            set: vec![("x-set".parse().unwrap(), "s".parse().unwrap())],
            add: vec![
                ("x-add".parse().unwrap(), "b".parse().unwrap()),
                ("x-new".parse().unwrap(), "n".parse().unwrap()),
            ],
            remove: vec!["X-Gone".parse().unwrap()],
        };
        m.apply(&mut headers);
        assert_eq!(headers["x-set"], "s");
        assert_eq!(headers["x-add"], "a,b");
        assert_eq!(headers["x-new"], "n");
        assert_eq!(headers["x-keep"], "1");
        assert!(!headers.contains_key("x-gone"));
    }

    fn redirect(
        scheme: Option<&str>,
        host: Option<&str>,
        port: Option<u16>,
        path: Option<PathModifier>,
    ) -> RequestRedirect {
        RequestRedirect {
            scheme: scheme.map(Into::into),
            hostname: host.map(Into::into),
            port,
            path,
            status: 302,
        }
    }

    #[test]
    fn redirect_location_defaults() {
        let uri: Uri = "/a/b?x=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "echo:8080".parse().unwrap());
        let prefix = PathMatch::Prefix("/a".into());
        // No scheme, no port: the listener port is kept.
        assert_eq!(
            redirect(None, None, None, None).location(&uri, &headers, &prefix, 8080),
            "http://echo:8080/a/b?x=1"
        );
        assert_eq!(
            redirect(None, None, None, None).location(&uri, &headers, &prefix, 80),
            "http://echo/a/b?x=1"
        );
        // A scheme means its well-known port, which is omitted.
        assert_eq!(
            redirect(Some("https"), None, None, None).location(&uri, &headers, &prefix, 8080),
            "https://echo/a/b?x=1"
        );
        assert_eq!(
            redirect(Some("https"), Some("example.org"), Some(8443), None)
                .location(&uri, &headers, &prefix, 80),
            "https://example.org:8443/a/b?x=1"
        );
        let replace = Some(PathModifier::ReplacePrefixMatch("/z".into()));
        assert_eq!(
            redirect(None, None, Some(80), replace).location(&uri, &headers, &prefix, 8080),
            "http://echo/z/b?x=1"
        );
    }
}
