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
        /// The HTTP/2 error code the backend reset the stream with, if it did.
        reset: Option<u32>,
    },
    #[error(
        "{attempts} attempts at {backend} failed, the route's retries included (the last, to \
         {endpoint}: {error})"
    )]
    RetriesExhausted {
        endpoint: SocketAddr,
        backend: String,
        attempts: u32,
        error: String,
    },
    #[error(
        "the request's body broke off before its end (the client closed or reset it, or sent a \
         malformed chunk): {0}"
    )]
    RequestBodyBrokeOff(String),
    #[error(
        "the backend request timeout of {0:?} expired while the client was still sending the \
         request's body"
    )]
    RequestBodyTimeout(Duration),
    #[error("the route's request timeout of {0:?} expired")]
    RouteTimeout(Duration),
    #[error("the request head is {size} bytes, over the limit of {limit}")]
    HeadTooLarge { size: usize, limit: usize },
    #[error("the request target `{0}` is not a path (origin-form or http(s) absolute-form)")]
    BadTarget(String),
    #[error("a request needs one Host field (HTTP/1.1: exactly one); this one has {0}")]
    BadHost(usize),
    #[error("the Host field `{0}` is not a host and optional port (RFC 9112 §3.2)")]
    HostNotAnAuthority(String),
    #[error("Transfer-Encoding `{0}`: the agent implements `chunked` alone")]
    UnknownTransferCoding(String),
    #[error("not implemented by the agent: {0}")]
    UnsupportedMethod(&'static str),
    #[error(
        "this node's agent is stopping or restarting: connect again (a new connection goes to its \
         successor, or to the Service as without the mesh)"
    )]
    Draining,
}

impl LocalAnswer {
    /// The backend declined the request before processing any of it (REFUSED_STREAM, or left
    /// out of a GOAWAY).
    pub fn unprocessed(&self) -> bool {
        matches!(self, LocalAnswer::BackendFailed { reset: Some(code), .. }
            if h2::Reason::from(*code) == h2::Reason::REFUSED_STREAM)
    }

    pub fn reason(&self) -> Reason {
        match self {
            LocalAnswer::Rule(LocalResponse::Redirect { .. }) => Reason::Redirect,
            LocalAnswer::Rule(LocalResponse::Preflight(_)) => Reason::CorsPreflight,
            LocalAnswer::Rule(LocalResponse::RedirectNeedsHost) => Reason::BadHost,
            LocalAnswer::Rule(_) => Reason::RuleNotServable,
            LocalAnswer::UnknownFrontend(_) => Reason::UnknownFrontend,
            LocalAnswer::NoMatchingRule(_) => Reason::NoMatchingRule,
            LocalAnswer::NoReadyEndpoint(_) => Reason::NoReadyEndpoint,
            LocalAnswer::ConnectFailed { .. } => Reason::ConnectFailed,
            LocalAnswer::BackendTimeout { .. } => Reason::BackendTimeout,
            LocalAnswer::BackendFailed { .. } | LocalAnswer::RetriesExhausted { .. } => {
                Reason::BackendFailed
            }
            LocalAnswer::RequestBodyBrokeOff(_) => Reason::RequestBodyBrokeOff,
            LocalAnswer::RequestBodyTimeout(_) => Reason::RequestBodyTimeout,
            LocalAnswer::RouteTimeout(_) => Reason::RouteTimeout,
            LocalAnswer::HeadTooLarge { .. } => Reason::HeadTooLarge,
            LocalAnswer::BadTarget(_) => Reason::BadTarget,
            LocalAnswer::BadHost(_) | LocalAnswer::HostNotAnAuthority(_) => Reason::BadHost,
            LocalAnswer::UnknownTransferCoding(_) | LocalAnswer::UnsupportedMethod(_) => {
                Reason::NotImplemented
            }
            LocalAnswer::Draining => Reason::Draining,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            LocalAnswer::Rule(rule) => rule.status(),
            LocalAnswer::NoMatchingRule(_) => StatusCode::NOT_FOUND,
            LocalAnswer::UnknownFrontend(_)
            | LocalAnswer::NoReadyEndpoint(_)
            | LocalAnswer::ConnectFailed { .. }
            | LocalAnswer::RetriesExhausted { .. }
            | LocalAnswer::Draining => StatusCode::SERVICE_UNAVAILABLE,
            LocalAnswer::BackendTimeout { .. } | LocalAnswer::RouteTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            // Declined before any of it was processed (RFC 9113 §8.7), at every resend: the
            // backend is unavailable for it, not broken; as Envoy answers a refused stream.
            LocalAnswer::BackendFailed { .. } if self.unprocessed() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            LocalAnswer::BackendFailed { .. } => StatusCode::BAD_GATEWAY,
            LocalAnswer::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            LocalAnswer::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            LocalAnswer::BadTarget(_)
            | LocalAnswer::BadHost(_)
            | LocalAnswer::HostNotAnAuthority(_)
            | LocalAnswer::RequestBodyBrokeOff(_) => StatusCode::BAD_REQUEST,
            LocalAnswer::UnknownTransferCoding(_) | LocalAnswer::UnsupportedMethod(_) => {
                StatusCode::NOT_IMPLEMENTED
            }
        }
    }

