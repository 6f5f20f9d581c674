//! What filters do to a request or a response: header modifiers, redirects, URL rewrites.

use crate::model::{HeaderModifier, PathMatch, PathModifier, RequestRedirect, UrlRewrite};
use http::header::{HeaderValue, COOKIE, HOST, SET_COOKIE};
use http::{HeaderMap, Uri};

impl HeaderModifier {
    /// `set` overwrites, `add` appends to the existing value, `remove` deletes. Names are
    /// case-insensitive (`HeaderName` is lower-case). `add` joins into one field with `,` (so the
    /// backend sees one header), except where the RFCs say otherwise: `Set-Cookie` is never
    /// folded (RFC 6265 §3; the HTTPRoute spec names it), each value its own field line, nor is
    /// gRPC's binary metadata (`-bin`: grpc-go decodes a field's whole value as base64, and a
    /// comma fails the call), and `Cookie` pairs join with `; ` (RFC 6265 §5.4).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            let separator: &[u8] = match *name {
                SET_COOKIE => b"",
                COOKIE => b"; ",
                _ if name.as_str().ends_with("-bin") => b"",
                _ => b",",
            };
            if separator.is_empty() {
                headers.append(name.clone(), value.clone());
                continue;
            }
            let mut joined = Vec::new();
            for existing in headers.get_all(name) {
                joined.extend_from_slice(existing.as_bytes());
                joined.extend_from_slice(separator);
            }
            let value = if joined.is_empty() {
                value.clone()
            } else {
                joined.extend_from_slice(value.as_bytes());
                HeaderValue::from_bytes(&joined).unwrap_or_else(|_| value.clone())
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
    let rest = path
        .strip_prefix(super::matches::segments(matched_prefix))
        .unwrap_or(path);
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

/// The host and port a request was sent to: the URI's authority (HTTP/2, or an HTTP/1 target in
/// absolute form, which wins over Host: RFC 9112 §3.2.2) without its userinfo (a sender must not
/// repeat it in an http URI, RFC 9110 §4.2.4), else the Host header.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let without_userinfo = |a: &str| a.rsplit_once('@').map_or(a, |(_, host)| host).to_string();
    uri.authority()
        .map(|a| without_userinfo(a.as_str()))
        .or_else(|| {
            headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
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
    /// to: with neither scheme nor port set, the redirect keeps it (spec). `None`: the redirect
    /// changes the scheme or port and names no host, and the request names none either (HTTP/1.0
    /// without Host, or an empty one): there is no URI to send it to.
    pub fn location(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        matched: &PathMatch,
        listener_port: u16,
    ) -> Option<String> {
        let request_scheme = uri.scheme_str().unwrap_or("http");
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let path = self.path.as_ref().map_or_else(
            || uri.path().to_string(),
            |p| modified_path(p, uri.path(), matched),
        );
        let mut location = String::new();
        let host = self.hostname.clone().or_else(|| {
            request_host(uri, headers)
                .map(|h| strip_port(&h).to_string())
                .filter(|h| !h.is_empty())
        });
        // No host to name (an HTTP/1.0 request without Host): a relative reference, resolved
        // against what the client asked, since an `http` URI must not have an empty host (RFC
        // 9110 §4.2.1); unless the scheme or port is to change, which only an absolute one says.
        match host {
            Some(host) => self.push_origin(&mut location, scheme, &host, listener_port),
            None if self.scheme.is_some() || self.port.is_some() => return None,
            None => {}
        }
        location.push_str(&path);
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        Some(location)
    }

    /// `scheme://host[:port]`, the port left out when it is the scheme's own.
    fn push_origin(&self, location: &mut String, scheme: &str, host: &str, listener_port: u16) {
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) if s == "https" => 443,
            (None, Some(_)) => 80,
            (None, None) => listener_port,
        };
        let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
        location.push_str(&format!("{scheme}://{host}"));
        if !default_port {
            location.push_str(&format!(":{port}"));
        }
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
        // A request-target without a path (CONNECT's `host:port`, `OPTIONS *`) keeps it: made
        // `/x`, a tunnel would ask the backend for nothing it can open.
        let has_path = parts.uri.path().starts_with('/');
        if let Some(modifier) = self.path.as_ref().filter(|_| has_path) {
            let path = modified_path(modifier, parts.uri.path(), matched);
            // A path the URI cannot hold (the route's values are validated) leaves it as it is.
            if let Some(uri) = with_path(&parts.uri, &path) {
                parts.uri = uri;
            }
        }
    }
}

