//! The one error type of the cloud core. Each variant maps to the HTTP status
//! and IoT Hub error code the service API answers with, so the device endpoint
//! and the REST layer report the same failure the same way.

use verge_core::twin::TwinError;

/// Why a cloud operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The request is malformed or breaks a registry rule (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or invalid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The device or module does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The target of a direct method is not connected (404, IoT Hub's DeviceNotOnline).
    #[error("{0}")]
    NotOnline(String),
    /// The request body is over a size limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The identity already exists and no `If-Match` was given (409).
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` does not match the current etag (412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A bounded queue is full; retry later (429).
    #[error("{0}")]
    Throttled(String),
    /// The device did not answer a direct method in time (504).
    #[error("{0}")]
    Timeout(String),
    /// Disk or engine failure (500).
    #[error("storage: {0}")]
    Storage(String),
    /// The state is shutting down (503).
    #[error("the cloud is shutting down")]
    Closed,
}

impl CloudError {
    /// The HTTP status the service API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::NotFound(_) | Self::NotOnline(_) => 404,
            Self::Conflict(_) => 409,
            Self::TooLarge(_) => 413,
            Self::PreconditionFailed(_) => 412,
            Self::Throttled(_) => 429,
            Self::Timeout(_) => 504,
            Self::Storage(_) => 500,
            Self::Closed => 503,
        }
    }

    /// IoT Hub's error code name (the `ErrorCode:` part of its error messages).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "ArgumentInvalid",
            Self::Unauthorized(_) => "IotHubUnauthorizedAccess",
            Self::NotFound(_) => "DeviceNotFound",
            Self::NotOnline(_) => "DeviceNotOnline",
            Self::Conflict(_) => "DeviceAlreadyExists",
            Self::TooLarge(_) => "MessageTooLarge",
            Self::PreconditionFailed(_) => "PreconditionFailed",
            Self::Throttled(_) => "ThrottlingException",
            Self::Timeout(_) => "GatewayTimeout",
            Self::Storage(_) => "ServerError",
            Self::Closed => "ServiceUnavailable",
        }
    }
}

impl From<fjall::Error> for CloudError {
    fn from(e: fjall::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

impl From<TwinError> for CloudError {
    fn from(e: TwinError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

/// Shorthand for results of cloud operations.
pub type Result<T, E = CloudError> = std::result::Result<T, E>;
