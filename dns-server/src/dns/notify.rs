//! NOTIFY (RFC 1996): tells the configured secondaries that a zone changed, so they
//! transfer it at once instead of at their next refresh.
//!
//! Zone updates mark the zone; after a short debounce each secondary's worker sends one
//! NOTIFY per marked zone (the SOA with the current serial in the answer section, signed
//! with the first TSIG key when keys are configured) and waits for the reply, retrying a few
//! times with a growing timeout. Changes arriving meanwhile are coalesced: a worker holds at
//! most one pending entry per zone.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::Catalog;
use super::tsig::Signer;
use super::wire::{Writer, skip_name};

/// Changes closer together than this are sent as one NOTIFY.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Reply timeout of the first try; doubled for each retry.
const FIRST_TIMEOUT: Duration = Duration::from_millis(500);
/// Tries per zone and secondary.
const TRIES: u32 = 5;

/// Zones waiting for a NOTIFY, per secondary.
#[derive(Default)]
pub(crate) struct Queue {
    targets: Vec<Target>,
}

struct Target {
    addr: SocketAddr,
    pending: Mutex<HashSet<String>>,
    wake: tokio::sync::Notify,
}

impl Queue {
    pub(crate) fn new(addrs: &[SocketAddr]) -> Self {
        Queue {
            targets: addrs
                .iter()
                .map(|a| Target {
                    addr: *a,
                    pending: Mutex::default(),
                    wake: tokio::sync::Notify::new(),
                })
                .collect(),
        }
    }

    /// Zone `ns` changed.
    pub(crate) fn changed(&self, ns: &str) {
        for t in &self.targets {
            t.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ns.to_string());
            t.wake.notify_one();
        }
    }
}

/// Sends NOTIFYs until `shutdown` (returns at once without secondaries).
pub async fn run_notify(catalog: Arc<Catalog>, shutdown: CancellationToken) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..catalog.notify.targets.len() {
        set.spawn(worker(catalog.clone(), i, shutdown.clone()));
    }
    while set.join_next().await.is_some() {}
}

async fn worker(catalog: Arc<Catalog>, i: usize, shutdown: CancellationToken) {
    let t = &catalog.notify.targets[i];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = t.wake.notified() => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        loop {
            let zones: Vec<String> = {
                let mut p = t.pending.lock().unwrap_or_else(|e| e.into_inner());
                p.drain().collect()
            };
            if zones.is_empty() {
                break;
            }
            for ns in zones {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = notify_zone(&catalog, t, &ns) => {
                        if let Err(e) = r {
                            tracing::warn!(secondary = %t.addr, zone = ns, error = e, "dns NOTIFY not acknowledged");
                        }
                    }
                }
            }
        }
    }
}

impl Catalog {
    /// NOTIFY for zone `ns` (without id and TSIG): the apex SOA question and the current SOA.
    fn notify_message(&self, ns: &str) -> Option<Vec<u8>> {
        let snap = self.history.current(ns)?;
        let z = super::records::soa_of(&snap, &self.naming);
        let apex = self.naming.apex(ns);
        let mut m = vec![0, 0, 0x24, 0, 0, 1, 0, 1, 0, 0, 0, 0];
        m.extend_from_slice(&apex);
        m.extend_from_slice(&[0, 6, 0, 1]);
        let mut w = Writer::new(&[]);
        w.record(&apex, snap.settings.record_ttl, &z);
        m.extend_from_slice(&w.out);
        Some(m)
    }
}

