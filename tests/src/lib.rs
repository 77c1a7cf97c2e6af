//! The veth-namespace harness: throw-away network namespaces joined by veth pairs, multicast
//! senders and receivers that run inside them, and a handle on a running `relay` process.
//!
//! Everything it creates is removed when its guard drops, also when a test panics. Traffic
//! stays inside the namespaces: veth pairs with no route out, hosts in 198.18.0.0/15, groups in
//! 239.0.0.0/8.

pub mod bench;
pub mod demo;
pub mod genproc;
pub mod loadgen;
pub mod mroute;
pub mod netns;
pub mod relay_proc;
pub mod soak;
pub mod topo;
pub mod traffic;
pub mod vlan_tc;
pub mod xdpgen;
