//! The IPROTO client against a real Tarantool 2.6.

mod common;

use common::{TestServer, PASSWORD, USER};
use linkpulse_sink::tarantool::{codes, Client, ClientConfig, Credentials, Error};
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn auth_ping_call_eval_over_tcp_and_unix() {
    common::init_tracing();
    for server in [TestServer::tcp(), TestServer::unix()] {
        let c = Client::connect(server.config()).expect("connect + auth");
        assert!(c
            .server_banner()
            .expect("banner")
            .starts_with("Tarantool 2.6"));
        c.ping().expect("ping");
        let (sum,): (u64,) = c
            .eval("local a, b = ... return a + b", &(40u64, 2u64))
            .expect("eval");
        assert_eq!(sum, 42);
        let (s, v, n): (String, Vec<u32>, Option<u8>) = c
            .call("echo", &("hé", vec![1u32, 2, 3], None::<u8>))
            .expect("call echo");
        assert_eq!((s.as_str(), v, n), ("hé", vec![1, 2, 3], None));
        // Large values and several return values survive the round trip.
        let big = u64::MAX - 7;
        let (a, b): (u64, f64) = c.call("echo", &(big, 0.25f64)).expect("echo u64/f64");
        assert_eq!((a, b), (big, 0.25));
        // A function returning nothing answers an empty array.
        let none: Vec<u8> = c.eval("return", &[(); 0]).expect("no results");
        assert!(none.is_empty());
    }
}

#[test]
fn guest_cannot_eval_and_wrong_credentials_are_typed() {
    let server = TestServer::tcp();
    let guest = Client::connect(ClientConfig::new(server.address())).expect("guest connects");
    guest.ping().expect("guest ping");
    let err = guest.eval::<_, (u32,)>("return 1", &[(); 0]).unwrap_err();
    assert_eq!(err.server_code(), Some(codes::ACCESS_DENIED), "{err}");

    let mut cfg = server.config();
    cfg.credentials = Some(Credentials {
        user: USER.into(),
        password: format!("{PASSWORD}x"),
    });
    match Client::connect(cfg)
        .err()
        .expect("wrong password must fail")
    {
        Error::Auth { code, user, .. } => {
            assert_eq!((code, user.as_str()), (codes::PASSWORD_MISMATCH, USER))
        }
        other => panic!("expected Auth, got {other}"),
    }
    let mut cfg = server.config();
    cfg.credentials = Some(Credentials {
        user: "nobody".into(),
        password: "x".into(),
    });
    let err = Client::connect(cfg).err().expect("unknown user must fail");
    assert!(matches!(err, Error::Auth { .. }), "{err}");
}

#[test]
fn server_errors_are_typed_and_leave_the_connection_usable() {
    let server = TestServer::tcp();
    let c = Client::connect(server.config()).expect("connect");
    let err = c.call::<_, ()>("no_such_function", &[(); 0]).unwrap_err();
    assert_eq!(err.server_code(), Some(codes::NO_SUCH_PROC), "{err}");
    assert!(!err.is_retryable());

    let err = c.call::<_, ()>("boom", &("kaput",)).unwrap_err();
    match &err {
        Error::Server {
            code,
            message,
            request,
            ..
        } => {
            assert_eq!(*code, codes::PROC_LUA);
            assert!(message.contains("kaput"), "{message}");
            assert_eq!(request, "CALL boom");
        }
        other => panic!("expected Server, got {other}"),
    }
    let err = c.call::<_, ()>("custom", &(4321u32, "mine")).unwrap_err();
    assert_eq!(err.server_code(), Some(4321), "{err}");
    assert!(err.to_string().contains("mine"));

    // A shape mismatch is a decode error, not a panic.
    let err = c.call::<_, (u32,)>("echo", &("text",)).unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    // `()` encodes as nil, which Tarantool rejects: caught before sending.
    let err = c.call::<_, ()>("echo", &()).unwrap_err();
    assert!(matches!(err, Error::ArgsNotArray { .. }), "{err}");

    c.ping().expect("connection still usable");
}

#[test]
fn requests_are_pipelined_on_one_connection() {
    let server = TestServer::tcp();
    let c = Client::connect(server.config()).expect("connect");
    // 50 calls that each sleep 200 ms on the server: serially 10 s, pipelined ~0.2 s.
    let t = Instant::now();
    let pending: Vec<_> = (0..50u32)
        .map(|i| c.call_async("slow", &(0.2f64, i)).expect("send"))
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        let (v,): (u32,) = p.wait().expect("answer");
        assert_eq!(v as usize, i, "answers routed by sync");
    }
    let slow = t.elapsed();
    assert!(slow < Duration::from_secs(2), "not pipelined: {slow:?}");

    // Many small requests in flight, answers matched to their requests.
    let n = 20_000u64;
    let t = Instant::now();
    let pending: Vec<_> = (0..n)
        .map(|i| c.call_async("echo", &(i, i * 3)).expect("send"))
        .collect();
    for (i, p) in (0..n).zip(pending) {
        let (a, b): (u64, u64) = p.wait().expect("answer");
        assert_eq!((a, b), (i, i * 3));
    }
    let dt = t.elapsed();
    println!(
        "pipelined echo: {n} calls in {:.3} s = {:.0} calls/s; 50 x 200 ms sleeps in {:.3} s",
        dt.as_secs_f64(),
        n as f64 / dt.as_secs_f64(),
        slow.as_secs_f64()
    );

    // Several threads sharing one client.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let (v,): (u64,) = c.call("echo", &(t * 1_000_000 + i,)).expect("call");
                    assert_eq!(v, t * 1_000_000 + i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

#[test]
fn timeout_is_typed_and_the_connection_survives() {
    let server = TestServer::tcp();
    let mut cfg = server.config();
    cfg.request_timeout = Duration::from_millis(200);
    let c = Client::connect(cfg).expect("connect");
    let t = Instant::now();
    let err = c.call::<_, (u32,)>("slow", &(1.0f64, 7u32)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    c.ping().expect("ping after timeout");
    // The late answer to the abandoned call must not be taken for a later request's.
    std::thread::sleep(Duration::from_millis(900));
    let (v,): (u32,) = c.call("echo", &(99u32,)).expect("echo");
    assert_eq!(v, 99);
}

#[test]
fn client_reconnects_after_the_server_restarts() {
    let mut server = TestServer::tcp();
    let c = Client::connect(server.config()).expect("connect");
    let inflight = c.call_async("slow", &(5.0f64, 1u32)).expect("send");
    server.kill();
    let err = inflight.wait::<(u32,)>().unwrap_err();
    assert!(matches!(err, Error::Disconnected { .. }), "{err}");
    assert!(err.is_retryable());
    let err = c.ping().unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, Error::Connect { .. }), "{err}");

    server.spawn();
    c.ping().expect("reconnected");
    let (v,): (u32,) = c.call("echo", &(5u32,)).expect("call after reconnect");
    assert_eq!(v, 5);
}

#[test]
fn a_port_that_is_not_tarantool_gives_a_greeting_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut banner = b"SSH-2.0-OpenSSH_9.2\r\n".to_vec();
        banner.resize(128, b' ');
        s.write_all(&banner).expect("write");
    });
    let cfg = ClientConfig::new(linkpulse_sink::tarantool::Address::Tcp(addr.to_string()));
    let err = Client::connect(cfg).err().expect("must fail");
    assert!(matches!(err, Error::Greeting { .. }), "{err}");
    h.join().expect("thread");
}
