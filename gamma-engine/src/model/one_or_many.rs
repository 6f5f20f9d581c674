//! A list that is nearly always one item.

use serde::Serialize;
use std::ops::Deref;

/// A list that is nearly always one item (a rule's matches, its backendRefs): that item inline,
/// or none or several in one block. When the item has a niche to spare (an enum tag, an inline
/// string), the list is no larger than the item; a `SmallVec` would add a word for its length.
#[derive(Clone, Debug, PartialEq)]
pub enum OneOrMany<T> {
    One(T),
    Many(Box<[T]>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Box::default())
    }
}

impl<T> Deref for OneOrMany<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            OneOrMany::One(item) => std::slice::from_ref(item),
            OneOrMany::Many(items) => items,
        }
    }
}

impl<T> FromIterator<T> for OneOrMany<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut items: Vec<T> = items.into_iter().collect();
        match items.len() {
            1 => OneOrMany::One(items.pop().expect("one item")),
            _ => OneOrMany::Many(items.into_boxed_slice()),
        }
    }
}

impl<T: Serialize> Serialize for OneOrMany<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_item_is_inline_and_any_other_count_is_a_slice() {
        let one: OneOrMany<u8> = [7].into_iter().collect();
        assert!(matches!(one, OneOrMany::One(7)));
        assert_eq!(&one[..], [7]);
        let none: OneOrMany<u8> = std::iter::empty().collect();
        assert!(none.is_empty());
        assert_eq!(none, OneOrMany::default());
        let three: OneOrMany<u8> = [1, 2, 3].into_iter().collect();
        assert_eq!(&three[..], [1, 2, 3]);
        assert_eq!(serde_json::to_string(&three).unwrap(), "[1,2,3]");
    }
}
