//! Wire format against an independent decoder: reflector traffic captured on loopback with
//! Debian's tshark and decoded with its TWAMP-Test dissector (tshark 4.0 has no dissector named
//! STAMP; the unauthenticated STAMP layouts are TWAMP-Test's, which it decodes when told the
//! port with `-d udp.port==P,twamp.test`).
//!
//! Two limits of that dissector, checked against its source (packet-twamp.c):
//! - it tells a reflected packet from a sender's by length alone (≥ 27 octets after the
//!   Error Estimate), so a 44-octet STAMP sender packet is shown with reflector fields, all
//!   zero; only its Sequence Number, Timestamp and Error Estimate are compared;
//! - it picks the Sender Timestamp's format from bits of the timestamp itself, not from the
//!   Sender Error Estimate, so that field is compared for NTP probes only.
use std::{
    io::{BufRead, BufReader},
    net::UdpSocket,
    process::{Command, Stdio},
    time::Duration,
};

use linkpulse::{
    clock,
    stamp::{
        ErrorEstimate, Reflector, ReflectorConfig, ReflectorFields, ReflectorPacket, SenderFields,
        Timestamp, TimestampFormat,
    },
};

/// "Nov 22, 2026 03:17:24.433415889 UTC" (tshark with TZ=UTC) → ns since 1970 on the same
/// scale as the field (UTC for NTP, TAI for PTP).
fn parse_abs(s: &str) -> u64 {
    let parts: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(parts.len(), 5, "unexpected tshark time `{s}`");
    assert_eq!(parts[4], "UTC", "run tshark with TZ=UTC: `{s}`");
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|&x| x == parts[0]).expect("month") as i64 + 1;
    let d: i64 = parts[1].trim_end_matches(',').parse().unwrap();
    let y: i64 = parts[2].parse().unwrap();
    let (hms, frac) = parts[3].split_once('.').expect("fraction");
    let hms: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    assert_eq!(frac.len(), 9, "tshark prints ns: `{s}`");
    // Days from civil (H. Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    secs as u64 * 1_000_000_000 + frac.parse::<u64>().unwrap()
}

#[test]
fn parse_abs_known_instants() {
    assert_eq!(parse_abs("Jan  1, 1970 00:00:00.000000000 UTC"), 0);
    assert_eq!(
        parse_abs("Jan  1, 2026 00:00:00.500000000 UTC"),
        1_767_225_600_500_000_000
    );
    assert_eq!(
        parse_abs("Feb 29, 2024 23:59:59.000000001 UTC"),
        1_709_251_199_000_000_001
    );
}

/// Wireshark converts the NTP fraction to ns its own way; allow 1 ns of rounding.
fn assert_ns(field: &str, got: &str, want: Timestamp, format: TimestampFormat) {
    let want = want.to_epoch_ns(format).expect("valid");
    let got = parse_abs(got);
    assert!(
        got.abs_diff(want) <= 1,
        "{field}: tshark {got}, sent {want}"
    );
}

struct Sent {
    req: SenderFields,
    len: usize,
    reply: ReflectorFields,
}

