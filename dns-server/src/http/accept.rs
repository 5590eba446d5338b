//! The HTTP accept loop: one hyper HTTP/1 connection per accepted socket, bounded.
//!
//! `axum::serve` has no timeouts, no connection cap, sleeps a whole second after an accept
//! error (so `EMFILE` stalls every client) and rebuilds the router per connection. This
//! loop instead:
//!
//! - serves every connection from one shared [`Router`] (a clone is a reference count);
//! - caps connections at [`HttpLimits::max_connections`]: when full, a new client takes
//!   the slot of the connection idle the longest (no request in flight: silent, between
//!   keep-alive requests, or still sending a request head), so idle or half-sent
//!   connections cannot lock clients out; when every connection is busy with a request,
//!   the new client gets `503` with a JSON error, `Retry-After: 1` and
//!   `Connection: close`, written at once without reading its request, and the socket is
//!   closed (at most [`SHEDDING`] such goodbyes at a time; past that it is closed without
//!   a word);
//! - closes a connection that, between requests, sends nothing for
//!   [`HttpLimits::idle_timeout`] (keep-alive idle), or has begun a request but not finished
//!   its head within [`HttpLimits::header_timeout`] of its first byte; a request body must
//!   also arrive within `header_timeout` of the handler asking for it (`408`);
//! - closes a connection whose response cannot be written for `header_timeout` (the client
//!   stopped reading: a busy connection is never evicted, so it must not stay busy forever;
//!   an event stream to a client that no longer reads ends the same way);
//! - on an accept error waits only until a connection ends or [`ACCEPT_BACKOFF`] passes;
//! - keeps hyper's read buffer small ([`MAX_BUF`]), so that an idle connection costs a few
//!   KiB;
//! - writes long-lived responses (event streams, see [`detachable`]) itself, after hyper
//!   has parsed the request and let go of the connection: hyper keeps 16 KiB of buffers
//!   per connection (8 KiB read, 8 KiB for response heads) for as long as a response
//!   lasts, which for thousands of event streams was most of the server's memory; a
//!   paced one ([`detachable_paced`]) on plain TCP is written by the loop's paced writers
//!   ([`paced`](super::paced), a task per worker thread), the connection only reading to
//!   notice its client leave and writing what a slow client could not take at once;
//! - at shutdown stops accepting and lets each connection finish its request (graceful);
//! - with TLS ([`serve_tls`]), does each handshake in the connection's task within
//!   [`HttpLimits::header_timeout`]; over-cap clients are closed without a 503 (it would
//!   be plain text on a TLS port).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::http::Request;
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::paced::{Back, Sub, Writer};
pub use super::paced::{DetachedStream, Paced, Visit};

/// After an accept error (EMFILE, ENFILE, ENOBUFS), the longest pause before accepting
/// again; a connection that ends (freeing a descriptor) ends it sooner.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Largest hyper read buffer per connection (its floor is 8 KiB); a request head longer
/// than this gets 431.
pub const MAX_BUF: usize = 16 * 1024;
/// Over-cap clients being told 503 at once; more are closed without a response.
pub const SHEDDING: usize = 64;
/// How long an over-cap client's 503 may take to write.
const SHED_WRITE: Duration = Duration::from_millis(500);

/// Bounds of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; more get 503 and are closed.
    pub max_connections: usize,
    /// Time from the first byte of a request to the end of its head, and for a request
    /// body once the handler reads it.
    pub header_timeout: Duration,
    /// Time a connection may sit without a request (before its first one, between
    /// keep-alive requests).
    pub idle_timeout: Duration,
}

/// Default connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default header (and body) read timeout.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default keep-alive idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// A long response body the connection may write itself instead of hyper.
enum Detached {
    /// A stream, written as its items come.
    Stream(DetachedStream),
    /// These bytes at once, then a [`Paced`] source (written by the [`Writer`] on plain
    /// TCP).
    Paced(Vec<Bytes>, Box<dyn Paced>),
}

impl Detached {
    fn into_stream(self) -> DetachedStream {
        match self {
            Detached::Stream(s) => s,
            Detached::Paced(first, paced) => Box::pin(futures_util::StreamExt::chain(
                futures_util::stream::iter(first),
                paced.into_stream(),
            )),
        }
    }
}

/// Response extension: the connection may take the body and write it outside hyper
/// (chunked, or until close for HTTP/1.0), freeing hyper's buffers for the rest of a long
/// response. Only `200` answers to `GET` are taken.
#[derive(Clone)]
pub struct Detach(Arc<Mutex<Option<Detached>>>);

/// A streaming body for `stream` and the [`Detach`] extension that lets the accept loop
/// take it instead. Whoever comes first gets the stream: the body (served by any other
/// server, or by `oneshot` in tests) or the loop; the other sees nothing.
pub fn detachable(
    stream: impl futures_util::Stream<Item = Bytes> + Send + 'static,
) -> (Body, Detach) {
    detach(Detached::Stream(Box::pin(stream)))
}

/// [`detachable`] for `first` then `paced`: on plain TCP the accept loop hands the source
/// to its [`Writer`]; elsewhere it is the stream of [`Paced::into_stream`].
pub fn detachable_paced(first: Vec<Bytes>, paced: Box<dyn Paced>) -> (Body, Detach) {
    detach(Detached::Paced(first, paced))
}

fn detach(detached: Detached) -> (Body, Detach) {
    let slot = Arc::new(Mutex::new(Some(detached)));
    let from = slot.clone();
    let mut taken: Option<DetachedStream> = None;
    let body = futures_util::stream::poll_fn(move |cx| {
        if taken.is_none() {
            taken = from.lock().unwrap().take().map(Detached::into_stream);
        }
        match taken.as_mut() {
            Some(s) => s.as_mut().poll_next(cx).map(|b| b.map(Ok::<_, Infallible>)),
            None => Poll::Ready(None),
        }
    });
    (Body::from_stream(body), Detach(slot))
}

