//! Field names read off the wire by the agent's own HTTP/1.1 server and backend exchange (message
//! heads and chunked answers' trailers), made into `HeaderName`s without
//! `HeaderName::from_bytes` where it can: that lower-cases each name into a buffer and checks
//! every byte, and copies a name it does not know into an allocation of its own, on every
//! message. The usual names are matched as they are usually written; any other valid one of up to
//! [`KEPT_LEN`] bytes is kept per thread (a data-plane worker) once made, so that the names a
//! mesh's requests and answers carry over and over (`traceparent`, `x-request-id`, a backend's
//! own) are made once per worker, not once per message, while they keep their place in the table.

use http::header::{self, HeaderName, InvalidHeaderName};
use std::cell::RefCell;

/// Sets of the per-thread table of names made; each holds the two names of its set used last.
const SETS: usize = 64;

/// Longer names are made each time, not kept: the table's memory stays small (at most
/// `2 × SETS` names of this many bytes) whatever names a peer sends.
const KEPT_LEN: usize = 64;

thread_local! {
    static MADE: RefCell<[[Option<HeaderName>; 2]; SETS]> =
        const { RefCell::new([const { [None, None] }; SETS]) };
}

/// The field name `bytes`, as `HeaderName::from_bytes` makes it.
pub fn name(bytes: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    Ok(match bytes {
        // As hyper writes them, and a request's Host also as most HTTP/1.1 clients write it
        // (curl, Go's client, browsers, wrk); other spellings (Go's server writes `Content-Type`,
        // `Date`) are kept as any other name.
        b"host" | b"Host" => header::HOST,
        b"content-type" => header::CONTENT_TYPE,
        b"content-length" => header::CONTENT_LENGTH,
        b"date" => header::DATE,
        b"server" => header::SERVER,
        b"connection" => header::CONNECTION,
        b"user-agent" => header::USER_AGENT,
        b"accept" => header::ACCEPT,
        b"accept-encoding" => header::ACCEPT_ENCODING,
        b"cache-control" => header::CACHE_CONTROL,
        b"content-encoding" => header::CONTENT_ENCODING,
        b"transfer-encoding" => header::TRANSFER_ENCODING,
        b"te" => header::TE,
        b"etag" => header::ETAG,
        b"vary" => header::VARY,
        b"set-cookie" => header::SET_COOKIE,
        b"cookie" => header::COOKIE,
        b"authorization" => header::AUTHORIZATION,
        _ => return kept(bytes),
    })
}

/// `bytes` from the thread's table, made and kept there if it is not (a name the table holds is
/// valid, and `bytes` equal to it but for the case of letters makes the same name). A name made
/// goes first in its set, the other used last second: two names a peer sends on every message
/// that share a set both stay.
fn kept(bytes: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if bytes.is_empty() || bytes.len() > KEPT_LEN {
        return HeaderName::from_bytes(bytes);
    }
    MADE.with_borrow_mut(|made| {
        let set = &mut made[set_of(bytes)];
        let holds = |kept: &Option<HeaderName>| {
            kept.as_ref()
                .is_some_and(|name| name.as_str().as_bytes().eq_ignore_ascii_case(bytes))
        };
        if !holds(&set[0]) {
            if !holds(&set[1]) {
                set[1] = Some(HeaderName::from_bytes(bytes)?);
            }
            set.swap(0, 1);
        }
        Ok(set[0].clone().expect("the name was found or made"))
    })
}

/// The set of a name (of 1 to [`KEPT_LEN`] bytes): its length and its first and last four bytes
/// (overlapping in a short name), lower-cased as ASCII letters are (`| 0x20` on each byte, so
/// that a name's spellings share a set), mixed by a multiplication (Fibonacci hashing). Cheaper
/// than a hash of every byte; names that differ only in their middle share a set of two.
fn set_of(bytes: &[u8]) -> usize {
    let len = bytes.len();
    let word = |from: usize| {
        let mut four = [0u8; 4];
        let end = (from + 4).min(len);
        four[..end - from].copy_from_slice(&bytes[from..end]);
        u32::from_le_bytes(four) | 0x2020_2020
    };
    let (first, last) = (word(0), word(len.saturating_sub(4)));
    let mixed = (first ^ last.rotate_left(16) ^ len as u32).wrapping_mul(0x9e37_79b9);
    (mixed >> (32 - SETS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name is the one `http` makes of it, in any case, whether matched, kept or made.
    #[test]
    fn names_are_the_ones_http_makes() {
        for name in [
            "host",
            "Host",
            "HOST",
            "content-type",
            "Content-Type",
            "Content-Length",
            "date",
            "Date",
            "server",
            "connection",
            "user-agent",
            "accept",
            "accept-encoding",
            "cache-control",
            "content-encoding",
            "transfer-encoding",
            "te",
            "TE",
            "etag",
            "vary",
            "set-cookie",
            "cookie",
            "authorization",
            "x",
            "x-custom",
            "X-Custom",
            "x-custom",
            "Referer",
            "Sec-Fetch-Site",
            "Sec-Fetch-Mode",
            &"x".repeat(KEPT_LEN),
            &"x".repeat(KEPT_LEN + 1),
        ] {
            for _ in 0..2 {
                let ours = super::name(name.as_bytes()).unwrap();
                assert_eq!(
                    ours,
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    "{name}"
                );
                assert_eq!(ours.as_str(), name.to_ascii_lowercase(), "{name}");
            }
        }
        for bad in [&b"bad name"[..], b"", b"x-bad\xff", b"x:y"] {
            assert!(super::name(bad).is_err(), "{bad:?}");
            // Not kept either: asked again, refused again.
            assert!(super::name(bad).is_err(), "{bad:?}");
        }
    }

    /// A name met again is the one made the first time (its bytes shared, no new allocation),
    /// in another spelling too, also beside another name of its set; two more push it out.
    #[test]
    fn a_name_is_made_once_per_thread() {
        let first = name(b"x-request-id").unwrap();
        let same = |again: &HeaderName| again.as_str().as_ptr() == first.as_str().as_ptr();
        for again in [&b"x-request-id"[..], b"X-Request-Id"] {
            let again = name(again).unwrap();
            assert_eq!(again, first);
            assert!(same(&again));
        }
        let rivals: Vec<String> = (0..100_000u32)
            .map(|n| format!("{}-rival-{n}", char::from(b'a' + (n % 26) as u8)))
            .filter(|n| set_of(n.as_bytes()) == set_of(b"x-request-id"))
            .take(2)
            .collect();
        assert_eq!(rivals.len(), 2, "two names of that set");
        // Two names used in turn, one set: both stay.
        let rival = |i: usize| name(rivals[i].as_bytes()).unwrap();
        let kept_rival = rival(0);
        let same_rival =
            |again: &HeaderName| again.as_str().as_ptr() == kept_rival.as_str().as_ptr();
        for _ in 0..3 {
            assert!(same_rival(&rival(0)));
            assert!(same(&name(b"x-request-id").unwrap()));
        }
        // A third name: the one of the two used longest ago goes, not the one used last.
        assert_eq!(rival(1).as_str(), rivals[1]);
        assert!(same(&name(b"x-request-id").unwrap()));
        let made_again = rival(0);
        assert_eq!(made_again.as_str(), rivals[0]);
        assert!(!same_rival(&made_again));
        // A name too long to keep is made each time.
        let long = "x".repeat(KEPT_LEN + 1);
        let (a, b) = (
            name(long.as_bytes()).unwrap(),
            name(long.as_bytes()).unwrap(),
        );
        assert_ne!(a.as_str().as_ptr(), b.as_str().as_ptr());
    }
}
