//! STAMP probes end to end (privileged): the daemon's sender in the router namespace, the
//! reflector in the server namespace, the emulated modem between them with delay, jitter and a
//! different loss each way. The emulator's per-packet log is the ground truth.
mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use common::{modem, probe_section, reflector, Run, TempDir};
use linkpulse::{
    probe::{Health, Sample},
    shared::Shared,
};
use linkpulse_sink::store::{LocalConfig, Store};
use linkpulse_testbed::{
    emulator::LinkProfile,
    netns, rtt,
    truth::{self, Dir, TruthRecord},
    ModemKind, TestbedOptions,
};

/// The tests of this file run one at a time: the precision test compares kernel stamps at the
/// microsecond, and the 10 kHz test's four SCHED_FIFO senders on a 2-vCPU machine would delay
/// the softirqs it measures (CI saw a T1 p99 of 31 µs when they overlapped).
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one still runs alone.
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// IPv4 + UDP + 44-byte STAMP: how the probes and replies look in the truth log.
const PROBE_L3: u32 = 20 + 8 + 44;

/// The probe packets (up) or replies (down) of modem 0 in the order the emulator got them.
fn probes_in_truth(records: &[TruthRecord], dir: Dir) -> Vec<TruthRecord> {
    rtt::packets_of_size(records, 0, dir, PROBE_L3)
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn probe_rtt_and_loss_match_ground_truth() {
    let _alone = alone();
    let up = LinkProfile {
        delay_us: 20_000,
        jitter_us: 5_000,
        loss: 0.03,
        seed: 11,
        ..LinkProfile::unlimited()
    };
    let down = LinkProfile {
        delay_us: 25_000,
        jitter_us: 6_000,
        loss: 0.07,
        seed: 12,
        ..LinkProfile::unlimited()
    };
    let name = "pbtru";
    let bed_probe = {
        // The server's address of modem 0 is fixed by the topology.
        let (_, srv) = linkpulse_testbed::topology::addr_v4(0);
        probe_section(srv, 200, "")
    };
    // The reflector answers from the first probe on: its sequence then counts every probe.
    let mut refl = None;
    // The store is on: the rollups' probe counts are checked against the truth too.
    let store_dir = TempDir::new("pbtru-db");
    let mut run = Run::start_config(
        name,
        vec![modem("wwan0", ModemKind::Veth, up, down)],
        &[],
        TestbedOptions::default(),
        None,
        Some(store_dir.0.clone()),
        &bed_probe,
        &mut |bed| refl = Some(reflector(bed, 0)),
    );
    let refl = refl.expect("reflector started");
    let shared: Arc<Shared> = Arc::clone(run.daemon().shared());
    let mut rx = shared.probe.subscribe(1 << 16);
    std::thread::sleep(Duration::from_secs(12));
    let mut samples: Vec<Sample> = Vec::new();
    while let Ok(s) = rx.pop() {
        samples.push(s);
    }
    run.stop_daemon();
    refl.stop().expect("reflector stops cleanly");
    assert!(
        run.bed.wait_drained(Duration::from_secs(60)),
        "emulator did not drain"
    );
    let view = shared.probe.view();
    let v = view.first().expect("link 0 is probed");
    let records = truth::read_dir(&run.bed.truth_dir()).expect("truth log");
    let ups = probes_in_truth(&records, Dir::Up);
    let downs = probes_in_truth(&records, Dir::Down);
    assert_eq!(
        ups.len() as u64,
        v.probes_sent,
        "every probe sent crossed the emulator"
    );

    // Loss per direction over the settled probes 0..n, exactly as the emulator dropped them.
    let n = v.settled_through as usize;
    assert!(n > 1500, "only {n} probes settled: {v:?}");
    let up_lost = ups[..n].iter().filter(|r| !r.delivered()).count();
    let reached = n - up_lost;
    let down_lost = downs[..reached].iter().filter(|r| !r.delivered()).count();
    assert!(
        up_lost > 0 && down_lost > 0,
        "the profile must lose both ways"
    );
    assert_eq!(
        (v.lost_up, v.lost_down, v.lost_unattributed),
        (up_lost as u64, down_lost as u64, 0),
        "loss per direction vs the emulator's drops over {n} probes"
    );

    // RTT per probe against the emulator's holds of the probe and its reply, with and without
    // the emulator's wake-up latency on the reply taken out (linkpulse_testbed::rtt, the
    // method the bench also uses for irtt).
    assert!(samples.len() > 1000, "only {} samples", samples.len());
    let mut plain = Vec::new();
    let mut strict = Vec::new();
    // For offline analysis: one CSV line per sample with its truth records.
    let mut dump = std::env::var_os("LINKPULSE_PROBE_DUMP")
        .map(|p| std::io::BufWriter::new(std::fs::File::create(p).expect("dump file")));
    for s in &samples {
        if let Some(w) = dump.as_mut() {
            use std::io::Write;
            let (u, d) = (&ups[s.seq as usize], &downs[s.refl_seq as usize]);
            let _ = writeln!(
                w,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                s.seq,
                s.refl_seq,
                s.t1_tai_ns,
                s.t4_tai_ns,
                s.t2_ns,
                s.reflector_hold_ns,
                s.rtt_ns,
                u.t_in_ns,
                u.t_out_ns,
                u.write_ns,
                u.flags,
                d.t_in_ns,
                d.t_out_ns,
                d.write_ns,
                d.flags
            );
        }
        let u = &ups[s.seq as usize];
        let d = &downs[s.refl_seq as usize];
        assert!(
            u.delivered() && d.delivered(),
            "sample for a dropped packet: {s:?}"
        );
        let t3 = (s.t2_ns + s.reflector_hold_ns) as i64;
        plain.push(rtt::residual_ns(s.rtt_ns as i64, u, d, None));
        strict.push(rtt::residual_ns(s.rtt_ns as i64, u, d, Some(t3)));
    }
    let spread = |v: &mut Vec<i64>| -> (i64, u64, u64) {
        let s = rtt::error_spread(v).expect("samples");
        (s.bare_ns, s.p50_ns, s.p99_ns)
    };
    let (bare0, p50_0, p99_0) = spread(&mut plain);
    let (bare, p50, p99) = spread(&mut strict);
    eprintln!(
        "probe RTT vs truth: {} samples; holds only: bare {:.1} µs, |error| p50 {:.1} µs p99 {:.1} µs; \
         emulator wake-up removed: bare {:.1} µs, |error| p50 {:.1} µs p99 {:.1} µs; lost up {up_lost} down {down_lost} of {n}",
        samples.len(),
        bare0 as f64 / 1e3,
        p50_0 as f64 / 1e3,
        p99_0 as f64 / 1e3,
        bare as f64 / 1e3,
        p50 as f64 / 1e3,
        p99 as f64 / 1e3
    );
    assert!(
        (0..2_000_000).contains(&bare),
        "bare path {bare} ns is not a plausible veth path"
    );
    // The path between the router's tc hooks and the emulator is kernel work on a shared
    // 2-vCPU VM (softirqs of veth/TUN delivery): its spread is part of the "bare path" the
    // truth cannot separate, so the RTT comparison gets a margin for it; the stamps themselves
    // are checked against the truth's kernel stamps below, at the 20 µs bound.
    assert!(
        p99 <= 50_000,
        "RTT error p99 {p99} ns > 50 µs against the truth"
    );

    // T1 against the emulator's kernel receive stamp of the same packet (one veth hop later).
    let tai_off = linkpulse::clock::ClockState::read()
        .expect("adjtimex")
        .tai_offset_s
        * 1_000_000_000;
    let mut t1_err: Vec<i64> = samples
        .iter()
        .map(|s| ups[s.seq as usize].t_in_ns as i64 - (s.t1_tai_ns as i64 - tai_off))
        .collect();
    let (hop, t1_p50, t1_p99) = spread(&mut t1_err);
    // T4 inside the emulator's write that delivered the reply (the truth's only bound on it).
    let outside: Vec<i64> = samples
        .iter()
        .map(|s| {
            let d = &downs[s.refl_seq as usize];
            let t4 = s.t4_tai_ns as i64 - tai_off;
            let (from, to) = (
                (d.t_out_ns - u64::from(d.write_ns)) as i64,
                d.t_out_ns as i64,
            );
            (from - t4).max(t4 - to).max(0)
        })
        .collect();
    let mut o = outside.clone();
    o.sort_unstable();
    let t4_p99 = o[o.len() * 99 / 100];
    eprintln!(
        "T1 vs the emulator's kernel rx stamp: hop {:.1} µs, |error| p50 {:.1} µs p99 {:.1} µs; \
         T4 outside the delivering write: p99 {:.1} µs",
        hop as f64 / 1e3,
        t1_p50 as f64 / 1e3,
        t1_p99 as f64 / 1e3,
        t4_p99 as f64 / 1e3
    );
    assert!(t1_p99 <= 20_000, "T1 error p99 {t1_p99} ns > 20 µs");
    assert!(
        t4_p99 <= 20_000,
        "T4 outside its delivery by {t4_p99} ns at p99"
    );

    // The rollups: each stored window's probes sent and lost per direction equal the fates
    // the emulator gave the probes sent in it (T1 = the truth's arrival stamp − the hop).
    let store = Store::start_local(LocalConfig::new(&store_dir.0)).expect("reopen the store");
    let rows = store.read_after(0, 100_000).expect("read rollups");
    store.stop();
    // One-way delays only when both clocks report sync: this machine's (the reflector's too)
    // is not, so every window has none; were it synced, each would carry its error bound.
    let clock = linkpulse::clock::ClockState::read().expect("adjtimex");
    for r in &rows {
        let owd = (
            r.owd_up_mean_ns,
            r.owd_up_max_ns,
            r.owd_down_mean_ns,
            r.owd_down_max_ns,
        );
        if clock.synced {
            assert_eq!(r.owd_samples > 0, r.owd_error_ns.is_some(), "{r:?}");
        } else {
            assert_eq!(
                (r.owd_samples, owd, r.owd_error_ns),
                (0, (None, None, None, None), None),
                "unsynced clock: {r:?}"
            );
        }
    }
    eprintln!(
        "clock synced: {}; windows with one-way delays: {}",
        clock.synced,
        rows.iter().filter(|r| r.owd_samples > 0).count()
    );
    const W: i64 = 500_000_000;
    let reply = rtt::reply_index(&ups);
    // Per window: (sent, lost up, lost down); and windows the truth cannot judge exactly.
    let mut truth_w: std::collections::BTreeMap<i64, (u32, u32, u32)> = Default::default();
    let mut unsure = std::collections::BTreeSet::new();
    let mut no_direction = std::collections::BTreeSet::new();
    let t1_of = |i: usize| ups[i].t_in_ns as i64 - hop;
    let window_of = |t: i64| t - t.rem_euclid(W);
    let mut run_windows: Vec<(i64, bool)> = Vec::new();
    for i in 0..n {
        let t = t1_of(i);
        let w = window_of(t);
        // Within 50 µs of a boundary the truth cannot place T1 (the hop varies by a few µs).
        if t - w < 50_000 || w + W - t < 50_000 {
            unsure.insert(w);
            unsure.insert(w - W);
            unsure.insert(w + W);
        }
        let e = truth_w.entry(w).or_default();
        e.0 += 1;
        let lost_up = !ups[i].delivered();
        let lost_down = !lost_up && reply[i].is_some_and(|k| !downs[k].delivered());
        e.1 += u32::from(lost_up);
        e.2 += u32::from(lost_down);
        // A run of consecutive losses that goes both ways and crosses a boundary: the
        // reflector's numbering tells how many of it went up, not which (the daemon counts
        // its first ones up), so only its total is exact per window.
        if lost_up || lost_down {
            run_windows.push((w, lost_up));
        } else {
            let mixed = run_windows.iter().any(|r| r.1) && run_windows.iter().any(|r| !r.1);
            if mixed && run_windows.first().map(|r| r.0) != run_windows.last().map(|r| r.0) {
                no_direction.extend(run_windows.iter().map(|r| r.0));
            }
            run_windows.clear();
        }
    }
    // Windows whose probes are all settled (0..n), with a margin for the stop.
    let last = window_of(t1_of(n - 1)) - 4 * W;
    let mut compared = 0;
    for r in rows.iter().filter(|r| r.link_id == 0) {
        let w = r.window_start_ns as i64;
        if w > last || unsure.contains(&w) {
            continue;
        }
        let (sent, up_lost, down_lost) = truth_w.get(&w).copied().unwrap_or_default();
        assert_eq!(r.probes_sent_fwd, sent, "probes sent in window {w}: {r:?}");
        assert_eq!(
            r.probes_lost_fwd + r.probes_lost_bwd,
            up_lost + down_lost,
            "probes lost in window {w}: {r:?}"
        );
        if !no_direction.contains(&w) {
            assert_eq!(
                (r.probes_lost_fwd, r.probes_sent_bwd, r.probes_lost_bwd),
                (up_lost, sent - up_lost, down_lost),
                "loss per direction in window {w}: {r:?}"
            );
        }
        compared += 1;
    }
    eprintln!(
        "rollups: {compared} windows compared with the truth ({} too close to call, {} without a per-direction split)",
        unsure.len(),
        no_direction.len()
    );
    assert!(compared >= 10, "only {compared} windows compared");
    assert!(
        rows.iter()
            .filter(|r| r.link_id == 0)
            .any(|r| r.probes_lost_fwd > 0)
            && rows.iter().any(|r| r.probes_lost_bwd > 0),
        "losses both ways reach the rollups"
    );
}

/// Bad packets on the sender's socket are counted and dropped; a silent reflector turns the
/// link down, its return brings it back up.
#[test]
fn bad_replies_are_dropped_and_a_silent_reflector_turns_the_link_down_and_up() {
    let _alone = alone();
    let name = "pbbad";
    let (_, srv) = linkpulse_testbed::topology::addr_v4(0);
    let text = probe_section(
        srv,
        100,
        "loss_timeout_ms = 300\ndown_after_ms = 1000\nrecover_s = 1\n",
    );
    let mut refl = None;
    let run = Run::start_config(
        name,
        vec![common::plain("wwan0", ModemKind::Veth)],
        &[],
        TestbedOptions::default(),
        None,
        None,
        &text,
        &mut |bed| refl = Some(reflector(bed, 0)),
    );
    let shared: Arc<Shared> = Arc::clone(run.daemon().shared());
    let refl = refl.expect("reflector started");
    wait_for("link up", Duration::from_secs(20), || {
        shared.probe.state(0) == Health::Up
    });
    refl.stop().expect("reflector stops");
    wait_for("link down", Duration::from_secs(20), || {
        shared.probe.state(0) == Health::Down
    });

    // Now pose as the reflector (its address and port) and send junk to the sender.
    let (rtr, _) = run.bed.modem_addr_v4(0);
    let port = shared.probe.view()[0].sender_port;
    assert_ne!(port, 0);
    let to = SocketAddr::new(rtr.into(), port);
    let sent = shared.probe.view()[0].probes_sent as u32;
    netns::run_in(run.bed.server_ns(), || {
        let s = UdpSocket::bind(SocketAddr::new(srv.into(), 862)).expect("bind as reflector");
        let mut rng = 0x1234_5678_u64;
        for i in 0..200u32 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = match i % 4 {
                0 => (rng % 44) as usize,        // truncated
                1 => 45 + (rng % 1400) as usize, // oversized
                _ => 44,                         // forged: unknown seq or wrong timestamp
            };
            let mut b = vec![0u8; len];
            for (j, x) in b.iter_mut().enumerate() {
                *x = (rng >> (j % 57)) as u8;
            }
            if len == 44 && i % 4 == 3 {
                // A sequence that is in flight, with a timestamp the sender never sent.
                b[24..28].copy_from_slice(&(sent.saturating_sub(1)).to_be_bytes());
            }
            s.send_to(&b, to).expect("send junk");
        }
    })
    .expect("server ns");
    wait_for("junk counted", Duration::from_secs(10), || {
        shared
            .probe
            .bad
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
            >= 200
    });
    let v = &shared.probe.view()[0];
    assert_eq!(
        v.duplicates + v.late_replies,
        0,
        "junk touched the session: {v:?}"
    );

    let refl = reflector(&run.bed, 0);
    wait_for("link up again", Duration::from_secs(20), || {
        shared.probe.state(0) == Health::Up
    });
    let events: Vec<_> = shared
        .events()
        .into_iter()
        .filter(|e| e.kind == "link_state")
        .map(|e| e.message)
        .collect();
    assert!(
        events.iter().any(|m| m.contains("is down"))
            && events.last().is_some_and(|m| m.contains("is up")),
        "{events:?}"
    );
    let (code, metrics) = common::http_get(&run, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "linkpulse_link_state{",
        "linkpulse_link_state_since_seconds{",
        "linkpulse_link_rtt_seconds{",
        "linkpulse_link_probes_sent_total{",
        "direction=\"up\"",
        "linkpulse_probe_missed_ticks_total",
        "linkpulse_probe_bad_packets_total{reason=\"truncated\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing from /metrics");
    }
    refl.stop().expect("reflector stops");
}

