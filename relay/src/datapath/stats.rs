//! What the data path counts. Each worker keeps its own copy, written by that thread alone, and
//! the copies are summed when read: no lock and no shared cache line on the fast path.

/// Counters of one output of one rule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputCounters {
    pub packets: u64,
    pub bytes: u64,
    pub ttl_expired: u64,
    pub no_frame: u64,
    pub tx_ring_full: u64,
    /// The worker that transmits on this output had no room to take the frame.
    pub handoff_full: u64,
    pub malformed: u64,
    /// Larger than the egress interface's MTU.
    pub too_large: u64,
    /// The egress interface was down (or gone).
    pub interface_down: u64,
    /// A unicast output's next hop had no neighbour (ARP/ND) entry yet: the kernel was asked
    /// to resolve one.
    pub no_neighbour: u64,
    /// `source: auto` on an interface with no address of the rule's family at the time.
    pub no_source: u64,
    /// Frames an on-demand output did not send because no listener wanted them then: the
    /// output doing its job, not a loss, so not part of [`OutputCounters::dropped`].
    pub no_listener: u64,
}

impl OutputCounters {
    pub fn dropped(&self) -> u64 {
        self.ttl_expired
            + self.no_frame
            + self.tx_ring_full
            + self.handoff_full
            + self.malformed
            + self.too_large
            + self.interface_down
            + self.no_neighbour
            + self.no_source
    }

    fn add(&mut self, o: &OutputCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.ttl_expired += o.ttl_expired;
        self.no_frame += o.no_frame;
        self.tx_ring_full += o.tx_ring_full;
        self.handoff_full += o.handoff_full;
        self.malformed += o.malformed;
        self.too_large += o.too_large;
        self.interface_down += o.interface_down;
        self.no_neighbour += o.no_neighbour;
        self.no_source += o.no_source;
        self.no_listener += o.no_listener;
    }
}

/// The kernel's counters of one AF_XDP socket (XDP_STATISTICS), as its worker last read
/// them: frames the kernel dropped before the relay saw them, which no other counter shows.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketCounters {
    pub interface: String,
    pub queue: u32,
    /// Bound to an ingress queue the XDP program redirects to (else it only transmits).
    pub ingress: bool,
    /// Dropped for other reasons than a full RX ring (in copy mode: no fill frame).
    pub rx_dropped: u64,
    /// Dropped because the RX ring was full: the worker did not keep up.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty: frames it had nowhere to put.
    pub fill_ring_empty: u64,
    pub rx_invalid: u64,
    pub tx_invalid: u64,
}

impl SocketCounters {
    /// The counters as `(name, value)`, in the order every view prints them.
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("rx_dropped", self.rx_dropped),
            ("rx_ring_full", self.rx_ring_full),
            ("fill_ring_empty", self.fill_ring_empty),
            ("rx_invalid", self.rx_invalid),
            ("tx_invalid", self.tx_invalid),
        ]
    }

    pub fn from_kernel(
        interface: &str,
        queue: u32,
        ingress: bool,
        st: &xsk_rs::socket::XdpStatistics,
    ) -> Self {
        SocketCounters {
            interface: interface.to_owned(),
            queue,
            ingress,
            rx_dropped: st.rx_dropped(),
            rx_ring_full: st.rx_ring_full(),
            fill_ring_empty: st.rx_fill_ring_empty_descs(),
            rx_invalid: st.rx_invalid_descs(),
            tx_invalid: st.tx_invalid_descs(),
        }
    }
}

/// One line per (interface, queue), sorted. A queue can have had more than one socket (a
/// device deleted and created again under the same name): each socket's kernel counters
/// start at zero, so the line is their sum, and an ingress as soon as one of them is.
pub fn merge_sockets(sockets: impl IntoIterator<Item = SocketCounters>) -> Vec<SocketCounters> {
    let mut out: Vec<SocketCounters> = Vec::new();
    for s in sockets {
        match out
            .iter_mut()
            .find(|o| o.interface == s.interface && o.queue == s.queue)
        {
            Some(o) => {
                o.ingress |= s.ingress;
                o.rx_dropped += s.rx_dropped;
                o.rx_ring_full += s.rx_ring_full;
                o.fill_ring_empty += s.fill_ring_empty;
                o.rx_invalid += s.rx_invalid;
                o.tx_invalid += s.tx_invalid;
            }
            None => out.push(s),
        }
    }
    out.sort_by(|a, b| (&a.interface, a.queue).cmp(&(&b.interface, b.queue)));
    out
}

/// Counters of one rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuleCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Received frames whose partial UDP checksum (a sender's transmit offload, over a veth)
    /// the data path completed before sending them on.
    pub checksum_completed: u64,
    pub outputs: Vec<OutputCounters>,
    /// For a rule with a group range: its busiest groups, in bounded memory.
    pub groups: crate::topgroups::TopGroups,
    /// For a merged rule: what the merge decided (empty until its first frame).
    pub merge: MergeCounters,
}

/// What a merged rule's data path counted: per leg, and of the merge as a whole.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MergeCounters {
    /// Indexed by leg; grown to the leg a frame arrived on.
    pub legs: Vec<LegCounters>,
    /// Frames without a sequence number the merge can read (not RTP version 2, too short
    /// for the counter, a fragment): dropped, never relayed.
    pub malformed: u64,
    /// Sequence numbers jumped over by a relayed packet (below or above those relayed)...
    pub holes_opened: u64,
    /// ... and those of them a later packet filled: the difference is what no leg carried.
    pub holes_filled: u64,
    /// RTCP on an RTP merge: no part of the merged stream, dropped.
    pub rtcp: u64,
    /// Times a leg brought a new SSRC first: the merge started over with a new stream.
    pub new_streams: u64,
    /// Packets of a leg still on the SSRC the merge left: dropped.
    pub stale: u64,
}

