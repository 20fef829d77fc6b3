//! The controller's stream, end to end on the testbed (root): every bin to fast clients with no
//! gap and exact counts, decimation aggregates exactly and aligned, a client that stops reading
//! loses frames and sees it without slowing anyone (the rollups in the real local store equal
//! the fast client's frames, window by window), bad requests get a clear error, and a C
//! program built from linkpulse_stream.h reads real captured frames.
mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{plain, Run, TempDir};
use linkpulse_client::{request_raw, ClientError, StreamClient, Subscription, VALID_TRAFFIC};
use linkpulse_common::stream::{as_bytes, ERR_BAD_REQUEST, ERR_VERSION, STREAM_VERSION};
use linkpulse_sink::store::{LocalConfig, Store};
use linkpulse_testbed::{
    traffic::{UdpFlow, UdpSink},
    ModemKind, TestbedOptions,
};

/// The kernel's current CPU wake-up latency limit, µs (the smallest request held).
fn cpu_latency_limit() -> i32 {
    let b = std::fs::read(linkpulse::cpu_latency::DEVICE).expect("read /dev/cpu_dma_latency");
    i32::from_ne_bytes(b[..4].try_into().expect("4 bytes"))
}

fn start(name: &str, store: Option<PathBuf>) -> (Run, PathBuf) {
    let sock = std::env::temp_dir().join(format!("lp-{name}-{}.sock", std::process::id()));
    let run = Run::start_full(
        name,
        vec![
            plain("wwan0", ModemKind::Veth),
            plain("wwan1", ModemKind::Tun),
        ],
        &[],
        TestbedOptions::default(),
        Some(sock.clone()),
        store,
    );
    (run, sock)
}

/// (link, direction, 500 ms window start UTC ns) → (bins seen, packets, bytes).
type Windows = BTreeMap<(u32, usize, i64), (u64, u64, u64)>;

