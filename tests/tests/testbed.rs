//! Privileged end-to-end tests of the testbed (run as root: namespaces, TUN, AF_PACKET).
//! Each test uses its own testbed name and state dir; `Testbed`'s Drop cleans up on failure.
//! The tests are serialised (one lock) so that timing-sensitive ones get the CPU; they assert
//! counts and lower bounds, never speed.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use linkpulse_testbed::emulator::{LinkProfile, Outage, Trace};
use linkpulse_testbed::topology::TopologyError;
use linkpulse_testbed::traffic::{udp_ping, TcpDirection, TcpFlow, UdpEcho, UdpFlow, UdpSink};
use linkpulse_testbed::truth::{self, Dir, TruthRecord, Verdict};
use linkpulse_testbed::{netns, traces_dir, ModemKind, ModemSpec, Testbed, TestbedSpec};

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the serialisation lock (surviving a poisoned one) and checks privileges.
fn setup() -> MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    assert!(
        nix::unistd::geteuid().is_root(),
        "the testbed tests need root (network namespaces, TUN, AF_PACKET)"
    );
    g
}

/// A unique ≤ 6-char name: a 3-letter test tag and 3 hex digits of the pid.
fn name(tag: &str) -> String {
    format!("{tag}{:03x}", std::process::id() & 0xfff)
}

/// Removes a test's state dir when the test passes (kept after a failure, for a look).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lp-testbed-{name}"))
}

fn modem(k: usize, kind: ModemKind, up: LinkProfile, down: LinkProfile) -> ModemSpec {
    ModemSpec {
        ifname: format!("wwan{k}"),
        kind,
        up,
        down,
    }
}

fn spec(name: &str, modems: Vec<ModemSpec>) -> TestbedSpec {
    TestbedSpec {
        name: name.to_string(),
        modems,
        state_dir: state_dir(name),
    }
}

fn ns_gone(name: &str) -> bool {
    let list = netns::list();
    ["rtr", "car", "srv"]
        .iter()
        .all(|s| !list.contains(&format!("{name}-{s}")))
}

#[test]
fn up_and_down_leave_nothing() {
    let _g = setup();
    let n = name("tud");
    let _sd = Cleanup(state_dir(&n));
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::default(),
                LinkProfile::default(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::default(),
                LinkProfile::default(),
            ),
        ],
    ))
    .expect("testbed up");
    for ns in [tb.router_ns(), tb.carrier_ns(), tb.server_ns()] {
        assert!(netns::exists(ns), "{ns} missing");
    }
    let links = netns::ip_in(tb.router_ns(), &["-br", "addr", "show"]).unwrap();
    assert!(
        links.contains("wwan0") && links.contains("198.18.0.2/24"),
        "{links}"
    );
    assert!(
        links.contains("wwan1") && links.contains("fd00:6c70:1::2/64"),
        "{links}"
    );
    let srv = netns::ip_in(tb.server_ns(), &["-br", "addr", "show"]).unwrap();
    assert!(
        srv.contains("srv1") && srv.contains("198.18.1.1/24"),
        "{srv}"
    );
    tb.down().expect("testbed down");
    assert!(ns_gone(&n), "namespaces left: {:?}", netns::list());
}

#[test]
fn drop_cleans_up_on_panic_and_up_removes_leftovers() {
    let _g = setup();
    let n = name("tdp");
    let _sd = Cleanup(state_dir(&n));
    // A leftover router namespace of the same name (a crashed run) does not block `up`.
    netns::create(&format!("{n}-rtr")).unwrap();
    let r = std::panic::catch_unwind(|| {
        let _tb = Testbed::up(spec(
            &n,
            vec![modem(
                0,
                ModemKind::Tun,
                LinkProfile::default(),
                LinkProfile::default(),
            )],
        ))
        .expect("testbed up over a leftover");
        panic!("test panic while the testbed is up");
    });
    assert!(r.is_err());
    assert!(ns_gone(&n), "namespaces left: {:?}", netns::list());
}

#[test]
fn up_rejects_bad_specs() {
    let _g = setup();
    let long = spec(
        "toolong",
        vec![modem(
            0,
            ModemKind::Veth,
            LinkProfile::default(),
            LinkProfile::default(),
        )],
    );
    assert!(matches!(Testbed::up(long), Err(TopologyError::BadName(_))));
    let mut p = LinkProfile::fixed_rate(1000);
    p.trace = Some(traces_dir().join("Verizon-LTE-short.up"));
    let both = spec(
        &name("tbs"),
        vec![modem(0, ModemKind::Veth, p, LinkProfile::default())],
    );
    assert!(matches!(Testbed::up(both), Err(TopologyError::BadSpec(_))));
}

