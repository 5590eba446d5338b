//! An incremental Server-Sent Events parser (the registry's `/events` stream): bytes in,
//! complete events out, whatever the chunking.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// `id:` field, if the event had one.
    pub id: Option<String>,
    /// `event:` field (`message` when absent, per the SSE spec, left `None` here).
    pub event: Option<String>,
    /// `data:` lines joined by `\n`.
    pub data: String,
}

/// Why the parser gave up on an event. The event is dropped (the parser skips to its end,
/// the blank line) and the stream is not to be trusted for it: the caller reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line longer than [`MAX_LINE`] bytes (skipped whole, up to its `\n`).
    #[error("event stream line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// An event whose fields add up to more than [`MAX_EVENT`] bytes (`data:` lines
    /// without the blank line that ends the event).
    #[error("event stream event larger than {MAX_EVENT} bytes")]
    EventTooLarge,
}

/// The parser state between chunks: at most [`MAX_LINE`] bytes of the current line and
/// [`MAX_EVENT`] bytes of the current event, whatever the peer sends.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The current line outgrew [`MAX_LINE`]: the rest of it, up to its `\n`, is dropped.
    long_line: bool,
    cur: SseEvent,
    has_data: bool,
    /// Bytes of field values in `cur`.
    size: usize,
    /// The current event was given up on: its lines are dropped until the blank line.
    discarding: bool,
    /// Frames ended so far.
    frames: u64,
}

/// A line longer than this is garbage: it is dropped whole (with its event) rather than
/// grow without bound. The registry's events are one `data:` line of a membrane's JSON,
/// under its 64 KiB request limit.
pub const MAX_LINE: usize = 4 * 1024 * 1024;
/// An event (its `id`, `event` and `data` values together) larger than this is garbage
/// too: a peer sending `data:` lines without ever ending the event must not grow it
/// without bound.
pub const MAX_EVENT: usize = 4 * 1024 * 1024;

