//! What the XDP program costs per frame, against the number of rules: the kernel runs the
//! loaded program a million times on one frame (BPF_PROG_TEST_RUN) and reports the mean time
//! per run. Needs root. `cargo xtask bench-xdp` runs it and writes the tables into
//! docs/PERFORMANCE.md: exact rules (one group each), which take the shape-bit lookups, and
//! rule sets with group ranges or source prefixes, which take the tuple walk.

use std::net::IpAddr;

use relay::{
    config::{Config, Input, Output, Rule, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
    loader::Steering,
    prefix::Prefix,
    rules::RuleTable,
};

const LO: u32 = 1;
const REPEAT: u32 = 1_000_000;
const RUNS: usize = 3;

/// `n` rules: (group, port) pairs over 239.10.x.1 and ff18::10:x, ports 5000-5099, the
/// families alternating (so two rules are one of each).
fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let g = (i / 2 / 100) as u16;
            let group = if i % 2 == 0 {
                IpAddr::from([239, 10, g as u8, 1])
            } else {
                IpAddr::from([0xff18, 0, 0, 0, 0, 0, 0x10, g])
            };
            rule(i, group.into(), Some(5000 + (i / 2 % 100) as u16), None)
        })
        .collect()
}

/// `n` ranges: IPv4 /24s from 239.20.0.0 and IPv6 /120s from ff18::20:0, the families
/// alternating, any port; one tuple per family. 239.20.0.0/24 and ff18::20:0/120 are
/// among them.
fn ranges(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let k = i / 2;
            let group = if i % 2 == 0 {
                Prefix {
                    addr: IpAddr::from([239, 20 + (k / 256) as u8, (k % 256) as u8, 0]),
                    len: 24,
                }
            } else {
                Prefix {
                    addr: IpAddr::from([
                        0xff18,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0x20 + (k / 256) as u16,
                        (k % 256) as u16 * 256,
                    ]),
                    len: 120,
                }
            };
            rule(i, group, None, None)
        })
        .collect()
}

/// 16 nested IPv4 ranges, 239.20.0.0/31 out to /16, and one IPv6 range: 17 tuples. A
/// frame to 239.20.0.0 takes the /31, the first tuple; one to 239.20.128.0 takes only the
/// /16, the sixteenth.
fn nested(sources: bool) -> Vec<Rule> {
    let mut rules: Vec<Rule> = (16..32u8)
        .rev()
        .enumerate()
        .map(|(i, len)| {
            let group = Prefix {
                addr: IpAddr::from([239, 20, 0, 0]),
                len,
            };
            let source = sources.then(|| "198.18.0.0/16".parse().unwrap());
            rule(i, group, None, source)
        })
        .collect();
    rules.push(rule(16, "ff18::20:0/120".parse().unwrap(), None, None));
    rules
}

fn rule(i: usize, group: Prefix, port: Option<u16>, source: Option<Prefix>) -> Rule {
    Rule {
        name: format!("r{i}"),
        input: Input {
            interface: "in0".into(),
            group: Some(group),
            destination: None,
            port,
            source,
            vlan: None,
        },
        legs: Vec::new(),
        merge: None,
        window_ms: None,
        outputs: vec![Output {
            interface: "out0".into(),
            group: None,
            port: None,
            ttl: None,
            vlan: None,
            dscp: None,
            destination: None,
            source: None,
            source_port: None,
            on_demand: false,
        }],
    }
}

/// Compiles `rules` and loads the program with them: the table, the steering, and how long
/// both took.
fn load(rules: Vec<Rule>) -> (RuleTable, Steering, std::time::Duration) {
    let config = Config::parse("bench", "rules: []")
        .map(|c| Config { rules, ..c })
        .expect("an empty config parses");
    let start = std::time::Instant::now();
    let table = RuleTable::compile(
        &config,
        "bench",
        &StaticSystem::new(&[("in0", LO), ("out0", 1000)]),
    )
    .expect("the rules compile");
    let steering = Steering::load(&table, 2048).expect("load the XDP program (needs root)");
    (table, steering, start.elapsed())
}

