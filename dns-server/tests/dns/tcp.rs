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