impl SseParser {
    /// A fresh parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them, in stream order, with an error
    /// in place of each event given up on (over [`MAX_LINE`] or [`MAX_EVENT`]): the stream
    /// lost that event, the caller should drop the stream. Parsing goes on after an error
    /// with the next event.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Result<SseEvent, SseError>> {
        let mut out = Vec::new();
        for &b in chunk {
            if b == b'\n' {
                if std::mem::take(&mut self.long_line) {
                    self.line.clear();
                    self.give_up(SseError::LineTooLong, &mut out);
                    continue;
                }
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&line, &mut out);
            } else if self.long_line {
                // The rest of a line too long: dropped.
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            } else {
                self.long_line = true;
                self.line = Vec::new();
            }
        }
        out
    }

    /// Frames ended so far (blank lines: events, keep-alive comments, events given up on):
    /// whether the peer speaks SSE at all.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Drops the current event and reports it, once, unless it was already given up on.
    fn give_up(&mut self, e: SseError, out: &mut Vec<Result<SseEvent, SseError>>) {
        self.cur = SseEvent::default();
        self.has_data = false;
        self.size = 0;
        if !std::mem::replace(&mut self.discarding, true) {
            out.push(Err(e));
        }
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Result<SseEvent, SseError>>) {
        if line.is_empty() {
            self.frames += 1;
            self.size = 0;
            let ev = std::mem::take(&mut self.cur);
            let has_data = std::mem::take(&mut self.has_data);
            if std::mem::take(&mut self.discarding) {
                return;
            }
            if has_data || ev.event.is_some() {
                out.push(Ok(ev));
            }
            return;
        }
        if line[0] == b':' || self.discarding {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        if !matches!(field, "id" | "event" | "data") {
            return;
        }
        // (A repeated `id:` or `event:` replaces the value: counting it again only errs
        // on the safe side.)
        self.size = self.size.saturating_add(value.len() + 1);
        if self.size > MAX_EVENT {
            self.give_up(SseError::EventTooLarge, out);
            return;
        }
        match field {
            "id" => self.cur.id = Some(value.to_string()),
            "event" => self.cur.event = Some(value.to_string()),
            _ => {
                if self.has_data {
                    self.cur.data.push('\n');
                }
                self.cur.data.push_str(value);
                self.has_data = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b": keep-alive\n\nid: 7\nevent: registered\ndata: {\"a\":1}\n\nid: 8\r\nevent: resync\r\ndata: x\r\ndata: y\r\n\r\n";

    fn events(got: Vec<Result<SseEvent, SseError>>) -> Vec<SseEvent> {
        got.into_iter().map(Result::unwrap).collect()
    }

    #[test]
    fn parses_whole_stream() {
        let evs = events(SseParser::new().feed(STREAM));
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].id.as_deref(), Some("7"));
        assert_eq!(evs[0].event.as_deref(), Some("registered"));
        assert_eq!(evs[0].data, "{\"a\":1}");
        assert_eq!(evs[1].event.as_deref(), Some("resync"));
        assert_eq!(evs[1].data, "x\ny");
    }

    #[test]
    fn any_chunking_gives_the_same_events() {
        let whole = SseParser::new().feed(STREAM);
        for size in 1..STREAM.len() {
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for c in STREAM.chunks(size) {
                got.extend(p.feed(c));
            }
            assert_eq!(got, whole, "chunk size {size}");
        }
    }

    #[test]
    fn comments_alone_dispatch_nothing() {
        let mut p = SseParser::new();
        assert!(p.feed(b":\n\n: ping\n").is_empty());
        assert_eq!(p.frames(), 1);
        assert!(p.feed(b"\n").is_empty());
        assert_eq!(p.frames(), 2, "but count as frames");
    }

    /// A peer sending `data:` lines without the blank line that ends the event: the event
    /// stops growing at the cap, is reported once and dropped; the next event is parsed.
    #[test]
    fn an_event_that_never_ends_is_dropped_at_the_cap() {
        let mut p = SseParser::new();
        let line = format!("data: {}\n", "x".repeat(64 * 1024));
        let mut errors = Vec::new();
        for _ in 0..2 * MAX_EVENT / line.len() {
            for r in p.feed(line.as_bytes()) {
                errors.push(r.unwrap_err());
            }
            assert!(
                p.cur.data.len() <= MAX_EVENT,
                "{} bytes held",
                p.cur.data.len()
            );
        }
        assert_eq!(errors, [SseError::EventTooLarge], "reported once");
        assert!(p.cur.data.is_empty(), "the event is dropped, not kept");
        let got = p.feed(b"data: more\n\nid: 9\ndata: next\n\n");
        assert_eq!(
            got,
            [Ok(SseEvent {
                id: Some("9".into()),
                event: None,
                data: "next".into()
            })],
            "the rest of the dropped event is skipped, the next one parsed"
        );
    }

    /// A line over the cap is skipped whole, up to its `\n`, and its event with it: not
    /// cut at the cap and parsed.
    #[test]
    fn an_over_long_line_is_dropped_whole_with_its_event() {
        let mut stream = b"id: 1\nevent: registered\ndata: ".to_vec();
        stream.resize(stream.len() + MAX_LINE + 10, b'x');
        stream.extend_from_slice(b"\ndata: tail\n\nid: 2\ndata: next\n\n");
        for size in [stream.len(), 1 << 20, 4093] {
            let mut p = SseParser::new();
            let mut got = Vec::new();
            for c in stream.chunks(size) {
                // (Ids and data sizes: the events themselves would be megabytes of message.)
                got.extend(
                    p.feed(c)
                        .into_iter()
                        .map(|r| r.map(|e| (e.id, e.data.len()))),
                );
                assert!(p.line.len() <= MAX_LINE);
            }
            assert_eq!(
                got,
                [Err(SseError::LineTooLong), Ok((Some("2".into()), 4))],
                "chunks of {size}"
            );
        }
    }
}
