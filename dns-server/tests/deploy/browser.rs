//! The web page at `/` in headless Chromium, driven over the Chrome DevTools Protocol (a
//! minimal WebSocket client below, no extra crates): the real `dns-server` on port 0, the
//! page opened, membranes registered and deregistered over HTTP, and the page must show
//! them without a reload (through its event stream). A screenshot is saved and its path
//! printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::{COGNITIVE, ensure, require};
use crate::harness::{Http, Server};

/// A WebSocket client, just enough for CDP: text frames, client-masked, no extensions.
struct Ws {
    stream: TcpStream,
}

impl Ws {
    fn connect(url: &str) -> Ws {
        let rest = url.strip_prefix("ws://").expect("ws:// URL");
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut stream = TcpStream::connect(host).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "no WebSocket upgrade: {head}"
        );
        Ws { stream }
    }

    fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// The next complete text message (continuation frames joined).
    fn recv(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.stream.read_exact(&mut h).unwrap();
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b).unwrap();
                len = u16::from_be_bytes(b).into();
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b).unwrap();
                len = u64::from_be_bytes(b);
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).unwrap();
            match opcode {
                0x8 => panic!("DevTools closed the WebSocket"),
                0x9 | 0xA => continue, // ping/pong: Chromium does not ping; ignore
                _ => message.extend_from_slice(&payload),
            }
            if fin {
                return String::from_utf8(message).unwrap();
            }
        }
    }
}

