//! The Suricata rule language subset a content IDS needs.
//!
//! Header: `action proto src_addr src_port dir dst_addr dst_port`, with `tcp|udp|icmp|ip`,
//! addresses as `any`, IPs, CIDRs, `[lists]`, `!negation` and `$VARS`; ports as `any`, numbers,
//! ranges `a:b`, `a:`, `:b`, lists and negation; `->` or `<>`.
//! Options: `msg content (with |hex|) nocase offset depth distance within
//! flow(to_server,to_client,established) sid rev gid classtype priority metadata reference`
//! and `fast_pattern` (accepted as a hint). A rule using anything else (another keyword, a
//! negated content, an unknown flow option) is skipped with a warning naming the keyword and
//! the line; [`RuleSet::summary`] counts loaded and skipped rules.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use crate::decode::Proto;

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Alert,
    Pass,
    Drop,
    Reject,
}

/// Protocol selector of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoSel {
    Ip,
    Tcp,
    Udp,
    Icmp,
}

impl ProtoSel {
    pub fn matches(self, p: Proto) -> bool {
        match self {
            ProtoSel::Ip => true,
            ProtoSel::Tcp => p == Proto::Tcp,
            ProtoSel::Udp => p == Proto::Udp,
            ProtoSel::Icmp => matches!(p, Proto::Icmp | Proto::Icmpv6),
        }
    }
}

/// An address expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrSpec {
    Any,
    Net(IpAddr, u8),
    List(Vec<AddrSpec>),
    Not(Box<AddrSpec>),
}

impl AddrSpec {
    pub fn matches(&self, ip: IpAddr) -> bool {
        match self {
            AddrSpec::Any => true,
            AddrSpec::Net(net, prefix) => in_net(ip, *net, *prefix),
            AddrSpec::List(items) => {
                // A list matches if a positive item matches and no negated item excludes.
                let (neg, pos): (Vec<_>, Vec<_>) =
                    items.iter().partition(|i| matches!(i, AddrSpec::Not(_)));
                (pos.is_empty() || pos.iter().any(|i| i.matches(ip)))
                    && neg.iter().all(|i| i.matches(ip))
            }
            AddrSpec::Not(inner) => !inner.matches(ip),
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix as u32)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix as u32)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A port expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Any,
    Range(u16, u16),
    List(Vec<PortSpec>),
    Not(Box<PortSpec>),
}

impl PortSpec {
    pub fn matches(&self, port: u16) -> bool {
        match self {
            PortSpec::Any => true,
            PortSpec::Range(lo, hi) => (*lo..=*hi).contains(&port),
            PortSpec::List(items) => {
                let (neg, pos): (Vec<_>, Vec<_>) =
                    items.iter().partition(|i| matches!(i, PortSpec::Not(_)));
                (pos.is_empty() || pos.iter().any(|i| i.matches(port)))
                    && neg.iter().all(|i| i.matches(port))
            }
            PortSpec::Not(inner) => !inner.matches(port),
        }
    }
}

/// One `content` with its modifiers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub bytes: Vec<u8>,
    pub nocase: bool,
    pub offset: Option<u32>,
    pub depth: Option<u32>,
    pub distance: Option<i32>,
    pub within: Option<u32>,
    pub fast_pattern: bool,
}

impl Content {
    /// Whether this content is positioned relative to the previous one.
    pub fn is_relative(&self) -> bool {
        self.distance.is_some() || self.within.is_some()
    }
}

/// `flow:` options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowOpts {
    pub to_server: bool,
    pub to_client: bool,
    pub established: bool,
}

/// A parsed rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub proto: ProtoSel,
    pub src: AddrSpec,
    pub sport: PortSpec,
    pub bidirectional: bool,
    pub dst: AddrSpec,
    pub dport: PortSpec,
    pub msg: String,
    pub contents: Vec<Content>,
    pub flow: FlowOpts,
    pub sid: u32,
    pub rev: u32,
    pub gid: u32,
    pub classtype: Option<String>,
    pub priority: Option<u8>,
    pub metadata: Vec<String>,
    pub references: Vec<String>,
    /// Where it came from: `file:line`.
    pub origin: String,
}

