//! `cargo xtask demo`: the relay's main job on a throw-away topology, narrated.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Result, ensure};

use crate::{
    netns::require_root,
    relay_proc::RelayProc,
    topo::{SENDER_ADDR, Topology},
    traffic::{Flow, Limits, check_payload, join, listen, send},
};

/// The rules the demo runs, also shown to the user.
pub const DEMO_RULES: &str = "\
rules:
  - name: video-a
    input:
      interface: rin
      group: 239.1.1.1
      port: 5000
    outputs:
      - interface: rout0                   # same group and port, TTL decremented
      - interface: rout1
        group: 239.2.2.2                   # remapped group
        port: 6000                         # remapped port
        ttl: 16                            # TTL set, not decremented
";

pub fn run(relay_bin: &Path, packets: u32) -> Result<()> {
    require_root();
    println!("== building the topology: sender -> relay -> two receivers, each in its own netns");
    let topo = Topology::new(2)?;
    println!(
        "   sender ns {} (198.18.1.1), relay ns {}, receivers {} and {}",
        topo.sender.name(),
        topo.relay.name(),
        topo.receivers[0].ns.name(),
        topo.receivers[1].ns.name()
    );
    println!("== rules.yaml\n{DEMO_RULES}");
    let relay = RelayProc::start(relay_bin, &topo.relay, DEMO_RULES, &[])?;
    println!("== relay started (pid {}); its log:", relay.pid());
    print!("{}", std::fs::read_to_string(&relay.stderr)?);

    let count = u64::from(packets);
    let rx0 = listen(
        &topo.receivers[0].ns,
        Ipv4Addr::new(239, 1, 1, 1),
        5000,
        topo.receivers[0].addr,
        Limits::new(count),
    )?;
    let rx1 = listen(
        &topo.receivers[1].ns,
        Ipv4Addr::new(239, 2, 2, 2),
        6000,
        topo.receivers[1].addr,
        Limits::new(count),
    )?;
    println!("== sending {count} packets to 239.1.1.1:5000 from the sender namespace");
    let sent = join(send(
        &topo.sender,
        SENDER_ADDR,
        Flow::new(Ipv4Addr::new(239, 1, 1, 1), 5000, count),
    ))?;
    let got0 = join(rx0)?;
    let got1 = join(rx1)?;
    let intact = |v: &[Vec<u8>]| v.iter().filter(|p| check_payload(p).is_some()).count();
    println!("   sent {sent}");
    println!(
        "   receiver 0 (239.1.1.1:5000) got {} packets, {} intact",
        got0.len(),
        intact(&got0)
    );
    println!(
        "   receiver 1 (239.2.2.2:6000) got {} packets, {} intact",
        got1.len(),
        intact(&got1)
    );
    println!("== stopping the relay (SIGTERM); its counters:");
    let exit = relay.stop(Duration::from_secs(5))?;
    print!("{}", exit.stdout);
    ensure!(exit.status.success(), "relay exited with {}", exit.status);
    ensure!(
        !topo.relay_has_xdp()?,
        "an XDP program is still attached after the relay stopped"
    );
    println!("== no XDP program left attached; removing the namespaces");
    Ok(())
}
