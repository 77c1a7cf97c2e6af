//! The client side of the command line: which control socket to talk to, and printing
//! what the relay answers, once or `--watch`ed.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    control::{self, Reply, Request},
    stats::StatsView,
};

/// The config file client commands read `control:` from unless told another.
pub const DEFAULT_CONFIG: &str = "/etc/relay/rules.yaml";

/// The control socket a client command talks to: `control` if given, else the `control:`
/// of the config file `config`, else the default socket. Only `control:` is read from the
/// file, so a file with a mistake elsewhere (one a reload would refuse) still names its
/// relay. A file that cannot be read is an error when it was `named` on the command line;
/// the default file may be missing (the default socket then).
pub fn control_path(control: Option<&Path>, config: &Path, named: bool) -> Result<PathBuf> {
    if let Some(c) = control {
        return Ok(c.to_path_buf());
    }
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(PathBuf::from(control::DEFAULT_SOCKET));
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "{}: cannot read it to find the relay's control socket (or give --control)",
                    config.display()
                )
            });
        }
    };
    control_in(&config.display().to_string(), &text)
}

/// The `control:` of a config file's text, or the default socket when it has none.
pub fn control_in(file: &str, yaml: &str) -> Result<PathBuf> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml)
        .with_context(|| format!("{file}: not YAML, so it names no control socket"))?;
    match doc.get("control") {
        None | Some(serde_yaml::Value::Null) => Ok(PathBuf::from(control::DEFAULT_SOCKET)),
        Some(serde_yaml::Value::String(path)) => Ok(PathBuf::from(path)),
        Some(other) => bail!(
            "{file}: control: `{}` is not a path",
            serde_json::to_string(other).unwrap_or_default()
        ),
    }
}

/// How `relay stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Table,
    Json,
}

/// Which view a command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Stats { show: Show, groups: bool },
    Rules { json: bool },
    Members { json: bool },
}

