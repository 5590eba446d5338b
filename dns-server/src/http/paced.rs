//! The paced writer: one task writes every plain-TCP event stream at the instants each
//! stream asks for, instead of a task, a timer and a wake-up per stream and write.
//!
//! A stream is a [`Paced`] source: at each visit it says what to write now (if anything)
//! and when to be visited next. The writer keeps the streams in a heap ordered by that
//! instant, sleeps until the first is due, and writes each due one with a non-blocking
//! `writev`. At 15,000 subscribers and 40,000 writes per second, the per-stream task's
//! wake-ups, timers and future polling were about a fifth of the server's CPU.
//!
//! The writer owns a stream's socket for writing only while the stream is in its heap. A
//! write the socket cannot take whole (the client reads slowly, or not at all) sends the
//! stream back to its connection ([`Back::Blocked`]) with the bytes left, which it writes
//! under the connection's watchdog, then hands the stream back. The connection keeps
//! reading the socket meanwhile (to notice the client leaving) and sets
//! [`Sub::closing`] to take its stream back ([`Back::Stop`]); at shutdown every stream
//! goes back at once.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A response body the connection writes itself (see
/// [`detachable`](super::accept::detachable)).
pub type DetachedStream = Pin<Box<dyn futures_util::Stream<Item = Bytes> + Send>>;

/// What a [`Paced`] stream does at a visit.
#[derive(Debug, PartialEq, Eq)]
pub enum Visit {
    /// Write these bytes now (never empty), visit again at the instant.
    Write(Bytes, Instant),
    /// Nothing to write; visit again at the instant.
    Wait(Instant),
    /// The stream is over.
    End,
}

/// A long response that is written at the instants it chooses.
pub trait Paced: Send + 'static {
    /// What to write at `now`, and when to be visited next.
    fn visit(&mut self, now: Instant) -> Visit;
    /// The same response as a stream that paces itself, for a connection the writer does
    /// not serve (TLS, or a body read by another server).
    fn into_stream(self: Box<Self>) -> DetachedStream;
}

/// A stream handed to the [`Writer`].
pub struct Sub {
    /// The socket (the connection keeps a handle to read from it).
    pub io: Arc<TcpStream>,
    /// The source.
    pub paced: Box<dyn Paced>,
    /// Close-delimited (HTTP/1.0) instead of chunked.
    pub http10: bool,
    /// Set by the connection ([`Writer::close`]) to take its stream back.
    pub closing: Arc<AtomicBool>,
}

/// Why a stream came back to its connection.
pub enum Back {
    /// The socket took only part of a write: these bytes (framed) are still to be written,
    /// then the stream is due again at the instant.
    Blocked(Sub, Bytes, Instant),
    /// The stream is over: the connection ends the response.
    End(Sub),
    /// The connection asked for it ([`Sub::closing`]), or the writer is shutting down.
    Stop(Sub),
}

/// Most streams visited before the writer yields to the runtime (heartbeats queued on the
/// same worker wait at most this many writes).
const BATCH: usize = 64;

/// A stream handed in, its way back and when it is due.
type Handed = (Sub, oneshot::Sender<Back>, Instant);

/// The writer's shared side: where connections hand their streams in.
pub struct Writer {
    /// `None` once the writer has stopped: streams handed in then come back at once.
    inbox: Mutex<Option<Vec<Handed>>>,
    /// Streams marked closing since the last sweep (see [`close`](Self::close)).
    closed: AtomicUsize,
    added: Notify,
}

impl Default for Writer {
    fn default() -> Self {
        Writer {
            inbox: Mutex::new(Some(Vec::new())),
            closed: AtomicUsize::new(0),
            added: Notify::new(),
        }
    }
}

/// Streams marked closing are taken out of the heap at most this often (a sweep looks at
/// every stream: a whole fleet leaving at once is a sweep per interval, not one each).
const SWEEP: Duration = Duration::from_millis(10);

/// A stream in the heap, ordered by when it is due (then by arrival).
struct Due {
    at: Instant,
    n: u64,
    /// Boxed: the heap moves only the key and a pointer (it moves entries at each push and
    /// pop: with the whole stream inline that was 7 % of the server's CPU at 15,000).
    held: Box<Held>,
}

