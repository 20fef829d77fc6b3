//! Wire format against an independent decoder: STAMP traffic captured with Debian's tshark
//! and decoded with its TWAMP-Test dissector (tshark 4.0 has no dissector named STAMP; the
//! unauthenticated STAMP layouts are TWAMP-Test's, which it decodes when told the port with
//! `-d udp.port==P,twamp.test`). Two captures: the reflector's replies to requests built here
//! (loopback), and the daemon's own sender on a modem of the testbed with a reflector behind it.
//!
//! Two limits of that dissector, checked against its source (packet-twamp.c):
//! - it tells a reflected packet from a sender's by length alone (≥ 27 octets after the
//!   Error Estimate), so a 44-octet STAMP sender packet is shown with reflector fields, all
//!   zero; only its Sequence Number, Timestamp and Error Estimate are compared;
//! - it picks the Sender Timestamp's format from bits of the timestamp itself, not from the
//!   Sender Error Estimate, so that field is compared for NTP probes only.
mod common;

use std::{collections::BTreeSet, net::UdpSocket, sync::Arc, time::Duration};

use common::{probe_section, reflector, Run};
use linkpulse::{
    clock,
    shared::Shared,
    stamp::{
        ErrorEstimate, Reflector, ReflectorConfig, ReflectorFields, ReflectorPacket, SenderFields,
        Timestamp, TimestampFormat,
    },
};
use linkpulse_testbed::{
    tshark::{self, parse_abs, Capture},
    ModemKind,
};

fn pcap_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("linkpulse-{tag}-{}.pcapng", std::process::id()))
}

/// Wireshark converts the NTP fraction to ns its own way; allow 1 ns of rounding.
fn assert_ns(field: &str, got: &str, want: Timestamp, format: TimestampFormat) {
    let want = want.to_epoch_ns(format).expect("valid");
    let got = parse_abs(got).unwrap_or_else(|| panic!("{field}: not a tshark time: `{got}`"));
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
    tshark::check_installed().expect("tshark");
    let r = Reflector::bind(ReflectorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ReflectorConfig::default()
    })
    .unwrap()
    .spawn()
    .unwrap();
    let port = r.local_addr().port();
    let cap = Capture::start(None, "lo", &format!("udp port {port}"), &pcap_path("stamp"))
        .expect("start tshark");
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
    let pcap = cap.stop();
    r.stop().unwrap();

    let rows = tshark::twamp_fields(
        &pcap,
        port,
        &[
            "udp.srcport",
            "udp.length",
            "twamp.test.seq_number",
            "twamp.test.timestamp",
            "twamp.test.error_estimate",
            "twamp.test.receive_timestamp",
            "twamp.test.sender_seq_number",
            "twamp.test.sender_timestamp",
            "twamp.test.sender_error_estimate",
            "twamp.test.sender_ttl",
        ],
    );
    let _ = std::fs::remove_file(&pcap);
    let rows = rows.expect("tshark -r");
    assert_eq!(
        rows.len(),
        40,
        "20 requests and 20 replies captured:\n{rows:?}"
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
        assert_ns("request timestamp", &q[3], req.timestamp, fmt);
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
        assert_ns("T3", &a[3], reply.timestamp, rf);
        assert_eq!(a[4].parse::<u16>().unwrap(), reply.error_estimate.0);
        assert_ns("T2", &a[5], reply.receive_timestamp, rf);
        assert_eq!(a[6].parse::<u32>().unwrap(), req.seq);
        if fmt == TimestampFormat::Ntp {
            assert_ns("T1 echoed", &a[7], req.timestamp, fmt);
        }
        assert_eq!(a[8].parse::<u16>().unwrap(), req.error_estimate.0);
        assert_eq!(a[9].parse::<u8>().unwrap(), 64, "sender TTL");
        // And the order of the instants as tshark shows them (one host, one clock).
        if fmt == TimestampFormat::Ntp {
            let (t1, t2, t3) = (parse_abs(&a[7]), parse_abs(&a[5]), parse_abs(&a[3]));
            assert!(t1.is_some() && t1 <= t2 && t2 <= t3, "{t1:?} {t2:?} {t3:?}");
        }
        reps += 1;
    }
    eprintln!(
        "tshark (TWAMP-Test dissector) decoded {reqs} requests and {reps} replies on port \
         {port} equal to what was sent, 19 NTP + 1 PTP"
    );
}