/// A response taken from hyper, to be written by the connection once hyper has finished.
struct Handed {
    /// Status line and headers, serialized.
    head: Vec<u8>,
    body: Detached,
    /// Close-delimited (HTTP/1.0) instead of chunked.
    http10: bool,
    _busy: Busy,
}

/// Most bytes a client may send on a stream's connection per read (then dropped: it sends
/// nothing after its request; reading only notices that it has gone).
const SINK: usize = 64;

impl Handed {
    fn new(head: &axum::http::response::Parts, body: Detached, http10: bool, busy: Busy) -> Self {
        let status = head.status;
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &head.headers {
            if name == axum::http::header::DATE || name == axum::http::header::CONNECTION {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // The connection ends with the stream: a pooling client must not reuse it.
        out.extend_from_slice(b"connection: close\r\n");
        if !http10 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Handed {
            head: out,
            body,
            http10,
            _busy: busy,
        }
    }

    /// Writes the response to `io`: a paced body through `writer` when given (plain TCP),
    /// else as a stream (see [`write_stream`](Self::write_stream)).
    async fn write(
        self,
        io: &mut Gate,
        close: &CancellationToken,
        writer: Option<(&Writer, Arc<TcpStream>)>,
    ) -> io::Result<()> {
        let Handed {
            head,
            body,
            http10,
            _busy,
        } = self;
        match (body, writer) {
            (Detached::Paced(first, paced), Some((writer, tcp))) => {
                // The replay as one chunk of the shared frames.
                let first = Frames(first.into());
                io.write_all_buf(&mut Buf::chain(&head[..], framed(first, http10)))
                    .await?;
                io.flush().await?;
                drop(head);
                let sub = Sub {
                    io: tcp,
                    paced,
                    http10,
                    closing: Arc::default(),
                };
                Self::write_paced(sub, io, close, writer).await
            }
            (body, _) => Self::write_stream(head, body.into_stream(), http10, io, close).await,
        }
    }

    /// Lends `sub` to `writer` until it ends, `close`, or the client closes its side;
    /// writes what the writer could not (a slow client) itself, under the connection's
    /// watchdog, then lends it again.
    async fn write_paced(
        mut sub: Sub,
        io: &mut Gate,
        close: &CancellationToken,
        writer: &Writer,
    ) -> io::Result<()> {
        use tokio::io::AsyncReadExt;
        let closing = sub.closing.clone();
        let http10 = sub.http10;
        let mut at = Instant::now();
        let mut sink = [0u8; SINK];
        loop {
            let mut back = writer.add(sub, at);
            let returned = loop {
                tokio::select! {
                    b = &mut back => break b,
                    // Take the stream back to end the response.
                    _ = close.cancelled(), if !closing.load(Ordering::Acquire) => {
                        writer.close(&closing);
                    }
                    // The client gone: the writer drops the stream (and its subscriber
                    // slot) at once.
                    r = io.read(&mut sink), if !closing.load(Ordering::Acquire) => match r {
                        Ok(0) | Err(_) => {
                            writer.close(&closing);
                            return Ok(());
                        }
                        Ok(_) => continue,
                    },
                }
            };
            match returned {
                // The writer dropped it: a write failed, the client is gone.
                Err(_) => return Ok(()),
                Ok(Back::Blocked(s, rest, next)) => {
                    io.write_all(&rest).await?;
                    io.flush().await?;
                    (sub, at) = (s, next);
                    if closing.load(Ordering::Acquire) {
                        break;
                    }
                }
                Ok(Back::End(_) | Back::Stop(_)) => break,
            }
        }
        if !http10 {
            io.write_all(b"0\r\n\r\n").await?;
        }
        io.shutdown().await
    }

    /// Writes the response to `io` until the stream ends (then the last chunk), `close`,
    /// the client closes its side, or an error. Every write is flushed (through TLS, data
    /// accepted is not yet sent) so that it reaches the client, and the watchdog sees the
    /// socket drain.
    async fn write_stream(
        head: Vec<u8>,
        mut stream: DetachedStream,
        http10: bool,
        io: &mut Gate,
        close: &CancellationToken,
    ) -> io::Result<()> {
        use futures_util::StreamExt;
        use tokio::io::AsyncReadExt;
        // The head goes out with what is ready at once (a replay of missed events), in one
        // write, as hyper would.
        let mut ended = false;
        let first = match futures_util::FutureExt::now_or_never(stream.next()) {
            Some(Some(first)) => first,
            Some(None) => {
                ended = true;
                Bytes::new()
            }
            None => Bytes::new(),
        };
        io.write_all_buf(&mut Buf::chain(&head[..], framed(first, http10)))
            .await?;
        io.flush().await?;
        drop(head);
        let mut sink = [0u8; SINK];
        if !ended {
            loop {
                let bytes = tokio::select! {
                    b = stream.next() => match b {
                        Some(b) => b,
                        None => break,
                    },
                    _ = close.cancelled() => break,
                    // Hyper noticed a client gone mid-response by reading; so does this (its
                    // subscriber slot is freed now, not at a failed write up to two keep-alives
                    // later).
                    r = io.read(&mut sink) => match r {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(_) => continue,
                    },
                };
                if bytes.is_empty() {
                    continue;
                }
                // One vectored write, no buffer kept between writes (thousands of idle
                // streams would each hold their largest write).
                io.write_all_buf(&mut framed(bytes, http10)).await?;
                io.flush().await?;
            }
        }
        if !http10 {
            io.write_all(b"0\r\n\r\n").await?;
        }
        io.shutdown().await
    }
}

/// `bytes` as the body's next part: a chunk (size line, bytes, CRLF), or as they are
/// when the body is close-delimited (HTTP/1.0); nothing for no bytes (an empty chunk
/// would end the body).
pub(super) fn framed<B: Buf>(bytes: B, http10: bool) -> impl Buf {
    let empty = !bytes.has_remaining();
    let size = if http10 || empty {
        String::new()
    } else {
        format!("{:x}\r\n", bytes.remaining())
    };
    let end: &'static [u8] = if http10 || empty { b"" } else { b"\r\n" };
    Buf::chain(Buf::chain(Bytes::from(size), bytes), end)
}

/// Shared frames as one [`Buf`] (written with one vectored write, not copied).
struct Frames(std::collections::VecDeque<Bytes>);

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }
    fn chunk(&self) -> &[u8] {
        self.0
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[], |b| &b[..])
    }
    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in dst.iter_mut().zip(self.0.iter().filter(|b| !b.is_empty())) {
            *slot = io::IoSlice::new(b);
            n += 1;
        }
        n
    }
    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let front = self.0.front_mut().expect("advance past the end");
            let k = cnt.min(front.len());
            front.advance(k);
            cnt -= k;
            if front.is_empty() {
                self.0.pop_front();
            }
        }
        while self.0.front().is_some_and(Bytes::is_empty) {
            self.0.pop_front();
        }
    }
}

