//! The counters the relay prints when it stops, one `key=value` line per rule, output and
//! socket, so that people can read them and scripts can grep them.

use std::fmt::Write;

use relay_common::XdpCounter;

use crate::{datapath::Finished, pool::AllocatorKind, rules::RuleTable};

pub fn shutdown(
    table: &RuleTable,
    finished: &Finished,
    allocator: AllocatorKind,
    xdp: Option<&[u64; XdpCounter::COUNT as usize]>,
) -> String {
    let (stats, sockets, account) = (&finished.stats, &finished.sockets, &finished.account);
    let mut s = String::new();
    for (rule, rc) in table.rules.iter().zip(&stats.rules) {
        let _ = writeln!(
            s,
            "rule={} received={} bytes={} checksum_completed={}",
            rule.name, rc.packets, rc.bytes, rc.checksum_completed
        );
        for (out, oc) in rule.outputs.iter().zip(&rc.outputs) {
            let eg = &table.egress[out.egress];
            let _ = writeln!(
                s,
                "rule={} output={} {}={} port={}{}{}{}{} sent={} bytes={} dropped={} ttl_expired={} no_frame={} tx_ring_full={} handoff_full={} malformed={} too_large={} interface_down={} no_neighbour={} no_source={}{}",
                rule.name,
                eg.name,
                if out.action.destination.is_some() {
                    "destination"
                } else {
                    "group"
                },
                out.action.named_destination().unwrap_or(rule.prefix),
                out.action.port.map_or_else(
                    || rule.port.map_or("same".into(), |p| p.to_string()),
                    |p| p.to_string()
                ),
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
                    s.replace(" (", ":").replace(')', "")
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
        "datapath unmatched={} malformed={} copies={} cross_umem={} kicks={}",
        stats.unmatched, stats.malformed, stats.copies, stats.cross_umem, stats.kicks
    );
    for (name, queue, st) in sockets {
        let _ = writeln!(
            s,
            "socket={name} queue={queue} rx_dropped={} rx_ring_full={} fill_ring_empty={} rx_invalid={} tx_invalid={}",
            st.rx_dropped(),
            st.rx_ring_full(),
            st.rx_fill_ring_empty_descs(),
            st.rx_invalid_descs(),
            st.tx_invalid_descs(),
        );
    }
    let p = &finished.pool;
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
