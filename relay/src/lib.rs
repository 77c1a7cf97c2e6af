//! relay: a multicast UDP relay built on XDP and AF_XDP.
//!
//! The modules split as quinn splits `quinn-proto` from `quinn`: [`wire`], [`checksum`],
//! [`rewrite`], [`config`], [`rules`], [`nexthop`], [`merge`] and [`pool`] are logic with no I/O, tested
//! without root; [`sys`], [`loader`], [`datapath`], [`links`], [`neighbours`], [`probe`] and
//! [`preflight`] talk to the kernel. [`daemon`] puts them together into the running relay; the
//! binary is its command line.

pub mod allmulti;
pub mod capture;
pub mod checksum;
pub mod client;
pub mod config;
pub mod control;
pub mod craft;
pub mod daemon;
pub mod datapath;
pub mod frag;
pub mod link_kind;
pub mod links;
pub mod listeners;
pub mod loader;
pub mod membership;
pub mod merge;
pub mod metrics;
pub mod neighbours;
pub mod nexthop;
pub mod ondemand;
pub mod pool;
pub mod prefix;
pub mod preflight;
pub mod probe;
pub mod querier;
pub mod rates;
pub mod render;
pub mod report;
pub mod rewrite;
pub mod rtnl;
pub mod rules;
pub mod stats;
pub mod sys;
pub mod topgroups;
pub mod vlan;
pub mod wire;
