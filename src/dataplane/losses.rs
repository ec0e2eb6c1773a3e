//! Telling the operator when traffic goes uninspected.
//!
//! A worker that falls behind loses frames to inspection: in passive mode the kernel drops
//! what no longer fits the capture queue or ring (the guest's traffic still flows, unseen);
//! in inline mode frames wait past `max_wait_us` (dropped with `fail = "closed"`, forwarded
//! uninspected with `"open"`), overflow a worker's receive queue, are too long to read or are
//! refused on send ([`VifCounters::lost`](super::VifCounters::lost) counts all but the
//! forwarded ones, which reached their destination). The counters say so (`virtsec status`
//! LOST, XenStore's `lost`, `virtsec_vif_drops_total`), but counters are read when someone
//! already suspects something: a security team must be told that a guest's traffic went
//! uninspected, as Suricata's kernel-drop statistics tell its users. So the daemon logs it
//! (syslog by default) with the guest's identity: a vif's first loss within a second, then
//! at most once every [`REPORT_EVERY`] with what was lost since, by cause. One line a
//! minute per vif at worst: a worker that stays behind does not flood the log it reports to.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use super::VifStatus;

/// After a vif's first report, how often at most it is reported again.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// A vif's frames lost to inspection, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// The passive capture queue or ring was full.
    pub capture: u64,
    /// An inline worker's receive queue was full.
    pub queue: u64,
    /// Inline frames that waited past `max_wait_us` and were dropped (fail closed).
    pub overload: u64,
    /// Inline frames that waited past `max_wait_us` and were forwarded uninspected (fail
    /// open).
    pub bypassed: u64,
    /// Inline frames too long to read whole.
    pub truncated: u64,
    /// Inline frames the kernel refused to send on.
    pub send: u64,
}

impl Losses {
    /// What a vif's status counts.
    pub fn of(s: &VifStatus) -> Losses {
        let inline = s.inline.as_ref();
        Losses {
            capture: s.capture_drops,
            queue: inline.map_or(0, |i| i.queue_drops),
            overload: inline.map_or(0, |i| i.overload_drops),
            bypassed: inline.map_or(0, |i| i.overload_bypassed),
            truncated: inline.map_or(0, |i| i.truncated),
            send: inline.map_or(0, |i| i.send_errors),
        }
    }

    pub fn total(&self) -> u64 {
        self.capture + self.queue + self.overload + self.bypassed + self.truncated + self.send
    }

    /// What was lost since `before` (counters only grow while a vif stays attached; any that
    /// went down started again, and count from zero).
    fn since(&self, before: &Losses) -> Losses {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        Losses {
            capture: d(self.capture, before.capture),
            queue: d(self.queue, before.queue),
            overload: d(self.overload, before.overload),
            bypassed: d(self.bypassed, before.bypassed),
            truncated: d(self.truncated, before.truncated),
            send: d(self.send, before.send),
        }
    }
}

impl fmt::Display for Losses {
    // The causes that lost frames, e.g. `1343 with the capture queue or ring full`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let causes = [
            (self.capture, "with the capture queue or ring full"),
            (self.queue, "with a worker's receive queue full"),
            (self.overload, "dropped after waiting past max_wait_us"),
            (
                self.bypassed,
                "forwarded uninspected after waiting past max_wait_us",
            ),
            (self.truncated, "too long to read"),
            (self.send, "refused by the kernel on send"),
        ];
        let mut first = true;
        for (n, why) in causes.iter().filter(|(n, _)| *n > 0) {
            write!(f, "{}{n} {why}", if first { "" } else { ", " })?;
            first = false;
        }
        Ok(())
    }
}

/// One vif's losses to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LossReport {
    pub vif: String,
    pub domid: u32,
    /// Lost since the last report.
    pub lost: Losses,
    /// Since the last report; `None` for the first (since the vif was attached).
    pub over: Option<Duration>,
}

impl fmt::Display for LossReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lost.total();
        match self.over {
            Some(d) => write!(
                f,
                "{n} frames lost to inspection in the last {} s",
                d.as_secs()
            )?,
            None => write!(f, "{n} frames lost to inspection since it was attached")?,
        }
        write!(f, " ({})", self.lost)
    }
}

/// Each vif's losses as last reported (module docs).
#[derive(Default)]
pub struct LossWatch {
    /// Per vif: its counts at the last report (zero before: a vif's counters start at zero
    /// when it is attached) and when that was.
    seen: HashMap<String, (Losses, Option<Instant>)>,
}

