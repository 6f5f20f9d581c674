//! Session persistence of a route rule (GEP-1619, experimental channel): requests carrying a
//! session (a cookie or a header the agent set) go back to the endpoint that served the session,
//! whatever the weights say, until the endpoint is gone or the session times out.
//!
//! Read from the route's JSON rather than the generated types: the CRDs changed its shape
//! (`sessionName` and `cookieConfig` became `cookie` and `header`), and both are read.

use super::convert::invalid;
use super::route::gep2257;
use super::ObjectError;
use http::HeaderName;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionPersistence {
    pub carrier: SessionCarrier,
    /// The session ends this long after it started.
    pub absolute_timeout: Option<Duration>,
    /// The session ends after this long without a request.
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum SessionCarrier {
    /// `permanent`: the cookie carries `Max-Age` (the absolute timeout); else it is a session
    /// cookie, gone when the browser closes.
    Cookie {
        name: String,
        path: String,
        permanent: bool,
    },
    Header(#[serde(serialize_with = "serialize_name")] HeaderName),
}

fn serialize_name<S: serde::Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

/// Headers a session may not travel in: message framing, hop-by-hop, routing and cookies.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "cookie",
    "host",
    "keep-alive",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn duration(value: &Value, field: &str) -> Result<Option<Duration>, ObjectError> {
    value.as_str().map(|text| gep2257(text, field)).transpose()
}

/// The session persistence of rule `index` of `route` (its JSON), if it has one. A cookie without
/// a name gets one derived from the route and the rule, stable across restarts and nodes.
pub fn session_persistence(
    route: &Value,
    index: usize,
) -> Result<Option<SessionPersistence>, ObjectError> {
    let field = format!("spec.rules[{index}].sessionPersistence");
    let config = &route["spec"]["rules"][index]["sessionPersistence"];
    if config.is_null() {
        return Ok(None);
    }
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    // Older CRDs: `sessionName` and `cookieConfig.lifetimeType`.
    let legacy_name = text(&config["sessionName"]);
    let absolute_timeout = duration(
        &config["absoluteTimeout"],
        &format!("{field}.absoluteTimeout"),
    )?;
    let idle_timeout = duration(&config["idleTimeout"], &format!("{field}.idleTimeout"))?;
    let carrier = match config["type"].as_str().unwrap_or("Cookie") {
        "Cookie" => {
            let cookie = &config["cookie"];
            let lifetime = cookie["lifetimeType"]
                .as_str()
                .or(config["cookieConfig"]["lifetimeType"].as_str())
                .unwrap_or("Session");
            let permanent = lifetime == "Permanent";
            if permanent && absolute_timeout.is_none() {
                return Err(invalid(
                    &field,
                    "absoluteTimeout must be set when the cookie lifetimeType is Permanent",
                ));
            }
            let name = text(&cookie["name"])
                .or(legacy_name)
                .unwrap_or_else(|| generated_name(route, index));
            // An RFC 9110 token, as RFC 6265's cookie-name and the CRD's pattern say.
            let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(tchar) {
                return Err(invalid(
                    &field,
                    format!("`{name}` is not a usable cookie name"),
                ));
            }
            let path = text(&cookie["path"]).unwrap_or_else(|| "/".into());
            // RFC 6265 path-value: no `;` (it would add attributes), no control characters.
            let printable = path.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';');
            if !path.starts_with('/') || !printable {
                return Err(invalid(
                    &field,
                    format!("`{path}` is not a usable cookie path"),
                ));
            }
            SessionCarrier::Cookie {
                name,
                path,
                permanent,
            }
        }
        "Header" => {
            let name = text(&config["header"]["name"])
                .or(legacy_name)
                .ok_or_else(|| invalid(&field, "a Header session needs header.name"))?;
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&field, format!("`{name}` is not a valid header name")))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(invalid(
                    &field,
                    format!("`{name}` frames or routes the message: choose another header"),
                ));
            }
            SessionCarrier::Header(header)
        }
        other => return Err(invalid(&field, format!("unknown type `{other}`"))),
    };
    Ok(Some(SessionPersistence {
        carrier,
        absolute_timeout,
        idle_timeout,
    }))
}

/// `gamma-session-` and a hash of the route's kind, namespace, name and the rule's index.
fn generated_name(route: &Value, index: usize) -> String {
    let identity = format!(
        "{}/{}/{}/{index}",
        route["kind"].as_str().unwrap_or_default(),
        route["metadata"]["namespace"].as_str().unwrap_or("default"),
        route["metadata"]["name"].as_str().unwrap_or_default()
    );
    let hash = identity.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("gamma-session-{:08x}", hash as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(session: Value) -> Value {
        json!({"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "ns"},
               "spec": {"rules": [{"sessionPersistence": session}]}})
    }

    #[test]
    fn both_shapes_and_the_defaults() {
        let cookie = session_persistence(
            &route(
                json!({"type": "Cookie", "cookie": {"name": "s", "lifetimeType": "Permanent"},
                          "absoluteTimeout": "1h", "idleTimeout": "10m"}),
            ),
            0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            cookie.carrier,
            SessionCarrier::Cookie {
                name: "s".into(),
                path: "/".into(),
                permanent: true
            }
        );
        assert_eq!(cookie.absolute_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(cookie.idle_timeout, Some(Duration::from_secs(600)));
        let legacy = session_persistence(
            &route(json!({"sessionName": "old", "cookieConfig": {"lifetimeType": "Session"}})),
            0,
        )
        .unwrap()
        .unwrap();
        assert!(
            matches!(legacy.carrier, SessionCarrier::Cookie { ref name, permanent: false, .. } if name == "old")
        );
        let unnamed = session_persistence(&route(json!({})), 0).unwrap().unwrap();
        let SessionCarrier::Cookie { name, .. } = unnamed.carrier else {
            panic!()
        };
        assert!(name.starts_with("gamma-session-"), "{name}");
        let header = session_persistence(
            &route(json!({"type": "Header", "header": {"name": "x-session"}})),
            0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            header.carrier,
            SessionCarrier::Header(HeaderName::from_static("x-session"))
        );
        assert!(session_persistence(&route(json!({"type": "Header"})), 0).is_err());
        for header in ["content-length", "Set-Cookie", "transfer-encoding"] {
            let bad = json!({"type": "Header", "header": {"name": header}});
            assert!(session_persistence(&route(bad), 0).is_err(), "{header}");
        }
        // Cookie names: any token the CRD's pattern admits; nothing that would end the pair.
        for name in ["sess!id", "a#b$c%d&e'f*g+h^i`j|k~l", "s.1_2-3"] {
            let good = json!({"cookie": {"name": name}});
            assert!(session_persistence(&route(good), 0).is_ok(), "{name}");
        }
        for name in ["a=b", "a;b", "a b", "a\"b", "a,b", "ä"] {
            let bad = json!({"cookie": {"name": name}});
            assert!(session_persistence(&route(bad), 0).is_err(), "{name}");
        }
        for path in ["x", "/; Domain=.example.com", "/a\u{7}"] {
            let bad = json!({"cookie": {"name": "s", "path": path}});
            assert!(session_persistence(&route(bad), 0).is_err(), "{path}");
        }
        assert!(
            session_persistence(&route(json!({"cookie": {"lifetimeType": "Permanent"}})), 0)
                .is_err()
        );
        assert_eq!(
            session_persistence(&json!({"spec": {"rules": [{}]}}), 0).unwrap(),
            None
        );
    }
}
