//! The emulated router: three namespaces and, per modem k, a router interface wwanK, the
//! emulator threads, and a TUN srvK on the server side.
//!
//! ```text
//!  {name}-rtr                 {name}-car                        {name}-srv
//!  wwanK (veth) ══════════ mK ─ AF_PACKET ─┐
//!                                          ├─ emulator (up/down threads) ─ fd ─ srvK (TUN)
//!  wwanK (TUN) ─────────── fd ────────────┘
//! ```
//! Addresses: wwanK = 198.18.K.2/24 and fd00:6c70:K::2/64 (K as a hex group), srvK = .1 / ::1.
//! The veth's carrier end mK has no address and IPv6 disabled, so the carrier kernel never
//! emits anything; the router's veth end is NOARP (like a raw-IP wwan device) and reaches the
//! server through static neighbours (mK's MAC), so no ARP/ND/MLD crosses. Whatever IP packet
//! still crosses is logged like any other.
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::emulator::io::{DirectionHandle, DirectionSpec, DirectionStats, RxPort, TxPort};
use crate::emulator::{EmulatorError, LinkEngine, LinkProfile, TraceCache, DEFAULT_GUARD_US};
use crate::netns::{self, NetnsError};
use crate::sys;
use crate::truth::{Dir, TruthWriter};

