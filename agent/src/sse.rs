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

/// The parser state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    cur: SseEvent,
    has_data: bool,
}

/// A line longer than this is garbage: drop it rather than grow without bound.
const MAX_LINE: usize = 4 * 1024 * 1024;

impl SseParser {
    /// A fresh parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&line, &mut out);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        out
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            let ev = std::mem::take(&mut self.cur);
            if std::mem::take(&mut self.has_data) || ev.event.is_some() {
                out.push(ev);
            }
            return;
        }
        if line[0] == b':' {
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
        match field {
            "id" => self.cur.id = Some(value.to_string()),
            "event" => self.cur.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.cur.data.push('\n');
                }
                self.cur.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b": keep-alive\n\nid: 7\nevent: registered\ndata: {\"a\":1}\n\nid: 8\r\nevent: resync\r\ndata: x\r\ndata: y\r\n\r\n";

    #[test]
    fn parses_whole_stream() {
        let evs = SseParser::new().feed(STREAM);
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
        assert!(SseParser::new().feed(b":\n\n: ping\n\n").is_empty());
    }
}
