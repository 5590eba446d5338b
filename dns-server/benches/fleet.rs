//! Fleet soak benchmark: N simulated agents against the release `dns-server` on loopback,
//! each behaving like `agent run`: register, heartbeat every 10 s (±10 % jitter, a new
//! connection per request like the agent's client), one event stream (resumed with
//! `Last-Event-ID` from its own position; a full list only on first start, on `resync` or
//! on another event epoch, after a full-jitter delay), reconnection with jittered
//! exponential backoff, and churn (X %/min of the agents deregister and register as a new
//! membrane). Then a registry restart: a clean stop (SIGTERM) or a crash (kill -9), start
//! again on the same address, and time until every agent heartbeats and has its cache
//! synchronised again (restart to steady).
//!
//! Reports the server's CPU (from `/proc/<pid>/stat`, % of one core), RSS and RSS per agent,
//! heartbeat latency percentiles, fan-out (time from a change's commit — its writer's answer,
//! which the server sends right after publishing the event — to its arrival at every
//! subscriber of the namespace; events replayed to an agent that reconnects are not
//! counted), lists, resyncs and errors. Heartbeats run beside the stream (like the agent's
//! own task), so a slow heartbeat never delays reading events.
//!
//! Run: `cargo bench -p dns-server --bench fleet`; the issue's target (20,000 agents in one
//! namespace, 5 %/min churn, warm caches, as root for the open-file limit):
//! `BENCH_AGENTS=20000 BENCH_WARM=1 BENCH_SECONDS=120 cargo bench -p dns-server --bench fleet`
//! The open-file limit is raised to 3 per agent (+4096) for the generator and the server.
//! Knobs (env): BENCH_AGENTS (1000), BENCH_NAMESPACES (1), BENCH_CHURN (5, % of the agents
//! per minute), BENCH_SECONDS (60, steady phase), BENCH_RAMP (500 agents started per
//! second), BENCH_RESTART (1: run the restart phase), BENCH_RESTART_KILL (0: clean stop with
//! SIGTERM; 1: kill -9), BENCH_SETTLE (20 s after the restart), BENCH_WARMUP (30 s of churn
//! before the steady phase, not measured: after a ramp of 15,000 the streams opened last
//! were seconds behind and took about 30 s to catch up, which is not steady state),
//! BENCH_SOURCES (agents / 2500, at least 1: loopback source addresses 127.0.0.2.. to
//! spread ephemeral ports over),
//! BENCH_WARM (0; 1: a fleet already running: agents register at the ramp rate and then
//! open their streams over a second window as long, as if with a warm cache — no full list
//! at start, which for N agents in one namespace is N lists of up to N membranes, and no
//! registration fanned out to every agent already streaming, N²/2 deliveries: both are a
//! cold start of a whole fleet, which BENCH_WARM=0 measures),
//! BENCH_SERVER_BIN (another `dns-server` binary), BENCH_GEN_THREADS (2: the generator's
//! worker threads).
//!
//! Beside the fleet, an observer on its own OS thread with blocking sockets heartbeats one
//! membrane every 50 ms and times the `registered` event of a membrane it registers every
//! 500 ms on its own event stream: what the server does, free of the generator's scheduling
//! of thousands of tasks (at 12,000+ agents the fleet's own heartbeat and fan-out tails of
//! seconds are not seen by the observer nor by the server's latency histogram).
//!
//! The generator is a raw HTTP/1.1 client over tokio `TcpStream`s with minimal parsing,
//! one task per agent, on 2 worker threads (it shares the cores with the server).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{env, start_server_on};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

const HEARTBEAT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's defaults: backoff from 1 s up to 30 s.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Event slots for fan-out accounting (indexed by event sequence number since the epoch).
const SLOTS: usize = 1 << 20;

/// Error kinds, counted per phase.
#[derive(Debug, Clone, Copy)]
enum Fail {
    Connect = 0,
    Status = 1,
    Io = 2,
    Timeout = 3,
    StreamDrop = 4,
}
const ERR_NAMES: [&str; 5] = ["connect", "http-status", "io", "timeout", "stream-drop"];

#[derive(Default)]
struct Slot {
    last_agent: AtomicU64,
    key: AtomicU64,
    count: AtomicU32,
    last_ns: AtomicU64,
}

