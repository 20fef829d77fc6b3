use super::*;
use crate::stamp::{ErrorEstimate, ReflectorFields, TimestampFormat};

const MS: u64 = 1_000_000;

fn ts(i: u32) -> Timestamp {
    Timestamp::from_epoch_ns(
        TimestampFormat::Ntp,
        1_700_000_000_000_000_000 + i as u64 * MS,
    )
}

/// The reflector's answer to probe `seq` as `refl_seq`, holding it `hold_ns`.
fn reply(seq: u32, refl_seq: u32, hold_ns: u64) -> [u8; 44] {
    let t2 = 1_800_000_000_000_000_000 + seq as u64 * MS;
    let f = ReflectorFields {
        seq: refl_seq,
        timestamp: Timestamp::from_epoch_ns(TimestampFormat::Ntp, t2 + hold_ns),
        error_estimate: ErrorEstimate::new(false, TimestampFormat::Ntp, 0, 1),
        ssid: 0,
        receive_timestamp: Timestamp::from_epoch_ns(TimestampFormat::Ntp, t2),
        sender_seq: seq,
        sender_timestamp: ts(seq),
        sender_error_estimate: ErrorEstimate::default(),
        sender_ttl: 255,
    };
    let mut b = [0u8; 44];
    f.encode(&mut b, 44).expect("encode");
    b
}

fn send(s: &mut Session, n: u32) {
    for _ in 0..n {
        let seq = s.next_seq();
        s.on_sent(seq as u64 * MS, ts(seq));
    }
}

#[test]
fn rtt_is_kernel_round_trip_minus_reflector_hold() {
    let mut s = Session::new(3, 64);
    send(&mut s, 1);
    assert_eq!(s.on_t1(0, 1_000_000), None);
    assert_eq!(s.on_t4(0, 0, 1_000_000 + 30 * MS), None);
    // 12.5 µs at the reflector (NTP keeps ns exactly through the round trip).
    let out = s.on_reply(&reply(0, 0, 12_500)).expect("valid");
    let ReplyOutcome::Accepted(Some(sample)) = out else {
        panic!("no sample: {out:?}");
    };
    assert_eq!(sample.link, 3);
    assert_eq!(sample.rtt_ns, 30 * MS - 12_500);
    assert_eq!(s.counters.samples, 1);
}

#[test]
fn stamps_may_arrive_after_the_reply() {
    let mut s = Session::new(0, 64);
    send(&mut s, 1);
    assert_eq!(
        s.on_reply(&reply(0, 0, 1000)),
        Ok(ReplyOutcome::Accepted(None))
    );
    assert_eq!(s.on_t1(0, 10), None);
    let sample = s.on_t4(0, 0, 10 + 5000).expect("complete with T4");
    assert_eq!(sample.rtt_ns, 4000);
    // A second T4 (duplicate reply) does not give a second sample.
    assert_eq!(s.on_t4(0, 0, 99_999), None);
}

