//! SOA serials across restarts, and zone transfers (TSIG, allow-list) checked with `dig`,
//! an independent TSIG implementation.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use super::harness::{Http, Server};

/// A random 32-byte TSIG secret, base64 (the test's own, not a fixed one).
pub fn secret() -> String {
    let out = Command::new("sh")
        .args(["-c", "head -c 32 /dev/urandom | base64"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The zone's SOA serial as served over UDP.
pub async fn soa_serial(dns: SocketAddr, zone: &str) -> u32 {
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii(zone).unwrap(),
        RecordType::SOA,
    ));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..50 {
        sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
        {
            let r = Message::from_vec(&buf[..n]).unwrap();
            if let Some(RData::SOA(soa)) = r.answers.first().map(|a| &a.data) {
                return soa.serial;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no SOA for {zone} from {dns}");
}

/// Waits (10 s at most) until `name` has an A record over UDP: the zone rebuild that follows
/// an API answer is asynchronous.
pub async fn wait_served(dns: SocketAddr, name: &str) {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
            && Message::from_vec(&buf[..n]).is_ok_and(|r| !r.answers.is_empty())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} not served by {dns} within 10 s");
}

pub async fn register(http: &Http, ns: &str, id: &str, ip: &str, port: u16) {
    let body = format!(r#"{{"addresses":["{ip}"],"services":[{{"name":"web","port":{port}}}]}}"#);
    let (s, v) = http
        .call(
            "PUT",
            &format!("/v1/namespaces/{ns}/membranes/{id}?replace=true"),
            Some(&body),
        )
        .await
        .unwrap();
    assert!(s == 200 || s == 201, "{s} {v}");
}

/// RFC 1982 `a > b`.
fn serial_gt(a: u32, b: u32) -> bool {
    a != b && (a.wrapping_sub(b) as i32) > 0
}

/// Before the fix the serial restarted from the clock (seconds): 40 served changes within a
/// second or two put it ahead of the clock, and a restart went backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_serial_increases_across_restarts_and_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = None;
    for round in 0..3u16 {
        let server = Server::start(dir.path(), &[]);
        let http = Http::new(server.url());
        if round == 0 {
            register(&http, "serials", "m", "10.0.0.1", 1000).await;
        }
        let mut serial = soa_serial(server.dns, "serials.").await;
        if let Some(last) = last {
            assert!(
                serial_gt(serial, last),
                "round {round}: serial {serial} after the restart is not above {last}"
            );
        }
        // 40 changes, each served before the next.
        for i in 0..40 {
            register(&http, "serials", "m", "10.0.0.1", 2000 + round * 100 + i).await;
            let before = serial;
            for _ in 0..200 {
                serial = soa_serial(server.dns, "serials.").await;
                if serial != before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(serial_gt(serial, before), "change {i} not served");
        }
        last = Some(serial);
        if round == 1 {
            server.kill9();
        } else {
            assert!(server.terminate().success());
        }
    }
}

/// `dig` with `args`, or None (with a loud SKIP) when dig is not installed.
pub fn dig(dns: SocketAddr, args: &[&str]) -> Option<String> {
    if Command::new("dig").arg("-v").output().is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "dig is required on CI (tests/run.sh installs dnsutils)"
        );
        eprintln!("SKIP: dig not installed (apt-get install dnsutils); transfer test not run");
        return None;
    }
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+tries=1", "+time=3"])
        .args(args)
        .output()
        .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_transfers_need_tsig_or_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret();
    let key = format!("xfr-key:hmac-sha256:{secret}");
    let server = Server::start(dir.path(), &["--tsig-key", &key]);
    let http = Http::new(server.url());
    register(&http, "xfr", "m1", "10.0.0.1", 8001).await;
    register(&http, "xfr", "m2", "10.0.0.2", 8002).await;
    wait_served(server.dns, "m1.xfr.").await;
    wait_served(server.dns, "m2.xfr.").await;
    let Some(open) = dig(server.dns, &["xfr.", "AXFR"]) else {
        return;
    };
    // No key: refused, nothing of the zone.
    assert!(open.contains("Transfer failed"), "{open}");
    assert!(!open.contains("10.0.0.1"), "{open}");
    // The key: the whole zone, signed (dig checks each message's TSIG).
    let signed = dig(
        server.dns,
        &[
            "xfr.",
            "AXFR",
            "-y",
            &format!("hmac-sha256:xfr-key:{secret}"),
        ],
    )
    .unwrap();
    assert!(signed.contains("10.0.0.1"), "{signed}");
    assert!(signed.contains("XFR size"), "{signed}");
    assert!(
        !signed.contains("could not be validated") && !signed.contains("failed"),
        "{signed}"
    );
    // IXFR from the current serial: the SOA alone.
    let serial = soa_serial(server.dns, "xfr.").await;
    let ixfr = dig(
        server.dns,
        &[
            "xfr.",
            &format!("IXFR={serial}"),
            "+tcp",
            "-y",
            &format!("hmac-sha256:xfr-key:{secret}"),
        ],
    )
    .unwrap();
    assert!(ixfr.contains("XFR size: 1 records"), "{ixfr}");
    // Another secret under the same name: NOTAUTH (BADSIG), nothing of the zone.
    let forged = dig(
        server.dns,
        &[
            "xfr.",
            "AXFR",
            "-y",
            &format!("hmac-sha256:xfr-key:{}", self::secret()),
        ],
    )
    .unwrap();
    assert!(
        !forged.contains("10.0.0.1") && !forged.contains("XFR size"),
        "{forged}"
    );
    drop(server);

    // The allow-list alone (no key): loopback may transfer.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--xfr-allow", "127.0.0.0/8"]);
    let http = Http::new(server.url());
    register(&http, "xfr", "m1", "10.0.0.1", 8001).await;
    wait_served(server.dns, "m1.xfr.").await;
    let allowed = dig(server.dns, &["xfr.", "AXFR"]).unwrap();
    assert!(
        allowed.contains("10.0.0.1") && allowed.contains("XFR size"),
        "{allowed}"
    );
}
