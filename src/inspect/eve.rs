//! EVE JSON alert lines, field-compatible with Suricata's `eve.json`:
//! `timestamp, flow_id, event_type:"alert", src_ip, src_port, dest_ip, dest_port, proto,
//! direction, alert{action, gid, signature_id, rev, signature, category, severity}`.

use std::io::Write;

use serde::Serialize;

use super::Alert;
use crate::detect::rules::{Action, Rule};

/// The guest an alert belongs to (live traffic): the `xen` object of EVE lines.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct XenIdentity {
    pub domid: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub vif: String,
}

#[derive(Serialize)]
struct AlertLine<'a> {
    timestamp: String,
    flow_id: u64,
    event_type: &'static str,
    src_ip: String,
    src_port: u16,
    dest_ip: String,
    dest_port: u16,
    proto: String,
    direction: &'static str,
    alert: AlertBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xen: Option<&'a XenIdentity>,
}

#[derive(Serialize)]
struct AlertBody<'a> {
    action: &'static str,
    gid: u32,
    signature_id: u32,
    rev: u32,
    signature: &'a str,
    category: &'a str,
    severity: u8,
}

/// Writes one alert line.
pub fn write_alert(w: &mut dyn Write, a: &Alert, r: &Rule) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, &alert_value(a, r, None))?;
    w.write_all(b"\n")
}

/// One alert as an EVE JSON value, with the guest's identity for live traffic.
pub fn alert_value(a: &Alert, r: &Rule, xen: Option<&XenIdentity>) -> serde_json::Value {
    let line = AlertLine {
        timestamp: format_ts(a.ts_us),
        flow_id: a.flow_id,
        event_type: "alert",
        src_ip: a.src.to_string(),
        src_port: a.sport,
        dest_ip: a.dst.to_string(),
        dest_port: a.dport,
        proto: a.proto.eve_name(),
        direction: if a.to_server {
            "to_server"
        } else {
            "to_client"
        },
        alert: AlertBody {
            action: match r.action {
                Action::Drop | Action::Reject => "blocked",
                _ => "allowed",
            },
            gid: r.gid,
            signature_id: r.sid,
            rev: r.rev,
            signature: &r.msg,
            category: r.classtype.as_deref().unwrap_or(""),
            severity: r.priority.unwrap_or(3),
        },
        xen,
    };
    serde_json::to_value(&line).unwrap_or(serde_json::Value::Null)
}

/// [`format_ts`] of a point in time (the epoch for one before it).
pub fn format_time(t: std::time::SystemTime) -> String {
    let us = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    format_ts(us)
}

/// `2023-11-14T22:13:20.001665+0000` from microseconds since the epoch (UTC).
pub fn format_ts(us: u64) -> String {
    let secs = us / 1_000_000;
    let micros = us % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{micros:06}+0000")
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps() {
        assert_eq!(super::format_ts(0), "1970-01-01T00:00:00.000000+0000");
        assert_eq!(
            super::format_ts(1_700_000_000_001_665),
            "2023-11-14T22:13:20.001665+0000"
        );
        assert_eq!(
            super::format_ts(951_782_400_000_000),
            "2000-02-29T00:00:00.000000+0000"
        );
    }
}