#[test]
fn loss_splits_by_direction_from_the_reflector_sequence() {
    let mut s = Session::new(0, 64);
    send(&mut s, 10);
    // Lost up: 2 and 5 (the reflector never saw them). Lost down: 7 (reflected as r=5).
    // Reflector numbering: 0→0 1→1 3→2 4→3 6→4 7→5 8→6 9→7.
    let answered = [(0, 0), (1, 1), (3, 2), (4, 3), (6, 4), (8, 6), (9, 7)];
    for (seq, r) in answered {
        assert!(matches!(
            s.on_reply(&reply(seq, r, 0)),
            Ok(ReplyOutcome::Accepted(_))
        ));
    }
    // Before the timeout nothing is lost.
    s.expire(9 * MS + 10, 1000 * MS);
    assert_eq!(s.counters.lost_up + s.counters.lost_down, 0);
    s.expire(10_000 * MS, 1000 * MS);
    assert_eq!(s.counters.lost_up, 2);
    assert_eq!(s.counters.lost_down, 1);
    assert_eq!(s.counters.replies, 7);
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn trailing_losses_wait_for_the_next_answer() {
    let mut s = Session::new(0, 64);
    send(&mut s, 3);
    s.on_reply(&reply(0, 0, 0)).expect("ok");
    s.expire(10_000 * MS, 1000 * MS);
    assert_eq!(s.lost_pending(), 2);
    send(&mut s, 1);
    // Seq 3 answered as r=2: one of 1, 2 reached the reflector.
    s.on_reply(&reply(3, 2, 0)).expect("ok");
    s.expire(10_000 * MS, 1000 * MS);
    assert_eq!((s.counters.lost_up, s.counters.lost_down), (1, 1));
}

#[test]
fn bad_replies_are_refused_without_touching_the_session() {
    let mut s = Session::new(0, 64);
    send(&mut s, 2);
    let good = reply(1, 0, 0);
    assert_eq!(s.on_reply(&good[..20]), Err(Bad::Truncated));
    let mut big = [0u8; 100];
    big[..44].copy_from_slice(&good);
    assert_eq!(s.on_reply(&big), Err(Bad::Oversized));
    assert_eq!(s.on_reply(&reply(7, 0, 0)), Err(Bad::UnknownSeq));
    let mut forged = good;
    forged[35] ^= 1; // the echoed sender timestamp
    assert_eq!(s.on_reply(&forged), Err(Bad::Spoofed));
    assert_eq!(s.counters.replies, 0);
    assert_eq!(s.on_reply(&good), Ok(ReplyOutcome::Accepted(None)));
    assert_eq!(s.on_reply(&good), Ok(ReplyOutcome::Duplicate));
    assert_eq!(s.counters.duplicates, 1);
}

#[test]
fn late_reply_stays_lost_and_table_refuses_to_overrun() {
    let mut s = Session::new(0, 16);
    send(&mut s, 16);
    assert!(!s.can_send(), "16 unsettled probes fill a 16-slot table");
    s.expire(10_000 * MS, 1000 * MS);
    assert!(s.can_send());
    assert_eq!(s.on_reply(&reply(0, 0, 0)), Ok(ReplyOutcome::Late));
    assert_eq!(s.counters.late, 1);
}

#[test]
fn reflector_restart_rebases_without_inventing_losses() {
    let mut s = Session::new(0, 64);
    send(&mut s, 6);
    for (seq, r) in [(0, 0), (1, 1), (2, 2)] {
        s.on_reply(&reply(seq, r, 0)).expect("ok");
    }
    // Reflector restarted: 4 and 5 answered as 0 and 1; 3 lost in an unknown direction.
    s.on_reply(&reply(4, 0, 0)).expect("ok");
    s.on_reply(&reply(5, 1, 0)).expect("ok");
    s.expire(10_000 * MS, 1000 * MS);
    assert_eq!(s.counters.lost_unattributed, 1);
    assert_eq!(s.counters.lost_up + s.counters.lost_down, 0);
}

#[test]
fn outcomes_tell_each_probe_and_a_lost_run_by_direction() {
    let mut s = Session::new(2, 64);
    send(&mut s, 8);
    for seq in 0..8 {
        s.on_t1(seq, 1000 + seq as u64);
    }
    // The reflector saw 0 → 0, 3 → 1 (reply lost), 4 → 2, 5 → 3, 6 → 4 (reply lost), 7 → 5:
    // 1 and 2 were lost up, 3 and 6 down.
    for (seq, r) in [(0, 0), (4, 2), (5, 3), (7, 5)] {
        assert!(matches!(
            s.on_reply(&reply(seq, r, 0)),
            Ok(ReplyOutcome::Accepted(_))
        ));
    }
    let mut got = Vec::new();
    s.expire_with(4 * MS, 1000 * MS, &mut |o| got.push((o.seq, o.fate)));
    // Only 0 is settled: 1 is not yet timed out.
    assert_eq!(got, vec![(0, Fate::Answered)]);
    got.clear();
    s.expire_with(2000 * MS, 1000 * MS, &mut |o| got.push((o.seq, o.fate)));
    assert_eq!(
        got,
        vec![
            (1, Fate::Lost),
            (2, Fate::Lost),
            (3, Fate::Lost),
            // Settled by 4's answer: 4 − 2 = 2 lost up so far, the first two of the run.
            (1, Fate::LostUp),
            (2, Fate::LostUp),
            (3, Fate::LostDown),
            (4, Fate::Answered),
            (5, Fate::Answered),
            (6, Fate::Lost),
            (6, Fate::LostDown),
            (7, Fate::Answered),
        ]
    );
    assert_eq!((s.counters.lost_up, s.counters.lost_down), (2, 2));
}

#[test]
fn outcomes_carry_t1_or_the_send_time() {
    let mut s = Session::new(0, 64);
    send(&mut s, 2);
    s.on_t1(0, 777);
    let mut got = Vec::new();
    s.expire_with(5000 * MS, 1000 * MS, &mut |o| got.push(o));
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].t1_tai_ns, got[0].sent_mono_ns), (777, 0));
    assert_eq!((got[1].t1_tai_ns, got[1].sent_mono_ns), (0, MS));
}