impl LossWatch {
    /// The vifs of `stats` to report at `now`: those that lost frames since their last
    /// report, if they have none yet or it is [`REPORT_EVERY`] old. A vif gone from `stats`
    /// is forgotten (attached again, it counts from zero).
    pub fn check(&mut self, now: Instant, stats: &BTreeMap<String, VifStatus>) -> Vec<LossReport> {
        self.seen.retain(|vif, _| stats.contains_key(vif));
        let mut reports = Vec::new();
        for (vif, s) in stats {
            let now_lost = Losses::of(s);
            let (reported, at) = self.seen.entry(vif.clone()).or_default();
            let lost = now_lost.since(reported);
            if lost.total() == 0 {
                continue;
            }
            let over = at.map(|t| now.saturating_duration_since(t));
            if over.is_some_and(|d| d < REPORT_EVERY) {
                continue;
            }
            reports.push(LossReport {
                vif: vif.clone(),
                domid: s.domid,
                lost,
                over,
            });
            *reported = now_lost;
            *at = Some(now);
        }
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn status(domid: u32, capture: u64) -> VifStatus {
        VifStatus {
            domid,
            mode: Mode::Passive,
            attached: true,
            frames: 0,
            bytes: 0,
            alerts: 0,
            capture_drops: capture,
            lost: capture,
            trimmed: 0,
            uncopied: 0,
            uncopied_bytes: 0,
            workers: vec![],
            flows: 0,
            flows_evicted: 0,
            flows_refused: 0,
            inline: None,
        }
    }

    fn stats(vifs: &[(&str, u32, u64)]) -> BTreeMap<String, VifStatus> {
        vifs.iter()
            .map(|&(v, d, n)| (v.to_string(), status(d, n)))
            .collect()
    }

    #[test]
    fn the_first_loss_is_reported_at_once_then_at_most_once_a_minute() {
        let mut w = LossWatch::default();
        let t0 = Instant::now();
        // Nothing lost: nothing said.
        assert!(w.check(t0, &stats(&[("vif5.0", 5, 0)])).is_empty());
        let r = w.check(t0, &stats(&[("vif5.0", 5, 1343)]));
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].to_string(),
            "1343 frames lost to inspection since it was attached (1343 with the capture queue or ring full)"
        );
        assert_eq!(r[0].domid, 5);
        // More within the minute: held back, then reported with all that was lost since.
        let t1 = t0 + Duration::from_secs(30);
        assert!(w.check(t1, &stats(&[("vif5.0", 5, 2000)])).is_empty());
        let t2 = t0 + REPORT_EVERY;
        let r = w.check(t2, &stats(&[("vif5.0", 5, 2500)]));
        assert_eq!(
            r[0].to_string(),
            "1157 frames lost to inspection in the last 60 s (1157 with the capture queue or ring full)"
        );
        // Nothing more lost: nothing said, however long.
        let t3 = t2 + 10 * REPORT_EVERY;
        assert!(w.check(t3, &stats(&[("vif5.0", 5, 2500)])).is_empty());
        // Losing again after a quiet spell: reported at once.
        let r = w.check(t3, &stats(&[("vif5.0", 5, 2501)]));
        assert_eq!(r[0].lost.total(), 1);
        assert_eq!(r[0].over, Some(t3 - t2));
    }

    #[test]
    fn each_vif_is_reported_on_its_own_and_forgotten_when_gone() {
        let mut w = LossWatch::default();
        let t0 = Instant::now();
        let r = w.check(t0, &stats(&[("vif5.0", 5, 10), ("vif6.0", 6, 0)]));
        assert_eq!(
            r.iter().map(|r| r.vif.as_str()).collect::<Vec<_>>(),
            ["vif5.0"]
        );
        // vif6.0's first loss is not held back by vif5.0's report.
        let r = w.check(t0, &stats(&[("vif5.0", 5, 20), ("vif6.0", 6, 7)]));
        assert_eq!(
            r.iter().map(|r| r.vif.as_str()).collect::<Vec<_>>(),
            ["vif6.0"]
        );
        // vif5.0 detached and attached again (a new domain): counts from zero, a first report.
        assert!(w.check(t0, &stats(&[("vif6.0", 6, 7)])).is_empty());
        let r = w.check(t0, &stats(&[("vif5.0", 9, 4), ("vif6.0", 6, 7)]));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].domid, r[0].over, r[0].lost.total()), (9, None, 4));
    }

    #[test]
    fn inline_causes_are_named() {
        let l = Losses {
            capture: 0,
            queue: 3,
            overload: 2,
            bypassed: 5,
            truncated: 1,
            send: 4,
        };
        assert_eq!(l.total(), 15);
        assert_eq!(
            l.to_string(),
            "3 with a worker's receive queue full, 2 dropped after waiting past max_wait_us, \
             5 forwarded uninspected after waiting past max_wait_us, 1 too long to read, \
             4 refused by the kernel on send"
        );
        // A counter that went down (started again) counts from zero.
        let before = Losses {
            queue: 5,
            ..Losses::default()
        };
        assert_eq!(l.since(&before).queue, 3);
        assert_eq!(l.since(&before).overload, 2);
    }
}
