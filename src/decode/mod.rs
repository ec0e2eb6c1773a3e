//! Packet decoding: Ethernet (with 802.1Q/QinQ), IPv4, IPv6 (extension headers), TCP, UDP,
//! ICMP/ICMPv6, by the `etherparse` crate's zero-copy slicer.
//!
//! The result borrows the frame: no payload is copied. Frames up to 64 KiB (netback GSO
//! super-frames) decode like any other. Anything that does not parse is counted by reason in
//! [`DecodeStats`] and dropped from inspection, never a panic. IPv4/IPv6 fragments are
//! counted and not reassembled yet (their first fragment's transport header is not trusted
//! for matching; see docs/inspection.md).

use std::net::IpAddr;

use etherparse::{LaxNetSlice, LaxSlicedPacket, NetSlice, SlicedPacket, TransportSlice};

/// Transport protocol of a decoded packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
            Proto::Other(n) => n,
        }
    }

    /// The name EVE uses.
    pub fn eve_name(self) -> String {
        match self {
            Proto::Tcp => "TCP".into(),
            Proto::Udp => "UDP".into(),
            Proto::Icmp => "ICMP".into(),
            Proto::Icmpv6 => "IPv6-ICMP".into(),
            Proto::Other(n) => format!("{n:03}"),
        }
    }
}

/// TCP header fields the stream engine needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub fin: bool,
    pub rst: bool,
}

/// A decoded packet, borrowing the frame.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub sport: u16,
    pub dport: u16,
    pub tcp: Option<TcpInfo>,
    pub payload: &'a [u8],
}

/// Why a frame was not inspected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not IP (ARP, LLDP, ...): handled by anti-spoofing, not by content inspection.
    NotIp,
    /// An IP fragment (counted, not reassembled).
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// Counters of the decoder.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeStats {
    pub frames: u64,
    pub bytes: u64,
    pub ip: u64,
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    pub not_ip: u64,
    pub fragments: u64,
    pub malformed: u64,
}

impl DecodeStats {
    fn count(&mut self, r: &Result<Packet<'_>, Skip>) {
        match r {
            Ok(p) => {
                self.ip += 1;
                match p.proto {
                    Proto::Tcp => self.tcp += 1,
                    Proto::Udp => self.udp += 1,
                    Proto::Icmp | Proto::Icmpv6 => self.icmp += 1,
                    Proto::Other(_) => {}
                }
            }
            Err(Skip::NotIp) => self.not_ip += 1,
            Err(Skip::Fragment) => self.fragments += 1,
            Err(Skip::Malformed) => self.malformed += 1,
        }
    }
}

/// Decodes an Ethernet frame and counts the outcome.
pub fn decode_ethernet<'a>(frame: &'a [u8], stats: &mut DecodeStats) -> Result<Packet<'a>, Skip> {
    stats.frames += 1;
    stats.bytes += frame.len() as u64;
    let r = match SlicedPacket::from_ethernet(frame) {
        Ok(s) => from_sliced(s),
        Err(_) => {
            // A frame whose ether type is not IP slices fine; an error is a broken header.
            Err(Skip::Malformed)
        }
    };
    stats.count(&r);
    r
}

/// Decodes a raw IP packet (pcap link type RAW) and counts the outcome.
pub fn decode_ip<'a>(pkt: &'a [u8], stats: &mut DecodeStats) -> Result<Packet<'a>, Skip> {
    stats.frames += 1;
    stats.bytes += pkt.len() as u64;
    let r = match SlicedPacket::from_ip(pkt) {
        Ok(s) => from_sliced(s),
        Err(_) => Err(Skip::Malformed),
    };
    stats.count(&r);
    r
}

/// Decodes the headers of a frame the capture trimmed (the kernel copied only its first
/// bytes, `capture::bpf`): addresses, ports and TCP state, and an empty payload, since what
/// was copied of it is not the whole.
pub fn decode_ethernet_headers<'a>(
    frame: &'a [u8],
    stats: &mut DecodeStats,
) -> Result<Packet<'a>, Skip> {
    stats.frames += 1;
    stats.bytes += frame.len() as u64;
    let r = match LaxSlicedPacket::from_ethernet(frame) {
        Ok(s) => {
            let net = match &s.net {
                Some(LaxNetSlice::Ipv4(v4)) => {
                    let h = v4.header();
                    Some((
                        IpAddr::V4(h.source_addr()),
                        IpAddr::V4(h.destination_addr()),
                        v4.payload().fragmented,
                        v4.payload().ip_number.0,
                    ))
                }
                Some(LaxNetSlice::Ipv6(v6)) => {
                    let h = v6.header();
                    Some((
                        IpAddr::V6(h.source_addr()),
                        IpAddr::V6(h.destination_addr()),
                        v6.payload().fragmented,
                        v6.payload().ip_number.0,
                    ))
                }
                None => None,
            };
            match net {
                Some((src, dst, fragmented, ipnum)) => {
                    from_parts(src, dst, fragmented, ipnum, s.transport).map(|mut p| {
                        p.payload = &[];
                        p
                    })
                }
                None => Err(Skip::NotIp),
            }
        }
        Err(_) => Err(Skip::Malformed),
    };
    stats.count(&r);
    r
}

fn from_sliced(s: SlicedPacket<'_>) -> Result<Packet<'_>, Skip> {
    let (src, dst, fragmented, ipnum) = match &s.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                v4.is_payload_fragmented(),
                v4.payload_ip_number().0,
            )
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                v6.is_payload_fragmented(),
                v6.payload().ip_number.0,
            )
        }
        None => return Err(Skip::NotIp),
    };
    from_parts(src, dst, fragmented, ipnum, s.transport)
}