#[test]
fn tshark_decodes_reflector_traffic() {
    let tshark_ok = Command::new("tshark").arg("--version").output();
    assert!(
        tshark_ok.is_ok_and(|o| o.status.success()),
        "tshark not found or not working. Fix: `cargo xtask setup` installs Debian's tshark"
    );
    let r = Reflector::bind(ReflectorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ReflectorConfig::default()
    })
    .unwrap()
    .spawn()
    .unwrap();
    let port = r.local_addr().port();
    let pcap = std::env::temp_dir().join(format!("linkpulse-stamp-{}.pcapng", std::process::id()));
    let mut cap = Command::new("tshark")
        .args(["-i", "lo", "-f", &format!("udp port {port}"), "-w"])
        .arg(&pcap)
        .args(["-a", "duration:60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tshark");
    // "Capturing on 'Loopback: lo'" comes before dumpcap has the filter attached; "Capture
    // started" (dumpcap's, ~0.1 s later) after. Then a margin for the first read.
    let stderr = cap.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("tshark exited before capturing: {seen:?}"))
            .unwrap();
        if line.contains("Capture started") {
            break;
        }
        seen.push(line);
    }
    // Keep draining stderr so tshark never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.count());
    std::thread::sleep(Duration::from_millis(300));

    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(r.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = Vec::new();
    for i in 0..20u32 {
        let format = if i == 19 {
            TimestampFormat::Ptp
        } else {
            TimestampFormat::Ntp
        };
        let tai = clock::ClockState::read().unwrap().tai_offset_s as u64 * clock::NS_PER_S;
        let t1 = match format {
            TimestampFormat::Ntp => clock::realtime_ns(),
            TimestampFormat::Ptp => clock::realtime_ns() + tai,
        };
        let len = 44 + i as usize * 3;
        let req = SenderFields {
            seq: 500 + i,
            timestamp: Timestamp::from_epoch_ns(format, t1),
            error_estimate: ErrorEstimate::from_error_ns(true, format, 1_500),
            ssid: 0,
        };
        let mut b = vec![0u8; len];
        req.encode(&mut b, len).unwrap();
        s.send(&b).unwrap();
        let mut rb = [0u8; 2048];
        let n = s.recv(&mut rb).expect("reply");
        assert_eq!(n, len);
        let reply = ReflectorPacket::parse(&rb[..n]).unwrap().fields();
        sent.push(Sent { req, len, reply });
    }
    // Let the last packets reach the capture, then stop tshark as a user would (SIGINT).
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(cap.id() as i32, libc::SIGINT) };
    let status = cap.wait().unwrap();
    let _ = drain.join();
    assert!(
        status.success() || status.code().is_none(),
        "tshark: {status}"
    );
    r.stop().unwrap();

    let out = Command::new("tshark")
        .env("TZ", "UTC")
        .arg("-r")
        .arg(&pcap)
        .args(["-d", &format!("udp.port=={port},twamp.test")])
        .args(["-T", "fields", "-E", "separator=/t"])
        .args([
            "-e",
            "udp.srcport",
            "-e",
            "udp.length",
            "-e",
            "twamp.test.seq_number",
            "-e",
            "twamp.test.timestamp",
            "-e",
            "twamp.test.error_estimate",
            "-e",
            "twamp.test.receive_timestamp",
            "-e",
            "twamp.test.sender_seq_number",
            "-e",
            "twamp.test.sender_timestamp",
            "-e",
            "twamp.test.sender_error_estimate",
            "-e",
            "twamp.test.sender_ttl",
        ])
        .output()
        .expect("run tshark -r");
    let _ = std::fs::remove_file(&pcap);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        rows.len(),
        40,
        "20 requests and 20 replies captured:\n{text}"
    );

    let (mut reqs, mut reps) = (0, 0);
    for (i, pair) in rows.chunks(2).enumerate() {
        let Sent { req, len, reply } = &sent[i];
        let (q, a) = (&pair[0], &pair[1]);
        let fmt = req.error_estimate.format();
        // The request, as the sender wrote it.
        assert_ne!(q[0], port.to_string(), "request first");
        assert_eq!(q[1].parse::<usize>().unwrap(), len + 8, "UDP length");
        assert_eq!(q[2].parse::<u32>().unwrap(), req.seq);
        assert_ns("request timestamp", q[3], req.timestamp, fmt);
        assert_eq!(q[4].parse::<u16>().unwrap(), req.error_estimate.0);
        reqs += 1;
        // The reply, as the reflector wrote it: every field of the reflector layout.
        let rf = reply.error_estimate.format();
        assert_eq!(rf, fmt, "Auto follows Z");
        assert_eq!(a[0], port.to_string());
        assert_eq!(
            a[1].parse::<usize>().unwrap(),
            len + 8,
            "reply as long as the request"
        );
        assert_eq!(a[2].parse::<u32>().unwrap(), reply.seq);
        assert_eq!(reply.seq, i as u32);
        assert_ns("T3", a[3], reply.timestamp, rf);
        assert_eq!(a[4].parse::<u16>().unwrap(), reply.error_estimate.0);
        assert_ns("T2", a[5], reply.receive_timestamp, rf);
        assert_eq!(a[6].parse::<u32>().unwrap(), req.seq);
        if fmt == TimestampFormat::Ntp {
            assert_ns("T1 echoed", a[7], req.timestamp, fmt);
        }
        assert_eq!(a[8].parse::<u16>().unwrap(), req.error_estimate.0);
        assert_eq!(a[9].parse::<u8>().unwrap(), 64, "sender TTL");
        // And the order of the instants as tshark shows them (one host, one clock).
        if fmt == TimestampFormat::Ntp {
            let (t1, t2, t3) = (parse_abs(a[7]), parse_abs(a[5]), parse_abs(a[3]));
            assert!(t1 <= t2 && t2 <= t3, "{t1} {t2} {t3}");
        }
        reps += 1;
    }
    eprintln!(
        "tshark (TWAMP-Test dissector) decoded {reqs} requests and {reps} replies on port \
         {port} equal to what was sent, 19 NTP + 1 PTP"
    );
}
