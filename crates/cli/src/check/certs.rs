//! `verge check`'s certificate checks: the edge CA and the trust bundle
//! by days left, the certificates verged issued by the share of their
//! lifetime used.

use std::path::Path;
use std::time::SystemTime;

use time::OffsetDateTime;

use super::{Builder, CONFIG, CONNECT, Outcome, fmt_odt};
use crate::mgmt::Mgmt;

/// Warn when a certificate has fewer days than this left.
const CERT_WARN_DAYS: i64 = 30;
/// Warn when an issued certificate has used this share of its lifetime.
/// They are short-lived by design (30 days; ca.rs) and their holders fetch
/// new ones as they near expiry, so days left would always warn; past 80 %
/// (where verged itself renews) the holder has missed its renewal.
const ISSUED_WARN_FRACTION: f64 = verge_daemon::ca::RENEW_AT_FRACTION;

pub(super) fn cert_check(
    b: &mut Builder,
    id: &'static str,
    description: &'static str,
    path: &Path,
    auto: bool,
    now: SystemTime,
) {
    let mut add = |result, details| b.add(id, CONFIG, description, result, details);
    let pem = match std::fs::read_to_string(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && auto => {
            add(
                Outcome::Warning,
                vec![format!(
                    "{} does not exist yet: verged generates it when it starts",
                    path.display()
                )],
            );
            return;
        }
        Err(e) => {
            add(
                Outcome::Error,
                vec![format!("cannot read {}: {e}", path.display())],
            );
            return;
        }
    };
    let (not_before, not_after) = match verge_daemon::ca::pem_validity(&pem) {
        Ok(v) => v,
        Err(e) => {
            add(Outcome::Error, vec![format!("{}: {e}", path.display())]);
            return;
        }
    };
    let now = OffsetDateTime::from(now);
    let left = not_after - now;
    let mut details = vec![format!(
        "{} valid until {}",
        path.display(),
        fmt_odt(not_after)
    )];
    let result = if not_after <= now {
        details.push(if auto {
            "expired: restart verged to generate a new one".to_owned()
        } else {
            "expired: install a new certificate and restart verged".to_owned()
        });
        Outcome::Error
    } else if not_before > now {
        details.push(format!(
            "not valid before {}: the system clock is probably wrong",
            fmt_odt(not_before)
        ));
        Outcome::Error
    } else if left.whole_days() < CERT_WARN_DAYS {
        details.push(if auto {
            format!(
                "expires in {} days; verged renews its auto-generated CA by itself",
                left.whole_days()
            )
        } else {
            format!("expires in {} days: renew it soon", left.whole_days())
        });
        Outcome::Warning
    } else {
        details.push(format!("{} days left", left.whole_days()));
        Outcome::Ok
    };
    if auto {
        details.push(
            "auto-generated CA: for testing only; configure [edge_ca] cert and pk for production"
                .to_owned(),
        );
    }
    add(result, details);
}

/// The verdict on one issued certificate: × when expired (or not yet
/// valid), ‼ past [`ISSUED_WARN_FRACTION`] of its lifetime, else ✓.
pub fn issued_outcome(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Outcome {
    if not_after <= now || not_before > now {
        Outcome::Error
    } else if verge_daemon::ca::renewal_due(not_before, not_after, now, ISSUED_WARN_FRACTION) {
        Outcome::Warning
    } else {
        Outcome::Ok
    }
}

fn parse_odt(iso: &str) -> Option<OffsetDateTime> {
    let t = verge_core::time::Timestamp::parse(iso).ok()?;
    Some(OffsetDateTime::from(SystemTime::from(t)))
}

/// Days, or hours when under two days (issued certificates live for 30 days).
fn fmt_left(d: time::Duration) -> String {
    if d.whole_days() >= 2 {
        format!("{} days", d.whole_days())
    } else {
        format!("{} hours", d.whole_hours())
    }
}

/// One check over every certificate verged recorded issuing, with a line
/// each; the worst verdict is the check's. It asks verged, so it sits with
/// the connectivity checks.
pub(super) async fn issued_check(b: &mut Builder, m: &Mgmt, now: OffsetDateTime) {
    let id = "issued-certs-expiry";
    let description = "certificates issued by the edge CA";
    let list = match m.certificates().await {
        Ok(Some(l)) => l,
        Ok(None) => {
            b.add(
                id,
                CONNECT,
                description,
                Outcome::Skipped,
                vec!["this verged does not list issued certificates: update it".to_owned()],
            );
            return;
        }
        Err(e) => {
            b.add(
                id,
                CONNECT,
                description,
                Outcome::Warning,
                vec![format!("cannot list them: {e:#}")],
            );
            return;
        }
    };
    let mut worst = Outcome::Ok;
    let mut details = vec![format!(
        "issued by {} (valid until {})",
        list.edge_ca.common_name, list.edge_ca.not_after
    )];
    if list.issued.is_empty() {
        details.push("none issued yet".to_owned());
    }
    for c in &list.issued {
        let what = format!("{} {} certificate (CN {})", c.module, c.kind, c.common_name);
        let (Some(nb), Some(na)) = (parse_odt(&c.not_before), parse_odt(&c.not_after)) else {
            worst = worst.max(Outcome::Warning);
            details.push(format!(
                "{what}: unreadable validity {} – {}",
                c.not_before, c.not_after
            ));
            continue;
        };
        let outcome = issued_outcome(nb, na, now);
        worst = worst.max(outcome);
        let life = (na - nb).as_seconds_f64().max(1.0);
        let used = ((now - nb).as_seconds_f64() / life * 100.0).clamp(0.0, 100.0);
        details.push(match outcome {
            Outcome::Error if na <= now => format!(
                "\u{d7} {what}: expired at {}; restart {} so it asks verged for a new one",
                fmt_odt(na),
                c.module
            ),
            Outcome::Error => format!(
                "\u{d7} {what}: not valid before {}: the system clock is probably wrong",
                fmt_odt(nb)
            ),
            Outcome::Warning => format!(
                "\u{203c} {what}: expires {} ({} left, {used:.0} % of its lifetime used); \
                 {} should have renewed it by now — restart it if it does not",
                fmt_odt(na),
                fmt_left(na - now),
                c.module
            ),
            _ => format!(
                "\u{2713} {what}: valid until {} ({} left)",
                fmt_odt(na),
                fmt_left(na - now)
            ),
        });
    }
    b.add(id, CONNECT, description, worst, details);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certs_warn_by_share_of_lifetime() {
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + time::Duration::days(30);
        let at = |days: f64| nb + time::Duration::seconds_f64(days * 86_400.0);
        // 29 days left of 30 is fine; fewer than 30 days left is not, by itself, a warning.
        assert_eq!(issued_outcome(nb, na, at(1.0)), Outcome::Ok);
        assert_eq!(issued_outcome(nb, na, at(23.9)), Outcome::Ok);
        assert_eq!(issued_outcome(nb, na, at(24.1)), Outcome::Warning);
        assert_eq!(issued_outcome(nb, na, at(29.99)), Outcome::Warning);
        assert_eq!(issued_outcome(nb, na, at(30.0)), Outcome::Error);
        assert_eq!(issued_outcome(nb, na, at(-1.0)), Outcome::Error);
        // Worst wins when folding with max (Skipped is never folded in).
        assert_eq!(Outcome::Ok.max(Outcome::Warning), Outcome::Warning);
        assert_eq!(Outcome::Error.max(Outcome::Warning), Outcome::Error);
        assert_eq!(fmt_left(time::Duration::hours(30)), "30 hours");
        assert_eq!(fmt_left(time::Duration::days(5)), "5 days");
    }
}