/// Longest testbed name: the namespaces are `{name}-rtr` etc.
pub const MAX_NAME_LEN: usize = 6;
/// Modems are numbered into 198.18.K.0/24.
pub const MAX_MODEMS: usize = 250;
/// Name of the state file `up` writes into the state dir (read by `status`).
pub const STATE_FILE: &str = "testbed.json";
/// TUN queue length: the router's egress and the server's packets wait there for the
/// emulator thread; a short ring would drop what the router already counted.
const TUN_TXQUEUELEN: &str = "10000";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("the testbed needs root (network namespaces, TUN, AF_PACKET); run as root")]
    NotRoot,
    #[error("iproute2's `ip` is needed (apt-get install iproute2): {0}")]
    IpMissing(#[source] NetnsError),
    #[error("testbed name {0:?}: 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9_-]")]
    BadName(String),
    #[error("TUN is unavailable (/dev/net/tun; is the tun module loaded?): {0}")]
    TunUnavailable(#[source] std::io::Error),
    #[error("invalid testbed spec: {0}")]
    BadSpec(String),
    #[error("no modem {0}")]
    NoSuchModem(usize),
    #[error("modem {0} is deleted; recreate it first")]
    ModemDeleted(usize),
    #[error("modem {0} already exists")]
    ModemPresent(usize),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TopologyError {
    let context = context.into();
    move |source| TopologyError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModemKind {
    /// veth pair wwanK ↔ mK; the emulator reads/writes mK with AF_PACKET.
    Veth,
    /// TUN wwanK owned by the emulator: a raw-IP modem like real wwan devices.
    Tun,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModemSpec {
    /// Router-side interface name, e.g. "wwan0".
    pub ifname: String,
    pub kind: ModemKind,
    /// Router → server.
    pub up: LinkProfile,
    /// Server → router.
    pub down: LinkProfile,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestbedSpec {
    /// Short prefix (≤ 6 chars), e.g. "lpt3".
    pub name: String,
    pub modems: Vec<ModemSpec>,
    /// Truth files go to `state_dir/truth`.
    pub state_dir: PathBuf,
}

/// Knobs beyond the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestbedOptions {
    /// Downlink boundary guard (see [`crate::emulator::io`]); 0 disables it.
    pub guard_us: u32,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            guard_us: DEFAULT_GUARD_US,
        }
    }
}

/// What `up` records in `state_dir/testbed.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestbedState {
    pub spec: TestbedSpec,
    pub start_ns: u64,
    pub guard_us: u32,
    pub pid: u32,
}

/// Namespace names of a testbed called `name`.
pub fn namespaces(name: &str) -> [String; 3] {
    [
        format!("{name}-rtr"),
        format!("{name}-car"),
        format!("{name}-srv"),
    ]
}

/// (router, server) IPv4 addresses of modem `k`.
pub fn addr_v4(k: usize) -> (Ipv4Addr, Ipv4Addr) {
    let k = k as u8;
    (Ipv4Addr::new(198, 18, k, 2), Ipv4Addr::new(198, 18, k, 1))
}

/// (router, server) IPv6 addresses of modem `k`.
pub fn addr_v6(k: usize) -> (Ipv6Addr, Ipv6Addr) {
    let k = k as u16;
    (
        Ipv6Addr::new(0xfd00, 0x6c70, k, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0xfd00, 0x6c70, k, 0, 0, 0, 0, 1),
    )
}

/// Deterministic, locally administered MACs: router end `…:K:02`, carrier end `…:K:01`.
fn macs(k: usize) -> ([u8; 6], [u8; 6]) {
    let k = k as u8;
    (
        [0x02, 0x6c, 0x70, 0x00, k, 0x02],
        [0x02, 0x6c, 0x70, 0x00, k, 0x01],
    )
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Server-side TUN name of modem `k`.
pub fn server_ifname(k: usize) -> String {
    format!("srv{k}")
}

/// Carrier-side veth name of modem `k`.
pub fn carrier_ifname(k: usize) -> String {
    format!("m{k}")
}

impl TestbedSpec {
    pub fn validate(&self) -> Result<(), TopologyError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > MAX_NAME_LEN
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(TopologyError::BadName(n.clone()));
        }
        if self.modems.is_empty() || self.modems.len() > MAX_MODEMS {
            return Err(TopologyError::BadSpec(format!(
                "{} modems; 1 to {MAX_MODEMS} supported",
                self.modems.len()
            )));
        }
        for (k, m) in self.modems.iter().enumerate() {
            let name_ok = !m.ifname.is_empty()
                && m.ifname.len() < 16
                && m.ifname
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok {
                return Err(TopologyError::BadSpec(format!(
                    "modem {k}: interface name {:?} (1..15 chars of [A-Za-z0-9_-])",
                    m.ifname
                )));
            }
            if self.modems[..k].iter().any(|o| o.ifname == m.ifname) {
                return Err(TopologyError::BadSpec(format!(
                    "interface name {} used twice",
                    m.ifname
                )));
            }
            for (what, p) in [("up", &m.up), ("down", &m.down)] {
                p.validate().map_err(|e| {
                    TopologyError::BadSpec(format!("modem {k} ({}) {what}: {e}", m.ifname))
                })?;
            }
        }
        Ok(())
    }
}

/// Fails early with a clear message when the machine cannot host a testbed.
pub fn check_prerequisites() -> Result<(), TopologyError> {
    if !sys::is_root() {
        return Err(TopologyError::NotRoot);
    }
    netns::ip(&["-V"]).map_err(TopologyError::IpMissing)?;
    sys::tun_available().map_err(TopologyError::TunUnavailable)?;
    Ok(())
}

struct ModemRuntime {
    srv_fd: Arc<OwnedFd>,
    /// TUN modems only.
    rtr_tun: Option<Arc<OwnedFd>>,
    up: Option<DirectionHandle>,
    down: Option<DirectionHandle>,
    present: bool,
}

/// A running testbed. Dropping it tears everything down (threads, then namespaces), also
/// while unwinding from a panic.
pub struct Testbed {
    spec: TestbedSpec,
    options: TestbedOptions,
    ns: [String; 3],
    start_ns: u64,
    modems: Vec<ModemRuntime>,
    traces: TraceCache,
    torn_down: bool,
}

impl Testbed {
    /// Builds the testbed with default options (200 µs downlink guard).
    pub fn up(spec: TestbedSpec) -> Result<Testbed, TopologyError> {
        Self::up_with(spec, TestbedOptions::default())
    }

