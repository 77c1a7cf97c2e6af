//! What `relay --check` checks beyond the file and the interfaces ([`Config::validate`], which
//! also checks `cpus:`), so that "exit 0 if it would run" holds: the capabilities, the control
//! socket's path, the metrics address, the XDP program (loaded through the verifier, not
//! attached), the UMEM against RLIMIT_MEMLOCK, and a throw-away AF_XDP bind on every queue
//! the relay will bind ([`crate::probe`]). The start runs the same checks (all but the
//! throw-away binds, as it binds for real) before it touches an interface, so it stops with
//! the same messages. Each names the file, the key and the value.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener},
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
};

use crate::{
    config::{Config, ConfigError, UmemConfig},
    control,
    loader::Steering,
    probe,
    rules::RuleTable,
    sys,
};

fn top(file: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        rule: None,
        message,
    }
}

/// The longest path a Unix socket address holds (`sun_path` less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The control socket's path (the config's `control:`, or the default), checked as the start
/// will use it: not too long for a socket address, in a directory that exists (only the
/// relay's own /run/relay is created at start), not a file other than a socket, and not
/// answered by a relay already running there.
pub fn control_path(file: &str, configured: Option<&PathBuf>) -> Result<PathBuf, ConfigError> {
    let path = control::socket_path(configured);
    let value = match configured {
        Some(_) => path.display().to_string(),
        None => format!("{} (the default)", path.display()),
    };
    let err = |why: String| top(file, format!("control: {value}: {why}"));
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(err(format!(
            "longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have"
        )));
    }
    if !control::in_own_directory(&path) {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(err(format!("{} is not a directory", dir.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(err(format!(
                    "the directory {} does not exist: create it, or leave `control:` out for \
                     the default {}",
                    dir.display(),
                    control::DEFAULT_SOCKET
                )));
            }
            Err(e) => return Err(err(format!("{}: {e}", dir.display()))),
        }
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(&path).is_ok() {
                return Err(err(
                    "a relay answers there: another relay is running with this control socket \
                     (stop it, or set `control:` to another path; to check a changed file \
                     against the relay running it: relay reload --dry-run --config FILE)"
                        .to_owned(),
                ));
            }
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket: the relay does not replace it".to_owned(),
            ));
        }
        Err(_) => {}
    }
    Ok(path)
}

/// Binds the metrics address. The start keeps the listener and serves it later; `--check`
/// closes it at once.
pub fn metrics(file: &str, addr: SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr).map_err(|e| {
        let why = match e.kind() {
            ErrorKind::AddrInUse => "the address is in use: another program (or another relay) \
                                     listens there; pick another port"
                .to_owned(),
            ErrorKind::AddrNotAvailable => {
                format!("{} is not an address of this host", addr.ip())
            }
            ErrorKind::PermissionDenied if addr.port() < 1024 => {
                "ports below 1024 need CAP_NET_BIND_SERVICE: pick a port from 1024 up".to_owned()
            }
            _ => format!("cannot be bound: {e}"),
        };
        top(file, format!("metrics: {addr}: {why}"))
    })
}

/// Whether registering a UMEM of `bytes` must fail: without CAP_IPC_LOCK the kernel charges
/// it to RLIMIT_MEMLOCK (`limit`, `None` when unlimited). Memory the same user has locked
/// elsewhere counts too, so a UMEM within the limit may still fail; one beyond it always does.
pub fn umem_exceeds_memlock(bytes: u64, limit: Option<u64>, ipc_lock: bool) -> bool {
    !ipc_lock && limit.is_some_and(|l| bytes > l)
}

/// Refuses a UMEM the kernel will not register (see [`umem_exceeds_memlock`]). Checked after
/// the XDP program is loaded, which raises RLIMIT_MEMLOCK as far as the relay may.
pub fn umem_memlock(file: &str, umem: &UmemConfig) -> Result<(), ConfigError> {
    // One UMEM for the shared sockets and one per `separate` interface.
    let umems = 1 + umem.separate.len() as u64;
    let bytes = umems * u64::from(umem.frames) * u64::from(umem.frame_size);
    let limit = sys::memlock_limit();
    if umem_exceeds_memlock(bytes, limit, sys::has_capability(sys::CAP_IPC_LOCK)) {
        return Err(top(
            file,
            format!(
                "umem: {} UMEM(s) of {} frames of {} bytes ({} KiB) are more than \
                 RLIMIT_MEMLOCK ({} KiB) lets the relay lock, and it lacks CAP_IPC_LOCK: grant \
                 CAP_IPC_LOCK, raise the limit (LimitMEMLOCK=infinity), or lower umem.frames",
                umems,
                umem.frames,
                umem.frame_size,
                bytes >> 10,
                limit.unwrap_or(0) >> 10
            ),
        ));
    }
    Ok(())
}