#[test]
fn fast_clients_get_every_bin_and_a_stuck_one_only_hurts_itself() {
    // With the local store: the rollups must lose nothing either.
    let store_dir = TempDir::new("lpst-db");
    let (mut run, sock) = start("lpst", Some(store_dir.0.clone()));
    let rtr = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(0);
    let dst = SocketAddr::new(s.into(), 9600);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");

    // The reading clients stand for a controller, which runs real-time below the daemon's
    // threads (as in the bench). At normal priority, a loaded machine can keep this thread off
    // the CPU longer than its socket buffer covers (~20 ms of frames), and it loses frames.
    linkpulse::clock::set_realtime_priority(5).expect("SCHED_FIFO 5 (the tests run as root)");
    let mut every =
        StreamClient::connect(&sock, Subscription::every_bin()).expect("client every bin");
    assert_eq!(every.hello().link_count, 2);
    assert_eq!(every.links()[0].interface, "wwan0");
    assert_eq!(every.links()[1].interface, "wwan1");
    let mut dec = StreamClient::connect(
        &sock,
        Subscription {
            link_mask: 1,
            decimation: 10,
        },
    )
    .expect("client decimated");
    assert_eq!(dec.links().len(), 1);
    let stuck = StreamClient::connect(&sock, Subscription::every_bin()).expect("stuck client");
    let more: Vec<StreamClient> = (0..13)
        .map(|_| StreamClient::connect(&sock, Subscription::every_bin()).expect("client"))
        .collect();
    assert_eq!(more.len() + 3, 16, "16 clients at once");

    let flow = UdpFlow::new(&rtr, "wwan0", r.into(), dst, 1000, 500);
    let flow_h = flow.start().expect("flow");
    let t = Instant::now();
    let (mut every_frames, mut every_gaps, mut every_bytes) = (0u64, 0u64, 0u64);
    let mut windows = Windows::new();
    let (mut dec_frames, mut dec_gaps) = (0u64, 0u64);
    let (mut last_every, mut last_dec) = (None::<u64>, None::<u64>);
    every
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    dec.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // 10 s during which `stuck` reads nothing while the two others read everything.
    while t.elapsed() < Duration::from_secs(10) {
        let f = every.next_frame().expect("frame");
        every_frames += 1;
        if last_every.is_some_and(|l| f.header.seq != l + 1) || f.header.dropped_before != 0 {
            every_gaps += 1;
        }
        last_every = Some(f.header.seq);
        assert_eq!(f.header.width_ns, 100_000);
        every_bytes += f.records().next().map_or(0, |r| r.bytes[1]);
        let utc = f.header.bin_start_utc_ns;
        let w = utc - utc.rem_euclid(500_000_000);
        for r in f.records() {
            for d in 0..2 {
                let e = windows.entry((r.index, d, w)).or_default();
                e.0 += 1;
                e.1 += r.packets[d];
                e.2 += r.bytes[d];
            }
        }
        // the decimated client: read whatever is there without blocking the loop for long
        if every_frames % 10 == 0 {
            let g = dec.next_frame().expect("decimated frame");
            dec_frames += 1;
            if last_dec.is_some_and(|l| g.header.seq != l + 10) || g.header.dropped_before != 0 {
                dec_gaps += 1;
            }
            last_dec = Some(g.header.seq);
            assert_eq!(g.header.width_ns, 1_000_000, "10 bins of 100 µs");
            assert_eq!(
                g.header.bin_start_tai_ns % 1_000_000,
                0,
                "aggregates are epoch-aligned"
            );
            assert_eq!(g.header.link_count, 1);
        }
    }
    let sent = flow_h.stop().expect("flow stop");
    assert!(every_frames > 50_000, "every bin for 10 s: {every_frames}");
    assert_eq!(every_gaps, 0, "the fast client lost nothing");
    assert_eq!(dec_gaps, 0, "the decimated client lost nothing");
    assert!(dec_frames > 5000);
    assert!(every_bytes > 0 && every_bytes <= sent.sent_packets * 528);

    // The stuck client: frames were dropped for it, it sees the gap.
    let mut stuck = stuck;
    stuck
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut saw_gap = false;
    let mut prev = None::<u64>;
    for _ in 0..20_000 {
        let f = stuck.next_frame().expect("stuck client still served");
        if f.header.dropped_before > 0 || prev.is_some_and(|p| f.header.seq != p + 1) {
            saw_gap = true;
            break;
        }
        prev = Some(f.header.seq);
    }
    assert!(saw_gap, "the stuck client sees its loss");
    let shared = run.daemon().shared();
    assert!(shared.stream.frames_dropped.load(Ordering::Relaxed) > 0);
    assert_eq!(shared.stream.clients.load(Ordering::Relaxed), 16);
    // While clients are subscribed the daemon holds idle CPUs to a 0 µs wake-up (the default).
    assert_eq!(
        shared.stream.wakeup_latency_held.load(Ordering::Relaxed),
        1,
        "wake-up latency request held"
    );
    assert_eq!(
        cpu_latency_limit(),
        0,
        "the kernel's PM QoS limit while held"
    );
    // the other consumers lost nothing either
    let dropped = shared
        .fanout_dropped
        .read()
        .expect("lock")
        .iter()
        .map(|(n, d)| {
            (
                n.clone(),
                d.iter().map(|x| x.load(Ordering::Relaxed)).sum::<u64>(),
            )
        })
        .collect::<Vec<_>>();
    for (name, d) in &dropped {
        if name != "stream" {
            assert_eq!(*d, 0, "consumer {name} lost frames");
        }
    }
    drop(more);
    // reconnect resumes
    let mut again = StreamClient::connect(&sock, Subscription::every_bin()).expect("reconnect");
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    again.next_frame().expect("frames after reconnect");
    // The last client gone, the request is withdrawn (checked on the daemon's side: another
    // process may hold its own request on the kernel's).
    drop((again, stuck, every, dec));
    let t = Instant::now();
    while shared.stream.wakeup_latency_held.load(Ordering::Relaxed) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "wake-up latency request still held with no client"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The rollups: every window the fast client saw whole is in the store with its counts.
    let whole: Vec<_> = windows
        .iter()
        .filter(|(_, v)| v.0 == 5000)
        .map(|(k, v)| (*k, *v))
        .collect();
    // The daemon writes its last rollups at stop; the store must be up by then.
    let t = Instant::now();
    while shared.store.written.load(Ordering::Relaxed) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rollup stored within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run.stop_daemon();
    assert!(!sock.exists(), "socket removed at stop");
    let store = Store::start_local(LocalConfig::new(&store_dir.0)).expect("reopen the store");
    let rows = store.read_after(0, 100_000).expect("read rollups");
    store.stop();
    let stored: BTreeMap<(u32, i64), _> = rows
        .iter()
        .map(|r| ((r.link_id, r.window_start_ns as i64), r))
        .collect();
    assert!(whole.len() >= 2 * 2 * 15, "{} whole windows", whole.len());
    for ((link, d, w), (_, packets, bytes)) in whole {
        let r = stored
            .get(&(link, w))
            .unwrap_or_else(|| panic!("no rollup for link {link} window {w}"));
        let got = if d == 0 {
            (r.rx_packets, r.rx_bytes)
        } else {
            (r.tx_packets, r.tx_bytes)
        };
        assert_eq!(got, (packets, bytes), "link {link} dir {d} window {w}");
    }
}