/// 10 kHz probes on 4 links at once from the one `lp-probe` thread: the absolute-deadline
/// schedule keeps up (missed ticks ≤ 1 % is the claim; the bound here is looser because this
/// shared VM also runs the emulators of the 4 links and other builds).
#[test]
fn ten_khz_on_four_links_misses_few_ticks() {
    let _alone = alone();
    let modems = (0..4)
        .map(|k| common::plain(&format!("wwan{k}"), ModemKind::Veth))
        .collect();
    // Each link probes the server address behind its own modem.
    let mut text = String::from(
        "[router]\nid = \"e2e\"\nsite = \"lab\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [stream]\nenabled = false\n[store]\nenabled = false\n\
         [probe]\nmin_rate_hz = 10000\nmax_rate_hz = 10000\nbudget_mb_per_day = 1000000\n",
    );
    for k in 0..4 {
        let (_, s) = linkpulse_testbed::topology::addr_v4(k);
        text += &format!("[[link]]\ninterface = \"wwan{k}\"\n[link.probe]\nreflector = \"{s}\"\n");
    }
    let mut refls = Vec::new();
    let run = Run::start_config(
        "pb10k",
        modems,
        &[],
        TestbedOptions::default(),
        None,
        None,
        &text,
        &mut |bed| {
            for k in 0..4 {
                refls.push(reflector(bed, k));
            }
        },
    );
    let shared: Arc<Shared> = Arc::clone(run.daemon().shared());
    let read = || {
        let p = &shared.probe;
        (
            p.ticks.load(std::sync::atomic::Ordering::Relaxed),
            p.missed_ticks.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    // Sockets open within the first second; measure the 5 s after that.
    std::thread::sleep(Duration::from_secs(2));
    let (t0, m0) = read();
    std::thread::sleep(Duration::from_secs(5));
    let (t1, m1) = read();
    let view = shared.probe.view();
    drop(run);
    for r in refls {
        r.stop().expect("reflector stops");
    }
    let (ticks, missed) = (t1 - t0, m1 - m0);
    let pct = 100.0 * missed as f64 / ticks.max(1) as f64;
    eprintln!("10 kHz x 4 links: {ticks} ticks in 5 s, {missed} missed ({pct:.3} %)");
    // The figure itself is a performance claim (README: 1.1 % on the loaded dev VM); the test
    // only checks the scheduler really runs all four links at 10 kHz, with a bound generous
    // enough for a busy CI machine.
    assert!(ticks > 100_000, "only {ticks} ticks in 5 s at 4 x 10 kHz");
    assert!(
        pct <= 25.0,
        "{pct:.2} % of ticks missed: the sender falls far behind"
    );
    assert_eq!(view.len(), 4);
    for v in &view {
        assert!(
            v.rtt_samples > 10_000,
            "link {} answered too little: {v:?}",
            v.index
        );
    }
}

/// The controller's stream carries every probe RTT sample in the bin of its reply's kernel
/// stamp T4 (count, min, max, sum exactly as the samples say) and the probes sent, with a
/// client subscribed to every bin; a sample whose bin was already published is in a later
/// frame, flagged, never lost.
#[test]
fn stream_frames_carry_every_probe_sample_in_its_bin() {
    let _alone = alone();
    let up = LinkProfile {
        delay_us: 20_000,
        jitter_us: 5_000,
        loss: 0.02,
        seed: 21,
        ..LinkProfile::unlimited()
    };
    let down = LinkProfile {
        delay_us: 15_000,
        jitter_us: 5_000,
        loss: 0.04,
        seed: 22,
        ..LinkProfile::unlimited()
    };
    let name = "pbstrm";
    let sock = std::env::temp_dir().join(format!("lp-{name}-{}.sock", std::process::id()));
    let (_, srv) = linkpulse_testbed::topology::addr_v4(0);
    let rate = 200u32;
    // 1 ms bins: every bin reaches this test's client without its socket overflowing.
    let text = probe_section(srv, rate, "[sampling]\nbin_width_us = 1000\n");
    let run = Run::start_config(
        name,
        vec![modem("wwan0", ModemKind::Veth, up, down)],
        &[],
        TestbedOptions::default(),
        Some(sock.clone()),
        None,
        &text,
        &mut |_| {},
    );
    let shared: Arc<Shared> = Arc::clone(run.daemon().shared());
    // Every sample from now on (the prober picks the tap up within a second, long before
    // the reflector answers: no sample exists before that).
    let mut tap = shared.probe.subscribe(1 << 16);
    let mut client =
        linkpulse_client::StreamClient::connect(&sock, linkpulse_client::Subscription::every_bin())
            .expect("stream client");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    assert_eq!(client.hello().link_count, 1);

    struct Bin {
        start: u64,
        width: u64,
        flags: u32,
        rec: linkpulse_client::LinkRecord,
    }
    let mut bins: Vec<Bin> = Vec::new();
    let mut last_seq: Option<u64> = None;
    // Each second's longest T4 → sample ready (a figure, printed).
    let mut ready_seconds: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    let mut refl = None;
    let mut stopped = false;
    // 1.5 s without reflector, 4 s answered, then 2.5 s for the last replies, the loss
    // timeout and the once-a-second counters.
    while t0.elapsed() < Duration::from_millis(8_000) {
        if refl.is_none() && !stopped && t0.elapsed() > Duration::from_millis(1_500) {
            refl = Some(reflector(&run.bed, 0));
        }
        if !stopped && t0.elapsed() > Duration::from_millis(5_500) {
            if let Some(r) = refl.take() {
                r.stop().expect("reflector stops");
            }
            stopped = true;
        }
        let f = client.next_frame().expect("frame");
        let h = f.header;
        assert_eq!(
            h.dropped_before, 0,
            "the client lost frames: the test cannot count exactly"
        );
        if let Some(p) = last_seq {
            assert_eq!(h.seq, p + 1, "the daemon skipped a bin");
        }
        last_seq = Some(h.seq);
        let rec = f.records().next().expect("link 0's record");
        let ready = shared.probe.links[0]
            .sample_ready_max_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        if ready != 0 && ready_seconds.last() != Some(&ready) {
            ready_seconds.push(ready);
        }
        bins.push(Bin {
            start: h.bin_start_tai_ns,
            width: h.width_ns,
            flags: h.flags,
            rec,
        });
    }
    // A probe the socket refused (the ICMP error of a probe sent before the reflector
    // listened) never left: no T1.
    let missed = shared
        .probe
        .missed_ticks
        .load(std::sync::atomic::Ordering::Relaxed)
        + shared
            .probe
            .send_errors
            .load(std::sync::atomic::Ordering::Relaxed);
    let view = shared.probe.view();
    let v = view.first().expect("link 0 is probed").clone();
    let mut samples: Vec<Sample> = Vec::new();
    while let Ok(s) = tap.pop() {
        samples.push(s);
    }
    drop(client);
    drop(run);
    let _ = std::fs::remove_file(&sock);

    assert!(
        bins.iter().all(|b| b.rec.has_rtt() && b.rec.has_probes()),
        "a probed link's records carry VALID_RTT and VALID_PROBES"
    );
    let in_frames: u64 = bins.iter().map(|b| u64::from(b.rec.rtt_count)).sum();
    // One-way delays need both clocks synchronised; sender and reflector share this machine's.
    let synced = linkpulse::clock::ClockState::read().is_ok_and(|c| c.synced);
    let owd: u64 = bins
        .iter()
        .map(|b| b.rec.owd().map_or(0, |o| u64::from(o.count)))
        .sum();
    if synced {
        assert_eq!(
            owd, in_frames,
            "synced clocks: every sample has one-way delays"
        );
    } else {
        assert_eq!(
            owd, 0,
            "unsynchronised clock: no one-way delay in any frame"
        );
        assert!(bins
            .iter()
            .all(|b| b.rec.owd_count == 0 && b.rec.owd_up_sum_ns == 0));
    }
    assert!(samples.len() > 500, "only {} samples", samples.len());
    assert_eq!(
        samples.len() as u64,
        v.rtt_samples,
        "the tap saw every sample"
    );
    assert_eq!(
        in_frames, v.rtt_samples,
        "every sample is in exactly one frame"
    );
    // A bin holds the samples whose T4 is in it, less the ones handed over after its
    // deadline (those are in a later frame, flagged): without the flag a frame holds no
    // sample of another bin; when none of its own went late, exactly its own.
    samples.sort_by_key(|s| s.t4_tai_ns);
    let (lo, hi) = (
        samples.iter().map(|s| s.rtt_ns).min().unwrap_or(0),
        samples.iter().map(|s| s.rtt_ns).max().unwrap_or(0),
    );
    let (mut late, mut exact, mut short) = (0, 0, 0u64);
    for b in &bins {
        let r = &b.rec;
        if r.rtt_count > 0 {
            let (min, max) = (r.rtt_min().unwrap_or(0), r.rtt_max().unwrap_or(0));
            assert!(
                lo <= min && min <= max && max <= hi,
                "{r:?} outside [{lo}, {hi}]"
            );
        }
        if b.flags & linkpulse_client::FLAG_RTT_LATE != 0 {
            late += 1;
            continue;
        }
        let a = samples.partition_point(|s| s.t4_tai_ns < b.start);
        let z = samples.partition_point(|s| s.t4_tai_ns < b.start + b.width);
        let these = &samples[a..z];
        let n = r.rtt_count as usize;
        assert!(
            n <= these.len(),
            "bin at {}: {n} > {}",
            b.start,
            these.len()
        );
        short += (these.len() - n) as u64;
        if n == these.len() && n > 0 {
            exact += 1;
            assert_eq!(r.rtt_sum_ns, these.iter().map(|s| s.rtt_ns).sum::<u64>());
            assert_eq!(r.rtt_min(), these.iter().map(|s| s.rtt_ns).min());
            assert_eq!(r.rtt_max(), these.iter().map(|s| s.rtt_ns).max());
        }
    }
    // Probes sent: one per period over the frames' span, less the missed or refused ones.
    let span_ns: u64 = bins.iter().map(|b| b.width).sum();
    let sent: u64 = bins.iter().map(|b| u64::from(b.rec.probes_sent)).sum();
    let want = span_ns as f64 * f64::from(rate) / 1e9;
    eprintln!(
        "stream: {} frames, {in_frames} samples, {exact} bins checked exactly, {late} flagged \
         RTT-late, {short} samples not in their T4 bin; {sent} probes sent in frames \
         (expected {want:.0}, {missed} ticks missed or refused); each second's longest T4 to \
         sample ready (µs): {:?}",
        bins.len(),
        ready_seconds.iter().map(|n| n / 1000).collect::<Vec<_>>()
    );
    assert!(
        (sent as f64 - want).abs() <= 3.0 + missed as f64,
        "{sent} probes sent in {span_ns} ns of frames at {rate} Hz"
    );
    assert!(exact > 0, "no bin with samples was checked exactly");
}