/// UDP records of one modem/direction/family/size, i.e. one flow's packets.
fn flow_records(recs: &[TruthRecord], modem: u16, dir: Dir, v: u8, size: u32) -> Vec<TruthRecord> {
    recs.iter()
        .filter(|r| {
            r.modem == modem
                && r.dir == dir
                && r.ip_version == v
                && r.ip_proto == 17
                && r.size == size
        })
        .copied()
        .collect()
}

fn addrs(tb: &Testbed, k: usize, v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        let (a, b) = tb.modem_addr_v6(k);
        (a.into(), b.into())
    } else {
        let (a, b) = tb.modem_addr_v4(k);
        (a.into(), b.into())
    }
}

#[test]
fn udp_flow_is_logged_exactly_on_both_kinds_and_families() {
    let _g = setup();
    let n = name("tux");
    let _sd = Cleanup(state_dir(&n));
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
        ],
    ))
    .expect("testbed up");
    const N: u64 = 1000;
    // (modem, v6, dir) -> (packets sent, L3 size, packets the sink got)
    let mut expected = BTreeMap::new();
    for k in 0..2usize {
        let ifname = tb.modem_ifname(k).unwrap().to_string();
        let srv_if = tb.server_ifname(k);
        for v6 in [false, true] {
            let (rtr, srv) = addrs(&tb, k, v6);
            // Distinct payloads per case so the records cannot be confused.
            let payload = 100 + 10 * k + if v6 { 5 } else { 0 };
            let up_dst = SocketAddr::new(srv, 7000);
            let sink = UdpSink::new(tb.server_ns(), up_dst, Some(srv_if.clone()))
                .start()
                .unwrap();
            let f = UdpFlow::new(tb.router_ns(), &ifname, rtr, up_dst, 2000, payload);
            let st = f.run_count(N).unwrap();
            assert_eq!(st.sent_packets, N);
            assert_eq!(st.send_errors, 0);
            std::thread::sleep(Duration::from_millis(200));
            let got = sink.stop().unwrap();
            expected.insert(
                (k, v6, Dir::Up),
                (st.sent_packets, f.l3_size() as u32, got.received_packets),
            );

            let down_dst = SocketAddr::new(rtr, 7001);
            let sink = UdpSink::new(tb.router_ns(), down_dst, Some(ifname.clone()))
                .start()
                .unwrap();
            let f = UdpFlow::new(tb.server_ns(), &srv_if, srv, down_dst, 2000, payload);
            let st = f.run_count(N).unwrap();
            assert_eq!(st.sent_packets, N);
            std::thread::sleep(Duration::from_millis(200));
            let got = sink.stop().unwrap();
            expected.insert(
                (k, v6, Dir::Down),
                (st.sent_packets, f.l3_size() as u32, got.received_packets),
            );
        }
    }
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    for ((k, v6, d), (sent, size, sunk)) in expected {
        let rs = flow_records(&recs, k as u16, d, if v6 { 6 } else { 4 }, size);
        let delivered = rs.iter().filter(|r| r.delivered()).count() as u64;
        assert_eq!(rs.len() as u64, sent, "modem {k} v6={v6} {d:?}: records");
        assert_eq!(delivered, sent, "modem {k} v6={v6} {d:?}: delivered");
        assert_eq!(
            sunk, sent,
            "modem {k} v6={v6} {d:?}: the receiver got them all"
        );
        for r in &rs {
            assert!(r.t_out_ns >= r.t_in_ns && r.t_in_ns > 0);
        }
        if d == Dir::Up && k == 0 {
            // veth: the arrival time is the kernel's rx stamp.
            assert!(rs
                .iter()
                .all(|r| r.flags & truth::FLAG_KERNEL_RX_STAMP != 0));
        }
    }
}