/// Sends the NOTIFY of zone `ns` to `t` until a matching reply arrives or the tries are
/// used up. A newer change of the zone meanwhile is sent at once (its serial) as the next
/// try: a zone that keeps changing for a secondary that never answers still ends its round
/// after [`TRIES`] sends, and the secondary's other zones get their turn.
async fn notify_zone(catalog: &Catalog, t: &Target, ns: &str) -> Result<(), String> {
    let addr = t.addr;
    let key = catalog.transfer.keys.first();
    let bind: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let mut timeout = FIRST_TIMEOUT;
    let mut last = String::from("no reply");
    let mut tries = 0;
    'tries: while tries < TRIES {
        tries += 1;
        // Built at each try: the zone's current serial.
        let Some(mut msg) = catalog.notify_message(ns) else {
            return Ok(());
        };
        let id: u16 = rand::random();
        msg[0..2].copy_from_slice(&id.to_be_bytes());
        let signer = key.map(|k| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut s = Signer::for_request(k, now);
            s.sign(&mut msg);
            s
        });
        match sock.send_to(&msg, addr).await {
            Ok(_) => tracing::debug!(secondary = %addr, zone = ns, tries, "dns NOTIFY sent"),
            Err(e) => last = e.to_string(),
        }
        let deadline = tokio::time::Instant::now() + timeout;
        timeout *= 2;
        loop {
            let r = tokio::select! {
                r = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)) => r,
                _ = t.wake.notified() => {
                    // With no try left the change stays queued: the next round sends it,
                    // after the secondary's other zones.
                    let again = tries < TRIES
                        && t
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(ns);
                    if again {
                        continue 'tries;
                    }
                    // Another zone: its turn comes after this one.
                    continue;
                }
            };
            let Ok(Ok((n, from))) = r else { break };
            let b = &buf[..n];
            if from != addr || n < 12 || b[0..2] != id.to_be_bytes() || b[2] & 0xF8 != 0xA0 {
                continue;
            }
            let rcode = b[3] & 0xF;
            if let Some(s) = &signer
                && !reply_signed_by(s, b)
            {
                last = format!("reply rcode {rcode} without a valid TSIG signature");
                break;
            }
            if rcode != 0 {
                return Err(format!("refused with rcode {rcode}"));
            }
            tracing::debug!(secondary = %addr, zone = ns, "dns NOTIFY acknowledged");
            return Ok(());
        }
    }
    Err(last)
}