    /// What a gRPC caller gets instead of an HTTP error (a gRPC client reads `grpc-status`, not
    /// the HTTP status): `None` for a redirect, which stays an HTTP answer. GRPCRoute: "When a
    /// GRPCBackendRef is invalid, UNAVAILABLE statuses MUST be returned"; the rest follows gRPC's
    /// own mapping of HTTP errors (doc/http-grpc-status-mapping.md), as Envoy does.
    pub fn grpc_status(&self) -> Option<GrpcStatus> {
        Some(match self {
            LocalAnswer::Rule(LocalResponse::Redirect { .. } | LocalResponse::Preflight(_)) => {
                return None
            }
            LocalAnswer::Rule(
                LocalResponse::UnsupportedFilter(_)
                | LocalResponse::InvalidRule(_)
                | LocalResponse::RedirectNeedsHost,
            ) => GrpcStatus::Internal,
            // A stream the backend reset: gRPC's mapping of HTTP/2 error codes
            // (PROTOCOL-HTTP2.md, "Errors"). UNAVAILABLE would tell the caller that sending the
            // call again is safe, which it may not be once the backend acted on it.
            LocalAnswer::BackendFailed {
                reset: Some(code), ..
            } => match h2::Reason::from(*code) {
                h2::Reason::REFUSED_STREAM => GrpcStatus::Unavailable,
                h2::Reason::CANCEL => GrpcStatus::Cancelled,
                h2::Reason::ENHANCE_YOUR_CALM => GrpcStatus::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => GrpcStatus::PermissionDenied,
                _ => GrpcStatus::Internal,
            },
            LocalAnswer::Rule(_)
            | LocalAnswer::UnknownFrontend(_)
            | LocalAnswer::NoReadyEndpoint(_)
            | LocalAnswer::ConnectFailed { .. }
            | LocalAnswer::BackendFailed { .. }
            | LocalAnswer::RetriesExhausted { .. }
            | LocalAnswer::Draining => GrpcStatus::Unavailable,
            LocalAnswer::NoMatchingRule(_) => GrpcStatus::Unimplemented,
            LocalAnswer::BackendTimeout { .. }
            | LocalAnswer::RequestBodyTimeout(_)
            | LocalAnswer::RouteTimeout(_) => GrpcStatus::DeadlineExceeded,
            LocalAnswer::HeadTooLarge { .. }
            | LocalAnswer::BadTarget(_)
            | LocalAnswer::BadHost(_)
            | LocalAnswer::HostNotAnAuthority(_)
            | LocalAnswer::UnknownTransferCoding(_)
            | LocalAnswer::RequestBodyBrokeOff(_) => GrpcStatus::Internal,
            LocalAnswer::UnsupportedMethod(_) => GrpcStatus::Unimplemented,
        })
    }

    /// The headers of a CORS preflight answer.
    pub fn headers(&self) -> Option<&http::HeaderMap> {
        match self {
            LocalAnswer::Rule(LocalResponse::Preflight(headers)) => Some(headers),
            _ => None,
        }
    }

    pub fn location(&self) -> Option<&str> {
        match self {
            LocalAnswer::Rule(rule) => rule.location(),
            _ => None,
        }
    }
}

/// The gRPC status codes the agent answers with (grpc's doc/statuscodes.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcStatus {
    Cancelled,
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
    Internal,
    Unavailable,
}

impl GrpcStatus {
    /// The `grpc-status` value.
    pub fn code(self) -> &'static str {
        match self {
            GrpcStatus::Cancelled => "1",
            GrpcStatus::DeadlineExceeded => "4",
            GrpcStatus::PermissionDenied => "7",
            GrpcStatus::ResourceExhausted => "8",
            GrpcStatus::Unimplemented => "12",
            GrpcStatus::Internal => "13",
            GrpcStatus::Unavailable => "14",
        }
    }
}

/// `grpc-message` as gRPC's HTTP/2 protocol spells it: bytes outside printable ASCII, and `%`,
/// percent-encoded.
pub fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
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
        assert_eq!(redirect.grpc_status(), None);
        assert_eq!(zero.grpc_status(), Some(GrpcStatus::Unavailable));
        assert_eq!(
            LocalAnswer::NoMatchingRule("ns/s:80".into()).grpc_status(),
            Some(GrpcStatus::Unimplemented)
        );
        assert_eq!(
            LocalAnswer::RouteTimeout(Duration::from_secs(1)).grpc_status(),
            Some(GrpcStatus::DeadlineExceeded)
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_message("no rule: 100% é"), "no rule: 100%25 %C3%A9");
    }
}
