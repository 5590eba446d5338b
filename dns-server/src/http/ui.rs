//! `GET /`: the live web page, embedded in the binary (no CDN, no external assets).
//!
//! The page lists namespaces, the selected namespace's hierarchy and membranes (state, age,
//! endpoints) and stays current through `GET /v1/namespaces/{ns}/events` (SSE). It is
//! exercised in headless Chromium by `tests/deploy/browser.rs`.

use axum::http::header;
use axum::response::IntoResponse;

const INDEX: &str = include_str!("ui/index.html");

/// Same-origin only: inline script and style (the page is one file), fetch/EventSource to
/// this server, no framing, no forms, no plugins.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page.
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The page changes with the binary: always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
}