/// Whether the reply's last record is a TSIG that checks against our request's MAC.
fn reply_signed_by(s: &Signer, b: &[u8]) -> bool {
    let count: usize = [6, 8, 10]
        .iter()
        .map(|&i| usize::from(u16::from_be_bytes([b[i], b[i + 1]])))
        .sum();
    let mut i = 12;
    // The question.
    for _ in 0..u16::from_be_bytes([b[4], b[5]]) {
        let Some(j) = skip_name(b, i) else {
            return false;
        };
        i = j + 4;
    }
    let mut last = None;
    for _ in 0..count {
        let Some(j) = skip_name(b, i) else {
            return false;
        };
        if j + 10 > b.len() {
            return false;
        }
        last = Some(i);
        i = j + 10 + usize::from(u16::from_be_bytes([b[j + 8], b[j + 9]]));
    }
    last.is_some_and(|at| s.verify_response(b, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{DnsConfig, TransferConfig, TsigKey, tsig};
    use crate::snapshot::NamespaceSnapshot;
    use shared::{NamespaceName, NamespaceSettings};

    const KEY: &str = "xfr-key:hmac-sha256:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    /// A secondary that never acknowledges zone `a`, which keeps changing: `a`'s rounds
    /// still end after [`TRIES`] sends, so zone `b` of the same secondary is notified
    /// meanwhile (it waited for `a` to go quiet, for ever if it never did).
    #[tokio::test(start_paused = true)]
    async fn a_zone_that_keeps_changing_does_not_starve_the_others() {
        let peer = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let catalog = Arc::new(Catalog::new(DnsConfig::default()).unwrap().with_transfer(
            TransferConfig {
                keys: vec![],
                allow: vec!["127.0.0.0/8".parse().unwrap()],
                notify: vec![peer.local_addr().unwrap()],
            },
        ));
        let zone = |name: &str, serial| NamespaceSnapshot {
            name: NamespaceName::new(name).unwrap(),
            settings: NamespaceSettings::default(),
            instances: vec![],
            serial,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Vec<u8>)>();
        let secondary = {
            let peer = peer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    let (n, from) = peer.recv_from(&mut buf).await.unwrap();
                    let name = buf[13..13 + usize::from(buf[12])].to_vec();
                    // `b` is acknowledged, `a` never.
                    if name == b"b" {
                        let mut reply = buf[..n].to_vec();
                        reply[2] |= 0x80;
                        peer.send_to(&reply, from).await.unwrap();
                    }
                    let _ = tx.send((name, buf[..n].to_vec()));
                }
            })
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_notify(catalog.clone(), shutdown.clone()));
        catalog.update(&zone("a", 1));
        assert_eq!(rx.recv().await.unwrap().0, b"a");
        catalog.update(&zone("b", 1));
        // `a` changes every 300 ms for a minute; `b` must get its NOTIFY meanwhile.
        let mut serial = 1;
        let mut got_b = false;
        let mut sent_a = 1;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            serial += 1;
            catalog.update(&zone("a", serial));
            while let Ok((name, _)) = rx.try_recv() {
                got_b |= name == b"b";
                sent_a += usize::from(name == b"a");
            }
            if got_b {
                break;
            }
        }
        assert!(
            got_b,
            "b never notified while a kept changing ({sent_a} NOTIFYs of a)"
        );
        shutdown.cancel();
        task.await.unwrap();
        secondary.abort();
    }

    /// A change made while a silent secondary's round is on its last try is not lost: it
    /// stays queued and the next round announces it.
    #[tokio::test(start_paused = true)]
    async fn a_change_during_the_last_try_is_announced_by_the_next_round() {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let catalog = Arc::new(Catalog::new(DnsConfig::default()).unwrap().with_transfer(
            TransferConfig {
                keys: vec![],
                allow: vec!["127.0.0.0/8".parse().unwrap()],
                notify: vec![peer.local_addr().unwrap()],
            },
        ));
        let zone = |serial| NamespaceSnapshot {
            name: NamespaceName::new("a").unwrap(),
            settings: NamespaceSettings::default(),
            instances: vec![],
            serial,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_notify(catalog.clone(), shutdown.clone()));
        catalog.update(&zone(1));
        let mut buf = [0u8; 1024];
        // The round's tries (never answered), then a change during the last one's wait.
        for _ in 0..TRIES {
            tokio::time::timeout(Duration::from_secs(120), peer.recv_from(&mut buf))
                .await
                .expect("a NOTIFY")
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        catalog.update(&zone(2));
        loop {
            let (n, _) = tokio::time::timeout(Duration::from_secs(120), peer.recv_from(&mut buf))
                .await
                .expect("the change announced")
                .unwrap();
            if buf[..n].windows(4).any(|w| w == 2u32.to_be_bytes()) {
                break;
            }
        }
        shutdown.cancel();
        task.await.unwrap();
    }

    /// A silent secondary gets the NOTIFY again with a growing timeout; once it answers
    /// (signed) nothing more is sent. The NOTIFY carries the zone's SOA and our signature.
    #[tokio::test(start_paused = true)]
    async fn notify_is_signed_and_retried_until_acknowledged() {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let key: TsigKey = KEY.parse().unwrap();
        let catalog = Arc::new(Catalog::new(DnsConfig::default()).unwrap().with_transfer(
            TransferConfig {
                keys: vec![key.clone()],
                allow: vec![],
                notify: vec![peer.local_addr().unwrap()],
            },
        ));
        catalog.update(&NamespaceSnapshot {
            name: NamespaceName::new("ns").unwrap(),
            settings: NamespaceSettings::default(),
            instances: vec![],
            serial: 4242,
        });
        let unsigned_len = catalog.notify_message("ns").unwrap().len();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_notify(catalog.clone(), shutdown.clone()));
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 1024];
        let mut times = Vec::new();
        for attempt in 0..3 {
            let (n, from) = tokio::time::timeout(Duration::from_secs(60), peer.recv_from(&mut buf))
                .await
                .expect("a NOTIFY (again)")
                .unwrap();
            times.push(start.elapsed());
            let req = &buf[..n];
            // Opcode NOTIFY, AA, question ns. SOA, the SOA with the serial in the answer.
            assert_eq!(req[2] & 0x7C, 0x24, "{req:?}");
            assert_eq!(&req[12..16], b"\x02ns\x00");
            assert!(
                req[..unsigned_len]
                    .windows(4)
                    .any(|w| w == 4242u32.to_be_bytes())
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let mut signer = tsig::verify(req, unsigned_len, std::slice::from_ref(&key), now)
                .expect("the NOTIFY is signed with our key");
            if attempt == 2 {
                let mut reply = req[..unsigned_len].to_vec();
                reply[2] |= 0x80;
                reply[11] = 0; // no additional records
                signer.sign(&mut reply);
                peer.send_to(&reply, from).await.unwrap();
            }
        }
        // Timeouts of 0.5 s, then 1 s.
        assert!(times[1] - times[0] >= FIRST_TIMEOUT, "{times:?}");
        assert!(times[2] - times[1] >= FIRST_TIMEOUT * 2, "{times:?}");
        // Acknowledged: no further NOTIFY.
        let more = tokio::time::timeout(Duration::from_secs(60), peer.recv_from(&mut buf)).await;
        assert!(more.is_err(), "NOTIFY sent again after the acknowledgement");
        shutdown.cancel();
        task.await.unwrap();
    }
}