#[test]
fn trace_replay_delivers_the_trace_capacity_when_saturated() {
    let _g = setup();
    let n = name("ttr");
    let _sd = Cleanup(state_dir(&n));
    let up_trace = traces_dir().join("Verizon-LTE-short.up");
    let down_trace = traces_dir().join("Verizon-LTE-short.down");
    // Unlimited queue: the backlog keeps growing, so every opportunity finds a packet.
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::from_trace(&up_trace),
                LinkProfile::unlimited(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::unlimited(),
                LinkProfile::from_trace(&down_trace),
            ),
        ],
    ))
    .expect("testbed up");
    let (r0, s0) = addrs(&tb, 0, false);
    let (r1, s1) = addrs(&tb, 1, false);
    let sink_up = UdpSink::new(tb.server_ns(), SocketAddr::new(s0, 7000), None)
        .start()
        .unwrap();
    let sink_down = UdpSink::new(tb.router_ns(), SocketAddr::new(r1, 7000), None)
        .start()
        .unwrap();
    // 1500-byte packets (one opportunity each), ~2× the traces' peak second.
    let up = UdpFlow::new(
        tb.router_ns(),
        "wwan0",
        r0,
        SocketAddr::new(s0, 7000),
        1500,
        1472,
    )
    .start()
    .unwrap();
    let down = UdpFlow::new(
        tb.server_ns(),
        "srv1",
        s1,
        SocketAddr::new(r1, 7000),
        2000,
        1472,
    )
    .start()
    .unwrap();
    let flow_start = truth_now();
    std::thread::sleep(Duration::from_millis(6500));
    up.stop().unwrap();
    down.stop().unwrap();
    // The queues hold seconds of backlog; the drain is bounded by the trace's capacity.
    assert!(
        tb.in_flight(0) > 0 && tb.in_flight(1) > 0,
        "the links were not saturated"
    );
    drop((sink_up, sink_down));
    let start = tb.start_ns();
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    // A 5 s window that starts 1 s into the flow (the backlog has built up by then).
    let from_ms = (flow_start + 1_000_000_000 - start).div_ceil(1_000_000);
    let to_ms = from_ms + 5_000;
    for (k, d, trace) in [(0u16, Dir::Up, &up_trace), (1, Dir::Down, &down_trace)] {
        let tr = Trace::load(trace).unwrap();
        let cap_pkts = tr.capacity_bytes(from_ms, to_ms) / 1500;
        let (w0, w1) = (start + from_ms * 1_000_000, start + to_ms * 1_000_000);
        let out = flow_records(&recs, k, d, 4, 1500)
            .iter()
            .filter(|r| r.delivered() && (w0..w1).contains(&r.t_out_ns))
            .count() as u64;
        let ratio = out as f64 / cap_pkts as f64;
        println!("modem {k} {d:?}: delivered {out} packets in 5 s, trace capacity {cap_pkts} ({ratio:.4})");
        assert!(
            (0.97..=1.03).contains(&ratio),
            "modem {k}: {out} vs capacity {cap_pkts}"
        );
    }
}

fn truth_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn delay_is_at_least_the_configured_one() {
    let _g = setup();
    let n = name("tdl");
    let _sd = Cleanup(state_dir(&n));
    let prof = |delay_us, jitter_us| LinkProfile {
        delay_us,
        jitter_us,
        ..LinkProfile::default()
    };
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(0, ModemKind::Veth, prof(15_000, 0), prof(10_000, 0)),
            modem(1, ModemKind::Tun, prof(5_000, 0), prof(20_000, 2_000)),
        ],
    ))
    .expect("testbed up");
    for (k, min_rtt) in [(0usize, 25_000u64), (1, 23_000)] {
        let (rtr, srv) = addrs(&tb, k, k == 1);
        let echo = UdpEcho {
            ns: tb.server_ns().to_string(),
            bind: SocketAddr::new(srv, 7007),
            bind_dev: Some(tb.server_ifname(k)),
        }
        .start()
        .unwrap();
        let res = udp_ping(
            tb.router_ns(),
            tb.modem_ifname(k).unwrap(),
            rtr,
            SocketAddr::new(srv, 7007),
            20,
            Duration::from_millis(40),
            Duration::from_secs(2),
        )
        .unwrap();
        echo.stop();
        println!(
            "modem {k}: rtt min {:?} median {:?}, lost {}",
            res.min(),
            res.median(),
            res.lost
        );
        assert!(
            res.rtts.len() >= 18,
            "modem {k}: only {} replies",
            res.rtts.len()
        );
        let min = res.min().unwrap();
        assert!(
            min >= Duration::from_micros(min_rtt),
            "modem {k}: rtt {min:?} < {min_rtt} µs"
        );
    }
    let dir = tb.truth_dir();
    tb.down().unwrap();
    // Emulator lateness: how long after its due time a delayed packet actually left.
    let recs = truth::read_dir(&dir).unwrap();
    let mut late: Vec<u64> = recs
        .iter()
        .filter(|r| r.modem == 0 && r.dir == Dir::Up && r.delivered() && r.ip_proto == 17)
        .map(|r| {
            let held = r.t_out_ns - r.t_in_ns;
            assert!(held >= 15_000_000, "delivered after {held} ns < 15 ms");
            held - 15_000_000
        })
        .collect();
    assert!(!late.is_empty());
    println!(
        "delivery lateness after a 15 ms delay (incl. the write): p50 {} µs, p99 {} µs, max {} µs",
        percentile(&mut late, 0.5) / 1000,
        percentile(&mut late, 0.99) / 1000,
        percentile(&mut late, 1.0) / 1000
    );
}

