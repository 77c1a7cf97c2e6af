//! What the XDP program costs per frame, against the number of rules: the kernel runs the
//! loaded program a million times on one frame (BPF_PROG_TEST_RUN) and reports the mean time
//! per run. Needs root. `cargo xtask bench-xdp` runs it and writes the table into
//! docs/PERFORMANCE.md.

use std::net::IpAddr;

use relay::{
    config::{Config, Input, Output, Rule, StaticSystem},
    craft::{UdpFrame, build_udp_frame},
    loader::Steering,
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
            Rule {
                name: format!("r{i}"),
                input: Input {
                    interface: "in0".into(),
                    group: Some(group.into()),
                    destination: None,
                    port: Some(5000 + (i / 2 % 100) as u16),
                    source: None,
                    vlan: None,
                },
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
                }],
            }
        })
        .collect()
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
        let rules = rules(n);
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
        let loaded = start.elapsed();
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
}
