//! Multi-literal matching over streams.
//!
//! Every rule content becomes a literal; a [`Matcher`] finds all (overlapping) occurrences of
//! all literals in a stream fed chunk by chunk, reporting `(pattern, end offset in stream)`.
//! Streams are fed in sequence order without being copied: the matcher's per-stream state
//! carries everything needed across chunk boundaries.
//!
//! Backends:
//! - [`AcMatcher`], portable: the `aho-corasick` crate's automaton driven one byte at a time
//!   through its `Automaton` API, so a stream's whole state is one `StateID` plus, for
//!   case-sensitive literals (the automaton runs case-insensitively so one pass serves both
//!   kinds), a tail of the last `max_len - 1` bytes to confirm the exact bytes of a match that
//!   straddles a chunk boundary. A DFA below ~2,000 literals, a contiguous NFA above (a DFA of
//!   30,000 literals costs tens of MB).
//! - [`super::hyperscan::HsMatcher`], SIMD-class: Hyperscan's streaming mode, loaded at run
//!   time from Debian's `libhyperscan5` (so one binary runs with or without it); 52 bytes of
//!   stream state, several times faster than the automaton from ~1,000 literals
//!   (docs/performance.md). `Backend::Auto` picks it when the library loads and the CPU
//!   supports it.
//!
//! Differential tests keep the backends in agreement.

use aho_corasick::automaton::Automaton;
use aho_corasick::{dfa, nfa, Anchored, MatchKind, StartKind};

/// A literal to find.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Literal {
    pub bytes: Vec<u8>,
    pub nocase: bool,
}

/// Matching errors (at build time).
#[derive(Debug, thiserror::Error)]
pub enum MatcherError {
    #[error("cannot build the {backend} matcher: {why}")]
    Build { backend: &'static str, why: String },
}

/// The backends, as the CLI names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Hyperscan when compiled in and the CPU supports it, else aho-corasick.
    Auto,
    Ac,
    Hs,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "ac" => Ok(Backend::Ac),
            "hs" => Ok(Backend::Hs),
            _ => Err(format!("unknown matcher {s:?}: expected auto, ac or hs")),
        }
    }
}

enum Aut {
    Dfa(dfa::DFA),
    Nfa(nfa::contiguous::NFA),
}

/// Portable backend.
pub struct AcMatcher {
    aut: Aut,
    /// Per pattern: its exact bytes if it is case-sensitive (to confirm), else `None`.
    exact: Vec<Option<Vec<u8>>>,
    tail_len: usize,
}

/// Per-stream state of [`AcMatcher`].
#[derive(Clone, Debug, Default)]
pub struct AcStream {
    state: Option<aho_corasick::automaton::StateID>,
    offset: u64,
    tail: Vec<u8>,
}

const DFA_MAX_PATTERNS: usize = 2000;

impl AcMatcher {
    pub fn new(lits: &[Literal]) -> Result<AcMatcher, MatcherError> {
        let pats: Vec<Vec<u8>> = lits.iter().map(|l| l.bytes.to_ascii_lowercase()).collect();
        let err = |e: aho_corasick::BuildError| MatcherError::Build {
            backend: "aho-corasick",
            why: e.to_string(),
        };
        let aut = if lits.len() <= DFA_MAX_PATTERNS {
            Aut::Dfa(
                dfa::Builder::new()
                    .match_kind(MatchKind::Standard)
                    .ascii_case_insensitive(true)
                    .start_kind(StartKind::Unanchored)
                    .build(&pats)
                    .map_err(err)?,
            )
        } else {
            Aut::Nfa(
                nfa::contiguous::Builder::new()
                    .match_kind(MatchKind::Standard)
                    .ascii_case_insensitive(true)
                    .build(&pats)
                    .map_err(err)?,
            )
        };
        let max = lits.iter().map(|l| l.bytes.len()).max().unwrap_or(1);
        Ok(AcMatcher {
            aut,
            exact: lits
                .iter()
                .map(|l| (!l.nocase).then(|| l.bytes.clone()))
                .collect(),
            tail_len: max.saturating_sub(1),
        })
    }

    /// Heap bytes of the automaton.
    pub fn memory_usage(&self) -> usize {
        match &self.aut {
            Aut::Dfa(a) => a.memory_usage(),
            Aut::Nfa(a) => a.memory_usage(),
        }
    }

    pub fn scan(&self, st: &mut AcStream, data: &[u8], on: &mut dyn FnMut(u32, u64)) {
        match &self.aut {
            Aut::Dfa(a) => self.scan_with(a, st, data, on),
            Aut::Nfa(a) => self.scan_with(a, st, data, on),
        }
    }

