//! Lifecycle schedule tests under paused time against a scripted fake registry.

use super::*;
use crate::cache::tests::view;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Register,
    Heartbeat,
    Deregister,
}

#[derive(Debug, Clone)]
struct Call {
    at: Duration,
    kind: Kind,
    secret: Option<String>,
    parent: Option<String>,
    replace: bool,
}

type Script = Box<dyn FnMut(Kind, usize) -> Result<(), ClientError> + Send>;

struct Fake {
    start: Instant,
    calls: Mutex<Vec<Call>>,
    script: Mutex<Script>,
    hang_deregister: bool,
    register_delay: Duration,
}

impl Fake {
    fn new(
        script: impl FnMut(Kind, usize) -> Result<(), ClientError> + Send + 'static,
    ) -> Arc<Self> {
        Arc::new(Fake {
            start: Instant::now(),
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            hang_deregister: false,
            register_delay: Duration::ZERO,
        })
    }

    fn record(
        &self,
        kind: Kind,
        secret: Option<&str>,
        parent: Option<String>,
        replace: bool,
    ) -> Result<(), ClientError> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.iter().filter(|c| c.kind == kind).count();
        calls.push(Call {
            at: self.start.elapsed(),
            kind,
            secret: secret.map(String::from),
            parent,
            replace,
        });
        drop(calls);
        (self.script.lock().unwrap())(kind, n)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The registrations made, in order.
    fn registers(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.kind == Kind::Register)
            .collect()
    }

    fn times(&self, kind: Kind) -> Vec<u64> {
        self.calls()
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.at.as_secs())
            .collect()
    }
}

impl RegistryApi for Fake {
    async fn register(
        &self,
        ns: &NamespaceName,
        id: &MembraneId,
        reg: &Registration,
        secret: Option<&str>,
        replace: bool,
    ) -> Result<RegisterResponse, ClientError> {
        let parent = reg.parent.as_ref().map(|p| p.to_string());
        self.record(Kind::Register, secret, parent, replace)?;
        tokio::time::sleep(self.register_delay).await;
        Ok(RegisterResponse {
            membrane: view(ns.as_str(), id.as_str(), "svc", "cap"),
            instance_secret: "s1".into(),
            created: secret.is_none(),
            relay_key: None,
        })
    }
    async fn heartbeat(
        &self,
        _ns: &NamespaceName,
        _id: &MembraneId,
        secret: &str,
    ) -> Result<HeartbeatAnswer, ClientError> {
        self.record(Kind::Heartbeat, Some(secret), None, false)?;
        Ok(HeartbeatAnswer {
            state: Some("passing".into()),
            ttl_seconds: Some(30),
        })
    }
    async fn deregister(
        &self,
        _ns: &NamespaceName,
        _id: &MembraneId,
        secret: &str,
    ) -> Result<(), ClientError> {
        self.record(Kind::Deregister, Some(secret), None, false)?;
        if self.hang_deregister {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(())
    }
    async fn route_address(&self) -> Option<IpAddr> {
        Some("192.0.2.7".parse().unwrap())
    }
    fn url(&self) -> String {
        "http://fake".into()
    }
}

fn unreachable() -> ClientError {
    ClientError::Unreachable {
        url: "http://fake".into(),
        reason: "connection refused".into(),
        sent: false,
    }
}

/// A registration sent whose answer never came (it may have been applied).
fn no_answer() -> ClientError {
    ClientError::Unreachable {
        url: "http://fake".into(),
        reason: "no answer within 10s".into(),
        sent: true,
    }
}

/// `agent register --parent perception`.
fn reparent(reply: oneshot::Sender<Result<Value, String>>) -> Command {
    Command::Register {
        parent: Some(Some(MembraneId::new("perception").unwrap())),
        reply,
    }
}

fn api(status: u16, message: &str) -> ClientError {
    ClientError::Api {
        url: "http://fake".into(),
        status,
        code: "x".into(),
        message: message.into(),
    }
}

fn config(jitter: f64) -> LifecycleConfig {
    LifecycleConfig {
        namespace: NamespaceName::new("cog").unwrap(),
        id: MembraneId::new("worker").unwrap(),
        registration: Registration::default(),
        tcp_port_on_route: None,
        heartbeat_interval: Duration::from_secs(10),
        jitter,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        shutdown_grace: Duration::from_secs(5),
        state_dir: None,
        replace: false,
    }
}

struct Running {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), LifecycleError>>,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
    ready: oneshot::Receiver<()>,
}

