//! The CORS filter (GEP-1767): preflights answered by the agent, actual cross-origin requests
//! relayed with the headers that let a browser read the answer.
//!
//! Where the spec lets an implementation choose, this one echoes the request's values instead of
//! `*` whenever credentials are allowed (the spec requires it then), and answers a preflight from
//! an origin it does not allow with 200 and no CORS headers (the browser then refuses the actual
//! request), as Envoy does.

use crate::model::{AllowedOrigin, CorsPolicy};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

/// What the filter does with one request.
#[derive(Debug, PartialEq)]
pub enum CorsOutcome {
    /// No `Origin`: not a CORS request; the filter does nothing.
    NotCors,
    /// A preflight: the agent answers it with these headers (none when the origin is not
    /// allowed).
    Preflight(HeaderMap),
    /// An actual cross-origin request: relayed, and its answer gets these headers.
    Actual(HeaderMap),
}

const REQUEST_METHOD: HeaderName = header::ACCESS_CONTROL_REQUEST_METHOD;
const REQUEST_HEADERS: HeaderName = header::ACCESS_CONTROL_REQUEST_HEADERS;

impl CorsPolicy {
    pub fn evaluate(&self, method: &Method, headers: &HeaderMap) -> CorsOutcome {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return CorsOutcome::NotCors;
        };
        let preflight = method == Method::OPTIONS && headers.contains_key(REQUEST_METHOD);
        let mut out = HeaderMap::new();
        // The answer depends on Origin: caches must key on it.
        out.insert(header::VARY, HeaderValue::from_static("origin"));
        if !self.allows_origin(origin.as_bytes()) {
            return if preflight {
                CorsOutcome::Preflight(out)
            } else {
                CorsOutcome::Actual(out)
            };
        }
        let wildcard = |list: &[String]| list.iter().any(|v| v == "*");
        let star = HeaderValue::from_static("*");
        let any_origin = self.allow_origins.contains(&AllowedOrigin::Any);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            if any_origin && !self.allow_credentials {
                star.clone()
            } else {
                origin.clone()
            },
        );
        if self.allow_credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // On a preflight too, where browsers ignore it: the Gateway API's conformance suite
        // (httproute-cors) expects it on both.
        let expose = if wildcard(&self.expose_headers) && !self.allow_credentials {
            Some(star.clone())
        } else {
            joined(self.expose_headers.iter().filter(|h| *h != "*"))
        };
        if let Some(expose) = expose {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose);
        }
        if !preflight {
            return CorsOutcome::Actual(out);
        }
        // Credentials allowed and `*` configured: name what was asked instead (the spec), or
        // leave the header out when nothing was asked.
        let allowed = |list: &[String], asked: HeaderName| match wildcard(list) {
            false => joined(list.iter()),
            true if !self.allow_credentials => Some(star.clone()),
            true => headers.get(asked).cloned(),
        };
        if let Some(methods) = allowed(&self.allow_methods, REQUEST_METHOD) {
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        }
        if let Some(names) = allowed(&self.allow_headers, REQUEST_HEADERS) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, names);
        }
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(self.max_age),
        );
        CorsOutcome::Preflight(out)
    }

    fn allows_origin(&self, origin: &[u8]) -> bool {
        let Some(AllowedOrigin::Origin { scheme, host, port }) = std::str::from_utf8(origin)
            .ok()
            .and_then(AllowedOrigin::parse)
        else {
            // `null` (opaque origins) and garbage are never allowed by name; `*` allows them.
            return self.allow_origins.contains(&AllowedOrigin::Any);
        };
        self.allow_origins.iter().any(|allowed| match allowed {
            AllowedOrigin::Any => true,
            AllowedOrigin::Origin {
                scheme: s,
                host: h,
                port: p,
            } => *s == scheme && *p == port && host_matches(h, &host),
        })
    }
}

/// `*` alone matches every host; `*.example.com` any host ending in `.example.com` (one or more
/// labels to its left, greedily).
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        None => pattern == host,
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
    }
}

fn joined<'a>(mut values: impl Iterator<Item = &'a String>) -> Option<HeaderValue> {
    let first = values.next()?;
    let mut text = first.clone();
    for value in values {
        text.push_str(", ");
        text.push_str(value);
    }
    HeaderValue::from_str(&text).ok()
}

/// Adds the filter's headers to a backend's answer. Its `Access-Control-*` headers replace the
/// backend's (the route's policy is the one in force); `Vary` is a list (RFC 9110 §12.5.5) and
/// is added to, so that a cache still keys on what the backend varies by.
pub fn add_to_answer(cors: HeaderMap, answer: &mut HeaderMap) {
    let mut last_name: Option<HeaderName> = None;
    for (named, value) in cors {
        // `HeaderMap`'s iterator names only the first of a name's values.
        let first = named.is_some();
        let name = named
            .or(last_name.take())
            .expect("a first value has its name");
        if name == header::VARY {
            if !varies_by(answer, value.to_str().unwrap_or_default()) {
                answer.append(header::VARY, value);
            }
        } else if first {
            answer.insert(name.clone(), value);
        } else {
            answer.append(name.clone(), value);
        }
        last_name = Some(name);
    }
}

