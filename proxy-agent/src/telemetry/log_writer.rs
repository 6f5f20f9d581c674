//! Where log lines go: appended to a queue that a thread of its own writes to stderr in batches,
//! so that no data-plane worker ever waits on a write, or makes a system call per line. stderr
//! is a pipe to the container runtime; when it stops reading (a slow shim, a full disk), a worker
//! writing the access log there would stall every request it serves. Past [`QUEUED_BYTES`]
//! waiting, lines are dropped and counted.
//!
//! The writer wakes for a line only when it sleeps with nothing queued; after writing it waits
//! [`BATCH_WINDOW`] for more, so that at load lines are written some hundred per `write`, and the
//! workers that log them never wake it (a line per request, each waking the writer, doubled the
//! CPU the agent spent per request: a futex wake, a context switch and a `write` each).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Bytes of lines waiting for the writer, at most (some 10,000 access log lines).
const QUEUED_BYTES: usize = 4 << 20;

/// How long the writer gathers lines after a write before it writes again: a line's delay at
/// most, beyond the write itself.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Lines dropped in this process (`gamma_log_lines_dropped_total`).
pub static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// How lines are written: the note of lines dropped is written in the same form, so that a JSON
/// log stays one JSON object per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// The line telling that `lost` lines were dropped.
fn dropped_note(format: Format, lost: u64) -> String {
    let message = format!("{lost} log lines dropped: the log's reader did not keep up");
    match format {
        Format::Text => format!("{message}\n"),
        Format::Json => format!(
            "{}\n",
            serde_json::json!({
                "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                "level": "WARN",
                "fields": {"message": message, "dropped": lost},
                "target": module_path!(),
            })
        ),
    }
}

/// Lines appended and not yet taken by the writer.
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// The writer sleeps until woken: the next line appended wakes it.
    writer_asleep: bool,
    /// The writer holds a batch it has not written yet.
    writing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    writer: std::thread::Thread,
    dropped: AtomicU64,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves whole lines behind (see `Line`): go on.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The handle lines are appended through (and a `tracing_subscriber` writer).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
    format: Format,
}

