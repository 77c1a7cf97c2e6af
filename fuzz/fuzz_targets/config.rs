//! Any text as a configuration file: parsing and validation return a config or an error
//! message, never panic, and every error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::config::{Config, StaticSystem};


fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A machine with the interfaces the seed configs name.
    let sys = StaticSystem::new(&[
        ("in0", 2),
        ("in1", 3),
        ("out0", 4),
        ("out1", 5),
        ("eth0", 6),
        ("eth1", 7),
        ("eth2", 8),
    ]);
    match Config::parse("fuzz.yaml", text) {
        Ok(cfg) => {
            if let Err(e) = cfg.validate("fuzz.yaml", &sys) {
                assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}");
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}"),
    }
});
