//! `relay capture`: copies of the frames the data path receives and sends, for the operator
//! who cannot see them with tcpdump (XDP takes them before the packet taps, and copy-mode
//! AF_XDP transmit goes straight to the driver).
//!
//! The workers see a [`Tap`]. While no capture runs it costs them one relaxed load per
//! received batch. While one runs, each worker copies the frames its [`Filter`] wants into a
//! bounded lock-free queue and never waits on it: a frame that finds the queue full is not
//! captured and counted (`capture_dropped`). A thread of the control socket empties the
//! queue into the client's connection as pcapng ([`stream`]), at whatever pace the client
//! reads.

use std::{
    borrow::Cow,
    io::{BufWriter, Write},
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use crossbeam_queue::ArrayQueue;
use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};
use serde::{Deserialize, Serialize};

use crate::rules::{CompiledRule, RuleTable};

/// Captured frames waiting for the client, at most: about 6 MB of 1500-byte frames, a few
/// milliseconds of a busy relay, enough to ride out a client's short stalls.
pub const QUEUE_FRAMES: usize = 4096;

/// Which frames a capture takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Frames of this rule only.
    pub rule: Option<String>,
    /// Frames sent on this interface, and the received frames of rules with an output there.
    pub output: Option<String>,
}

impl Filter {
    /// Refuses a filter that names a rule or interface the running rules do not have: it
    /// would capture nothing, and the operator most likely mistyped it.
    pub fn check(&self, table: &RuleTable) -> Result<(), String> {
        let rule =
            match &self.rule {
                Some(name) => Some(table.rules.iter().find(|r| r.name == *name).ok_or_else(
                    || format!("no rule named '{name}' is running (see `relay rules`)"),
                )?),
                None => None,
            };
        if let Some(iface) = &self.output {
            if !table.egress.iter().any(|e| e.name == *iface) {
                return Err(format!(
                    "no rule has an output on interface '{iface}' (see `relay rules`)"
                ));
            }
            if let Some(rule) = rule
                && !sends_on(rule, table, iface)
            {
                return Err(format!(
                    "rule '{}' has no output on interface '{iface}'",
                    rule.name
                ));
            }
        }
        Ok(())
    }

    /// Whether the frames `rule` receives are wanted.
    pub fn wants_received(&self, rule: &CompiledRule, table: &RuleTable) -> bool {
        self.rule.as_ref().is_none_or(|r| *r == rule.name)
            && self
                .output
                .as_ref()
                .is_none_or(|iface| sends_on(rule, table, iface))
    }

    /// Whether the frames `rule` sends on interface `egress` are wanted.
    pub fn wants_sent(&self, rule: &CompiledRule, egress: &str) -> bool {
        self.rule.as_ref().is_none_or(|r| *r == rule.name)
            && self.output.as_ref().is_none_or(|iface| iface == egress)
    }

    /// What the capture takes, in words.
    pub fn describe(&self) -> String {
        match (&self.rule, &self.output) {
            (None, None) => "every rule's frames".to_owned(),
            (Some(r), None) => format!("rule '{r}'"),
            (None, Some(o)) => format!("output '{o}'"),
            (Some(r), Some(o)) => format!("rule '{r}' on output '{o}'"),
        }
    }
}

fn sends_on(rule: &CompiledRule, table: &RuleTable, iface: &str) -> bool {
    rule.outputs
        .iter()
        .any(|o| table.egress.get(o.egress).is_some_and(|e| e.name == iface))
}

/// Which way a captured frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    /// The pcapng `epb_flags` word: bits 0-1 are the direction (01 inbound, 10 outbound).
    pub fn epb_flags(self) -> u32 {
        match self {
            Direction::Inbound => 0b01,
            Direction::Outbound => 0b10,
        }
    }
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Since the Unix epoch.
    pub at: Duration,
    pub direction: Direction,
    pub ifindex: u32,
    pub data: Vec<u8>,
}

/// A running capture: what it takes, and the queue the workers put it in.
pub struct Session {
    pub filter: Filter,
    queue: ArrayQueue<Captured>,
}

impl Session {
    pub fn new(filter: Filter, capacity: usize) -> Self {
        Session {
            filter,
            queue: ArrayQueue::new(capacity),
        }
    }

    /// Queues a copy of `frame`, or returns false (the frame is not captured) when the queue
    /// is full. Never waits; the copy is made only when there is room for it.
    pub fn offer(&self, direction: Direction, ifindex: u32, frame: &[u8]) -> bool {
        if self.queue.is_full() {
            return false;
        }
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.queue
            .push(Captured {
                at,
                direction,
                ifindex,
                data: frame.to_vec(),
            })
            .is_ok()
    }

