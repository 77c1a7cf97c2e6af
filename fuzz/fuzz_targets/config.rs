//! Any text as a configuration file: parsing and validation return a config or an error
//! message, never panic, and every error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::config::{Config, InterfaceInfo, System};

/// A machine with the interfaces the seed configs name.
struct Fake;

impl System for Fake {
    fn interface(&self, name: &str) -> Option<InterfaceInfo> {
        let i = ["in0", "in1", "out0", "out1", "eth0", "eth1", "eth2"]
            .iter()
            .position(|n| *n == name)?;
        Some(InterfaceInfo {
            ifindex: i as u32 + 2,
            mac: [0x02, 0, 0, 0, 0, i as u8],
            rx_queues: 1,
            mtu: 1500,
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse("fuzz.yaml", text) {
        Ok(cfg) => {
            if let Err(e) = cfg.validate("fuzz.yaml", &Fake) {
                assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}");
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}"),
    }
});
