//! Sockets: one receive loop per UDP socket answering from the pre-rendered zones, and an
//! RFC 7766 TCP server (several queries per connection, pipelining, idle timeout).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Catalog;
use super::query::{Scratch, TCP_MAX};
use super::stats::SHARDS;

/// A TCP connection without a new query for this long is closed (RFC 7766 6.2.3).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Time allowed to receive the rest of a message once its length arrived.
const TCP_READ: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed on accept.
const TCP_MAX_CONNECTIONS: usize = 1024;
/// Zone transfers rendered at once (each holds a whole zone in memory); more wait.
const XFR_CONCURRENT: usize = 4;
/// Rendered answers at membranes' own names kept per UDP loop (a few hundred bytes each).
const UDP_ANSWER_CACHE: usize = 4096;
/// The same per TCP connection (up to `TCP_MAX_CONNECTIONS` of them).
const TCP_ANSWER_CACHE: usize = 32;

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

/// Serves DNS on the given sockets until `shutdown` is cancelled.
pub async fn serve(
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut set = JoinSet::new();
    for (i, sock) in udp.into_iter().enumerate() {
        set.spawn(udp_loop(sock, catalog.clone(), i % (SHARDS - 1)));
    }
    for l in tcp {
        set.spawn(tcp_accept(l, catalog.clone(), shutdown.clone()));
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
        let special = catalog.respond_special(&buf[..n], false, peer.ip(), &mut scratch, shard);
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

async fn tcp_accept(listener: TcpListener, catalog: Arc<Catalog>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    let xfr = Arc::new(tokio::sync::Semaphore::new(XFR_CONCURRENT));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    if conns.len() >= TCP_MAX_CONNECTIONS {
                        tracing::warn!(%peer, "dns tcp: too many connections, closing");
                        continue;
                    }
                    conns.spawn(tcp_conn(stream, catalog.clone(), xfr.clone(), shutdown.clone()));
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

async fn tcp_conn(
    stream: TcpStream,
    catalog: Arc<Catalog>,
    xfr: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    let (r, w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let mut req = Vec::new();
    let mut out = Vec::with_capacity(TCP_MAX);
    let mut scratch = Scratch::new(TCP_ANSWER_CACHE);
    let shard = &catalog.stats.shards[SHARDS - 1];
    loop {
        let mut len = [0u8; 2];
        tokio::select! {
            _ = shutdown.cancelled() => return,
            res = tokio::time::timeout(TCP_IDLE, r.read_exact(&mut len)) => match res {
                Ok(Ok(_)) => {}
                _ => return,
            },
        }
        req.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(TCP_READ, r.read_exact(&mut req)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        // Transfers are rendered off the async workers, a few at a time.
        let special = if super::xfr::is_transfer(&req) {
            let Ok(permit) = xfr.clone().acquire_owned().await else {
                return;
            };
            let (c, q) = (catalog.clone(), std::mem::take(&mut req));
            let job = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let shard = &c.stats.shards[SHARDS - 1];
                c.respond_special(&q, true, peer, &mut Scratch::new(0), shard)
            });
            match job.await {
                Ok(m) => m,
                Err(_) => return,
            }
        } else {
            catalog.respond_special(&req, true, peer, &mut scratch, shard)
        };
        let msgs: Vec<&[u8]> = match &special {
            Some(m) => m.iter().map(Vec::as_slice).collect(),
            None => match catalog.respond(&req, true, peer, &mut out, &mut scratch, shard) {
                Some(_) => vec![out.as_slice()],
                None => vec![],
            },
        };
        for m in msgs {
            let n = (m.len() as u16).to_be_bytes();
            if w.write_all(&n).await.is_err() || w.write_all(m).await.is_err() {
                return;
            }
        }
        // Pipelined queries already buffered are answered before flushing.
        if r.buffer().is_empty() && w.flush().await.is_err() {
            return;
        }
    }
}