    pub fn pop(&self) -> Option<Captured> {
        self.queue.pop()
    }

    /// Frames waiting in the queue.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// What the workers look at: whether a capture runs, and which.
#[derive(Default)]
pub struct Tap {
    /// Read relaxed by every worker once per received batch: the whole cost of the tap while
    /// no capture runs.
    active: AtomicBool,
    session: Mutex<Option<Arc<Session>>>,
}

impl Tap {
    /// The running capture, if any (for one batch of frames).
    #[inline]
    pub fn current(&self) -> Option<Arc<Session>> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a capture; one runs at a time. It runs until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, filter: Filter, capacity: usize) -> Result<Capture, String> {
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(
                "a capture is already running (one at a time): stop it (Ctrl-C) first".to_owned(),
            );
        }
        let session = Arc::new(Session::new(filter, capacity));
        *slot = Some(session.clone());
        self.active.store(true, Ordering::Relaxed);
        Ok(Capture {
            tap: self.clone(),
            session,
        })
    }
}

/// A running capture; dropping it stops it. Workers that took it up for the batch they are
/// in finish that batch into its queue, which goes when the last of them lets it go.
pub struct Capture {
    tap: Arc<Tap>,
    pub session: Arc<Session>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let mut slot = self.tap.session.lock().unwrap_or_else(|p| p.into_inner());
        self.tap.active.store(false, Ordering::Relaxed);
        *slot = None;
    }
}

/// Writes captured frames as pcapng: the section header first, then an interface description
/// block for each interface as it first appears (named, with nanosecond timestamps), and an
/// enhanced packet block per frame with its direction in `epb_flags`.
pub struct PcapngStream<W: Write> {
    writer: PcapNgWriter<W>,
    /// The ifindex of each interface described so far, by pcapng interface id.
    interfaces: Vec<u32>,
    name_of: fn(u32) -> String,
}

/// An interface's name now, for its description block.
pub fn interface_name(ifindex: u32) -> String {
    crate::sys::ifindex_name(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}"))
}

impl<W: Write> PcapngStream<W> {
    pub fn new(out: W, name_of: fn(u32) -> String) -> std::io::Result<Self> {
        Ok(PcapngStream {
            writer: PcapNgWriter::new(out).map_err(pcap_error)?,
            interfaces: Vec::new(),
            name_of,
        })
    }

    pub fn write(&mut self, frame: &Captured) -> std::io::Result<()> {
        let id = match self.interfaces.iter().position(|&i| i == frame.ifindex) {
            Some(id) => id,
            None => {
                let idb = InterfaceDescriptionBlock {
                    linktype: DataLink::ETHERNET,
                    snaplen: 0,
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Owned((self.name_of)(
                            frame.ifindex,
                        ))),
                        // The timestamps are written in nanoseconds.
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                };
                self.writer.write_pcapng_block(idb).map_err(pcap_error)?;
                self.interfaces.push(frame.ifindex);
                self.interfaces.len() - 1
            }
        };
        let epb = EnhancedPacketBlock {
            interface_id: id as u32,
            timestamp: frame.at,
            original_len: frame.data.len() as u32,
            data: Cow::Borrowed(&frame.data),
            options: vec![EnhancedPacketOption::Flags(frame.direction.epb_flags())],
        };
        self.writer.write_pcapng_block(epb).map_err(pcap_error)?;
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        self.writer.get_mut()
    }
}

