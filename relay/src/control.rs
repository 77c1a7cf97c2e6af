//! The control socket (`relay stats`, `relay rules`, `relay ping`); the Prometheus endpoint is
//! in [`crate::metrics`].
//!
//! The control socket is a Unix stream socket, root-only (0600, in a 0700 directory). A client
//! writes one JSON request on one line and reads one JSON reply on one line. A request that is
//! not JSON, is too long, or names no known command gets an error reply; nothing a client sends
//! can stop the daemon. `capture` is the one request whose connection stays open: after its
//! reply line the daemon streams the captured frames as pcapng until the count is reached or
//! the client goes away (see [`crate::capture`]).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    capture::{self, Capture, Filter},
    stats::StatsView,
};

/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/relay/relay.sock";
/// The longest request line the daemon reads.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    Stats,
    Rules,
    Reload {
        /// Refuse the file, keeping the running rules, when it draws warnings (an interface
        /// that does not exist).
        #[serde(default)]
        strict: bool,
    },
    /// Validates the config file as a reload would and says what would change, changing
    /// nothing (`relay reload --dry-run`). A command of its own, so that a relay too old to
    /// know it refuses it rather than reloading.
    ReloadDryRun {
        #[serde(default)]
        strict: bool,
        /// The config file the client was pointed at, which must be the one the relay
        /// reloads: a dry run of one file must not answer for another.
        #[serde(default)]
        file: Option<PathBuf>,
    },
    /// Adds one rule, given as the YAML of one entry of `rules:`.
    AddRule {
        rule: String,
        /// Where the rule came from (its file, or `standard input`), for errors.
        #[serde(default)]
        source: Option<String>,
        #[serde(default)]
        strict: bool,
    },
    RemoveRule {
        name: String,
    },
    /// Streams copies of the frames the data path receives and sends (`relay capture`).
    Capture {
        #[serde(flatten)]
        filter: Filter,
        /// Stop after this many frames; until the client goes away when absent.
        #[serde(default)]
        count: Option<u64>,
    },
}

/// How a reload is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadMode {
    /// Warnings (what `--check` warns about) refuse the change.
    pub strict: bool,
    /// Validate and compare, apply nothing.
    pub dry_run: bool,
    /// The file the client means (a dry run's), to compare with the relay's own.
    pub file: Option<PathBuf>,
}

/// A change to the running rules, carried out by the thread that owns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Re-read the config file; with `dry_run`, only say what a reload would change.
    Reload(ReloadMode),
    AddRule {
        rule: String,
        /// Where it came from, for errors about it.
        source: String,
        strict: bool,
    },
    RemoveRule(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Pong {
        version: String,
    },
    Stats(Box<StatsView>),
    Reloaded(String),
    /// A capture started (what it takes); the pcapng stream follows the reply line.
    Capturing(String),
    Error(String),
}

/// Produces the counters; the daemon's state lives behind it.
pub type Snapshot = Arc<dyn Fn() -> StatsView + Send + Sync>;
/// Carries out a change and says how it went.
pub type Reloader = Arc<dyn Fn(Change) -> Result<String, String> + Send + Sync>;
/// Starts a capture against the running rules, or says why not.
pub type Capturer = Arc<dyn Fn(Filter) -> Result<Capture, String> + Send + Sync>;

/// Answers one request.
pub fn answer(line: &str, snapshot: &Snapshot, reloader: &Reloader) -> Reply {
    match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Ping) => Reply::Pong {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        Ok(Request::Stats) | Ok(Request::Rules) => Reply::Stats(Box::new(snapshot())),
        Ok(Request::Reload { strict }) => changed(reloader(Change::Reload(ReloadMode {
            strict,
            ..ReloadMode::default()
        }))),
        Ok(Request::ReloadDryRun { strict, file }) => {
            changed(reloader(Change::Reload(ReloadMode {
                strict,
                dry_run: true,
                file,
            })))
        }
        Ok(Request::AddRule {
            rule,
            source,
            strict,
        }) => changed(reloader(Change::AddRule {
            rule,
            source: source.unwrap_or_else(|| "the added rule".to_owned()),
            strict,
        })),
        Ok(Request::RemoveRule { name }) => changed(reloader(Change::RemoveRule(name))),
        // Served by `handle`, which keeps the connection for the stream.
        Ok(Request::Capture { .. }) => Reply::Error("this relay does not capture".to_owned()),
        Err(e) => Reply::Error(format!("bad request: {e}")),
    }
}