#[test]
fn modem_hot_plug_gets_a_new_ifindex_and_keeps_working() {
    let _g = setup();
    let n = name("thp");
    let _sd = Cleanup(state_dir(&n));
    let mut tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
        ],
    ))
    .expect("testbed up");
    for k in 0..2usize {
        let ifname = tb.modem_ifname(k).unwrap().to_string();
        let (rtr, srv) = addrs(&tb, k, false);
        let dst = SocketAddr::new(srv, 7000);
        let sink = UdpSink::new(tb.server_ns(), dst, None).start().unwrap();
        let before = UdpFlow::new(tb.router_ns(), &ifname, rtr, dst, 1000, 300)
            .run_count(100)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let idx0 = tb.router_ifindex(k).unwrap();
        tb.delete_modem(k).unwrap();
        assert!(
            netns::ip_in(tb.router_ns(), &["link", "show", &ifname]).is_err(),
            "{ifname} still there"
        );
        assert!(matches!(
            tb.delete_modem(k),
            Err(TopologyError::ModemDeleted(_))
        ));
        tb.recreate_modem(k).unwrap();
        let idx1 = tb.router_ifindex(k).unwrap();
        assert_ne!(idx0, idx1, "{ifname}: same ifindex after re-creation");
        assert!(tb.emulator_running(k));
        let after = UdpFlow::new(tb.router_ns(), &ifname, rtr, dst, 1000, 400)
            .run_count(200)
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(sink.stop().unwrap().received_packets, 300);
        assert_eq!((before.sent_packets, after.sent_packets), (100, 200));
    }
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    for k in 0..2u16 {
        // The truth file is appended to across the re-creation.
        assert_eq!(flow_records(&recs, k, Dir::Up, 4, 328).len(), 100);
        assert_eq!(flow_records(&recs, k, Dir::Up, 4, 428).len(), 200);
    }
}