/// One leg of a merged rule.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LegCounters {
    /// Packets with a sequence number that arrived on this leg.
    pub received: u64,
    /// Of those, relayed: no leg had brought their number within the window.
    pub first: u64,
    /// Of those, dropped: another leg (or this one) had.
    pub duplicate: u64,
    /// Sequence numbers this leg skipped.
    pub gaps: u64,
}

impl MergeCounters {
    /// The counters of leg `leg`.
    pub fn leg(&mut self, leg: usize) -> &mut LegCounters {
        if self.legs.len() <= leg {
            self.legs.resize(leg + 1, LegCounters::default());
        }
        &mut self.legs[leg]
    }

    /// Sequence numbers no leg carried (so far: a late one may still fill one).
    pub fn lost(&self) -> u64 {
        self.holes_opened.saturating_sub(self.holes_filled)
    }

    /// Packets the merge let through.
    pub fn relayed(&self) -> u64 {
        self.legs.iter().map(|l| l.first).sum()
    }

    pub fn add(&mut self, o: &MergeCounters) {
        for (i, l) in o.legs.iter().enumerate() {
            let m = self.leg(i);
            m.received += l.received;
            m.first += l.first;
            m.duplicate += l.duplicate;
            m.gaps += l.gaps;
        }
        self.malformed += o.malformed;
        self.holes_opened += o.holes_opened;
        self.holes_filled += o.holes_filled;
        self.rtcp += o.rtcp;
        self.new_streams += o.new_streams;
        self.stale += o.stale;
    }
}

/// Everything the data path counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DatapathStats {
    pub rules: Vec<RuleCounters>,
    /// Redirected frames that matched no rule in userspace (a map/table mismatch).
    pub unmatched: u64,
    /// Redirected frames that are not multicast UDP after all, or whose lengths disagree
    /// with the frame.
    pub malformed: u64,
    /// Fan-out copies made: a frame with N outputs is copied N - 1 times (the last output
    /// gets the received frame itself), so a frame that goes to one output never is.
    pub copies: u64,
    /// Of those, copies into another UMEM: the output's socket is on a UMEM of its own
    /// (`umem.separate`) or of another mode (zero-copy beside copy).
    pub cross_umem: u64,
    /// Frames `relay capture` wanted and did not get: its queue was full (the client reads
    /// slower than the relay forwards). Forwarding never waits for a capture.
    pub capture_dropped: u64,
    /// TX kicks (sendto on an AF_XDP socket): what the data path pays in syscalls to
    /// transmit, for the syscall table in docs/PERFORMANCE.md.
    pub kicks: u64,
    /// Times an idle worker gave up its CPU while it awaited only completions (`poll:
    /// sleep`), for the kernel's deferred softirq work that produces them.
    pub yields: u64,
}

impl DatapathStats {
    /// Zeroed counters shaped like `outputs_per_rule`.
    pub fn new(outputs_per_rule: impl Iterator<Item = usize>) -> Self {
        DatapathStats {
            rules: outputs_per_rule
                .map(|n| RuleCounters {
                    outputs: vec![OutputCounters::default(); n],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Adds another worker's counters to these.
    pub fn add(&mut self, other: &DatapathStats) {
        for (r, o) in self.rules.iter_mut().zip(&other.rules) {
            r.packets += o.packets;
            r.bytes += o.bytes;
            r.checksum_completed += o.checksum_completed;
            r.merge.add(&o.merge);
            if !o.groups.is_empty() {
                r.groups.merge(&o.groups);
            }
            for (a, b) in r.outputs.iter_mut().zip(&o.outputs) {
                a.add(b);
            }
        }
        self.unmatched += other.unmatched;
        self.malformed += other.malformed;
        self.copies += other.copies;
        self.cross_umem += other.cross_umem;
        self.capture_dropped += other.capture_dropped;
        self.kicks += other.kicks;
        self.yields += other.yields;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_worker_counters() {
        let mut a = DatapathStats::new([2, 1].into_iter());
        let mut b = a.clone();
        a.rules[0].packets = 3;
        a.rules[0].outputs[1].tx_ring_full = 2;
        b.rules[0].packets = 4;
        b.rules[0].outputs[1].handoff_full = 5;
        b.rules[1].outputs[0].bytes = 7;
        a.rules[1].checksum_completed = 2;
        b.rules[1].checksum_completed = 3;
        b.malformed = 1;
        a.add(&b);
        assert_eq!(a.rules[0].packets, 7);
        assert_eq!(a.rules[0].outputs[1].dropped(), 7);
        assert_eq!(a.rules[1].outputs[0].bytes, 7);
        assert_eq!(a.rules[1].checksum_completed, 5);
        assert_eq!(a.malformed, 1);
    }

    #[test]
    fn one_line_per_socket_queue() {
        let s = |interface: &str, queue, ingress, rx_ring_full| SocketCounters {
            interface: interface.into(),
            queue,
            ingress,
            rx_ring_full,
            ..Default::default()
        };
        let merged = merge_sockets([
            s("rin", 1, true, 1),
            s("rout", 0, false, 0),
            s("rin", 0, false, 2),
            s("rin", 0, true, 3),
        ]);
        assert_eq!(
            merged,
            vec![
                s("rin", 0, true, 5),
                s("rin", 1, true, 1),
                s("rout", 0, false, 0)
            ]
        );
    }
}
