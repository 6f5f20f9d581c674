//! Emptied header maps kept per thread (a data-plane worker) for the next message head: a
//! request's map becomes an answer's and the other way round, so a kept-alive request allocates
//! none, and a new connection none either once the worker has served a few.
//!
//! A map is given back only where its message is done with (the own HTTP/1.1 server after
//! writing an answer, forwarding after its exchange); one dropped elsewhere is simply freed.

use http::HeaderMap;
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
}