#[test]
fn high_rate_is_exact_and_downlink_guard_holds() {
    let _g = setup();
    let n = name("thr");
    let _sd = Cleanup(state_dir(&n));
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::unlimited(),
                LinkProfile::unlimited(),
            ),
        ],
    ))
    .expect("testbed up");
    // 20k pps each way on the veth modem, 20k pps down on the TUN one, across ≥ 2 seconds.
    let (r0, s0) = addrs(&tb, 0, false);
    let (r1, s1) = addrs(&tb, 1, false);
    let sinks = [
        UdpSink::new(tb.server_ns(), SocketAddr::new(s0, 7000), None)
            .start()
            .unwrap(),
        UdpSink::new(tb.router_ns(), SocketAddr::new(r0, 7000), None)
            .start()
            .unwrap(),
        UdpSink::new(tb.router_ns(), SocketAddr::new(r1, 7000), None)
            .start()
            .unwrap(),
    ];
    // The downlink senders send through the last 2 ms of each second too (guard_us 0), so
    // that the emulator's own guard has something to hold.
    let flows = [
        UdpFlow::new(
            tb.router_ns(),
            "wwan0",
            r0,
            SocketAddr::new(s0, 7000),
            20_000,
            64,
        ),
        UdpFlow {
            guard_us: 0,
            ..UdpFlow::new(
                tb.server_ns(),
                "srv0",
                s0,
                SocketAddr::new(r0, 7000),
                20_000,
                65,
            )
        },
        UdpFlow {
            guard_us: 0,
            ..UdpFlow::new(
                tb.server_ns(),
                "srv1",
                s1,
                SocketAddr::new(r1, 7000),
                20_000,
                66,
            )
        },
    ];
    let handles: Vec<_> = flows.iter().map(|f| f.start().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(2500));
    let stats: Vec<_> = handles.into_iter().map(|h| h.stop().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<_> = sinks.into_iter().map(|s| s.stop().unwrap()).collect();

    // Idle: the emulator threads must not burn CPU.
    let cpu0 = emu_cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let idle_ticks = emu_cpu_ticks() - cpu0;

    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    for (i, (k, d)) in [(0u16, Dir::Up), (0, Dir::Down), (1, Dir::Down)]
        .into_iter()
        .enumerate()
    {
        let f = &flows[i];
        let rs = flow_records(&recs, k, d, 4, f.l3_size() as u32);
        println!(
            "modem {k} {d:?}: sent {} (skipped late {}, guard {}), logged {}, sink {}",
            stats[i].sent_packets,
            stats[i].skipped_late,
            stats[i].skipped_guard,
            rs.len(),
            got[i].received_packets
        );
        assert!(stats[i].sent_packets > 20_000, "the flow hardly ran");
        assert_eq!(
            rs.len() as u64,
            stats[i].sent_packets,
            "modem {k} {d:?}: logged"
        );
        assert!(rs.iter().all(|r| r.delivered()));
        assert_eq!(
            got[i].received_packets, stats[i].sent_packets,
            "modem {k} {d:?}: received"
        );
    }
    // Downlink guard: every write toward the router started outside the last 200 µs of a second.
    let mut held = 0;
    let mut straddling = 0;
    let mut write_us: Vec<u64> = Vec::new();
    for r in recs.iter().filter(|r| r.dir == Dir::Down && r.delivered()) {
        let begin = r.t_out_ns - u64::from(r.write_ns);
        assert!(
            begin % 1_000_000_000 < 1_000_000_000 - 200_000,
            "delivery began {} µs before a second",
            (1_000_000_000 - begin % 1_000_000_000) / 1000
        );
        held += usize::from(r.flags & truth::FLAG_GUARD_HELD != 0);
        straddling += usize::from(begin / 1_000_000_000 != r.t_out_ns / 1_000_000_000);
        write_us.push(u64::from(r.write_ns) / 1000);
    }
    println!(
        "downlink: {held} deliveries held by the guard, {straddling} writes straddling a second; write time p50 {} µs p99 {} µs max {} µs",
        percentile(&mut write_us, 0.5),
        percentile(&mut write_us, 0.99),
        percentile(&mut write_us, 1.0)
    );
    assert!(held > 0, "2.5 s at 20k pps must meet the guard");
    assert_eq!(straddling, 0);
    println!("emulator CPU while idle for 2 s: {idle_ticks} ticks");
    assert!(
        idle_ticks < 20,
        "idle emulator threads used {idle_ticks} ticks in 2 s"
    );
}

/// utime + stime (clock ticks) of this process's emulator threads.
fn emu_cpu_ticks() -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with("emu ") {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // Fields after the comm: state is [0], utime [11], stime [12].
        total += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    total
}