/// The bound control socket, not yet served. Dropping it removes the socket file.
pub struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
    capturer: Option<Capturer>,
}

/// The control socket file this relay created: removed when this is dropped, on every path
/// out of the relay (a start that fails half-way, or a normal stop), so no socket file is
/// left behind that names a relay that is not running. A file at the path that is not the
/// one this relay bound (another relay's, after this one's was removed) is left alone.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the file as bound.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` is in the relay's own runtime directory (that of [`DEFAULT_SOCKET`]),
/// which the relay creates, root-only, when it is missing. The directory of any other path
/// must exist: a `control:` naming a directory that does not is a mistake the relay reports
/// rather than papers over with a `mkdir -p`.
pub fn in_own_directory(path: &Path) -> bool {
    path.parent() == Path::new(DEFAULT_SOCKET).parent()
}

fn changed(result: Result<String, String>) -> Reply {
    match result {
        Ok(summary) => Reply::Reloaded(summary),
        Err(e) => Reply::Error(e),
    }
}

/// Binds the control socket. Done first thing at start, so that a second relay with the same
/// socket stops before it touches any interface. Only the relay's own directory
/// ([`in_own_directory`]) is created; the file is removed again when the returned socket (or
/// the [`SocketFile`] that serving it returns) is dropped.
pub fn bind(path: &Path) -> Result<ControlSocket> {
    if UnixStream::connect(path).is_ok() {
        bail!(
            "{} answers: another relay is running with this control socket (stop it, or set \
             `control:` to another path)",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|_| in_own_directory(path)) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} root-only", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        // A socket file nobody answers on is left over from a relay that died.
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: the relay does not replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id: file_id(path),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    Ok(ControlSocket {
        listener,
        file,
        capturer: None,
    })
}

impl ControlSocket {
    /// Serves `capture` requests with `capturer`.
    pub fn with_capture(mut self, capturer: Capturer) -> Self {
        self.capturer = Some(capturer);
        self
    }

    /// Answers requests on a thread of its own. The socket file stays until the returned
    /// guard is dropped.
    pub fn serve(self, snapshot: Snapshot, reloader: Reloader) -> Result<SocketFile> {
        info!("control socket at {}", self.file.path.display());
        let ControlSocket {
            listener,
            file,
            capturer,
        } = self;
        let path = file.path.clone();
        std::thread::Builder::new()
            .name("relay-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = handle(stream, &snapshot, &reloader, &capturer) {
                                // A client that went away (Ctrl-C, a closed pipe) is routine.
                                if went_away(&e) {
                                    debug!("control client: {e:#}");
                                } else {
                                    warn!("control client: {e:#}");
                                }
                            }
                        }
                        Err(e) => warn!("{}: accept: {e}", path.display()),
                    }
                }
            })?;
        Ok(file)
    }
}

/// Whether `e` says the client hung up before the reply was written.
fn went_away(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted))
    })
}

/// Binds and serves in one step; the socket file stays until the returned guard is dropped.
pub fn serve(path: &Path, snapshot: Snapshot, reloader: Reloader) -> Result<SocketFile> {
    bind(path)?.serve(snapshot, reloader)
}

fn handle(
    stream: UnixStream,
    snapshot: &Snapshot,
    reloader: &Reloader,
    capturer: &Option<Capturer>,
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST as u64 + 1));
    reader.read_line(&mut line)?;
    let reply = if line.len() > MAX_REQUEST {
        Reply::Error(format!("request longer than {MAX_REQUEST} bytes"))
    } else if let (Ok(Request::Capture { filter, count }), Some(capturer)) =
        (serde_json::from_str(line.trim()), capturer)
    {
        match capturer(filter) {
            Ok(capture) => return start_stream(stream, capture, count),
            Err(e) => Reply::Error(e),
        }
    } else {
        answer(&line, snapshot, reloader)
    };
    write_reply(&stream, &reply)
}