fn from_parts<'a>(
    src: IpAddr,
    dst: IpAddr,
    fragmented: bool,
    ipnum: u8,
    transport: Option<TransportSlice<'a>>,
) -> Result<Packet<'a>, Skip> {
    if fragmented {
        return Err(Skip::Fragment);
    }
    let pkt = match transport {
        Some(TransportSlice::Tcp(t)) => Packet {
            src,
            dst,
            proto: Proto::Tcp,
            sport: t.source_port(),
            dport: t.destination_port(),
            tcp: Some(TcpInfo {
                seq: t.sequence_number(),
                ack: t.acknowledgment_number(),
                syn: t.syn(),
                ack_flag: t.ack(),
                fin: t.fin(),
                rst: t.rst(),
            }),
            payload: t.payload(),
        },
        Some(TransportSlice::Udp(u)) => Packet {
            src,
            dst,
            proto: Proto::Udp,
            sport: u.source_port(),
            dport: u.destination_port(),
            tcp: None,
            payload: u.payload(),
        },
        Some(TransportSlice::Icmpv4(i)) => Packet {
            src,
            dst,
            proto: Proto::Icmp,
            sport: 0,
            dport: 0,
            tcp: None,
            payload: i.payload(),
        },
        Some(TransportSlice::Icmpv6(i)) => Packet {
            src,
            dst,
            proto: Proto::Icmpv6,
            sport: 0,
            dport: 0,
            tcp: None,
            payload: i.payload(),
        },
        None => match ipnum {
            6 | 17 | 1 | 58 => return Err(Skip::Malformed),
            n => Packet {
                src,
                dst,
                proto: Proto::Other(n),
                sport: 0,
                dport: 0,
                tcp: None,
                payload: &[],
            },
        },
    };
    Ok(pkt)
}

/// Feeds arbitrary bytes to both decoders; must never panic (fuzz target, property tests).
pub fn fuzz_one(data: &[u8]) -> u64 {
    let mut st = DecodeStats::default();
    let _ = decode_ethernet(data, &mut st);
    let _ = decode_ethernet_headers(data, &mut st);
    let _ = decode_ip(data, &mut st);
    st.malformed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 + TCP (10.0.1.4:43903 -> 10.0.2.8:80, seq 1000, PSH|ACK) + "GET /".
    const FRAME: &[u8] = &[
        0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00, // ethernet
        0x45, 0, 0, 45, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 1, 4, 10, 0, 2,
        8, // ipv4 (csum unchecked)
        0xab, 0x7f, 0, 80, 0, 0, 0x03, 0xe8, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0,
        0, // tcp
        b'G', b'E', b'T', b' ', b'/',
    ];

    #[test]
    fn decodes_literal_tcp_frame() {
        let mut st = DecodeStats::default();
        let p = decode_ethernet(FRAME, &mut st).unwrap();
        assert_eq!(p.src, "10.0.1.4".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst, "10.0.2.8".parse::<IpAddr>().unwrap());
        assert_eq!((p.proto, p.sport, p.dport), (Proto::Tcp, 43903, 80));
        let t = p.tcp.unwrap();
        assert_eq!((t.seq, t.ack, t.syn, t.ack_flag), (1000, 1, false, true));
        assert_eq!(p.payload, b"GET /");
        assert_eq!((st.frames, st.tcp, st.malformed), (1, 1, 0));
    }

    #[test]
    fn trimmed_frame_gives_headers_and_no_payload() {
        let mut st = DecodeStats::default();
        // The kernel copied 56 of 59 bytes: headers whole, payload cut. The strict decoder
        // refuses it (the IP length says more); the header decoder gives the flow fields.
        let cut = &FRAME[..FRAME.len() - 3];
        assert_eq!(decode_ethernet(cut, &mut st).unwrap_err(), Skip::Malformed);
        let p = decode_ethernet_headers(cut, &mut st).unwrap();
        assert_eq!((p.proto, p.sport, p.dport), (Proto::Tcp, 43903, 80));
        assert_eq!(p.tcp.unwrap().seq, 1000);
        assert!(p.payload.is_empty());
        // Cut inside the TCP header: not a packet to track.
        assert_eq!(
            decode_ethernet_headers(&FRAME[..40], &mut st).unwrap_err(),
            Skip::Malformed
        );
    }

    #[test]
    fn vlan_tagged_frame() {
        let mut f = FRAME[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]); // 802.1Q, VLAN 5
        f.extend_from_slice(&FRAME[12..]);
        let p = decode_ethernet(&f, &mut DecodeStats::default()).unwrap();
        assert_eq!(p.payload, b"GET /");
    }

    #[test]
    fn truncated_fragment_and_arp_are_counted() {
        let mut st = DecodeStats::default();
        assert_eq!(
            decode_ethernet(&FRAME[..30], &mut st).unwrap_err(),
            Skip::Malformed
        );
        let mut frag = FRAME.to_vec();
        frag[20] = 0x20; // more fragments
        assert_eq!(decode_ethernet(&frag, &mut st).unwrap_err(), Skip::Fragment);
        let mut arp = FRAME[..14].to_vec();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(decode_ethernet(&arp, &mut st).unwrap_err(), Skip::NotIp);
        assert_eq!((st.malformed, st.fragments, st.not_ip), (1, 1, 1));
    }

    #[test]
    fn gso_sized_frame_decodes() {
        let mut f = FRAME.to_vec();
        let payload = 65_000usize;
        f.truncate(54);
        f.extend(std::iter::repeat_n(b'x', payload));
        let total = (20 + 20 + payload) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let p = decode_ethernet(&f, &mut DecodeStats::default()).unwrap();
        assert_eq!(p.payload.len(), payload);
    }

    mod prop {
        use proptest::prelude::*;
        proptest! {
            #[test]
            fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
                super::super::fuzz_one(&data);
            }
        }
    }
}
