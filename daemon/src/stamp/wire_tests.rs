//! Codec tests: hand-built fixtures from the RFC 8762 layouts, round trips, every error path,
//! and a seeded random fuzz loop over the parsers.
use super::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};

/// 2026-01-01T00:00:00Z as UNIX seconds, and as NTP seconds (+2 208 988 800 = 0xED003780).
const UNIX_2026: u64 = 1_767_225_600;
const NTP_2026: u32 = 0xED00_3780;

/// Session-Sender test packet, RFC 8762 §4.2.1 (+ RFC 8972 SSID), offsets on the left.
#[rustfmt::skip]
const SENDER_FIXTURE: [u8; 44] = [
    0x01, 0x02, 0x03, 0x04,                         //  0..4  Sequence Number 0x01020304
    0xED, 0x00, 0x37, 0x80,                         //  4..8  Timestamp seconds: 2026-01-01 UTC
    0x80, 0x00, 0x00, 0x00,                         //  8..12 Timestamp fraction: 0.5 s
    0x8A, 0x05,                                     // 12..14 Error Estimate S=1 Z=0 Scale=10 Mult=5
    0xBE, 0xEF,                                     // 14..16 SSID 0xBEEF
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,       // 16..30 MBZ
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,       // 30..44 MBZ
];

/// Session-Reflector test packet, RFC 8762 §4.3.1 (+ RFC 8972 SSID), offsets on the left.
#[rustfmt::skip]
const REFLECTOR_FIXTURE: [u8; 44] = [
    0x00, 0x00, 0x00, 0x07,                         //  0..4  Sequence Number 7 (reflector's)
    0xED, 0x00, 0x37, 0x80, 0xC0, 0x00, 0x00, 0x00, //  4..12 Timestamp T3 = +0.75 s
    0x80, 0x01,                                     // 12..14 Error Estimate S=1 Z=0 Scale=0 Mult=1
    0xBE, 0xEF,                                     // 14..16 SSID echoed
    0xED, 0x00, 0x37, 0x80, 0x40, 0x00, 0x00, 0x00, // 16..24 Receive Timestamp T2 = +0.25 s
    0x01, 0x02, 0x03, 0x04,                         // 24..28 Session-Sender Sequence Number
    0xED, 0x00, 0x37, 0x80, 0x00, 0x00, 0x00, 0x00, // 28..36 Session-Sender Timestamp T1 = +0 s
    0x8A, 0x05,                                     // 36..38 Session-Sender Error Estimate
    0x00, 0x00,                                     // 38..40 MBZ
    0x40,                                           // 40     Session-Sender TTL 64
    0x00, 0x00, 0x00,                               // 41..44 MBZ
];

