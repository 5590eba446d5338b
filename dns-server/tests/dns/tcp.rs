//! DNS over TCP under connection pressure: clients that connect and send nothing (or half
//! a length) must not lock new clients out (RFC 7766 6.2.3: close idle connections first).

use std::time::Duration;

use dns_server::dns::{DnsConfig, TcpLimits};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Server, cog, query_bytes, tcp};

/// Raises this process's open-file limit to hold `need` descriptors; false (with a loud
/// SKIP, or a failure on CI) when the hard limit is too low.
fn room_for(need: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= need || (hard >= need && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok()) {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI needs an open-file hard limit of {need} (is {hard})"
    );
    eprintln!("SKIP: open-file hard limit {hard} < {need}; DNS TCP lockout test not run");
    false
}

/// 1,100 silent clients (more than the default cap of 1,024), then a real query: it is
/// answered, and the clients that made room were idle ones (their sockets read EOF).
#[tokio::test]
async fn idle_clients_beyond_the_cap_do_not_lock_out_a_new_client() {
    const CLIENTS: usize = 1_100;
    let limits = TcpLimits::default();
    // Both ends of every connection live in this process.
    if !room_for((CLIENTS + limits.max_connections + 256) as u64) {
        return;
    }
    let srv = Server::start_with(DnsConfig::default(), &[cog()], limits).await;
    let mut idle = Vec::new();
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        if i % 2 == 0 {
            // Half a length prefix: still waiting for a query.
            s.write_all(&[0]).await.unwrap();
        }
        idle.push(s);
    }
    let (_, q) = query_bytes("web-1.cog.", RecordType::A, None, true);
    let mut busy = TcpStream::connect(srv.addr).await.unwrap();
    busy.write_all(&(q.len() as u16).to_be_bytes())
        .await
        .unwrap();
    busy.write_all(&q[..4]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    for _ in 0..3 {
        let m = tcp(srv.addr, "web-1.cog.", RecordType::A).await;
        assert_eq!(m.answers.len(), 1);
    }
    busy.write_all(&q[4..]).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), busy.read_exact(&mut len))
        .await
        .expect("the busy connection is answered")
        .expect("the busy connection was not closed");
    // The oldest idle connections were closed to make room.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), idle[0].read(&mut buf))
        .await
        .expect("the oldest idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    srv.stop().await;
}

/// Clients that pipeline queries for a large answer and never read: once the socket
/// buffers are full their connections are busy writing. Without a bound on writes they
/// hold their slots forever and every new client is closed; with it they are closed after
/// the (pressure) read timeout and a new client is answered.
#[tokio::test]
async fn clients_that_stop_reading_do_not_hold_their_slots() {
    let limits = TcpLimits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(10),
        pressure_idle_timeout: Duration::from_millis(300),
    };
    let srv = Server::start_with(
        DnsConfig::default(),
        &[crate::common::many("big", "web", 60)],
        limits,
    )
    .await;
    let (_, q) = query_bytes("_web._tcp.big.", RecordType::SRV, None, true);
    let mut pipelined = Vec::new();
    for _ in 0..8_000 {
        pipelined.extend_from_slice(&(q.len() as u16).to_be_bytes());
        pipelined.extend_from_slice(&q);
    }
    // Two stalled readers take both slots (each answer is a few KB: megabytes queue up).
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(srv.addr).await.unwrap();
        let _ = s.set_nodelay(true);
        let (rd, mut wr) = s.into_split();
        let data = pipelined.clone();
        // Writing may block once the server stops reading; do it in the background.
        tokio::spawn(async move {
            let _ = wr.write_all(&data).await;
            std::future::pending::<()>().await;
            drop(wr);
        });
        stalled.push(rd);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new client is answered within a few pressure timeouts.
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&q).await.unwrap();
            let mut len = [0u8; 2];
            match tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut len)).await {
                Ok(Ok(_)) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "clients that never read locked a new client out"
    );
    drop(stalled);
    srv.stop().await;
}
