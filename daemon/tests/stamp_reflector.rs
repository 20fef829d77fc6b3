//! The STAMP reflector on loopback, driven by a test Session-Sender: sequence numbers,
//! timestamp order, sessions, rate limit, bad input, IPv4/IPv6/dual-stack, stop.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use linkpulse::{
    clock,
    stamp::{
        CountersSnapshot, ErrorEstimate, FormatChoice, Reflector, ReflectorConfig, ReflectorError,
        ReflectorHandle, ReflectorPacket, SenderFields, Timestamp, TimestampFormat,
    },
};

fn start(cfg: ReflectorConfig) -> ReflectorHandle {
    Reflector::bind(cfg).expect("bind").spawn().expect("spawn")
}

/// Stops the reflector and returns its final counters: a reply can reach the sender before
/// the reflector thread has counted it, so exact counts are read after the stop.
fn stop(r: ReflectorHandle) -> CountersSnapshot {
    let counters = r.counters();
    r.stop().unwrap();
    counters.snapshot()
}

fn cfg(listen: &str) -> ReflectorConfig {
    ReflectorConfig {
        listen: listen.parse().unwrap(),
        ..ReflectorConfig::default()
    }
}

fn sender(bind: &str, to: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap();
    s.connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// What one probe measured: T1..T4 as ns on the reflector's format, plus the reply.
struct Probe {
    t: [u64; 4],
    seq: u32,
    sender_seq: u32,
    ssid: u16,
    ttl: u8,
    len: usize,
    format: TimestampFormat,
}

fn send(s: &UdpSocket, seq: u32, ssid: u16, format: TimestampFormat, len: usize) -> u64 {
    let mut b = vec![0u8; len];
    let t1 = now(format);
    SenderFields {
        seq,
        timestamp: Timestamp::from_epoch_ns(format, t1),
        error_estimate: ErrorEstimate::from_error_ns(false, format, 1_000),
        ssid,
    }
    .encode(&mut b, len)
    .unwrap();
    s.send(&b).unwrap();
    t1
}

fn now(format: TimestampFormat) -> u64 {
    let utc = clock::realtime_ns();
    match format {
        TimestampFormat::Ntp => utc,
        TimestampFormat::Ptp => {
            let tai = clock::ClockState::read().unwrap().tai_offset_s as u64;
            utc + tai * clock::NS_PER_S
        }
    }
}

fn recv(s: &UdpSocket) -> Probe {
    let mut b = [0u8; 2048];
    let n = s.recv(&mut b).expect("a reply within 2 s");
    let p = ReflectorPacket::parse(&b[..n]).expect("a STAMP reflector packet");
    let format = p.error_estimate().format();
    let t4 = now(format);
    let ns = |t: Timestamp| t.to_epoch_ns(format).expect("valid timestamp");
    Probe {
        t: [
            ns(p.sender_timestamp()),
            ns(p.receive_timestamp()),
            ns(p.timestamp()),
            t4,
        ],
        seq: p.seq(),
        sender_seq: p.sender_seq(),
        ssid: p.ssid(),
        ttl: p.sender_ttl(),
        len: n,
        format,
    }
}

fn probe(s: &UdpSocket, seq: u32, ssid: u16, format: TimestampFormat, len: usize) -> Probe {
    send(s, seq, ssid, format, len);
    recv(s)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn ipv4_sequence_and_timestamp_order() {
    let r = start(cfg("127.0.0.1:0"));
    let s = sender("127.0.0.1:0", r.local_addr());
    let (mut residence, mut rtt) = (Vec::new(), Vec::new());
    for i in 0..500u32 {
        let len = 44 + (i as usize % 7) * 20; // padded probes, 44..164 bytes
        let p = probe(&s, 1000 + i, 0, TimestampFormat::Ntp, len);
        assert_eq!((p.seq, p.sender_seq), (i, 1000 + i));
        assert_eq!(p.len, len, "reply has the request's length");
        assert_eq!(p.ttl, 64, "loopback TTL as the request arrived");
        assert_eq!(p.format, TimestampFormat::Ntp);
        let [t1, t2, t3, t4] = p.t;
        assert!(
            t1 <= t2 && t2 <= t3 && t3 <= t4,
            "T1..T4 out of order: {:?}",
            p.t
        );
        residence.push(t3 - t2);
        rtt.push((t4 - t1) - (t3 - t2));
    }
    let c = stop(r);
    assert_eq!((c.received, c.reflected, c.sessions_created), (500, 500, 1));
    // The kernel stamped every request: T2 never fell back to user space.
    assert_eq!(c.rx_timestamp_fallback, 0);
    eprintln!(
        "loopback IPv4, 500 probes: reflector residence T3-T2 p50 {} ns p99 {} ns; RTT minus \
         residence p50 {} ns p99 {} ns",
        percentile(&mut residence, 0.5),
        percentile(&mut residence, 0.99),
        percentile(&mut rtt, 0.5),
        percentile(&mut rtt, 0.99)
    );
}

#[test]
fn ipv6_and_dual_stack() {
    // IPv6 only.
    let r = start(cfg("[::1]:0"));
    let s = sender("[::1]:0", r.local_addr());
    for i in 0..20 {
        let p = probe(&s, i, 3, TimestampFormat::Ntp, 44);
        assert_eq!((p.seq, p.sender_seq, p.ssid), (i, i, 3));
        assert_eq!(p.ttl, 64, "hop limit as the request arrived");
        assert!(p.t[0] <= p.t[1] && p.t[1] <= p.t[2] && p.t[2] <= p.t[3]);
    }
    r.stop().unwrap();
    // `[::]` answers IPv4 too, from the address the request was sent to.
    let r = start(cfg("[::]:0"));
    let port = r.local_addr().port();
    for (from, to) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]")] {
        let s = sender(from, format!("{to}:{port}").parse().unwrap());
        let p = probe(&s, 7, 0, TimestampFormat::Ntp, 60);
        assert_eq!((p.seq, p.sender_seq, p.len), (0, 7, 60), "{from}");
        assert_eq!(p.ttl, 64);
        assert_eq!(r.counters().snapshot().rx_timestamp_fallback, 0);
    }
    r.stop().unwrap();
}