#[test]
fn bad_requests_get_a_clear_error_and_c_reads_real_frames() {
    let (mut run, sock) = start("lpsc", None);
    // garbage
    match request_raw(&sock, b"hello linkpulse") {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ERR_BAD_REQUEST);
            assert!(message.contains("Subscribe"), "{message}");
        }
        other => panic!("garbage must be refused: {other:?}"),
    }
    // an unknown version
    let mut req = Subscription::every_bin().record();
    req.version = 9;
    match request_raw(&sock, as_bytes(&req)) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ERR_VERSION);
            assert!(
                message.contains(&format!("speaks {STREAM_VERSION}")),
                "{message}"
            );
        }
        other => panic!("version 9 must be refused: {other:?}"),
    }
    // a mask with no configured link
    let mut req = Subscription::every_bin().record();
    req.link_mask = 1 << 40;
    assert!(matches!(
        request_raw(&sock, as_bytes(&req)),
        Err(ClientError::Refused { .. })
    ));
    assert!(
        run.daemon()
            .shared()
            .stream
            .bad_requests
            .load(Ordering::Relaxed)
            >= 3
    );

    // Capture real frames (with traffic in them) and read them with the C header.
    let rtr = run.bed.router_ns().to_string();
    let (r, s) = run.bed.modem_addr_v4(1);
    let dst = SocketAddr::new(s.into(), 9700);
    let _sink = UdpSink::new(run.bed.server_ns(), dst, None)
        .start()
        .expect("sink");
    let flow = UdpFlow::new(&rtr, "wwan1", r.into(), dst, 2000, 300)
        .start()
        .expect("flow");
    let mut c = StreamClient::connect(
        &sock,
        Subscription {
            link_mask: 0,
            decimation: 5,
        },
    )
    .expect("client");
    let dir = common::TempDir::new("lpsc-c");
    let capture = dir.0.join("frames.bin");
    let mut file = Vec::new();
    let mut expected = String::new();
    let mut with_traffic = 0;
    while with_traffic < 50 {
        let f = c.next_frame().expect("frame");
        let len = f.raw_len();
        let h = f.header;
        let recs: Vec<_> = f.records().collect();
        expected += &format!(
            "frame seq={} utc={} width={} flags={} links={} dropped={}\n",
            h.seq, h.bin_start_utc_ns, h.width_ns, h.flags, h.link_count, h.dropped_before
        );
        for r in &recs {
            expected += &format!(
                "  link={} valid={} pkts={}/{} bytes={}/{} tcp={}/{}/{}/{} owd={}/{}/{}/{}\n",
                r.index,
                r.valid,
                r.packets[0],
                r.packets[1],
                r.bytes[0],
                r.bytes[1],
                r.tcp_rtt_count,
                r.tcp_rtt_min_ns,
                r.tcp_rtt_max_ns,
                r.tcp_rtt_sum_ns,
                r.owd_count,
                r.owd_up_sum_ns,
                r.owd_down_sum_ns,
                r.owd_error_max_ns
            );
            if r.index == 1 && r.packets[1] > 0 && r.valid & VALID_TRAFFIC != 0 {
                with_traffic += 1;
            }
        }
        file.extend_from_slice(&(len as u32).to_le_bytes());
        file.extend_from_slice(c.raw(len));
    }
    flow.stop().expect("flow");
    std::fs::write(&capture, &file).expect("capture");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.0.join("read_frames");
    let cc = std::process::Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-I"])
        .arg(root.join("../common/include"))
        .arg(root.join("c/read_frames.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("gcc (Debian's gcc is on every machine of this kind)");
    assert!(
        cc.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = std::process::Command::new(&exe)
        .arg(&capture)
        .output()
        .expect("run reader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "the C reader decodes what Rust decodes"
    );
    run.stop_daemon();
}
