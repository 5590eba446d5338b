//! The control socket: how `agent status|register|deregister|heartbeat|discover|list` talk to
//! the running `agent run`.
//!
//! A Unix stream socket `control.sock` in the state directory, mode 0600, and every peer's
//! uid is checked with `SO_PEERCRED` (only the agent's own user, or root, is served).
//! Protocol: newline-delimited JSON, any number of exchanges per connection, pipelined: a
//! client may send many requests without waiting; `send` requests run concurrently (up to
//! 256 per connection), any other once those before it finished, and answers come back in
//! request order. A request is an
//! object tagged by `cmd` (`{"cmd":"list","service":"visual"}`); the answer is
//! `{"ok":true,"result":...}` or `{"ok":false,"error":{"code":"...","message":"..."}}`.
//! New commands (`send`, `recv`, ...) are new `cmd` variants; an agent that does not know a
//! command answers `unknown_command`, so old agents fail clearly with new clients.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (beyond, the connection gets
//! one `busy` answer and is closed); a connection is closed after 60 s without a request
//! line, or once an answer waited 60 s for the client to read it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::model::ErrorDetail;
use shared::name::{MembraneId, ServiceName, Tag};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest request line accepted (a `send` carries up to 16 MiB of body in base64).
const MAX_LINE: u64 = 24 * 1024 * 1024;
/// An idle connection is closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// A connection whose client does not take an answer within this long (it pipelines
/// requests and never reads) is closed.
const WRITE_TIMEOUT: Duration = IDLE;
/// Most control connections served at once; beyond, a connection is answered `busy` and
/// closed (each holds a task, a descriptor and a 64 KiB read buffer). Twice the 128
/// concurrent `agent send` of the relay benchmark.
pub const MAX_CONNECTIONS: usize = 256;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Registration, heartbeat, registry and cache state.
    Status,
    /// Register now (optionally with a new parent, or none).
    Register {
        /// New parent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<MembraneId>,
        /// Remove the parent.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        clear_parent: bool,
    },
    /// Deregister now; heartbeats stop until the next `register`.
    Deregister,
    /// Heartbeat now.
    Heartbeat,
    /// One membrane (or all when `id` is absent).
    Discover {
        /// Membrane id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MembraneId>,
    },
    /// Membranes of the namespace, filtered.
    List {
        /// Only those offering this service.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<ServiceName>,
        /// Only those with this capability.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capability: Option<Tag>,
    },
    /// Send a message: spool it durably, then deliver (answer once spooled, or once
    /// acknowledged with `wait`). Errors: `bad_target`, `too_large` (usage), `not_found`,
    /// `failed`.
    Send {
        /// Target: an id, `parent`, `children`, `_svc._tcp`.
        to: String,
        /// Body as text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        /// Body as base64 (binary).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_base64: Option<String>,
        /// MIME type.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        /// Every instance of a service.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all: bool,
        /// Answer once acknowledged by the receiver.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
        /// Answered message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<shared::envelope::MessageId>,
        /// Caller-chosen id (idempotent retries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<shared::envelope::MessageId>,
    },
    /// Wait up to `timeout_ms` until the inbox's `new/` holds a message; answers
    /// `{"pending": N}` (for `agent recv --follow`).
    RecvWait {
        /// Longest wait.
        timeout_ms: u64,
    },
}

/// A control answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Success.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

impl Response {
    /// A success.
    pub fn ok(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn err(code: &str, message: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(ErrorDetail {
                code: code.into(),
                message: message.into(),
            }),
        }
    }
}

/// Serves requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send;
}

/// Control socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent listens on the socket.
    #[error("no agent is running with state directory {} (no answer on {})", .dir.display(), .socket.display())]
    NotRunning {
        /// State directory.
        dir: PathBuf,
        /// Socket path.
        socket: PathBuf,
    },
    /// Another agent already serves this state directory.
    #[error("another agent is already running with control socket {}", .0.display())]
    AlreadyRunning(PathBuf),
    /// I/O failure.
    #[error("control socket {}: {source}", .path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The peer spoke something else.
    #[error("control socket protocol error: {0}")]
    Protocol(String),
}

/// Binds the control socket at `path` (mode 0600), replacing a stale socket file but
/// refusing when a live agent answers on it.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Whether the peer runs as our effective user (or root).
fn peer_allowed(stream: &UnixStream) -> Result<bool, std::io::Error> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(std::io::Error::from)?;
    let me = nix::unistd::geteuid().as_raw();
    Ok(cred.uid() == me || cred.uid() == 0)
}