impl Rule {
    /// Whether the header accepts a packet/stream chunk from `src:sport` to `dst:dport`.
    pub fn header_matches(
        &self,
        proto: Proto,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
    ) -> bool {
        if !self.proto.matches(proto) {
            return false;
        }
        let fwd = self.src.matches(src)
            && self.sport.matches(sport)
            && self.dst.matches(dst)
            && self.dport.matches(dport);
        fwd || (self.bidirectional
            && self.src.matches(dst)
            && self.sport.matches(dport)
            && self.dst.matches(src)
            && self.dport.matches(sport))
    }
}

/// Why a rule was skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{origin}: unsupported keyword '{keyword}'; rule skipped")]
    Unsupported { origin: String, keyword: String },
    #[error("{origin}: {why}; rule skipped")]
    Invalid { origin: String, why: String },
}

/// Variables for `$NAME` in headers (`HOME_NET`, `HTTP_PORTS`, ...).
#[derive(Clone, Debug)]
pub struct Vars {
    pub addrs: HashMap<String, String>,
    pub ports: HashMap<String, String>,
}

impl Default for Vars {
    /// Suricata's defaults, with the home and external networks open (virtsec is placed
    /// between guests and the world, so "home" is configured per deployment).
    fn default() -> Vars {
        let mut addrs = HashMap::new();
        for v in [
            "HOME_NET",
            "EXTERNAL_NET",
            "HTTP_SERVERS",
            "SMTP_SERVERS",
            "SQL_SERVERS",
            "DNS_SERVERS",
            "TELNET_SERVERS",
            "AIM_SERVERS",
            "DC_SERVERS",
            "DNP3_SERVER",
            "DNP3_CLIENT",
            "MODBUS_CLIENT",
            "MODBUS_SERVER",
            "ENIP_CLIENT",
            "ENIP_SERVER",
        ] {
            addrs.insert(v.to_string(), "any".to_string());
        }
        let mut ports = HashMap::new();
        for (k, v) in [
            ("HTTP_PORTS", "80"),
            ("SHELLCODE_PORTS", "!80"),
            ("ORACLE_PORTS", "1521"),
            ("SSH_PORTS", "22"),
            ("DNP3_PORTS", "20000"),
            ("MODBUS_PORTS", "502"),
            ("FILE_DATA_PORTS", "[$HTTP_PORTS,110,143]"),
            ("FTP_PORTS", "21"),
            ("GENEVE_PORTS", "6081"),
            ("VXLAN_PORTS", "4789"),
            ("TEREDO_PORTS", "3544"),
        ] {
            ports.insert(k.to_string(), v.to_string());
        }
        Vars { addrs, ports }
    }
}

/// Loaded rules and what was skipped.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub skipped: Vec<RuleError>,
}

impl RuleSet {
    /// Parses a rule file's text. `name` appears in warnings as `name:line`.
    pub fn parse(&mut self, text: &str, name: &str, vars: &Vars) {
        let mut seen: HashSet<(u32, u32)> = self.rules.iter().map(|r| (r.gid, r.sid)).collect();
        let mut pending = String::new();
        let mut start_line = 0;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if pending.is_empty() {
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                start_line = i + 1;
            }
            // A trailing backslash continues the rule on the next line.
            if let Some(body) = t.strip_suffix('\\') {
                pending.push_str(body);
                continue;
            }
            pending.push_str(t);
            let origin = format!("{name}:{start_line}");
            match parse_rule(&pending, &origin, vars) {
                Ok(rule) => {
                    if seen.insert((rule.gid, rule.sid)) {
                        self.rules.push(rule);
                    } else {
                        self.skipped.push(RuleError::Invalid {
                            origin,
                            why: format!("duplicate sid {}", rule.sid),
                        });
                    }
                }
                Err(e) => self.skipped.push(e),
            }
            pending.clear();
        }
    }

    /// "N rules loaded, M skipped".
    pub fn summary(&self) -> String {
        format!(
            "{} rules loaded, {} skipped",
            self.rules.len(),
            self.skipped.len()
        )
    }
}

fn invalid(origin: &str, why: impl Into<String>) -> RuleError {
    RuleError::Invalid {
        origin: origin.into(),
        why: why.into(),
    }
}

