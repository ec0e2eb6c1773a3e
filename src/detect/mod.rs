//! Signature detection: rules compiled into one multi-literal matcher, then exact
//! verification of each candidate rule.
//!
//! Every content of every rule becomes a literal (identical literals are shared). The
//! [`matcher`] reports each literal occurrence with its end offset in the stream; a hit is a
//! *candidate* for the rules using that literal, confirmed by checking, in order of cost:
//! already alerted on this flow (one alert per rule and flow), the rule header against the
//! flow's endpoints and direction, `flow:` options, the content's absolute `offset`/`depth`,
//! and for multi-content rules the chain of `distance`/`within` constraints against the
//! earlier hits of the rule's other contents recorded for this stream (bounded).
//!
//! Semantics (as Suricata's raw stream inspection): `offset`/`depth` count from the first
//! byte of the direction's stream; `distance` is measured from the end of the previous
//! content's match, `within` from there plus `distance`.

pub mod behaviour;
pub mod matcher;
pub mod rules;

pub mod hyperscan;

use std::collections::HashMap;
use std::net::IpAddr;

use crate::decode::Proto;
use matcher::{AnyMatcher, AnyStream, Backend, Literal, MatcherError};
use rules::Rule;

/// Hits kept per stream for multi-content rules.
const MAX_HITS: usize = 1024;

/// Rules compiled for matching.
pub struct Detector {
    rules: Vec<Rule>,
    matcher: AnyMatcher,
    /// Per literal: the (rule, content index) pairs using it.
    users: Vec<Vec<(u32, u16)>>,
    /// Per rule: the literal of each content.
    rule_lits: Vec<Vec<u32>>,
    /// Per literal: whether some multi-content rule uses it (its hits are recorded).
    recorded: Vec<bool>,
    lit_len: Vec<u32>,
    /// Whether some rule's header accepts TCP, UDP, ICMP, ICMPv6, other IP protocols
    /// ([`Detector::inspects`]).
    protos: [bool; 5],
}

/// Index of `p` in [`Detector`]'s `protos`.
fn proto_index(p: Proto) -> usize {
    match p {
        Proto::Tcp => 0,
        Proto::Udp => 1,
        Proto::Icmp => 2,
        Proto::Icmpv6 => 3,
        Proto::Other(_) => 4,
    }
}

/// Detection state of one direction of one flow.
pub struct DirState {
    stream: AnyStream,
    hits: Vec<(u32, u64)>,
    pub hits_dropped: u64,
}

/// Where a chunk of data comes from.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub proto: Proto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub to_server: bool,
    pub established: bool,
}

impl Detector {
    /// Compiles `rules` with the chosen matcher backend.
    pub fn new(rules: Vec<Rule>, backend: Backend) -> Result<Detector, MatcherError> {
        let mut ids: HashMap<Literal, u32> = HashMap::new();
        let mut lits = Vec::new();
        let mut users: Vec<Vec<(u32, u16)>> = Vec::new();
        let mut rule_lits = Vec::with_capacity(rules.len());
        for (ri, r) in rules.iter().enumerate() {
            let mut mine = Vec::with_capacity(r.contents.len());
            for (ci, c) in r.contents.iter().enumerate() {
                let lit = Literal {
                    bytes: if c.nocase {
                        c.bytes.to_ascii_lowercase()
                    } else {
                        c.bytes.clone()
                    },
                    nocase: c.nocase,
                };
                let id = *ids.entry(lit.clone()).or_insert_with(|| {
                    lits.push(lit);
                    users.push(Vec::new());
                    (lits.len() - 1) as u32
                });
                users[id as usize].push((ri as u32, ci as u16));
                mine.push(id);
            }
            rule_lits.push(mine);
        }
        let mut recorded = vec![false; lits.len()];
        for (ri, r) in rules.iter().enumerate() {
            if r.contents.len() > 1 {
                for &l in &rule_lits[ri] {
                    recorded[l as usize] = true;
                }
            }
        }
        let lit_len = lits.iter().map(|l| l.bytes.len() as u32).collect();
        let all = [
            Proto::Tcp,
            Proto::Udp,
            Proto::Icmp,
            Proto::Icmpv6,
            Proto::Other(0),
        ];
        let protos = all.map(|p| rules.iter().any(|r| r.proto.matches(p)));
        let matcher = AnyMatcher::build(&lits, backend)?;
        Ok(Detector {
            rules,
            matcher,
            users,
            rule_lits,
            recorded,
            lit_len,
            protos,
        })
    }

    /// Whether any rule can fire on protocol `p` (every rule has a content, so a payload of a
    /// protocol no rule's header accepts need not be scanned).
    pub fn inspects(&self, p: Proto) -> bool {
        self.protos[proto_index(p)]
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn literals(&self) -> usize {
        self.users.len()
    }

    pub fn matcher_name(&self) -> &'static str {
        self.matcher.name()
    }

    pub fn new_dir(&self) -> DirState {
        DirState {
            stream: self.matcher.new_stream(),
            hits: Vec::new(),
            hits_dropped: 0,
        }
    }