fn start(fake: &Arc<Fake>, cfg: LifecycleConfig) -> Running {
    let status = Arc::new(Mutex::new(Status::default()));
    let (tx, rx) = mpsc::channel(4);
    let (rtx, rrx) = oneshot::channel();
    let cancel = CancellationToken::new();
    let lc = Lifecycle::new(
        fake.clone(),
        cfg,
        status.clone(),
        Arc::new(Activity::disabled()),
        Some(rtx),
    )
    .with_jitter_seed(7);
    let handle = tokio::spawn(lc.run(rx, cancel.clone()));
    Running {
        cancel,
        handle,
        commands: tx,
        status,
        ready: rrx,
    }
}

/// Sends the command `make` builds (around its reply channel) and waits for the answer.
async fn ask(
    r: &Running,
    make: impl FnOnce(oneshot::Sender<Result<Value, String>>) -> Command,
) -> Result<Value, String> {
    let (tx, rx) = oneshot::channel();
    r.commands.send(make(tx)).await.unwrap();
    rx.await.unwrap()
}

async fn stop(r: Running) -> Result<(), LifecycleError> {
    r.cancel.cancel();
    r.handle.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn heartbeats_follow_the_interval_with_jitter() {
    let fake = Fake::new(|_, _| Ok(()));
    let r = start(&fake, config(0.1));
    tokio::time::sleep(Duration::from_secs(105)).await;
    assert_eq!(r.status.lock().unwrap().phase, Phase::Registered);
    stop(r).await.unwrap();
    let calls = fake.calls();
    assert_eq!(calls[0].kind, Kind::Register);
    assert_eq!(calls[0].at, Duration::ZERO);
    assert_eq!(calls[0].secret, None, "first registration has no secret");
    assert_eq!(calls[0].kind, Kind::Register);
    let beats: Vec<&Call> = calls.iter().filter(|c| c.kind == Kind::Heartbeat).collect();
    assert!(
        (9..=11).contains(&beats.len()),
        "{} heartbeats",
        beats.len()
    );
    let mut prev = Duration::ZERO;
    let mut gaps = Vec::new();
    for b in &beats {
        let gap = b.at - prev;
        assert!(
            gap >= Duration::from_secs(9) && gap <= Duration::from_secs(11),
            "gap {gap:?}"
        );
        assert_eq!(b.secret.as_deref(), Some("s1"));
        gaps.push(gap);
        prev = b.at;
    }
    assert!(
        gaps.iter().any(|g| *g != gaps[0]),
        "jitter varies the gaps: {gaps:?}"
    );
    let last = calls.last().unwrap();
    assert_eq!(last.kind, Kind::Deregister, "shutdown deregisters");
    assert_eq!(last.at, Duration::from_secs(105), "at once");
    assert_eq!(last.secret.as_deref(), Some("s1"));
}

#[tokio::test(start_paused = true)]
async fn registration_backs_off_exponentially_while_unreachable() {
    let fake = Fake::new(|k, n| {
        if k == Kind::Register && n < 6 {
            Err(unreachable())
        } else {
            Ok(())
        }
    });
    let mut r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(52)).await;
    assert!(
        r.ready.try_recv().is_ok(),
        "READY after the first registration"
    );
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 1, 3, 7, 15, 23, 31]);
    assert_eq!(fake.times(Kind::Heartbeat), [41, 51]);
}

