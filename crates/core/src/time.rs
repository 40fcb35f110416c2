//! UTC timestamps with millisecond precision, as IoT Hub writes them
//! (`2026-11-25T10:00:00.000Z`) in property bags and twin metadata.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

/// A timestamp that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not an ISO 8601 / RFC 3339 timestamp")]
pub struct TimestampError {
    /// The offending text.
    pub value: String,
}

impl Timestamp {
    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// This time plus a number of seconds, saturating.
    pub fn plus_secs(self, secs: u64) -> Self {
        let ms = i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000);
        Self(self.0.saturating_add(ms))
    }

    /// Parses RFC 3339 (`…Z` or `…+02:00`, any fraction), and also the offset-less
    /// form Python's `datetime.isoformat()` gives for naive datetimes, read as UTC.
    /// Precision beyond a millisecond is dropped.
    pub fn parse(value: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError {
            value: value.to_owned(),
        };
        let dt = match OffsetDateTime::parse(value, &Rfc3339) {
            Ok(dt) => dt,
            Err(_) => {
                let naive = time::macros::format_description!(
                    version = 2,
                    "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
                );
                PrimitiveDateTime::parse(value, &naive)
                    .map_err(|_| err())?
                    .assume_offset(UtcOffset::UTC)
            }
        };
        let ms = dt.unix_timestamp_nanos() / 1_000_000;
        i64::try_from(ms).map(Self).map_err(|_| err())
    }

    /// Formats as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn to_iso8601(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(dt) => {
                let fmt = time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
                );
                dt.format(&fmt).unwrap_or_else(|_| self.0.to_string())
            }
            // Out of the calendar's range: only reachable from a corrupt value.
            Err(_) => self.0.to_string(),
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        if t.0 >= 0 {
            UNIX_EPOCH + Duration::from_millis(t.0.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_millis(t.0.unsigned_abs())
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_iso8601())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_iso8601())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_iso8601())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let t = Timestamp::from_millis(1_764_064_800_123);
        assert_eq!(t.to_iso8601(), "2025-11-25T10:00:00.123Z");
        assert_eq!(Timestamp::parse("2025-11-25T10:00:00.123Z").unwrap(), t);
        assert_eq!(
            Timestamp::parse("2025-11-25T12:00:00.123+02:00").unwrap(),
            t
        );
        assert_eq!(Timestamp::parse("2025-11-25T10:00:00.123456").unwrap(), t);
        assert_eq!(
            Timestamp::parse("2025-11-25T10:00:00").unwrap(),
            Timestamp::from_millis(1_764_064_800_000)
        );
        assert!(Timestamp::parse("yesterday").is_err());
        assert!(Timestamp::parse("").is_err());
        assert_eq!(
            Timestamp::from_millis(-1).to_iso8601(),
            "1969-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn system_time_round_trip() {
        let t = Timestamp::from_millis(5_000);
        assert_eq!(Timestamp::from(SystemTime::from(t)), t);
        assert_eq!(t.plus_secs(7200).as_millis(), 7_205_000);
        assert_eq!(
            Timestamp::from_millis(i64::MAX - 1)
                .plus_secs(10)
                .as_millis(),
            i64::MAX
        );
    }
}