/// Accepts connections until `cancel`, at most [`MAX_CONNECTIONS`] at once.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "control connection refused: too many open"
            );
            refuse_busy(stream);
            continue;
        };
        let handler = handler.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = connection(stream, handler) => if let Err(e) = r {
                    tracing::debug!(error = %e, "control connection ended");
                },
            }
        });
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with one `busy` line, without waiting
/// (a fresh socket's buffer takes it), and closes it.
fn refuse_busy(stream: UnixStream) {
    use std::io::Write;
    let line = json_line(&Response::err(
        "busy",
        format!(
            "the agent serves at most {MAX_CONNECTIONS} control connections at once; \
             try again later"
        ),
    ));
    // Non-blocking: a client that does not read cannot hold the accept loop.
    if let Ok(s) = stream.into_std() {
        let _ = (&s).write(&line);
    }
}

/// `w.write_all(bytes)`, given up after [`WRITE_TIMEOUT`].
async fn write_timed<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client took no answer for {WRITE_TIMEOUT:?}"),
        )),
    }
}

async fn connection<H: Handler>(stream: UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let allowed = peer_allowed(&stream)?;
    let (r, mut w) = stream.into_split();
    if !allowed {
        tracing::warn!("control connection from another user refused");
        let line = json_line(&Response::err(
            "forbidden",
            "peer user is not the agent's user",
        ));
        return write_timed(&mut w, &line).await;
    }
    // Pipelining: `send` requests run concurrently (at most MAX_IN_FLIGHT per connection),
    // any other request once every earlier one finished; answers go back in request order,
    // several per write when they are ready together.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Answer>(MAX_IN_FLIGHT);
    let mut writer = tokio::spawn(async move {
        async fn resolve(a: Answer, out: &mut Vec<u8>) {
            let resp = match a {
                Answer::Ready(r) => r,
                Answer::Running(h) => h
                    .await
                    .unwrap_or_else(|e| Response::err("internal", e.to_string())),
            };
            serde_json::to_writer(&mut *out, &resp).expect("json");
            out.push(b'\n');
        }
        let mut out = Vec::new();
        let mut front = None;
        loop {
            let a = match front.take() {
                Some(a) => a,
                None => match rx.recv().await {
                    Some(a) => a,
                    None => break,
                },
            };
            resolve(a, &mut out).await;
            // Answers finished together (one group commit) go in one write.
            tokio::task::yield_now().await;
            while out.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(Answer::Running(h)) if !h.is_finished() => {
                        front = Some(Answer::Running(h));
                        break;
                    }
                    Ok(a) => resolve(a, &mut out).await,
                    Err(_) => break,
                }
            }
            write_timed(&mut w, &out).await?;
            out.clear();
        }
        w.flush().await
    });
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut line = Vec::new();
    let reading = async {
        loop {
            line.clear();
            let n = match tokio::time::timeout(
                IDLE,
                (&mut reader)
                    .take(MAX_LINE + 1)
                    .read_until(b'\n', &mut line),
            )
            .await
            {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            if line.len() as u64 > MAX_LINE {
                let _ = tx
                    .send(Answer::Ready(Response::err(
                        "bad_request",
                        "request line too long",
                    )))
                    .await;
                return Ok(());
            }
            let answer = match parse_request(&line) {
                Ok(req @ Request::Send { .. }) => {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore open");
                    let h = handler.clone();
                    Answer::Running(tokio::spawn(async move {
                        let r = h.handle(req).await;
                        drop(permit);
                        r
                    }))
                }
                Ok(req) => {
                    let all = in_flight
                        .acquire_many(MAX_IN_FLIGHT as u32)
                        .await
                        .expect("semaphore open");
                    let r = handler.handle(req).await;
                    drop(all);
                    Answer::Ready(r)
                }
                Err(resp) => Answer::Ready(resp),
            };
            if tx.send(answer).await.is_err() {
                return Ok(());
            }
        }
    };
    let result = tokio::select! {
        r = reading => r,
        // The writer gave up (the client takes no answers): so does the reader.
        w = &mut writer => return w.map_err(std::io::Error::other)?,
    };
    drop(tx);
    let w = writer.await.map_err(std::io::Error::other)?;
    result.and(w)
}

