//! Session tokens of session persistence (GEP-1619): what the agent gives a client to come back
//! with, and reads back. The token names the endpoint, the backendRef (its index in the rule) the
//! session began through where more than one serves the endpoint, and when the session started
//! and was last used (Unix seconds): `10.0.0.7:8080_1733200000_1733200042`, or
//! `10.0.0.7:8080_1_1733200000_1733200042`. It holds nothing secret: a client can only name an
//! endpoint, and a backendRef serving it, that the rule has anyway.

use crate::model::{SessionCarrier, SessionPersistence};
use http::header::{HeaderValue, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName};
use std::net::SocketAddr;

/// How far ahead of this node's clock a session's times may be (nodes' clocks differ a little).
const CLOCK_SKEW: u64 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub endpoint: SocketAddr,
    /// The backendRef the session began through: two of a rule's may share endpoints (one
    /// Service twice, with different filters), and the session stays with its own.
    pub backend: Option<u16>,
    /// Unix seconds.
    pub started: u64,
    pub last_used: u64,
}

impl Session {
    fn token(&self) -> String {
        let backend = self.backend.map(|b| format!("_{b}")).unwrap_or_default();
        format!(
            "{}{backend}_{}_{}",
            self.endpoint, self.started, self.last_used
        )
    }

    fn parse(token: &str) -> Option<Session> {
        // An address holds no `_`.
        let mut parts = token.split('_');
        let endpoint = parts.next()?.parse().ok()?;
        let (first, second, third) = (parts.next()?, parts.next()?, parts.next());
        if parts.next().is_some() {
            return None;
        }
        let (backend, started, last_used) = match third {
            None => (None, first, second),
            Some(third) => (Some(first.parse().ok()?), second, third),
        };
        Some(Session {
            endpoint,
            backend,
            started: started.parse().ok()?,
            last_used: last_used.parse().ok()?,
        })
    }
}

impl SessionPersistence {
    /// The session the request carries, if any and if still live at `now`.
    pub fn resume(&self, headers: &HeaderMap, now: u64) -> Option<Session> {
        let session = match &self.carrier {
            SessionCarrier::Cookie { name, .. } => headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(n, _)| n == name)
                .and_then(|(_, token)| Session::parse(token)),
            SessionCarrier::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(Session::parse),
        }?;
        let within = |timeout: Option<std::time::Duration>, since: u64| {
            timeout.is_none_or(|t| now.saturating_sub(since) <= t.as_secs())
        };
        // Times from the future (a forged token, another node's clock ahead) are not trusted.
        let consistent =
            session.started <= session.last_used && session.last_used <= now + CLOCK_SKEW;
        (consistent
            && within(self.absolute_timeout, session.started)
            && within(self.idle_timeout, session.last_used))
        .then_some(session)
    }

    /// The answer's header that gives the client `session`: a `Set-Cookie` or the named header.
    pub fn offer(&self, session: &Session) -> (HeaderName, HeaderValue) {
        let token = session.token();
        let value = match &self.carrier {
            SessionCarrier::Cookie {
                name,
                path,
                permanent,
            } => {
                let max_age = match (permanent, self.absolute_timeout) {
                    (true, Some(t)) => {
                        let left = t
                            .as_secs()
                            .saturating_sub(session.last_used.saturating_sub(session.started));
                        format!("; Max-Age={left}")
                    }
                    _ => String::new(),
                };
                (
                    SET_COOKIE,
                    format!("{name}={token}; Path={path}; HttpOnly{max_age}"),
                )
            }
            SessionCarrier::Header(name) => (name.clone(), token),
        };
        let (name, text) = value;
        // Digits, an address, and the name and path checked on conversion: always valid.
        let value = HeaderValue::from_str(&text).expect("a session header value is printable");
        (name, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cookie(permanent: bool) -> SessionPersistence {
        SessionPersistence {
            carrier: SessionCarrier::Cookie {
                name: "s".into(),
                path: "/".into(),
                permanent,
            },
            absolute_timeout: Some(Duration::from_secs(100)),
            idle_timeout: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn a_session_round_trips_and_times_out() {
        let policy = cookie(true);
        let session = Session {
            endpoint: "[fd00::7]:8080".parse().unwrap(),
            backend: Some(1),
            started: 1000,
            last_used: 1030,
        };
        let (name, value) = policy.offer(&session);
        assert_eq!(name, SET_COOKIE);
        assert_eq!(
            value,
            "s=[fd00::7]:8080_1_1000_1030; Path=/; HttpOnly; Max-Age=70"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("a=b; s=[fd00::7]:8080_1_1000_1030"),
        );
        assert_eq!(policy.resume(&headers, 1035), Some(session));
        assert_eq!(policy.resume(&headers, 1041), None, "idle past 10 s");
        let mut late = headers.clone();
        late.insert(COOKIE, HeaderValue::from_static("s=10.0.0.1:80_1000_1099"));
        assert!(policy.resume(&late, 1099).is_some());
        assert_eq!(policy.resume(&late, 1101), None, "past the absolute 100 s");
        headers.insert(COOKIE, HeaderValue::from_static("s=garbage"));
        assert_eq!(policy.resume(&headers, 1035), None);
        // A token of an agent before the backendRef was named is read; one with a field too
        // many, or a backendRef past any rule's, is not.
        headers.insert(COOKIE, HeaderValue::from_static("s=10.0.0.1:80_1000_1030"));
        let older = policy.resume(&headers, 1035).unwrap();
        assert_eq!((older.backend, older.started), (None, 1000));
        for odd in [
            "s=10.0.0.1:80_1_2_1000_1030",
            "s=10.0.0.1:80_70000_1000_1030",
        ] {
            headers.insert(COOKIE, HeaderValue::from_static(odd));
            assert_eq!(policy.resume(&headers, 1035), None, "{odd}");
        }
        // Times from the future, or started after last used: refused.
        headers.insert(COOKIE, HeaderValue::from_static("s=10.0.0.1:80_1000_5000"));
        assert_eq!(policy.resume(&headers, 1035), None);
        headers.insert(COOKIE, HeaderValue::from_static("s=10.0.0.1:80_1030_1000"));
        assert_eq!(policy.resume(&headers, 1035), None);
        let odd = Session {
            started: 2000,
            ..session
        };
        assert!(policy
            .offer(&odd)
            .1
            .to_str()
            .unwrap()
            .ends_with("Max-Age=100"));
        assert!(!cookie(false)
            .offer(&session)
            .1
            .to_str()
            .unwrap()
            .contains("Max-Age"));
    }

    #[test]
    fn header_sessions() {
        let policy = SessionPersistence {
            carrier: SessionCarrier::Header(HeaderName::from_static("x-session")),
            absolute_timeout: None,
            idle_timeout: None,
        };
        let session = Session {
            endpoint: "10.0.0.1:80".parse().unwrap(),
            backend: None,
            started: 5,
            last_used: 9,
        };
        let (name, value) = policy.offer(&session);
        let mut headers = HeaderMap::new();
        headers.insert(name, value);
        assert_eq!(
            policy.resume(&headers, 1_000_000),
            Some(session),
            "no timeouts"
        );
    }
}