/// Parses one rule.
pub fn parse_rule(text: &str, origin: &str, vars: &Vars) -> Result<Rule, RuleError> {
    let open = text
        .find('(')
        .ok_or_else(|| invalid(origin, "no option list '('"))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| invalid(origin, "no closing ')'"))?;
    if close < open {
        return Err(invalid(origin, "')' before '('"));
    }
    let header: Vec<&str> = text[..open].split_whitespace().collect();
    let [action, proto, src, sport, dir, dst, dport] = header.as_slice() else {
        return Err(invalid(
            origin,
            format!(
                "header has {} fields, expected 7 (action proto src sport -> dst dport)",
                header.len()
            ),
        ));
    };
    let action = match *action {
        "alert" => Action::Alert,
        "pass" => Action::Pass,
        "drop" => Action::Drop,
        "reject" => Action::Reject,
        other => {
            return Err(RuleError::Unsupported {
                origin: origin.into(),
                keyword: other.into(),
            })
        }
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "ip" | "any" => ProtoSel::Ip,
        "tcp" => ProtoSel::Tcp,
        "udp" => ProtoSel::Udp,
        "icmp" => ProtoSel::Icmp,
        other => {
            return Err(RuleError::Unsupported {
                origin: origin.into(),
                keyword: other.into(),
            })
        }
    };
    let bidirectional = match *dir {
        "->" => false,
        "<>" => true,
        other => {
            return Err(invalid(
                origin,
                format!("direction {other:?}, expected -> or <>"),
            ))
        }
    };
    let src = parse_addr(src, vars, 0).map_err(|w| invalid(origin, w))?;
    let dst = parse_addr(dst, vars, 0).map_err(|w| invalid(origin, w))?;
    let sport = parse_ports(sport, vars, 0).map_err(|w| invalid(origin, w))?;
    let dport = parse_ports(dport, vars, 0).map_err(|w| invalid(origin, w))?;

    let mut rule = Rule {
        action,
        proto,
        src,
        sport,
        bidirectional,
        dst,
        dport,
        msg: String::new(),
        contents: Vec::new(),
        flow: FlowOpts::default(),
        sid: 0,
        rev: 0,
        gid: 1,
        classtype: None,
        priority: None,
        metadata: Vec::new(),
        references: Vec::new(),
        origin: origin.into(),
    };
    let mut have_sid = false;
    for (key, value) in split_options(&text[open + 1..close]).map_err(|w| invalid(origin, w))? {
        let num = |v: &Option<String>| -> Result<i64, RuleError> {
            v.as_deref()
                .map(str::trim)
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| invalid(origin, format!("{key} needs a number")))
        };
        match key.as_str() {
            "msg" => rule.msg = unquote(value.as_deref().unwrap_or("")),
            "content" => {
                let v = value.as_deref().unwrap_or("").trim();
                if v.starts_with('!') {
                    return Err(RuleError::Unsupported {
                        origin: origin.into(),
                        keyword: "content:!".into(),
                    });
                }
                let bytes = parse_content(v).map_err(|w| invalid(origin, w))?;
                if bytes.is_empty() {
                    return Err(invalid(origin, "empty content"));
                }
                rule.contents.push(Content {
                    bytes,
                    nocase: false,
                    offset: None,
                    depth: None,
                    distance: None,
                    within: None,
                    fast_pattern: false,
                });
            }
            "nocase" => last(&mut rule, &key, origin)?.nocase = true,
            "fast_pattern" => last(&mut rule, &key, origin)?.fast_pattern = true,
            "offset" => {
                let n = num(&value)?;
                last(&mut rule, &key, origin)?.offset = Some(
                    u32::try_from(n).map_err(|_| invalid(origin, "offset must be 0 or more"))?,
                );
            }
            "depth" => {
                let n = num(&value)?;
                last(&mut rule, &key, origin)?.depth = Some(
                    u32::try_from(n)
                        .ok()
                        .filter(|d| *d > 0)
                        .ok_or_else(|| invalid(origin, "depth must be positive"))?,
                );
            }
            "distance" => {
                let n = num(&value)?;
                if n.abs() > 1 << 20 {
                    return Err(invalid(origin, "distance beyond 1 MiB"));
                }
                if rule.contents.len() < 2 {
                    return Err(invalid(origin, "distance on the first content"));
                }
                last(&mut rule, &key, origin)?.distance = Some(n as i32);
            }
            "within" => {
                let n = num(&value)?;
                if !(1..=1 << 20).contains(&n) {
                    return Err(invalid(origin, "within must be 1 to 1 MiB"));
                }
                if rule.contents.len() < 2 {
                    return Err(invalid(origin, "within on the first content"));
                }
                last(&mut rule, &key, origin)?.within = Some(n as u32);
            }
            "flow" => {
                for opt in value.as_deref().unwrap_or("").split(',') {
                    match opt.trim() {
                        "to_server" | "from_client" => rule.flow.to_server = true,
                        "to_client" | "from_server" => rule.flow.to_client = true,
                        "established" => rule.flow.established = true,
                        other => {
                            return Err(RuleError::Unsupported {
                                origin: origin.into(),
                                keyword: format!("flow:{other}"),
                            })
                        }
                    }
                }
            }
            "sid" => {
                rule.sid = u32::try_from(num(&value)?)
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| invalid(origin, "sid must be positive"))?;
                have_sid = true;
            }
            "rev" => {
                rule.rev = u32::try_from(num(&value)?).map_err(|_| invalid(origin, "bad rev"))?
            }
            "gid" => {
                rule.gid = u32::try_from(num(&value)?).map_err(|_| invalid(origin, "bad gid"))?
            }
            "priority" => {
                rule.priority = Some(
                    u8::try_from(num(&value)?)
                        .ok()
                        .filter(|p| (1..=255).contains(p))
                        .ok_or_else(|| invalid(origin, "priority must be 1 to 255"))?,
                )
            }
            "classtype" => rule.classtype = value.map(|v| v.trim().to_string()),
            "metadata" => rule
                .metadata
                .push(value.unwrap_or_default().trim().to_string()),
            "reference" => rule
                .references
                .push(value.unwrap_or_default().trim().to_string()),
            // Accepted with no effect on matching.
            "rawbytes" => {}
            other => {
                return Err(RuleError::Unsupported {
                    origin: origin.into(),
                    keyword: other.into(),
                })
            }
        }
    }
    if !have_sid {
        return Err(invalid(origin, "no sid"));
    }
    if rule.contents.is_empty() {
        return Err(RuleError::Unsupported {
            origin: origin.into(),
            keyword: "rule without content (header-only rules are not supported yet)".into(),
        });
    }
    Ok(rule)
}