/// A PTP-format Session-Sender packet (Z = 1): TAI 2026-01-01T00:00:37 (UTC + 37 s), +0.5 s.
#[rustfmt::skip]
const SENDER_PTP_FIXTURE: [u8; 44] = [
    0x00, 0x00, 0x00, 0x00,                         //  0..4  Sequence Number 0
    0x69, 0x55, 0xB9, 0x25,                         //  4..8  seconds since the PTP epoch
    0x1D, 0xCD, 0x65, 0x00,                         //  8..12 nanoseconds 500 000 000
    0x41, 0x01,                                     // 12..14 S=0 Z=1 Scale=1 Mult=1
    0x00, 0x00,                                     // 14..16 SSID 0
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[test]
fn sender_fixture_decodes_and_round_trips() {
    let p = SenderPacket::parse(&SENDER_FIXTURE).unwrap();
    assert_eq!(p.seq(), 0x0102_0304);
    assert_eq!(p.timestamp().seconds(), NTP_2026);
    assert_eq!(p.timestamp().fraction(), 0x8000_0000);
    assert_eq!(
        p.timestamp().to_epoch_ns(TimestampFormat::Ntp),
        Some(UNIX_2026 * NS_PER_S + 500_000_000)
    );
    let ee = p.error_estimate();
    assert!(ee.synced());
    assert_eq!(ee.format(), TimestampFormat::Ntp);
    assert_eq!((ee.scale(), ee.multiplier()), (10, 5));
    assert_eq!(p.ssid(), 0xBEEF);
    assert!(!p.mbz_nonzero());
    assert_eq!(p.len(), 44);

    let mut out = [0xAAu8; 64];
    let n = p.fields().encode(&mut out, 44).unwrap();
    assert_eq!(&out[..n], &SENDER_FIXTURE);
    assert_eq!(out[44], 0xAA, "encode wrote past len");
}

#[test]
fn reflector_fixture_decodes_and_round_trips() {
    let p = ReflectorPacket::parse(&REFLECTOR_FIXTURE).unwrap();
    let f = p.fields();
    assert_eq!(f.seq, 7);
    assert_eq!(f.ssid, 0xBEEF);
    assert_eq!(f.sender_seq, 0x0102_0304);
    assert_eq!(f.sender_ttl, 64);
    assert_eq!(
        f.error_estimate,
        ErrorEstimate::new(true, TimestampFormat::Ntp, 0, 1)
    );
    assert_eq!(f.sender_error_estimate, ErrorEstimate(0x8A05));
    let ns = |t: Timestamp| t.to_epoch_ns(TimestampFormat::Ntp).unwrap() - UNIX_2026 * NS_PER_S;
    assert_eq!(ns(f.sender_timestamp), 0);
    assert_eq!(ns(f.receive_timestamp), 250_000_000);
    assert_eq!(ns(f.timestamp), 750_000_000);
    assert!(!p.mbz_nonzero());

    let mut out = [0u8; 44];
    f.encode(&mut out, 44).unwrap();
    assert_eq!(out, REFLECTOR_FIXTURE);
}

#[test]
fn ptp_fixture_honours_z() {
    let p = SenderPacket::parse(&SENDER_PTP_FIXTURE).unwrap();
    let ee = p.error_estimate();
    assert_eq!(ee.format(), TimestampFormat::Ptp);
    assert!(!ee.synced());
    assert_eq!((ee.scale(), ee.multiplier()), (1, 1));
    let tai = (UNIX_2026 + 37) * NS_PER_S + 500_000_000;
    assert_eq!(p.timestamp().to_epoch_ns(ee.format()), Some(tai));
    // The same bits read as NTP mean something else entirely: the flag matters.
    assert_ne!(p.timestamp().to_epoch_ns(TimestampFormat::Ntp), Some(tai));
    assert_eq!(
        Timestamp::from_epoch_ns(TimestampFormat::Ptp, tai),
        p.timestamp()
    );
    let mut out = [0u8; 44];
    p.fields().encode(&mut out, 44).unwrap();
    assert_eq!(out, SENDER_PTP_FIXTURE);
}

#[test]
fn padding_is_kept_out_of_fields_and_zeroed_on_encode() {
    let mut padded = [0u8; 200];
    padded[..44].copy_from_slice(&SENDER_FIXTURE);
    padded[44..].fill(0x5A); // sender padding (or RFC 8972 TLVs) is not interpreted
    let p = SenderPacket::parse(&padded).unwrap();
    assert_eq!(p.len(), 200);
    assert!(!p.mbz_nonzero());
    let mut out = [0xFFu8; 200];
    p.fields().encode(&mut out, 200).unwrap();
    assert_eq!(&out[..44], &SENDER_FIXTURE);
    assert!(out[44..].iter().all(|&b| b == 0));
}

#[test]
fn nonzero_mbz_is_tolerated_and_reported() {
    for at in 16..44 {
        let mut b = SENDER_FIXTURE;
        b[at] = 1;
        let p = SenderPacket::parse(&b).expect("RFC 8762: MBZ is not checked");
        assert!(p.mbz_nonzero(), "sender MBZ octet {at}");
        assert_eq!(p.seq(), 0x0102_0304);
    }
    for at in [38, 39, 41, 42, 43] {
        let mut b = REFLECTOR_FIXTURE;
        b[at] = 0x80;
        assert!(
            ReflectorPacket::parse(&b).unwrap().mbz_nonzero(),
            "octet {at}"
        );
    }
    // SSID (14..16) and TTL (40) are fields, not MBZ.
    let mut b = REFLECTOR_FIXTURE;
    b[40] = 255;
    b[14] = 0;
    assert!(!ReflectorPacket::parse(&b).unwrap().mbz_nonzero());
}

#[test]
fn error_paths() {
    for len in 0..44 {
        assert_eq!(
            SenderPacket::parse(&SENDER_FIXTURE[..len]).unwrap_err(),
            WireError::TooShort {
                what: "Session-Sender",
                len,
                min: 44
            }
        );
        assert_eq!(
            ReflectorPacket::parse(&REFLECTOR_FIXTURE[..len]).unwrap_err(),
            WireError::TooShort {
                what: "Session-Reflector",
                len,
                min: 44
            }
        );
    }
    let f = SenderFields::default();
    let mut small = [0u8; 50];
    assert_eq!(
        f.encode(&mut small, 51).unwrap_err(),
        WireError::BufferTooSmall { len: 51, cap: 50 }
    );
    assert_eq!(
        f.encode(&mut small, 43).unwrap_err(),
        WireError::LengthBelowBase { len: 43, min: 44 }
    );
    assert_eq!(
        ReflectorFields::default()
            .encode(&mut small, 60)
            .unwrap_err(),
        WireError::BufferTooSmall { len: 60, cap: 50 }
    );
    assert!(ReflectorFields::patch_timestamp(&mut small[..43], Timestamp(1)).is_err());
    // The messages name the cause and the fix.
    let msg = WireError::TooShort {
        what: "Session-Sender",
        len: 3,
        min: 44,
    }
    .to_string();
    assert!(
        msg.contains("3 bytes") && msg.contains("check the peer"),
        "{msg}"
    );
    // Invalid values decode to None rather than to a wrong instant.
    assert_eq!(
        Timestamp::from_parts(1, NS_PER_S as u32).to_epoch_ns(TimestampFormat::Ptp),
        None
    );
    // NTP 1968-1970 (era 0, before the UNIX epoch).
    assert_eq!(
        Timestamp::from_parts(0x8000_0000, 0).to_epoch_ns(TimestampFormat::Ntp),
        None
    );
    assert!(!ErrorEstimate(0x8000).is_valid());
}

#[test]
fn patch_timestamp_touches_only_t3() {
    let mut b = REFLECTOR_FIXTURE;
    ReflectorFields::patch_timestamp(&mut b, Timestamp(0x1122_3344_5566_7788)).unwrap();
    assert_eq!(&b[4..12], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    assert_eq!(&b[..4], &REFLECTOR_FIXTURE[..4]);
    assert_eq!(&b[12..], &REFLECTOR_FIXTURE[12..]);
}

#[test]
fn ntp_round_trip_is_exact_to_the_ns() {
    let mut rng = SmallRng::seed_from_u64(0x5747_4d50);
    // Edge sub-seconds (the fraction must never carry into 2^32) and random instants up to 2104.
    let edges = [0, 1, 499_999_999, 500_000_000, 999_999_999];
    for sub in edges {
        let ns = UNIX_2026 * NS_PER_S + sub;
        let t = Timestamp::from_epoch_ns(TimestampFormat::Ntp, ns);
        assert_eq!(t.seconds(), NTP_2026);
        assert_eq!(t.to_epoch_ns(TimestampFormat::Ntp), Some(ns), "sub {sub}");
    }
    let max_unix_s = (1u64 << 32) + (1 << 31) - NTP_UNIX_OFFSET_S; // end of the pivot window
    for _ in 0..200_000 {
        let ns = rng.gen_range(0..max_unix_s * NS_PER_S);
        let t = Timestamp::from_epoch_ns(TimestampFormat::Ntp, ns);
        assert_eq!(t.to_epoch_ns(TimestampFormat::Ntp), Some(ns), "ns {ns}");
    }
    // NTP -> ns -> NTP is exact within the ns resolution: at most 3 fraction units (0.7 ns).
    for _ in 0..200_000 {
        let t = Timestamp::from_parts(rng.gen_range(0xE000_0000..=u32::MAX), rng.gen());
        let ns = t.to_epoch_ns(TimestampFormat::Ntp).unwrap();
        let back = Timestamp::from_epoch_ns(TimestampFormat::Ntp, ns);
        assert!(back.0.abs_diff(t.0) <= 3, "{t:?} -> {ns} -> {back:?}");
    }
}

#[test]
fn ntp_era_boundary_2036() {
    // 2036-02-07T06:28:16Z is NTP second 2^32: era 1 starts, seconds wrap to 0.
    let era1_unix_s = (1u64 << 32) - NTP_UNIX_OFFSET_S;
    for ns in [
        era1_unix_s * NS_PER_S - 1,
        era1_unix_s * NS_PER_S,
        era1_unix_s * NS_PER_S + 1,
    ] {
        let t = Timestamp::from_epoch_ns(TimestampFormat::Ntp, ns);
        assert_eq!(t.to_epoch_ns(TimestampFormat::Ntp), Some(ns));
    }
    assert_eq!(
        Timestamp::from_epoch_ns(TimestampFormat::Ntp, era1_unix_s * NS_PER_S).seconds(),
        0
    );
}

#[test]
fn ptp_round_trip_is_exact() {
    let mut rng = SmallRng::seed_from_u64(1588);
    for _ in 0..200_000 {
        let ns = rng.gen_range(0..(1u64 << 32) * NS_PER_S);
        let t = Timestamp::from_epoch_ns(TimestampFormat::Ptp, ns);
        assert_eq!(t.fraction() as u64, ns % NS_PER_S);
        assert_eq!(t.to_epoch_ns(TimestampFormat::Ptp), Some(ns));
    }
}

#[test]
fn error_estimate_bounds_from_above() {
    // 1.25 µs = 5368.7 units of 2^-32 s -> scale 5, multiplier 168 (1.2517 µs).
    let ee = ErrorEstimate::from_error_ns(true, TimestampFormat::Ptp, 1_250);
    assert_eq!((ee.scale(), ee.multiplier()), (5, 168));
    assert!(ee.synced());
    assert_eq!(ee.format(), TimestampFormat::Ptp);
    assert_eq!(ee.error_ns(), 1_252);
    // Zero error still has a non-zero multiplier (RFC 4656).
    let zero = ErrorEstimate::from_error_ns(false, TimestampFormat::Ntp, 0);
    assert!(zero.is_valid());
    assert_eq!(zero.0, 0x0001);
    // The field reaches 255 × 2^31 s, beyond u64 ns (584 years): the largest input still
    // fits (scale 59), and the largest field value reads back saturated.
    let huge = ErrorEstimate::from_error_ns(false, TimestampFormat::Ntp, u64::MAX);
    assert_eq!(huge.scale(), 59);
    assert_eq!(huge.error_ns(), u64::MAX);
    assert_eq!(
        ErrorEstimate::new(false, TimestampFormat::Ntp, 63, 255).error_ns(),
        u64::MAX
    );
    let mut rng = SmallRng::seed_from_u64(4656);
    for _ in 0..100_000 {
        let e = rng.gen_range(0..10_000_000_000u64);
        let ee = ErrorEstimate::from_error_ns(false, TimestampFormat::Ntp, e);
        let got = ee.error_ns();
        // Never understated, and overstated by less than one step of the chosen scale (+1 ns
        // for rounding up).
        let step = ((1u128 << ee.scale()) * NS_PER_S as u128).div_ceil(1 << 32) as u64;
        assert!(got >= e && got <= e + step + 1, "{e} -> {ee:?} = {got}");
    }
}

#[test]
fn fuzz_parsers_never_panic() {
    let mut rng = SmallRng::seed_from_u64(8762);
    let mut buf = [0u8; 1600];
    let mut out = [0u8; 1600];
    for i in 0..100_000 {
        let len = if i % 4 == 0 {
            rng.gen_range(0..64)
        } else {
            rng.gen_range(0..1600)
        };
        rng.fill(&mut buf[..len]);
        let b = &buf[..len];
        match SenderPacket::parse(b) {
            Ok(p) => {
                assert!(len >= 44);
                let f = p.fields();
                let _ = p.mbz_nonzero();
                let _ = f.timestamp.to_epoch_ns(f.error_estimate.format());
                let _ = f.error_estimate.error_ns();
                // What we parse we can write back, header bytes identical.
                f.encode(&mut out, len).unwrap();
                assert_eq!(&out[..16], &b[..16]);
            }
            Err(e) => assert!(len < 44, "{e}"),
        }
        match ReflectorPacket::parse(b) {
            Ok(p) => {
                let f = p.fields();
                let _ = p.mbz_nonzero();
                let _ = f.receive_timestamp.to_epoch_ns(TimestampFormat::Ptp);
                f.encode(&mut out, len).unwrap();
                assert_eq!(&out[..38], &b[..38]);
                assert_eq!(out[40], b[40]);
            }
            Err(e) => assert!(len < 44, "{e}"),
        }
    }
}
