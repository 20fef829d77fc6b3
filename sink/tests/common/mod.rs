//! A plain Tarantool 2.6 started by a test in a temp dir and killed (-9) on drop, even when the
//! test fails.
#![allow(dead_code)]

use linkpulse_sink::tarantool::{Address, ClientConfig, Credentials};
use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "tester";
pub const PASSWORD: &str = "s3cret pass";

/// Lua run after box.cfg in every test server: a user, and global functions the tests call.
const FIXTURE: &str = r#"
box.schema.user.create('tester', {password = 's3cret pass', if_not_exists = true})
box.schema.user.grant('tester', 'super', nil, nil, {if_not_exists = true})
function echo(...) return ... end
function slow(sec, v) require('fiber').sleep(sec) return v end
function boom(msg) error(msg) end
function custom(code, msg) box.error{code = code, reason = msg} end
"#;

pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

pub struct TestServer {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub listen: Listen,
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

impl TestServer {
    pub fn tcp() -> TestServer {
        Self::start(Listen::Tcp(free_port()))
    }

    pub fn unix() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("t.sock");
        Self::start_in(dir, Listen::Unix(sock))
    }

    fn start(listen: Listen) -> TestServer {
        Self::start_in(tempfile::tempdir().expect("tempdir"), listen)
    }

    fn start_in(dir: tempfile::TempDir, listen: Listen) -> TestServer {
        let mut s = TestServer {
            child: None,
            dir,
            listen,
        };
        s.spawn();
        s
    }

    fn listen_uri(&self) -> String {
        match &self.listen {
            Listen::Tcp(p) => format!("127.0.0.1:{p}"),
            Listen::Unix(p) => p.display().to_string(),
        }
    }

    pub fn address(&self) -> Address {
        match &self.listen {
            Listen::Tcp(p) => Address::Tcp(format!("127.0.0.1:{p}")),
            Listen::Unix(p) => Address::Unix(p.clone()),
        }
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.address());
        c.credentials = Some(Credentials {
            user: USER.into(),
            password: PASSWORD.into(),
        });
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn spawn(&mut self) {
        let init = format!(
            "box.cfg{{work_dir = '{dir}', memtx_memory = 32 * 1024 * 1024, log_level = 4}}\n{FIXTURE}\nbox.cfg{{listen = '{uri}'}}\n",
            dir = self.dir.path().display(),
            uri = self.listen_uri()
        );
        let init_path = self.dir.path().join("init.lua");
        std::fs::write(&init_path, init).expect("write init.lua");
        let log = std::fs::File::create(self.dir.path().join("log")).expect("log");
        let child = Command::new("tarantool")
            .arg(&init_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tarantool (apt-get install -y --no-install-recommends tarantool)");
        self.child = Some(child);
        self.wait_listening();
    }

    /// Waits until the port answers with a greeting.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = match &self.listen {
                Listen::Tcp(p) => std::net::TcpStream::connect(("127.0.0.1", *p))
                    .and_then(|mut s| s.read_exact(&mut [0u8; 128]))
                    .is_ok(),
                Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p)
                    .and_then(|mut s| s.read_exact(&mut [0u8; 128]))
                    .is_ok(),
            };
            if ok {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
                panic!("test tarantool exited ({st}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "test tarantool did not listen in 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "linkpulse_sink=info".into()),
        )
        .with_test_writer()
        .try_init();
}
