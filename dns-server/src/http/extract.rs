//! Request extractors whose rejections are JSON [`ApiError`]s: a size-limited JSON body,
//! the caller's credentials, and validated names in the path.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use shared::model::SECRET_HEADER;
use shared::{MembraneId, NamespaceName};

use super::AppState;
use super::error::ApiError;
use crate::registry::{Caller, hash_secret};

/// A JSON body, read within the body limit and parsed strictly (unknown fields rejected by
/// the target type). Content-Type is not required, so `curl -d` works.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            let status = rej.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "body_too_large",
                    format!(
                        "request body is larger than the limit of {} bytes",
                        state.max_body
                    ),
                )
            } else {
                ApiError::new(status, "bad_body", rej.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses JSON: syntax errors are 400, type and field errors 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "request body is empty; a JSON object is required",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                e.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("request body is not valid JSON: {e}"),
            ),
        }
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .map(|v| {
                    v.to_str().map(str::trim).map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "bad_header",
                            format!("header {name} is not valid text"),
                        )
                    })
                })
                .transpose()
        };
        let bearer = match header("authorization")? {
            None => None,
            Some(v) => match v.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                    Some(token.trim().to_string())
                }
                _ => {
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "Authorization must be 'Bearer TOKEN'",
                    ));
                }
            },
        };
        let secret = header(SECRET_HEADER)?.map(str::to_string);
        // `replace=true` in the query: the one flag every route reads the same way (a route
        // with its own query parameters rejects it as unknown, as any stray parameter).
        let mut replace = false;
        for pair in parts.uri.query().unwrap_or("").split('&') {
            match pair {
                "replace=true" => replace = true,
                "replace=false" => replace = false,
                p if p == "replace" || p.starts_with("replace=") => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        "replace must be true or false",
                    ));
                }
                _ => {}
            }
        }
        let open = state.admin_token_hash.is_none();
        let admin = match (&state.admin_token_hash, &bearer) {
            (Some(h), Some(t)) => hash_secret(t) == *h,
            _ => false,
        };
        Ok(Caller {
            open,
            admin,
            bearer: if admin { None } else { bearer },
            secret,
            replace,
        })
    }
}

/// Validates a namespace from the path.
pub fn ns(s: &str) -> Result<NamespaceName, ApiError> {
    NamespaceName::new(s).map_err(ApiError::invalid_name)
}

/// Validates a membrane id from the path.
pub fn id(s: &str) -> Result<MembraneId, ApiError> {
    MembraneId::new(s).map_err(ApiError::invalid_name)
}

/// A query string, rejected as JSON 400 when it does not parse (unknown keys included).
pub struct Q<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Q(q.0))
            .map_err(|rej| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rej.body_text()))
    }
}

/// Path parameters, rejected as JSON 400.
pub struct P<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| P(p.0))
            .map_err(|rej| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", rej.body_text()))
    }
}
