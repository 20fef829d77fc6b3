//! Named network namespaces, as `ip netns` manages them (bind mounts in /run/netns), so that
//! the namespaces are visible to `ip netns exec` and to operators.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sched::{setns, CloneFlags};

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed?)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("namespace {name}: cannot open {path}: {source}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns into {name}: {source}")]
    Setns {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("sysctl {key} in {ns}: {source}")]
    Sysctl {
        ns: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad namespace name {0:?}")]
    BadName(String),
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_string()))
    }
}

/// Path of the namespace's bind mount.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Names of the namespaces in /run/netns.
pub fn list() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Runs `ip ARGS`, returning stdout; a non-zero exit becomes an error carrying stderr.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_checked(cmd)
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, NetnsError> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

pub(crate) fn run_checked(mut cmd: Command) -> Result<String, NetnsError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out: Output = cmd.output().map_err(|source| NetnsError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add NAME`.
pub fn create(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    ip(&["netns", "add", name]).map(drop)
}

/// `ip netns del NAME`; a namespace that does not exist is not an error.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}

/// Moves the *calling thread* into namespace `name` (setns(CLONE_NEWNET)). Sockets and devices
/// it creates afterwards belong there; existing ones keep their namespace.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let p = path(name);
    let f = File::open(&p).map_err(|source| NetnsError::Open {
        name: name.to_string(),
        path: p.clone(),
        source,
    })?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Setns {
        name: name.to_string(),
        source,
    })
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result; the caller's
/// thread never changes namespace. A panic in `f` is propagated to the caller.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|s| {
        let h = s.spawn(|| -> Result<T, NetnsError> {
            enter(name)?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `ip netns exec NS PROGRAM` as a Command to add arguments to.
pub fn command(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Writes a sysctl inside namespace `ns` (`key` in dotted form, e.g.
/// `net.ipv6.conf.all.disable_ipv6`). /proc/sys/net shows the namespace of the thread that
/// opens it, hence the helper thread.
pub fn set_sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let p = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    run_in(ns, || std::fs::write(&p, value))?.map_err(|source| NetnsError::Sysctl {
        ns: ns.to_string(),
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("lpt3-rtr").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("..").is_err());
        assert!(matches!(enter("no such/ns"), Err(NetnsError::BadName(_))));
    }

    #[test]
    fn command_is_prefixed() {
        let c = command("x-rtr", "ping");
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "ip");
        assert_eq!(args, ["netns", "exec", "x-rtr", "ping"]);
    }
}