#[test]
fn sessions_are_separate_per_port_and_ssid() {
    let r = start(cfg("127.0.0.1:0"));
    let a = sender("127.0.0.1:0", r.local_addr());
    let b = sender("127.0.0.1:0", r.local_addr());
    // Interleaved: a/ssid 1, b/ssid 1, a/ssid 2. Each counts from 0 on its own.
    for i in 0..50u32 {
        for (s, ssid) in [(&a, 1u16), (&b, 1), (&a, 2)] {
            let p = probe(s, 10 * i, ssid, TimestampFormat::Ntp, 44);
            assert_eq!((p.seq, p.sender_seq, p.ssid), (i, 10 * i, ssid));
        }
    }
    let c = stop(r);
    assert_eq!(
        (c.sessions_created, c.sessions_active, c.reflected),
        (3, 3, 150)
    );
}

#[test]
fn upstream_and_downstream_loss_separate() {
    // Sender seqs 0..20 with 5 and 6 never sent (upstream loss): the reflector's sequence has
    // no gap, so the sender attributes the gap upstream; a reply it does not read leaves a gap
    // in the reflector's sequence (downstream loss).
    let r = start(cfg("127.0.0.1:0"));
    let s = sender("127.0.0.1:0", r.local_addr());
    let mut got = Vec::new();
    for i in (0..20u32).filter(|i| *i != 5 && *i != 6) {
        send(&s, i, 0, TimestampFormat::Ntp, 44);
        let p = recv(&s);
        if i == 10 {
            continue; // "lost" on the way back
        }
        got.push((p.sender_seq, p.seq));
    }
    let up: Vec<u32> = (0..20).filter(|i| !got.iter().any(|g| g.0 == *i)).collect();
    let refl: Vec<u32> = got.iter().map(|g| g.1).collect();
    let down: Vec<u32> = (0..*refl.last().unwrap())
        .filter(|i| !refl.contains(i))
        .collect();
    assert_eq!(up, vec![5, 6, 10]);
    assert_eq!(
        down,
        vec![8],
        "reflector seq 8 was the reply to sender seq 10"
    );
    r.stop().unwrap();
}