    /// Inspects the next in-order chunk of a stream (or a whole datagram with a fresh
    /// `DirState`). Pushes the index of each rule that fires and is not in `alerted`, and adds
    /// it there.
    pub fn inspect(
        &self,
        st: &mut DirState,
        data: &[u8],
        ctx: &Ctx,
        alerted: &mut Vec<u32>,
        fired: &mut Vec<u32>,
    ) {
        let DirState {
            stream,
            hits,
            hits_dropped,
        } = st;
        self.matcher.scan(stream, data, &mut |lit, end| {
            let li = lit as usize;
            if self.recorded[li] {
                if hits.len() >= MAX_HITS {
                    hits.remove(0);
                    *hits_dropped += 1;
                }
                hits.push((lit, end));
            }
            for &(ri, ci) in &self.users[li] {
                if alerted.contains(&ri) {
                    continue;
                }
                let rule = &self.rules[ri as usize];
                if !self.flow_ok(rule, ctx) {
                    continue;
                }
                let c = &rule.contents[ci as usize];
                let start = end - self.lit_len[li] as u64;
                if !abs_ok(c, start, end) {
                    continue;
                }
                if rule.contents.len() > 1 && !self.chain(ri as usize, 0, None, hits) {
                    continue;
                }
                alerted.push(ri);
                fired.push(ri);
            }
        });
    }

    fn flow_ok(&self, r: &Rule, ctx: &Ctx) -> bool {
        if r.flow.to_server && !ctx.to_server || r.flow.to_client && ctx.to_server {
            return false;
        }
        if r.flow.established && !ctx.established {
            return false;
        }
        r.header_matches(ctx.proto, ctx.src, ctx.sport, ctx.dst, ctx.dport)
    }

    /// Whether contents `k..` of rule `ri` can be placed on recorded hits after `prev_end`.
    fn chain(&self, ri: usize, k: usize, prev_end: Option<u64>, hits: &[(u32, u64)]) -> bool {
        let rule = &self.rules[ri];
        if k == rule.contents.len() {
            return true;
        }
        let c = &rule.contents[k];
        let lit = self.rule_lits[ri][k];
        let len = self.lit_len[lit as usize] as u64;
        for &(l, end) in hits {
            if l != lit {
                continue;
            }
            let start = end - len;
            if !abs_ok(c, start, end) {
                continue;
            }
            if c.is_relative() {
                let Some(pe) = prev_end else { continue };
                let dist = c.distance.unwrap_or(0) as i64;
                if (start as i64) < pe as i64 + dist {
                    continue;
                }
                if let Some(w) = c.within {
                    if end as i64 > pe as i64 + dist + w as i64 {
                        continue;
                    }
                }
            }
            if self.chain(ri, k + 1, Some(end), hits) {
                return true;
            }
        }
        false
    }
}

fn abs_ok(c: &rules::Content, start: u64, end: u64) -> bool {
    let off = c.offset.unwrap_or(0) as u64;
    if start < off {
        return false;
    }
    match c.depth {
        Some(d) => end <= off + d as u64,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rules::{RuleSet, Vars};

    fn detector(text: &str) -> Detector {
        let mut rs = RuleSet::default();
        rs.parse(text, "t", &Vars::default());
        assert!(rs.skipped.is_empty(), "{:?}", rs.skipped);
        Detector::new(rs.rules, Backend::Ac).unwrap()
    }

    fn ctx(to_server: bool) -> Ctx {
        Ctx {
            proto: Proto::Tcp,
            src: "10.0.1.1".parse().unwrap(),
            sport: 40000,
            dst: "10.0.2.2".parse().unwrap(),
            dport: 80,
            to_server,
            established: true,
        }
    }

    fn run(d: &Detector, chunks: &[&[u8]], c: &Ctx) -> Vec<u32> {
        let mut st = d.new_dir();
        let (mut alerted, mut fired) = (Vec::new(), Vec::new());
        for ch in chunks {
            d.inspect(&mut st, ch, c, &mut alerted, &mut fired);
        }
        fired.iter().map(|&i| d.rules()[i as usize].sid).collect()
    }

    #[test]
    fn split_content_fires_once() {
        let d = detector("alert tcp any any -> any any (content:\"evil\"; sid:1;)\n");
        assert_eq!(run(&d, &[b"xxev", b"il evil"], &ctx(true)), vec![1]);
    }

    #[test]
    fn positional_and_relative_constraints() {
        let d = detector(concat!(
            "alert tcp any any -> any 80 (flow:to_server; content:\"GET\"; depth:3; content:\"/admin\"; distance:1; within:7; sid:2;)\n",
            "alert tcp any any -> any any (content:\"tail\"; offset:10; sid:3;)\n",
        ));
        assert_eq!(run(&d, &[b"GET /ad", b"min HTTP"], &ctx(true)), vec![2]);
        // Wrong direction, header port mismatch, too far, not at start.
        assert!(run(&d, &[b"GET /admin"], &ctx(false)).is_empty());
        assert!(run(&d, &[b"GET       /admin"], &ctx(true)).is_empty());
        assert!(run(&d, &[b" GET /admin"], &ctx(true)).is_empty());
        assert_eq!(run(&d, &[b"0123456789tail"], &ctx(true)), vec![3]);
        assert!(run(&d, &[b"tail567890"], &ctx(true)).is_empty());
    }
}
