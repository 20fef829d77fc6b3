//! Engine tests without sockets: sessions, sequence numbers, rate limit, sizes, formats.
use super::*;
use crate::stamp::wire::{ReflectorPacket, SenderFields};

const MS: u64 = 1_000_000;

fn engine(cfg: ReflectorConfig) -> Engine {
    let mut e = Engine::new(cfg, 862, Arc::new(ReflectorCounters::default()));
    e.clock = ClockInfo {
        synced: true,
        error_ns: 2_000,
        tai_offset_ns: 37 * clock::NS_PER_S,
    };
    e
}

fn request(seq: u32, ssid: u16, format: TimestampFormat, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    SenderFields {
        seq,
        timestamp: Timestamp::from_epoch_ns(format, 1_767_225_600 * clock::NS_PER_S),
        error_estimate: ErrorEstimate::new(false, format, 0, 1),
        ssid,
    }
    .encode(&mut b, len)
    .unwrap();
    b
}

fn meta(src: &str, len: usize, now_mono_ns: u64) -> RxMeta {
    RxMeta {
        src: src.parse().unwrap(),
        len,
        rx_utc_ns: 1_767_225_600 * clock::NS_PER_S + 250 * MS,
        ttl: 63,
        now_mono_ns,
    }
}

#[test]
fn per_session_sequence_numbers_and_echoed_fields() {
    let mut e = engine(ReflectorConfig::default());
    let mut out = [0u8; 1600];
    let a = "192.0.2.1:40000";
    let b = "192.0.2.1:40001";
    // Sender seqs with a gap (upstream loss of 1 and 2): the reflector counts on regardless.
    for (i, s) in [0u32, 3, 4].iter().enumerate() {
        let req = request(*s, 7, TimestampFormat::Ntp, 44);
        let r = e.handle(&req, &meta(a, 44, 0), &mut out).unwrap();
        let p = ReflectorPacket::parse(&out[..r.len]).unwrap();
        assert_eq!(p.seq(), i as u32);
        assert_eq!(p.sender_seq(), *s);
        assert_eq!(p.ssid(), 7);
        assert_eq!(p.sender_ttl(), 63);
        assert_eq!(&out[28..36], &req[4..12], "T1 echoed bit for bit");
        assert_eq!(
            p.sender_error_estimate(),
            ErrorEstimate::new(false, TimestampFormat::Ntp, 0, 1)
        );
        assert_eq!(
            p.receive_timestamp().to_epoch_ns(TimestampFormat::Ntp),
            Some(1_767_225_600 * clock::NS_PER_S + 250 * MS)
        );
        let ee = p.error_estimate();
        assert!(ee.synced() && ee.error_ns() >= 2_000 && ee.is_valid());
    }
    // Another port, and another SSID from the first port: separate sessions from 0.
    for (src, ssid) in [(b, 7), (a, 8)] {
        let req = request(100, ssid, TimestampFormat::Ntp, 44);
        e.handle(&req, &meta(src, 44, 0), &mut out).unwrap();
        assert_eq!(
            ReflectorPacket::parse(&out[..44]).unwrap().seq(),
            0,
            "{src} {ssid}"
        );
    }
    let c = e.counters().snapshot();
    assert_eq!(
        (c.received, c.sessions_created, c.sessions_active),
        (5, 3, 3)
    );
}

#[test]
fn reply_length_equals_request_and_pads_with_zeros() {
    let mut e = engine(ReflectorConfig::default());
    let mut out = [0xEEu8; 1600];
    for len in [44usize, 45, 100, 1472] {
        let mut req = request(1, 0, TimestampFormat::Ntp, len);
        req[44..].fill(0x77);
        let r = e
            .handle(&req, &meta("198.51.100.7:5000", len, 0), &mut out)
            .unwrap();
        assert_eq!(r.len, len);
        assert!(
            out[44..len].iter().all(|&b| b == 0),
            "padding zeroed at {len}"
        );
    }
}

