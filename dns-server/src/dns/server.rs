//! Sockets: one receive loop per UDP socket answering from the pre-rendered zones, and an
//! RFC 7766 TCP server (several queries per connection, pipelining, idle timeout).
//!
//! TCP connections are bounded ([`TcpLimits`]). When the table is full, a new client takes
//! the slot of the connection idle the longest (RFC 7766 6.2.3: close idle connections
//! first), so clients that connect and send nothing cannot lock everyone else out; only when
//! every connection is in the middle of a query (each bounded by a read timeout, and its
//! answer by the same timeout per message written: a client that stops reading is closed)
//! is the new one closed. A connection is idle until the whole two-byte length of its next
//! query has arrived (one byte does not make it busy). One source prefix (an IPv4 /24, an
//! IPv6 /56, as rate limiting counts them) holds at most [`TcpLimits::per_prefix`]
//! connections: past that, its new connection takes the slot of its own longest-idle one, or
//! is closed when all of its connections are busy, so that one network cannot keep the whole
//! table busy with slowly sent queries. Loopback sources (a local forwarder) are not capped.
//! Above three quarters of the cap the idle timeout drops to the shorter
//! `pressure_idle_timeout`.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Catalog;
use super::query::{Scratch, TCP_MAX};
use super::rrl::{self, Prefix};
use super::stats::SHARDS;

/// Time allowed to receive the rest of a message once its length arrived (less under
/// pressure: [`ConnTable::read_timeout`]).
const TCP_READ: Duration = Duration::from_secs(5);
/// Zone transfers rendered and written at once (each holds a whole zone in memory until
/// written); more wait.
const XFR_CONCURRENT: usize = 4;
/// Rendered answers at membranes' own names kept per UDP loop (a few hundred bytes each).
const UDP_ANSWER_CACHE: usize = 4096;
/// The same per TCP connection (up to [`TcpLimits::max_connections`] of them).
const TCP_ANSWER_CACHE: usize = 32;
/// Most TCP connections one source prefix holds, whatever the table's size
/// ([`TcpLimits::per_prefix`]).
const TCP_PER_PREFIX: usize = 64;

/// Binds `sockets` UDP sockets to `addr` (an `SO_REUSEPORT` group when more than one; with
/// port 0 they all share the port the first one got).
pub fn bind_udp(addr: SocketAddr, sockets: usize) -> io::Result<Vec<UdpSocket>> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let mut out = Vec::with_capacity(sockets.max(1));
    let mut addr = addr;
    for _ in 0..sockets.max(1) {
        let fd = socket(
            family,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        if sockets > 1 {
            setsockopt(&fd, sockopt::ReusePort, &true)?;
        }
        // A deeper receive queue absorbs bursts; the kernel caps it at rmem_max.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
        let std_sock = std::net::UdpSocket::from(fd);
        if addr.port() == 0 {
            addr = std_sock.local_addr()?;
        }
        out.push(UdpSocket::from_std(std_sock)?);
    }
    Ok(out)
}

/// Bounds of the DNS-over-TCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    /// Connections held at once per listener.
    pub max_connections: usize,
    /// A connection without a new query for this long is closed (RFC 7766 6.2.3).
    pub idle_timeout: Duration,
    /// The idle timeout once the table is three quarters full.
    pub pressure_idle_timeout: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(10),
            pressure_idle_timeout: Duration::from_secs(1),
        }
    }
}

impl TcpLimits {
    /// Connections from which on the shorter idle timeout applies.
    fn pressure(&self) -> usize {
        (self.max_connections * 3 / 4).max(1)
    }

    /// Connections one source prefix (/24, /56) holds at most: a quarter of the table, at
    /// most 64 (so that at least four networks, sixteen with the default cap, are needed to
    /// fill it). Loopback sources are not capped.
    pub fn per_prefix(&self) -> usize {
        (self.max_connections / 4).clamp(1, TCP_PER_PREFIX)
    }
}

/// Marks a connection busy (reading or answering a query) in [`ConnTable`].
const BUSY: u64 = u64::MAX;

/// One TCP connection as the table sees it.
struct Conn {
    /// Milliseconds since the table's epoch at which it began waiting for a query, or
    /// [`BUSY`].
    idle_since: AtomicU64,
    /// Cancelled to close it (eviction or shutdown).
    close: CancellationToken,
    /// The client's prefix; None for a loopback client (not capped).
    prefix: Option<Prefix>,
}

