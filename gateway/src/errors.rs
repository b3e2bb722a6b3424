//! HTTP error answers: a status and a JSON body
//! `{"error": {"code", "name", "message", "temporary"}}`, the same shape as
//! the WebSocket `error` frame.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, HeaderValue, StatusCode};
use protocol::{ErrorCode, ErrorFrame};

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub status: Option<StatusCode>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
            retry_after: None,
        }
    }

    /// Overrides the code's usual status (e.g. 415 for a bad content type).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> protocol::api::ErrorBody {
        protocol::api::ErrorBody {
            error: ErrorFrame::new(None, self.code, self.message.clone()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
        });
        let mut res = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    /// Errors cross the library's boundaries typed (`thiserror`); `anyhow`
    /// is for the binary (`main.rs`) and tests only.
    #[test]
    fn the_library_has_typed_errors() {
        let found: Vec<String> = crate::sources()
            .into_iter()
            .filter(|(path, text)| {
                !path.ends_with("main.rs")
                    && !path.ends_with("errors.rs")
                    && text.contains("anyhow")
            })
            .map(|(path, _)| path.display().to_string())
            .collect();
        assert!(found.is_empty(), "anyhow in library code: {found:?}");
    }
}