/// Standard output closed under the client (`relay stats --watch | head`): the reader has
/// what it wanted, so the command ends quietly, successfully ([`stdout_closed`]).
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Whether `e` is [`StdoutClosed`], under whatever context was added to it. A broken pipe
/// to the relay is not: that one is an error.
pub fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// A failed write to standard output: [`StdoutClosed`] for a closed pipe.
fn to_stdout_failed(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// Writes `text` to standard output, now.
fn print_now(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(to_stdout_failed)
}

/// Set by SIGINT and SIGTERM while a `--watch` runs.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set [`STOP`] instead of ending the process. Without SA_RESTART, so a
/// blocking read returns (EINTR) and the loop around it sees the flag.
fn stop_on_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and the
        // sigaction struct is fully initialised (zeroed, then the handler set).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}

/// `relay capture`: asks the relay to capture what `filter` names (`count` frames at most),
/// and writes the pcapng stream it sends to `output` (`-`: standard output) as it comes.
/// Ctrl-C shuts the request's side of the connection down; the relay then ends the stream
/// after a whole block, and the file is read to its end, so it is never cut mid-frame.
pub fn capture(
    path: &Path,
    filter: crate::capture::Filter,
    count: Option<u64>,
    output: &Path,
) -> Result<ExitCode> {
    let to_stdout = output.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        bail!(
            "-w -: standard output is a terminal; pipe it (`relay capture -w - | tcpdump -r -`) \
             or give a file"
        );
    }
    if count == Some(0) {
        bail!("--count 0: give at least 1 frame");
    }
    let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is the relay running, and are you root?)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_string(&Request::Capture { filter, count })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    // The reply line, read a byte at a time so nothing of the stream after it is consumed.
    let mut reply = Vec::new();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match std::io::Read::read(&mut &stream, &mut byte)? {
            0 => bail!("the relay closed the connection without answering"),
            _ => reply.push(byte[0]),
        }
    }
    let what = match serde_json::from_slice(&reply)
        .with_context(|| format!("reply: {}", String::from_utf8_lossy(&reply)))?
    {
        Reply::Capturing(what) => what,
        Reply::Error(e) => bail!("the relay refused the capture: {e}"),
        other => bail!("the relay answered {other:?} to a capture"),
    };
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(output)
                .with_context(|| format!("creating {}", output.display()))?,
        )
    };
    stop_on_signals()?;
    eprintln!("capturing {what}; Ctrl-C stops");
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut stopping = false;
    let mut bytes = 0u64;
    loop {
        if !stopping && STOP.load(Ordering::Relaxed) {
            stopping = true;
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        match std::io::Read::read(&mut &stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
                    return Err(if to_stdout {
                        to_stdout_failed(e)
                    } else {
                        anyhow::Error::new(e).context(format!("writing {}", output.display()))
                    });
                }
                bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("reading the capture"),
        }
    }
    eprintln!(
        "capture ended: {bytes} bytes of pcapng written to {}",
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn counters(path: &Path) -> Result<StatsView> {
    match control::request(path, &Request::Stats)? {
        Reply::Stats(v) => Ok(*v),
        Reply::Error(e) => bail!("the relay refused the request: {e}"),
        other => bail!("the relay answered {other:?} to a request for its counters"),
    }
}

/// Prints `view` once, or every `watch` seconds (`count` times at most) until Ctrl-C.
pub fn show(path: &Path, view: View, watch: Option<f64>, count: Option<u64>) -> Result<ExitCode> {
    let Some(seconds) = watch else {
        print_now(&once(&counters(path)?, view)?)?;
        return Ok(ExitCode::SUCCESS);
    };
    if !(seconds.is_finite() && seconds >= 0.1) {
        bail!("--watch {seconds}: give an interval of at least 0.1 seconds");
    }
    stop_on_signals()?;
    let redraw = std::io::stdout().is_terminal();
    let interval = Duration::from_secs_f64(seconds);
    let mut before = (Instant::now(), counters(path)?);
    let mut shown = 0;
    while count.is_none_or(|n| shown < n) {
        let due = before.0 + interval;
        while Instant::now() < due {
            if STOP.load(Ordering::Relaxed) {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
        }
        let now = (Instant::now(), counters(path)?);
        let text = match view {
            View::Stats { show, .. } => {
                let rates = crate::rates::rates(
                    &before.1,
                    &now.1,
                    now.0.duration_since(before.0).as_secs_f64(),
                );
                match show {
                    Show::Json => format!("{}\n", serde_json::to_string(&rates)?),
                    Show::Table => format!(
                        "{}{}",
                        now.1.render_header(crate::stats::own_netns().as_deref()),
                        rates.render()
                    ),
                }
            }
            _ => once(&now.1, view)?,
        };
        if redraw {
            // Home, the new block, then clear what the last one left below it: no flicker.
            print_now(&format!("\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n")))?;
        } else if matches!(
            view,
            View::Stats {
                show: Show::Json,
                ..
            }
        ) {
            print_now(&text)?;
        } else {
            print_now(&format!("{text}\n"))?;
        }
        before = now;
        shown += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// What one answer prints as.
fn once(v: &StatsView, view: View) -> Result<String> {
    Ok(match view {
        View::Stats { show, groups } => {
            let v = if groups {
                v.clone()
            } else {
                v.clone().without_groups()
            };
            match show {
                Show::Json => format!("{}\n", serde_json::to_string_pretty(&v)?),
                Show::Table => v.render_table(),
            }
        }
        View::Rules { json: true } => {
            format!("{}\n", serde_json::to_string_pretty(&v.rules)?)
        }
        View::Rules { json: false } => v.render_rules(),
        View::Members { json: true } => {
            format!("{}\n", serde_json::to_string_pretty(&v.queriers)?)
        }
        View::Members { json: false } => v.render_members(),
    })
}

/// `relay reload --dry-run`: asks the relay what a reload would change and prints its answer;
/// a reload it would refuse is the error.
pub fn dry_run(path: &Path, req: &Request) -> Result<ExitCode> {
    match control::request(path, req)? {
        Reply::Reloaded(what) => println!("{what}"),
        Reply::Error(e) => bail!("a reload would be refused: {e}"),
        other => bail!("the relay answered {other:?} to a dry run"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only standard output closed under the client ends it quietly; a broken pipe to the
    /// relay, or another failure to write, is an error.
    #[test]
    fn only_a_closed_standard_output_is_quiet() {
        use std::io::{Error, ErrorKind};
        let closed = to_stdout_failed(Error::from(ErrorKind::BrokenPipe)).context("--watch");
        assert!(stdout_closed(&closed));
        let full = to_stdout_failed(Error::from(ErrorKind::StorageFull));
        assert!(!stdout_closed(&full));
        assert!(format!("{full:#}").starts_with("writing to standard output: "));
        let relay = anyhow::Error::new(Error::from(ErrorKind::BrokenPipe)).context("the relay");
        assert!(!stdout_closed(&relay));
    }

    #[test]
    fn the_socket_comes_from_the_command_line_then_the_file() {
        let dir = std::env::temp_dir().join(format!("relay-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        // A file with a mistake elsewhere still names its socket.
        std::fs::write(&file, "control: /run/relay-a/relay.sock\nrules: 7\n").unwrap();
        assert_eq!(
            control_path(None, &file, true).unwrap(),
            Path::new("/run/relay-a/relay.sock")
        );
        assert_eq!(
            control_path(Some(Path::new("/tmp/x.sock")), &file, true).unwrap(),
            Path::new("/tmp/x.sock")
        );
        std::fs::write(&file, "rules: []\n").unwrap();
        assert_eq!(
            control_path(None, &file, true).unwrap(),
            Path::new(control::DEFAULT_SOCKET)
        );
        let missing = dir.join("missing.yaml");
        assert_eq!(
            control_path(None, &missing, false).unwrap(),
            Path::new(control::DEFAULT_SOCKET),
            "the default file may be missing"
        );
        let e = format!("{:#}", control_path(None, &missing, true).unwrap_err());
        assert!(
            e.starts_with(&format!("{}: cannot read it", missing.display())),
            "{e}"
        );
        let e = format!(
            "{:#}",
            control_in("r.yaml", "control: [1, 2]\n").unwrap_err()
        );
        assert_eq!(e, "r.yaml: control: `[1,2]` is not a path");
        let e = format!("{:#}", control_in("r.yaml", "control: [\n").unwrap_err());
        assert!(e.starts_with("r.yaml: not YAML"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
