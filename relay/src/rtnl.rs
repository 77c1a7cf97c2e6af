//! Asking the kernel's routing netlink (rtnetlink) one thing and waiting for its answer, and
//! reading the messages of a datagram: shared by the neighbour tracker and the allmulticast
//! switch, which each keep a socket of their own, and (for generic netlink's messages) by
//! the interface kind checks.

use std::{
    io,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr};

/// An error that means "nothing yet", not a failure: try again.
pub fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Sends `msg` (request number `seq` + 1, which `seq` becomes) on `socket` and waits up to
/// `timeout` for its answer: the message, `None` for a bare acknowledgement, or the kernel's
/// error. `buf` is the receive buffer. The socket needs a receive timeout, so a lost answer
/// cannot hold the caller past `timeout`. `M` is the protocol's message: rtnetlink's, or a
/// generic netlink family's.
pub fn request<M>(
    socket: &Socket,
    seq: &mut u32,
    buf: &mut Vec<u8>,
    msg: M,
    flags: u16,
    timeout: Duration,
) -> io::Result<Option<M>>
where
    M: NetlinkSerializable + NetlinkDeserializable,
{
    *seq = seq.wrapping_add(1);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = *seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send_to(&out, &SocketAddr::new(0, 0), 0)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        buf.clear();
        match socket.recv(buf, 0) {
            Ok(_) => {}
            Err(e) if transient(&e) => continue,
            Err(e) => return Err(e),
        }
        // Answers to earlier requests that timed out are skipped by their sequence number.
        for m in messages_of::<M>(buf) {
            if m.header.sequence_number != *seq {
                continue;
            }
            return match m.payload {
                NetlinkPayload::InnerMessage(inner) => Ok(Some(inner)),
                NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
                _ => Ok(None),
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no answer from the kernel",
    ))
}

/// The rtnetlink messages in one datagram; one that does not parse is skipped (its length
/// field still says where the next one starts).
pub fn messages(buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    messages_of(buf)
}

/// As [`messages`], for any netlink protocol's messages `M`.
pub fn messages_of<M: NetlinkDeserializable>(buf: &[u8]) -> Vec<NetlinkMessage<M>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        match NetlinkMessage::<M>::deserialize(&buf[off..off + len]) {
            Ok(m) => out.push(m),
            Err(e) => log::debug!("skipping an rtnetlink message that did not parse: {e}"),
        }
        off += (len + 3) & !3;
    }
    out
}
