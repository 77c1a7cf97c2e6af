//! The counters the relay prints when it stops, one `key=value` line per rule, output and
//! socket, so that people can read them and scripts can grep them. A value with a space, a
//! quote, a backslash or an `=` in it (a rule's name can have them) is quoted as logfmt
//! quotes it: `rule="my rule"`, with `\"` and `\\` inside.

use std::fmt::Write;

use relay_common::XdpCounter;

use crate::{
    datapath::{DatapathStats, Finished, FrameAccount, SocketCounters},
    pool::{AllocatorKind, PoolStats},
    rules::RuleTable,
};

pub fn shutdown(
    table: &RuleTable,
    finished: &Finished,
    allocator: AllocatorKind,
    xdp: Option<&[u64; XdpCounter::COUNT as usize]>,
) -> String {
    render(
        table,
        &Parts {
            stats: &finished.stats,
            sockets: &finished.sockets,
            pool: &finished.pool,
            account: &finished.account,
        },
        allocator,
        xdp,
    )
}

/// What a stopped data path counted, for [`render`].
pub struct Parts<'a> {
    pub stats: &'a DatapathStats,
    pub sockets: &'a [SocketCounters],
    pub pool: &'a PoolStats,
    pub account: &'a FrameAccount,
}

/// The report of a data path that stopped with `parts`.
pub fn render(
    table: &RuleTable,
    parts: &Parts,
    allocator: AllocatorKind,
    xdp: Option<&[u64; XdpCounter::COUNT as usize]>,
) -> String {
    let (stats, sockets, account) = (parts.stats, parts.sockets, parts.account);
    let mut s = String::new();
    for (rule, rc) in table.rules.iter().zip(&stats.rules) {
        let _ = writeln!(
            s,
            "rule={} received={} bytes={} checksum_completed={}",
            value(&rule.name),
            rc.packets,
            rc.bytes,
            rc.checksum_completed
        );
        if rule.merge.is_some() {
            let _ = writeln!(
                s,
                "rule={} merge relayed={} lost={} malformed={} rtcp={} new_streams={} stale={}",
                value(&rule.name),
                rc.merge.relayed(),
                rc.merge.lost(),
                rc.merge.malformed,
                rc.merge.rtcp,
                rc.merge.new_streams,
                rc.merge.stale
            );
            for (i, leg) in rule.inputs().enumerate() {
                let c = rc.merge.legs.get(i).copied().unwrap_or_default();
                let name = table.ingress_name(leg.ifindex);
                let _ = writeln!(
                    s,
                    "rule={} leg={i} interface={} group={} received={} first={} duplicate={} gaps={}",
                    value(&rule.name),
                    value(name),
                    leg.prefix,
                    c.received,
                    c.first,
                    c.duplicate,
                    c.gaps
                );
            }
        }
        for (out, oc) in rule.outputs.iter().zip(&rc.outputs) {
            let eg = &table.egress[out.egress];
            let _ = writeln!(
                s,
                "rule={} output={} {}={} port={}{}{}{}{} sent={} bytes={} dropped={} ttl_expired={} no_frame={} tx_ring_full={} handoff_full={} malformed={} too_large={} interface_down={} no_neighbour={} no_source={}{}",
                value(&rule.name),
                value(&eg.name),
                if out.action.destination.is_some() {
                    "destination"
                } else {
                    "group"
                },
                out.action.named_destination().unwrap_or(rule.prefix),
                out.action
                    .port
                    .or(rule.port)
                    .map_or("same".into(), |p| p.to_string()),
                // Only for an output that tags: two outputs may differ in nothing else.
                out.action
                    .vlan
                    .map_or(String::new(), |v| format!(" vlan={v}")),
                out.action
                    .dscp
                    .map_or(String::new(), |d| format!(" dscp={d}")),
                // "auto (198.18.2.1)" has a space: the address alone, after "auto:".
                crate::stats::describe_source(&out.action).map_or(String::new(), |s| format!(
                    " source={}",
                    value(&s.replace(" (", ":").replace(')', ""))
                )),
                out.action
                    .source_port
                    .map_or(String::new(), |p| format!(" source_port={p}")),
                oc.packets,
                oc.bytes,
                oc.dropped(),
                oc.ttl_expired,
                oc.no_frame,
                oc.tx_ring_full,
                oc.handoff_full,
                oc.malformed,
                oc.too_large,
                oc.interface_down,
                oc.no_neighbour,
                oc.no_source,
                // Held back, not dropped: only for the outputs that can hold back.
                if out.on_demand {
                    format!(" on_demand no_listener={}", oc.no_listener)
                } else {
                    String::new()
                },
            );
        }
    }
    if let Some(x) = xdp {
        let fields: Vec<String> = XdpCounter::ALL
            .iter()
            .map(|c| format!("{}={}", c.name(), x[*c as usize]))
            .collect();
        let _ = writeln!(s, "xdp {}", fields.join(" "));
    }
    let _ = writeln!(
        s,
        "datapath unmatched={} malformed={} copies={} cross_umem={} kicks={} yields={}",
        stats.unmatched, stats.malformed, stats.copies, stats.cross_umem, stats.kicks, stats.yields
    );
    for k in sockets {
        let fields: Vec<String> = k.fields().iter().map(|(n, v)| format!("{n}={v}")).collect();
        let _ = writeln!(
            s,
            "socket={} queue={} {}",
            value(&k.interface),
            k.queue,
            fields.join(" ")
        );
    }
    let p = parts.pool;
    let _ = writeln!(
        s,
        "pool allocator={} capacity={} free={} in_flight={} low_water={} rejected={}",
        allocator.describe(),
        p.capacity,
        p.free,
        p.in_flight(),
        p.low_water,
        p.rejected
    );
    let _ = writeln!(
        s,
        "frames total={} in_pool={} in_fill={} in_tx={} lost_with_devices={} leaked={}",
        account.frames,
        account.in_pool,
        account.in_fill,
        account.in_tx,
        account.abandoned,
        account.leaked()
    );
    s
}

