//! gamma-node's patch (see PATCH.md): a connection holds its frame buffers only while it uses
//! them. It takes its write buffer when it buffers a frame and gives it back once everything
//! buffered is written; its read buffer when it reads and the HPACK decoder's when it decodes a
//! Huffman-coded string, and gives them back when no stream is open (and the read buffer holds no
//! part of a frame). An idle connection holds none of them (unpatched, 16, 8 and 4 KiB for the
//! connection's life). Each thread keeps a few given back for the next connection that needs
//! one, so that a busy thread allocates none per request.

use bytes::BytesMut;
use std::cell::RefCell;
use std::thread::LocalKey;

/// Buffers kept per thread, of each kind: a thread's connections mostly hold one at a time (a
/// flush or a read mostly completes at once); more are held while sockets are full or frames
/// arrive in pieces.
const KEPT: usize = 8;

/// The buffers of one size that a thread keeps.
pub(crate) struct Spare {
    kept: &'static LocalKey<RefCell<Vec<BytesMut>>>,
    size: usize,
}

thread_local! {
    static WRITE_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static READ_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static HUFFMAN_BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// The minimum MAX_FRAME_SIZE is 16 KiB: room for a HEADERS frame that big (h2's own size).
pub(crate) const WRITE: Spare = Spare {
    kept: &WRITE_BUFFERS,
    size: 16 * 1024,
};

/// The HPACK decoder's, for Huffman-coded strings (h2's own size).
pub(crate) const HUFFMAN: Spare = Spare {
    kept: &HUFFMAN_BUFFERS,
    size: 4 * 1024,
};

/// tokio-util's `FramedRead` starts with 8 KiB.
pub(crate) const READ: Spare = Spare {
    kept: &READ_BUFFERS,
    size: 8 * 1024,
};

impl Spare {
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer of `size` bytes, kept or new.
    pub(crate) fn take(&self) -> BytesMut {
        self.kept
            .try_with(|kept| kept.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| BytesMut::with_capacity(self.size))
    }

    /// Takes `buf`, emptied, from its holder: kept for the next taker if it is of the kept size
    /// and no bytes of it live elsewhere, freed if it grew (for a large frame). One whose bytes
    /// still live elsewhere (a DATA frame's payload on its way to the reader, a header value)
    /// stays with its holder, as unpatched h2 would keep it, and is given back the next time:
    /// freed now, the next read would allocate another.
    pub(crate) fn give_back(&self, buf: &mut BytesMut) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        if buf.try_reclaim(self.size + 1) {
            *buf = BytesMut::new();
        } else if buf.try_reclaim(self.size) {
            let buf = std::mem::take(buf);
            let _ = self.kept.try_with(|kept| {
                let mut kept = kept.borrow_mut();
                if kept.len() < KEPT {
                    kept.push(buf);
                }
            });
        }
    }
}