/// A stream and its way back.
struct Held {
    sub: Sub,
    back: oneshot::Sender<Back>,
}

impl Held {
    /// Gives the stream back to its connection, saying why.
    fn give_back(self, why: impl FnOnce(Sub) -> Back) {
        let Held { sub, back } = self;
        let _ = back.send(why(sub));
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.n) == (other.at, other.n)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.n).cmp(&(self.at, self.n))
    }
}

impl Writer {
    /// Hands `sub` in, due at `at`; the returned receiver gets it back (see [`Back`]), or
    /// an error when the writer dropped it (the socket failed).
    pub fn add(&self, sub: Sub, at: Instant) -> oneshot::Receiver<Back> {
        let (tx, rx) = oneshot::channel();
        match self
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(inbox) => inbox.push((sub, tx, at)),
            None => {
                let _ = tx.send(Back::Stop(sub));
                return rx;
            }
        }
        self.added.notify_one();
        rx
    }

    /// Marks a stream closing (see [`Sub::closing`]): it comes back ([`Back::Stop`])
    /// within 10 ms (a sweep), not at its next visit, so that a client gone frees its subscriber
    /// slot at once.
    pub fn close(&self, closing: &AtomicBool) {
        closing.store(true, Ordering::Release);
        self.closed.fetch_add(1, Ordering::AcqRel);
        self.added.notify_one();
    }

    /// Writes the streams handed in until `shutdown`, then gives every one back.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // However the task ends (a panic too), streams handed in later come back at once
        // instead of waiting in an inbox no one reads.
        let _stopped = Stopped(self.clone());
        let mut heap: BinaryHeap<Due> = BinaryHeap::new();
        let mut n = 0u64;
        let mut swept = Instant::now();
        while !shutdown.is_cancelled() {
            let handed = std::mem::take(self.inbox.lock().unwrap().as_mut().expect("running"));
            for (sub, back, at) in handed {
                n += 1;
                let held = Box::new(Held { sub, back });
                heap.push(Due { at, n, held });
            }
            let sweep_at = (self.closed.load(Ordering::Acquire) > 0).then_some(swept + SWEEP);
            if sweep_at.is_some_and(|at| at <= Instant::now()) {
                // (A close counted after this swap is swept next time: its flag is set
                // before it is counted.)
                self.closed.swap(0, Ordering::AcqRel);
                swept = Instant::now();
                // In place: no allocation per sweep.
                let mut all = std::mem::take(&mut heap).into_vec();
                let gone: Vec<Due> = all
                    .extract_if(.., |d| d.held.sub.closing.load(Ordering::Acquire))
                    .collect();
                heap = BinaryHeap::from(all);
                for due in gone {
                    (*due.held).give_back(Back::Stop);
                }
                continue;
            }
            // At most a batch of what is due now, then the inbox and sweeps again: a stream
            // with more to write is due again at once, and must not keep the others out.
            let until = Instant::now();
            let mut visited = 0;
            while visited < BATCH && heap.peek().is_some_and(|d| d.at <= until) {
                let due = heap.pop().expect("peeked");
                if let Some(again) = visit(due, Instant::now()) {
                    heap.push(again);
                }
                visited += 1;
            }
            if visited == BATCH {
                tokio::task::yield_now().await;
                continue;
            }
            let next = match (heap.peek().map(|d| d.at), sweep_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.added.notified() => {}
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
        }
        for due in heap.into_vec() {
            (*due.held).give_back(Back::Stop);
        }
    }
}

/// Stops taking streams when the writer's task ends: what is waiting in the inbox, or is
/// handed in later, is given back.
struct Stopped(Arc<Writer>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("event stream writer failed; its streams end (clients reconnect)");
        }
        let inbox = self
            .0
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for (sub, back, _) in inbox {
            let _ = back.send(Back::Stop(sub));
        }
    }
}