    pub fn up_with(spec: TestbedSpec, options: TestbedOptions) -> Result<Testbed, TopologyError> {
        spec.validate()?;
        check_prerequisites()?;
        let truth_dir = spec.state_dir.join("truth");
        fs::create_dir_all(&truth_dir)
            .map_err(io_err(format!("creating {}", truth_dir.display())))?;
        clear_truth(&truth_dir)?;
        let ns = namespaces(&spec.name);
        // From here on, an early return drops `tb`, which removes whatever was built.
        let mut tb = Testbed {
            spec,
            options,
            ns,
            start_ns: 0,
            modems: Vec::new(),
            traces: TraceCache::default(),
            torn_down: false,
        };
        for n in &tb.ns {
            if netns::exists(n) {
                tracing::warn!(ns = %n, "removing a namespace left by an earlier testbed");
                netns::delete(n)?;
            }
        }
        for n in &tb.ns {
            netns::create(n)?;
            netns::ip_in(n, &["link", "set", "lo", "up"])?;
            // Quiet IPv6: no router solicitations, no autoconf, no link-local addresses on new
            // interfaces, no DAD (a DAD probe would be one more packet on a modem).
            for (key, val) in [
                ("net.ipv6.conf.all.accept_ra", "0"),
                ("net.ipv6.conf.default.accept_ra", "0"),
                ("net.ipv6.conf.all.router_solicitations", "0"),
                ("net.ipv6.conf.default.router_solicitations", "0"),
                ("net.ipv6.conf.default.addr_gen_mode", "1"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv6.conf.default.dad_transmits", "0"),
            ] {
                netns::set_sysctl(n, key, val)?;
            }
        }
        // The carrier kernel must never emit anything toward the router: IPv6 off before
        // the veth ends are created (they inherit `default`), and no IPv4 address on them.
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            netns::set_sysctl(&tb.ns[1], key, "1")?;
        }
        // Origin of every trace and outage schedule.
        tb.start_ns = sys::realtime_ns();
        for k in 0..tb.spec.modems.len() {
            let srv_fd = tb.build_server_side(k)?;
            tb.modems.push(ModemRuntime {
                srv_fd,
                rtr_tun: None,
                up: None,
                down: None,
                present: false,
            });
            tb.build_router_side(k)?;
        }
        tb.write_state()?;
        tracing::info!(
            name = %tb.spec.name,
            modems = tb.modems.len(),
            router = %tb.ns[0],
            "testbed up"
        );
        Ok(tb)
    }

    pub fn spec(&self) -> &TestbedSpec {
        &self.spec
    }
    pub fn options(&self) -> TestbedOptions {
        self.options
    }
    /// Namespace of the router (where the daemon runs and the wwanK live).
    pub fn router_ns(&self) -> &str {
        &self.ns[0]
    }
    pub fn carrier_ns(&self) -> &str {
        &self.ns[1]
    }
    pub fn server_ns(&self) -> &str {
        &self.ns[2]
    }
    /// (router, server) IPv4 addresses of modem `k`.
    pub fn modem_addr_v4(&self, k: usize) -> (Ipv4Addr, Ipv4Addr) {
        addr_v4(k)
    }
    /// (router, server) IPv6 addresses of modem `k`.
    pub fn modem_addr_v6(&self, k: usize) -> (Ipv6Addr, Ipv6Addr) {
        addr_v6(k)
    }
    /// Router-side interface name of modem `k`.
    pub fn modem_ifname(&self, k: usize) -> Result<&str, TopologyError> {
        self.spec
            .modems
            .get(k)
            .map(|m| m.ifname.as_str())
            .ok_or(TopologyError::NoSuchModem(k))
    }
    pub fn server_ifname(&self, k: usize) -> String {
        server_ifname(k)
    }
    pub fn truth_dir(&self) -> PathBuf {
        self.spec.state_dir.join("truth")
    }
    /// CLOCK_REALTIME ns of the emulator start: time 0 of traces and outages.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// ifindex of modem `k`'s router interface (changes on [`Testbed::recreate_modem`]).
    pub fn router_ifindex(&self, k: usize) -> Result<u32, TopologyError> {
        let ifname = self.modem_ifname(k)?.to_string();
        netns::run_in(self.router_ns(), || sys::if_index(&ifname))?.map_err(io_err(format!(
            "ifindex of {ifname} in {}",
            self.router_ns()
        )))
    }

