//! Connection exhaustion against the real binary: 1,100 idle or half-sent HTTP connections
//! to a server whose open-file limit is 400 must not stop `/health`, registrations or DNS
//! over TCP.

use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::{Http, Server};

const CLIENTS: usize = 1_100;

/// Raises this test process's open-file limit to hold `need` sockets; false (with a loud
/// SKIP, or a failure on CI) when the hard limit is too low.
fn room_for(need: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= need {
        return true;
    }
    if hard >= need && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI needs an open-file hard limit of {need} (is {hard})"
    );
    eprintln!("SKIP: open-file hard limit {hard} < {need}; connection exhaustion test not run");
    false
}

async fn dns_tcp_a(server: &Server, name: &str) -> Message {
    let mut q = Message::query();
    q.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).unwrap(),
        RecordType::A,
    ));
    let q = q.to_vec().unwrap();
    let mut s = TcpStream::connect(server.dns).await.unwrap();
    let mut wire = (q.len() as u16).to_be_bytes().to_vec();
    wire.extend_from_slice(&q);
    s.write_all(&wire).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_do_not_stop_health_registrations_or_dns_tcp() {
    if !room_for(CLIENTS as u64 + 256) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_ulimit(dir.path(), &[], "-n 400");
    let http = Http::new(server.url());
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..CLIENTS {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(server.http)).await
        else {
            // A full accept queue (the server not accepting) drops SYNs: stop there.
            refused += 1;
            if refused == 3 {
                break;
            }
            continue;
        };
        if i % 2 == 1 {
            let _ = s
                .write_all(b"PUT /v1/namespaces/x/membranes/y HTTP/1.1\r\nhost: x\r\n")
                .await;
        }
        held.push(s);
    }
    let (s, v) = tokio::time::timeout(Duration::from_secs(5), http.call("GET", "/health", None))
        .await
        .expect("/health not answered within 5 s")
        .unwrap();
    assert_eq!((s, &v["status"]), (200, &serde_json::json!("ok")), "{v}");
    let body = r#"{"addresses":["10.0.0.11"],"services":[{"name":"visual","port":7101}]}"#;
    let (s, v) = tokio::time::timeout(
        Duration::from_secs(5),
        http.call(
            "PUT",
            "/v1/namespaces/cognitive-system/membranes/visual-worker-1",
            Some(body),
        ),
    )
    .await
    .expect("registration not answered within 5 s")
    .unwrap();
    assert_eq!(s, 201, "{v}");
    // DNS over TCP answers; the zone follows the registration within moments.
    let m = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = dns_tcp_a(&server, "visual-worker-1.cognitive-system.").await;
            if !m.answers.is_empty() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("DNS over TCP not answered within 5 s");
    assert_eq!(m.answers.len(), 1, "{m:?}");
    drop(held);
    assert!(server.terminate().success());
}

/// `Max open files` (soft, hard) of a process, from /proc.
fn open_files(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    (v[3].to_string(), v[4].to_string())
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_ulimit(dir.path(), &[], "-S -n 256");
    let (soft, hard) = open_files(server.child.id());
    assert_eq!(soft, hard, "soft limit left at {soft} (hard {hard})");
    assert_ne!(soft, "256");
}