/// The content a modifier applies to: the last one so far.
fn last<'r>(rule: &'r mut Rule, key: &str, origin: &str) -> Result<&'r mut Content, RuleError> {
    rule.contents
        .last_mut()
        .ok_or_else(|| invalid(origin, format!("{key} without a preceding content")))
}

/// Splits `key:value; key; ...`, honouring quotes and backslash escapes.
fn split_options(body: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                cur.push(c);
            }
            ';' if !in_quotes => {
                push_opt(&mut out, &cur);
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    if in_quotes {
        return Err("unterminated quote in options".into());
    }
    if !cur.trim().is_empty() {
        return Err(format!("option {:?} not terminated by ';'", cur.trim()));
    }
    Ok(out)
}

fn push_opt(out: &mut Vec<(String, Option<String>)>, raw: &str) {
    let raw = raw.trim();
    if raw.is_empty() {
        return;
    }
    match raw.split_once(':') {
        Some((k, v)) => out.push((k.trim().to_string(), Some(v.trim().to_string()))),
        None => out.push((raw.to_string(), None)),
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v);
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes a content string: `"text|41 42|more"` with `\"`, `\;`, `\\`, `\:` escapes.
pub fn parse_content(v: &str) -> Result<Vec<u8>, String> {
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or("content must be quoted")?;
    let mut out = Vec::new();
    let mut in_hex = false;
    let mut hex = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if in_hex {
            if c == '|' {
                in_hex = false;
                continue;
            }
            if c.is_whitespace() {
                continue;
            }
            hex.push(c);
            if hex.len() == 2 {
                out.push(
                    u8::from_str_radix(&hex, 16).map_err(|_| format!("bad hex byte {hex:?}"))?,
                );
                hex.clear();
            }
            continue;
        }
        match c {
            '|' => {
                in_hex = true;
                if !hex.is_empty() {
                    return Err("odd number of hex digits".into());
                }
            }
            '\\' => match chars.next() {
                Some(n @ ('"' | ';' | '\\' | ':' | '|')) => out.push(n as u8),
                Some(n) => return Err(format!("unknown escape \\{n}")),
                None => return Err("dangling backslash".into()),
            },
            '"' | ';' => return Err(format!("unescaped {c:?} in content")),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    if in_hex || !hex.is_empty() {
        return Err("unterminated |hex| block".into());
    }
    Ok(out)
}

fn split_list(s: &str) -> Result<Vec<&str>, String> {
    let inner = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .ok_or_else(|| format!("unbalanced list {s:?}"))?;
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(inner[start..].trim());
    Ok(out.into_iter().filter(|x| !x.is_empty()).collect())
}

fn parse_addr(s: &str, vars: &Vars, depth: u8) -> Result<AddrSpec, String> {
    if depth > 8 {
        return Err("variables nest too deep".into());
    }
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('!') {
        return Ok(AddrSpec::Not(Box::new(parse_addr(rest, vars, depth + 1)?)));
    }
    if s == "any" {
        return Ok(AddrSpec::Any);
    }
    if let Some(name) = s.strip_prefix('$') {
        let v = vars
            .addrs
            .get(name)
            .ok_or_else(|| format!("undefined address variable ${name}"))?;
        return parse_addr(v, vars, depth + 1);
    }
    if s.starts_with('[') {
        return split_list(s)?
            .into_iter()
            .map(|i| parse_addr(i, vars, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(AddrSpec::List);
    }
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {s:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("bad prefix in {s:?}"))?,
        None => max,
    };
    Ok(AddrSpec::Net(ip, prefix))
}

fn parse_ports(s: &str, vars: &Vars, depth: u8) -> Result<PortSpec, String> {
    if depth > 8 {
        return Err("variables nest too deep".into());
    }
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('!') {
        return Ok(PortSpec::Not(Box::new(parse_ports(rest, vars, depth + 1)?)));
    }
    if s == "any" {
        return Ok(PortSpec::Any);
    }
    if let Some(name) = s.strip_prefix('$') {
        let v = vars
            .ports
            .get(name)
            .ok_or_else(|| format!("undefined port variable ${name}"))?;
        return parse_ports(v, vars, depth + 1);
    }
    if s.starts_with('[') {
        return split_list(s)?
            .into_iter()
            .map(|i| parse_ports(i, vars, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(PortSpec::List);
    }
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("bad port {s:?}"))
    };
    match s.split_once(':') {
        Some(("", hi)) => Ok(PortSpec::Range(0, port(hi)?)),
        Some((lo, "")) => Ok(PortSpec::Range(port(lo)?, u16::MAX)),
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!("empty port range {s:?}"));
            }
            Ok(PortSpec::Range(lo, hi))
        }
        None => {
            let p = port(s)?;
            Ok(PortSpec::Range(p, p))
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}:{}:{}] {}", self.gid, self.sid, self.rev, self.msg)
    }
}