    /// True while both emulator threads of modem `k` run.
    pub fn emulator_running(&self, k: usize) -> bool {
        self.modems.get(k).is_some_and(|m| {
            m.up.as_ref().is_some_and(|h| h.is_running())
                && m.down.as_ref().is_some_and(|h| h.is_running())
        })
    }

    /// Packets inside modem `k`'s emulator (both directions): admitted, not yet delivered.
    pub fn in_flight(&self, k: usize) -> usize {
        self.modems.get(k).map_or(0, |m| {
            m.up.as_ref().map_or(0, |h| h.in_flight())
                + m.down.as_ref().map_or(0, |h| h.in_flight())
        })
    }

    /// Waits until no emulator holds a packet (queues and delay lines drained; call it after
    /// stopping the traffic, before comparing counts), up to `timeout`. True if drained.
    pub fn wait_drained(&self, timeout: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        loop {
            // Twice, 20 ms apart: a packet may sit between a socket and the engine.
            let idle = |tb: &Testbed| (0..tb.modems.len()).all(|k| tb.in_flight(k) == 0);
            if idle(self) {
                std::thread::sleep(std::time::Duration::from_millis(20));
                if idle(self) {
                    return true;
                }
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Removes modem `k`'s router interface (hot-unplug): its emulator threads stop (what is
    /// in flight is logged as `dropped_shutdown`), the server side stays.
    pub fn delete_modem(&mut self, k: usize) -> Result<(), TopologyError> {
        let ifname = self.modem_ifname(k)?.to_string();
        let kind = self.spec.modems[k].kind;
        let m = &mut self.modems[k];
        if !m.present {
            return Err(TopologyError::ModemDeleted(k));
        }
        let stats = stop_threads(m)?;
        tracing::info!(modem = k, %ifname, ?stats, "modem emulator stopped");
        m.present = false;
        match kind {
            // Deleting one end of a veth deletes both.
            ModemKind::Veth => {
                netns::ip_in(&self.ns[0], &["link", "del", &ifname])?;
            }
            // A TUN device lives as long as its fd, which only the emulator held.
            ModemKind::Tun => drop(m.rtr_tun.take()),
        }
        tracing::info!(modem = k, %ifname, "modem deleted");
        Ok(())
    }

    /// Brings modem `k` back with the same name, addresses and emulator profiles (the trace and
    /// outage schedules continue on the testbed's time base). The interface gets a new ifindex.
    pub fn recreate_modem(&mut self, k: usize) -> Result<(), TopologyError> {
        let m = self.modems.get(k).ok_or(TopologyError::NoSuchModem(k))?;
        if m.present {
            return Err(TopologyError::ModemPresent(k));
        }
        // Whatever the server sent while the modem was gone never reached the router: discard
        // it rather than deliver it late.
        let srv = m.srv_fd.clone();
        let mut buf = vec![0u8; 65_536];
        let mut stale = 0u64;
        while let Ok(Some(_)) =
            sys::read_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&*srv), &mut buf)
        {
            stale += 1;
        }
        if stale > 0 {
            tracing::debug!(
                modem = k,
                stale,
                "discarded server packets queued while deleted"
            );
        }
        self.build_router_side(k)?;
        tracing::info!(modem = k, ifname = %self.spec.modems[k].ifname, "modem recreated");
        Ok(())
    }

    /// Stops the emulators and removes the namespaces, reporting the first error (it still
    /// tries every step).
    pub fn down(mut self) -> Result<(), TopologyError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), TopologyError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut first: Option<TopologyError> = None;
        for (k, m) in self.modems.iter_mut().enumerate() {
            match stop_threads(m) {
                Ok(stats) => tracing::debug!(modem = k, ?stats, "emulator stopped"),
                Err(e) => {
                    tracing::error!(modem = k, error = %e, "emulator stop failed");
                    first.get_or_insert(e);
                }
            }
        }
        // Close every fd before deleting the namespaces: an open socket or TUN keeps its
        // namespace alive after `ip netns del`.
        self.modems.clear();
        for n in &self.ns {
            if let Err(e) = netns::delete(n) {
                tracing::error!(ns = %n, error = %e, "deleting namespace failed");
                first.get_or_insert(e.into());
            }
        }
        // The state file stays, next to the truth logs, for `status` after the fact.
        tracing::info!(name = %self.spec.name, "testbed down");
        first.map_or(Ok(()), Err)
    }

    fn write_state(&self) -> Result<(), TopologyError> {
        let st = TestbedState {
            spec: self.spec.clone(),
            start_ns: self.start_ns,
            guard_us: self.options.guard_us,
            pid: std::process::id(),
        };
        let path = self.spec.state_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&st).map_err(|e| TopologyError::Io {
            context: "serialising the testbed state".into(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&path, json).map_err(io_err(format!("writing {}", path.display())))
    }

    /// TUN srvK in the server namespace, addressed and up.
    fn build_server_side(&mut self, k: usize) -> Result<Arc<OwnedFd>, TopologyError> {
        let srv_ns = self.ns[2].clone();
        let name = server_ifname(k);
        let fd = netns::run_in(&srv_ns, || sys::open_tun(&name))?
            .map_err(io_err(format!("creating TUN {name} in {srv_ns}")))?;
        let (_, v4) = addr_v4(k);
        let (_, v6) = addr_v6(k);
        configure_l3(&srv_ns, &name, &v4.to_string(), &v6.to_string(), true)?;
        Ok(Arc::new(fd))
    }

    /// The router interface wwanK (veth + carrier end, or TUN), its addresses, and the two
    /// emulator threads.
    fn build_router_side(&mut self, k: usize) -> Result<(), TopologyError> {
        let spec = self.spec.modems[k].clone();
        let [rtr, car, _] = self.ns.clone();
        let ifname = spec.ifname.as_str();
        let (rtr_mac, car_mac) = macs(k);
        let (v4, srv_v4) = addr_v4(k);
        let (v6, srv_v6) = addr_v6(k);
        let carrier = carrier_ifname(k);

        let (up_rx, down_tx, rtr_tun) = match spec.kind {
            ModemKind::Veth => {
                netns::ip(&[
                    "link",
                    "add",
                    ifname,
                    "netns",
                    &rtr,
                    "address",
                    &mac_str(rtr_mac),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &carrier,
                    "netns",
                    &car,
                    "address",
                    &mac_str(car_mac),
                ])?;
                // Per-wire-packet view: no TSO/GSO on send, no GRO on receive, either end.
                offloads_off(&rtr, ifname)?;
                offloads_off(&car, &carrier)?;
                // NOARP, like real raw-IP wwan devices: no ARP, and no IPv6 solicited-node
                // groups, hence no MLD reports crossing the modem after every address change.
                // Must precede the static neighbours (toggling it flushes them).
                netns::ip_in(&rtr, &["link", "set", "dev", ifname, "arp", "off"])?;
                netns::set_sysctl(&car, &format!("net.ipv6.conf.{carrier}.disable_ipv6"), "1")?;
                netns::ip_in(&car, &["link", "set", &carrier, "up"])?;
                configure_l3(&rtr, ifname, &v4.to_string(), &v6.to_string(), false)?;
                for addr in [srv_v4.to_string(), srv_v6.to_string()] {
                    netns::ip_in(
                        &rtr,
                        &[
                            "neigh",
                            "replace",
                            &addr,
                            "lladdr",
                            &mac_str(car_mac),
                            "dev",
                            ifname,
                            "nud",
                            "permanent",
                        ],
                    )?;
                }
                let carrier2 = carrier.clone();
                let (rx, tx, ifindex) = netns::run_in(&car, || -> std::io::Result<_> {
                    let ifindex = sys::if_index(&carrier2)?;
                    Ok((
                        sys::packet_rx_socket(ifindex)?,
                        sys::packet_tx_socket()?,
                        ifindex,
                    ))
                })?
                .map_err(io_err(format!("AF_PACKET sockets on {carrier} in {car}")))?;
                (
                    RxPort::Packet(rx),
                    TxPort::Packet {
                        fd: tx,
                        ifindex,
                        dst_mac: rtr_mac,
                    },
                    None,
                )
            }
            ModemKind::Tun => {
                let fd = netns::run_in(&rtr, || sys::open_tun(ifname))?
                    .map_err(io_err(format!("creating TUN {ifname} in {rtr}")))?;
                let fd = Arc::new(fd);
                offloads_off(&rtr, ifname)?;
                configure_l3(&rtr, ifname, &v4.to_string(), &v6.to_string(), true)?;
                (RxPort::Tun(fd.clone()), TxPort::Tun(fd.clone()), Some(fd))
            }
        };

        let truth_dir = self.truth_dir();
        let guard_ns = u64::from(self.options.guard_us) * 1_000;
        let m = &self.modems[k];
        let srv_fd = m.srv_fd.clone();
        let up_engine = LinkEngine::new(
            &spec.up,
            spec.up.bottleneck(&mut self.traces)?,
            self.start_ns,
            0,
        )
        .map_err(EmulatorError::from)?;
        let down_engine = LinkEngine::new(
            &spec.down,
            spec.down.bottleneck(&mut self.traces)?,
            self.start_ns,
            guard_ns,
        )
        .map_err(EmulatorError::from)?;
        let up = DirectionHandle::spawn(DirectionSpec {
            label: format!("{ifname} up"),
            modem: k as u16,
            dir: Dir::Up,
            rx: up_rx,
            tx: TxPort::Tun(srv_fd.clone()),
            engine: up_engine,
            truth: TruthWriter::open(&truth_dir, k as u16, Dir::Up).map_err(EmulatorError::from)?,
            guard_ns: 0,
        })?;
        let down = DirectionHandle::spawn(DirectionSpec {
            label: format!("{ifname} down"),
            modem: k as u16,
            dir: Dir::Down,
            rx: RxPort::Tun(srv_fd),
            tx: down_tx,
            engine: down_engine,
            truth: TruthWriter::open(&truth_dir, k as u16, Dir::Down)
                .map_err(EmulatorError::from)?,
            guard_ns,
        })?;
        let m = &mut self.modems[k];
        m.up = Some(up);
        m.down = Some(down);
        m.rtr_tun = rtr_tun;
        m.present = true;
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(name = %self.spec.name, error = %e, "testbed teardown failed");
        }
    }
}

