//! Every answer that is not a success: one enum, its HTTP status and a JSON body
//! `{"error": {"code", "message"}}` naming the problem.
//!
//! ```text
//! handler ─Err(ApiError)─▶ IntoResponse: status (4xx: the client's input; 503: Redis or RabbitMQ
//!                          away, the client may retry) + Retry-After where it applies + JSON body
//! ```
//! Client input never becomes a 5xx: only `Unavailable` (a backing service is away) and
//! `Internal` (a bug; logged) do.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or a parameter is not what the endpoint takes (malformed JSON, wrong types).
    #[error("{0}")]
    BadRequest(String),
    /// The body is well-formed but the job cannot run (its values, its images).
    #[error("{0}")]
    Invalid(String),
    /// A model no live worker serves.
    #[error("{0}")]
    UnknownModel(String),
    #[error("{0}")]
    PriorityAboveCeiling(String),
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("no API key: send `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("the API key is not known")]
    UnknownKey,
    #[error("the API key was revoked")]
    RevokedKey,
    /// Not found, or another tenant's (the same answer: ids of others are not disclosed).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotReady(String),
    #[error("the Idempotency-Key was used with another request body (job `{0}`)")]
    IdempotencyConflict(String),
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{message}")]
    QuotaExceeded { message: String, retry_after_s: u64 },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Redis or RabbitMQ is away: nothing was queued; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code (docs/http.md lists them).
    pub code: String,
    /// What was wrong, for a person.
    pub message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            BadRequest(_) => StatusCode::BAD_REQUEST,
            Invalid(_) | UnknownModel(_) | PriorityAboveCeiling(_) => StatusCode::UNPROCESSABLE_ENTITY,
            TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            MissingKey | UnknownKey | RevokedKey => StatusCode::UNAUTHORIZED,
            NotFound(_) => StatusCode::NOT_FOUND,
            NotReady(_) | IdempotencyConflict(_) => StatusCode::CONFLICT,
            RateLimited { .. } | QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadRequest(_) => "bad_request",
            Invalid(_) => "invalid_job",
            UnknownModel(_) => "unknown_model",
            PriorityAboveCeiling(_) => "priority_above_ceiling",
            TooLarge(_) => "body_too_large",
            MissingKey => "missing_key",
            UnknownKey => "unknown_key",
            RevokedKey => "revoked_key",
            NotFound(_) => "not_found",
            NotReady(_) => "not_ready",
            IdempotencyConflict(_) => "idempotency_conflict",
            RateLimited { .. } => "rate_limited",
            QuotaExceeded { .. } => "quota_exceeded",
            UnsupportedMediaType(_) => "unsupported_media_type",
            Unavailable(_) => "unavailable",
            Internal(_) => "internal",
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::Unavailable(format!("redis: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        };
        let mut r = (status, axum::Json(body)).into_response();
        let retry = match &self {
            ApiError::RateLimited { retry_after_s, .. } | ApiError::QuotaExceeded { retry_after_s, .. } => {
                Some(*retry_after_s)
            }
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(s) = retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        if matches!(
            self,
            ApiError::MissingKey | ApiError::UnknownKey | ApiError::RevokedKey
        ) {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// axum's own rejections (bad JSON, a body over the limit, a bad path) as JSON errors.
pub fn from_rejection(status: StatusCode, text: String, limit: usize) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(limit),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(text),
        _ => ApiError::BadRequest(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_are_4xx_with_a_code() {
        let q = ApiError::QuotaExceeded {
            message: "x".into(),
            retry_after_s: 3,
        };
        let r = q.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        for e in [
            ApiError::BadRequest("x".into()),
            ApiError::UnknownModel("m".into()),
            ApiError::TooLarge(1),
            ApiError::RevokedKey,
        ] {
            assert!(e.status().is_client_error(), "{}", e.code());
        }
    }
}