struct Shared {
    addr: SocketAddr,
    t0: std::time::Instant,
    agents: usize,
    namespaces: usize,
    sources: usize,
    /// Agents start with a warm cache (BENCH_WARM): their first list is a tiny one.
    warm: bool,
    /// Warm start: when agents open their streams (a random instant in the window after
    /// every agent registered), as in a fleet that was already running.
    streams_from: std::time::Instant,
    streams_spread: Duration,
    next_source: AtomicUsize,
    /// 0 ramp, 1 steady, 2 restart.
    phase: AtomicU32,
    errors: [[AtomicU64; 5]; 3],
    status_codes: Mutex<HashMap<u16, u64>>,
    lists: [AtomicU64; 3],
    list_bytes: AtomicU64,
    resyncs: [AtomicU64; 3],
    reconnects: [AtomicU64; 3],
    hb_lat_us: Mutex<Vec<u32>>,
    registered: AtomicUsize,
    synced: AtomicUsize,
    /// The epoch whose events are accounted in `slots` (the first server's).
    epoch: AtomicU64,
    slots: Vec<Slot>,
    /// Writes of the steady phase: key -> (request sent, answer received), ns since t0.
    writes: Mutex<HashMap<u64, (u64, u64)>>,
    /// Restart: when each agent first heartbeated and first had a synced cache again.
    kill_ns: AtomicU64,
    hb_back: Vec<AtomicU64>,
    sync_back: Vec<AtomicU64>,
    restarting: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn phase(&self) -> usize {
        self.phase.load(Ordering::Relaxed) as usize
    }
    fn err(&self, e: Fail) {
        self.errors[self.phase()][e as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Counts an unexpected HTTP status (by code, for the report).
    fn unexpected(&self, status: u16) {
        *self.status_codes.lock().unwrap().entry(status).or_insert(0) += 1;
    }
    fn ns_of(&self, agent: usize) -> String {
        format!("ns-{}", agent % self.namespaces)
    }
}

fn fnv(kind: &[u8], id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.iter().chain(b"/").chain(id) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh connection to the server (from one of the source addresses).
async fn connect(sh: &Shared) -> Result<TcpStream, Fail> {
    let sock = TcpSocket::new_v4().map_err(|_| Fail::Connect)?;
    if sh.sources > 1 {
        let k = sh.next_source.fetch_add(1, Ordering::Relaxed) % sh.sources;
        let ip = Ipv4Addr::new(127, 0, 0, 2 + k as u8);
        // Pick the port at connect(), which may reuse ports in TIME_WAIT: a bind() to port
        // 0 searches for a port in use by nothing at all, a slow search that blocks a
        // generator thread for milliseconds once tens of thousands are in TIME_WAIT.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(|_| Fail::Connect)?;
        sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))
            .map_err(|_| Fail::Connect)?;
    }
    let s = timeout(REQUEST_TIMEOUT, sock.connect(sh.addr))
        .await
        .map_err(|_| Fail::Timeout)?
        .map_err(|_| Fail::Connect)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Reads a response head into `buf`; returns (status, head length, content length).
async fn read_head(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(u16, usize, Option<usize>), Fail> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = &buf[..end];
            let status = head
                .get(9..12)
                .and_then(|c| std::str::from_utf8(c).ok())
                .and_then(|c| c.parse().ok())
                .ok_or(Fail::Io)?;
            let lower = head.to_ascii_lowercase();
            let len = find(&lower, b"\r\ncontent-length:").and_then(|i| {
                let rest = &lower[i + 17..];
                let e = rest.iter().position(|&b| b == b'\r').unwrap_or(rest.len());
                std::str::from_utf8(&rest[..e]).ok()?.trim().parse().ok()
            });
            return Ok((status, end + 4, len));
        }
        buf.reserve(4096);
        if s.read_buf(buf).await.map_err(|_| Fail::Io)? == 0 {
            return Err(Fail::Io);
        }
    }
}

/// One request on a new connection (like the agent's client); the status and body.
async fn request(
    sh: &Shared,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), Fail> {
    let go = async {
        let mut s = connect(sh).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: registry\r\nuser-agent: fleet-bench\r\naccept: application/json\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).await.map_err(|_| Fail::Io)?;
        let mut buf = Vec::with_capacity(1024);
        let (status, head, len) = read_head(&mut s, &mut buf).await?;
        let mut body = buf.split_off(head);
        match len {
            // No body, whatever the headers say.
            _ if status == 204 || status == 304 || status < 200 => body.clear(),
            Some(n) => {
                while body.len() < n {
                    body.reserve(n - body.len());
                    if s.read_buf(&mut body).await.map_err(|_| Fail::Io)? == 0 {
                        return Err(Fail::Io);
                    }
                }
            }
            None => {
                s.read_to_end(&mut body).await.map_err(|_| Fail::Io)?;
            }
        }
        Ok((status, body))
    };
    timeout(REQUEST_TIMEOUT, go)
        .await
        .map_err(|_| Fail::Timeout)?
}

/// An open event stream: chunked transfer decoding and SSE framing.
struct Sse {
    s: TcpStream,
    raw: Vec<u8>,
    text: Vec<u8>,
    epoch: u64,
    /// Bytes that came with the head are not decoded yet.
    fresh: bool,
}

/// What a frame said.
enum Frame {
    Event { id: u64, kind: u64, resync: bool },
    Other,
}

impl Sse {
    async fn open(sh: &Shared, ns: &str, last_id: Option<u64>) -> Result<Sse, Fail> {
        let go = async {
            let mut s = connect(sh).await?;
            let resume = last_id.map_or(String::new(), |id| format!("last-event-id: {id}\r\n"));
            let req = format!(
                "GET /v1/namespaces/{ns}/events HTTP/1.1\r\nhost: registry\r\nuser-agent: fleet-bench\r\naccept: text/event-stream\r\n{resume}\r\n"
            );
            s.write_all(req.as_bytes()).await.map_err(|_| Fail::Io)?;
            let mut buf = Vec::with_capacity(1024);
            let (status, head, _) = read_head(&mut s, &mut buf).await?;
            if status != 200 {
                sh.unexpected(status);
                return Err(Fail::Status);
            }
            let lower = buf[..head].to_ascii_lowercase();
            let epoch = find(&lower, b"\r\nmembrane-event-epoch:")
                .and_then(|i| {
                    let rest = &lower[i + 23..];
                    let e = rest.iter().position(|&b| b == b'\r').unwrap_or(rest.len());
                    std::str::from_utf8(&rest[..e]).ok()?.trim().parse().ok()
                })
                .unwrap_or(0);
            let raw = buf.split_off(head);
            Ok(Sse {
                s,
                raw,
                text: Vec::new(),
                epoch,
                fresh: true,
            })
        };
        timeout(REQUEST_TIMEOUT, go)
            .await
            .map_err(|_| Fail::Timeout)?
    }

    /// Decodes what arrived; calls `f` per complete SSE frame. `Err` when the stream ended.
    fn drain(&mut self, mut f: impl FnMut(Frame)) -> Result<(), ()> {
        // Chunked transfer: "<hex>\r\n<payload>\r\n".
        let mut pos = 0;
        while let Some(eol) = find(&self.raw[pos..], b"\r\n") {
            let line = &self.raw[pos..pos + eol];
            let hex = line.split(|&b| b == b';').next().unwrap_or(line);
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                .ok_or(())?;
            if size == 0 {
                return Err(());
            }
            let start = pos + eol + 2;
            if self.raw.len() < start + size + 2 {
                break;
            }
            self.text.extend_from_slice(&self.raw[start..start + size]);
            pos = start + size + 2;
        }
        self.raw.drain(..pos);
        let mut from = 0;
        while let Some(end) = find(&self.text[from..], b"\n\n") {
            f(parse_frame(&self.text[from..from + end]));
            from += end + 2;
        }
        self.text.drain(..from);
        Ok(())
    }
}

