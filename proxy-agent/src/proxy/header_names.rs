//! Field names read off the wire (the agent's own HTTP/1.1 server and backend exchange), made
//! into `HeaderName`s without `HeaderName::from_bytes` where it can: that lower-cases each name
//! into a buffer and checks every byte, and copies a name it does not know into an allocation of
//! its own, on every message. The usual names are matched as they are usually written; any other
//! valid one is kept per thread (a data-plane worker) once made, so that the names a mesh's
//! requests and answers carry over and over (`traceparent`, `x-request-id`, a backend's own) are
//! made once per worker, not once per message.

use http::header::{self, HeaderName, InvalidHeaderName};
use std::cell::RefCell;

/// Slots of the per-thread table of names made; a slot holds the last name that hashed to it.
const SLOTS: usize = 128;

/// Longer names are made each time, not kept: the table's memory stays small (at most
/// `SLOTS` × this many bytes) whatever names a peer sends.
const KEPT_LEN: usize = 64;

thread_local! {
    static MADE: RefCell<[Option<HeaderName>; SLOTS]> =
        const { RefCell::new([const { None }; SLOTS]) };
}

/// The field name `bytes`, as `HeaderName::from_bytes` makes it.
pub fn name(bytes: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    Ok(match bytes {
        // As hyper, Go's server and HTTP/2 peers write them; a request's Host also as HTTP/1.1
        // clients write it (curl, Go's client, browsers, wrk). Others, in any spelling, are kept.
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

/// `bytes` from the thread's table, made and kept there if it is not (a name a table slot holds
/// is valid, and `bytes` equal to it but for the case of letters makes the same name).
fn kept(bytes: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if bytes.is_empty() || bytes.len() > KEPT_LEN {
        return HeaderName::from_bytes(bytes);
    }
    let slot = slot_of(bytes);
    MADE.with_borrow_mut(|made| {
        if let Some(name) = &made[slot] {
            if name.as_str().as_bytes().eq_ignore_ascii_case(bytes) {
                return Ok(name.clone());
            }
        }
        let name = HeaderName::from_bytes(bytes)?;
        made[slot] = Some(name.clone());
        Ok(name)
    })
}

/// The slot of a name (not empty, at most [`KEPT_LEN`] bytes): from its length and three of its
/// bytes, lower-cased as ASCII letters are (so that its spellings share a slot); cheaper than a
/// hash of every byte, and names of one length seldom share all three.
fn slot_of(bytes: &[u8]) -> usize {
    let at = |i: usize| usize::from(bytes[i].to_ascii_lowercase());
    let len = bytes.len();
    (len ^ (at(0) << 1) ^ (at(len / 2) << 3) ^ (at(len - 1) << 5)) % SLOTS
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
            "Content-Length",
            "date",
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
            "x-custom",
            "X-Custom",
            "x-custom",
            "Referer",
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
    /// in another spelling too; a name that shares its slot replaces it, and is right.
    #[test]
    fn a_name_is_made_once_per_thread() {
        let first = name(b"x-request-id").unwrap();
        for again in [&b"x-request-id"[..], b"X-Request-Id"] {
            let again = name(again).unwrap();
            assert_eq!(again, first);
            assert_eq!(again.as_str().as_ptr(), first.as_str().as_ptr());
        }
        // Another name in the same slot.
        let rival = (0..100_000u32)
            .map(|n| format!("{}-rival-{n}", char::from(b'a' + (n % 26) as u8)))
            .find(|n| slot_of(n.as_bytes()) == slot_of(b"x-request-id"))
            .expect("a name in that slot");
        assert_eq!(name(rival.as_bytes()).unwrap().as_str(), rival);
        let made_again = name(b"x-request-id").unwrap();
        assert_eq!(made_again, first);
        assert_ne!(made_again.as_str().as_ptr(), first.as_str().as_ptr());
        // A name too long to keep is made each time.
        let long = "x".repeat(KEPT_LEN + 1);
        let (a, b) = (
            name(long.as_bytes()).unwrap(),
            name(long.as_bytes()).unwrap(),
        );
        assert_ne!(a.as_str().as_ptr(), b.as_str().as_ptr());
    }
}