/// What hyper reads and writes; its writes are discarded once a response is taken from it
/// (the stand-in answer it writes then is never sent).
struct Gate {
    inner: Box<dyn Io>,
    flags: Arc<GateFlags>,
}

/// What [`Gate`] and the service share.
#[derive(Default)]
struct GateFlags {
    /// Hyper's writes are discarded.
    discard: std::sync::atomic::AtomicBool,
    /// Something was written and not yet flushed (an earlier response may still be in
    /// hyper's or TLS's buffers: no response is taken from hyper then).
    unflushed: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn discarding(&self) -> bool {
        self.flags.discard.load(Ordering::Acquire)
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.flags.unflushed.store(true, Ordering::Release);
        }
    }
}

impl AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.discarding() {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.discarding() {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.flags.unflushed.store(false, Ordering::Release);
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.discarding() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.discarding() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The 503 an over-cap client gets.
const SHED_BODY: &str =
    r#"{"error":{"code":"overloaded","message":"too many connections; retry shortly"}}"#;

fn shed_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{SHED_BODY}",
        SHED_BODY.len()
    )
    .into_bytes()
}

/// Where connections come from: a [`TcpListener`] (a test can inject accept errors).
pub trait Accept: Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&mut self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight requests finish.
pub async fn serve(
    listener: impl Accept,
    router: Router,
    shutdown: CancellationToken,
    limits: HttpLimits,
) -> io::Result<()> {
    serve_tls(listener, router, shutdown, limits, None).await
}