#[test]
fn rate_limit_per_source() {
    let r = start(ReflectorConfig {
        rate_per_source: 100.0,
        burst: 5,
        ..cfg("127.0.0.1:0")
    });
    let s = sender("127.0.0.1:0", r.local_addr());
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let t0 = Instant::now();
    for i in 0..200 {
        send(&s, i, 0, TimestampFormat::Ntp, 44);
    }
    let sent_for = t0.elapsed();
    let mut replies = 0u64;
    let mut b = [0u8; 128];
    while s.recv(&mut b).is_ok() {
        replies += 1;
    }
    let c = stop(r);
    // The burst plus what 100/s refills while sending (a few ms); never near 200.
    let max = 5 + (sent_for.as_secs_f64() * 100.0).ceil() as u64 + 1;
    assert!((5..=max).contains(&replies), "{replies} replies, max {max}");
    assert_eq!(c.reflected, replies);
    assert_eq!(c.rate_limited, 200 - replies);
    eprintln!("rate limit 100/s burst 5: 200 sent in {sent_for:?}, {replies} reflected");
}

#[test]
fn garbage_does_not_break_a_session() {
    let r = start(cfg("127.0.0.1:0"));
    let s = sender("127.0.0.1:0", r.local_addr());
    let other = sender("127.0.0.1:0", r.local_addr());
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand_bytes = |n: usize| {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect::<Vec<u8>>()
    };
    for i in 0..30u32 {
        let p = probe(&s, i, 0, TimestampFormat::Ntp, 44);
        assert_eq!(
            (p.seq, p.sender_seq),
            (i, i),
            "session intact after garbage"
        );
        // Truncated and oversized garbage from the session's own socket: no reply.
        s.send(&rand_bytes(i as usize % 44)).unwrap();
        s.send(&rand_bytes(1473 + i as usize)).unwrap();
        // Full-size garbage from another socket is another session, answered at its size.
        other.send(&rand_bytes(44 + i as usize)).unwrap();
        let mut b = [0u8; 2048];
        assert_eq!(other.recv(&mut b).unwrap(), 44 + i as usize);
    }
    // Nothing queued for the session's socket beyond its 30 replies.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(s.recv(&mut [0u8; 64]).is_err());
    assert!(r.is_running());
    let c = stop(r);
    assert_eq!((c.truncated, c.oversized), (30, 30));
    assert_eq!(c.reflected, 60);
}

#[test]
fn ptp_requests_get_ptp_replies() {
    let r = start(cfg("127.0.0.1:0"));
    let s = sender("127.0.0.1:0", r.local_addr());
    let p = probe(&s, 1, 0, TimestampFormat::Ptp, 44);
    assert_eq!(p.format, TimestampFormat::Ptp);
    assert!(
        p.t[0] <= p.t[1] && p.t[1] <= p.t[2] && p.t[2] <= p.t[3],
        "{:?}",
        p.t
    );
    r.stop().unwrap();
    // A reflector fixed on NTP answers a PTP request in NTP, and says so in Z.
    let r = start(ReflectorConfig {
        format: FormatChoice::Ntp,
        ..cfg("127.0.0.1:0")
    });
    let s = sender("127.0.0.1:0", r.local_addr());
    let p = probe(&s, 1, 0, TimestampFormat::Ptp, 44);
    assert_eq!(p.format, TimestampFormat::Ntp);
    let utc = clock::realtime_ns();
    assert!(
        p.t[1] <= utc && utc - p.t[1] < 1_000_000_000,
        "T2 is UTC now"
    );
    r.stop().unwrap();
}

#[test]
fn stops_promptly_and_reports_bind_errors() {
    let r = start(cfg("127.0.0.1:0"));
    let addr = r.local_addr();
    // The port is taken: a second reflector says so and names the fix.
    let e = Reflector::bind(ReflectorConfig {
        listen: addr,
        ..ReflectorConfig::default()
    })
    .err()
    .expect("port in use");
    assert!(matches!(e, ReflectorError::Bind { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(&addr.to_string()) && msg.contains("CAP_NET_BIND_SERVICE"),
        "{msg}"
    );
    let t0 = Instant::now();
    r.stop().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
    // The port is free again.
    Reflector::bind(ReflectorConfig {
        listen: addr,
        ..ReflectorConfig::default()
    })
    .unwrap();
}