fn pcap_error(e: pcap_file::PcapError) -> std::io::Error {
    match e {
        pcap_file::PcapError::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Captured frames written out at most per write, so that a busy capture still looks for the
/// client going away.
const WRITE_BATCH: usize = 256;

/// Streams a capture to a client as pcapng until `count` frames are written (if given) or the
/// client goes away (hangs up, or shuts its side down: `relay capture` does on Ctrl-C, and
/// then reads to the end, so its file ends with a whole block). The capture stops when this
/// returns. Returns the frames written.
pub fn stream(capture: Capture, out: &UnixStream, count: Option<u64>) -> std::io::Result<u64> {
    let mut pcap = PcapngStream::new(BufWriter::new(out), interface_name)?;
    pcap.get_mut().flush()?;
    let mut written = 0u64;
    // Writes up to `most` queued frames (fewer if the count is reached); false once it is.
    let mut write_queued = |most: usize, written: &mut u64| -> std::io::Result<(usize, bool)> {
        let mut moved = 0;
        while moved < most {
            if count.is_some_and(|n| *written >= n) {
                pcap.get_mut().flush()?;
                return Ok((moved, false));
            }
            let Some(frame) = capture.session.pop() else {
                break;
            };
            pcap.write(&frame)?;
            *written += 1;
            moved += 1;
        }
        pcap.get_mut().flush()?;
        Ok((moved, true))
    };
    loop {
        let (moved, more) = write_queued(WRITE_BATCH, &mut written)?;
        if !more {
            return Ok(written);
        }
        // Nothing waiting: sleep a little on the socket, which also says when the client
        // went away. Otherwise just look.
        let wait_ms = if moved == 0 { 20 } else { 0 };
        if client_gone(out, wait_ms) {
            // What was captured before the client said stop is still written (a client
            // that is really gone fails the write, which ends this as well): the frames
            // queued now, and no more.
            write_queued(capture.session.len(), &mut written)?;
            return Ok(written);
        }
    }
}

/// Whether the client hung up or shut down its side, waiting up to `wait_ms` to see.
fn client_gone(stream: &UnixStream, wait_ms: i32) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid, initialised pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, wait_ms) };
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StaticSystem};
    use pcap_file::pcapng::{Block, PcapNgReader};

    fn table() -> RuleTable {
        let yaml = "\
rules:
  - name: a
    input: { interface: in0, group: 239.1.1.1, port: 5000 }
    outputs:
      - interface: out0
      - interface: out1
        group: 239.2.2.2
  - name: b
    input: { interface: in0, group: 239.1.1.2, port: 5000 }
    outputs:
      - interface: out1
";
        let cfg = Config::parse("r.yaml", yaml).unwrap();
        let system = StaticSystem::new(&[("in0", 10), ("out0", 11), ("out1", 12)]);
        RuleTable::compile(&cfg, "r.yaml", &system).unwrap()
    }

    fn filter(rule: Option<&str>, output: Option<&str>) -> Filter {
        Filter {
            rule: rule.map(str::to_owned),
            output: output.map(str::to_owned),
        }
    }

    #[test]
    fn a_filter_naming_what_does_not_run_is_refused_with_the_name() {
        let t = table();
        assert_eq!(filter(None, None).check(&t), Ok(()));
        assert_eq!(filter(Some("a"), Some("out0")).check(&t), Ok(()));
        assert_eq!(
            filter(Some("nope"), None).check(&t),
            Err("no rule named 'nope' is running (see `relay rules`)".to_owned())
        );
        assert_eq!(
            filter(None, Some("in0")).check(&t),
            Err("no rule has an output on interface 'in0' (see `relay rules`)".to_owned())
        );
        assert_eq!(
            filter(Some("b"), Some("out0")).check(&t),
            Err("rule 'b' has no output on interface 'out0'".to_owned())
        );
    }

    #[test]
    fn a_filter_takes_its_rules_frames_and_its_outputs_frames() {
        let t = table();
        let (a, b) = (&t.rules[0], &t.rules[1]);
        let all = filter(None, None);
        assert!(all.wants_received(a, &t) && all.wants_received(b, &t));
        assert!(all.wants_sent(a, "out0") && all.wants_sent(b, "out1"));

        let rule_a = filter(Some("a"), None);
        assert!(rule_a.wants_received(a, &t));
        assert!(!rule_a.wants_received(b, &t));
        assert!(rule_a.wants_sent(a, "out0") && rule_a.wants_sent(a, "out1"));
        assert!(!rule_a.wants_sent(b, "out1"));

        // Received frames of the rules that send there; sent frames on it only.
        let out0 = filter(None, Some("out0"));
        assert!(out0.wants_received(a, &t));
        assert!(!out0.wants_received(b, &t));
        assert!(out0.wants_sent(a, "out0"));
        assert!(!out0.wants_sent(a, "out1"));
        assert!(!out0.wants_sent(b, "out1"));

        let both = filter(Some("a"), Some("out1"));
        assert!(both.wants_received(a, &t) && !both.wants_received(b, &t));
        assert!(both.wants_sent(a, "out1"));
        assert!(!both.wants_sent(a, "out0") && !both.wants_sent(b, "out1"));
    }

    #[test]
    fn a_full_queue_refuses_and_one_capture_runs_at_a_time() {
        let tap = Arc::new(Tap::default());
        assert!(tap.current().is_none());
        let capture = tap.start(Filter::default(), 2).unwrap();
        let session = tap
            .current()
            .expect("the capture is visible to the workers");
        assert!(Arc::ptr_eq(&session, &capture.session));
        assert_eq!(
            tap.start(Filter::default(), 2).err().unwrap(),
            "a capture is already running (one at a time): stop it (Ctrl-C) first"
        );
        assert!(session.offer(Direction::Inbound, 1, &[1]));
        assert!(session.offer(Direction::Outbound, 2, &[2]));
        assert!(
            !session.offer(Direction::Inbound, 1, &[3]),
            "the queue holds 2"
        );
        assert_eq!(session.pop().unwrap().data, vec![1]);
        assert!(session.offer(Direction::Inbound, 1, &[3]));
        drop(capture);
        assert!(tap.current().is_none(), "dropping the capture stops it");
        assert!(
            tap.start(Filter::default(), 2).is_ok(),
            "and frees the slot"
        );
    }

    fn names(ifindex: u32) -> String {
        format!("if{ifindex}")
    }

    /// What pcapng writing puts down, read back with the crate's reader: one description
    /// block per interface, named, in nanoseconds; each frame whole, with its time and
    /// direction.
    #[test]
    fn pcapng_round_trips_frames_interfaces_and_directions() {
        let frames = [
            Captured {
                at: Duration::new(1_700_000_000, 123_456_789),
                direction: Direction::Inbound,
                ifindex: 7,
                data: (0..60).collect(),
            },
            Captured {
                at: Duration::new(1_700_000_000, 123_456_999),
                direction: Direction::Outbound,
                ifindex: 9,
                data: (0..61).rev().collect(),
            },
            Captured {
                at: Duration::new(1_700_000_001, 0),
                direction: Direction::Outbound,
                ifindex: 7,
                data: vec![0xab; 1514],
            },
        ];
        let mut out = PcapngStream::new(Vec::new(), names).unwrap();
        for f in &frames {
            out.write(f).unwrap();
        }
        let bytes = std::mem::take(out.get_mut());
        let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
        let mut interfaces = Vec::new();
        let mut packets = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.unwrap() {
                Block::InterfaceDescription(idb) => {
                    assert_eq!(idb.linktype, DataLink::ETHERNET);
                    interfaces.push(
                        idb.options
                            .clone()
                            .into_iter()
                            .map(|o| o.into_owned())
                            .collect::<Vec<_>>(),
                    );
                }
                Block::EnhancedPacket(epb) => packets.push((
                    epb.interface_id,
                    epb.timestamp,
                    epb.original_len,
                    epb.data.to_vec(),
                    epb.options
                        .clone()
                        .into_iter()
                        .map(|o| o.into_owned())
                        .collect::<Vec<_>>(),
                )),
                other => panic!("unexpected block {other:?}"),
            }
        }
        assert_eq!(
            interfaces,
            vec![
                vec![
                    InterfaceDescriptionOption::IfName("if7".into()),
                    InterfaceDescriptionOption::IfTsResol(9)
                ],
                vec![
                    InterfaceDescriptionOption::IfName("if9".into()),
                    InterfaceDescriptionOption::IfTsResol(9)
                ],
            ]
        );
        let expected: Vec<_> = frames
            .iter()
            .zip([0, 1, 0])
            .map(|(f, id)| {
                (
                    id,
                    f.at,
                    f.data.len() as u32,
                    f.data.clone(),
                    vec![EnhancedPacketOption::Flags(f.direction.epb_flags())],
                )
            })
            .collect();
        assert_eq!(packets, expected);
    }

    /// The stream ends at the count, with whole blocks, and the capture with it.
    #[test]
    fn a_stream_stops_at_its_count_and_ends_the_capture() {
        let tap = Arc::new(Tap::default());
        let capture = tap.start(Filter::default(), 16).unwrap();
        for i in 0..5u8 {
            assert!(capture.session.offer(Direction::Inbound, 1, &[i; 64]));
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert_eq!(stream(capture, &ours, Some(3)).unwrap(), 3);
        drop(ours);
        assert!(tap.current().is_none());
        let mut reader = PcapNgReader::new(theirs).unwrap();
        let mut seen = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Block::EnhancedPacket(epb) = block.unwrap() {
                seen.push(epb.data[0]);
            }
        }
        assert_eq!(seen, vec![0, 1, 2]);
    }

    /// A client that shuts its side down ends the stream (Ctrl-C on `relay capture`).
    #[test]
    fn a_stream_ends_when_the_client_shuts_down() {
        let tap = Arc::new(Tap::default());
        let capture = tap.start(Filter::default(), 16).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(stream(capture, &ours, None).unwrap(), 0);
        assert!(tap.current().is_none());

        // What was queued before the client said stop is still written.
        let capture = tap.start(Filter::default(), 16).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert!(capture.session.offer(Direction::Inbound, 1, &[7; 64]));
        assert!(capture.session.offer(Direction::Outbound, 1, &[8; 64]));
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(stream(capture, &ours, None).unwrap(), 2);
        drop(ours);
        let mut reader = PcapNgReader::new(&theirs).unwrap();
        let mut seen = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Block::EnhancedPacket(epb) = block.unwrap() {
                seen.push(epb.data[0]);
            }
        }
        assert_eq!(seen, vec![7, 8]);
    }
}