/// [`serve`], over TLS when `tls` is given.
pub async fn serve_tls(
    mut listener: impl Accept,
    router: Router,
    shutdown: CancellationToken,
    limits: HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let table = Arc::new(Table {
        epoch: Instant::now(),
        max: limits.max_connections,
        next_id: AtomicU64::new(0),
        conns: Mutex::new(BTreeMap::new()),
    });
    // Event streams on plain TCP are written by a task per worker thread (each gives its
    // streams back at shutdown); a connection's stream goes to one of them in turn.
    let shards = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    let writers: Vec<Arc<Writer>> = (0..shards).map(|_| Arc::default()).collect();
    let mut writer_tasks = JoinSet::new();
    for w in &writers {
        writer_tasks.spawn(w.clone().run(shutdown.clone()));
    }
    let mut accepted = 0usize;
    let mut conns = JoinSet::new();
    let mut shedding = JoinSet::new();
    let shed_permits = Arc::new(Semaphore::new(SHEDDING));
    let mut backoff: Option<Pin<Box<Sleep>>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => backoff = None,
            Some(_) = shedding.join_next(), if !shedding.is_empty() => {}
            _ = async { backoff.as_mut().unwrap().await }, if backoff.is_some() => backoff = None,
            r = listener.accept(), if backoff.is_none() => match r {
                Ok(stream) => {
                    let Some(slot) = table.admit(&shutdown) else {
                        if tls.is_some() {
                            tracing::debug!("https: every connection is busy; closing a new one");
                        } else if let Ok(permit) = shed_permits.clone().try_acquire_owned() {
                            tracing::debug!("http: every connection is busy; answering 503");
                            shedding.spawn(async move {
                                shed(stream).await;
                                drop(permit);
                            });
                        }
                        continue;
                    };
                    accepted = accepted.wrapping_add(1);
                    conns.spawn(connection(
                        stream,
                        router.clone(),
                        slot,
                        limits,
                        tls.clone(),
                        writers[accepted % shards].clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept");
                    backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            },
        }
    }
    drop(listener);
    shedding.abort_all();
    // Each connection finishes its request (SSE streams end on the same token).
    while conns.join_next().await.is_some() {}
    while writer_tasks.join_next().await.is_some() {}
    Ok(())
}

/// Tells an over-cap client 503 and closes.
async fn shed(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(SHED_WRITE, async {
        stream.write_all(&shed_response()).await?;
        stream.shutdown().await?;
        // A lingering close (as nginx does): closing with the request unread sends a reset,
        // which can destroy the 503 before a client on a slow path reads it. Not reproduced
        // on loopback; bounded by SHED_WRITE and SHEDDING.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// The open connections, to close the longest-idle one when full.
struct Table {
    epoch: Instant,
    max: usize,
    next_id: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<Activity>>>,
}

impl Table {
    /// Registers a new connection, closing the longest-idle one when full; `None` when
    /// every connection has a request in flight.
    fn admit(self: &Arc<Self>, shutdown: &CancellationToken) -> Option<Slot> {
        let mut conns = self.conns.lock().unwrap();
        if conns.len() >= self.max {
            let oldest = conns
                .iter()
                .filter(|(_, a)| a.in_flight.load(Ordering::SeqCst) == 0)
                .map(|(id, a)| (a.idle_since.load(Ordering::SeqCst), *id))
                .min();
            let (_, id) = oldest?;
            tracing::debug!("http: connections full; closing the longest-idle one");
            if let Some(a) = conns.remove(&id) {
                a.close.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            start: self.epoch,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            head_started: AtomicU64::new(NONE),
            write_blocked: AtomicU64::new(NONE),
            progress: AtomicU64::new(0),
            changed: Notify::new(),
            close: shutdown.child_token(),
        });
        conns.insert(id, activity.clone());
        Some(Slot {
            table: self.clone(),
            id,
            activity,
        })
    }
}

/// A connection's place in [`Table`], given up when the connection ends.
struct Slot {
    table: Arc<Table>,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.conns.lock().unwrap().remove(&self.id);
    }
}

/// What the watchdog of one connection knows.
struct Activity {
    /// The table's epoch (times below are milliseconds since it).
    start: Instant,
    /// Requests being handled (head received, response not yet fully sent).
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `start` of the first byte read while idle, or [`NONE`].
    head_started: AtomicU64,
    /// Milliseconds since `start` since when writes have been pending (the client is not
    /// reading), or [`NONE`].
    write_blocked: AtomicU64,
    /// Bytes written since `write_blocked` (partial writes of a client reading slowly).
    progress: AtomicU64,
    changed: Notify,
    /// Cancelled to close the connection now (made room for another, or shutdown).
    close: CancellationToken,
}

const NONE: u64 = u64::MAX;

/// Bytes a client reading a response slowly must take per header timeout (see
/// [`Activity::wrote`]): 1.6 KB/s with the default 10 s.
const MIN_PROGRESS: u64 = 16 * 1024;

impl Activity {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A request head was parsed: busy until the returned guard drops.
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(NONE, Ordering::SeqCst);
        self.changed.notify_one();
        Busy(self.clone())
    }

    /// Bytes arrived.
    fn read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0
            && self.head_started.load(Ordering::SeqCst) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// A write of `offered` bytes returned `r`: a pending write starts the stall clock;
    /// it stops once a write takes everything offered (the client reads as fast as it is
    /// sent) or [`MIN_PROGRESS`] bytes went out since it started. A client that reads a
    /// few bytes now and then, just often enough to unblock each write, still has its
    /// connection closed after the header timeout, instead of holding the slot for as long
    /// as a large response lasts at its pace.
    fn wrote(&self, r: &Poll<io::Result<usize>>, offered: usize) {
        let blocked = self.write_blocked.load(Ordering::SeqCst);
        match r {
            Poll::Pending if blocked == NONE => {
                self.progress.store(0, Ordering::SeqCst);
                self.write_blocked.store(self.now_ms(), Ordering::SeqCst);
                self.changed.notify_one();
            }
            Poll::Ready(Ok(n)) if blocked != NONE && *n < offered => {
                let sent = self.progress.fetch_add(*n as u64, Ordering::SeqCst) + *n as u64;
                if sent >= MIN_PROGRESS {
                    self.write_blocked.store(NONE, Ordering::SeqCst);
                }
            }
            Poll::Ready(_) if blocked != NONE => self.write_blocked.store(NONE, Ordering::SeqCst),
            _ => {}
        }
    }

    /// Resolves when the connection has been idle, or slow with a request head, too long,
    /// or its response has not been written for the header timeout.
    async fn expired(&self, limits: HttpLimits) {
        loop {
            let changed = self.changed.notified();
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                let blocked = self.write_blocked.load(Ordering::SeqCst);
                if blocked == NONE {
                    changed.await;
                    continue;
                }
                let at = self.start
                    + Duration::from_millis(blocked + limits.header_timeout.as_millis() as u64);
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(at) => {
                        if self.write_blocked.load(Ordering::SeqCst) == blocked {
                            return;
                        }
                    }
                }
                continue;
            }
            let head = self.head_started.load(Ordering::SeqCst);
            let deadline = if head != NONE {
                head + limits.header_timeout.as_millis() as u64
            } else {
                self.idle_since.load(Ordering::SeqCst) + limits.idle_timeout.as_millis() as u64
            };
            let at = self.start + Duration::from_millis(deadline);
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(at) => {
                    if self.in_flight.load(Ordering::SeqCst) == 0
                        && self.head_started.load(Ordering::SeqCst) == head
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// One request being handled; dropped with the response body.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        a.changed.notify_one();
    }
}

/// The socket, telling [`Activity`] when bytes arrive and whether writes are blocked.
/// Shared (`Arc`) with the [`Writer`], which writes to it while it holds the connection's
/// event stream (the connection then only reads).
struct Watched {
    io: Arc<TcpStream>,
    activity: Arc<Activity>,
}

/// What hyper reads and writes: the socket, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Watched {
    /// A write by `f` once the socket is writable (`poll_write` of a shared socket).
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        offered: usize,
        f: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let r = loop {
            match self.io.poll_write_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => match f(&self.io) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => break Poll::Ready(r),
                },
            }
        };
        self.activity.wrote(&r, offered);
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.io.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // (Into the unfilled part as it is: nothing zeroed first.)
                Poll::Ready(Ok(())) => match self.io.try_read_buf(buf) {
                    Ok(n) => {
                        if n > 0 {
                            self.activity.read();
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                },
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, buf.len(), |io| io.try_write(buf))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A socket has nothing to flush.
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd;
        let r = nix::sys::socket::shutdown(self.io.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Poll::Ready(match r {
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        })
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let offered = bufs.iter().map(|b| b.len()).sum();
        self.poll_write_with(cx, offered, |io| io.try_write_vectored(bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// A request body that must arrive within a deadline (else the handler sees an error and
/// answers 408 or 400).
struct Deadline {
    inner: hyper::body::Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The request body took longer than the header timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
struct BodyTimeout(Duration);

impl HttpBody for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let timeout = self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout(timeout).into())));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(axum::BoxError::from)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    slot: Slot,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    writer: Arc<Writer>,
) {
    let _ = stream.set_nodelay(true);
    let activity = slot.activity.clone();
    // A child of the shutdown token: shutdown drains, `close` alone (eviction) drops.
    let shutdown = activity.close.clone();
    let stream = Arc::new(stream);
    // The writer writes to the socket itself: plain TCP only.
    let plain = tls.is_none().then(|| stream.clone());
    let watched = Watched {
        io: stream,
        activity: activity.clone(),
    };
    let io: Box<dyn Io> = match tls {
        None => Box::new(watched),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(watched));
            let r = tokio::select! {
                r = handshake => r,
                _ = shutdown.cancelled() => return,
            };
            match r {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "https: TLS handshake failed; closing");
                    return;
                }
                Err(_) => {
                    tracing::debug!("https: TLS handshake not done in time; closing");
                    return;
                }
            }
        }
    };
    let flags = Arc::new(GateFlags::default());
    let io = TokioIo::new(Gate {
        inner: io,
        flags: flags.clone(),
    });
    let handoff: Arc<Mutex<Option<Handed>>> = Arc::default();
    let svc = {
        let activity = activity.clone();
        let handoff = handoff.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let busy = activity.begin();
            let mut router = router.clone();
            let (handoff, flags) = (handoff.clone(), flags.clone());
            let (get, http10) = (
                req.method() == axum::http::Method::GET,
                req.version() == axum::http::Version::HTTP_10,
            );
            let req = req.map(|inner| {
                Body::new(Deadline {
                    inner,
                    timeout: limits.header_timeout,
                    sleep: None,
                })
            });
            Box::pin(async move {
                let mut resp = router.call(req).await?;
                let detached = resp
                    .extensions_mut()
                    .remove::<Detach>()
                    .filter(|_| {
                        get && resp.status() == axum::http::StatusCode::OK
                            && !flags.unflushed.load(Ordering::Acquire)
                    })
                    .and_then(|d| d.0.lock().unwrap().take());
                if let Some(stream) = detached {
                    // Hyper answers with a stand-in it never sends, then closes; the
                    // connection writes the real response (see `Handed`).
                    let (head, _) = resp.into_parts();
                    *handoff.lock().unwrap() = Some(Handed::new(&head, stream, http10, busy));
                    flags.discard.store(true, Ordering::Release);
                    let mut stand_in = axum::response::Response::new(Body::empty());
                    stand_in.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                    return Ok::<_, Infallible>(stand_in);
                }
                // Busy until hyper has sent (or dropped) the whole response body.
                Ok::<_, Infallible>(resp.map(|b| {
                    Body::new(b.map_frame(move |f| {
                        let _ = &busy;
                        f
                    }))
                }))
            })
        })
    };
    // Boxed: once it lets go of the connection, hyper's state (and buffers) is freed.
    let mut conn = Box::new(
        hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .serve_connection(io, svc),
    );
    let mut draining = false;
    loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http connection");
                    return;
                }
                break;
            }
            _ = shutdown.cancelled(), if !draining => {
                if activity.in_flight.load(Ordering::SeqCst) == 0 {
                    // Evicted, or shutdown with no request in flight: close now.
                    return;
                }
                draining = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            _ = activity.expired(limits) => {
                tracing::debug!("http connection: idle, slow request head or not reading; closing");
                return;
            }
        }
    }
    let mut io = conn.into_parts().io.into_inner();
    io.flags.discard.store(false, Ordering::Release);
    let handed = handoff.lock().unwrap().take();
    let done = async {
        match handed {
            Some(h) => {
                h.write(&mut io, &shutdown, plain.map(|t| (&*writer, t)))
                    .await
            }
            None => io.shutdown().await,
        }
    };
    tokio::select! {
        r = done => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection: writing a detached response");
            }
        }
        _ = activity.expired(limits) => {
            tracing::debug!("http connection: not reading; closing");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::AsyncReadExt;

    const LIMITS: HttpLimits = HttpLimits {
        max_connections: 4,
        header_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
    };

    struct Running {
        addr: std::net::SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<io::Result<()>>,
        /// Visits of the paced routes' sources by the writer.
        visits: Arc<AtomicUsize>,
    }

    async fn start(limits: HttpLimits) -> Running {
        let visits = Arc::new(AtomicUsize::new(0));
        let (v1, v2, v3) = (visits.clone(), visits.clone(), visits.clone());
        let router = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "done"
                }),
            )
            .route("/echo", post(|b: Bytes| async move { b }))
            .route(
                "/big",
                get(|| async {
                    // 64 MiB: more than the socket buffers hold.
                    let chunks =
                        (0..64).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; 1 << 20])));
                    Body::from_stream(futures_util::stream::iter(chunks))
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    // A long response (like SSE): one chunk every 20 s for 100 s.
                    let s = futures_util::stream::unfold(0, |i| async move {
                        if i == 5 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_secs(20)).await;
                        Some((Ok::<_, Infallible>(Bytes::from("tick\n")), i + 1))
                    });
                    Body::from_stream(s)
                }),
            );
        let router = router
            .route(
                "/detached",
                get(|| async {
                    // Two chunks and an end, written by the connection, not hyper.
                    let chunks = [&b"a"[..], b"bb"].map(Bytes::from_static);
                    detached_response(futures_util::stream::iter(chunks))
                }),
            )
            .route(
                "/detached-forever",
                get(|| async {
                    // An event stream that never ends: a chunk, then nothing.
                    let first = futures_util::stream::iter([Bytes::from_static(b"hello")]);
                    detached_response(futures_util::StreamExt::chain(
                        first,
                        futures_util::stream::pending(),
                    ))
                }),
            )
            .route(
                "/detached-flood",
                get(|| async {
                    // 1 MiB chunks without end: more than the socket buffers hold.
                    let chunks =
                        futures_util::stream::repeat_with(|| Bytes::from(vec![b'x'; 1 << 20]));
                    detached_response(chunks)
                }),
            )
            // The same three, paced: written by the writer task on plain TCP.
            .route(
                "/paced",
                get(move || async move {
                    paced_response(vec![], Chunks::new(&[b"a", b"bb"], None, (), v1))
                }),
            )
            .route(
                "/paced-forever",
                get(move || async move {
                    let quiet = Some(Bytes::new());
                    paced_response(
                        vec![Bytes::from_static(b"hello")],
                        Chunks::new(&[], quiet, (), v2),
                    )
                }),
            )
            .route(
                "/paced-flood",
                get(move || async move {
                    let flood = Some(Bytes::from(vec![b'x'; 1 << 20]));
                    paced_response(vec![], Chunks::new(&[], flood, (), v3))
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, router, shutdown.clone(), limits));
        Running {
            addr,
            shutdown,
            task,
            visits,
        }
    }

    fn detached_response(
        stream: impl futures_util::Stream<Item = Bytes> + Send + 'static,
    ) -> axum::response::Response {
        event_stream(detachable(stream))
    }

    /// A `text/event-stream` answer the connection may take.
    fn event_stream((body, detach): (Body, Detach)) -> axum::response::Response {
        let mut resp = axum::response::Response::new(body);
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/event-stream"),
        );
        resp.extensions_mut().insert(detach);
        resp
    }

    #[test]
    fn frames_are_written_as_one_chunk_across_their_boundaries() {
        let frames = || {
            Frames(
                [&b"ab"[..], b"", b"cde"]
                    .map(Bytes::from_static)
                    .into_iter()
                    .collect(),
            )
        };
        let mut all = framed(frames(), false);
        assert_eq!(all.remaining(), 10);
        assert_eq!(&all.copy_to_bytes(10)[..], b"5\r\nabcde\r\n");
        let mut f = frames();
        let mut slices = [io::IoSlice::new(&[]); 4];
        assert_eq!(f.chunks_vectored(&mut slices), 2);
        f.advance(3);
        assert_eq!((f.remaining(), f.chunk()), (2, &b"de"[..]));
        f.advance(2);
        assert!(!f.has_remaining());
        assert!(!framed(Frames(Default::default()), false).has_remaining());
    }

    /// A paced source: its chunks one visit (1 ms) apart, then `then` forever (an empty
    /// one: quiet; `None`: the end). `G` is dropped with it; `visits` counts the writer's
    /// visits (the paced path was taken, not the stream's).
    struct Chunks<G> {
        chunks: std::collections::VecDeque<Bytes>,
        then: Option<Bytes>,
        guard: G,
        visits: Arc<AtomicUsize>,
    }

    impl<G: Send + 'static> Chunks<G> {
        fn new(
            chunks: &[&'static [u8]],
            then: Option<Bytes>,
            guard: G,
            visits: Arc<AtomicUsize>,
        ) -> Self {
            Chunks {
                chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
                then,
                guard,
                visits,
            }
        }
    }

    impl<G: Send + 'static> Paced for Chunks<G> {
        fn visit(&mut self, now: Instant) -> Visit {
            self.visits.fetch_add(1, Ordering::SeqCst);
            match (self.chunks.pop_front(), &self.then) {
                (Some(c), _) => Visit::Write(c, now + Duration::from_millis(1)),
                (None, None) => Visit::End,
                (None, Some(b)) if b.is_empty() => Visit::Wait(now + Duration::from_secs(3600)),
                (None, Some(b)) => Visit::Write(b.clone(), now),
            }
        }
        fn into_stream(self: Box<Self>) -> DetachedStream {
            let then = self.then.clone();
            let rest: DetachedStream = match then {
                None => Box::pin(futures_util::stream::empty()),
                Some(b) if b.is_empty() => Box::pin(futures_util::stream::pending()),
                Some(b) => Box::pin(futures_util::stream::repeat(b)),
            };
            let guard = self.guard;
            Box::pin(futures_util::StreamExt::map(
                futures_util::StreamExt::chain(futures_util::stream::iter(self.chunks), rest),
                // The guard lives as long as the stream.
                move |b| {
                    let _ = &guard;
                    b
                },
            ))
        }
    }

    fn paced_response(first: Vec<Bytes>, paced: impl Paced) -> axum::response::Response {
        event_stream(detachable_paced(first, Box::new(paced)))
    }

    /// Reads until EOF (or an error such as a reset); the text read.
    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3600), s.read_to_end(&mut out))
            .await
            .expect("the server never closed the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_close(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        read_all(&mut s).await
    }

    #[tokio::test(start_paused = true)]
    async fn half_sent_heads_and_idle_connections_are_closed_on_time() {
        let srv = start(LIMITS).await;
        let t0 = Instant::now();
        let mut half = TcpStream::connect(srv.addr).await.unwrap();
        half.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(srv.addr).await.unwrap();
        // A keep-alive client: one request, then silence.
        let mut kept = TcpStream::connect(srv.addr).await.unwrap();
        kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        assert_eq!(read_all(&mut half).await, "", "no response to half a head");
        let waited = t0.elapsed();
        assert!(
            waited >= LIMITS.header_timeout && waited < LIMITS.idle_timeout,
            "{waited:?}"
        );
        assert_eq!(read_all(&mut idle).await, "");
        assert!(t0.elapsed() >= LIMITS.idle_timeout, "{:?}", t0.elapsed());
        assert_eq!(read_all(&mut kept).await, "");
        srv.shutdown.cancel();
        srv.task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_times_out_and_a_long_response_is_not_idle() {
        let srv = start(LIMITS).await;
        let t0 = Instant::now();
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let text = read_all(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 4"), "{text}");
        assert!(t0.elapsed() >= LIMITS.header_timeout, "{:?}", t0.elapsed());
        // 100 s of a streaming response, far past the idle timeout: served in full.
        let text = get_close(srv.addr, "/stream").await;
        assert_eq!(text.matches("tick").count(), 5, "{text}");
        srv.shutdown.cancel();
        srv.task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_closes_the_longest_idle_connection_for_a_new_client() {
        let srv = start(LIMITS).await;
        let t0 = Instant::now();
        let mut held = Vec::new();
        for i in 0..LIMITS.max_connections {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
                    .await
                    .unwrap();
            }
            held.push(s);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..3 {
            let text = get_close(srv.addr, "/health").await;
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
        // The oldest made room (once: each /health left, freeing its slot again).
        assert_eq!(read_all(&mut held[0]).await, "");
        assert!(t0.elapsed() < LIMITS.header_timeout, "{:?}", t0.elapsed());
        // The youngest (half-sent) is still there: it can finish its request.
        held[3]
            .write_all(b"connection: close\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut held[3]).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        srv.shutdown.cancel();
        drop(held);
        srv.task.await.unwrap().unwrap();
    }

    /// Clients that ask for a large response and never read keep their connections busy
    /// (never evicted); once their writes have made no progress for the header timeout
    /// they are closed, and a new client is served instead of getting 503.
    #[tokio::test(start_paused = true)]
    async fn clients_that_stop_reading_are_closed() {
        let srv = start(LIMITS).await;
        let mut stalled = Vec::new();
        for _ in 0..LIMITS.max_connections {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            stalled.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = get_close(srv.addr, "/health").await;
        assert!(
            text.starts_with("HTTP/1.1 503"),
            "all busy at first: {text}"
        );
        tokio::time::sleep(LIMITS.header_timeout + Duration::from_secs(1)).await;
        let text = get_close(srv.addr, "/health").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        drop(stalled);
        srv.shutdown.cancel();
        srv.task.await.unwrap().unwrap();
    }

    /// A client that takes a few bytes of a large response now and then (each write
    /// unblocked, partly) is closed the header timeout after its writes first blocked,
    /// unless it takes [`MIN_PROGRESS`] bytes meanwhile; one that takes what is offered
    /// stops the clock.
    #[tokio::test(start_paused = true)]
    async fn a_client_reading_a_trickle_is_closed_after_the_header_timeout() {
        let activity = Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            write_blocked: AtomicU64::new(NONE),
            progress: AtomicU64::new(0),
            changed: Notify::new(),
            close: CancellationToken::new(),
        });
        let _busy = activity.begin();
        let watchdog = {
            let a = activity.clone();
            tokio::spawn(async move { a.expired(LIMITS).await })
        };
        let step = LIMITS.header_timeout / 4;
        let offered = 1 << 20;
        // Blocked, then 2 KiB taken every quarter timeout: not enough.
        activity.wrote(&Poll::Pending, offered);
        for _ in 0..3 {
            tokio::time::sleep(step).await;
            activity.wrote(&Poll::Ready(Ok(2048)), offered);
            activity.wrote(&Poll::Pending, offered);
            assert!(!watchdog.is_finished());
        }
        tokio::time::sleep(step + Duration::from_millis(10)).await;
        assert!(watchdog.is_finished(), "a trickle kept the slot");

        // Enough bytes, or everything offered, stop the clock.
        let _busy = activity.begin();
        activity.write_blocked.store(NONE, Ordering::SeqCst);
        let watchdog = {
            let a = activity.clone();
            tokio::spawn(async move { a.expired(LIMITS).await })
        };
        for _ in 0..8 {
            activity.wrote(&Poll::Pending, offered);
            tokio::time::sleep(step).await;
            activity.wrote(&Poll::Ready(Ok(MIN_PROGRESS as usize)), offered);
            activity.wrote(&Poll::Pending, 100);
            tokio::time::sleep(step).await;
            activity.wrote(&Poll::Ready(Ok(100)), 100);
        }
        assert!(!watchdog.is_finished(), "closed a client that reads");
        watchdog.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_cap_with_every_connection_busy_a_client_gets_503() {
        let srv = start(LIMITS).await;
        let addr = srv.addr;
        let busy: Vec<_> = (0..LIMITS.max_connections)
            .map(|_| tokio::spawn(async move { get_close(addr, "/slow").await }))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = get_close(srv.addr, "/health").await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("connection: close"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
        // The busy ones were not disturbed; once done, their slots serve again.
        for b in busy {
            let text = b.await.unwrap();
            assert!(text.ends_with("done"), "{text}");
        }
        let text = get_close(srv.addr, "/health").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        srv.shutdown.cancel();
        srv.task.await.unwrap().unwrap();
    }

    /// A listener whose first accepts fail with EMFILE, as when descriptors run out.
    struct Exhausted {
        errors: usize,
        inner: TcpListener,
    }

    impl Accept for Exhausted {
        async fn accept(&mut self) -> io::Result<TcpStream> {
            if self.errors > 0 {
                self.errors -= 1;
                return Err(io::Error::from_raw_os_error(24)); // EMFILE
            }
            TcpListener::accept(&self.inner).await.map(|(s, _)| s)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_pause_the_loop_for_milliseconds_not_seconds() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let router = Router::new().route("/health", get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        let listener = Exhausted { errors: 5, inner };
        let task = tokio::spawn(serve(listener, router, shutdown.clone(), LIMITS));
        let t0 = Instant::now();
        let text = get_close(addr, "/health").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "5 accept errors stalled the loop for {:?}",
            t0.elapsed()
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_the_request_in_flight_finish() {
        let srv = start(LIMITS).await;
        let addr = srv.addr;
        let slow = tokio::spawn(async move { get_close(addr, "/slow").await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        srv.shutdown.cancel();
        let text = slow.await.unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("done"),
            "{text}"
        );
        srv.task.await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "stopped accepting");
    }

    /// A detachable response is written by the connection after hyper let go of it
    /// (freeing hyper's buffers): same head as hyper's, chunked, the last chunk at the
    /// end; close-delimited for HTTP/1.0; a HEAD request still gets hyper's bodiless answer.
    #[tokio::test]
    async fn a_detached_response_is_framed_like_hyper_would() {
        let srv = start(LIMITS).await;
        for path in ["/detached", "/paced"] {
            let text = get_close(srv.addr, path).await;
            let (head, body) = text.split_once("\r\n\r\n").expect(&text);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(head.contains("\r\ndate: "), "{text}");
            assert!(
                head.contains("\r\ncontent-type: text/event-stream"),
                "{text}"
            );
            assert!(head.contains("\r\ntransfer-encoding: chunked"), "{text}");
            assert!(head.contains("\r\nconnection: close"), "{text}");
            assert_eq!(body, "1\r\na\r\n2\r\nbb\r\n0\r\n\r\n", "{path}");
            if path == "/paced" {
                // Written by the writer: three visits (two chunks, the end).
                assert_eq!(srv.visits.swap(0, Ordering::SeqCst), 3);
            }

            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let text = read_all(&mut s).await;
            let (head, body) = text.split_once("\r\n\r\n").expect(&text);
            assert!(head.contains("\r\nconnection: close"), "{text}");
            assert!(!head.contains("transfer-encoding"), "{text}");
            assert_eq!(body, "abb", "{path}");
            if path == "/paced" {
                assert_eq!(srv.visits.swap(0, Ordering::SeqCst), 3);
            }

            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(
                format!("HEAD {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let text = read_all(&mut s).await;
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
        }
        srv.shutdown.cancel();
        srv.task.await.unwrap().unwrap();
    }

    /// A detached stream still ends (with its last chunk) at shutdown, and one whose
    /// client stopped reading is closed after the header timeout like any response.
    #[tokio::test(start_paused = true)]
    async fn detached_streams_end_at_shutdown_and_when_not_read() {
        for kind in ["detached", "paced"] {
            let srv = start(LIMITS).await;
            let mut stalled = TcpStream::connect(srv.addr).await.unwrap();
            stalled
                .write_all(format!("GET /{kind}-flood HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut reader = TcpStream::connect(srv.addr).await.unwrap();
            reader
                .write_all(format!("GET /{kind}-forever HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = vec![0; 4096];
            let n = reader.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(text.contains("\r\n\r\n5\r\nhello\r\n"), "{kind}: {text}");
            // The stalled client: its socket full, it is closed after the header timeout.
            tokio::time::sleep(LIMITS.header_timeout * 2).await;
            let mut sink = Vec::new();
            let r =
                tokio::time::timeout(Duration::from_secs(60), stalled.read_to_end(&mut sink)).await;
            assert!(r.is_ok(), "{kind}: the stalled stream was never closed");
            if kind == "paced" {
                // The flood's first visit, the quiet stream's first.
                assert!(srv.visits.load(Ordering::SeqCst) >= 2);
            }
            srv.shutdown.cancel();
            // The reading client gets the rest, then the last chunk, then EOF.
            let rest = read_all(&mut reader).await;
            assert_eq!(rest, "0\r\n\r\n", "{kind}");
            srv.task.await.unwrap().unwrap();
        }
    }

    /// A client that goes away ends its detached stream at once (its subscriber slot is
    /// freed), as hyper did by reading mid-response: not at a failed write, which for an
    /// idle stream comes only with the next keep-alives.
    #[tokio::test(start_paused = true)]
    async fn a_detached_stream_ends_when_its_client_goes() {
        // Counts the streams alive (plus this test's and the route's own).
        let live = Arc::new(());
        let (route_live, paced_live) = (live.clone(), live.clone());
        let visits = Arc::new(AtomicUsize::new(0));
        let route_visits = visits.clone();
        let router = Router::new()
            .route(
                "/watched",
                get(move || {
                    let guard = route_live.clone();
                    async move {
                        // "hello", then nothing; `guard` is dropped with the stream.
                        let first = futures_util::stream::iter([Bytes::from_static(b"hello")]);
                        let rest = futures_util::stream::unfold(guard, |g| async move {
                            std::future::pending::<()>().await;
                            Some((Bytes::new(), g))
                        });
                        detached_response(futures_util::StreamExt::chain(first, rest))
                    }
                }),
            )
            .route(
                "/watched-paced",
                get(move || {
                    // The same, paced: visited again only in an hour.
                    let guard = paced_live.clone();
                    async move {
                        let first = vec![Bytes::from_static(b"hello")];
                        let visits = route_visits.clone();
                        paced_response(first, Chunks::new(&[], Some(Bytes::new()), guard, visits))
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, router, shutdown.clone(), LIMITS));
        for path in ["/watched", "/watched-paced"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("hello"));
            assert_eq!(Arc::strong_count(&live), 4, "{path}: one stream");
            if path == "/watched-paced" {
                tokio::time::sleep(Duration::from_millis(10)).await;
                assert_eq!(visits.load(Ordering::SeqCst), 1, "the writer has it");
            }
            drop(s);
            for _ in 0..100 {
                if Arc::strong_count(&live) == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                Arc::strong_count(&live),
                3,
                "{path}: the stream outlived its client by a second"
            );
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
