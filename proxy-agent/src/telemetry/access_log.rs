//! The access log: one line per request, in the form `tracing_subscriber`'s formatter gives an
//! event of target `access` (text or JSON, `--log-format`), but formatted here, straight into
//! the log's queue. `tracing`'s JSON formatter builds a map of its fields and checks each
//! piece it writes as UTF-8 again: 39,000 instructions per line, more than the request
//! it tells of (23,000). Whether lines are written is still `tracing`'s filter's to say
//! (`RUST_LOG`, e.g. `info,access=off`).

use super::log_writer::{Format, LogWriter};
use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The target access lines are filtered and shown by.
pub const TARGET: &str = "access";

static SINK: OnceLock<LogWriter> = OnceLock::new();

/// Where access lines go from now on (the agent's log writer); without it, nowhere.
pub fn install(writer: LogWriter) {
    let _ = SINK.set(writer);
}

/// Whether a request's line would be written.
pub fn enabled() -> bool {
    SINK.get().is_some() && tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// A field's value, written as `tracing` writes the same value recorded.
pub enum Value<'a> {
    /// A string (`field = value`): quoted in text.
    Str(&'a str),
    /// A string shown (`field = %value`): as it is in text.
    Shown(&'a str),
    /// An address shown.
    Ip(IpAddr),
    Endpoint(SocketAddr),
    Number(u64),
}

/// Writes a line of `fields` now, if a sink is installed.
pub fn write(fields: &[(&str, Value<'_>)]) {
    let Some(sink) = SINK.get() else {
        return;
    };
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    LINE.with_borrow_mut(|line| {
        line.clear();
        format_line(line, sink.format(), SystemTime::now(), fields);
        // Formatted before the queue is locked: the other workers wait only for a copy.
        sink.append(line);
    });
}

/// One line: `{timestamp}  INFO access: field=value …` or tracing's JSON object.
pub fn format_line(out: &mut Vec<u8>, format: Format, at: SystemTime, fields: &[(&str, Value)]) {
    match format {
        Format::Text => {
            rfc3339_micros(out, at);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(TARGET.as_bytes());
            out.push(b':');
            for (name, value) in fields {
                out.push(b' ');
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                match value {
                    Value::Str(s) => text_quoted(out, s),
                    Value::Shown(s) => out.extend_from_slice(s.as_bytes()),
                    Value::Ip(ip) => address(out, *ip, None),
                    Value::Endpoint(e) => address(out, e.ip(), Some(*e)),
                    Value::Number(n) => number(out, *n),
                }
            }
        }
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            rfc3339_micros(out, at);
            out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{");
            for (i, (name, value)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Field names are the agent's own: nothing to escape.
                out.push(b'"');
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                match value {
                    Value::Str(s) | Value::Shown(s) => json_string(out, s),
                    // An address's text has nothing JSON escapes.
                    Value::Ip(ip) => {
                        out.push(b'"');
                        address(out, *ip, None);
                        out.push(b'"');
                    }
                    Value::Endpoint(e) => {
                        out.push(b'"');
                        address(out, e.ip(), Some(*e));
                        out.push(b'"');
                    }
                    Value::Number(n) => number(out, *n),
                }
            }
            out.extend_from_slice(b"},\"target\":\"");
            out.extend_from_slice(TARGET.as_bytes());
            out.extend_from_slice(b"\"}");
        }
    }
    out.push(b'\n');
}

/// `ip`, or `endpoint` (of that IP), as it displays: IPv4's digits without `fmt`'s machinery.
fn address(out: &mut Vec<u8>, ip: IpAddr, endpoint: Option<SocketAddr>) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, octet.into());
            }
            if let Some(endpoint) = endpoint {
                out.push(b':');
                number(out, endpoint.port().into());
            }
        }
        IpAddr::V6(_) => {
            let _ = match endpoint {
                Some(endpoint) => write!(out, "{endpoint}"),
                None => write!(out, "{ip}"),
            };
        }
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Whether any byte of `s` is `special`: looked at whole rather than up to the first one
/// found, which the compiler turns into a check of many bytes at a time.
fn any_byte(s: &str, special: impl Fn(u8) -> bool) -> bool {
    s.bytes().fold(false, |found, b| found | special(b))
}

/// As `{:?}` quotes a string: most are printable ASCII with nothing to escape.
fn text_quoted(out: &mut Vec<u8>, s: &str) {
    if !any_byte(s, |b| {
        !(b' '..=b'~').contains(&b) | (b == b'"') | (b == b'\\')
    }) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A byte JSON escapes in a string.
fn json_escaped(b: u8) -> bool {
    (b < b' ') | (b == b'"') | (b == b'\\')
}

/// As serde_json writes a string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    if any_byte(s, json_escaped) {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// `2026-12-07T12:29:27.838415Z`, as tracing's default timer writes it; the text up to the
/// second is kept per thread for the lines of the same second.
fn rfc3339_micros(out: &mut Vec<u8>, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != seconds {
        text = up_to_the_second(seconds);
        SECOND.set((seconds, text));
    }
    out.extend_from_slice(&text);
    digits(out, since.subsec_micros().into(), 6);
    out.push(b'Z');
}

/// `2026-12-07T12:29:27.`
fn up_to_the_second(seconds: u64) -> [u8; 20] {
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let of_day = seconds % 86_400;
    let fields = [
        (year as u64, 4, b'-'),
        (month.into(), 2, b'-'),
        (day.into(), 2, b'T'),
        (of_day / 3600, 2, b':'),
        (of_day / 60 % 60, 2, b':'),
        (of_day % 60, 2, b'.'),
    ];
    let mut text = Vec::with_capacity(20);
    for (value, width, then) in fields {
        digits(&mut text, value, width);
        text.push(then);
    }
    text.try_into().unwrap_or([b'?'; 20])
}

/// `value`'s last `width` (at most 6) decimal digits.
fn digits(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = [b'0'; 6];
    let mut rest = value;
    for digit in digits[..width].iter_mut().rev() {
        *digit += (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// The proleptic Gregorian date of a day since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u8;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::super::log_writer::testing::SharedOut;
    use super::*;
    use std::fmt::Display;
    use std::time::Duration;

    struct FixedTime(&'static str);

    impl tracing_subscriber::fmt::time::FormatTime for FixedTime {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            w.write_str(self.0)
        }
    }

    /// A value as tracing was given it (`%value`).
    #[derive(Clone, Copy)]
    enum Shown<'a> {
        Text(&'a str),
        Ip(IpAddr),
        Endpoint(SocketAddr),
    }

    impl Display for Shown<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Shown::Text(s) => s.fmt(f),
                Shown::Ip(ip) => ip.fmt(f),
                Shown::Endpoint(e) => e.fmt(f),
            }
        }
    }

    impl<'a> From<Shown<'a>> for Value<'a> {
        fn from(shown: Shown<'a>) -> Value<'a> {
            match shown {
                Shown::Text(s) => Value::Shown(s),
                Shown::Ip(ip) => Value::Ip(ip),
                Shown::Endpoint(e) => Value::Endpoint(e),
            }
        }
    }

    struct Request<'a> {
        namespace: &'a str,
        pod: Shown<'a>,
        method: &'a str,
        path: &'a str,
        route: &'a str,
        endpoint: Shown<'a>,
        status: u16,
        reason: &'a str,
    }

    /// The line as the agent logged it through `tracing` before (the same fields and macro).
    fn through_tracing(format: Format, at: &'static str, r: &Request) -> String {
        // What tracing's formatter writes, to compare with.
        let captured = SharedOut::default();
        let make = {
            let captured = captured.clone();
            move || captured.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(make)
            .with_ansi(false)
            .with_timer(FixedTime(at));
        let emit = || {
            tracing::info!(
                target: "access",
                caller_namespace = r.namespace,
                caller_pod = %r.pod,
                caller_identity = "pod-ip",
                method = %r.method,
                path = r.path,
                service = "ns/web:80",
                route = r.route,
                backend = "ns/web-v2:8080",
                endpoint = %r.endpoint,
                status = r.status,
                attempts = 2u32,
                duration_us = 1234u64,
                upstream_us = 999u64,
                reason = r.reason,
            );
        };
        match format {
            Format::Text => tracing::subscriber::with_default(builder.finish(), emit),
            Format::Json => tracing::subscriber::with_default(builder.json().finish(), emit),
        }
        let text = captured.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    fn ours(format: Format, at: SystemTime, r: &Request) -> String {
        let mut out = Vec::new();
        format_line(
            &mut out,
            format,
            at,
            &[
                ("caller_namespace", Value::Str(r.namespace)),
                ("caller_pod", r.pod.into()),
                ("caller_identity", Value::Str("pod-ip")),
                ("method", Value::Shown(r.method)),
                ("path", Value::Str(r.path)),
                ("service", Value::Str("ns/web:80")),
                ("route", Value::Str(r.route)),
                ("backend", Value::Str("ns/web-v2:8080")),
                ("endpoint", r.endpoint.into()),
                ("status", Value::Number(r.status.into())),
                ("attempts", Value::Number(2)),
                ("duration_us", Value::Number(1234)),
                ("upstream_us", Value::Number(999)),
                ("reason", Value::Str(r.reason)),
            ],
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_are_what_tracings_formatter_writes_for_the_same_event() {
        let at = UNIX_EPOCH + Duration::from_micros(1_796_646_567_838_415);
        let shown_at = "2026-12-07T12:29:27.838415Z";
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let endpoint: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        let odd_pod = "pod\"with\\quotes\n";
        let requests = [
            Request {
                namespace: "bench",
                pod: Shown::Text("web-6d4cf56db6-x2x9q"),
                method: "GET",
                path: "/",
                route: "HTTPRoute ns/web rule #0",
                endpoint: Shown::Endpoint(endpoint),
                status: 200,
                reason: "-",
            },
            Request {
                namespace: "-",
                pod: Shown::Ip(v6),
                method: "PROPFIND",
                path: "/a%22b\"c\\d\te\u{1}f\u{7f}g\u{e9}h\u{200b}",
                route: "-",
                endpoint: Shown::Text("-"),
                status: 499,
                reason: "the caller went away before the answer",
            },
            Request {
                namespace: "ns",
                pod: Shown::Text(odd_pod),
                method: "POST",
                path: "/x",
                route: "GRPCRoute ns/r rule named-rule",
                endpoint: Shown::Text("-"),
                status: 503,
                reason: "no endpoint: \"ns/web\" has none ready\r\n",
            },
            Request {
                namespace: "ns",
                pod: Shown::Ip("10.244.1.7".parse().unwrap()),
                method: "GET",
                path: "/only\\a-backslash",
                route: "-",
                endpoint: Shown::Endpoint("10.244.2.19:65535".parse().unwrap()),
                status: 200,
                reason: "tab\there",
            },
        ];
        for format in [Format::Text, Format::Json] {
            for r in &requests {
                assert_eq!(
                    ours(format, at, r),
                    through_tracing(format, shown_at, r),
                    "{format:?} {:?}",
                    r.path
                );
            }
        }
    }

    #[test]
    fn json_lines_parse_as_json() {
        let line = ours(
            Format::Json,
            UNIX_EPOCH,
            &Request {
                namespace: "a\"b",
                pod: Shown::Text("p\u{0}q"),
                method: "GET",
                path: "/\\",
                route: "-",
                endpoint: Shown::Text("-"),
                status: 200,
                reason: "-",
            },
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(parsed["fields"]["caller_namespace"], "a\"b");
        assert_eq!(parsed["fields"]["caller_pod"], "p\u{0}q");
        assert_eq!(parsed["fields"]["path"], "/\\");
        assert_eq!(parsed["fields"]["status"], 200);
        assert_eq!(parsed["target"], "access");
    }

    #[test]
    fn timestamps_are_rfc3339_in_microseconds_as_jiff_gives_them() {
        // Across leap days, century years, month ends and the end of a day.
        let mut seconds: u64 = 0;
        while seconds < 5_000_000_000 {
            for micros in [0, 1, 999_999] {
                let at = UNIX_EPOCH + Duration::new(seconds, micros * 1000);
                let mut out = Vec::new();
                rfc3339_micros(&mut out, at);
                let jiff = k8s_openapi::jiff::Timestamp::try_from(at).unwrap();
                let expected = format!("{}.{micros:06}Z", jiff.strftime("%Y-%m-%dT%H:%M:%S"));
                assert_eq!(String::from_utf8(out).unwrap(), expected);
            }
            seconds += 86_399 * 7 + 3_601;
        }
    }
}
