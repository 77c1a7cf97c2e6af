//! Any bytes as a frame an IGMP/MLD socket received: parsing must not panic, and whatever
//! parses, fed to a router of its family at a time taken from the input (together with the
//! timeouts that follow), must not panic either, nor leave a deadline in the past; a
//! query the router then wants sent must build and parse back.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use relay::listeners::{Family, Router, Timers, build_query, parse};

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose when the message arrives; the rest is the frame.
    let Some((ctl, frame)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Ok(received) = parse(frame) else {
        return;
    };
    let (family, own) = match received.source {
        IpAddr::V4(_) => (Family::V4, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))),
        IpAddr::V6(_) => (
            Family::V6,
            IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5)),
        ),
    };
    let start = Duration::from_secs(1000);
    let mut router = Router::new(family, own, Timers::default(), start);
    let at = start + Duration::from_millis(u64::from(u16::from_be_bytes(*ctl)) * 10);
    router.receive(received.source, &received.message, at);
    // A few rounds, to reach what the message's own effects schedule (retransmissions, expiry).
    for _ in 0..4 {
        let Some(next) = router.poll_timeout() else {
            break;
        };
        router.handle_timeout(next);
        assert!(router.poll_timeout().is_none_or(|t| t > next));
        while let Some(q) = router.poll_transmit() {
            let built = build_query(&q, [2, 0, 0, 0, 0, 1], own);
            assert!(parse(&built).is_ok(), "a built query parses: {q:?}");
        }
    }
    let _ = router.groups(at);
    while router.poll_event().is_some() {}
});