fn parse_frame(frame: &[u8]) -> Frame {
    let (mut id, mut kind, mut data): (Option<u64>, &[u8], &[u8]) = (None, b"", b"");
    for line in frame.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"id: ") {
            id = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if let Some(v) = line.strip_prefix(b"event: ") {
            kind = v;
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            data = v;
        }
    }
    let Some(id) = id else {
        return Frame::Other;
    };
    // The membrane id: the first "id" of the JSON (registered: the membrane's, else the
    // event's own).
    let key = find(data, b"\"id\":\"").map_or(0, |i| {
        let rest = &data[i + 6..];
        let e = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
        fnv(kind, &rest[..e])
    });
    Frame::Event {
        id,
        kind: key,
        resync: kind == b"resync",
    }
}

fn registration(agent: usize) -> String {
    format!(
        r#"{{"addresses":["10.{}.{}.{}"],"services":[{{"name":"svc-{}","proto":"tcp","port":7100,"priority":0,"weight":10}}],"capabilities":["vision"],"metadata":{{"version":"1.2"}}}}"#,
        (agent >> 16) & 255,
        (agent >> 8) & 255,
        agent & 255,
        agent % 10
    )
}

fn jitter(d: Duration, fraction: f64) -> Duration {
    d.mul_f64(1.0 - fraction + 2.0 * fraction * rand::rng().random::<f64>())
}

fn upto(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random::<f64>())
}

/// A heartbeat in flight: its answer and when it was sent.
type InFlight = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Result<(u16, Vec<u8>), Fail>, Instant)> + Send>,
>;

/// One simulated agent.
struct Agent {
    i: usize,
    ns: String,
    generation: usize,
    secret: Option<String>,
    /// The cache's position: (epoch, last event id).
    position: Option<(u64, u64)>,
    first_synced: bool,
    hb_backoff: Duration,
    reconnect_backoff: Duration,
    resync_backoff: Duration,
    last_resync: Option<Instant>,
}

impl Agent {
    fn id(&self) -> String {
        format!("m-{}-g{}", self.i, self.generation)
    }
    fn path(&self) -> String {
        format!("/v1/namespaces/{}/membranes/{}", self.ns, self.id())
    }