#[test]
fn cli_up_status_forward_down() {
    let _g = setup();
    let n = name("tcl");
    let _sd = Cleanup(state_dir(&n));
    let sd = state_dir(&n);
    let exe = env!("CARGO_BIN_EXE_linkpulse-testbed");
    // A free port on the host for the forwarder.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fwd = format!("127.0.0.1:{port}=18480");
    let out = Command::new(exe)
        .args([
            "up",
            "--name",
            &n,
            "--modems",
            "4",
            "--traffic",
            "demo",
            "--forward",
            &fwd,
            "--state-dir",
        ])
        .arg(&sd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "up failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("wwan3") && stdout.contains("198.18.3.2"),
        "{stdout}"
    );
    // Always take it down, even if an assertion below fails.
    struct Down<'a>(&'a str, &'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = Command::new(env!("CARGO_BIN_EXE_linkpulse-testbed"))
                .args(["down", "--name", self.0, "--state-dir"])
                .arg(self.1)
                .status();
        }
    }
    let _down = Down(&n, &sd);

    // The forwarder reaches a server inside the router namespace.
    let rtr = format!("{n}-rtr");
    let server = netns::run_in(&rtr, || TcpListener::bind("127.0.0.1:18480"))
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    echo.join().unwrap();

    // Demo traffic shows up in the truth, and status reports it.
    let t0 = Instant::now();
    let truth_file = sd.join("truth").join(truth::file_name(3, Dir::Down));
    while std::fs::metadata(&truth_file).map(|m| m.len()).unwrap_or(0) < 32 * 100 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no demo traffic on wwan3 down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = Command::new(exe)
        .args(["status", "--name", &n, "--state-dir"])
        .arg(&sd)
        .output()
        .unwrap();
    let st_out = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success() && st_out.contains("running") && st_out.contains("delivered"),
        "{st_out}"
    );

    let dn = Command::new(exe)
        .args(["down", "--name", &n, "--state-dir"])
        .arg(&sd)
        .output()
        .unwrap();
    assert!(
        dn.status.success(),
        "{}",
        String::from_utf8_lossy(&dn.stderr)
    );
    assert!(ns_gone(&n), "namespaces left: {:?}", netns::list());
    // The truth was flushed on the way down: every record complete.
    let recs = truth::read_dir(&sd.join("truth")).unwrap();
    assert!(
        recs.iter().any(|r| r.ip_proto == 6),
        "no TCP from the demo flow"
    );
    let log = std::fs::read_to_string(sd.join("testbed.log")).unwrap_or_default();
    assert!(!log.contains("ERROR"), "errors in the testbed log:\n{log}");
}

#[test]
fn an_idle_testbed_is_silent() {
    let _g = setup();
    let n = name("tsi");
    let _sd = Cleanup(state_dir(&n));
    let mut tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::default(),
                LinkProfile::default(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::default(),
                LinkProfile::default(),
            ),
        ],
    ))
    .expect("testbed up");
    // Also after a hot-plug: a re-created interface must not chatter either.
    tb.delete_modem(0).unwrap();
    tb.recreate_modem(0).unwrap();
    // Unsolicited MLD reports would come within ~1 s of an address change; wait longer.
    std::thread::sleep(Duration::from_millis(2500));
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    assert!(
        recs.is_empty(),
        "packets crossed an idle testbed: {recs:#?}"
    );
}

#[test]
fn impairments_apply_to_real_packets() {
    let _g = setup();
    let n = name("tim");
    let _sd = Cleanup(state_dir(&n));
    let outage = Outage {
        start_ms: 500,
        duration_ms: 300,
        every_ms: Some(1000),
    };
    let up = LinkProfile {
        rate_kbit: Some(1_000),
        queue_bytes: 20_000,
        loss: 0.2,
        outages: vec![outage],
        seed: 99,
        ..LinkProfile::default()
    };
    let tb = Testbed::up(spec(
        &n,
        vec![modem(0, ModemKind::Veth, up, LinkProfile::unlimited())],
    ))
    .expect("testbed up");
    let (rtr, srv) = addrs(&tb, 0, false);
    let dst = SocketAddr::new(srv, 7000);
    let sink = UdpSink::new(tb.server_ns(), dst, None).start().unwrap();
    // 2 Mbit/s offered to a 1 Mbit/s link for 3 s.
    let f = UdpFlow::new(tb.router_ns(), "wwan0", rtr, dst, 2000, 100);
    let h = f.start().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let sent = h.stop().unwrap();
    assert!(
        tb.wait_drained(Duration::from_secs(10)),
        "the emulator did not drain"
    );
    std::thread::sleep(Duration::from_millis(100));
    let got = sink.stop().unwrap();
    let start = tb.start_ns();
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let rs = flow_records(
        &truth::read_dir(&dir).unwrap(),
        0,
        Dir::Up,
        4,
        f.l3_size() as u32,
    );
    assert_eq!(rs.len() as u64, sent.sent_packets);
    let by = |v: Verdict| rs.iter().filter(|r| r.verdict == v).count();
    let (outage_n, lost, queue, delivered) = (
        by(Verdict::DroppedOutage),
        by(Verdict::LostRandom),
        by(Verdict::DroppedQueue),
        by(Verdict::Delivered),
    );
    println!(
        "sent {}: outage {outage_n}, lost {lost}, queue {queue}, delivered {delivered}",
        rs.len()
    );
    assert_eq!(delivered as u64, got.received_packets);
    // Outages: exactly the packets that arrived inside a window (1 ms of slack at the edges,
    // where the engine may see a reordered kernel stamp moved up by a few µs).
    for r in &rs {
        let rel_ms = (r.t_in_ns - start) / 1_000_000;
        let phase = rel_ms.checked_sub(500).map(|x| x % 1000);
        let inside = phase.is_some_and(|p| p < 300);
        let edge = phase.is_some_and(|p| p == 0 || p == 299 || p == 300 || p == 999);
        if !edge {
            assert_eq!(
                r.verdict == Verdict::DroppedOutage,
                inside,
                "{r:?} at {rel_ms} ms"
            );
        }
    }
    // Random loss among the packets that passed the outage check.
    let frac = lost as f64 / (rs.len() - outage_n) as f64;
    assert!((0.15..0.25).contains(&frac), "loss fraction {frac}");
    // The queue overflowed (2× overload) and the rate held: delivered bytes ≤ 1 Mbit/s × time
    // (+ the 20 kB queue's worth).
    assert!(queue > 0);
    let first = rs.iter().map(|r| r.t_in_ns).min().unwrap();
    let last = rs
        .iter()
        .filter(|r| r.delivered())
        .map(|r| r.t_out_ns)
        .max()
        .unwrap();
    let bytes = delivered as f64 * f.l3_size() as f64;
    let secs = (last - first) as f64 / 1e9;
    assert!(
        bytes * 8.0 / secs <= 1_000_000.0 * 1.02 + 20_000.0 * 8.0 / secs,
        "{bytes} B in {secs} s"
    );
}