/// Parses `text` as a rule file and never panics (fuzz target, property tests).
pub fn fuzz_one(text: &str) -> usize {
    let mut rs = RuleSet::default();
    rs.parse(text, "fuzz", &Vars::default());
    rs.rules.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Result<Rule, RuleError> {
        parse_rule(s, "t.rules:1", &Vars::default())
    }

    #[test]
    fn full_rule() {
        let r = one(r#"alert tcp [10.0.0.0/8,!10.0.5.0/24] ![80,443] -> $HOME_NET 1024: (msg:"a \"quoted\" msg"; flow:to_server,established; content:"GET|20|/x"; nocase; offset:2; depth:40; content:"|0d 0a|"; distance:0; within:100; classtype:web-application-attack; priority:2; reference:url,example.org; metadata:created_at 2024; sid:42; rev:3; gid:1;)"#).unwrap();
        assert_eq!(r.msg, "a \"quoted\" msg");
        assert_eq!(r.contents[0].bytes, b"GET /x");
        assert!(r.contents[0].nocase);
        assert_eq!(
            (r.contents[0].offset, r.contents[0].depth),
            (Some(2), Some(40))
        );
        assert_eq!(r.contents[1].bytes, b"\r\n");
        assert_eq!(
            (r.contents[1].distance, r.contents[1].within),
            (Some(0), Some(100))
        );
        assert!(r.flow.to_server && r.flow.established && !r.flow.to_client);
        assert_eq!((r.sid, r.rev, r.gid, r.priority), (42, 3, 1, Some(2)));
        assert_eq!(r.classtype.as_deref(), Some("web-application-attack"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(r.src.matches(ip("10.1.2.3")));
        assert!(!r.src.matches(ip("10.0.5.9")));
        assert!(!r.src.matches(ip("192.168.0.1")));
        assert!(r.sport.matches(8080) && !r.sport.matches(443));
        assert!(r.dport.matches(1024) && r.dport.matches(65535) && !r.dport.matches(80));
        assert!(r.header_matches(Proto::Tcp, ip("10.1.1.1"), 5555, ip("1.2.3.4"), 2000));
        assert!(!r.header_matches(Proto::Udp, ip("10.1.1.1"), 5555, ip("1.2.3.4"), 2000));
    }

    #[test]
    fn escapes_and_hex() {
        assert_eq!(
            parse_content(r#""a\;b\"c\\d|00 ff|e""#).unwrap(),
            b"a;b\"c\\d\x00\xffe"
        );
        assert!(parse_content(r#""|0|""#).is_err());
        assert!(parse_content(r#""|zz|""#).is_err());
        assert!(parse_content(r#""a;b""#).is_err());
        assert!(parse_content("noquotes").is_err());
    }

    #[test]
    fn unsupported_keywords_are_named() {
        let e = one(r#"alert tcp any any -> any any (msg:"x"; content:"a"; pcre:"/a/"; sid:1;)"#)
            .unwrap_err();
        assert_eq!(
            e,
            RuleError::Unsupported {
                origin: "t.rules:1".into(),
                keyword: "pcre".into()
            }
        );
        let e = one(r#"alert tcp any any -> any any (content:!"a"; sid:1;)"#).unwrap_err();
        assert!(e.to_string().contains("content:!"), "{e}");
        let e = one(r#"alert http any any -> any any (content:"a"; sid:1;)"#).unwrap_err();
        assert!(e.to_string().contains("'http'"), "{e}");
        let e = one(r#"alert tcp any any -> any any (content:"a"; flow:stateless; sid:1;)"#)
            .unwrap_err();
        assert!(e.to_string().contains("flow:stateless"), "{e}");
    }

    #[test]
    fn invalid_rules_explain() {
        for (r, why) in [
            (r#"alert tcp any any -> any any (content:"a";)"#, "no sid"),
            (
                r#"alert tcp any any any any (content:"a"; sid:1;)"#,
                "header has 6 fields",
            ),
            (
                r#"alert tcp any any => any any (content:"a"; sid:1;)"#,
                "direction",
            ),
            (
                r#"alert tcp 300.1.1.1 any -> any any (content:"a"; sid:1;)"#,
                "bad address",
            ),
            (
                r#"alert tcp any 99999 -> any any (content:"a"; sid:1;)"#,
                "bad port",
            ),
            (
                r#"alert tcp $NOPE any -> any any (content:"a"; sid:1;)"#,
                "undefined",
            ),
            (
                r#"alert tcp any any -> any any (nocase; content:"a"; sid:1;)"#,
                "without a preceding content",
            ),
            (
                r#"alert tcp any any -> any any (content:"a"; within:5; sid:1;)"#,
                "first content",
            ),
            (
                r#"alert tcp any any -> any any (content:"a"; sid:1)"#,
                "not terminated",
            ),
            (
                r#"alert tcp any any -> any any (content:"a; sid:1;)"#,
                "unterminated quote",
            ),
        ] {
            let e = one(r).unwrap_err().to_string();
            assert!(e.contains(why), "{r}: {e}");
        }
    }

    #[test]
    fn ruleset_counts_and_skips_duplicates() {
        let mut rs = RuleSet::default();
        rs.parse(
            "# comment\n\nalert tcp any any -> any any (content:\"a\"; sid:1;)\nalert tcp any any -> any any (content:\"b\"; sid:1;)\nalert tcp any any -> any any (content:\"c\"; \\\n  sid:2;)\nalert tcp any any -> any any (content:\"d\"; byte_test:1,>,2,0; sid:3;)\n",
            "f.rules",
            &Vars::default(),
        );
        assert_eq!(rs.summary(), "2 rules loaded, 2 skipped");
        assert!(rs.skipped[0]
            .to_string()
            .starts_with("f.rules:4: duplicate sid 1"));
        assert!(rs.skipped[1]
            .to_string()
            .contains("f.rules:7: unsupported keyword 'byte_test'"));
    }

    mod prop {
        use proptest::prelude::*;
        proptest! {
            #[test]
            fn parser_never_panics(s in ".{0,300}") {
                super::super::fuzz_one(&s);
            }
            #[test]
            fn rule_shaped_input_never_panics(
                body in "[a-z_:;\"|0-9 !,\\[\\]$./-]{0,120}",
            ) {
                super::super::fuzz_one(&format!("alert tcp any any -> any any ({body})"));
            }
        }
    }
}