#[test]
fn bad_sizes_and_loops_are_dropped_and_counted() {
    let mut e = engine(ReflectorConfig::default());
    let mut out = [0u8; 1600];
    let short = request(1, 0, TimestampFormat::Ntp, 44);
    assert_eq!(
        e.handle(&short[..43], &meta("192.0.2.9:1000", 43, 0), &mut out),
        Err(DropReason::Truncated)
    );
    assert_eq!(
        e.handle(&[], &meta("192.0.2.9:1000", 0, 0), &mut out),
        Err(DropReason::Truncated)
    );
    // The socket saw 1473 bytes (MSG_TRUNC length) of which the buffer kept 1472.
    let big = request(1, 0, TimestampFormat::Ntp, 1472);
    assert_eq!(
        e.handle(&big, &meta("192.0.2.9:1000", 1473, 0), &mut out),
        Err(DropReason::Oversized)
    );
    assert_eq!(
        e.handle(&short, &meta("192.0.2.9:862", 44, 0), &mut out),
        Err(DropReason::LoopGuard)
    );
    let c = e.counters().snapshot();
    assert_eq!((c.truncated, c.oversized, c.loop_guard), (2, 1, 1));
    assert_eq!(
        (c.sessions_created, c.reflected),
        (0, 0),
        "no session from bad input"
    );
}

#[test]
fn mbz_and_bad_error_estimate_are_tolerated_but_counted() {
    let mut e = engine(ReflectorConfig::default());
    let mut out = [0u8; 64];
    let mut req = request(1, 0, TimestampFormat::Ntp, 44);
    req[30] = 0xFF;
    req[13] = 0; // multiplier 0
    assert!(e
        .handle(&req, &meta("192.0.2.2:999", 44, 0), &mut out)
        .is_ok());
    let c = e.counters().snapshot();
    assert_eq!((c.mbz_nonzero, c.bad_error_estimate), (1, 1));
}

#[test]
fn token_bucket_per_source_ip() {
    let mut e = engine(ReflectorConfig {
        rate_per_source: 1000.0,
        burst: 10,
        ..ReflectorConfig::default()
    });
    let mut out = [0u8; 64];
    let req = request(1, 0, TimestampFormat::Ntp, 44);
    let mut ok = 0;
    // 50 at one instant from several ports of one address: the burst (10) passes.
    for port in 0..50u16 {
        let src = format!("203.0.113.5:{}", 20000 + port);
        ok += e.handle(&req, &meta(&src, 44, 0), &mut out).is_ok() as u32;
    }
    assert_eq!(ok, 10);
    // Another address has its own bucket.
    assert!(e
        .handle(&req, &meta("203.0.113.6:1", 44, 0), &mut out)
        .is_ok());
    // 5 ms later, 1000/s has refilled 5 tokens.
    let mut later = 0;
    for _ in 0..20 {
        later += e
            .handle(&req, &meta("203.0.113.5:20000", 44, 5 * MS), &mut out)
            .is_ok() as u32;
    }
    assert_eq!(later, 5);
    // IPv4-mapped IPv6 is the same source as the IPv4 address.
    assert_eq!(
        e.handle(
            &req,
            &meta("[::ffff:203.0.113.5]:20000", 44, 5 * MS),
            &mut out
        ),
        Err(DropReason::RateLimited)
    );
    assert_eq!(e.counters().snapshot().rate_limited, 40 + 15 + 1);
}

#[test]
fn session_table_is_bounded_lru() {
    let mut e = engine(ReflectorConfig {
        max_sessions: 4,
        ..ReflectorConfig::default()
    });
    let mut out = [0u8; 64];
    let req = request(1, 0, TimestampFormat::Ntp, 44);
    for port in 1..=4u16 {
        for _ in 0..3 {
            e.handle(&req, &meta(&format!("192.0.2.1:{port}"), 44, 0), &mut out)
                .unwrap();
        }
    }
    // Port 1 is used again, so port 2 is the least recent when port 5 arrives.
    e.handle(&req, &meta("192.0.2.1:1", 44, 0), &mut out)
        .unwrap();
    assert_eq!(ReflectorPacket::parse(&out[..44]).unwrap().seq(), 3);
    e.handle(&req, &meta("192.0.2.1:5", 44, 0), &mut out)
        .unwrap();
    // Port 2 restarts from 0 (evicted), port 3 continues at 3.
    e.handle(&req, &meta("192.0.2.1:2", 44, 0), &mut out)
        .unwrap();
    assert_eq!(ReflectorPacket::parse(&out[..44]).unwrap().seq(), 0);
    let c = e.counters().snapshot();
    assert_eq!(
        (c.sessions_created, c.sessions_evicted, c.sessions_active),
        (6, 2, 4)
    );
}

