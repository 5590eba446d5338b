//! The registry over https (`--registry-ca`): an agent registers through a TLS endpoint
//! whose certificate chains to the given CA (a proxy, or dns-server's own `--tls-cert`),
//! refuses one that does not, and a token is never sent over plain http to another host
//! unless `--insecure`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::*;

/// A CA and a certificate for 127.0.0.1 signed by it, made with `openssl` in `dir`:
/// (ca.pem, leaf.pem, leaf.key). `None` (after a loud message) without openssl.
fn make_certs(
    dir: &Path,
    name: &str,
) -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "openssl is needed for the TLS tests"
        );
        eprintln!("SKIP: no openssl to make test certificates");
        return None;
    }
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    std::fs::write(
        p("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let s = |x: std::path::PathBuf| x.to_string_lossy().into_owned();
    let (ca, ca_key, key, csr, leaf, ext) = (
        s(p("ca.pem")),
        s(p("ca.key")),
        s(p("leaf.key")),
        s(p("leaf.csr")),
        s(p("leaf.pem")),
        s(p("ext")),
    );
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        "/CN=membrane test CA",
    ]);
    run(&a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
    run(&a);
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &leaf,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    Some((p("ca.pem"), p("leaf.pem"), p("leaf.key")))
}

/// A TLS-terminating proxy on 127.0.0.1 in front of `upstream`; its port.
fn tls_proxy(cert: &Path, key: &Path, upstream: u16) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let acc = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acc.accept(s).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
    });
    port
}

#[test]
fn registers_over_https_with_the_given_ca_and_refuses_another() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((ca, leaf, key)) = make_certs(tmp.path(), "good") else {
        return;
    };
    let Some((other_ca, _, _)) = make_certs(tmp.path(), "other") else {
        return;
    };
    let server = Server::start(&tmp.path().join("data"), 0, &["--admin-token", ADMIN_TOKEN]);
    let port = tls_proxy(&leaf, &key, server.port);
    let url = format!("https://127.0.0.1:{port}");
    let mut args = quick("w1", "tls", &url);
    create_namespace(&server, "tls");
    args.extend(["--token".into(), ADMIN_TOKEN.into()]);
    let mut good = args.clone();
    good.extend(["--registry-ca".into(), ca.to_string_lossy().into()]);
    let a = Agent::start(&good, &tmp.path().join("a"), &[]);
    a.wait_registered();
    assert_eq!(server.membrane("tls", "w1").unwrap()["state"], "passing");
    // The same through MEMBRANE_REGISTRY_CA, for a one-shot query.
    let out = run_agent_env(
        &[
            "list",
            "--namespace",
            "tls",
            "--registry-url",
            &url,
            "--token",
            ADMIN_TOKEN,
            "--state-dir",
            &tmp.path().join("q").to_string_lossy(),
        ],
        &[("MEMBRANE_REGISTRY_CA", &ca.to_string_lossy())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("w1"));

    // A CA that did not sign the registry's certificate: no registration.
    let mut bad = quick("w2", "tls", &url);
    bad.extend(["--token".into(), ADMIN_TOKEN.into()]);
    bad.extend(["--registry-ca".into(), other_ca.to_string_lossy().into()]);
    let b = Agent::start(&bad, &tmp.path().join("b"), &[]);
    wait_for("a TLS failure", Duration::from_secs(10), || {
        b.log().contains("TLS").then_some(())
    });
    assert!(server.membrane("tls", "w2").is_none());
    // https without a CA file: a clear configuration error.
    let out = run_agent(&[
        "list",
        "--namespace",
        "tls",
        "--registry-url",
        &url,
        "--state-dir",
        &tmp.path().join("q").to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--registry-ca"), "{}", stderr(&out));
}

#[test]
fn a_token_never_goes_over_plain_http_to_another_host_without_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    // No traffic leaves: the configuration is refused before any connection.
    let out = run_agent(&[
        "list",
        "--namespace",
        "ns",
        "--registry-url",
        "http://192.0.2.1:8765",
        "--token",
        "secret-token-123",
        "--state-dir",
        &dir.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("in clear"), "{}", stderr(&out));
    let out = run_agent(&[
        "run",
        "--id",
        "w1",
        "--namespace",
        "ns",
        "--registry-url",
        "http://192.0.2.1:8765",
        "--token",
        "secret-token-123",
        "--state-dir",
        &dir.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--insecure"), "{}", stderr(&out));
}

#[test]
fn dns_server_serves_https_itself_and_refuses_bad_tls_files() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((ca, leaf, key)) = make_certs(tmp.path(), "srv") else {
        return;
    };
    let Some((_, _, other_key)) = make_certs(tmp.path(), "other") else {
        return;
    };
    // Configuration errors exit 64 and name the problem.
    let run_bad = |tls: &[&Path]| {
        let mut cmd = Command::new(dns_server_bin());
        cmd.arg("--data-dir")
            .arg(tmp.path().join("bad"))
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--dns-listen",
                "127.0.0.1:0",
            ])
            .env_remove("MEMBRANE_ADMIN_TOKEN");
        for (flag, p) in ["--tls-cert", "--tls-key"].iter().zip(tls) {
            cmd.arg(flag).arg(p);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        stderr(&out)
    };
    let bad = |cert: &Path, key: &Path| run_bad(&[cert, key]);
    let e = run_bad(&[&leaf]);
    assert!(e.contains("go together"), "{e}");
    let e = bad(&leaf, &other_key);
    assert!(e.contains("does not go with"), "{e}");
    let e = bad(&tmp.path().join("missing.pem"), &key);
    assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");
    let e = bad(&key, &key);
    assert!(e.contains("no PEM certificate"), "{e}");

    let (cert_s, key_s) = (leaf.to_string_lossy(), key.to_string_lossy());
    let server = Server::start(
        &tmp.path().join("data"),
        0,
        &[
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
            "--http-header-timeout",
            "1s",
        ],
    );
    let url = format!("https://127.0.0.1:{}", server.port);
    let mut args = quick("w1", "tls", &url);
    args.extend(["--registry-ca".into(), ca.to_string_lossy().into()]);
    let a = Agent::start(&args, &tmp.path().join("a"), &[]);
    a.wait_registered();
    // The event stream works over TLS too (the server writes it outside hyper): a second
    // membrane reaches the first agent's cache through it.
    let mut args2 = quick("w2", "tls", &url);
    args2.extend(["--registry-ca".into(), ca.to_string_lossy().into()]);
    let b = Agent::start(&args2, &tmp.path().join("b"), &[]);
    b.wait_registered();
    wait_for("w2 in w1's live cache", Duration::from_secs(10), || {
        let s = a.status()?;
        (s["cache"]["live"] == true && s["cache"]["membranes"] == 2).then_some(())
    });
    drop(b);
    // Plain http to the TLS port gets no HTTP answer, and the server goes on.
    let plain = http(server.port, "GET", "/health", None);
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain http answered: {plain:?}"
    );
    let out = run_agent_env(
        &[
            "list",
            "--namespace",
            "tls",
            "--registry-url",
            &url,
            "--state-dir",
            &tmp.path().join("q").to_string_lossy(),
        ],
        &[("MEMBRANE_REGISTRY_CA", &ca.to_string_lossy())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("w1"));
    // A client that starts a handshake and stalls is closed after the header timeout.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 64];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