/// A CDP session on one page target.
struct Cdp {
    ws: Ws,
    next: u64,
    /// Exceptions and console errors reported by the page.
    errors: Vec<String>,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(&json!({"id": id, "method": method, "params": params}).to_string());
        loop {
            let msg: Value = serde_json::from_str(&self.ws.recv()).unwrap();
            if msg["id"] == id {
                assert!(msg["error"].is_null(), "{method}: {msg}");
                return msg["result"].clone();
            }
            match msg["method"].as_str() {
                Some("Runtime.exceptionThrown") => self
                    .errors
                    .push(msg["params"]["exceptionDetails"].to_string()),
                Some("Runtime.consoleAPICalled") if msg["params"]["type"] == "error" => {
                    self.errors.push(msg["params"]["args"].to_string())
                }
                _ => {}
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r["exceptionDetails"].is_null(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is `true` (20 s at most).
    fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.eval(expr) == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText");
                panic!("timed out waiting for {what} ({expr}); page text:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Headless Chromium in its own process group, killed (group and all) on drop.
struct Browser {
    child: Child,
    /// ws://127.0.0.1:PORT of the DevTools endpoint.
    http: String,
    _stderr: mpsc::Receiver<String>,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let http = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("chromium did not start:\n{}", seen.join("\n")));
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                let rest = url.trim().strip_prefix("ws://").unwrap();
                break format!("http://{}", &rest[..rest.find('/').unwrap()]);
            }
            seen.push(line);
        };
        Browser {
            child,
            http,
            _stderr: rx,
        }
    }

    /// Opens `url` in a new tab and attaches to it.
    async fn open(&self, url: &str) -> Cdp {
        let (status, target) = Http::new(self.http.clone())
            .call("PUT", &format!("/json/new?{url}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{target}");
        let ws = Ws::connect(target["webSocketDebuggerUrl"].as_str().unwrap());
        let mut cdp = Cdp {
            ws,
            next: 0,
            errors: Vec::new(),
        };
        cdp.call("Runtime.enable", json!({}));
        cdp.call("Page.enable", json!({}));
        cdp
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group holds the launcher script, the browser and its helpers.
        let pgid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let v: Vec<u32> = chunk.iter().map(|c| u32::from(val(*c))).collect();
        let n = v
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (x << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if v.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if v.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

async fn register(
    http: &Http,
    id: &str,
    parent: Option<&str>,
    svc: &str,
    port: u16,
    caps: &[&str],
    n: usize,
) {
    let mut body = json!({
        "addresses": [format!("10.0.0.{}", n + 10)],
        "services": [{"name": svc, "proto": "tcp", "port": port}],
        "capabilities": caps,
        "endpoint": {"mode": "shared-volume", "path": "/var/lib/membrane/shared"},
    });
    if let Some(p) = parent {
        body["parent"] = json!(p);
    }
    let (status, v) = http
        .call(
            "PUT",
            &format!("/v1/namespaces/cognitive-system/membranes/{id}"),
            Some(&body.to_string()),
        )
        .await
        .unwrap();
    assert!(status == 201 || status == 200, "{v}");
}

fn row(id: &str) -> String {
    format!("document.querySelector('#membranes tr[data-id=\"{id}\"]') !== null")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_is_live_in_headless_chromium() {
    if !require(
        ensure("chromium", "chromium"),
        "web_page_is_live_in_headless_chromium",
        "chromium (Debian package chromium)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let http = Http::new(server.url());
    // Everything but visual-worker-1, which arrives while the page is open.
    for (n, (id, parent, svc, port, caps)) in COGNITIVE.iter().enumerate() {
        if *id != "visual-worker-1" {
            register(&http, id, *parent, svc, *port, caps, n).await;
        }
    }
    let browser = Browser::start(&dir.path().join("profile"));
    let mut page = browser
        .open(&format!("{}/#cognitive-system", server.url()))
        .await;

    page.wait_for("the membranes table", &row("perception"));
    page.wait_for(
        "the event stream",
        "document.getElementById('live').dataset.state === 'live'",
    );
    assert_eq!(
        page.eval("document.getElementById('title').textContent"),
        "cognitive-system"
    );
    assert_eq!(page.eval(&row("visual-worker-1")), false);
    // Marks this document: a reload would lose it.
    page.eval("window.__sameDocument = true");

    register(
        &http,
        "visual-worker-1",
        Some("perception"),
        "visual",
        7101,
        &["vision"],
        2,
    )
    .await;
    page.wait_for("visual-worker-1 in the table", &row("visual-worker-1"));
    page.wait_for(
        "visual-worker-1 under perception in the tree",
        "document.querySelector('#tree li[data-id=\"perception\"] li[data-id=\"visual-worker-1\"]') !== null",
    );
    assert_eq!(
        page.eval("window.__sameDocument === true"),
        true,
        "the page reloaded"
    );
    let cells = page.eval(
        "[...document.querySelectorAll('#membranes tr[data-id=\"visual-worker-1\"] > *')].map(c => c.textContent.trim())",
    );
    let cells: Vec<&str> = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        &cells[..4],
        [
            "visual-worker-1",
            "passing",
            "perception",
            "_visual._tcp:7101"
        ],
        "{cells:?}"
    );
    assert_eq!(cells[4], "10.0.0.12");
    assert_eq!(cells[5], "shared-volume/var/lib/membrane/shared"); // mode, then path below
    assert_eq!(cells[6], "vision");
    assert!(cells[7].ends_with(" s"), "age: {cells:?}");
    assert!(cells[8].ends_with(" s ago"), "last heartbeat: {cells:?}");
    // The namespace list follows: 6 registered, all passing.
    page.wait_for(
        "the namespace count",
        "document.querySelector('nav button[data-ns=\"cognitive-system\"] .count').textContent === '6/6'",
    );

    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // Kept after the test, to be looked at.
    let keep = tempfile::Builder::new()
        .prefix("membrane-ui-")
        .tempdir()
        .unwrap()
        .keep();
    let path = keep.join("web-page.png");
    std::fs::write(&path, &png).unwrap();
    // Straight to stderr (not captured by the harness): the path is the point.
    let _ = writeln!(std::io::stderr(), "screenshot: {}", path.display());

    // Deregistration leaves the table and the tree, still without a reload.
    let (status, v) = http
        .call(
            "DELETE",
            "/v1/namespaces/cognitive-system/membranes/motor-worker",
            None,
        )
        .await
        .unwrap();
    assert!(status == 204 || status == 200, "{status} {v}");
    page.wait_for(
        "motor-worker gone",
        "document.querySelector('[data-id=\"motor-worker\"]') === null",
    );
    assert_eq!(
        page.eval("window.__sameDocument === true"),
        true,
        "the page reloaded"
    );
    assert!(page.errors.is_empty(), "page errors: {:?}", page.errors);
    drop(browser);
}
