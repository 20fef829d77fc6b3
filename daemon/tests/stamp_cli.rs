//! `linkpulse reflect` as an operator runs it: start, answer, stop on SIGTERM with counters;
//! bad flags name the fix.
use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use linkpulse::stamp::{ErrorEstimate, ReflectorPacket, SenderFields, Timestamp, TimestampFormat};

const BIN: &str = env!("CARGO_BIN_EXE_linkpulse");

#[test]
fn reflect_serves_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["reflect", "--listen", "127.0.0.1:0", "--rate", "1000"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // "STAMP reflector running listen=127.0.0.1:PORT ..."
    let addr: SocketAddr = loop {
        let line = lines.next().expect("reflector log").unwrap();
        if line.contains("STAMP reflector running") {
            let at = line.find("listen=").expect("listen field") + "listen=".len();
            let rest = &line[at..];
            break rest[..rest.find(' ').unwrap_or(rest.len())]
                .parse()
                .unwrap();
        }
    };
    let drain = std::thread::spawn(move || lines.count());
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for seq in 0..3u32 {
        let mut b = [0u8; 64];
        SenderFields {
            seq,
            timestamp: Timestamp::from_epoch_ns(TimestampFormat::Ntp, 1),
            error_estimate: ErrorEstimate::new(false, TimestampFormat::Ntp, 0, 1),
            ssid: 9,
        }
        .encode(&mut b, 64)
        .unwrap();
        s.send_to(&b, addr).unwrap();
        let mut r = [0u8; 128];
        let n = s.recv(&mut r).unwrap();
        let p = ReflectorPacket::parse(&r[..n]).unwrap();
        assert_eq!((n, p.seq(), p.sender_seq(), p.ssid()), (64, seq, seq, 9));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let _ = drain.join();
    assert!(out.status.success(), "{:?}", out.status);
    let counters: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON counters");
    assert_eq!(counters["reflected"], 3);
    assert_eq!(counters["sessions_created"], 1);
}

#[test]
fn reflect_rejects_bad_flags_with_the_fix() {
    for (args, needle) in [
        (&["reflect", "--listen", "localhost:x"][..], "ADDR:PORT"),
        (&["reflect", "--timestamp-format", "utc"][..], "auto"),
        (
            &["reflect", "--listen", "127.0.0.1:0", "--max-len", "20"][..],
            "44-byte base",
        ),
        (
            &["reflect", "--listen", "127.0.0.1:0", "--rate", "0"][..],
            "rate > 0",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
