//! The benchmark's network: a router namespace with N veth "modems" (`wwanK`) whose peers
//! (`pK`) live in a peer namespace. IPv6 is off in both so nothing but the generated packets
//! crosses (the counts are compared to the generator's, packet for packet). Removed on drop.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use linkpulse_testbed::netns;

pub struct BenchNet {
    pub router: String,
    pub peer: String,
}

/// The router side address of link k; the peer side is .1, the neighbour the router sends to
/// is .9 (static, on the peer's MAC) and the one the peer sends to is .8 (on the router's MAC):
/// neither exists, so both kernels drop the packets after tc has seen them.
pub fn router_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k as u8, 2)
}
pub fn router_sink(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k as u8, 9)
}
pub fn peer_sink(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, k as u8, 8)
}

fn mac(ns: &str, ifname: &str) -> anyhow::Result<String> {
    let out = netns::ip_in(ns, &["-o", "link", "show", ifname])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no MAC for {ifname} in {out}"))
}

impl BenchNet {
    pub fn up(tag: &str, links: usize) -> anyhow::Result<BenchNet> {
        let base = format!("lpb{}{}", tag, std::process::id() % 100_000);
        let net = BenchNet {
            router: format!("{base}-r"),
            peer: format!("{base}-p"),
        };
        for ns in [&net.router, &net.peer] {
            netns::delete(ns)?;
            netns::create(ns)?;
            for key in [
                "net.ipv6.conf.all.disable_ipv6",
                "net.ipv6.conf.default.disable_ipv6",
            ] {
                netns::set_sysctl(ns, key, "1")?;
            }
            netns::ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        for k in 0..links {
            net.add_link(k)?;
        }
        Ok(net)
    }

    /// Creates (or re-creates) modem k with its addresses and static neighbours.
    pub fn add_link(&self, k: usize) -> anyhow::Result<()> {
        self.create_link(k)?;
        self.configure_link(k)
    }

    /// Creates the veth pair of modem k (down, unconfigured): the interface exists from here.
    pub fn create_link(&self, k: usize) -> anyhow::Result<()> {
        let (w, p) = (format!("wwan{k}"), format!("p{k}"));
        netns::ip_in(
            &self.router,
            &[
                "link", "add", &w, "type", "veth", "peer", "name", &p, "netns", &self.peer,
            ],
        )?;
        Ok(())
    }

    /// Addresses, up, static neighbours of modem k.
    pub fn configure_link(&self, k: usize) -> anyhow::Result<()> {
        let (w, p) = (format!("wwan{k}"), format!("p{k}"));
        netns::ip_in(
            &self.router,
            &["addr", "add", &format!("{}/24", router_addr(k)), "dev", &w],
        )?;
        netns::ip_in(
            &self.peer,
            &["addr", "add", &format!("198.18.{k}.1/24"), "dev", &p],
        )?;
        netns::ip_in(&self.router, &["link", "set", &w, "up"])?;
        netns::ip_in(&self.peer, &["link", "set", &p, "up"])?;
        let (wm, pm) = (mac(&self.router, &w)?, mac(&self.peer, &p)?);
        netns::ip_in(
            &self.router,
            &[
                "neigh",
                "replace",
                &router_sink(k).to_string(),
                "lladdr",
                &pm,
                "dev",
                &w,
                "nud",
                "permanent",
            ],
        )?;
        netns::ip_in(
            &self.peer,
            &[
                "neigh",
                "replace",
                &peer_sink(k).to_string(),
                "lladdr",
                &wm,
                "dev",
                &p,
                "nud",
                "permanent",
            ],
        )?;
        Ok(())
    }

    /// Packets the router's modem interfaces transmitted or dropped on transmit, by the
    /// kernel's own interface counters: every packet that passed their egress hook.
    pub fn egress_packets(&self) -> anyhow::Result<u64> {
        let out = netns::ip_in(&self.router, &["-s", "-j", "link", "show"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut total = 0;
        for l in v.as_array().context("ip -j output")? {
            if l["ifname"].as_str().is_some_and(|n| n.starts_with("wwan")) {
                let tx = &l["stats64"]["tx"];
                total += tx["packets"].as_u64().unwrap_or(0) + tx["dropped"].as_u64().unwrap_or(0);
            }
        }
        Ok(total)
    }

    pub fn del_link(&self, k: usize) -> anyhow::Result<()> {
        netns::ip_in(&self.router, &["link", "del", &format!("wwan{k}")])?;
        Ok(())
    }

    /// A daemon config for the first `n` links, with the controller stream at `stream` (off
    /// when None).
    pub fn config(&self, n: usize, stream: Option<&std::path::Path>) -> String {
        let mut s = String::from(
            "[router]\nid = \"bench\"\nsite = \"lab\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        );
        match stream {
            Some(p) => s += &format!("[stream]\npath = \"{}\"\n", p.display()),
            None => s += "[stream]\nenabled = false\n",
        }
        s += "[store]\nenabled = false\n";
        for k in 0..n {
            s += &format!("[[link]]\ninterface = \"wwan{k}\"\noperator = \"op{k}\"\n");
        }
        s
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        for ns in [&self.router, &self.peer] {
            if let Err(e) = netns::delete(ns) {
                eprintln!("warning: could not delete namespace {ns}: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
