//! Gateway API precedence: which of several matching rules wins.
//!
//! Across all rules of all routes that apply to a caller on a frontend (HTTPRoute spec):
//! an Exact path, then the longest PathPrefix, then a method match, then the most header matches,
//! then the most query-param matches; remaining ties go to the oldest route, then `namespace/name`
//! in alphabetical order, then the first rule (and match) in list order. Regular expressions rank
//! between Exact and PathPrefix (implementation-specific in the spec; Envoy Gateway does the same).
//! GRPCRoute: the longest service, then the longest method (exact names: a regular expression
//! has no characters of its own, and ranks after every exact name but before no method match),
//! then the most header matches.

use crate::model::{PathMatch, RouteMatch};
use std::cmp::{Ordering, Reverse};

/// How specific a match is; greater is more specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    path_kind: u8,
    path_len: usize,
    grpc_service_len: usize,
    grpc_method_len: usize,
    grpc_pattern: bool,
    method: bool,
    headers: usize,
    query_params: usize,
}

impl Specificity {
    pub fn of(m: &RouteMatch) -> Self {
        if let Some(grpc) = m.grpc() {
            return Specificity {
                path_kind: 0,
                path_len: 0,
                grpc_service_len: grpc.service_len.into(),
                grpc_method_len: grpc.method_len.into(),
                grpc_pattern: grpc.pattern,
                method: false,
                headers: m.headers().count(),
                query_params: 0,
            };
        }
        let (path_kind, path_len) = match &m.path {
            PathMatch::Exact(p) => (3, p.len()),
            PathMatch::Regex(r) => (2, r.as_str().len()),
            PathMatch::Prefix(p) => (1, p.len()),
        };
        Specificity {
            path_kind,
            path_len,
            grpc_service_len: 0,
            grpc_method_len: 0,
            grpc_pattern: false,
            method: m.method().is_some(),
            headers: m.headers().count(),
            query_params: m.query_params().count(),
        }
    }
}

/// The total order of table entries: most specific first, then the tie-breakers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RankKey {
    specificity: Reverse<Specificity>,
    /// Older first; a route without a creation time sorts after all that have one.
    created: (bool, i64),
    namespace_name: (String, String),
    rule: usize,
    match_index: usize,
}

impl RankKey {
    pub fn new(
        m: &RouteMatch,
        created: Option<i64>,
        namespace: &str,
        name: &str,
        rule: usize,
        match_index: usize,
    ) -> Self {
        RankKey {
            specificity: Reverse(Specificity::of(m)),
            created: (created.is_none(), created.unwrap_or_default()),
            namespace_name: (namespace.to_string(), name.to_string()),
            rule,
            match_index,
        }
    }
}

/// Compares two keys: `Less` means `a` wins.
pub fn compare(a: &RankKey, b: &RankKey) -> Ordering {
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{StringMatch, ValueMatch};
    use proptest::prelude::*;

    /// 2024-01-01T00:00:00Z.
    const JAN_2024: i64 = 1_704_067_200;

    fn m(path: PathMatch, method: bool, headers: usize, query: usize) -> RouteMatch {
        let exact = |i: usize| (format!("h{i}"), StringMatch::Exact("v".into()));
        RouteMatch::new(
            path,
            method.then_some(http::Method::GET),
            (0..headers)
                .map(exact)
                .map(|(n, value)| ValueMatch {
                    name: n.parse::<http::HeaderName>().unwrap().into(),
                    value,
                })
                .collect(),
            (0..query)
                .map(exact)
                .map(|(name, value)| ValueMatch {
                    name: name.into(),
                    value,
                })
                .collect(),
            None,
        )
    }

    fn key(m: &RouteMatch) -> RankKey {
        RankKey::new(m, Some(JAN_2024), "ns", "r", 0, 0)
    }

    #[test]
    fn spec_order() {
        let exact = key(&m(PathMatch::Exact("/a".into()), false, 0, 0));
        let long_prefix = key(&m(PathMatch::Prefix("/abc/def".into()), false, 0, 0));
        let short_prefix_method = key(&m(PathMatch::Prefix("/abc".into()), true, 0, 0));
        let short_prefix_headers = key(&m(PathMatch::Prefix("/abc".into()), false, 2, 0));
        let short_prefix_query = key(&m(PathMatch::Prefix("/abc".into()), false, 1, 3));
        let ordered = [
            exact,
            long_prefix,
            short_prefix_method,
            short_prefix_headers,
            short_prefix_query,
        ];
        for pair in ordered.windows(2) {
            assert_eq!(compare(&pair[0], &pair[1]), Ordering::Less, "{pair:?}");
        }
    }

    #[test]
    fn ties_go_to_oldest_then_name_then_rule() {
        let any = m(PathMatch::Prefix(Default::default()), false, 0, 0);
        let old = RankKey::new(&any, Some(JAN_2024 - 4 * 365 * 86_400), "z", "z", 5, 0);
        let new = RankKey::new(&any, Some(JAN_2024), "a", "a", 0, 0);
        assert_eq!(compare(&old, &new), Ordering::Less);
        let a = RankKey::new(&any, Some(JAN_2024), "a", "b", 3, 0);
        let b = RankKey::new(&any, Some(JAN_2024), "b", "a", 0, 0);
        assert_eq!(compare(&a, &b), Ordering::Less);
        let first_rule = RankKey::new(&any, None, "a", "a", 0, 0);
        let second_rule = RankKey::new(&any, None, "a", "a", 1, 0);
        assert_eq!(compare(&first_rule, &second_rule), Ordering::Less);
    }

    fn arb_match() -> impl Strategy<Value = RouteMatch> {
        (0u8..3, "[a-c]{0,4}", any::<bool>(), 0usize..3, 0usize..3).prop_map(
            |(kind, p, method, h, q)| {
                let path = match kind {
                    0 => PathMatch::Exact(format!("/{p}").into()),
                    1 => PathMatch::Prefix(format!("/{p}").trim_end_matches('/').into()),
                    _ => PathMatch::Regex(regex::Regex::new(&format!("^/{p}.*$")).unwrap().into()),
                };
                m(path, method, h, q)
            },
        )
    }

    proptest! {
        /// The order is total and consistent: sorting any set of entries gives one winner, and
        /// the winner is at least as specific as every other entry.
        #[test]
        fn winner_is_most_specific(matches in proptest::collection::vec(arb_match(), 1..12)) {
            let mut keys: Vec<(RankKey, Specificity)> = matches.iter().enumerate()
                .map(|(i, m)| (RankKey::new(m, None, "ns", "r", i, 0), Specificity::of(m)))
                .collect();
            keys.sort_by(|a, b| compare(&a.0, &b.0));
            for other in &keys[1..] {
                prop_assert!(keys[0].1 >= other.1);
                prop_assert_eq!(compare(&keys[0].0, &other.0), Ordering::Less);
            }
        }

        /// An Exact path beats every non-Exact match, whatever else it has.
        #[test]
        fn exact_beats_everything_else(a in arb_match(), b in arb_match()) {
            let a_exact = matches!(a.path, PathMatch::Exact(_));
            let b_exact = matches!(b.path, PathMatch::Exact(_));
            if a_exact && !b_exact {
                prop_assert_eq!(compare(&key(&a), &key(&b)), Ordering::Less);
            }
        }
    }
}