/// Why [`ConnTable::admit`] closed a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// The table is full and every connection is busy.
    Full,
    /// Its prefix holds [`TcpLimits::per_prefix`] connections, all busy.
    Prefix,
}

/// The TCP connections of one listener, to close idle ones first when it is full.
struct ConnTable {
    limits: TcpLimits,
    epoch: Instant,
    next_id: AtomicU64,
    len: AtomicUsize,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

/// Removes its connection from the table when the connection task ends.
struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self.table.conns.lock().unwrap();
        if conns.remove(&self.id).is_some() {
            self.table.len.store(conns.len(), Ordering::Relaxed);
        }
    }
}

impl ConnTable {
    fn new(limits: TcpLimits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            conns: Mutex::new(BTreeMap::new()),
        })
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn under_pressure(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.limits.pressure()
    }

    /// The idle timeout that applies now.
    fn idle_timeout(&self) -> Duration {
        if self.under_pressure() {
            self.limits.pressure_idle_timeout
        } else {
            self.limits.idle_timeout
        }
    }

    /// Time allowed for the rest of a message now: a slow sender is busy (not closable
    /// first), so under pressure it gets no more than the pressure idle timeout.
    fn read_timeout(&self) -> Duration {
        if self.under_pressure() {
            TCP_READ.min(self.limits.pressure_idle_timeout)
        } else {
            TCP_READ
        }
    }

    /// Makes room for a new connection from `peer` and registers it (idle from `now`):
    /// under pressure, closes connections idle longer than the pressure timeout; when the
    /// peer's prefix holds its share, closes that prefix's connection idle the longest; when
    /// full, closes the one idle the longest. Refused when the connections it could close
    /// are all busy. Returns how many it closed.
    fn admit(
        self: &Arc<Self>,
        now: Instant,
        peer: IpAddr,
        shutdown: &CancellationToken,
    ) -> (Result<Slot, Refused>, usize) {
        let prefix = (!peer.to_canonical().is_loopback()).then(|| rrl::prefix(peer));
        let mut conns = self.conns.lock().unwrap();
        let now_ms = self.millis(now);
        let mut closed = 0;
        if conns.len() >= self.limits.pressure() {
            let limit = self.limits.pressure_idle_timeout.as_millis() as u64;
            conns.retain(|_, c| {
                let since = c.idle_since.load(Ordering::Relaxed);
                let stale = since != BUSY && now_ms.saturating_sub(since) >= limit;
                if stale {
                    c.close.cancel();
                    closed += 1;
                }
                !stale
            });
        }
        // The longest-idle connection among those `pick` selects.
        let oldest = |conns: &BTreeMap<u64, Arc<Conn>>, pick: &dyn Fn(&Conn) -> bool| {
            conns
                .iter()
                .filter(|(_, c)| pick(c))
                .map(|(id, c)| (c.idle_since.load(Ordering::Relaxed), *id))
                .filter(|(since, _)| *since != BUSY)
                .min()
                .map(|(_, id)| id)
        };
        let mut evict = |conns: &mut BTreeMap<u64, Arc<Conn>>, id: Option<u64>| {
            if let Some(c) = id.and_then(|id| conns.remove(&id)) {
                c.close.cancel();
                closed += 1;
            }
        };
        if prefix.is_some() {
            let mine = |c: &Conn| c.prefix == prefix;
            if conns.values().filter(|c| mine(c)).count() >= self.limits.per_prefix() {
                // Its own connections make room, never another network's.
                let id = oldest(&conns, &mine);
                evict(&mut conns, id);
                if id.is_none() {
                    self.len.store(conns.len(), Ordering::Relaxed);
                    return (Err(Refused::Prefix), closed);
                }
            }
        }
        if conns.len() >= self.limits.max_connections {
            let id = oldest(&conns, &|_| true);
            evict(&mut conns, id);
        }
        if conns.len() >= self.limits.max_connections {
            self.len.store(conns.len(), Ordering::Relaxed);
            return (Err(Refused::Full), closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            idle_since: AtomicU64::new(now_ms),
            close: shutdown.child_token(),
            prefix,
        });
        conns.insert(id, conn.clone());
        self.len.store(conns.len(), Ordering::Relaxed);
        (
            Ok(Slot {
                table: self.clone(),
                id,
                conn,
            }),
            closed,
        )
    }
}