    /// Registers (retrying with backoff until it works or `stop`).
    async fn register(&mut self, sh: &Shared, stop: &CancellationToken) -> bool {
        let body = registration(self.i);
        let mut backoff = MIN_BACKOFF;
        loop {
            let secret = self
                .secret
                .get_or_insert_with(|| format!("{:064x}", rand::rng().random::<u128>()));
            let sent = sh.now_ns();
            let headers = format!("x-membrane-secret: {secret}\r\n");
            match request(sh, "PUT", &self.path(), &headers, body.as_bytes()).await {
                Ok((200 | 201, _)) => {
                    if sh.phase() == 1 {
                        let key = fnv(b"registered", self.id().as_bytes());
                        sh.writes.lock().unwrap().insert(key, (sent, sh.now_ns()));
                    }
                    return true;
                }
                Ok((status, _)) => {
                    sh.unexpected(status);
                    sh.err(Fail::Status)
                }
                Err(e) => sh.err(e),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = sleep(jitter(backoff, 0.1)) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Deregisters (one attempt, like an agent stopping).
    async fn deregister(&mut self, sh: &Shared) {
        let headers = format!(
            "x-membrane-secret: {}\r\n",
            self.secret.as_deref().unwrap_or("")
        );
        let sent = sh.now_ns();
        match request(sh, "DELETE", &self.path(), &headers, b"").await {
            Ok((200 | 204, _)) => {
                if sh.phase() == 1 {
                    let key = fnv(b"deregistered", self.id().as_bytes());
                    sh.writes.lock().unwrap().insert(key, (sent, sh.now_ns()));
                }
            }
            Ok(_) => sh.err(Fail::Status),
            Err(e) => sh.err(e),
        }
    }

    /// One heartbeat; the delay until the next.
    /// A heartbeat request, to run beside the stream (the agent's heartbeat loop is its own
    /// task: a slow heartbeat never delays reading events).
    fn heartbeat(&self, sh: &Arc<Shared>) -> InFlight {
        let headers = format!(
            "x-membrane-secret: {}\r\n",
            self.secret.as_deref().unwrap_or("")
        );
        let path = format!("{}/heartbeat", self.path());
        let sh = sh.clone();
        let t = Instant::now();
        // Its own task, as in the agent (and so that a busy stream does not delay polling
        // the heartbeat's connection).
        let h = tokio::spawn(async move { (request(&sh, "POST", &path, &headers, b"").await, t) });
        Box::pin(async move { h.await.expect("heartbeat task") })
    }

    /// Accounts a heartbeat's answer; returns the delay to the next one.
    async fn heartbeat_done(
        &mut self,
        (r, t): (Result<(u16, Vec<u8>), Fail>, Instant),
        sh: &Shared,
        stop: &CancellationToken,
    ) -> Duration {
        match r {
            Ok((200, _)) => {
                if sh.phase() == 1 {
                    sh.hb_lat_us
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_micros() as u32);
                }
                if sh.restarting.load(Ordering::Relaxed) {
                    let _ = sh.hb_back[self.i].compare_exchange(
                        0,
                        sh.now_ns(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                self.hb_backoff = MIN_BACKOFF;
                jitter(HEARTBEAT, 0.1)
            }
            Ok((404, _)) => {
                sh.err(Fail::Status);
                self.register(sh, stop).await;
                jitter(HEARTBEAT, 0.1)
            }
            other => {
                match other {
                    Ok((status, _)) => {
                        sh.unexpected(status);
                        sh.err(Fail::Status)
                    }
                    Err(e) => sh.err(e),
                }
                let d = jitter(self.hb_backoff, 0.1);
                self.hb_backoff = (self.hb_backoff * 2).min(MAX_BACKOFF);
                d
            }
        }
    }

    /// A full list; the position it gives (of the stream's epoch), or `None` on failure.
    async fn list(&mut self, sh: &Shared, epoch: u64) -> bool {
        // Warm start: the revision and epoch only (as if from a cache of this registry).
        let filter = if sh.warm && !self.first_synced {
            "?state=stale"
        } else {
            ""
        };
        let path = format!("/v1/namespaces/{}/membranes{filter}", self.ns);
        let r = request(sh, "GET", &path, "", b"").await;
        sh.lists[sh.phase()].fetch_add(1, Ordering::Relaxed);
        match r {
            Ok((200, body)) => {
                sh.list_bytes
                    .fetch_add(body.len() as u64, Ordering::Relaxed);
                let num = |key: &[u8], from_end: bool| -> Option<u64> {
                    let i = if from_end {
                        body.windows(key.len()).rposition(|w| w == key)?
                    } else {
                        find(&body, key)?
                    };
                    let rest = &body[i + key.len()..];
                    let e = rest
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(rest.len());
                    std::str::from_utf8(&rest[..e]).ok()?.parse().ok()
                };
                let (Some(rev), Some(list_epoch)) =
                    (num(b"\"revision\":", true), num(b"\"epoch\":", false))
                else {
                    sh.err(Fail::Io);
                    return false;
                };
                if list_epoch != epoch {
                    return false;
                }
                self.position = Some((epoch, rev));
                true
            }
            Ok(_) => {
                sh.err(Fail::Status);
                false
            }
            Err(e) => {
                sh.err(e);
                false
            }
        }
    }

    fn resync_delay(&mut self, sh: &Shared) -> Duration {
        let now = Instant::now();
        if self
            .last_resync
            .is_some_and(|t| now.duration_since(t) > MAX_BACKOFF * 10)
        {
            self.resync_backoff = MIN_BACKOFF;
        }
        self.last_resync = Some(now);
        let by_size = Duration::from_millis((sh.agents / sh.namespaces) as u64);
        let spread = self.resync_backoff.max(by_size.min(MAX_BACKOFF * 4));
        self.resync_backoff = (self.resync_backoff * 2).min(MAX_BACKOFF);
        upto(spread)
    }

    fn synced(&mut self, sh: &Shared) {
        if !self.first_synced {
            self.first_synced = true;
            sh.synced.fetch_add(1, Ordering::Relaxed);
        }
        if sh.restarting.load(Ordering::Relaxed) {
            let _ = sh.sync_back[self.i].compare_exchange(
                0,
                sh.now_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    async fn run(mut self, sh: Arc<Shared>, churn_per_min: f64, stop: CancellationToken) {
        if !self.register(&sh, &stop).await {
            return;
        }
        sh.registered.fetch_add(1, Ordering::Relaxed);
        let mut hb_at = Instant::now() + jitter(HEARTBEAT, 0.1);
        let churn_delay = || {
            // Poisson: exponential gaps with mean 60 s / (churn % / 100).
            let mean = 60.0 / (churn_per_min / 100.0).max(1e-9);
            Duration::from_secs_f64(-mean * (1.0 - rand::rng().random::<f64>()).ln())
        };
        let mut churn_at = Instant::now() + churn_delay();
        let mut stream: Option<Sse> = None;
        let mut reconnect_at = if sh.warm {
            Instant::from_std(sh.streams_from) + upto(sh.streams_spread)
        } else {
            Instant::now()
        };
        let mut list_at: Option<Instant> = None;
        let mut hb: Option<InFlight> = None;
        loop {
            if stream.is_none() && Instant::now() >= reconnect_at {
                let last = self.position.map(|(_, id)| id);
                match Sse::open(&sh, &self.ns, last).await {
                    Ok(s) => {
                        self.reconnect_backoff = MIN_BACKOFF;
                        match self.position {
                            Some((epoch, _)) if epoch == s.epoch => self.synced(&sh),
                            Some(_) => {
                                // Another epoch (the registry restarted): list after a
                                // random delay, like the agent.
                                self.position = None;
                                list_at = Some(Instant::now() + self.resync_delay(&sh));
                            }
                            None => {
                                if self.list(&sh, s.epoch).await {
                                    self.synced(&sh);
                                } else {
                                    list_at = Some(Instant::now() + self.resync_delay(&sh));
                                }
                            }
                        }
                        stream = Some(s);
                    }
                    Err(e) => {
                        sh.err(e);
                        reconnect_at = Instant::now() + jitter(self.reconnect_backoff, 0.5);
                        self.reconnect_backoff = (self.reconnect_backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = read_stream(&mut stream) => {
                    let now_ns = sh.now_ns();
                    // What came with the response head is a replay of events published
                    // before this subscription (while the agent restarted, say): not
                    // fan-out to a subscriber.
                    let (r, replay) = match r {
                        Ok((n, fresh)) => (Ok(n), fresh),
                        Err(e) => (Err(e), false),
                    };
                    let s = stream.as_mut().expect("reading");
                    let mut resync = false;
                    let ended = match r {
                        Ok(0) | Err(_) => true,
                        Ok(_) => {
                            let (epoch, pending, me) = (s.epoch, list_at.is_some(), self.i);
                            let position = &mut self.position;
                            s.drain(|f| {
                                if let Frame::Event { id, kind, resync: r } = f {
                                    if r {
                                        resync = true;
                                        return;
                                    }
                                    if !replay {
                                        account(&sh, me, epoch, id, kind, now_ns);
                                    }
                                    if !pending && position.is_some() {
                                        *position = Some((epoch, id));
                                    }
                                }
                            })
                            .is_err()
                        }
                    };
                    if resync && list_at.is_none() {
                        sh.resyncs[sh.phase()].fetch_add(1, Ordering::Relaxed);
                        self.position = None;
                        list_at = Some(Instant::now() + self.resync_delay(&sh));
                    }
                    if ended {
                        sh.err(Fail::StreamDrop);
                        sh.reconnects[sh.phase()].fetch_add(1, Ordering::Relaxed);
                        stream = None;
                        list_at = None;
                        reconnect_at = Instant::now() + jitter(self.reconnect_backoff, 0.5);
                        self.reconnect_backoff = (self.reconnect_backoff * 2).min(MAX_BACKOFF);
                    }
                }
                _ = sleep_until(hb_at), if hb.is_none() => {
                    hb = Some(self.heartbeat(&sh));
                }
                r = async { hb.as_mut().expect("in flight").await }, if hb.is_some() => {
                    hb = None;
                    let next = self.heartbeat_done(r, &sh, &stop).await;
                    hb_at = Instant::now() + next;
                }
                _ = sleep_until(list_at.unwrap_or(hb_at)), if list_at.is_some() => {
                    list_at = None;
                    let epoch = stream.as_ref().map_or(0, |s| s.epoch);
                    if self.list(&sh, epoch).await {
                        self.synced(&sh);
                    } else {
                        list_at = Some(Instant::now() + self.resync_delay(&sh));
                    }
                }
                _ = sleep_until(reconnect_at), if stream.is_none() => {}
                _ = sleep_until(churn_at), if sh.phase() == 1 => {
                    // The container restarts as a new membrane: deregister, register, and
                    // its agent reconnects its stream (resuming from its cache).
                    churn_at = Instant::now() + churn_delay();
                    stream = None;
                    hb = None;
                    self.deregister(&sh).await;
                    self.generation += 1;
                    self.secret = None;
                    self.register(&sh, &stop).await;
                    reconnect_at = Instant::now();
                    hb_at = Instant::now() + jitter(HEARTBEAT, 0.1);
                }
            }
        }
    }
}

/// Reads more of the stream, if one is open (else never ready).
/// `true` with what came with the response head.
async fn read_stream(stream: &mut Option<Sse>) -> std::io::Result<(usize, bool)> {
    match stream.as_mut() {
        Some(s) => {
            // What came with the head (a replay, say) first.
            if std::mem::take(&mut s.fresh) {
                return Ok((s.raw.len().max(1), true));
            }
            s.raw.reserve(2048);
            Ok((s.s.read_buf(&mut s.raw).await?, false))
        }
        None => std::future::pending().await,
    }
}

/// Counts one event's arrival at one subscriber. Slots are indexed from the epoch: the
/// bench's fresh database numbers its first process's events right after it (a later
/// process numbers in a segment far above, not counted: the restart phase reports no
/// fan-out).
fn account(sh: &Shared, agent: usize, epoch: u64, id: u64, key: u64, now_ns: u64) {
    if key == 0 || epoch != sh.epoch.load(Ordering::Relaxed) || id <= epoch {
        return;
    }
    let Some(slot) = sh.slots.get((id - epoch) as usize) else {
        return;
    };
    let _ = slot
        .key
        .compare_exchange(0, key, Ordering::Relaxed, Ordering::Relaxed);
    slot.count.fetch_add(1, Ordering::Relaxed);
    if slot.last_ns.fetch_max(now_ns, Ordering::Relaxed) < now_ns {
        slot.last_agent.store(agent as u64, Ordering::Relaxed);
    }
}

/// What the observer measured (milliseconds).
#[derive(Default)]
struct Observed {
    heartbeats: Vec<f64>,
    fanout: Vec<f64>,
    missing: usize,
}

/// An observer beside the fleet, on its own OS thread with blocking sockets (so that it
/// measures the server, not the generator's scheduling of 20,000 tasks): one membrane
/// heartbeating every 50 ms, and a new membrane registered every 500 ms (the previous one
/// deregistered) whose `registered` event is timed from the write's answer to its arrival
/// on the observer's own event stream. Its phase in the server's write window is random
/// like any subscriber's, so over many events its delays spread over the whole window.
fn observe(addr: SocketAddr, ns: String, stop: Arc<AtomicBool>) -> Observed {
    use std::io::{Read, Write};
    use std::net::TcpStream as Std;
    let call = |method: &str, path: &str, body: &str| -> Option<(u16, f64)> {
        let t = std::time::Instant::now();
        let mut s = Std::connect_timeout(&addr, REQUEST_TIMEOUT).ok()?;
        s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
        let _ = s.set_nodelay(true);
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: registry\r\nconnection: close\r\ncontent-type: application/json\r\nx-membrane-secret: {}\r\ncontent-length: {}\r\n\r\n{body}",
            "0b".repeat(32),
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let status = std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()?;
        Some((status, t.elapsed().as_secs_f64() * 1e3))
    };
    let arrivals: Arc<Mutex<HashMap<u64, std::time::Instant>>> = Arc::default();
    let reader = {
        let (arrivals, stop, ns) = (arrivals.clone(), stop.clone(), ns.clone());
        std::thread::spawn(move || {
            let Ok(mut s) = Std::connect(addr) else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = write!(
                s,
                "GET /v1/namespaces/{ns}/events HTTP/1.1\r\nhost: registry\r\n\r\n"
            );
            let (mut buf, mut chunk) = (Vec::new(), [0u8; 65536]);
            while !stop.load(Ordering::Relaxed) {
                let n = match s.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(_) => continue,
                };
                let now = std::time::Instant::now();
                buf.extend_from_slice(&chunk[..n]);
                let mut from = 0;
                while let Some(i) = find(&buf[from..], b"\"id\":\"obs-") {
                    let rest = &buf[from + i + 10..];
                    let Some(e) = rest.iter().position(|b| !b.is_ascii_digit()) else {
                        break;
                    };
                    if let Some(k) = std::str::from_utf8(&rest[..e])
                        .ok()
                        .and_then(|v| v.parse().ok())
                    {
                        arrivals.lock().unwrap().entry(k).or_insert(now);
                    }
                    from += i + 10 + e;
                }
                buf.drain(..from);
                if buf.len() > 64 {
                    buf.drain(..buf.len() - 64);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let reg =
        r#"{"addresses":["10.255.0.1"],"services":[{"name":"svc-0","proto":"tcp","port":7100}]}"#;
    let base = format!("/v1/namespaces/{ns}/membranes");
    let mut out = Observed::default();
    let _ = call("PUT", &format!("{base}/obs-hb"), reg);
    let mut answered: HashMap<u64, std::time::Instant> = HashMap::new();
    let mut next_reg = std::time::Instant::now();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some((200, ms)) = call("POST", &format!("{base}/obs-hb/heartbeat"), "") {
            out.heartbeats.push(ms);
        } else {
            out.missing += 1;
        }
        if std::time::Instant::now() >= next_reg {
            next_reg += Duration::from_millis(500);
            k += 1;
            if let Some((201, _)) = call("PUT", &format!("{base}/obs-{k}"), reg) {
                answered.insert(k, std::time::Instant::now());
            }
            let _ = call("DELETE", &format!("{base}/obs-{}", k - 1), "");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = call("DELETE", &format!("{base}/obs-{k}"), "");
    let _ = call("DELETE", &format!("{base}/obs-hb"), "");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let arrivals = arrivals.lock().unwrap();
    for (k, at) in answered {
        match arrivals.get(&k) {
            Some(a) => out
                .fanout
                .push(a.saturating_duration_since(at).as_secs_f64() * 1e3),
            None => out.missing += 1,
        }
    }
    out
}

fn pct_f(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The host's TCP counters that show connections lost before the server saw them:
/// accept-queue overflows (SYNs dropped: the client retries after 1 s, then 3 s) and SYN
/// retransmissions (from `/proc/net/netstat`; host-wide, so other load counts too).
const TCP_COUNTERS: [&str; 2] = ["ListenOverflows", "TCPSynRetrans"];

fn tcp_counters() -> [u64; 2] {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut out = [0; 2];
    if let [names, values] = lines[..] {
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Some(i) = TCP_COUNTERS.iter().position(|c| *c == name) {
                out[i] = value.parse().unwrap_or(0);
            }
        }
    }
    out
}

fn report_tcp(phase: &str, before: &[u64; 2], after: &[u64; 2]) {
    println!(
        "tcp {phase} (host-wide): listen overflows {}, SYN retransmits {}",
        after[0].saturating_sub(before[0]),
        after[1].saturating_sub(before[1])
    );
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64
}

/// Raises this process's open-file limit (hard too, when allowed) to `want`.
fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    let want = want.min(nr_open);
    if want > hard && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let soft_want = want.min(hard).max(soft);
    let _ = setrlimit(Resource::RLIMIT_NOFILE, soft_want, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let agents = env("BENCH_AGENTS", if quick { 20 } else { 1000 }).max(1);
    let namespaces = env("BENCH_NAMESPACES", 1).max(1);
    let churn = env("BENCH_CHURN", 5) as f64;
    let seconds = env("BENCH_SECONDS", if quick { 3 } else { 60 }) as u64;
    let ramp = env("BENCH_RAMP", 500).max(1);
    let restart = env("BENCH_RESTART", 1) == 1;
    let settle = env("BENCH_SETTLE", if quick { 1 } else { 20 }) as u64;
    let warmup = env("BENCH_WARMUP", if quick { 0 } else { 30 }) as u64;
    // A fresh connection per heartbeat: 2,000/s at 20k agents, each port held in TIME_WAIT
    // for a minute; one source address has ~28k ephemeral ports.
    let sources = env("BENCH_SOURCES", agents / 2500).clamp(1, 250);
    let crash = env("BENCH_RESTART_KILL", 0) == 1;
    let warm = env("BENCH_WARM", 0) == 1;

    // Each agent: one stream, plus a connection per request; the server as many.
    let want_files = (agents as u64) * 3 + 4096;
    let nofile = raise_nofile(want_files);
    if nofile < want_files {
        // Each side holds one stream per agent plus heartbeat connections in flight; the
        // server also keeps descriptors for its store and listeners.
        let fits = nofile.saturating_sub(1024);
        eprintln!(
            "WARNING: open files limited to {nofile} (hard limit; raising it needs \
             CAP_SYS_RESOURCE), {want_files} wanted for {agents} agents{}: raise the hard \
             limit (`prlimit`, systemd LimitNOFILE, `docker --ulimit nofile=`) or run as root",
            if (agents as u64) > fits {
                format!(
                    "; ABOUT {fits} AGENTS AT MOST FIT: the server's connection cap is lowered \
                     to the limit and the rest get 503 (errors)"
                )
            } else {
                String::new()
            }
        );
    }
    let cap = (agents * 2 + 1024).to_string();
    let subs = (agents + 256).to_string();
    let extra = [
        "--http-max-connections",
        cap.as_str(),
        "--sse-max-subscribers",
        subs.as_str(),
        // No DNS over TCP here: its descriptors go to HTTP connections.
        "--dns-tcp-max-connections",
        "16",
    ];
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server_on(dir.path(), "127.0.0.1:0", &extra);
    let mut server = Some(server);
    let pid = server.as_ref().unwrap().0.id().to_string();
    let ticks = clock_ticks();
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "fleet: {agents} agents in {namespaces} namespace(s), churn {churn} %/min, steady {seconds} s, \
         heartbeat 10 s{}; open files {nofile}; {sources} source address(es); server pid {pid} on {addr}; loadavg {}",
        if warm {
            ", warm start (no full list at start)"
        } else {
            ""
        },
        uptime.trim()
    );
    let rss_idle = rss_kib(&pid);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env("BENCH_GEN_THREADS", 2).max(1))
        .enable_all()
        .build()
        .unwrap();
    let ramp_time = Duration::from_secs_f64(agents as f64 / ramp as f64);
    let sh = Arc::new(Shared {
        addr: addr.parse().unwrap(),
        t0: std::time::Instant::now(),
        agents,
        namespaces,
        sources,
        warm,
        streams_from: std::time::Instant::now() + ramp_time + Duration::from_secs(2),
        streams_spread: ramp_time,
        next_source: AtomicUsize::new(0),
        phase: AtomicU32::new(0),
        errors: Default::default(),
        status_codes: Mutex::default(),
        lists: Default::default(),
        list_bytes: AtomicU64::new(0),
        resyncs: Default::default(),
        reconnects: Default::default(),
        hb_lat_us: Mutex::default(),
        registered: AtomicUsize::new(0),
        synced: AtomicUsize::new(0),
        epoch: AtomicU64::new(0),
        slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        writes: Mutex::default(),
        kill_ns: AtomicU64::new(0),
        hb_back: (0..agents).map(|_| AtomicU64::new(0)).collect(),
        sync_back: (0..agents).map(|_| AtomicU64::new(0)).collect(),
        restarting: AtomicBool::new(false),
    });
    let stop = CancellationToken::new();
    let gen_pid = std::process::id().to_string();
    rt.block_on(async {
        let ramp_t = Instant::now();
        let mut tasks = Vec::with_capacity(agents);
        for i in 0..agents {
            let a = Agent {
                i,
                ns: sh.ns_of(i),
                generation: 0,
                secret: None,
                position: None,
                first_synced: false,
                hb_backoff: MIN_BACKOFF,
                reconnect_backoff: MIN_BACKOFF,
                resync_backoff: MIN_BACKOFF,
                last_resync: None,
            };
            tasks.push(tokio::spawn(a.run(sh.clone(), churn, stop.clone())));
            if i % 100 == 99 {
                sleep_until(ramp_t + Duration::from_secs_f64((i + 1) as f64 / ramp as f64)).await;
            }
        }
        while sh.synced.load(Ordering::Relaxed) < agents {
            if ramp_t.elapsed() > Duration::from_secs(600) {
                println!(
                    "ramp: only {} of {agents} synced after 600 s",
                    sh.synced.load(Ordering::Relaxed)
                );
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        // Event ids count from the epoch: learn it from one list.
        let (_, body) = request(&sh, "GET", "/v1/namespaces/ns-0/membranes?state=stale", "", b"")
            .await
            .unwrap();
        let epoch = find(&body, b"\"epoch\":")
            .and_then(|i| {
                let rest = &body[i + 8..];
                let e = rest.iter().position(|b| !b.is_ascii_digit())?;
                std::str::from_utf8(&rest[..e]).ok()?.parse().ok()
            })
            .unwrap_or(0);
        sh.epoch.store(epoch, Ordering::Relaxed);
        println!(
            "ramp: {agents} registered, streaming and synced in {:.1} s ({} lists, {:.1} MiB listed)",
            ramp_t.elapsed().as_secs_f64(),
            sh.lists[0].load(Ordering::Relaxed),
            sh.list_bytes.load(Ordering::Relaxed) as f64 / 1048576.0
        );

        // Steady phase.
        sleep(Duration::from_secs(2)).await;
        sh.phase.store(1, Ordering::Relaxed);
        if warmup > 0 {
            // Churn runs, nothing is recorded: what the ramp left behind (streams opened
            // last still catching up) is not steady state.
            sleep(Duration::from_secs(warmup)).await;
            sh.hb_lat_us.lock().unwrap().clear();
            sh.writes.lock().unwrap().clear();
            println!("warm-up {warmup} s with churn: not measured");
        }
        let (c0, g0, t0) = (cpu_ticks(&pid), cpu_ticks(&gen_pid), Instant::now());
        let tcp0 = tcp_counters();
        let obs_stop = Arc::new(AtomicBool::new(false));
        let observer = {
            let (addr, ns, stop) = (sh.addr, sh.ns_of(0), obs_stop.clone());
            std::thread::spawn(move || observe(addr, ns, stop))
        };
        sleep(Duration::from_secs(seconds)).await;
        obs_stop.store(true, Ordering::Relaxed);
        let (c1, g1, dt) = (cpu_ticks(&pid), cpu_ticks(&gen_pid), t0.elapsed());
        let tcp1 = tcp_counters();
        let rss = rss_kib(&pid);
        let writes = std::mem::take(&mut *sh.writes.lock().unwrap());
        let per_ns = (agents / namespaces) as u32;
        let mut from_ack = Vec::new();
        let mut from_send = Vec::new();
        let mut reached = Vec::new();
        for slot in &sh.slots {
            let key = slot.key.load(Ordering::Relaxed);
            if key == 0 {
                continue;
            }
            if let Some((sent, acked)) = writes.get(&key) {
                let last = slot.last_ns.load(Ordering::Relaxed);
                from_ack.push(last.saturating_sub(*acked) / 1000);
                if std::env::var_os("BENCH_DEBUG").is_some() {
                    eprintln!(
                        "change {key:x}: {} deliveries, last {:.1} ms after commit at agent {}",
                        slot.count.load(Ordering::Relaxed),
                        last.saturating_sub(*acked) as f64 / 1e6,
                        slot.last_agent.load(Ordering::Relaxed)
                    );
                }
                from_send.push(last.saturating_sub(*sent) / 1000);
                reached.push(u64::from(slot.count.load(Ordering::Relaxed)));
            }
        }
        from_ack.sort_unstable();
        from_send.sort_unstable();
        reached.sort_unstable();
        let mut hb = std::mem::take(&mut *sh.hb_lat_us.lock().unwrap())
            .into_iter()
            .map(u64::from)
            .collect::<Vec<_>>();
        hb.sort_unstable();
        let cpu = (c1 - c0) as f64 / ticks / dt.as_secs_f64() * 100.0;
        let gen_cpu = (g1 - g0) as f64 / ticks / dt.as_secs_f64() * 100.0;
        println!(
            "steady {:.0} s: server cpu {cpu:.1} % of one core (generator {gen_cpu:.1} %); \
             rss {:.1} MiB (idle {:.1} MiB) = {:.1} KiB per agent",
            dt.as_secs_f64(),
            rss as f64 / 1024.0,
            rss_idle as f64 / 1024.0,
            (rss.saturating_sub(rss_idle)) as f64 / agents as f64
        );
        println!(
            "heartbeats {}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            hb.len(),
            pct(&hb, 0.5) / 1000.0,
            pct(&hb, 0.99) / 1000.0,
            pct(&hb, 1.0) / 1000.0
        );
        println!(
            "fan-out of {} changes to ~{per_ns} subscribers: from commit p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms; \
             from request sent p99 {:.2} ms; deliveries per change min {} median {}",
            from_ack.len(),
            pct(&from_ack, 0.5) / 1000.0,
            pct(&from_ack, 0.99) / 1000.0,
            pct(&from_ack, 1.0) / 1000.0,
            pct(&from_send, 0.99) / 1000.0,
            reached.first().copied().unwrap_or(0),
            pct(&reached, 0.5),
        );
        let mut seen = observer.join().expect("observer");
        println!(
            "observer (own thread, blocking sockets): heartbeats {}: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms; \
             event delivery to its stream, {} changes: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; failed or missing {}",
            seen.heartbeats.len(),
            pct_f(&mut seen.heartbeats, 0.5),
            pct_f(&mut seen.heartbeats, 0.99),
            pct_f(&mut seen.heartbeats, 1.0),
            seen.fanout.len(),
            pct_f(&mut seen.fanout, 0.5),
            pct_f(&mut seen.fanout, 0.99),
            pct_f(&mut seen.fanout, 1.0),
            seen.missing,
        );
        report_errors(&sh, 1, "steady");
        report_tcp("steady", &tcp0, &tcp1);

        if restart {
            // Registry restart: a clean stop (SIGTERM; BENCH_RESTART_KILL=1: kill -9), then
            // start again on the same address.
            sh.phase.store(2, Ordering::Relaxed);
            let tcp2 = tcp_counters();
            sh.restarting.store(true, Ordering::Relaxed);
            let kill = Instant::now();
            sh.kill_ns.store(sh.now_ns(), Ordering::Relaxed);
            let mut old = server.take().unwrap();
            if !crash {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &old.0.id().to_string()])
                    .status();
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = old.0.wait();
                    old
                })
                .await;
            } else {
                drop(old);
            }
            let stopped = kill.elapsed();
            let (s2, _) = start_server_on(dir.path(), &addr, &extra);
            let ready = kill.elapsed();
            let pid2 = s2.0.id().to_string();
            server = Some(s2);
            let deadline = Instant::now() + Duration::from_secs(120);
            let back = |v: &Vec<AtomicU64>| v.iter().filter(|a| a.load(Ordering::Relaxed) > 0).count();
            while (back(&sh.hb_back) < agents || back(&sh.sync_back) < agents)
                && Instant::now() < deadline
            {
                sleep(Duration::from_millis(100)).await;
            }
            let k = sh.kill_ns.load(Ordering::Relaxed);
            let times = |v: &Vec<AtomicU64>| {
                let mut t: Vec<u64> = v
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .filter(|&t| t > 0)
                    .map(|t| (t - k) / 1_000_000)
                    .collect();
                t.sort_unstable();
                t
            };
            let (hbt, syt) = (times(&sh.hb_back), times(&sh.sync_back));
            let steady = if hbt.len() == agents && syt.len() == agents {
                format!(
                    "{:.1} s",
                    pct(&hbt, 1.0).max(pct(&syt, 1.0)) / 1000.0
                )
            } else {
                "NOT REACHED within 120 s".to_string()
            };
            println!(
                "restart ({}): to steady {steady} (every agent heartbeating and its cache synced)",
                if crash { "kill -9" } else { "clean stop, SIGTERM" }
            );
            println!(
                "restart: server stopped {:.2} s and ready {:.2} s after the signal; heartbeating again {}/{agents} (p50 {:.1} s, last {:.1} s); \
                 caches synced again {}/{agents} (p50 {:.1} s, last {:.1} s); {} resync lists",
                stopped.as_secs_f64(),
                ready.as_secs_f64(),
                hbt.len(),
                pct(&hbt, 0.5) / 1000.0,
                pct(&hbt, 1.0) / 1000.0,
                syt.len(),
                pct(&syt, 0.5) / 1000.0,
                pct(&syt, 1.0) / 1000.0,
                sh.lists[2].load(Ordering::Relaxed),
            );
            let c0 = cpu_ticks(&pid2);
            let t0 = Instant::now();
            sleep(Duration::from_secs(settle)).await;
            let cpu = (cpu_ticks(&pid2) - c0) as f64 / ticks / t0.elapsed().as_secs_f64() * 100.0;
            let (_, status) = request(&sh, "GET", "/status", "", b"").await.unwrap_or_default();
            let status: serde_json::Value = serde_json::from_slice(&status).unwrap_or_default();
            println!(
                "after restart +{settle} s: membranes {} passing {} stale {}; self-preservation {}; \
                 server cpu {cpu:.1} %; rss {:.1} MiB",
                status["membranes"],
                status["passing"],
                status["stale"],
                status["self_preservation"]["active"],
                rss_kib(&pid2) as f64 / 1024.0
            );
            report_errors(&sh, 2, "restart (expected while down)");
            report_tcp("restart", &tcp2, &tcp_counters());
        }
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
    });
    drop(server);
    // In test mode (`cargo test --benches`) this is a smoke test: it must have worked.
    let steady: u64 = sh.errors[1].iter().map(|e| e.load(Ordering::Relaxed)).sum();
    if quick {
        assert_eq!(steady, 0, "errors in the steady phase");
        assert_eq!(sh.synced.load(Ordering::Relaxed), agents);
        if restart && !crash {
            // A clean restart continues the event epoch: every agent resumes, none lists.
            assert_eq!(
                sh.lists[2].load(Ordering::Relaxed),
                0,
                "lists after a clean restart"
            );
        }
    }
}

fn report_errors(sh: &Shared, phase: usize, name: &str) {
    let errs: Vec<String> = ERR_NAMES
        .iter()
        .zip(&sh.errors[phase])
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .filter(|(_, c)| *c > 0)
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    let codes = sh.status_codes.lock().unwrap().clone();
    println!(
        "errors {name}: {} (lists {}, resyncs {}, stream reconnects {}; statuses seen {codes:?})",
        if errs.is_empty() {
            "0".to_string()
        } else {
            errs.join(", ")
        },
        sh.lists[phase].load(Ordering::Relaxed),
        sh.resyncs[phase].load(Ordering::Relaxed),
        sh.reconnects[phase].load(Ordering::Relaxed),
    );
}
