//! Does a request head satisfy a `matches[]` entry? Pure functions over `http` types.

use crate::model::{Condition, HeaderKey, PathMatch, RouteMatch, ValueMatch};
use compact_str::CompactString;
use http::{header, HeaderMap, Method};

/// The parts of a request that matching reads.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The request target's authority: HTTP/2's `:authority`, which stands for `Host` there.
    pub authority: Option<&'a str>,
}

impl<'a> RequestHead<'a> {
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        RequestHead {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            authority: parts.uri.authority().map(|a| a.as_str()),
        }
    }
}

impl RouteMatch {
    /// The path first: it is inline, the other conditions (if any) one pointer away.
    pub fn matches(&self, req: &RequestHead<'_>) -> bool {
        self.path.matches(req.path) && self.matches_besides_path(req)
    }

    /// Every condition but the path.
    pub fn matches_besides_path(&self, req: &RequestHead<'_>) -> bool {
        self.conditions().iter().all(|c| c.holds(req))
    }
}

impl Condition {
    pub fn holds(&self, req: &RequestHead<'_>) -> bool {
        match self {
            Condition::Method(m) => m == req.method,
            Condition::Header(h) => header_matches(h, req),
            Condition::QueryParam(q) => query_matches(q, req.query),
        }
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(prefix) => prefix_matches(prefix, path),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// Segment-wise prefix: `/abc` (or `/abc/`) matches `/abc`, `/abc/` and `/abc/def`, not
/// `/abcd`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(segments(prefix)) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A stored PathPrefix as it is matched: without the trailing `/` it may keep for precedence (the
/// root prefix `/` is "").
pub fn segments(prefix: &str) -> &str {
    prefix.strip_suffix('/').unwrap_or(prefix)
}

/// Repeated request headers: all values are joined with "," (RFC 9110 §5.3), then compared;
/// `Cookie` values with "; " (RFC 6265 §5.4: HTTP/2 splits cookies into crumbs, RFC 9113 §8.2.3).
/// `Host` is the `:authority` of an HTTP/2 request, which carries no `host` header.
fn header_matches(m: &ValueMatch<HeaderKey>, req: &RequestHead<'_>) -> bool {
    let name = m.name.as_str();
    let mut values = req.headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return name == header::HOST && req.authority.is_some_and(|a| m.value.is_match(a));
    };
    match values.next() {
        None => m.value.is_match(&text(first)),
        Some(second) => {
            let separator = if name == header::COOKIE { "; " } else { "," };
            let mut joined = text(first).into_owned();
            for v in std::iter::once(second).chain(values) {
                joined.push_str(separator);
                joined.push_str(&text(v));
            }
            m.value.is_match(&joined)
        }
    }
}

/// A header value as text: UTF-8 beyond ASCII (`café`) as it is, other bytes replaced. A value
/// with such bytes is valid HTTP (obs-text) and a match must still see it.
fn text(value: &http::HeaderValue) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

/// The first occurrence of a query parameter is the one that counts (spec recommendation).
/// Names and values are compared form-decoded (`%XX`, `+`).
fn query_matches(m: &ValueMatch<CompactString>, query: Option<&str>) -> bool {
    let Some(query) = query else { return false };
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| *name == m.name)
        .is_some_and(|(_, value)| m.value.is_match(&value))
}