/// `uri` with its path replaced by `path` (scheme, authority and query kept); `None` when `path`
/// is not a valid URI path.
pub fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
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
            set: Box::new([("x-set".parse().unwrap(), "s".parse().unwrap())]),
            add: Box::new([
                ("x-add".parse().unwrap(), "b".parse().unwrap()),
                ("x-new".parse().unwrap(), "n".parse().unwrap()),
            ]),
            remove: Box::new(["X-Gone".parse().unwrap()]),
        };
        m.apply(&mut headers);
        assert_eq!(headers["x-set"], "s");
        assert_eq!(headers["x-add"], "a,b");
        assert_eq!(headers["x-new"], "n");
        assert_eq!(headers["x-keep"], "1");
        assert!(!headers.contains_key("x-gone"));
    }

    #[test]
    fn set_cookie_is_never_folded_and_cookies_join_with_semicolons() {
        let mut response = HeaderMap::new();
        response.append(SET_COOKIE, "a=1; Path=/".parse().unwrap());
        let mut request = HeaderMap::new();
        request.append(COOKIE, "a=1".parse().unwrap());
        request.append(COOKIE, "b=2".parse().unwrap());
        let m = HeaderModifier {
            add: vec![
                (
                    SET_COOKIE,
                    "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"
                        .parse()
                        .unwrap(),
                ),
                (COOKIE, "c=3".parse().unwrap()),
            ]
            .into(),
            ..HeaderModifier::default()
        };
        m.apply(&mut response);
        let lines: Vec<_> = response.get_all(SET_COOKIE).iter().collect();
        assert_eq!(
            lines,
            ["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"],
            "one field line per cookie: a comma inside Expires would split a folded value"
        );
        m.apply(&mut request);
        assert_eq!(request[COOKIE], "a=1; b=2; c=3");
        assert_eq!(request.get_all(COOKIE).iter().count(), 1);
    }

    /// gRPC's binary metadata is base64 per field line: grpc-go decodes a field's whole value, so
    /// a comma-joined one failed the call (INTERNAL).
    #[test]
    fn binary_metadata_is_never_folded() {
        let mut headers = HeaderMap::new();
        headers.append("x-ctx-bin", "AwQ".parse().unwrap());
        let m = HeaderModifier {
            add: vec![("x-ctx-bin".parse().unwrap(), "AQI".parse().unwrap())].into(),
            ..HeaderModifier::default()
        };
        m.apply(&mut headers);
        let lines: Vec<_> = headers.get_all("x-ctx-bin").iter().collect();
        assert_eq!(lines, ["AwQ", "AQI"]);
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
        let location = |r: RequestRedirect, headers: &HeaderMap, port| {
            r.location(&uri, headers, &prefix, port)
        };
        assert_eq!(
            location(redirect(None, None, None, None), &headers, 8080).unwrap(),
            "http://echo:8080/a/b?x=1"
        );
        assert_eq!(
            location(redirect(None, None, None, None), &headers, 80).unwrap(),
            "http://echo/a/b?x=1"
        );
        // A scheme means its well-known port, which is omitted.
        assert_eq!(
            location(redirect(Some("https"), None, None, None), &headers, 8080).unwrap(),
            "https://echo/a/b?x=1"
        );
        assert_eq!(
            location(
                redirect(Some("https"), Some("example.org"), Some(8443), None),
                &headers,
                80
            )
            .unwrap(),
            "https://example.org:8443/a/b?x=1"
        );
        let replace = Some(PathModifier::ReplacePrefixMatch("/z".into()));
        assert_eq!(
            location(
                redirect(None, None, Some(80), replace.clone()),
                &headers,
                8080
            )
            .unwrap(),
            "http://echo/z/b?x=1"
        );
        // No Host (HTTP/1.0), or an empty one: no `http://:8080` with an empty host, a relative
        // reference; none at all where the scheme or port is to change.
        let mut empty = HeaderMap::new();
        empty.insert(HOST, HeaderValue::from_static(""));
        for no_host in [HeaderMap::new(), empty.clone()] {
            assert_eq!(
                location(redirect(None, None, None, replace.clone()), &no_host, 8080).unwrap(),
                "/z/b?x=1"
            );
            assert_eq!(
                location(
                    redirect(None, Some("example.org"), None, None),
                    &no_host,
                    80
                )
                .unwrap(),
                "http://example.org/a/b?x=1"
            );
            assert_eq!(
                location(redirect(Some("https"), None, None, None), &no_host, 80),
                None
            );
            assert_eq!(
                location(redirect(None, None, Some(8443), None), &no_host, 80),
                None
            );
        }
        // A target in absolute form names the host, whatever Host says (RFC 9112 §3.2.2).
        let absolute: Uri = "http://svc/a?x=1".parse().unwrap();
        assert_eq!(
            redirect(Some("https"), None, None, None)
                .location(&absolute, &empty, &prefix, 80)
                .unwrap(),
            "https://svc/a?x=1"
        );
        // Its userinfo is not repeated in the Location.
        let with_userinfo: Uri = "http://alice:secret@svc:8080/a".parse().unwrap();
        assert_eq!(
            redirect(Some("https"), None, None, None)
                .location(&with_userinfo, &empty, &prefix, 80)
                .unwrap(),
            "https://svc/a"
        );
    }

    /// A path rewrite leaves a request-target without a path as it is: a CONNECT's `host:port`
    /// became `/x` (a URI with an authority and no scheme cannot be built, and `/` stood in).
    #[test]
    fn a_path_rewrite_leaves_a_connect_target_alone() {
        let rewrite = UrlRewrite {
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/x".into())),
        };
        let matched = PathMatch::Prefix("/".into());
        for target in ["db:5432", "*"] {
            let (mut parts, ()) = http::Request::builder()
                .method(if target == "*" { "OPTIONS" } else { "CONNECT" })
                .uri(target)
                .body(())
                .unwrap()
                .into_parts();
            rewrite.apply(&mut parts, &matched);
            assert_eq!(parts.uri.to_string(), target);
        }
        let (mut parts, ()) = http::Request::get("/a?q=1").body(()).unwrap().into_parts();
        rewrite.apply(&mut parts, &matched);
        assert_eq!(parts.uri.to_string(), "/x?q=1");
    }
}