#[test]
fn timestamp_format_follows_z_or_config() {
    let mut out = [0u8; 64];
    let rx_utc = 1_767_225_600 * clock::NS_PER_S + 250 * MS;
    for (choice, z, want) in [
        (
            FormatChoice::Auto,
            TimestampFormat::Ptp,
            TimestampFormat::Ptp,
        ),
        (
            FormatChoice::Auto,
            TimestampFormat::Ntp,
            TimestampFormat::Ntp,
        ),
        (
            FormatChoice::Ntp,
            TimestampFormat::Ptp,
            TimestampFormat::Ntp,
        ),
        (
            FormatChoice::Ptp,
            TimestampFormat::Ntp,
            TimestampFormat::Ptp,
        ),
    ] {
        let mut e = engine(ReflectorConfig {
            format: choice,
            ..ReflectorConfig::default()
        });
        let req = request(1, 0, z, 44);
        let r = e
            .handle(&req, &meta("192.0.2.1:1", 44, 0), &mut out)
            .unwrap();
        assert_eq!(r.format, want);
        let p = ReflectorPacket::parse(&out[..44]).unwrap();
        assert_eq!(p.error_estimate().format(), want);
        // PTP counts TAI: UTC + the kernel's offset (37 s here).
        let expect = match want {
            TimestampFormat::Ntp => rx_utc,
            TimestampFormat::Ptp => rx_utc + 37 * clock::NS_PER_S,
        };
        assert_eq!(
            p.receive_timestamp().to_epoch_ns(want),
            Some(expect),
            "{choice:?}"
        );
    }
}

#[test]
fn config_and_listen_parsing() {
    assert_eq!(
        parse_listen("0.0.0.0").unwrap(),
        "0.0.0.0:862".parse().unwrap()
    );
    assert_eq!(parse_listen("::").unwrap(), "[::]:862".parse().unwrap());
    assert_eq!(parse_listen("[::1]").unwrap(), "[::1]:862".parse().unwrap());
    assert_eq!(
        parse_listen("127.0.0.1:8620").unwrap(),
        "127.0.0.1:8620".parse().unwrap()
    );
    let e = parse_listen("localhost:x").unwrap_err().to_string();
    assert!(e.contains("ADDR:PORT"), "{e}");
    assert_eq!("PTP".parse::<FormatChoice>().unwrap(), FormatChoice::Ptp);
    assert!("utc".parse::<FormatChoice>().is_err());
    ReflectorConfig::default().validate().unwrap();
    for bad in [
        ReflectorConfig {
            max_sessions: 0,
            ..Default::default()
        },
        ReflectorConfig {
            rate_per_source: 0.0,
            ..Default::default()
        },
        ReflectorConfig {
            rate_per_source: f64::NAN,
            ..Default::default()
        },
        ReflectorConfig {
            burst: 0,
            ..Default::default()
        },
        ReflectorConfig {
            max_len: 43,
            ..Default::default()
        },
        ReflectorConfig {
            max_len: 70_000,
            ..Default::default()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(ReflectorError::Config(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn fuzz_engine_never_panics_and_never_amplifies() {
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    let mut rng = SmallRng::seed_from_u64(862);
    let mut e = engine(ReflectorConfig {
        max_sessions: 64,
        ..ReflectorConfig::default()
    });
    let mut buf = [0u8; 1473];
    let mut out = [0u8; 1473];
    for i in 0..50_000u64 {
        let len = rng.gen_range(0..1473);
        rng.fill(&mut buf[..len]);
        let src = format!(
            "10.0.{}.{}:{}",
            rng.gen_range(0..4),
            rng.gen_range(0..50),
            rng.gen_range(1..3)
        );
        if let Ok(r) = e.handle(&buf[..len], &meta(&src, len, i * 10_000), &mut out) {
            assert!(r.len <= len);
        }
    }
    let c = e.counters().snapshot();
    assert!(c.sessions_active <= 64);
    assert_eq!(c.received, 50_000);
}
