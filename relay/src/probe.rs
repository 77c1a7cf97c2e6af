//! Throw-away AF_XDP binds, for `relay --check`: on every queue the relay will bind, a small
//! UMEM of its own and one socket, bound as the relay would bind it and closed at once. That
//! finds out, without running the relay, what only a bind tells: whether the driver has
//! zero-copy AF_XDP, and whether another AF_XDP user (a running relay) holds the queue. No
//! XDP program is loaded for these sockets (libxdp's program loading is inhibited, as in the
//! data path), so nothing on the interface changes.
//!
//! The kernel gives a closed socket's queue back from a work queue, a moment later. On a
//! driver without zero-copy the probe waits for that ([`settle`]); elsewhere a start right
//! after a check may find a queue busy for a moment, and the data path waits (up to 3 s).

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use xsk_rs::{
    Socket, Umem,
    config::{
        BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfigBuilder, UmemConfig,
    },
};

use crate::{
    config::{BindMode, Config, ConfigError},
    rules::RuleTable,
};

/// Frames in a probe's UMEM, and the size of each of its rings: a bind needs no more.
const PROBE_FRAMES: u32 = 64;
const PROBE_RING: u32 = 64;
/// How long a busy queue is retried, as the data path does: a relay that just stopped (or a
/// check that just closed its probe) frees its queues from a kernel work queue.
const BUSY_RETRY: Duration = Duration::from_secs(3);

/// Why a bind failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindError {
    pub errno: Option<i32>,
    pub text: String,
}

impl BindError {
    fn from_socket(e: &xsk_rs::socket::SocketCreateError) -> Self {
        let source = std::error::Error::source(e);
        BindError {
            errno: source
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error),
            text: match source {
                Some(s) => s.to_string(),
                None => e.to_string(),
            },
        }
    }

    /// Why zero-copy failed, for a message.
    fn reason(&self) -> String {
        if self.errno == Some(libc::EOPNOTSUPP) {
            "the driver has copy mode only".to_owned()
        } else {
            self.text.clone()
        }
    }
}

/// How a throw-away bind went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Bound in zero-copy mode.
    ZeroCopy,
    /// Bound in copy mode; why zero-copy did not, when it was tried.
    Copy(Option<BindError>),
    /// Another AF_XDP socket holds the queue (EBUSY for as long as the start would wait).
    Busy,
    /// Bound in neither mode.
    Failed(BindError),
}

/// One socket the relay will open, and how its throw-away bind went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    pub iface: String,
    pub queue: u32,
    pub ingress: bool,
    pub outcome: Outcome,
}

/// The sockets the relay opens for `table`, in the order it binds them: each ingress rx
/// queue, then queue 0 of each egress that is not also an ingress (as the data path lists
/// them). `(interface, queue, ingress)`.
pub fn sockets(table: &RuleTable) -> Vec<(String, u32, bool)> {
    crate::datapath::wanted_sockets(table)
        .into_iter()
        .map(|(name, _, queue, ingress)| (name, queue, ingress))
        .collect()
}

/// A UMEM of the probe's own, and the rings of its sockets.
fn probe_umem(frame_size: u32) -> anyhow::Result<(Umem, QueueSize)> {
    let ring = QueueSize::new(PROBE_RING).map_err(|e| anyhow!("{e}"))?;
    let config = UmemConfig::builder()
        .frame_size(FrameSize::new(frame_size).map_err(|e| anyhow!("frame size: {e}"))?)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()
        .map_err(|e| anyhow!("UMEM config: {e}"))?;
    let frames = NonZeroU32::new(PROBE_FRAMES).expect("not zero");
    let (umem, _frames) = Umem::new(config, frames, false).map_err(|e| {
        anyhow!(
            "creating a UMEM to try AF_XDP binds with: {e}: {}",
            std::error::Error::source(&e).map_or_else(String::new, |s| s.to_string())
        )
    })?;
    Ok((umem, ring))
}