fn write_reply(stream: &UnixStream, reply: &Reply) -> Result<()> {
    let mut out = serde_json::to_string(reply)?;
    out.push('\n');
    (&*stream).write_all(out.as_bytes())?;
    Ok(())
}

/// Says the capture started, then streams it on a thread of its own, so the control socket
/// goes on answering (and a client that reads slowly holds up nobody but itself).
fn start_stream(stream: UnixStream, capture: Capture, count: Option<u64>) -> Result<()> {
    let what = capture.session.filter.describe();
    write_reply(&stream, &Reply::Capturing(what.clone()))?;
    // The stream goes at the client's pace: a write waits as long as the client does not
    // read, while the capture's queue fills and the workers count what it cannot take.
    stream.set_write_timeout(None)?;
    std::thread::Builder::new()
        .name("relay-capture".into())
        .spawn(move || {
            info!("capture of {what} started");
            match capture::stream(capture, &stream, count) {
                Ok(n) => info!("capture of {what} ended: {n} frames written"),
                Err(e) => info!("capture of {what} ended: the client went away ({e})"),
            }
        })?;
    Ok(())
}

/// Sends one request to a running relay and returns its reply.
pub fn request(path: &Path, req: &Request) -> Result<Reply> {
    let stream = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is the relay running, and are you root?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).with_context(|| format!("reply: {reply}"))
}

/// Serves the Prometheus endpoint (see [`crate::metrics`]) on a thread of its own, on a
/// listener bound early in the start (`preflight::metrics`), so that an address that cannot be
/// bound stops the relay before it touches an interface.
pub fn serve_metrics(listener: TcpListener, snapshot: Snapshot) -> Result<()> {
    crate::metrics::serve(listener, snapshot)
}