/// `frame.time_epoch` ("1764520000.123456789") → ns since 1970.
fn epoch_ns(s: &str) -> u64 {
    let (sec, frac) = s
        .split_once('.')
        .unwrap_or_else(|| panic!("frame.time_epoch `{s}`"));
    let frac = format!("{frac:0<9}");
    sec.parse::<u64>().expect("seconds") * 1_000_000_000
        + frac[..9].parse::<u64>().expect("fraction")
}

/// The daemon's own sender on a modem of the testbed: what lp-probe puts on the wire decodes
/// as TWAMP-Test with consecutive sequence numbers and a timestamp that is the send time, and
/// the reflector's answers echo those numbers.
#[test]
fn tshark_decodes_the_daemons_sender_traffic() {
    tshark::check_installed().expect("tshark");
    let (rtr, srv) = linkpulse_testbed::topology::addr_v4(0);
    let mut refl = None;
    let run = Run::start_config(
        "tshsnd",
        vec![common::plain("wwan0", ModemKind::Veth)],
        &[],
        Default::default(),
        None,
        None,
        &probe_section(srv, 100, ""),
        &mut |bed| refl = Some(reflector(bed, 0)),
    );
    let refl = refl.expect("reflector started");
    let shared: Arc<Shared> = Arc::clone(run.daemon().shared());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while shared.probe.view()[0].probes_sent == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no probe sent in 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cap = Capture::start(
        Some(run.bed.router_ns()),
        "wwan0",
        "udp port 862",
        &pcap_path("stamp-sender"),
    )
    .expect("start tshark in the router namespace");
    std::thread::sleep(Duration::from_millis(1500));
    let pcap = cap.stop();
    refl.stop().expect("reflector stops");
    let rows = tshark::twamp_fields(
        &pcap,
        862,
        &[
            "frame.time_epoch",
            "ip.src",
            "udp.dstport",
            "udp.length",
            "twamp.test.seq_number",
            "twamp.test.timestamp",
            "twamp.test.error_estimate",
            "twamp.test.sender_seq_number",
        ],
    );
    let _ = std::fs::remove_file(&pcap);
    let rows = rows.expect("tshark -r");

    let (mut sent, mut replies) = (Vec::new(), Vec::new());
    for r in &rows {
        if r[2] == "862" {
            sent.push(r);
        } else {
            replies.push(r);
        }
    }
    // 100 Hz for 1.5 s plus the capture's margins; a loaded VM may delay a few.
    assert!(
        sent.len() >= 100,
        "{} probes captured in 1.5 s at 100 Hz",
        sent.len()
    );
    let mut seqs = BTreeSet::new();
    for (i, r) in sent.iter().enumerate() {
        assert_eq!(r[1], rtr.to_string(), "source address of the modem");
        assert_eq!(
            r[3], "52",
            "UDP length: 8 + the 44-octet STAMP sender packet"
        );
        let seq: u32 = r[4].parse().expect("seq");
        if i > 0 {
            let prev: u32 = sent[i - 1][4].parse().expect("seq");
            assert_eq!(seq, prev + 1, "consecutive sequence numbers");
        }
        seqs.insert(seq);
        // The sender's timestamp (NTP format, Z = 0) is its send time: close to when the
        // packet crossed the interface, on the same clock.
        let ts = parse_abs(&r[5]).unwrap_or_else(|| panic!("timestamp `{}`", r[5]));
        let wire = epoch_ns(&r[0]);
        assert!(
            ts <= wire + 1_000_000 && wire - ts < 50_000_000,
            "timestamp {ts} vs capture time {wire}"
        );
        let ee: u16 = r[6].parse().expect("error estimate");
        assert_eq!(ee & 0x4000, 0, "Z bit: NTP format");
        assert_ne!(
            ee & 0xff,
            0,
            "a non-zero error multiplier (RFC 8762 §4.1.1)"
        );
    }
    assert!(
        replies.len() >= sent.len() * 9 / 10,
        "{} replies to {} probes",
        replies.len(),
        sent.len()
    );
    for r in &replies {
        assert_eq!(r[3], "52", "a reply as long as its request");
        let echoed: u32 = r[7].parse().expect("sender seq");
        // A reply to a probe sent before the capture began may come first.
        assert!(
            seqs.contains(&echoed) || echoed < *seqs.first().expect("seqs"),
            "reply to sequence {echoed}, never sent in the capture"
        );
    }
    eprintln!(
        "tshark (TWAMP-Test dissector) decoded {} probes of the daemon's sender (seq {}..={}) and {} replies",
        sent.len(),
        seqs.first().expect("seqs"),
        seqs.last().expect("seqs"),
        replies.len()
    );
}