pub use crate::model::path::normalize_path;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StringMatch;
    use http::HeaderName;
    use regex::Regex;

    fn head<'a>(method: &'a Method, uri: &'a http::Uri, headers: &'a HeaderMap) -> RequestHead<'a> {
        RequestHead {
            method,
            path: uri.path(),
            query: uri.query(),
            headers,
            authority: uri.authority().map(|a| a.as_str()),
        }
    }

    #[test]
    fn prefix_is_segment_wise() {
        assert!(prefix_matches("/abc", "/abc"));
        assert!(prefix_matches("/abc", "/abc/"));
        assert!(prefix_matches("/abc", "/abc/def"));
        assert!(!prefix_matches("/abc", "/abcd"));
        assert!(prefix_matches("", "/anything"));
        assert!(prefix_matches("", "/"));
    }

    #[test]
    fn exact_and_regex_paths() {
        assert!(PathMatch::Exact("/abc".into()).matches("/abc"));
        assert!(!PathMatch::Exact("/abc".into()).matches("/abc/"));
        let r = PathMatch::Regex(Regex::new("^(?:/v[0-9]+/.*)$").unwrap().into());
        assert!(r.matches("/v2/x"));
        assert!(!r.matches("/x/v2/x"));
    }

    #[test]
    fn headers_case_insensitive_names_and_joined_values() {
        let mut headers = HeaderMap::new();
        headers.append("Version", "one".parse().unwrap());
        let m = ValueMatch {
            name: HeaderName::from_static("version").into(),
            value: StringMatch::Exact("one".into()),
        };
        let uri = http::Uri::from_static("/");
        let get = Method::GET;
        assert!(header_matches(&m, &head(&get, &uri, &headers)));
        headers.append("version", "two".parse().unwrap());
        assert!(!header_matches(&m, &head(&get, &uri, &headers)));
        let joined = ValueMatch {
            name: HeaderName::from_static("version").into(),
            value: StringMatch::Exact("one,two".into()),
        };
        assert!(header_matches(&joined, &head(&get, &uri, &headers)));
    }

    #[test]
    fn header_values_beyond_ascii_are_matched() {
        let mut headers = HeaderMap::new();
        headers.append(
            "x-name",
            http::HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        );
        headers.append("x-other", http::HeaderValue::from_bytes(b"a\xe9").unwrap());
        let (uri, get) = (http::Uri::from_static("/"), Method::GET);
        let exact = |name: &'static str, value: &str| ValueMatch {
            name: HeaderName::from_static(name).into(),
            value: StringMatch::Exact(value.into()),
        };
        assert!(header_matches(
            &exact("x-name", "café"),
            &head(&get, &uri, &headers)
        ));
        // Latin-1 bytes are not UTF-8: such a value still matches a pattern that admits it.
        let any = ValueMatch {
            name: HeaderName::from_static("x-other").into(),
            value: StringMatch::Regex(Box::new(Regex::new("^a.$").unwrap())),
        };
        assert!(header_matches(&any, &head(&get, &uri, &headers)));
    }

    #[test]
    fn host_is_the_http2_authority_and_cookie_crumbs_join_with_semicolons() {
        let get = Method::GET;
        let host = ValueMatch {
            name: header::HOST.into(),
            value: StringMatch::Exact("catalog.products:8080".into()),
        };
        // HTTP/2: no `host` header, the authority in the request target.
        let h2: http::Uri = "http://catalog.products:8080/x".parse().unwrap();
        assert!(header_matches(&host, &head(&get, &h2, &HeaderMap::new())));
        let other: http::Uri = "http://other:8080/x".parse().unwrap();
        assert!(!header_matches(
            &host,
            &head(&get, &other, &HeaderMap::new())
        ));
        let origin_form = http::Uri::from_static("/x");
        assert!(!header_matches(
            &host,
            &head(&get, &origin_form, &HeaderMap::new())
        ));
        let mut crumbs = HeaderMap::new();
        crumbs.append(header::COOKIE, "a=1".parse().unwrap());
        crumbs.append(header::COOKIE, "b=2".parse().unwrap());
        let cookie = ValueMatch {
            name: header::COOKIE.into(),
            value: StringMatch::Exact("a=1; b=2".into()),
        };
        assert!(header_matches(&cookie, &head(&get, &origin_form, &crumbs)));
    }

    #[test]
    fn query_first_value_wins_and_is_decoded() {
        let m = ValueMatch {
            name: "animal".into(),
            value: StringMatch::Exact("whale dog".into()),
        };
        assert!(query_matches(&m, Some("animal=whale%20dog&animal=x")));
        assert!(query_matches(&m, Some("x=1&animal=whale+dog")));
        assert!(!query_matches(&m, Some("animal=x&animal=whale%20dog")));
        assert!(!query_matches(&m, None));
        let case = ValueMatch {
            name: "Animal".into(),
            value: StringMatch::Exact("whale dog".into()),
        };
        assert!(
            !query_matches(&case, Some("animal=whale+dog")),
            "query names are case-sensitive"
        );
    }

    #[test]
    fn conditions_are_anded() {
        let method = Method::POST;
        let uri: http::Uri = "/api/x?debug=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-env", "canary".parse().unwrap());
        let m = RouteMatch::new(
            PathMatch::Prefix("/api".into()),
            Some(Method::POST),
            vec![ValueMatch {
                name: HeaderName::from_static("x-env").into(),
                value: StringMatch::Exact("canary".into()),
            }],
            vec![ValueMatch {
                name: "debug".into(),
                value: StringMatch::Exact("1".into()),
            }],
            None,
        );
        assert!(m.matches(&head(&method, &uri, &headers)));
        assert!(!m.matches(&head(&Method::GET, &uri, &headers)));
        let other: http::Uri = "/api/x".parse().unwrap();
        assert!(!m.matches(&head(&method, &other, &headers)));
    }

    #[test]
    fn paths_are_normalized_as_rfc_3986_says_they_are_equivalent() {
        for (path, normal) in [
            ("/public/../admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/%2e%2e/admin", Some("/admin")),
            ("/a/./b/.", Some("/a/b/")),
            ("/a/b/..", Some("/a/")),
            ("/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/a%2fb", Some("/a%2Fb")),
            ("/a%2Fb", None),
            ("/100%", None),
            ("/%zz/%4", None),
            ("/caf%C3%A9", None),
            ("//a/./b", Some("//a/b")),
            ("/a/b", None),
            ("/a.b/..c/", None),
            ("*", None),
        ] {
            assert_eq!(normalize_path(path).as_deref(), normal, "{path}");
        }
    }
}