/// `v` as a logfmt value: as it is, or quoted (with `"` and `\` escaped) when it is empty or
/// has a space, a quote, a backslash or an `=`, which would end or split it.
pub fn value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '='))
    {
        return v.to_owned();
    }
    let mut q = String::with_capacity(v.len() + 2);
    q.push('"');
    for c in v.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, tests::fake};

    #[test]
    fn values_are_quoted_only_when_they_must_be() {
        assert_eq!(value("video-a"), "video-a");
        assert_eq!(value("my rule"), "\"my rule\"");
        assert_eq!(value("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(value("back\\slash"), "\"back\\\\slash\"");
        assert_eq!(value(""), "\"\"");
    }

    /// A name with a space and a quote stays one value; each socket is one line.
    #[test]
    fn report_lines_parse_as_key_value() {
        let c = Config::parse(
            "t",
            "rules:\n  - name: 'my \"big\" rule'\n    input: {interface: in0, group: 239.1.1.1, port: 5000}\n    outputs: [{interface: out0, source: auto}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut stats = DatapathStats::new([1].into_iter());
        stats.rules[0].packets = 7;
        let sock = |rx_ring_full| SocketCounters {
            interface: "in0".into(),
            queue: 0,
            ingress: true,
            rx_ring_full,
            ..Default::default()
        };
        // As `Datapath::stop` passes them: a queue re-bound to a new device is one line.
        let sockets = crate::datapath::stats::merge_sockets([sock(2), sock(3)]);
        let pool = PoolStats {
            capacity: 8,
            free: 8,
            low_water: 8,
            rejected: 0,
        };
        let account = FrameAccount {
            frames: 8,
            in_pool: 8,
            in_fill: 0,
            in_tx: 0,
            abandoned: 0,
        };
        let parts = Parts {
            stats: &stats,
            sockets: &sockets,
            pool: &pool,
            account: &account,
        };
        let r = render(&t, &parts, AllocatorKind::Lockfree, None);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(
            lines[0], "rule=\"my \\\"big\\\" rule\" received=7 bytes=0 checksum_completed=0",
            "{r}"
        );
        assert!(
            lines[1].starts_with(
                "rule=\"my \\\"big\\\" rule\" output=out0 group=239.1.1.1 port=5000 source=auto:198.18.11.1 sent=0"
            ),
            "{r}"
        );
        let socket_lines: Vec<&&str> = lines.iter().filter(|l| l.starts_with("socket=")).collect();
        assert_eq!(
            socket_lines,
            [
                &"socket=in0 queue=0 rx_dropped=0 rx_ring_full=5 fill_ring_empty=0 rx_invalid=0 tx_invalid=0"
            ],
            "{r}"
        );
    }
}