/// Serves DNS on the given sockets until `shutdown` is cancelled.
pub async fn serve(
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with(udp, tcp, catalog, shutdown, TcpLimits::default()).await
}

/// [`serve`] with explicit TCP limits.
pub async fn serve_with(
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    limits: TcpLimits,
) -> io::Result<()> {
    let mut set = JoinSet::new();
    for (i, sock) in udp.into_iter().enumerate() {
        set.spawn(udp_loop(sock, catalog.clone(), i % (SHARDS - 1)));
    }
    for l in tcp {
        set.spawn(tcp_accept(l, catalog.clone(), shutdown.clone(), limits));
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(res) = set.join_next() => {
                if let Err(e) = res {
                    tracing::error!(error = %e, "dns task ended");
                }
            }
        }
    }
    set.abort_all();
    while set.join_next().await.is_some() {}
    Ok(())
}

async fn udp_loop(sock: UdpSocket, catalog: Arc<Catalog>, shard: usize) {
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::with_capacity(TCP_MAX);
    let mut scratch = Scratch::new(UDP_ANSWER_CACHE);
    let shard = &catalog.stats.shards[shard];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns udp receive");
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Transfers and TSIG-signed queries first (xfr.rs), then the ordinary path.
        let req = &buf[..n];
        let special = super::xfr::scan(req)
            .and_then(|r| catalog.respond_scanned(req, r, false, peer.ip(), &mut scratch, shard));
        let reply = match &special {
            Some(msgs) => msgs.first().map(Vec::as_slice),
            None => catalog
                .respond(&buf[..n], false, peer.ip(), &mut out, &mut scratch, shard)
                .map(|_| out.as_slice()),
        };
        if let Some(reply) = reply
            && let Err(e) = sock.send_to(reply, peer).await
        {
            tracing::debug!(error = %e, %peer, "dns udp send");
        }
    }
}

