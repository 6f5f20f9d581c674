//! Where log lines go: handed to a thread of their own that writes them to stderr, so that no
//! data-plane worker ever waits on a write. stderr is a pipe to the container runtime; when it
//! stops reading (a slow shim, a full disk), a worker writing the access log there would stall
//! every request it serves. Past [`QUEUED_LINES`] waiting, lines are dropped and counted.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines waiting for the writer thread, at most.
const QUEUED_LINES: usize = 8192;

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

/// A `tracing_subscriber` writer: each event is formatted into a buffer of its own, queued
/// whole when the event is done.
#[derive(Clone)]
pub struct LogWriter {
    lines: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued and not yet written.
    pending: Arc<AtomicU64>,
}

impl LogWriter {
    /// Starts the thread that writes queued lines to `out`.
    pub fn spawn(mut out: impl Write + Send + 'static, format: Format) -> std::io::Result<Self> {
        let (lines, queued) = sync_channel::<Vec<u8>>(QUEUED_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        let (reported, written) = (dropped.clone(), pending.clone());
        std::thread::Builder::new()
            .name("log".into())
            .spawn(move || {
                let mut told = 0;
                for line in queued {
                    let lost = reported.load(Ordering::Relaxed);
                    if lost != told {
                        let _ = out.write_all(dropped_note(format, lost - told).as_bytes());
                        told = lost;
                    }
                    let _ = out.write_all(&line);
                    written.fetch_sub(1, Ordering::Relaxed);
                }
            })?;
        Ok(LogWriter {
            lines,
            dropped,
            pending,
        })
    }

    /// Waits (at most `limit`) for the queued lines to be written: the last words of an agent
    /// that is about to exit.
    pub fn drain(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One event's line, queued when dropped.
pub struct Line {
    buffer: Vec<u8>,
    to: LogWriter,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buffer);
        self.to.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.to.lines.try_send(line) {
            self.to.pending.fetch_sub(1, Ordering::Relaxed);
            if let TrySendError::Full(_) = e {
                self.to.dropped.fetch_add(1, Ordering::Relaxed);
                LINES_DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buffer: Vec::with_capacity(256),
            to: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer that blocks until told to go on, as a pipe nobody reads.
    struct Stalled(Arc<Mutex<()>>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _go = self.0.lock().unwrap();
            self.1.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_instead_of_blocking_the_writer() {
        let gate = Arc::new(Mutex::new(()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let held = gate.lock().unwrap();
        let writer =
            LogWriter::spawn(Stalled(gate.clone(), written.clone()), Format::Json).unwrap();
        let started = std::time::Instant::now();
        for i in 0..QUEUED_LINES + 100 {
            let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
            writeln!(line, "line {i}").unwrap();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "blocked"
        );
        assert!(writer.dropped() >= 99, "dropped {}", writer.dropped());
        drop(held);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !String::from_utf8_lossy(&written.lock().unwrap()).contains("line 0\n") {
            assert!(std::time::Instant::now() < deadline, "nothing written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Written before the next line once the output takes lines again: in the log's form.
        writeln!(
            tracing_subscriber::fmt::MakeWriter::make_writer(&writer),
            "after"
        )
        .unwrap();
        while !String::from_utf8_lossy(&written.lock().unwrap()).contains("after\n") {
            assert!(std::time::Instant::now() < deadline, "nothing written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let text = String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
        let note = text
            .lines()
            .find(|l| l.contains("log lines dropped"))
            .expect("the note of lines dropped");
        let note: serde_json::Value = serde_json::from_str(note).expect("a JSON line");
        assert_eq!(note["level"], "WARN");
        assert_eq!(note["fields"]["dropped"], writer.dropped());
        assert!(LINES_DROPPED.load(Ordering::Relaxed) >= writer.dropped());
    }
}