#[test]
fn tcp_flows_both_ways_and_families() {
    let _g = setup();
    let n = name("ttc");
    let _sd = Cleanup(state_dir(&n));
    let tb = Testbed::up(spec(
        &n,
        vec![
            modem(
                0,
                ModemKind::Veth,
                LinkProfile::fixed_rate(20_000),
                LinkProfile::unlimited(),
            ),
            modem(
                1,
                ModemKind::Tun,
                LinkProfile::unlimited(),
                LinkProfile::fixed_rate(20_000),
            ),
        ],
    ))
    .expect("testbed up");
    let mut handles = Vec::new();
    for (k, v6, direction, rate) in [
        (0usize, false, TcpDirection::ClientToServer, Some(4_000)),
        (1, true, TcpDirection::ServerToClient, None),
    ] {
        let (rtr, srv) = addrs(&tb, k, v6);
        let flow = TcpFlow {
            client_ns: tb.router_ns().to_string(),
            client_dev: tb.modem_ifname(k).unwrap().to_string(),
            client_src: rtr,
            server_ns: tb.server_ns().to_string(),
            server_dev: Some(tb.server_ifname(k)),
            server: SocketAddr::new(srv, 5201),
            direction,
            rate_kbit: rate,
        };
        handles.push(flow.start().expect("tcp flow"));
    }
    std::thread::sleep(Duration::from_secs(3));
    let stats: Vec<_> = handles.into_iter().map(|h| h.stop().unwrap()).collect();
    println!("{stats:?}");
    let dir = tb.truth_dir();
    tb.down().unwrap();
    let recs = truth::read_dir(&dir).unwrap();
    for (i, (k, d, v)) in [(0u16, Dir::Up, 4u8), (1, Dir::Down, 6)]
        .into_iter()
        .enumerate()
    {
        assert!(
            stats[i].received_bytes > 200_000,
            "flow {i}: {:?}",
            stats[i]
        );
        assert!(stats[i].received_bytes <= stats[i].sent_bytes);
        let data: Vec<_> = recs
            .iter()
            .filter(|r| r.modem == k && r.dir == d && r.ip_proto == 6 && r.ip_version == v)
            .collect();
        assert!(
            data.len() > 100,
            "flow {i}: {} TCP packets logged",
            data.len()
        );
        // Offloads are off: every packet is a wire packet (≤ MTU).
        assert!(
            data.iter().all(|r| r.size <= 1500),
            "flow {i}: a packet above the MTU"
        );
    }
    // The application-level cap: 4 Mbit/s for 3 s, plus one 10 ms burst and slack.
    assert!(
        stats[0].sent_bytes <= 4_000_000 / 8 * 3 * 11 / 10,
        "{:?}",
        stats[0]
    );
}