/// Whether an answer's `Vary` lists `field` already (or `*`, which covers every field).
fn varies_by(answer: &HeaderMap, field: &str) -> bool {
    answer
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.eq_ignore_ascii_case(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> CorsPolicy {
        CorsPolicy {
            allow_origins: origins
                .iter()
                .map(|o| AllowedOrigin::parse(o).unwrap())
                .collect(),
            allow_credentials: credentials,
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["x-header-1".into(), "x-header-2".into()],
            expose_headers: vec!["x-exposed".into()],
            max_age: 3600,
        }
    }

    fn request(method: Method, headers: &[(&str, &str)]) -> (Method, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        (method, map)
    }

    fn outcome(policy: &CorsPolicy, method: Method, headers: &[(&str, &str)]) -> CorsOutcome {
        let (method, headers) = request(method, headers);
        policy.evaluate(&method, &headers)
    }

    #[test]
    fn origins_match_by_scheme_host_and_port_with_left_wildcards() {
        let p = policy(
            &[
                "https://www.foo.com",
                "https://*.foobar.com",
                "http://x:8080",
            ],
            false,
        );
        for (origin, allowed) in [
            ("https://www.foo.com", true),
            ("https://www.foo.com:443", true),
            ("https://WWW.FOO.COM", true),
            ("http://www.foo.com", false),
            ("https://www.foo.com:8443", false),
            ("https://a.b.foobar.com", true),
            ("https://foobar.com", false),
            ("http://x:8080", true),
            ("http://x", false),
            ("null", false),
        ] {
            assert_eq!(p.allows_origin(origin.as_bytes()), allowed, "{origin}");
        }
        assert!(policy(&["*"], false).allows_origin(b"null"));
        assert!(policy(&["https://*"], false).allows_origin(b"https://any.where"));
    }

    #[test]
    fn preflight_from_an_allowed_origin_gets_every_header() {
        let p = policy(&["https://www.foo.com"], true);
        let CorsOutcome::Preflight(h) = outcome(
            &p,
            Method::OPTIONS,
            &[
                ("origin", "https://www.foo.com"),
                ("access-control-request-method", "PUT"),
            ],
        ) else {
            panic!("a preflight")
        };
        assert_eq!(h["access-control-allow-origin"], "https://www.foo.com");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-methods"], "GET, PUT");
        assert_eq!(h["access-control-allow-headers"], "x-header-1, x-header-2");
        assert_eq!(h["access-control-max-age"], "3600");
        assert_eq!(h["vary"], "origin");
        assert_eq!(h["access-control-expose-headers"], "x-exposed");
    }

    #[test]
    fn wildcards_are_echoed_when_credentials_are_allowed() {
        let mut p = policy(&["*"], true);
        p.allow_methods = vec!["*".into()];
        p.allow_headers = vec!["*".into()];
        p.expose_headers = vec!["*".into(), "x-named".into()];
        let preflight = [
            ("origin", "https://app.example"),
            ("access-control-request-method", "DELETE"),
            ("access-control-request-headers", "x-a, x-b"),
        ];
        let CorsOutcome::Preflight(h) = outcome(&p, Method::OPTIONS, &preflight) else {
            panic!("a preflight")
        };
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert_eq!(h["access-control-allow-methods"], "DELETE");
        assert_eq!(h["access-control-allow-headers"], "x-a, x-b");
        let CorsOutcome::Actual(h) = outcome(&p, Method::GET, &preflight[..1]) else {
            panic!("an actual request")
        };
        assert_eq!(h["access-control-expose-headers"], "x-named");
        p.allow_credentials = false;
        let CorsOutcome::Preflight(h) = outcome(&p, Method::OPTIONS, &preflight) else {
            panic!("a preflight")
        };
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-allow-methods"], "*");
        assert!(!h.contains_key("access-control-allow-credentials"));
    }

    #[test]
    fn other_origins_and_plain_requests() {
        let p = policy(&["https://www.foo.com"], false);
        let CorsOutcome::Preflight(h) = outcome(
            &p,
            Method::OPTIONS,
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "GET"),
            ],
        ) else {
            panic!("a preflight")
        };
        assert!(!h.contains_key("access-control-allow-origin"));
        let CorsOutcome::Actual(h) = outcome(&p, Method::GET, &[("origin", "https://www.foo.com")])
        else {
            panic!("an actual request")
        };
        assert_eq!(h["access-control-allow-origin"], "https://www.foo.com");
        assert_eq!(h["access-control-expose-headers"], "x-exposed");
        // OPTIONS without Access-Control-Request-Method is an ordinary request.
        assert!(matches!(
            outcome(&p, Method::OPTIONS, &[("origin", "https://www.foo.com")]),
            CorsOutcome::Actual(_)
        ));
        assert_eq!(outcome(&p, Method::GET, &[]), CorsOutcome::NotCors);
    }

    #[test]
    fn the_filters_vary_is_added_to_the_backends_and_its_cors_headers_replace_the_backends() {
        let cors = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let filter = cors(&[
            ("vary", "origin"),
            ("access-control-allow-origin", "https://a"),
        ]);
        let mut answer = cors(&[
            ("vary", "Accept-Encoding"),
            ("access-control-allow-origin", "*"),
        ]);
        add_to_answer(filter.clone(), &mut answer);
        let vary: Vec<_> = answer.get_all("vary").iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "origin"]);
        assert_eq!(answer["access-control-allow-origin"], "https://a");
        for already in ["Origin", "accept-encoding, origin", "*"] {
            let mut answer = cors(&[("vary", already)]);
            add_to_answer(filter.clone(), &mut answer);
            assert_eq!(answer.get_all("vary").iter().count(), 1, "{already}");
        }
    }
}
