//! Debian's tshark as an independent decoder of what linkpulse puts on the wire: a capture on
//! one interface (in a namespace or not), then selected fields of every packet.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::Duration,
};

use crate::netns;

#[derive(Debug, thiserror::Error)]
pub enum TsharkError {
    #[error(
        "tshark not found or not working ({0}). Fix: `cargo xtask setup` installs Debian's tshark"
    )]
    Missing(String),
    #[error("cannot start tshark on {iface}: {source}")]
    Spawn {
        iface: String,
        source: std::io::Error,
    },
    #[error("tshark on {iface} exited before its capture started; it said: {said}")]
    NoStart { iface: String, said: String },
    #[error("tshark -r {}: {said}", pcap.display())]
    Read { pcap: PathBuf, said: String },
}

/// Fails with the fix when tshark cannot run here.
pub fn check_installed() -> Result<(), TsharkError> {
    match Command::new("tshark").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(TsharkError::Missing(format!("exit {}", o.status))),
        Err(e) => Err(TsharkError::Missing(e.to_string())),
    }
}

/// A running capture. Dropping it without [`Capture::stop`] kills tshark and removes the file.
pub struct Capture {
    child: Option<Child>,
    drain: Option<JoinHandle<usize>>,
    pcap: PathBuf,
}

impl Capture {
    /// Captures `filter` (BPF syntax) on `iface`, inside namespace `ns` if given, into `pcap`,
    /// and returns once dumpcap has attached its filter (so nothing sent afterwards is missed).
    /// tshark stops by itself after 60 s.
    pub fn start(
        ns: Option<&str>,
        iface: &str,
        filter: &str,
        pcap: &Path,
    ) -> Result<Capture, TsharkError> {
        let mut cmd = match ns {
            Some(ns) => netns::command(ns, "tshark"),
            None => Command::new("tshark"),
        };
        let mut child = cmd
            .args(["-i", iface, "-f", filter, "-w"])
            .arg(pcap)
            .args(["-a", "duration:60"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| TsharkError::Spawn {
                iface: iface.to_owned(),
                source,
            })?;
        let mut cap = Capture {
            drain: None,
            pcap: pcap.to_owned(),
            child: None,
        };
        let Some(stderr) = child.stderr.take() else {
            cap.child = Some(child);
            return Err(TsharkError::NoStart {
                iface: iface.to_owned(),
                said: "no stderr".into(),
            });
        };
        cap.child = Some(child);
        // "Capturing on 'eth0'" comes before dumpcap has the filter attached; "Capture started"
        // (dumpcap's, ~0.1 s later) after.
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Capture started") => break,
                Some(Ok(line)) => said.push(line),
                Some(Err(_)) | None => {
                    return Err(TsharkError::NoStart {
                        iface: iface.to_owned(),
                        said: said.join(" | "),
                    })
                }
            }
        }
        // Keep draining stderr so tshark never blocks on a full pipe.
        cap.drain = Some(std::thread::spawn(move || lines.count()));
        // A margin for the first read of the capture socket.
        std::thread::sleep(Duration::from_millis(300));
        Ok(cap)
    }

    /// Lets the last packets reach the capture, stops tshark as a user would (SIGINT) and
    /// returns the capture file, which the caller removes.
    pub fn stop(mut self) -> PathBuf {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
        std::mem::take(&mut self.pcap)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.pcap.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.pcap);
        }
    }
}

/// The `fields` of every packet of `pcap` (tab-separated `-T fields` output, one row per
/// packet), decoding UDP port `port` as TWAMP-Test (tshark 4.0 has no dissector named STAMP;
/// the unauthenticated STAMP layouts are TWAMP-Test's). Times print in UTC.
pub fn twamp_fields(
    pcap: &Path,
    port: u16,
    fields: &[&str],
) -> Result<Vec<Vec<String>>, TsharkError> {
    let mut cmd = Command::new("tshark");
    cmd.env("TZ", "UTC")
        .arg("-r")
        .arg(pcap)
        .args(["-d", &format!("udp.port=={port},twamp.test")])
        .args(["-T", "fields", "-E", "separator=/t"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().map_err(|e| TsharkError::Read {
        pcap: pcap.to_owned(),
        said: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(TsharkError::Read {
            pcap: pcap.to_owned(),
            said: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

/// "Nov 22, 2026 03:17:24.433415889 UTC" (tshark's absolute time with TZ=UTC) → ns since
/// 1970 on the same scale as the field (UTC for NTP, TAI for PTP); None if not of that form.
pub fn parse_abs(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [mon, day, year, time, "UTC"] = parts[..] else {
        return None;
    };
    let m = MONTHS.iter().position(|&x| x == mon)? as i64 + 1;
    let d: i64 = day.trim_end_matches(',').parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let (hms, frac) = time.split_once('.')?;
    if frac.len() != 9 {
        return None;
    }
    let hms: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, se] = hms[..] else {
        return None;
    };
    // Days from civil (H. Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    Some(u64::try_from(secs).ok()? * 1_000_000_000 + frac.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::parse_abs;

    #[test]
    fn parse_abs_known_instants() {
        assert_eq!(parse_abs("Jan  1, 1970 00:00:00.000000000 UTC"), Some(0));
        assert_eq!(
            parse_abs("Jan  1, 2026 00:00:00.500000000 UTC"),
            Some(1_767_225_600_500_000_000)
        );
        assert_eq!(
            parse_abs("Feb 29, 2024 23:59:59.000000001 UTC"),
            Some(1_709_251_199_000_000_001)
        );
        assert_eq!(parse_abs("Feb 29, 2024 23:59:59.000001 UTC"), None);
        assert_eq!(parse_abs("Feb 29, 2024 23:59:59.000000001 CET"), None);
        assert_eq!(parse_abs(""), None);
    }
}