/// Most `send` requests of one control connection running at once.
pub const MAX_IN_FLIGHT: usize = 256;

enum Answer {
    Ready(Response),
    Running(tokio::task::JoinHandle<Response>),
}

/// Parses one request line, or the error answer for it.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| Response::err("bad_request", format!("not JSON: {e}")))?;
    let cmd = v.get("cmd").and_then(Value::as_str).map(str::to_string);
    serde_json::from_value::<Request>(v).map_err(|e| match cmd {
        Some(c)
            if !matches!(
                c.as_str(),
                "status"
                    | "register"
                    | "deregister"
                    | "heartbeat"
                    | "discover"
                    | "list"
                    | "send"
                    | "recv_wait"
            ) =>
        {
            Response::err(
                "unknown_command",
                format!("this agent does not know the command {c:?}; upgrade it"),
            )
        }
        _ => Response::err("bad_request", e.to_string()),
    })
}

/// `v` as one line of JSON, newline included.
fn json_line<T: Serialize>(v: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(v).expect("json");
    bytes.push(b'\n');
    bytes
}

async fn write_line<W: AsyncWriteExt + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> std::io::Result<()> {
    w.write_all(&json_line(v)).await?;
    w.flush().await
}

/// Sends one request to the agent of `state_dir` and waits up to `timeout` for the answer.
pub async fn call(
    state_dir: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ControlError> {
    let path = crate::state::control_socket(state_dir);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning {
                dir: state_dir.to_path_buf(),
                socket: path.clone(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let (r, mut w) = stream.into_split();
    match write_line(&mut w, req).await {
        // The agent may answer (a refusal) and close before reading: read that answer.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.map_err(io)?,
    }
    let mut line = Vec::new();
    let n = tokio::time::timeout(timeout, BufReader::new(r).read_until(b'\n', &mut line))
        .await
        .map_err(|_| {
            ControlError::Protocol(format!("no answer from the agent within {timeout:?}"))
        })?
        .map_err(io)?;
    if n == 0 {
        return Err(ControlError::Protocol(
            "the agent closed the connection".into(),
        ));
    }
    serde_json::from_slice(&line).map_err(|e| ControlError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        async fn handle(&self, req: Request) -> Response {
            Response::ok(serde_json::to_value(req).unwrap())
        }
    }

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(r#"{"cmd":"list","service":"Visual"}"#).unwrap();
        assert_eq!(
            r,
            Request::List {
                service: Some(ServiceName::new("visual").unwrap()),
                capability: None
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let e = parse_request(br#"{"cmd":"teleport","to":"x"}"#).unwrap_err();
        assert_eq!(e.error.unwrap().code, "unknown_command");
        let e = parse_request(br#"{"cmd":"discover","id":"bad id"}"#).unwrap_err();
        assert_eq!(e.error.as_ref().unwrap().code, "bad_request");
        assert!(parse_request(b"nope").is_err());
    }

    #[tokio::test]
    async fn socket_is_private_and_answers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::control_socket(dir.path());
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, Arc::new(Echo), cancel.clone()));
        let resp = call(dir.path(), &Request::Heartbeat, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(resp.ok);
        assert_eq!(resp.result.unwrap()["cmd"], "heartbeat");
        // A second agent on the same state dir is refused.
        assert!(matches!(
            bind(&path).await,
            Err(ControlError::AlreadyRunning(_))
        ));
        // Raw protocol: two requests on one connection, one bad.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"cmd\":\"bogus\"}\n{\"cmd\":\"status\"}\n")
            .await
            .unwrap();
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        assert!(l.contains("unknown_command"), "{l}");
        l.clear();
        r.read_line(&mut l).await.unwrap();
        assert!(l.contains("\"ok\":true"), "{l}");
        cancel.cancel();
        task.await.unwrap();
        // A stale socket file (no listener) is replaced.
        assert!(bind(&path).await.is_ok());
    }

    #[tokio::test]
    async fn no_agent_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = call(dir.path(), &Request::Status, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ControlError::NotRunning { .. }));
        assert!(e.to_string().contains("no agent is running"), "{e}");
    }

    /// Sends sleep (later ones shorter) and count themselves; `status` reports the count.
    struct Slow(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    );
    impl Handler for Slow {
        async fn handle(&self, req: Request) -> Response {
            use std::sync::atomic::Ordering::SeqCst;
            match req {
                Request::Send { body, .. } => {
                    let n: u64 = body.unwrap().parse().unwrap();
                    let now = self.1.fetch_add(1, SeqCst) + 1;
                    assert!(now <= MAX_IN_FLIGHT, "{now} in flight");
                    tokio::time::sleep(Duration::from_millis(30 - n % 30)).await;
                    self.1.fetch_sub(1, SeqCst);
                    self.0.fetch_add(1, SeqCst);
                    Response::ok(serde_json::json!(n))
                }
                _ => Response::ok(serde_json::json!({"done": self.0.load(SeqCst)})),
            }
        }
    }

    #[tokio::test]
    async fn pipelined_requests_run_concurrently_and_answer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::control_socket(dir.path());
        let listener = bind(&path).await.unwrap();
        let cancel = CancellationToken::new();
        let h = Arc::new(Slow(Default::default(), Default::default()));
        tokio::spawn(serve(listener, h.clone(), cancel.clone()));
        let s = UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = s.into_split();
        let n = 600;
        let mut req = Vec::new();
        for i in 0..n {
            req.extend_from_slice(
                format!("{{\"cmd\":\"send\",\"to\":\"b\",\"body\":\"{i}\"}}\n").as_bytes(),
            );
        }
        req.extend_from_slice(b"{\"cmd\":\"status\"}\n");
        let t0 = std::time::Instant::now();
        w.write_all(&req).await.unwrap();
        let mut lines = BufReader::new(r).lines();
        for i in 0..n {
            let l = lines.next_line().await.unwrap().unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            assert_eq!(v["result"], i, "answers in request order");
        }
        let l = lines.next_line().await.unwrap().unwrap();
        assert!(
            l.contains(&format!("\"done\":{n}")),
            "status after every send: {l}"
        );
        // 600 sends of up to 30 ms, 256 at a time: well under one after another (9 s).
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        cancel.cancel();
    }

    /// One request on `s`, its answer line (a refused connection may be closed before the
    /// request is written: its answer is read all the same).
    async fn exchange(s: &mut UnixStream) -> String {
        let _ = s.write_all(b"{\"cmd\":\"status\"}\n").await;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while matches!(s.read(&mut b).await, Ok(1)) && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// Connections beyond the cap are answered `busy` and closed; a closed connection
    /// frees its place.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_refused_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::control_socket(dir.path());
        let listener = bind(&path).await.unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Echo), cancel.clone()));
        let mut open = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = UnixStream::connect(&path).await.unwrap();
            let l = exchange(&mut s).await;
            assert!(l.contains("\"ok\":true"), "{l}");
            open.push(s);
        }
        let mut s = UnixStream::connect(&path).await.unwrap();
        let l = exchange(&mut s).await;
        assert!(l.contains("\"code\":\"busy\""), "{l}");
        assert!(l.contains(&format!("at most {MAX_CONNECTIONS}")), "{l}");
        // Closed (reset: the request was left unread).
        assert!(matches!(s.read(&mut [0u8; 1]).await, Ok(0) | Err(_)));
        // One leaves: the next is served (once its connection ended, at once).
        drop(open.pop());
        let mut served = false;
        for _ in 0..500 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            if exchange(&mut s).await.contains("\"ok\":true") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served, "a place freed");
        cancel.cancel();
    }

    /// Answers of a megabyte each.
    struct Big;
    impl Handler for Big {
        async fn handle(&self, _: Request) -> Response {
            Response::ok(Value::String("x".repeat(1 << 20)))
        }
    }

    /// A client that pipelines requests and never reads its answers: the connection is
    /// closed once an answer waited [`WRITE_TIMEOUT`], not held forever.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_answers_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::control_socket(dir.path());
        let listener = bind(&path).await.unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Big), cancel.clone()));
        let mut s = UnixStream::connect(&path).await.unwrap();
        let n = 8;
        s.write_all(&b"{\"cmd\":\"status\"}\n".repeat(n))
            .await
            .unwrap();
        tokio::time::sleep(WRITE_TIMEOUT + Duration::from_secs(1)).await;
        // What the socket buffered before the agent gave up, then the end.
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let answers = got.iter().filter(|&&b| b == b'\n').count();
        assert!(
            answers < n,
            "{answers} answers of {n}: the agent waited for the client"
        );
        cancel.cancel();
    }
}