fn stop_threads(m: &mut ModemRuntime) -> Result<(DirectionStats, DirectionStats), TopologyError> {
    // Stop both even if the first fails.
    let up = m.up.take().map(|h| h.stop()).transpose();
    let down = m.down.take().map(|h| h.stop()).transpose();
    Ok((up?.unwrap_or_default(), down?.unwrap_or_default()))
}

/// Turns TX checksum offload, TSO, GSO and GRO off (SIOCETHTOOL, no ethtool binary needed)
/// and caps GSO at one segment, so TCP builds wire-sized packets: the router's egress hook then
/// sees each packet as it goes on the wire, like the emulator does. Checksums must be complete
/// too: with offload a veth hands over CHECKSUM_PARTIAL packets, whose bytes (as AF_PACKET
/// reads them) carry only the pseudo-header sum, and the server's stack would drop them.
fn offloads_off(ns: &str, ifname: &str) -> Result<(), TopologyError> {
    let name = ifname.to_string();
    let results = netns::run_in(ns, || {
        [
            ("tx-checksum", sys::ETHTOOL_STXCSUM),
            ("tso", sys::ETHTOOL_STSO),
            ("gso", sys::ETHTOOL_SGSO),
            ("gro", sys::ETHTOOL_SGRO),
        ]
        .map(|(what, cmd)| (what, sys::ethtool_set(&name, cmd, false)))
    })?;
    for (what, r) in results {
        if let Err(e) = r {
            // A TUN cannot toggle every feature; it has none of them on anyway.
            tracing::debug!(%ns, %ifname, feature = what, error = %e, "offload not changed");
        }
    }
    netns::ip_in(ns, &["link", "set", "dev", ifname, "gso_max_segs", "1"])?;
    Ok(())
}