#[tokio::test(start_paused = true)]
async fn ready_waits_for_a_registration() {
    let fake = Fake::new(|k, _| {
        if k == Kind::Register {
            Err(unreachable())
        } else {
            Ok(())
        }
    });
    let mut r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(r.ready.try_recv().is_err());
    {
        let s = r.status.lock().unwrap();
        assert_eq!(s.phase, Phase::Registering);
        assert_eq!(s.server_reachable, Some(false));
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .contains("connection refused")
        );
    }
    stop(r).await.unwrap();
    assert!(
        fake.times(Kind::Deregister).is_empty(),
        "nothing to deregister"
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_404_reregisters_at_once_with_the_secret() {
    let fake = Fake::new(|k, n| {
        if k == Kind::Heartbeat && n == 1 {
            Err(api(404, "unknown membrane"))
        } else {
            Ok(())
        }
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(35)).await;
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 20]);
    assert_eq!(fake.times(Kind::Heartbeat), [10, 20, 30]);
    let re = fake.registers()[1].clone();
    assert_eq!(
        re.secret.as_deref(),
        Some("s1"),
        "re-registration sends the stored secret"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_heartbeats_retry_with_backoff_then_resume_the_interval() {
    let fake = Fake::new(|k, n| {
        if k == Kind::Heartbeat && (1..4).contains(&n) {
            Err(unreachable())
        } else {
            Ok(())
        }
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(40)).await;
    stop(r).await.unwrap();
    assert_eq!(
        fake.times(Kind::Register),
        [0],
        "unreachable is not a reason to re-register"
    );
    assert_eq!(fake.times(Kind::Heartbeat), [10, 20, 21, 23, 27, 37]);
}

#[tokio::test(start_paused = true)]
async fn refused_first_registration_is_fatal_with_the_server_message() {
    let fake = Fake::new(|_, _| Err(api(401, "invalid token")));
    let r = start(&fake, config(0.0));
    let err = r.handle.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("invalid token"), "{err}");
    assert!(err.contains("--token"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn unavailable_registry_is_retried_not_fatal() {
    let fake = Fake::new(|k, n| {
        if k == Kind::Register && n < 2 {
            Err(api(503, "not ready"))
        } else {
            Ok(())
        }
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 1, 3]);
}

#[tokio::test(start_paused = true)]
async fn refusal_after_running_keeps_the_agent_alive() {
    let fake = Fake::new(|k, n| match (k, n) {
        (Kind::Heartbeat, 0) => Err(api(404, "gone")),
        (Kind::Register, 1..=2) => Err(api(401, "token rotated")),
        _ => Ok(()),
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!r.handle.is_finished());
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 10, 11, 13]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_up_deregistering_after_the_grace_time() {
    let mut fake = Fake::new(|_, _| Ok(()));
    Arc::get_mut(&mut fake).unwrap().hang_deregister = true;
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    stop(r).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(fake.times(Kind::Deregister), [3]);
}

#[tokio::test(start_paused = true)]
async fn commands_deregister_pause_and_register_with_new_parent() {
    let fake = Fake::new(|_, _| Ok(()));
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let answer = ask(&r, |reply| Command::Deregister { reply }).await;
    let v = answer.unwrap();
    assert_eq!(v["deregistered"], true);
    assert_eq!(r.status.lock().unwrap().phase, Phase::Deregistered);
    tokio::time::sleep(Duration::from_secs(45)).await;
    let answer = ask(&r, reparent).await;
    let v = answer.unwrap();
    assert_eq!(v["registered"], true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let answer = ask(&r, |reply| Command::Heartbeat { reply }).await;
    assert_eq!(answer.unwrap()["heartbeat"], "ok");
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 60]);
    assert_eq!(fake.times(Kind::Heartbeat), [10, 65, 75]);
    assert_eq!(fake.times(Kind::Deregister), [15, 77]);
    let re = fake.registers()[1].clone();
    assert_eq!(re.parent.as_deref(), Some("perception"));
}

/// `agent register --parent x` refused while registered (the namespace's join token was
/// rotated; heartbeats need only the instance secret): the caller gets the error, the
/// membrane stays registered with its old parent and keeps heartbeating, instead of the
/// agent retrying the refused registration until the membrane expires.
/// `agent register --parent x` that gets no answer (it may have been applied): the change
/// is not dropped as if refused, the agent retries it until it lands.
#[tokio::test(start_paused = true)]
async fn a_reregistration_command_without_an_answer_is_retried() {
    let fake = Fake::new(|k, n| match (k, n) {
        (Kind::Register, 1) => Err(no_answer()),
        _ => Ok(()),
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let answer = ask(&r, reparent).await;
    assert!(answer.is_err());
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(r).await.unwrap();
    let parents: Vec<_> = fake.registers().into_iter().map(|c| c.parent).collect();
    assert!(parents.len() >= 3, "{parents:?}");
    assert_eq!(
        parents[2].as_deref(),
        Some("perception"),
        "retried as asked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_reregistration_command_changes_nothing_and_heartbeats_go_on() {
    let fake = Fake::new(|k, n| match (k, n) {
        (Kind::Register, 1) => Err(api(403, "join token rotated")),
        _ => Ok(()),
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let answer = ask(&r, reparent).await;
    let e = answer.unwrap_err();
    assert!(e.contains("join token rotated"), "{e}");
    assert!(e.contains("still registered"), "{e}");
    {
        let s = r.status.lock().unwrap();
        assert_eq!(s.phase, Phase::Registered);
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .contains("join token rotated")
        );
    }
    tokio::time::sleep(Duration::from_secs(37)).await;
    assert_eq!(r.status.lock().unwrap().phase, Phase::Registered);
    // A registration afterwards (no parent change) sends the old parent, not the refused.
    let answer = ask(&r, |reply| Command::Register {
        parent: None,
        reply,
    })
    .await;
    assert_eq!(answer.unwrap()["registered"], true);
    stop(r).await.unwrap();
    assert_eq!(
        fake.times(Kind::Register),
        [0, 15, 52],
        "the refused registration is not retried"
    );
    assert_eq!(
        fake.times(Kind::Heartbeat),
        [10, 20, 30, 40, 50],
        "heartbeats on their schedule"
    );
    let parents: Vec<Option<String>> = fake.registers().into_iter().map(|c| c.parent).collect();
    assert_eq!(parents, [None, Some("perception".into()), None]);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_command_when_not_registered_says_so() {
    let fake = Fake::new(|k, _| {
        if k == Kind::Register {
            Err(unreachable())
        } else {
            Ok(())
        }
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let answer = ask(&r, |reply| Command::Heartbeat { reply }).await;
    let e = answer.unwrap_err();
    assert!(e.contains("not registered"), "{e}");
    stop(r).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn secret_is_persisted_and_reused_by_a_restarted_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(0.0);
    cfg.state_dir = Some(dir.path().to_path_buf());
    let fake = Fake::new(|k, _| {
        if k == Kind::Deregister {
            Err(unreachable())
        } else {
            Ok(())
        }
    });
    let r = start(&fake, cfg.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(r).await.unwrap();
    let fake2 = Fake::new(|_, _| Ok(()));
    let r = start(&fake2, cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(r).await.unwrap();
    assert_eq!(fake2.calls()[0].secret.as_deref(), Some("s1"));
}

#[tokio::test(start_paused = true)]
async fn route_address_fills_missing_addresses_and_tcp_endpoint() {
    let mut cfg = config(0.0);
    cfg.tcp_port_on_route = Some(7000);
    let fake = Fake::new(|_, _| Ok(()));
    let lc = Lifecycle::new(
        fake.clone(),
        cfg,
        Arc::new(Mutex::new(Status::default())),
        Arc::new(Activity::disabled()),
        None,
    );
    let reg = lc.build_registration().await;
    assert_eq!(reg.addresses, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        reg.endpoint,
        Some(Endpoint::Tcp {
            address: "192.0.2.7:7000".into()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_registration_in_flight_at_shutdown_is_finished_then_removed() {
    let mut fake = Fake::new(|_, _| Ok(()));
    Arc::get_mut(&mut fake).unwrap().register_delay = Duration::from_secs(2);
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0]);
    assert_eq!(
        fake.times(Kind::Deregister),
        [2],
        "deregistered once the registration landed"
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
}

/// `agent register` in flight when the agent is told to stop: as for the lifecycle's own
/// registration, it is let finish within the grace time, then removed.
#[tokio::test(start_paused = true)]
async fn a_register_command_in_flight_at_shutdown_is_finished_then_removed() {
    let mut fake = Fake::new(|_, _| Ok(()));
    Arc::get_mut(&mut fake).unwrap().register_delay = Duration::from_secs(2);
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let answer = ask(&r, |reply| Command::Deregister { reply }).await;
    answer.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (tx, _rx) = oneshot::channel();
    r.commands
        .send(Command::Register {
            parent: None,
            reply: tx,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0, 20]);
    assert_eq!(
        fake.times(Kind::Deregister),
        [15, 22],
        "deregistered once the registration landed"
    );
}

/// A registration sent whose answer never came (the registry may have committed it): the
/// agent stops before a retry, and deregisters all the same (a 404 would be fine).
#[tokio::test(start_paused = true)]
async fn a_registration_without_an_answer_is_removed_at_shutdown() {
    let fake = Fake::new(|k, _| match k {
        Kind::Register => Err(no_answer()),
        _ => Ok(()),
    });
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop(r).await.unwrap();
    assert_eq!(fake.times(Kind::Register), [0]);
    assert_eq!(fake.times(Kind::Deregister), [0]);
}

#[tokio::test(start_paused = true)]
async fn grace_time_bounds_the_request_in_flight_and_the_deregistration_together() {
    let mut fake = Fake::new(|_, _| Ok(()));
    {
        let f = Arc::get_mut(&mut fake).unwrap();
        f.register_delay = Duration::from_secs(4);
        f.hang_deregister = true;
    }
    let r = start(&fake, config(0.0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    stop(r).await.unwrap();
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(5),
        "one grace time in all"
    );
    assert_eq!(fake.times(Kind::Deregister), [4]);
}

#[tokio::test(start_paused = true)]
async fn replace_is_asked_until_the_first_registration_succeeds_only() {
    let mut cfg = config(0.0);
    cfg.replace = true;
    let fake = Fake::new(|k, n| match (k, n) {
        (Kind::Register, 0) => Err(unreachable()),
        (Kind::Heartbeat, 1) => Err(api(404, "unknown membrane")),
        _ => Ok(()),
    });
    let r = start(&fake, cfg);
    tokio::time::sleep(Duration::from_secs(25)).await;
    stop(r).await.unwrap();
    let replace: Vec<bool> = fake.registers().iter().map(|c| c.replace).collect();
    // The failed first attempt and its retry ask; the re-registration after 404 does not.
    assert_eq!(replace, [true, true, false]);
}

#[tokio::test(start_paused = true)]
async fn the_secret_is_picked_and_stored_before_the_first_registration() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(0.0);
    cfg.state_dir = Some(dir.path().to_path_buf());
    // The first answer is lost: the retry must carry the same secret.
    let fake = Fake::new(|k, n| match (k, n) {
        (Kind::Register, 0) => Err(unreachable()),
        _ => Ok(()),
    });
    let r = start(&fake, cfg.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop(r).await.unwrap();
    let regs: Vec<_> = fake.registers().into_iter().map(|c| c.secret).collect();
    let picked = regs[0]
        .clone()
        .expect("a secret with the first registration");
    assert_eq!(picked.len(), 64);
    assert_eq!(regs[1].as_deref(), Some(picked.as_str()));
}