impl LogWriter {
    /// Starts the thread that writes queued lines to `out`.
    pub fn spawn(out: impl Write + Send + 'static, format: Format) -> std::io::Result<Self> {
        let (handle, shared) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
        let thread = std::thread::Builder::new()
            .name("log".into())
            .spawn(move || {
                if let Ok(shared) = shared.recv() {
                    write_batches(&shared, out, format);
                }
            })?;
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            writer: thread.thread().clone(),
            dropped: AtomicU64::new(0),
        });
        handle
            .send(shared.clone())
            .map_err(|_| std::io::Error::other("the log thread ended at its start"))?;
        Ok(LogWriter { shared, format })
    }

    /// Has a panic's message written between batches, not inside one: the standard library's
    /// report goes to stderr without its lock, and a batch larger than a pipe's buffer is
    /// written in parts, between which another writer's bytes get in (a JSON line cut in two).
    pub fn hold_panics_to_whole_lines() {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Reentrant: a panic in the log thread, mid-batch, reports too.
            let _between_batches = std::io::stderr().lock();
            report(info);
        }));
    }

    /// The form lines are written in.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Appends one whole `line` (ending with `\n`).
    pub fn append(&self, line: &[u8]) {
        let _ = Line::new(self).write_all(line);
    }

    /// Waits (at most `limit`) for the queued lines to be written: the last words of an agent
    /// that is about to exit.
    pub fn drain(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        // Now rather than at the end of its window.
        self.shared.writer.unpark();
        while std::time::Instant::now() < deadline {
            let queue = self.shared.queue();
            if queue.bytes.is_empty() && !queue.writing {
                return;
            }
            drop(queue);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: takes what is queued, writes it in one go, gathers for [`BATCH_WINDOW`],
/// and sleeps until woken once nothing came.
fn write_batches(shared: &Shared, mut out: impl Write, format: Format) {
    let mut batch = Vec::new();
    let mut told = 0;
    loop {
        {
            let mut queue = shared.queue();
            if queue.bytes.is_empty() {
                queue.writer_asleep = true;
                drop(queue);
                std::thread::park();
                continue;
            }
            // The queue keeps the emptied batch's room for the next lines.
            std::mem::swap(&mut queue.bytes, &mut batch);
            queue.writing = true;
        }
        let lost = shared.dropped.load(Ordering::Relaxed);
        if lost != told {
            let _ = out.write_all(dropped_note(format, lost - told).as_bytes());
            told = lost;
        }
        let _ = out.write_all(&batch);
        let _ = out.flush();
        batch.clear();
        // A burst's room is not kept for the quiet that follows.
        batch.shrink_to(64 << 10);
        shared.queue().writing = false;
        std::thread::park_timeout(BATCH_WINDOW);
    }
}

/// One line being appended: the queue is locked from its first byte to its end, so that lines
/// never interleave (`tracing`'s formatter writes an event's line in one `write_all`, but need
/// not), and the line is dropped whole when it does not fit.
pub struct Line<'w> {
    to: &'w LogWriter,
    queue: Option<MutexGuard<'w, Queue>>,
    /// Where this line begins in the queue.
    start: usize,
    /// The line did not fit: it is dropped.
    dropped: bool,
}

impl<'w> Line<'w> {
    fn new(to: &'w LogWriter) -> Self {
        Line {
            to,
            queue: None,
            start: 0,
            dropped: false,
        }
    }

    /// The queue, locked at the line's first byte.
    fn queue(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(|| {
            let queue = self.to.shared.queue();
            self.start = queue.bytes.len();
            queue
        })
    }
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.dropped {
            return Ok(bytes.len());
        }
        let queue = &mut self.queue().bytes;
        // Checked before the queue grows: its room stays within the bound.
        if queue.len() + bytes.len() > QUEUED_BYTES {
            let start = self.start;
            self.queue().bytes.truncate(start);
            self.dropped = true;
        } else {
            let needed = queue.len() + bytes.len();
            if needed > queue.capacity() {
                // Doubling, but not past the bound.
                let room = (queue.capacity() * 2).clamp(needed, QUEUED_BYTES);
                queue.reserve_exact(room - queue.len());
            }
            queue.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let Some(mut queue) = self.queue.take() else {
            return;
        };
        if self.dropped {
            drop(queue);
            self.to.shared.dropped.fetch_add(1, Ordering::Relaxed);
            LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let wake = std::mem::take(&mut queue.writer_asleep);
        drop(queue);
        if wake {
            self.to.shared.writer.unpark();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line::new(self)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::SharedOut;
    use super::*;

    /// A writer that blocks until told to go on, as a pipe nobody reads; it says when it is
    /// first entered.
    struct Stalled(Arc<Mutex<()>>, Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>);

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.2.fetch_add(1, Ordering::SeqCst);
            let _go = self.0.lock().unwrap();
            self.1.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn written(text: &Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&text.lock().unwrap()).into_owned()
    }

    fn wait_for(text: &Mutex<Vec<u8>>, wanted: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !written(text).contains(wanted) {
            assert!(
                std::time::Instant::now() < deadline,
                "{wanted:?} not written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_blocking_the_writer() {
        let gate = Arc::new(Mutex::new(()));
        let text = Arc::new(Mutex::new(Vec::new()));
        let held = gate.lock().unwrap();
        let entered = Arc::new(AtomicU64::new(0));
        let stalled = Stalled(gate.clone(), text.clone(), entered.clone());
        let writer = LogWriter::spawn(stalled, Format::Json).unwrap();
        let started = std::time::Instant::now();
        // The first line is taken by the writer, which then blocks on the stalled output.
        writeln!(
            tracing_subscriber::fmt::MakeWriter::make_writer(&writer),
            "line 0"
        )
        .unwrap();
        while entered.load(Ordering::SeqCst) == 0 {
            assert!(started.elapsed() < Duration::from_secs(2), "not written");
            std::thread::sleep(Duration::from_millis(1));
        }
        let filler = "x".repeat(999);
        let lines = QUEUED_BYTES / 1000 + 100;
        for _ in 0..lines {
            writer.append(format!("{filler}\n").as_bytes());
        }
        assert!(started.elapsed() < Duration::from_secs(2), "blocked");
        assert!(writer.dropped() >= 99, "dropped {}", writer.dropped());
        let room = writer.shared.queue().bytes.capacity();
        assert!(room <= QUEUED_BYTES, "the queue took {room} bytes");
        drop(held);
        wait_for(&text, "line 0\n");
        // Written before the next line once the output takes lines again: in the log's form.
        writer.append(b"after\n");
        wait_for(&text, "after\n");
        let text = written(&text);
        let note = text
            .lines()
            .find(|l| l.contains("log lines dropped"))
            .expect("the note of lines dropped");
        let note: serde_json::Value = serde_json::from_str(note).expect("a JSON line");
        assert_eq!(note["level"], "WARN");
        assert_eq!(note["fields"]["dropped"], writer.dropped());
        assert!(LINES_DROPPED.load(Ordering::Relaxed) >= writer.dropped());
        // Every line that was kept is whole.
        let kept = text.lines().filter(|l| l.starts_with('x')).count() as u64;
        assert!(text.lines().all(|l| !l.starts_with('x') || l == filler));
        assert_eq!(kept + writer.dropped(), lines as u64);
    }

    #[test]
    fn lines_from_many_threads_are_written_whole_and_in_each_threads_order() {
        let text = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter::spawn(SharedOut(text.clone()), Format::Text).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        // Written in pieces: a line is still whole.
                        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
                        write!(line, "thread {t} ").unwrap();
                        writeln!(line, "line {i}").unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        writer.drain(Duration::from_secs(5));
        let text = written(&text);
        let mut next = [0; 4];
        for line in text.lines() {
            let (t, i) = line
                .strip_prefix("thread ")
                .and_then(|rest| rest.split_once(" line "))
                .unwrap_or_else(|| panic!("a broken line: {line:?}"));
            let t: usize = t.parse().unwrap();
            assert_eq!(
                i.parse::<usize>().unwrap(),
                next[t],
                "thread {t} out of order"
            );
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4], "every line written once drained");
    }

    #[test]
    fn a_line_after_a_quiet_spell_wakes_the_writer() {
        let text = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter::spawn(SharedOut(text.clone()), Format::Text).unwrap();
        for i in 0..3 {
            // Longer than the batch window: the writer has gone to sleep each time.
            std::thread::sleep(BATCH_WINDOW * 3);
            let wanted = format!("quiet {i}\n");
            writer.append(wanted.as_bytes());
            wait_for(&text, &wanted);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A writer into a buffer the test reads.
    #[derive(Clone, Default)]
    pub struct SharedOut(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
