//! The Gateway API features this implementation supports, by upstream's feature names (the
//! conformance suite runs a test only if all of its features are listed here).

pub const SUPPORTED_FEATURES: &[&str] = &[
    // Mesh profile, core and extended.
    "Mesh",
    "MeshClusterIPMatching",
    "MeshConsumerRoute",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteNamedRouteRule",
    // Route kinds and their extended features.
    "HTTPRoute",
    "GRPCRoute",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteMethodMatching",
    "HTTPRoutePathRewrite",
    "HTTPRouteHostRewrite",
    "HTTPRoutePathRedirect",
    "HTTPRoutePortRedirect",
    "HTTPRouteSchemeRedirect",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteParentRefPort",
    "HTTPRouteRequestTimeout",
    "HTTPRouteBackendTimeout",
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror",
    "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteNamedRouteRule",
    "HTTPRouteRetry",
    "HTTPRouteRetryBackendTimeout",
    "HTTPRouteRetryConnectionError",
    "HTTPRouteCORS",
];

pub fn supports(feature: &str) -> bool {
    SUPPORTED_FEATURES.contains(&feature)
}