/// Quiet IPv6 on the interface, addresses, up.
fn configure_l3(
    ns: &str,
    ifname: &str,
    v4: &str,
    v6: &str,
    tun: bool,
) -> Result<(), TopologyError> {
    netns::ip_in(ns, &["link", "set", "dev", ifname, "addrgenmode", "none"])?;
    if tun {
        netns::ip_in(
            ns,
            &["link", "set", "dev", ifname, "txqueuelen", TUN_TXQUEUELEN],
        )?;
    }
    for (key, val) in [("accept_ra", "0"), ("router_solicitations", "0")] {
        netns::set_sysctl(ns, &format!("net.ipv6.conf.{ifname}.{key}"), val)?;
    }
    netns::ip_in(ns, &["addr", "add", &format!("{v4}/24"), "dev", ifname])?;
    netns::ip_in(
        ns,
        &["addr", "add", &format!("{v6}/64"), "dev", ifname, "nodad"],
    )?;
    netns::ip_in(ns, &["link", "set", "dev", ifname, "up"])?;
    Ok(())
}

fn clear_truth(dir: &Path) -> Result<(), TopologyError> {
    let rd = fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    for e in rd {
        let p = e
            .map_err(io_err(format!("listing {}", dir.display())))?
            .path();
        if p.extension().is_some_and(|x| x == "bin") {
            fs::remove_file(&p).map_err(io_err(format!("removing old {}", p.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TestbedSpec {
        TestbedSpec {
            name: name.into(),
            modems: (0..n)
                .map(|k| ModemSpec {
                    ifname: format!("wwan{k}"),
                    kind: ModemKind::Veth,
                    up: LinkProfile::default(),
                    down: LinkProfile::default(),
                })
                .collect(),
            state_dir: "/tmp/x".into(),
        }
    }

    #[test]
    fn spec_validation() {
        assert!(spec("lpt3", 2).validate().is_ok());
        assert!(matches!(
            spec("toolong", 1).validate(),
            Err(TopologyError::BadName(_))
        ));
        assert!(matches!(
            spec("a/b", 1).validate(),
            Err(TopologyError::BadName(_))
        ));
        assert!(spec("ok", 0).validate().is_err());
        let mut s = spec("ok", 2);
        s.modems[1].ifname = "wwan0".into();
        assert!(s.validate().is_err());
        let mut s = spec("ok", 1);
        s.modems[0].up.loss = 2.0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn addressing() {
        assert_eq!(
            addr_v4(3),
            ("198.18.3.2".parse().unwrap(), "198.18.3.1".parse().unwrap())
        );
        assert_eq!(addr_v6(11).0.to_string(), "fd00:6c70:b::2");
        assert_eq!(mac_str(macs(10).1), "02:6c:70:00:0a:01");
        assert_eq!(namespaces("lp")[1], "lp-car");
    }
}