/// Everything `relay --check` checks once `table` has compiled (the file validated against
/// this machine), in the order the start meets them. Returns notes worth printing (such as
/// "the relay will run in copy mode"); the first problem is an error. Nothing is attached and
/// nothing stays bound: the program is loaded and freed, the sockets bound and closed.
pub fn check(config: &Config, file: &str, table: &RuleTable) -> anyhow::Result<Vec<String>> {
    sys::require_capabilities()?;
    control_path(file, config.control.as_ref())?;
    if let Some(addr) = config.metrics {
        drop(metrics(file, addr)?);
    }
    drop(Steering::load(table, config.umem.frame_size)?);
    umem_memlock(file, &config.umem)?;
    frame_budget(file, config.umem.frames, table, workers(config, table))?;
    probe::check(file, config, table)
}

/// The worker count: `workers:` or one per ingress rx queue, up to the CPUs.
pub fn workers(config: &Config, table: &RuleTable) -> usize {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    config.workers.unwrap_or_else(|| {
        let queues = table
            .ingress
            .iter()
            .map(|i| i.info.rx_queues as usize)
            .sum();
        crate::config::default_workers(queues, online)
    })
}

/// Refuses a UMEM too small to give every fill ring, worker cache and frame in flight its
/// share (docs/ARCHITECTURE.md, "The frame budget").
pub fn frame_budget(
    file: &str,
    frames: u32,
    table: &RuleTable,
    workers: usize,
) -> anyhow::Result<()> {
    let queues: usize = table
        .ingress
        .iter()
        .filter(|i| i.info.exists())
        .map(|i| i.info.rx_queues as usize)
        .sum();
    crate::datapath::budget::check(frames as usize, queues, workers)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_umem_beyond_memlock_needs_cap_ipc_lock() {
        let mib = 1 << 20;
        assert!(umem_exceeds_memlock(16 * mib, Some(8 * mib), false));
        assert!(!umem_exceeds_memlock(16 * mib, Some(8 * mib), true));
        assert!(
            !umem_exceeds_memlock(8 * mib, Some(8 * mib), false),
            "exactly fits"
        );
        assert!(!umem_exceeds_memlock(16 * mib, None, false), "unlimited");
    }

    fn temp_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relay-pre-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn control_paths_name_file_key_and_value() {
        let dir = temp_dir("control");
        let ok = dir.join("c.sock");
        assert_eq!(control_path("r.yaml", Some(&ok)).unwrap(), ok);

        let missing = dir.join("nope").join("c.sock");
        assert_eq!(
            control_path("r.yaml", Some(&missing))
                .unwrap_err()
                .to_string(),
            format!(
                "r.yaml: control: {}: the directory {} does not exist: create it, or leave \
                 `control:` out for the default /run/relay/relay.sock",
                missing.display(),
                dir.join("nope").display()
            )
        );
        assert!(!dir.join("nope").exists(), "nothing is created");

        let file = dir.join("plain");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(
            control_path("r.yaml", Some(&file)).unwrap_err().to_string(),
            format!(
                "r.yaml: control: {}: exists and is not a socket: the relay does not replace it",
                file.display()
            )
        );
        let under_file = file.join("c.sock");
        assert_eq!(
            control_path("r.yaml", Some(&under_file))
                .unwrap_err()
                .to_string(),
            format!(
                "r.yaml: control: {}: {} is not a directory",
                under_file.display(),
                file.display()
            )
        );

        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(110)));
        assert!(
            control_path("r.yaml", Some(&long))
                .unwrap_err()
                .to_string()
                .ends_with("longer than the 107 bytes a Unix socket path may have")
        );

        // A socket a relay answers on.
        let live = dir.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert_eq!(
            control_path("r.yaml", Some(&live)).unwrap_err().to_string(),
            format!(
                "r.yaml: control: {}: a relay answers there: another relay is running with \
                 this control socket (stop it, or set `control:` to another path; to check a \
                 changed file against the relay running it: relay reload --dry-run --config \
                 FILE)",
                live.display()
            )
        );
        // The default path's directory is the relay's own: a missing one is created at start.
        if !Path::new("/run/relay").exists() {
            assert_eq!(
                control_path("r.yaml", None).unwrap(),
                PathBuf::from(control::DEFAULT_SOCKET)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_addresses_that_cannot_be_bound_are_named() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        assert_eq!(
            metrics("r.yaml", addr).unwrap_err().to_string(),
            format!(
                "r.yaml: metrics: {addr}: the address is in use: another program (or another \
                 relay) listens there; pick another port"
            )
        );
        drop(held);
        drop(metrics("r.yaml", addr).unwrap());
        // TEST-NET-3 is nobody's address.
        let foreign: SocketAddr = "203.0.113.7:9469".parse().unwrap();
        assert_eq!(
            metrics("r.yaml", foreign).unwrap_err().to_string(),
            "r.yaml: metrics: 203.0.113.7:9469: 203.0.113.7 is not an address of this host"
        );
    }
}
