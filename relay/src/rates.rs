//! Rates for `relay stats --watch`: two snapshots of the counters and the time between them
//! give packets/s, bits/s and drops/s per rule, output, XDP counter and socket.
//!
//! A counter is only compared with its own earlier value: rules by name, outputs by where
//! they send, sockets by interface and queue. One that was not there before (a rule added,
//! a socket opened) counted from zero. One lower than before (a rule replaced by a reload, a
//! socket of a re-created device) has restarted: its rate for that interval is unknown, and
//! shown as such rather than as a negative or wrapped number.

use std::fmt::Write;

use serde::Serialize;

use crate::{
    render::{Columns, describe_output, output_label},
    stats::{OutputView, PoolView, StatsView},
};

/// Events per second; `None` when the counter restarted in the interval.
pub type Rate = Option<f64>;

/// The rate of a counter that went from `before` (zero for one that was not there) to `now`
/// in `seconds`.
pub fn rate(before: Option<u64>, now: u64, seconds: f64) -> Rate {
    let before = before.unwrap_or(0);
    (now >= before && seconds > 0.0).then(|| (now - before) as f64 / seconds)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rates {
    /// The interval the rates are over.
    pub seconds: f64,
    pub rules: Vec<RuleRates>,
    pub xdp: Vec<(String, Rate)>,
    /// The data path's own: unmatched, malformed, copies, cross_umem, capture_dropped, and
    /// its workers' kicks and yields.
    pub datapath: Vec<(String, Rate)>,
    pub sockets: Vec<SocketRates>,
    /// The pool as it is now (a gauge, not a rate).
    pub pool: PoolView,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleRates {
    pub name: String,
    pub input: String,
    pub packets: Rate,
    pub bits: Rate,
    pub outputs: Vec<OutputRates>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputRates {
    pub interface: String,
    /// Where it sends, as the table shows it.
    pub output: String,
    pub packets: Rate,
    pub bits: Rate,
    /// All drops of the output per second.
    pub dropped: Rate,
    /// Drops per second by reason, the reasons that dropped anything (or restarted) only.
    pub reasons: Vec<(String, Rate)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SocketRates {
    pub interface: String,
    pub queue: u32,
    pub counters: Vec<(String, Rate)>,
}

/// Whether two outputs of a rule are the same one: they send the same way.
fn same_output(a: &OutputView, b: &OutputView) -> bool {
    (&a.interface, &a.group, a.port, a.vlan, a.dscp)
        == (&b.interface, &b.group, b.port, b.vlan, b.dscp)
}

/// The rates from `before` to `now`, `seconds` apart.
pub fn rates(before: &StatsView, now: &StatsView, seconds: f64) -> Rates {
    let rules = now
        .rules
        .iter()
        .map(|r| {
            let old = before.rules.iter().find(|o| o.name == r.name);
            RuleRates {
                name: r.name.clone(),
                input: r.input.to_string(),
                packets: rate(old.map(|o| o.received), r.received, seconds),
                bits: rate(old.map(|o| o.bytes * 8), r.bytes * 8, seconds),
                outputs: r
                    .outputs
                    .iter()
                    .map(|o| {
                        let prev =
                            old.and_then(|old| old.outputs.iter().find(|p| same_output(p, o)));
                        let total = |v: &OutputView| v.dropped.values().sum::<u64>();
                        OutputRates {
                            interface: o.interface.clone(),
                            output: describe_output(o),
                            packets: rate(prev.map(|p| p.sent), o.sent, seconds),
                            bits: rate(prev.map(|p| p.bytes * 8), o.bytes * 8, seconds),
                            dropped: rate(prev.map(total), total(o), seconds),
                            reasons: o
                                .dropped
                                .iter()
                                .map(|(k, v)| {
                                    let was = prev.map(|p| p.dropped.get(k).copied().unwrap_or(0));
                                    (k.clone(), rate(was, *v, seconds))
                                })
                                .filter(|(_, r)| r.is_none_or(|r| r > 0.0))
                                .collect(),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let xdp = now
        .xdp
        .iter()
        .map(|(k, v)| (k.clone(), rate(before.xdp.get(k).copied(), *v, seconds)))
        .collect();
    let datapath = [
        ("unmatched", before.unmatched, now.unmatched),
        ("malformed", before.malformed, now.malformed),
        ("copies", before.copies, now.copies),
        ("cross_umem", before.cross_umem, now.cross_umem),
        (
            "capture_dropped",
            before.capture_dropped,
            now.capture_dropped,
        ),
        ("kicks", before.kicks, now.kicks),
        ("yields", before.yields, now.yields),
    ]
    .into_iter()
    .map(|(k, b, n)| (k.to_owned(), rate(Some(b), n, seconds)))
    .collect();
    let sockets = now
        .sockets
        .iter()
        .map(|s| {
            let old = before
                .sockets
                .iter()
                .find(|o| o.interface == s.interface && o.queue == s.queue);
            SocketRates {
                interface: s.interface.clone(),
                queue: s.queue,
                counters: s
                    .fields()
                    .iter()
                    .zip(0..)
                    .map(|((k, v), i)| {
                        let was = old.map(|o| o.fields()[i].1);
                        ((*k).to_owned(), rate(was, *v, seconds))
                    })
                    .collect(),
            }
        })
        .collect();
    Rates {
        seconds,
        rules,
        xdp,
        datapath,
        sockets,
        pool: now.pool.clone(),
    }
}

/// Events per second as the table shows them: whole numbers from 10 up, one decimal
/// below, `restarted` for a counter that started over.
pub fn per_second(r: Rate) -> String {
    match r {
        None => "restarted".to_owned(),
        Some(v) if v >= 10.0 || v == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// Bits per second with an SI prefix: `16.4 Mbit/s`.
pub fn bits_per_second(r: Rate) -> String {
    let Some(v) = r else {
        return "restarted".to_owned();
    };
    let (scaled, unit) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(f, _)| v >= *f)
        .map_or((v, ""), |(f, u)| (v / f, u));
    format!("{scaled:.1} {unit}bit/s")
}

fn named(list: &[(String, Rate)]) -> String {
    list.iter()
        .map(|(k, r)| format!("{k}={}", per_second(*r)))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Rates {
    /// The block `relay stats --watch` prints each interval.
    pub fn render(&self) -> String {
        let mut t = Columns::new(&[false, false, true, true, true]);
        t.row(vec![
            "RULE".into(),
            "INPUT / OUTPUT".into(),
            "PACKETS/S".into(),
            "BITS/S".into(),
            "DROPS/S".into(),
            String::new(),
        ]);
        for r in &self.rules {
            t.row(vec![
                r.name.clone(),
                r.input.clone(),
                per_second(r.packets),
                bits_per_second(r.bits),
                String::new(),
                String::new(),
            ]);
            for o in &r.outputs {
                t.row(vec![
                    output_label(&o.interface),
                    o.output.clone(),
                    per_second(o.packets),
                    bits_per_second(o.bits),
                    per_second(o.dropped),
                    if o.reasons.is_empty() {
                        String::new()
                    } else {
                        format!("({})", named(&o.reasons))
                    },
                ]);
            }
        }
        let mut s = format!("rates over the last {:.1} s\n", self.seconds);
        s.push_str(&t.render());
        let _ = writeln!(s, "xdp/s: {}", named(&self.xdp));
        let _ = writeln!(s, "datapath/s: {}", named(&self.datapath));
        let mut k = Columns::new(&[]);
        for sock in &self.sockets {
            k.row(vec![
                format!("socket/s {}", sock.interface),
                format!("queue {}", sock.queue),
                named(&sock.counters),
            ]);
        }
        s.push_str(&k.render());
        let p = &self.pool;
        let _ = writeln!(
            s,
            "pool: {} frames, {} free, {} in flight, low-water {}",
            p.capacity, p.free, p.in_flight, p.low_water
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Config, tests::fake},
        datapath::{DatapathStats, SocketCounters},
        pool::{AllocatorKind, PoolStats},
        rules::RuleTable,
    };

    fn view(yaml: &str, fill: impl Fn(&mut DatapathStats)) -> StatsView {
        let c = Config::parse("t", yaml).unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new(t.rules.iter().map(|r| r.outputs.len()));
        fill(&mut d);
        let pool = PoolStats {
            capacity: 64,
            free: 60,
            low_water: 50,
            rejected: 0,
        };
        StatsView::build(&t, &d, None, &pool, AllocatorKind::Lockfree)
    }

    const TWO: &str = "rules:\n  - name: a\n    input: {interface: in0, group: 239.1.1.1, port: 5000}\n    outputs: [{interface: out0}, {interface: out1, group: 239.2.2.2}]\n  - name: b\n    input: {interface: in0, group: 239.3.3.3}\n    outputs: [{interface: out0}]\n";

    #[test]
    fn rates_are_differences_over_the_interval() {
        let before = view(TWO, |d| {
            d.rules[0].packets = 1000;
            d.rules[0].bytes = 100_000;
            d.rules[0].outputs[1].packets = 900;
            d.rules[0].outputs[1].bytes = 90_000;
            d.rules[0].outputs[1].no_frame = 10;
            d.unmatched = 1;
        });
        let now = view(TWO, |d| {
            d.rules[0].packets = 5000;
            d.rules[0].bytes = 500_000;
            d.rules[0].outputs[1].packets = 4800;
            d.rules[0].outputs[1].bytes = 480_000;
            d.rules[0].outputs[1].no_frame = 110;
            d.rules[0].outputs[1].ttl_expired = 20;
            d.unmatched = 5;
        });
        let r = rates(&before, &now, 2.0);
        assert_eq!(r.rules[0].packets, Some(2000.0));
        assert_eq!(r.rules[0].bits, Some(1_600_000.0));
        let o = &r.rules[0].outputs[1];
        assert_eq!((o.packets, o.bits), (Some(1950.0), Some(1_560_000.0)));
        assert_eq!(o.dropped, Some(60.0));
        assert_eq!(
            o.reasons,
            vec![
                ("no_frame".into(), Some(50.0)),
                ("ttl_expired".into(), Some(10.0))
            ]
        );
        assert_eq!(r.rules[0].outputs[0].reasons, vec![]);
        assert_eq!(r.rules[1].packets, Some(0.0));
        assert_eq!(r.datapath[0], ("unmatched".into(), Some(2.0)));
        let text = r.render();
        assert!(text.starts_with("rates over the last 2.0 s\n"), "{text}");
        let row = text.lines().find(|l| l.starts_with("a ")).unwrap();
        assert!(row.contains(" 2000  1.6 Mbit/s"), "{text}");
        let out = text.lines().find(|l| l.contains("239.2.2.2")).unwrap();
        assert!(
            out.ends_with(" 1950  1.6 Mbit/s       60  (no_frame=50 ttl_expired=10)"),
            "{text}"
        );
        assert!(
            text.contains("datapath/s: unmatched=2.0 malformed=0"),
            "{text}"
        );
    }

    /// After a reload replaced a rule (its counters start over) or removed one, and with a
    /// socket of a re-created device, nothing is negative or wrapped: what restarted says
    /// so, what is new has no rate yet, the rest is as usual.
    #[test]
    fn counters_that_went_down_restarted() {
        let mut before = view(TWO, |d| {
            d.rules[0].packets = 1000;
            d.rules[0].bytes = 100_000;
            d.rules[0].outputs[0].packets = 1000;
            d.rules[1].packets = 10;
        });
        before.sockets = vec![SocketCounters {
            interface: "in0".into(),
            queue: 0,
            ingress: true,
            rx_ring_full: 50,
            ..Default::default()
        }];
        let renamed = TWO.replace("name: b", "name: c");
        let mut now = view(&renamed, |d| {
            d.rules[0].packets = 30;
            d.rules[0].bytes = 3000;
            d.rules[0].outputs[0].packets = 1010;
            d.rules[1].packets = 20;
        });
        now.sockets = vec![SocketCounters {
            interface: "in0".into(),
            queue: 0,
            ingress: true,
            rx_ring_full: 3,
            rx_dropped: 4,
            ..Default::default()
        }];
        let r = rates(&before, &now, 1.0);
        assert_eq!((r.rules[0].packets, r.rules[0].bits), (None, None));
        assert_eq!(r.rules[0].outputs[0].packets, Some(10.0));
        assert_eq!(r.rules[1].name, "c");
        assert_eq!(
            r.rules[1].packets,
            Some(20.0),
            "a new rule counted from zero"
        );
        let socket = &r.sockets[0].counters;
        assert_eq!(socket[0], ("rx_dropped".into(), Some(4.0)));
        assert_eq!(socket[1], ("rx_ring_full".into(), None));
        let text = r.render();
        let row = text.lines().find(|l| l.starts_with("a ")).unwrap();
        assert!(row.contains("restarted  restarted"), "{text}");
        let negative = text
            .as_bytes()
            .windows(2)
            .any(|w| w[0] == b'-' && w[1].is_ascii_digit());
        assert!(!negative, "nothing negative: {text}");
        assert!(text.contains("rx_ring_full=restarted"), "{text}");
    }

    #[test]
    fn numbers_read_as_an_operator_expects() {
        assert_eq!(per_second(Some(0.0)), "0");
        assert_eq!(per_second(Some(0.25)), "0.2");
        assert_eq!(per_second(Some(1999.6)), "2000");
        assert_eq!(bits_per_second(Some(999.0)), "999.0 bit/s");
        assert_eq!(bits_per_second(Some(16_400_000.0)), "16.4 Mbit/s");
        assert_eq!(bits_per_second(Some(2.5e9)), "2.5 Gbit/s");
        assert_eq!(bits_per_second(None), "restarted");
        assert_eq!(rate(Some(5), 4, 1.0), None);
        assert_eq!(rate(Some(4), 4, 0.0), None);
        assert_eq!(rate(None, 4, 2.0), Some(2.0));
    }
}