/// Visits one stream: `Some` to keep it, due again.
fn visit(mut due: Due, now: Instant) -> Option<Due> {
    let held = &mut *due.held;
    if held.sub.closing.load(Ordering::Acquire) {
        (*due.held).give_back(Back::Stop);
        return None;
    }
    let (bytes, at) = match held.sub.paced.visit(now) {
        Visit::End => {
            (*due.held).give_back(Back::End);
            return None;
        }
        Visit::Wait(at) => {
            due.at = at;
            return Some(due);
        }
        Visit::Write(bytes, at) => (bytes, at),
    };
    let mut buf = super::accept::framed(bytes, held.sub.http10);
    let mut slices = [IoSlice::new(&[]); 4];
    let k = buf.chunks_vectored(&mut slices);
    match held.sub.io.try_write_vectored(&slices[..k]) {
        Ok(n) if n == buf.remaining() => {
            due.at = at;
            return Some(due);
        }
        // Part written: the rest is the connection's (another try would most likely block).
        Ok(n) => buf.advance(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => {
            // The client is gone; its connection notices by reading.
            tracing::debug!(error = %e, "event stream write");
            return None;
        }
    }
    let rest = buf.copy_to_bytes(buf.remaining());
    (*due.held).give_back(|sub| Back::Blocked(sub, rest, at));
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Writes its scripted chunks one visit apart (`gap`), then ends.
    struct Script {
        chunks: VecDeque<Bytes>,
        gap: Duration,
    }

    impl Paced for Script {
        fn visit(&mut self, now: Instant) -> Visit {
            match self.chunks.pop_front() {
                Some(b) if b.is_empty() => Visit::Wait(now + self.gap),
                Some(b) => Visit::Write(b, now + self.gap),
                None => Visit::End,
            }
        }
        fn into_stream(self: Box<Self>) -> DetachedStream {
            Box::pin(futures_util::stream::iter(self.chunks))
        }
    }

    /// A writer running until the token is cancelled.
    fn running() -> (Arc<Writer>, CancellationToken, tokio::task::JoinHandle<()>) {
        let writer = Arc::new(Writer::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(writer.clone().run(shutdown.clone()));
        (writer, shutdown, task)
    }

    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (Arc::new(s), c)
    }

    fn sub(io: &Arc<TcpStream>, chunks: Vec<Bytes>, gap: Duration) -> (Sub, Arc<AtomicBool>) {
        let closing = Arc::new(AtomicBool::new(false));
        let sub = Sub {
            io: io.clone(),
            paced: Box::new(Script {
                chunks: chunks.into(),
                gap,
            }),
            http10: false,
            closing: closing.clone(),
        };
        (sub, closing)
    }

    async fn write_all(io: &TcpStream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            io.writable().await.unwrap();
            match io.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    async fn read_n(c: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut buf))
            .await
            .expect("bytes in time")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn streams_are_written_as_chunks_at_their_instants_then_come_back_at_the_end() {
        let (writer, shutdown, task) = running();
        let (io, mut client) = pair().await;
        let chunks = [&b"one"[..], b"", b"three"]
            .map(Bytes::from_static)
            .to_vec();
        let (s, _) = sub(&io, chunks, Duration::from_millis(30));
        let started = Instant::now();
        let back = writer.add(s, Instant::now());
        assert_eq!(read_n(&mut client, 8).await, b"3\r\none\r\n");
        assert_eq!(read_n(&mut client, 10).await, b"5\r\nthree\r\n");
        // Two gaps: the first write, an empty visit, the second write.
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert!(matches!(back.await, Ok(Back::End(_))));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_write_the_socket_cannot_take_goes_back_with_every_byte_not_written() {
        let (writer, shutdown, task) = running();
        let (io, client) = pair().await;
        // 64 MiB in 1 MiB chunks without reading: more than the socket buffers hold.
        let chunks: Vec<Bytes> = (0..64u8)
            .map(|i| Bytes::from(vec![b'a' + i % 26; 1 << 20]))
            .collect();
        let (s, _) = sub(&io, chunks.clone(), Duration::ZERO);
        let expected: Vec<u8> = chunks
            .iter()
            .flat_map(|c| {
                let mut f = format!("{:x}\r\n", c.len()).into_bytes();
                f.extend_from_slice(c);
                f.extend_from_slice(b"\r\n");
                f
            })
            .collect();
        let mut back = writer.add(s, Instant::now());
        let mut client = Some(client);
        let mut reader = None;
        let mut blocked = 0;
        let sub = loop {
            match back.await {
                Ok(Back::End(sub)) => break sub,
                Ok(Back::Blocked(sub, rest, _)) => {
                    blocked += 1;
                    // The client starts reading only once a write could not be taken.
                    if let Some(mut c) = client.take() {
                        reader = Some(tokio::spawn(async move {
                            let mut got = Vec::new();
                            c.read_to_end(&mut got).await.unwrap();
                            got
                        }));
                    }
                    write_all(&sub.io, &rest).await;
                    back = writer.add(sub, Instant::now());
                }
                _ => panic!("dropped or stopped"),
            }
        };
        assert!(blocked >= 1);
        drop((sub, io));
        let got = reader.unwrap().await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes lost or reordered");
        shutdown.cancel();
        task.await.unwrap();
    }

    /// Always due, never writing (like a subscriber with events always waiting).
    struct Busy;

    impl Paced for Busy {
        fn visit(&mut self, now: Instant) -> Visit {
            Visit::Wait(now)
        }
        fn into_stream(self: Box<Self>) -> DetachedStream {
            Box::pin(futures_util::stream::pending())
        }
    }

    /// Streams due again at once do not keep the writer from the ones handed in after
    /// them, nor from closing (the loop was bounded by nothing).
    #[tokio::test]
    async fn streams_always_due_do_not_shut_out_new_ones_or_closes() {
        let (writer, shutdown, task) = running();
        let (io, mut client) = pair().await;
        let mut busy = vec![];
        for _ in 0..3 {
            let closing = Arc::new(AtomicBool::new(false));
            let sub = Sub {
                io: io.clone(),
                paced: Box::new(Busy),
                http10: false,
                closing: closing.clone(),
            };
            busy.push((writer.add(sub, Instant::now()), closing));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (s, _) = sub(&io, vec![Bytes::from_static(b"new")], Duration::ZERO);
        let back = writer.add(s, Instant::now());
        assert_eq!(read_n(&mut client, 8).await, b"3\r\nnew\r\n");
        assert!(matches!(back.await, Ok(Back::End(_))));
        let (back, closing) = busy.pop().unwrap();
        writer.close(&closing);
        let r = tokio::time::timeout(Duration::from_secs(5), back).await;
        assert!(matches!(r, Ok(Ok(Back::Stop(_)))));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn streams_handed_in_after_the_writer_stopped_come_back_at_once() {
        let writer = Arc::new(Writer::default());
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        writer.clone().run(shutdown).await;
        let (io, _client) = pair().await;
        let (s, _) = sub(&io, vec![], Duration::ZERO);
        let r = tokio::time::timeout(Duration::from_secs(5), writer.add(s, Instant::now())).await;
        assert!(matches!(r, Ok(Ok(Back::Stop(_)))));
    }

    #[tokio::test]
    async fn close_takes_a_stream_back_at_once_and_shutdown_returns_all() {
        let (writer, shutdown, task) = running();
        let (io, _client) = pair().await;
        let quiet = || vec![Bytes::new(); 1000];
        let (a, closing) = sub(&io, quiet(), Duration::from_millis(10));
        let (b, _) = sub(&io, quiet(), Duration::from_millis(10));
        // Both due in an hour: `a` comes back when closed, not at its visit.
        let back_a = writer.add(a, Instant::now() + Duration::from_secs(3600));
        let back_b = writer.add(b, Instant::now() + Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.close(&closing);
        let r = tokio::time::timeout(Duration::from_secs(5), back_a).await;
        assert!(matches!(r, Ok(Ok(Back::Stop(_)))));
        shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), back_b).await;
        assert!(matches!(r, Ok(Ok(Back::Stop(_)))));
        task.await.unwrap();
    }
}