async fn tcp_accept(
    listener: TcpListener,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    limits: TcpLimits,
) {
    let table = ConnTable::new(limits);
    let mut conns = JoinSet::new();
    let xfr = Arc::new(tokio::sync::Semaphore::new(XFR_CONCURRENT));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let (slot, closed) = table.admit(Instant::now(), peer.ip(), &shutdown);
                    if closed > 0 {
                        tracing::debug!(closed, "dns tcp: closed idle connections to make room");
                    }
                    let slot = match slot {
                        Ok(slot) => slot,
                        Err(Refused::Full) => {
                            tracing::warn!(%peer, "dns tcp: every connection is busy, closing");
                            continue;
                        }
                        Err(Refused::Prefix) => {
                            tracing::debug!(
                                %peer,
                                "dns tcp: every connection of this network is busy, closing"
                            );
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    conns.spawn(tcp_conn(
                        r,
                        w,
                        peer.ip(),
                        catalog.clone(),
                        slot,
                        xfr.clone(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dns tcp accept");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

/// Serves the queries of one TCP connection from `peer` (read from `r`, answered on `w`).
async fn tcp_conn(
    r: impl AsyncRead + Unpin,
    w: impl AsyncWrite + Unpin,
    peer: IpAddr,
    catalog: Arc<Catalog>,
    slot: Slot,
    xfr: Arc<tokio::sync::Semaphore>,
) {
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let mut req = Vec::new();
    let mut out = Vec::with_capacity(TCP_MAX);
    let mut scratch = Scratch::new(TCP_ANSWER_CACHE);
    let shard = &catalog.stats.shards[SHARDS - 1];
    let close = slot.conn.close.clone();
    loop {
        let mut len = [0u8; 2];
        // Idle (closable first) until the next query's whole length has arrived: one byte of
        // it sent after each answer must not keep the slot busy for the idle timeout.
        if r.buffer().len() < 2 {
            slot.conn
                .idle_since
                .store(slot.table.millis(Instant::now()), Ordering::Relaxed);
        }
        tokio::select! {
            _ = close.cancelled() => return,
            res = tokio::time::timeout(slot.table.idle_timeout(), r.read_exact(&mut len)) => match res {
                Ok(Ok(_)) => {}
                _ => return,
            },
        }
        slot.conn.idle_since.store(BUSY, Ordering::Relaxed);
        req.resize(usize::from(u16::from_be_bytes(len)), 0);
        tokio::select! {
            _ = close.cancelled() => return,
            res = tokio::time::timeout(slot.table.read_timeout(), r.read_exact(&mut req)) => match res {
                Ok(Ok(_)) => {}
                _ => return,
            },
        }
        // Transfers and TSIG-signed queries (xfr.rs, the message read once), then the
        // ordinary path. Transfers are rendered off the async workers, a few at a time; the
        // permit is held until the messages are written (each holds a whole zone). Without
        // keys or an allow-list the refusal is answered here, without queueing for a permit.
        let mut permit = None;
        let special = match super::xfr::scan(&req) {
            Some(r) if r.is_transfer() && catalog.transfers_enabled() => {
                tokio::select! {
                    _ = close.cancelled() => return,
                    p = xfr.clone().acquire_owned() => match p {
                        Ok(p) => permit = Some(p),
                        Err(_) => return,
                    },
                }
                let (c, q) = (catalog.clone(), std::mem::take(&mut req));
                let job = tokio::task::spawn_blocking(move || {
                    let shard = &c.stats.shards[SHARDS - 1];
                    c.respond_scanned(&q, r, true, peer, &mut Scratch::new(0), shard)
                });
                match job.await {
                    Ok(m) => m,
                    Err(_) => return,
                }
            }
            Some(r) => catalog.respond_scanned(&req, r, true, peer, &mut scratch, shard),
            None => None,
        };
        let msgs: Vec<&[u8]> = match &special {
            Some(m) => m.iter().map(Vec::as_slice).collect(),
            None => match catalog.respond(&req, true, peer, &mut out, &mut scratch, shard) {
                Some(_) => vec![out.as_slice()],
                None => vec![],
            },
        };
        // A client that stops reading is busy (never closed to make room): each message and
        // the flush get the read timeout, so it cannot hold its slot for long.
        for m in msgs {
            let Some(n) = length_prefix(m) else {
                // Answers are built to fit; a wrong prefix would garble this answer and
                // every one after it on the connection, so close it instead.
                tracing::error!(
                    %peer,
                    len = m.len(),
                    "dns tcp: answer longer than a TCP message, closing"
                );
                return;
            };
            let write = async {
                w.write_all(&n).await?;
                w.write_all(m).await
            };
            if !bounded(&close, slot.table.read_timeout(), write).await {
                return;
            }
        }
        // Pipelined queries already buffered whole are answered before flushing (not
        // behind a query of which only a part has arrived).
        if !whole_message(r.buffer())
            && !bounded(&close, slot.table.read_timeout(), w.flush()).await
        {
            return;
        }
        drop(permit);
    }
}

/// The two-byte length sent before a message over TCP (RFC 1035 4.2.2); None for a
/// message longer than the 65,535 bytes it can say.
fn length_prefix(m: &[u8]) -> Option<[u8; 2]> {
    u16::try_from(m.len()).ok().map(u16::to_be_bytes)
}

/// Whether `buf` starts with a whole length-prefixed message.
fn whole_message(buf: &[u8]) -> bool {
    match buf {
        [a, b, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*a, *b])),
        _ => false,
    }
}

/// Runs a write for at most `limit`, giving up when `close` is cancelled: false when it
/// failed, timed out or was cancelled.
async fn bounded(
    close: &CancellationToken,
    limit: Duration,
    write: impl Future<Output = io::Result<()>>,
) -> bool {
    tokio::select! {
        _ = close.cancelled() => false,
        r = tokio::time::timeout(limit, write) => matches!(r, Ok(Ok(()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> TcpLimits {
        TcpLimits {
            max_connections: max,
            idle_timeout: Duration::from_secs(10),
            pressure_idle_timeout: Duration::from_secs(1),
        }
    }

    /// A client address of network `n` (each its own /24).
    fn ip(n: u8) -> IpAddr {
        IpAddr::from([198, 51, n, 7])
    }

    fn busy(slot: &Slot) {
        slot.conn.idle_since.store(BUSY, Ordering::Relaxed);
    }

    /// A message longer than a TCP message has no length prefix (it never gets one that
    /// wrapped around and would desynchronise the connection).
    #[test]
    fn no_length_prefix_for_an_oversized_message() {
        assert_eq!(length_prefix(&[0; 300]), Some([1, 44]));
        assert_eq!(length_prefix(&vec![0; TCP_MAX]), Some([0xFF, 0xFF]));
        assert_eq!(length_prefix(&vec![0; TCP_MAX + 1]), None);
        assert_eq!(length_prefix(&vec![0; TCP_MAX + 67]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_closes_the_longest_idle_connection_never_a_busy_one() {
        let table = ConnTable::new(limits(3));
        let shutdown = CancellationToken::new();
        let a = table.admit(Instant::now(), ip(1), &shutdown).0.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        let b = table.admit(Instant::now(), ip(2), &shutdown).0.unwrap();
        let c = table.admit(Instant::now(), ip(3), &shutdown).0.unwrap();
        busy(&a);
        // Full: b (idle since 100 ms, the longest among idle ones) makes room.
        let (d, closed) = table.admit(Instant::now(), ip(4), &shutdown);
        assert_eq!(closed, 1);
        assert!(d.is_ok());
        assert!(b.conn.close.is_cancelled());
        assert!(!a.conn.close.is_cancelled() && !c.conn.close.is_cancelled());
        // Every connection busy: the new one is refused and nobody is closed.
        busy(&c);
        busy(d.as_ref().unwrap());
        let (e, closed) = table.admit(Instant::now(), ip(5), &shutdown);
        assert_eq!(e.err(), Some(Refused::Full));
        assert_eq!(closed, 0);
        drop(b);
        assert_eq!(table.len.load(Ordering::Relaxed), 3, "b left on eviction");
        drop(a);
        assert!(table.admit(Instant::now(), ip(6), &shutdown).0.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_the_idle_timeout_is_the_shorter_one() {
        let table = ConnTable::new(limits(8));
        let shutdown = CancellationToken::new();
        let mut slots: Vec<Slot> = (0..5)
            .map(|k| {
                table
                    .admit(Instant::now(), ip(10 + k), &shutdown)
                    .0
                    .unwrap()
            })
            .collect();
        assert_eq!(table.idle_timeout(), Duration::from_secs(10));
        slots.push(table.admit(Instant::now(), ip(7), &shutdown).0.unwrap());
        assert_eq!(
            table.idle_timeout(),
            Duration::from_secs(1),
            "6 of 8: pressure"
        );
        assert_eq!(table.read_timeout(), Duration::from_secs(1));
        busy(&slots[0]);
        tokio::time::advance(Duration::from_millis(1500)).await;
        // Admitting under pressure closes what has idled past the short timeout.
        let (_new, closed) = table.admit(Instant::now(), ip(8), &shutdown);
        assert_eq!(closed, 5);
        assert!(!slots[0].conn.close.is_cancelled());
        assert!(slots[1..].iter().all(|s| s.conn.close.is_cancelled()));
        assert_eq!(table.len.load(Ordering::Relaxed), 2);
        assert_eq!(table.idle_timeout(), Duration::from_secs(10));
        assert_eq!(table.read_timeout(), TCP_READ);
    }

    /// One source network cannot hold more than its share of the table: past it, its new
    /// connection takes the place of its own longest-idle one, or is closed when they are
    /// all busy (slowly sent queries), while other networks are still admitted.
    #[tokio::test(start_paused = true)]
    async fn one_network_holds_at_most_its_share_of_the_table() {
        let table = ConnTable::new(limits(16));
        assert_eq!(table.limits.per_prefix(), 4);
        assert_eq!(TcpLimits::default().per_prefix(), 64);
        let shutdown = CancellationToken::new();
        let admit = |ip: &str| table.admit(Instant::now(), ip.parse().unwrap(), &shutdown);
        let mut held: Vec<Slot> = (1..=4)
            .map(|k| admit(&format!("192.0.2.{k}")).0.unwrap())
            .collect();
        held.iter().for_each(busy);
        let (r, closed) = admit("192.0.2.200");
        assert_eq!((r.err(), closed), (Some(Refused::Prefix), 0));
        let other = admit("192.0.3.1").0.unwrap();
        // One of its own idle: that one makes room, not the other network's (idle longer).
        tokio::time::advance(Duration::from_millis(10)).await;
        let now = table.millis(Instant::now());
        held[2].conn.idle_since.store(now, Ordering::Relaxed);
        let (r, closed) = admit("192.0.2.201");
        assert_eq!(closed, 1);
        assert!(held[2].conn.close.is_cancelled());
        assert!(!other.conn.close.is_cancelled());
        held[2] = r.unwrap();
        busy(&held[2]);
        // The same /24 through a dual-stack socket counts with it.
        assert_eq!(admit("::ffff:192.0.2.9").0.err(), Some(Refused::Prefix));
        // IPv6 by /56.
        let v6: Vec<Slot> = (0..4)
            .map(|k| admit(&format!("2001:db8:0:{k:x}::1")).0.unwrap())
            .collect();
        v6.iter().for_each(busy);
        assert_eq!(admit("2001:db8:0:ff::9").0.err(), Some(Refused::Prefix));
        assert!(admit("2001:db8:0:100::1").0.is_ok());
        // Loopback (a local forwarder) is not capped.
        let local: Vec<Slot> = (0..5).map(|_| admit("127.0.0.1").0.unwrap()).collect();
        assert_eq!(table.len.load(Ordering::Relaxed), 4 + 1 + 4 + 5);
        drop(local);
    }

    /// A query for `ns.` A with its length prefix (REFUSED: the catalog has no zones).
    fn framed_query() -> Vec<u8> {
        let mut q = vec![0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x02ns\x00\x00\x01\x00\x01");
        let mut m = (q.len() as u16).to_be_bytes().to_vec();
        m.extend_from_slice(&q);
        m
    }

    /// Serves one in-memory connection from `peer` in `table`: the client's side, the
    /// connection as the table sees it, and the task.
    fn connect(
        table: &Arc<ConnTable>,
        peer: IpAddr,
        shutdown: &CancellationToken,
    ) -> (
        tokio::io::DuplexStream,
        Arc<Conn>,
        tokio::task::JoinHandle<()>,
    ) {
        let catalog = Arc::new(Catalog::new(crate::dns::DnsConfig::default()).unwrap());
        let slot = table.admit(Instant::now(), peer, shutdown).0.unwrap();
        let conn = slot.conn.clone();
        let (client, server) = tokio::io::duplex(4096);
        let (r, w) = tokio::io::split(server);
        let xfr = Arc::new(tokio::sync::Semaphore::new(1));
        let task = tokio::spawn(tcp_conn(r, w, peer, catalog, slot, xfr));
        (client, conn, task)
    }

    /// Sends a query and `more` bytes of the next one, and reads the answer.
    async fn ask(client: &mut tokio::io::DuplexStream, more: &[u8]) {
        let mut m = framed_query();
        m.extend_from_slice(more);
        client.write_all(&m).await.unwrap();
        let mut len = [0u8; 2];
        client.read_exact(&mut len).await.expect("answered");
        let mut answer = vec![0; usize::from(u16::from_be_bytes(len))];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[3] & 0xF, 5, "REFUSED");
        // The connection goes on to wait for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// One byte of the next query's length sent after each answer does not make a
    /// connection busy (it would hold its slot for the idle timeout, never closed to make
    /// room); the whole length does. The answer is not held back behind that byte.
    #[tokio::test(start_paused = true)]
    async fn one_byte_of_the_next_length_leaves_a_connection_idle() {
        let table = ConnTable::new(limits(1));
        let shutdown = CancellationToken::new();
        let (mut client, conn, task) = connect(&table, ip(1), &shutdown);
        ask(&mut client, &[0]).await;
        assert_ne!(conn.idle_since.load(Ordering::Relaxed), BUSY);
        // Full: it makes room for a new client.
        let (new, closed) = table.admit(Instant::now(), ip(2), &shutdown);
        assert_eq!(closed, 1);
        assert!(conn.close.is_cancelled());
        task.await.unwrap();
        drop(new);
        // With the whole length it is busy: a new client finds no room.
        let (mut client, conn, _task) = connect(&table, ip(3), &shutdown);
        ask(&mut client, &framed_query()[..2]).await;
        assert_eq!(conn.idle_since.load(Ordering::Relaxed), BUSY);
        let (new, closed) = table.admit(Instant::now(), ip(4), &shutdown);
        assert_eq!((new.err(), closed), (Some(Refused::Full), 0));
    }

    #[test]
    fn whole_message_needs_its_length_and_body() {
        assert!(!whole_message(&[]));
        assert!(!whole_message(&[0]));
        assert!(!whole_message(&[0, 3, 1, 2]));
        assert!(whole_message(&[0, 3, 1, 2, 3]));
        assert!(whole_message(&[0, 0]));
        assert!(whole_message(&[0, 1, 1, 0]));
    }
}