fn median_ns(steering: &Steering, frame: &[u8]) -> u32 {
    let mut v: Vec<u32> = (0..RUNS)
        .map(|_| steering.test_run(frame, LO, REPEAT).expect("test run").1)
        .collect();
    v.sort_unstable();
    v[RUNS / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let v4 = |g: [u8; 4], port| {
        build_udp_frame(&UdpFrame::simple(
            IpAddr::from([198, 18, 1, 1]),
            IpAddr::from(g),
            port,
            8,
            &[0; 64],
        ))
    };
    let v6 = |port| {
        build_udp_frame(&UdpFrame::simple(
            "2001:2::1".parse().unwrap(),
            "ff18::10:0".parse().unwrap(),
            port,
            8,
            &[0; 64],
        ))
    };
    let unicast = v4([198, 18, 1, 2], 5000);
    println!(
        "| rules | compile and load | IPv4, matching | IPv4, no rule | IPv6, matching | IPv4 unicast | rule map memory |\n|---|---|---|---|---|---|---|"
    );
    for n in [2usize, 100, 10_000] {
        let (_, steering, loaded) = load(rules(n));
        let cells = [
            median_ns(&steering, &v4([239, 10, 0, 1], 5000)),
            median_ns(&steering, &v4([239, 10, 0, 1], 5999)),
            median_ns(&steering, &v6(5000)),
            median_ns(&steering, &unicast),
        ];
        println!(
            "| {n} | {:.1} ms | {} ns | {} ns | {} ns | {} ns | {} KiB |",
            loaded.as_secs_f64() * 1000.0,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            steering.rule_map_memory().expect("fdinfo") / 1024
        );
    }

    // Ranges: the program walks the tuples, most specific first, one hash lookup each (the
    // other family's are skipped without one).
    let v6_range = build_udp_frame(&UdpFrame::simple(
        "2001:2::1".parse().unwrap(),
        "ff18::20:7".parse().unwrap(),
        5000,
        8,
        &[0; 64],
    ));
    println!(
        "\n| rules with ranges | tuples | compile and load | IPv4, first tuple | IPv4, last tuple | IPv4, no rule | IPv6, matching | rule map memory |\n|---|---|---|---|---|---|---|---|"
    );
    let sets: Vec<(String, Vec<Rule>)> = vec![
        ("2 ranges".into(), ranges(2)),
        ("16 nested IPv4 ranges, 1 IPv6".into(), nested(false)),
        (
            "16 nested IPv4 ranges from a /16, 1 IPv6".into(),
            nested(true),
        ),
        ("100 ranges".into(), ranges(100)),
        ("10,000 ranges".into(), ranges(10_000)),
        ("10,000 exact rules and 2 ranges".into(), {
            let mut r = rules(10_000);
            r.extend(ranges(2).into_iter().map(|mut x| {
                x.name.push('x');
                x
            }));
            r
        }),
    ];
    for (name, rules) in sets {
        let (table, steering, loaded) = load(rules);
        let tuples = table.tuples().len();
        // The exact rules of the last set take 239.10.0.1:5000; the ranges 239.20.0.0/24
        // (and in the nested sets, 239.20.0.0/31), 239.20.128.0 only the /16 of the nested
        // sets, so elsewhere it misses as 239.30.0.1 does.
        let first = if name.starts_with("10,000 exact") {
            v4([239, 10, 0, 1], 5000)
        } else {
            v4([239, 20, 0, 0], 5000)
        };
        let last = if name.starts_with("16 nested") {
            median_ns(&steering, &v4([239, 20, 128, 0], 5000)).to_string() + " ns"
        } else {
            "".into()
        };
        let cells = [
            median_ns(&steering, &first),
            median_ns(&steering, &v4([239, 30, 0, 1], 5000)),
            median_ns(&steering, &v6_range),
        ];
        println!(
            "| {name} | {tuples} | {:.1} ms | {} ns | {} | {} ns | {} ns | {} KiB |",
            loaded.as_secs_f64() * 1000.0,
            cells[0],
            if last.is_empty() {
                "—".to_owned()
            } else {
                last
            },
            cells[1],
            cells[2],
            steering.rule_map_memory().expect("fdinfo") / 1024
        );
    }
}