/// One bind of a socket on `umem` (the UMEM's first: libxdp makes the UMEM's own fd the
/// socket), deleted again at once. The queue stays held until the UMEM is dropped, which
/// closes that fd; the kernel then frees it from a work queue, a moment later.
fn bind_once(
    umem: &Umem,
    ring: QueueSize,
    iface: &Interface,
    queue: u32,
    flags: BindFlags,
) -> Result<(), BindError> {
    let config = SocketConfigBuilder::new()
        .rx_queue_size(ring)
        .tx_queue_size(ring)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(flags)
        .build();
    // SAFETY: the UMEM is the probe's own and shared with no other socket (a failed bind
    // leaves it unshared, and libxdp tracks which of its rings are set up, so a retry on it
    // is what the data path's fallback does), and the prog-load inhibit flag is set.
    match unsafe { Socket::new(config, umem, iface, queue) } {
        Ok(rings) => {
            drop(rings);
            Ok(())
        }
        Err(e) => Err(BindError::from_socket(&e)),
    }
}

const ZEROCOPY: BindFlags = BindFlags::XDP_ZEROCOPY.union(BindFlags::XDP_USE_NEED_WAKEUP);
const COPY: BindFlags = BindFlags::XDP_COPY.union(BindFlags::XDP_USE_NEED_WAKEUP);

fn busy(e: &BindError) -> bool {
    e.errno == Some(libc::EBUSY)
}

/// Binds a throw-away socket to `iface`'s `queue` as the relay binds its first socket in
/// `bind` mode (zero-copy first unless `bind: copy`, then copy), and closes it. A busy queue
/// is retried for as long as the start would. An error is one of this machine (no UMEM could
/// be made), not of the interface.
pub fn probe(iface: &str, queue: u32, bind: BindMode, frame_size: u32) -> anyhow::Result<Outcome> {
    let ifname: Interface = iface
        .parse()
        .map_err(|e| anyhow!("interface name {iface}: {e:?}"))?;
    let outcome = {
        let (umem, ring) = probe_umem(frame_size)?;
        let try_bind = |flags: BindFlags| {
            let deadline = Instant::now() + BUSY_RETRY;
            loop {
                match bind_once(&umem, ring, &ifname, queue, flags) {
                    Err(e) if busy(&e) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    other => return other,
                }
            }
        };
        let in_copy_mode = |zc_failed: Option<BindError>| match try_bind(COPY) {
            Ok(()) => Outcome::Copy(zc_failed),
            Err(e) if busy(&e) => Outcome::Busy,
            Err(e) => Outcome::Failed(e),
        };
        match bind {
            BindMode::Copy => in_copy_mode(None),
            // The kernel reports a held queue before it looks at the driver, so EBUSY here
            // means busy, whatever the driver can do.
            BindMode::Auto | BindMode::Zerocopy => match try_bind(ZEROCOPY) {
                Ok(()) => Outcome::ZeroCopy,
                Err(e) if busy(&e) => Outcome::Busy,
                Err(e) => in_copy_mode(Some(e)),
            },
        }
        // The UMEM closes here, and with it the socket's hold on the queue.
    };
    if let Outcome::Copy(Some(e)) = &outcome
        && e.errno == Some(libc::EOPNOTSUPP)
    {
        settle(&ifname, queue, frame_size);
    }
    Ok(outcome)
}

