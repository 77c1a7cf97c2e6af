//! The querier side of IGMPv3 (RFC 3376) and MLDv2 (RFC 3810) for outputs that follow their
//! listeners: an on-demand output forwards a group only while a host behind its interface is
//! a member.
//!
//! Like `quinn-proto`, this holds no sockets and no clock: [`wire::parse`] turns a received
//! frame into a [`Message`], [`Router::receive`] takes it with the time, timers are data
//! ([`Router::poll_timeout`], [`Router::handle_timeout`]), and what the router wants done is
//! drained from it ([`Router::poll_transmit`] for queries to build with
//! [`wire::build_query`], [`Router::poll_event`] for groups whose forwarding may have
//! changed). The I/O around it lives elsewhere.

pub mod router;
pub mod wire;

pub use router::{
    Compat, Event, Family, FilterMode, GroupView, MAX_GROUPS, MAX_SOURCES, Router, SourceView,
    Time, Timers,
};
pub use wire::{
    Message, Query, QueryToSend, Received, Record, RecordType, Refusal, build_query, parse,
};
