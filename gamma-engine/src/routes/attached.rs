//! State the data plane attaches to a compiled item: a rule's metric series, an endpoint's load.
//!
//! The engine only carries it, so that a request reaches its counters through the table it was
//! routed with, with no lock and no lookup by name; what the state is, and where it comes from,
//! is the agent's business. It never takes part in comparisons or `Debug` (and fields holding it skip serialization): two
//! tables that route alike are equal whatever their attachments.

use once_cell::race::OnceBox;
use std::any::Any;
use std::sync::Arc;

/// One slot, filled on first use and then read without a lock. One word: a table has one per
/// rule and one per endpoint, most never filled; the state is one more pointer away.
#[derive(Default)]
pub struct Attached(OnceBox<Arc<dyn Any + Send + Sync>>);

impl Attached {
    /// The state in this slot, made by `make` the first time. Threads that find the slot empty
    /// at once may each call `make`: one result is kept and returned to all, the others are
    /// dropped unused. A slot holds one type: asking for another is a bug in the caller (it
    /// panics).
    pub fn get_or_init<T: Any + Send + Sync>(&self, make: impl FnOnce() -> Arc<T>) -> &T {
        self.0
            .get_or_init(|| Box::new(make() as Arc<dyn Any + Send + Sync>))
            .downcast_ref()
            .expect("an attachment slot holds one type")
    }

    /// As [`Self::get_or_init`], shared: for state that must outlive the table's borrow.
    pub fn shared<T: Any + Send + Sync>(&self, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        self.get_or_init(make);
        let any = self.0.get().expect("filled above").clone();
        any.downcast().expect("an attachment slot holds one type")
    }

    /// The state, if the slot was filled with a `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0.get()?.downcast_ref()
    }

    /// The state, shared, if the slot was filled with a `T`.
    pub fn get_shared<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.get()?.clone().downcast().ok()
    }
}

impl PartialEq for Attached {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attached")
    }
}

/// One slot per item of a list (a backend's endpoints), in the list's order.
pub fn slots(n: usize) -> Arc<[Attached]> {
    (0..n).map(|_| Attached::default()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_once_and_neutral_in_comparisons() {
        let slot = Attached::default();
        assert!(slot.get::<u32>().is_none());
        assert_eq!(*slot.get_or_init(|| Arc::new(7u32)), 7);
        assert_eq!(*slot.get_or_init(|| Arc::new(8u32)), 7, "made once");
        assert!(slot.get::<u64>().is_none(), "another type is not there");
        assert_eq!(slot, Attached::default());
    }
}