/// The control socket path: the config's, or the default.
pub fn socket_path(configured: Option<&PathBuf>) -> PathBuf {
    configured
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn snap() -> Snapshot {
        Arc::new(|| StatsView {
            relay: None,
            rules: vec![],
            xdp: BTreeMap::new(),
            pool: crate::stats::PoolView {
                allocator: "mutex".into(),
                capacity: 1,
                free: 1,
                in_flight: 0,
                low_water: 1,
                rejected: 0,
            },
            unmatched: 0,
            malformed: 0,
            queriers: Vec::new(),
            copies: 0,
            cross_umem: 0,
            capture_dropped: 0,
            kicks: 0,
            yields: 0,
            sockets: Vec::new(),
        })
    }

    fn reloader() -> Reloader {
        Arc::new(|c| match c {
            Change::RemoveRule(name) => Ok(format!("removed {name}")),
            _ => Err("r.yaml: rule 'x': input interface 'eth9' does not exist".into()),
        })
    }

    #[test]
    fn answers_known_requests_and_refuses_the_rest() {
        let (s, r) = (snap(), reloader());
        assert!(matches!(
            answer("{\"cmd\":\"ping\"}\n", &s, &r),
            Reply::Pong { .. }
        ));
        assert!(matches!(
            answer("{\"cmd\":\"stats\"}", &s, &r),
            Reply::Stats(_)
        ));
        for bad in [
            "",
            "garbage",
            "{\"cmd\":\"shutdown\"}",
            "{\"cmd\":7}",
            "[1,2]",
        ] {
            assert!(matches!(answer(bad, &s, &r), Reply::Error(_)), "{bad:?}");
        }
        assert_eq!(
            answer("{\"cmd\":\"reload\"}", &s, &r),
            Reply::Error("r.yaml: rule 'x': input interface 'eth9' does not exist".into())
        );
        assert_eq!(
            answer("{\"cmd\":\"remove-rule\",\"name\":\"a\"}", &s, &r),
            Reply::Reloaded("removed a".into())
        );
        assert!(matches!(
            answer("{\"cmd\":\"remove-rule\"}", &s, &r),
            Reply::Error(_)
        ));
    }

    /// `reload` as old clients send it, with `--strict`, and the dry run (a command of its
    /// own, which an older relay refuses rather than reloading) reach the relay as the mode
    /// they ask for.
    #[test]
    fn reload_modes_reach_the_relay() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let r: Reloader = Arc::new(move |c| {
            record.lock().unwrap().push(c);
            Ok("ok".to_owned())
        });
        let s = snap();
        for line in [
            r#"{"cmd":"reload"}"#,
            r#"{"cmd":"reload","strict":true}"#,
            r#"{"cmd":"reload-dry-run"}"#,
            r#"{"cmd":"reload-dry-run","strict":true,"file":"/etc/relay/rules.yaml"}"#,
            r#"{"cmd":"add-rule","rule":"x","strict":true}"#,
        ] {
            assert_eq!(answer(line, &s, &r), Reply::Reloaded("ok".into()), "{line}");
        }
        let mode = |strict, dry_run, file: Option<&str>| {
            Change::Reload(ReloadMode {
                strict,
                dry_run,
                file: file.map(PathBuf::from),
            })
        };
        assert_eq!(
            *seen.lock().unwrap(),
            [
                mode(false, false, None),
                mode(true, false, None),
                mode(false, true, None),
                mode(true, true, Some("/etc/relay/rules.yaml")),
                Change::AddRule {
                    rule: "x".into(),
                    source: "the added rule".into(),
                    strict: true
                },
            ]
        );
    }

    /// A client that hung up is routine (logged at debug); other failures are warned about.
    #[test]
    fn a_client_that_went_away_is_told_from_other_failures() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::BrokenPipe,
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
        ] {
            let e = anyhow::Error::new(Error::from(kind)).context("writing the reply");
            assert!(went_away(&e), "{kind:?}");
        }
        for kind in [ErrorKind::WouldBlock, ErrorKind::InvalidData] {
            assert!(
                !went_away(&anyhow::Error::new(Error::from(kind))),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn serves_over_a_unix_socket_and_survives_abuse() {
        let dir = std::env::temp_dir().join(format!("relay-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _file = serve(&path, snap(), reloader()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // An oversized request, then a client that hangs up at once, then a good request.
        let long = UnixStream::connect(&path).unwrap();
        let _ = (&long).write_all(&vec![b'x'; MAX_REQUEST + 10]);
        let mut reply = String::new();
        BufReader::new(&long).read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than"), "{reply}");
        drop(UnixStream::connect(&path).unwrap());
        assert!(matches!(
            request(&path, &Request::Ping).unwrap(),
            Reply::Pong { .. }
        ));
        assert!(matches!(
            request(&path, &Request::Stats).unwrap(),
            Reply::Stats(_)
        ));
        // A second daemon on the same path is refused.
        assert!(serve(&path, snap(), reloader()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The socket file goes with the guard, whichever way the relay leaves; only the relay's
    /// own directory is created; a file that is not a socket is never replaced.
    #[test]
    fn the_socket_file_is_removed_and_other_files_are_left_alone() {
        let dir = std::env::temp_dir().join(format!("relay-ctl-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");

        // Bound, then dropped before serving (a start that fails half-way).
        let bound = bind(&path).unwrap();
        assert!(path.exists());
        drop(bound);
        assert!(
            !path.exists(),
            "dropping the unserved socket removes its file"
        );

        // Served, then the guard dropped (a normal stop).
        let file = serve(&path, snap(), reloader()).unwrap();
        assert_eq!(file.path(), path);
        assert!(path.exists());
        drop(file);
        assert!(!path.exists(), "dropping the guard removes the file");

        // A file that replaced ours under the same name is not ours to remove.
        let bound = bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        drop(bound);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");

        // ... nor to replace.
        let err = bind(&path).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "{} exists and is not a socket: the relay does not replace it",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");

        // A missing directory other than the relay's own is not created.
        let missing = dir.join("no-such-dir").join("c.sock");
        assert!(bind(&missing).is_err());
        assert!(!dir.join("no-such-dir").exists());
        assert!(in_own_directory(Path::new(DEFAULT_SOCKET)));
        assert!(in_own_directory(Path::new("/run/relay/other.sock")));
        assert!(!in_own_directory(&missing));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
