//! The API's error type: every failure becomes `{"error": {"code", "message"}}` with a
//! fitting status, and never leaks internals (store errors are logged, not sent).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::{ErrorBody, ErrorDetail};

use crate::registry::RegistryError;

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    /// Status code.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    /// 400 for a name in the path that is not a valid label.
    pub fn invalid_name(e: impl ToString) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_name", e.to_string())
    }
    /// 404 for an unknown route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no_such_route",
            format!("no route for {path}; see the README for the API"),
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        use RegistryError::*;
        let (status, code) = match &e {
            NamespaceNotFound(_) => (StatusCode::NOT_FOUND, "namespace_not_found"),
            MembraneNotFound(..) => (StatusCode::NOT_FOUND, "membrane_not_found"),
            NamespaceExists(_) => (StatusCode::CONFLICT, "namespace_exists"),
            NamespaceNotEmpty(..) => (StatusCode::CONFLICT, "namespace_not_empty"),
            AlreadyRegistered(..) => (StatusCode::CONFLICT, "already_registered"),
            Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"),
            Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            // A 5xx: agents retry (and try other replicas) until room is made.
            Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "registry_full"),
            StoreUnreachable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unreachable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