    fn scan_with<A: Automaton>(
        &self,
        aut: &A,
        st: &mut AcStream,
        data: &[u8],
        on: &mut dyn FnMut(u32, u64),
    ) {
        let mut sid = match st.state {
            Some(s) => s,
            None => match aut.start_state(Anchored::No) {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        for (i, &b) in data.iter().enumerate() {
            sid = aut.next_state(Anchored::No, sid, b);
            if aut.is_special(sid) && aut.is_match(sid) {
                for k in 0..aut.match_len(sid) {
                    let pid = aut.match_pattern(sid, k).as_usize();
                    if let Some(Some(exact)) = self.exact.get(pid) {
                        if !ends_with_exact(&st.tail, &data[..=i], exact) {
                            continue;
                        }
                    }
                    on(pid as u32, st.offset + i as u64 + 1);
                }
            }
        }
        st.state = Some(sid);
        st.offset += data.len() as u64;
        if self.exact.iter().any(Option::is_some) && self.tail_len > 0 {
            if data.len() >= self.tail_len {
                st.tail.clear();
                st.tail
                    .extend_from_slice(&data[data.len() - self.tail_len..]);
            } else {
                st.tail.extend_from_slice(data);
                let excess = st.tail.len().saturating_sub(self.tail_len);
                st.tail.drain(..excess);
            }
        }
    }
}

/// Whether `tail ++ head` ends with `pat`.
fn ends_with_exact(tail: &[u8], head: &[u8], pat: &[u8]) -> bool {
    if head.len() >= pat.len() {
        return head.ends_with(pat);
    }
    let (from_tail, from_head) = pat.split_at(pat.len() - head.len());
    head == from_head && tail.ends_with(from_tail)
}

/// A matcher of either backend, chosen at run time.
pub enum AnyMatcher {
    Ac(Box<AcMatcher>),
    Hs(super::hyperscan::HsMatcher),
}

/// Per-stream state of [`AnyMatcher`].
pub enum AnyStream {
    Ac(AcStream),
    Hs(super::hyperscan::HsStream),
}

impl AnyMatcher {
    /// Builds the requested backend.
    pub fn build(lits: &[Literal], backend: Backend) -> Result<AnyMatcher, MatcherError> {
        match backend {
            Backend::Ac => Ok(AnyMatcher::Ac(Box::new(AcMatcher::new(lits)?))),
            Backend::Hs => Ok(AnyMatcher::Hs(super::hyperscan::HsMatcher::new(lits)?)),
            Backend::Auto => match super::hyperscan::HsMatcher::new(lits) {
                Ok(m) => Ok(AnyMatcher::Hs(m)),
                Err(e) => {
                    log::info!("{e}; using aho-corasick");
                    Ok(AnyMatcher::Ac(Box::new(AcMatcher::new(lits)?)))
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AnyMatcher::Ac(_) => "aho-corasick",
            AnyMatcher::Hs(_) => "hyperscan",
        }
    }

    pub fn new_stream(&self) -> AnyStream {
        match self {
            AnyMatcher::Ac(_) => AnyStream::Ac(AcStream::default()),
            AnyMatcher::Hs(m) => AnyStream::Hs(m.new_stream()),
        }
    }

    /// Scans the next chunk of a stream.
    pub fn scan(&self, st: &mut AnyStream, data: &[u8], on: &mut dyn FnMut(u32, u64)) {
        match (self, st) {
            (AnyMatcher::Ac(m), AnyStream::Ac(s)) => m.scan(s, data, on),
            (AnyMatcher::Hs(m), AnyStream::Hs(s)) => m.scan(s, data, on),
            _ => {}
        }
    }
}

/// Brute-force reference for tests: every (pattern, end) occurrence.
#[cfg(test)]
fn reference_matches(lits: &[Literal], data: &[u8]) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for (pid, l) in lits.iter().enumerate() {
        let n = l.bytes.len();
        if n == 0 || n > data.len() {
            continue;
        }
        for end in n..=data.len() {
            let w = &data[end - n..end];
            let hit = if l.nocase {
                w.eq_ignore_ascii_case(&l.bytes)
            } else {
                w == l.bytes.as_slice()
            };
            if hit {
                out.push((pid as u32, end as u64));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lits() -> Vec<Literal> {
        vec![
            Literal {
                bytes: b"Attack".to_vec(),
                nocase: false,
            },
            Literal {
                bytes: b"tack".to_vec(),
                nocase: true,
            },
            Literal {
                bytes: b"\x00\xffbin".to_vec(),
                nocase: false,
            },
            Literal {
                bytes: b"aa".to_vec(),
                nocase: false,
            },
        ]
    }

    fn scan_chunks(m: &AnyMatcher, chunks: &[&[u8]]) -> Vec<(u32, u64)> {
        let mut st = m.new_stream();
        let mut got = Vec::new();
        for c in chunks {
            m.scan(&mut st, c, &mut |p, e| got.push((p, e)));
        }
        got.sort();
        got
    }

    #[test]
    fn finds_overlapping_case_and_binary_across_chunks() {
        let m = AnyMatcher::build(&lits(), Backend::Ac).unwrap();
        let data = b"xxATTACK Attack aaa \x00\xffbin";
        let want = reference_matches(&lits(), data);
        // Case-sensitive "Attack" only matches the exact one; "tack" nocase both.
        assert!(want.contains(&(0, 15)) && !want.contains(&(0, 8)));
        assert_eq!(scan_chunks(&m, &[data]), want);
        // Every split point gives the same matches.
        for cut in 0..data.len() {
            assert_eq!(
                scan_chunks(&m, &[&data[..cut], &data[cut..]]),
                want,
                "cut {cut}"
            );
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(scan_chunks(&m, &bytes), want);
    }

    #[test]
    fn nfa_and_dfa_agree() {
        let mut many: Vec<Literal> = (0..2500)
            .map(|i| Literal {
                bytes: format!("pat{i:05}x").into_bytes(),
                nocase: i % 3 == 0,
            })
            .collect();
        many.extend(lits());
        let data = b"..pat00003x..PAT00003X..pat02499x..Attack..";
        let nfa = AnyMatcher::build(&many, Backend::Ac).unwrap();
        assert!(matches!(&nfa, AnyMatcher::Ac(a) if matches!(a.aut, Aut::Nfa(_))));
        assert_eq!(
            scan_chunks(&nfa, &[&data[..20], &data[20..]]),
            reference_matches(&many, data)
        );
    }

    /// Hyperscan, if this machine has it; tests/run.sh sets VIRTSEC_REQUIRE_HYPERSCAN=1 so CI
    /// cannot skip the differential tests silently.
    fn hyperscan(lits: &[Literal]) -> Option<AnyMatcher> {
        match AnyMatcher::build(lits, Backend::Hs) {
            Ok(m) => Some(m),
            Err(e) if std::env::var_os("VIRTSEC_REQUIRE_HYPERSCAN").is_none() => {
                eprintln!("SKIPPED hyperscan differential test: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn hyperscan_agrees_on_binary_nul_and_case() {
        let Some(hs) = hyperscan(&lits()) else { return };
        let ac = AnyMatcher::build(&lits(), Backend::Ac).unwrap();
        let data = b"xxATTACK Attack aaa \x00\xffbin tAcK";
        for cut in 0..data.len() {
            assert_eq!(
                scan_chunks(&hs, &[&data[..cut], &data[cut..]]),
                scan_chunks(&ac, &[data]),
                "cut {cut}"
            );
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn chunked_scan_equals_reference(
                pats in proptest::collection::vec((proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'B'), Just(b'c'), Just(0u8)], 1..6), any::<bool>()), 1..20),
                data in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'A'), Just(b'b'), Just(b'B'), Just(b'c'), Just(0u8)], 0..300),
                cuts in proptest::collection::vec(0usize..300, 0..5),
            ) {
                let lits: Vec<Literal> = pats.into_iter().map(|(bytes, nocase)| Literal { bytes, nocase }).collect();
                let m = AnyMatcher::build(&lits, Backend::Ac).unwrap();
                let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= data.len()).collect();
                cuts.sort();
                let mut chunks = Vec::new();
                let mut prev = 0;
                for c in cuts { chunks.push(&data[prev..c]); prev = c; }
                chunks.push(&data[prev..]);
                let mut st = m.new_stream();
                let mut got = Vec::new();
                for c in &chunks { m.scan(&mut st, c, &mut |p, e| got.push((p, e))); }
                got.sort();
                let want = reference_matches(&lits, &data);
                prop_assert_eq!(&got, &want);
                if let Some(hs) = super::hyperscan(&lits) {
                    let mut st = hs.new_stream();
                    let mut got = Vec::new();
                    for c in &chunks { hs.scan(&mut st, c, &mut |p, e| got.push((p, e))); }
                    got.sort();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }
}
