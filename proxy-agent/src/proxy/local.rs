//! Local answers: every reason the agent answers a request itself instead of relaying the
//! backend's answer. Each has its status, a one-line message (the body and the access log say
//! it) and a bounded label for `/metrics` (`telemetry::metrics::Reason`).

pub use crate::telemetry::metrics::Reason;
use gamma_engine::routes::LocalResponse;
use http::StatusCode;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LocalAnswer {
    /// The matched rule answers itself: a redirect, or a rule that cannot be served as written.
    #[error(transparent)]
    Rule(#[from] LocalResponse),
    #[error("no Service frontend is known for {0}; check that the Service exists")]
    UnknownFrontend(String),
    #[error("no rule of the routes attached to {0} matches this request")]
    NoMatchingRule(String),
    #[error("backend {0} has no ready endpoint")]
    NoReadyEndpoint(String),
    #[error("connecting to {endpoint} of {backend} failed: {error}")]
    ConnectFailed {
        endpoint: SocketAddr,
        backend: String,
        error: String,
    },
    #[error("{endpoint} of {backend} did not answer within {after:?}")]
    BackendTimeout {
        endpoint: SocketAddr,
        backend: String,
        after: Duration,
    },
    #[error("request to {endpoint} of {backend} failed: {error}")]
    BackendFailed {
        endpoint: SocketAddr,
        backend: String,
        error: String,
    },
    #[error("the route's request timeout of {0:?} expired")]
    RouteTimeout(Duration),
    #[error("the request head is {size} bytes, over the limit of {limit}")]
    HeadTooLarge { size: usize, limit: usize },
    #[error("the request target `{0}` is not a path (origin-form or http(s) absolute-form)")]
    BadTarget(String),
}

impl LocalAnswer {
    pub fn reason(&self) -> Reason {
        match self {
            LocalAnswer::Rule(LocalResponse::Redirect { .. }) => Reason::Redirect,
            LocalAnswer::Rule(_) => Reason::RuleNotServable,
            LocalAnswer::UnknownFrontend(_) => Reason::UnknownFrontend,
            LocalAnswer::NoMatchingRule(_) => Reason::NoMatchingRule,
            LocalAnswer::NoReadyEndpoint(_) => Reason::NoReadyEndpoint,
            LocalAnswer::ConnectFailed { .. } => Reason::ConnectFailed,
            LocalAnswer::BackendTimeout { .. } => Reason::BackendTimeout,
            LocalAnswer::BackendFailed { .. } => Reason::BackendFailed,
            LocalAnswer::RouteTimeout(_) => Reason::RouteTimeout,
            LocalAnswer::HeadTooLarge { .. } => Reason::HeadTooLarge,
            LocalAnswer::BadTarget(_) => Reason::BadTarget,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            LocalAnswer::Rule(rule) => rule.status(),
            LocalAnswer::NoMatchingRule(_) => StatusCode::NOT_FOUND,
            LocalAnswer::UnknownFrontend(_)
            | LocalAnswer::NoReadyEndpoint(_)
            | LocalAnswer::ConnectFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            LocalAnswer::BackendTimeout { .. } | LocalAnswer::RouteTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            LocalAnswer::BackendFailed { .. } => StatusCode::BAD_GATEWAY,
            LocalAnswer::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            LocalAnswer::BadTarget(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn location(&self) -> Option<&str> {
        match self {
            LocalAnswer::Rule(rule) => rule.location(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_reasons() {
        let redirect = LocalAnswer::from(LocalResponse::Redirect {
            status: StatusCode::MOVED_PERMANENTLY,
            location: "http://x/".into(),
        });
        assert_eq!(redirect.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(redirect.location(), Some("http://x/"));
        assert_eq!(redirect.reason(), Reason::Redirect);
        let zero = LocalAnswer::from(LocalResponse::AllWeightsZero);
        assert_eq!(zero.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(zero.reason(), Reason::RuleNotServable);
        assert_eq!(
            LocalAnswer::NoMatchingRule("ns/s:80".into()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
