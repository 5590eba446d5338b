//! The DNS loops on threads of their own: a dedicated tokio runtime, so that a busy HTTP
//! API (or anything else on the main runtime) never delays a DNS answer. The sockets are
//! moved over (deregistered from the caller's runtime, registered with the DNS one), so
//! their readiness is also polled on the DNS threads.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::Catalog;
use super::server::serve;

/// Serves DNS like [`serve`], but on `threads` worker threads of a runtime of its own
/// (named `dns`). Returns a future that resolves once `shutdown` was cancelled and the
/// DNS runtime has stopped. Must be called within a tokio runtime (the sockets' own).
pub fn serve_on_own_threads(
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    catalog: Arc<Catalog>,
    shutdown: CancellationToken,
    threads: usize,
) -> io::Result<impl Future<Output = io::Result<()>>> {
    let udp = udp
        .into_iter()
        .map(|s| s.into_std())
        .collect::<io::Result<Vec<_>>>()?;
    let tcp = tcp
        .into_iter()
        .map(|l| l.into_std())
        .collect::<io::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("dns")
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dns-main".into())
        .spawn(move || {
            let res = rt.block_on(async move {
                let udp = udp
                    .into_iter()
                    .map(UdpSocket::from_std)
                    .collect::<io::Result<Vec<_>>>()?;
                let tcp = tcp
                    .into_iter()
                    .map(TcpListener::from_std)
                    .collect::<io::Result<Vec<_>>>()?;
                serve(udp, tcp, catalog, shutdown).await
            });
            // `serve` joined its tasks; nothing should be left, but never wait long.
            rt.shutdown_timeout(Duration::from_secs(1));
            let _ = tx.send(res);
        })?;
    Ok(async move {
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the DNS thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{DnsConfig, bind_udp};

    /// With the caller's runtime thread blocked (a stand-in for a runtime saturated by
    /// HTTP work), DNS still answers: it runs on threads of its own. Served on the caller's
    /// runtime instead, the query would get no answer.
    #[tokio::test(flavor = "current_thread")]
    async fn dns_answers_while_the_main_runtime_is_blocked() {
        let catalog = Arc::new(Catalog::new(DnsConfig::default()).unwrap());
        let udp = bind_udp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = udp[0].local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let done = serve_on_own_threads(udp, Vec::new(), catalog, shutdown.clone(), 1).unwrap();
        let client = std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Any well-formed query: REFUSED (no zones) is an answer.
            let q = [
                0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'x', 0, 0, 1, 0, 1,
            ];
            s.send_to(&q, addr).unwrap();
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec())
        });
        // Block this (the only) thread of the caller's runtime until the client is done.
        let answer = client.join().unwrap();
        let answer = answer.expect("an answer while the main runtime was blocked");
        assert_eq!(&answer[..2], &[0x12, 0x34]);
        assert_eq!(answer[3] & 0xF, 5, "REFUSED");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("the DNS runtime stops on shutdown")
            .unwrap();
    }
}
