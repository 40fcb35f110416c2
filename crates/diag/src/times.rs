//! `since` / `until` values as `iotedge logs` takes them: RFC 3339, unix
//! seconds, or a duration before now (`10m`, `1h30m`, `2d`, `90 minutes`,
//! `1 day`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use verge_core::time::Timestamp;

/// Seconds per unit name (singular, plural and short forms).
fn unit_secs(unit: &str) -> Option<u64> {
    Some(match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 604_800,
        _ => return None,
    })
}

/// Parses `1h30m`, `10 m`, `2 days`, `1 hour 5 minutes`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let bad = || {
        anyhow!(
            "{text:?} is not a duration: give a number and a unit (s, m, h, d, w), \
             e.g. 10m, 1h30m, 2d, \"90 minutes\""
        )
    };
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = rest[digits..].trim_start();
        let letters = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let unit = rest[..letters].to_ascii_lowercase();
        let secs = unit_secs(&unit).ok_or_else(bad)?;
        total = n
            .checked_mul(secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = rest[letters..].trim_start_matches([' ', ',']);
    }
    Ok(Duration::from_secs(total))
}

/// A point in time from `--since`/`--until`, relative to `now`.
pub fn parse_point(text: &str, now: SystemTime) -> anyhow::Result<Timestamp> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<i64>() {
        return Ok(Timestamp::from_millis(secs.saturating_mul(1000)));
    }
    if let Ok(ts) = Timestamp::parse(t) {
        return Ok(ts);
    }
    match parse_duration(t) {
        Ok(d) => {
            let at = now
                .checked_sub(d)
                .filter(|t| *t >= UNIX_EPOCH)
                .unwrap_or(UNIX_EPOCH);
            Ok(Timestamp::from(at))
        }
        Err(_) => bail!(
            "{text:?} is not a time: give RFC 3339 (2024-05-01T10:00:00Z), unix seconds, \
             or a duration before now (10m, 1h, 2d, \"90 minutes\")"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).map(|d| d.as_secs()).ok();
        assert_eq!(d("10m"), Some(600));
        assert_eq!(d("1h"), Some(3600));
        assert_eq!(d("2d"), Some(172_800));
        assert_eq!(d("1h30m"), Some(5400));
        assert_eq!(d("90 minutes"), Some(5400));
        assert_eq!(d("1 day"), Some(86_400));
        assert_eq!(d("1 hour, 5 mins"), Some(3900));
        assert_eq!(d("2W"), Some(1_209_600));
        assert_eq!(d(""), None);
        assert_eq!(d("m"), None);
        assert_eq!(d("10"), None);
        assert_eq!(d("10 parsecs"), None);
        assert_eq!(d("99999999999999999999d"), None);
    }

    #[test]
    fn points() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ms = |s| parse_point(s, now).map(Timestamp::as_millis).ok();
        assert_eq!(ms("10m"), Some((1_000_000 - 600) * 1000));
        assert_eq!(ms("1700000000"), Some(1_700_000_000_000));
        assert_eq!(ms("2024-05-01T10:00:00Z"), Some(1_714_557_600_000));
        assert_eq!(ms("2024-05-01T12:00:00+02:00"), Some(1_714_557_600_000));
        assert_eq!(ms("yesterday"), None);
        // Longer ago than the epoch clamps instead of failing.
        assert_eq!(ms("100w"), Some(0));
    }
}