/// Waits (as long as a start would, at most) until the kernel has freed the queue that a
/// probe just closed, so that a start right after `--check` (the systemd unit's
/// `ExecStartPre`) finds it free. On a driver without zero-copy a zero-copy bind is a test
/// that holds nothing: the kernel refuses a held queue (EBUSY) before it asks the driver, and
/// undoes the registration itself when the driver then says no (EOPNOTSUPP). Drivers with
/// zero-copy have no such test, and there the start waits instead.
fn settle(iface: &Interface, queue: u32, frame_size: u32) {
    let Ok((umem, ring)) = probe_umem(frame_size) else {
        return;
    };
    let deadline = Instant::now() + BUSY_RETRY;
    while let Err(e) = bind_once(&umem, ring, iface, queue, ZEROCOPY) {
        if !busy(&e) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the relay would make of these binds, taken in the order it binds its sockets: the
/// first problem the start would meet is the error; otherwise notes worth printing.
///
/// With `bind: auto` the sockets whose drivers have zero-copy share a zero-copy UMEM and the
/// rest a copy-mode one (the kernel gives a socket that shares a UMEM the UMEM's mode, so
/// one UMEM cannot hold both); frames that cross between them are copied, and a note says so.
pub fn judge(file: &str, config: &Config, probes: &[Probed]) -> Result<Vec<String>, ConfigError> {
    let error = |rule: Option<String>, message: String| ConfigError {
        file: file.to_owned(),
        rule,
        message,
    };
    let rule_of = |p: &Probed| {
        config
            .rules
            .iter()
            .find(|r| {
                if p.ingress {
                    r.input.interface == p.iface
                } else {
                    r.outputs.iter().any(|o| o.interface == p.iface)
                }
            })
            .map(|r| r.name.clone())
    };
    let mut zero_copy: Option<bool> = None;
    let mut copy_only: Vec<(&str, String)> = Vec::new();
    for p in probes {
        let at = format!("{} queue {}", p.iface, p.queue);
        let side = if p.ingress { "input" } else { "output" };
        match &p.outcome {
            Outcome::Busy => {
                return Err(error(
                    rule_of(p),
                    format!(
                        "{side} interface {at} already has an AF_XDP socket bound: is another \
                         relay (or AF_XDP program) running on {}? Stop it, or remove {} from \
                         this config",
                        p.iface, p.iface
                    ),
                ));
            }
            Outcome::Failed(e) => {
                return Err(error(
                    rule_of(p),
                    format!(
                        "{side} interface {at}: an AF_XDP socket does not bind: {}",
                        e.text
                    ),
                ));
            }
            Outcome::ZeroCopy => {
                zero_copy.get_or_insert(true);
            }
            Outcome::Copy(why) => {
                let why = why
                    .as_ref()
                    .map_or_else(|| "not tried".to_owned(), BindError::reason);
                match config.bind {
                    BindMode::Zerocopy => {
                        return Err(error(
                            None,
                            format!(
                                "bind: zerocopy: {at} has no zero-copy AF_XDP ({why}): use \
                                 `bind: auto`, which falls back to copy mode, or `bind: copy`"
                            ),
                        ));
                    }
                    BindMode::Auto => {
                        if !copy_only.iter().any(|(i, _)| *i == p.iface) {
                            copy_only.push((&p.iface, why));
                        }
                    }
                    BindMode::Copy => {}
                }
            }
        }
    }
    let mut notes = Vec::new();
    if let Some((_, first_why)) = copy_only.first() {
        let names: Vec<&str> = copy_only.iter().map(|(i, _)| *i).collect();
        let what = if copy_only.iter().all(|(_, w)| w == first_why) {
            format!("{} ({first_why})", names.join(", "))
        } else {
            copy_only
                .iter()
                .map(|(i, w)| format!("{i} ({w})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if zero_copy == Some(true) {
            notes.push(format!(
                "bind: auto: no zero-copy AF_XDP on {what}: those sockets share a copy-mode \
                 UMEM beside the zero-copy one, and frames crossing between the two are copied \
                 (counted as cross_umem)"
            ));
        } else {
            notes.push(format!(
                "bind: auto: no zero-copy AF_XDP on {what}: the relay will run in copy mode"
            ));
        }
    }
    Ok(notes)
}

/// Binds a throw-away socket to every queue the relay will bind for `table`, in its order,
/// up to the first that fails, and judges the outcome ([`judge`]).
pub fn check(file: &str, config: &Config, table: &RuleTable) -> anyhow::Result<Vec<String>> {
    let mut probes = Vec::new();
    for (iface, queue, ingress) in sockets(table) {
        let outcome = probe(&iface, queue, config.bind, config.umem.frame_size)?;
        let fails = matches!(outcome, Outcome::Busy | Outcome::Failed(_));
        probes.push(Probed {
            iface,
            queue,
            ingress,
            outcome,
        });
        if fails {
            break;
        }
    }
    Ok(judge(file, config, &probes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::fake;

    const RULES: &str = "\
rules:
  - name: a
    input: {interface: in0, group: 239.1.1.1}
    outputs: [{interface: out0}, {interface: out1}]
  - name: b
    input: {interface: out1, group: 239.1.1.2}
    outputs: [{interface: out0}]
";

    fn config(bind: &str) -> Config {
        Config::parse("r.yaml", &format!("bind: {bind}\n{RULES}")).unwrap()
    }

    fn unsupported() -> BindError {
        BindError {
            errno: Some(libc::EOPNOTSUPP),
            text: "Operation not supported (os error 95)".to_owned(),
        }
    }

    fn probed(iface: &str, queue: u32, ingress: bool, outcome: Outcome) -> Probed {
        Probed {
            iface: iface.to_owned(),
            queue,
            ingress,
            outcome,
        }
    }

    /// The same sockets, in the same order, as the data path opens.
    #[test]
    fn sockets_are_every_ingress_queue_then_egress_queue_zero() {
        let mut sys = fake();
        sys.0.get_mut("in0").unwrap().rx_queues = 2;
        let table = RuleTable::compile(&config("auto"), "r.yaml", &sys).unwrap();
        assert_eq!(
            sockets(&table),
            vec![
                ("in0".to_owned(), 0, true),
                ("in0".to_owned(), 1, true),
                ("out1".to_owned(), 0, true),
                ("out0".to_owned(), 0, false),
            ]
        );
    }

    #[test]
    fn copy_only_drivers_are_a_note_in_auto_and_an_error_in_zerocopy() {
        let copy = || Outcome::Copy(Some(unsupported()));
        let probes = vec![
            probed("in0", 0, true, copy()),
            probed("in0", 1, true, copy()),
            probed("out1", 0, true, copy()),
            probed("out0", 0, false, copy()),
        ];
        assert_eq!(
            judge("r.yaml", &config("auto"), &probes).unwrap(),
            vec![
                "bind: auto: no zero-copy AF_XDP on in0, out1, out0 (the driver has copy mode \
                 only): the relay will run in copy mode"
            ]
        );
        assert_eq!(
            judge("r.yaml", &config("zerocopy"), &probes)
                .unwrap_err()
                .to_string(),
            "r.yaml: bind: zerocopy: in0 queue 0 has no zero-copy AF_XDP (the driver has copy \
             mode only): use `bind: auto`, which falls back to copy mode, or `bind: copy`"
        );
        let copy_mode: Vec<Probed> = probes
            .iter()
            .map(|p| Probed {
                outcome: Outcome::Copy(None),
                ..p.clone()
            })
            .collect();
        assert!(
            judge("r.yaml", &config("copy"), &copy_mode)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn zero_copy_everywhere_says_nothing() {
        let probes = vec![
            probed("in0", 0, true, Outcome::ZeroCopy),
            probed("out0", 0, false, Outcome::ZeroCopy),
        ];
        for bind in ["auto", "zerocopy"] {
            assert!(judge("r.yaml", &config(bind), &probes).unwrap().is_empty());
        }
    }

    /// A zero-copy NIC beside a copy-only device: each gets a UMEM of its mode, and the note
    /// says frames between them are copied, whichever binds first.
    #[test]
    fn auto_mixes_a_zero_copy_umem_and_a_copy_one() {
        let want = vec![
            "bind: auto: no zero-copy AF_XDP on out0 (the driver has copy mode only): those \
             sockets share a copy-mode UMEM beside the zero-copy one, and frames crossing \
             between the two are copied (counted as cross_umem)",
        ];
        let probes = vec![
            probed("in0", 0, true, Outcome::ZeroCopy),
            probed("out0", 0, false, Outcome::Copy(Some(unsupported()))),
        ];
        assert_eq!(judge("r.yaml", &config("auto"), &probes).unwrap(), want);
        let probes = vec![
            probed("out0", 0, false, Outcome::Copy(Some(unsupported()))),
            probed("in0", 0, true, Outcome::ZeroCopy),
        ];
        assert_eq!(judge("r.yaml", &config("auto"), &probes).unwrap(), want);
    }

    #[test]
    fn a_held_or_unbindable_queue_names_rule_interface_and_queue() {
        let probes = vec![
            probed("in0", 0, true, Outcome::Copy(Some(unsupported()))),
            probed("out1", 0, true, Outcome::Busy),
        ];
        assert_eq!(
            judge("r.yaml", &config("auto"), &probes)
                .unwrap_err()
                .to_string(),
            "r.yaml: rule 'b': input interface out1 queue 0 already has an AF_XDP socket \
             bound: is another relay (or AF_XDP program) running on out1? Stop it, or remove \
             out1 from this config"
        );
        let probes = vec![probed(
            "out0",
            0,
            false,
            Outcome::Failed(BindError {
                errno: Some(libc::EINVAL),
                text: "Invalid argument (os error 22)".to_owned(),
            }),
        )];
        assert_eq!(
            judge("r.yaml", &config("copy"), &probes)
                .unwrap_err()
                .to_string(),
            "r.yaml: rule 'a': output interface out0 queue 0: an AF_XDP socket does not bind: \
             Invalid argument (os error 22)"
        );
    }
}
