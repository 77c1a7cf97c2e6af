//! The Prometheus endpoint: `GET /metrics` (and `HEAD`) over HTTP/1.0 or 1.1, one request per
//! connection.
//!
//! Why std and `httparse` rather than an HTTP server crate: the endpoint answers one small,
//! rendered-in-memory document, and what it must guarantee is that no client (one that never
//! sends, one that never reads, a hundred at once) delays a scrape. `tiny_http` reads with no
//! timeout and grows its thread pool without bound; hyper needs an async runtime that this
//! daemon otherwise has no use for. So each connection gets a thread of its own, at most
//! [`MAX_CLIENTS`] at once, with a deadline for the request and one for the answer; the request
//! head is parsed by `httparse` (hyper's parser). A stuck client holds its own thread until its
//! deadline and nothing else.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{info, warn};

use crate::control::Snapshot;

/// Connections served at once. More than a scraper or two ever opens; past it a connection is
/// answered 503 at once rather than queued behind the ones that hold the slots.
pub const MAX_CLIENTS: usize = 256;
/// From accepting a connection to the end of its request head: a scraper sends its request as
/// soon as it connects.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// For writing the answer: Prometheus's default scrape timeout, after which the scraper has
/// given up on it anyway.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// The text format's media type.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// Serves the endpoint on a thread of its own, on a listener bound early in the start
/// (`preflight::metrics`), so that an address that cannot be bound stops the relay before it
/// touches an interface.
pub fn serve(listener: TcpListener, snapshot: Snapshot) -> Result<()> {
    let addr = listener.local_addr()?;
    info!("Prometheus metrics at http://{addr}/metrics");
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("relay-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => admit(stream, &snapshot, &clients),
                    Err(e) => warn!("metrics {addr}: accept: {e}"),
                }
            }
        })?;
    Ok(())
}

/// Hands a connection to a thread of its own, or answers 503 when [`MAX_CLIENTS`] are served.
fn admit(stream: TcpStream, snapshot: &Snapshot, clients: &Arc<AtomicUsize>) {
    if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        clients.fetch_sub(1, Ordering::AcqRel);
        // Nothing here may block. The request is read first where it has arrived: closing a
        // socket with unread data resets it, and the client would lose the answer. The answer
        // is a few bytes into an empty send buffer.
        let _ = stream.set_nonblocking(true);
        let _ = (&stream).read(&mut [0u8; MAX_HEAD]);
        let _ = (&stream).write_all(&plain("503 Service Unavailable", "busy: try again\n"));
        let _ = stream.shutdown(std::net::Shutdown::Write);
        return;
    }
    let (snapshot, slot) = (snapshot.clone(), Slot(clients.clone()));
    let spawned = std::thread::Builder::new()
        .name("relay-metrics-client".into())
        // The request, the rendered text and the socket calls: all on the heap or small.
        .stack_size(256 * 1024)
        .spawn(move || {
            let _slot = slot;
            // A client that goes away or runs out of time only ends its own connection.
            let _ = answer(&stream, &snapshot);
        });
    if let Err(e) = spawned {
        warn!("metrics: no thread for a client: {e}");
    }
}

/// A connection's place in the count of those served; given back when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request and answers it.
fn answer(stream: &TcpStream, snapshot: &Snapshot) -> io::Result<()> {
    let started = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let request = loop {
        match Request::parse(&buf) {
            Parsed::Complete(r) => break r,
            Parsed::Invalid => {
                let reply = plain("400 Bad Request", "bad request\n");
                return write_by(stream, &reply, Instant::now() + RESPONSE_DEADLINE);
            }
            Parsed::Partial if buf.len() >= MAX_HEAD => {
                let reply = plain("431 Request Header Fields Too Large", "request too long\n");
                return write_by(stream, &reply, Instant::now() + RESPONSE_DEADLINE);
            }
            Parsed::Partial => {}
        }
        let left = time_left(started + REQUEST_DEADLINE)?;
        stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 1024];
        let n = stream
            .take((MAX_HEAD - buf.len()) as u64)
            .read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let reply = route(&request, || snapshot().render_prometheus());
    write_by(stream, &reply, Instant::now() + RESPONSE_DEADLINE)
}

/// What was asked: enough of the request line to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Complete(Request),
    Partial,
    Invalid,
}

impl Request {
    fn parse(buf: &[u8]) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => Parsed::Complete(Request {
                method: req.method.unwrap_or_default().to_owned(),
                path: req.path.unwrap_or_default().to_owned(),
                version: req.version.unwrap_or(1),
            }),
            Ok(httparse::Status::Partial) => Parsed::Partial,
            Err(_) => Parsed::Invalid,
        }
    }
}

/// The whole answer to `req`, the exposition rendered (by `render`) only when it is asked for.
pub fn route(req: &Request, render: impl FnOnce() -> String) -> Vec<u8> {
    // Answered in the version asked in, at most 1.1; the connection always closes after.
    let version = if req.version == 0 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    // HEAD answers as GET would, without the body.
    let with_body = req.method != "HEAD";
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET" | "HEAD", "/metrics") => response(
            version,
            "200 OK",
            &[("Content-Type", EXPOSITION)],
            &render(),
            with_body,
        ),
        (_, "/metrics") => response(
            version,
            "405 Method Not Allowed",
            &[("Content-Type", PLAIN), ("Allow", "GET, HEAD")],
            "GET or HEAD\n",
            with_body,
        ),
        _ => response(
            version,
            "404 Not Found",
            &[("Content-Type", PLAIN)],
            "not found: the metrics are at /metrics\n",
            with_body,
        ),
    }
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    response("HTTP/1.1", status, &[("Content-Type", PLAIN)], body, true)
}

fn response(
    version: &str,
    status: &str,
    headers: &[(&str, &str)],
    body: &str,
    with_body: bool,
) -> Vec<u8> {
    let mut s = format!("{version} {status}\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if with_body {
        s.push_str(body);
    }
    s.into_bytes()
}

fn time_left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// Writes all of `bytes` by `deadline`: a timeout per write would let a client that reads a
/// byte at a time hold the connection for ever.
fn write_by(mut stream: &TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(time_left(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Config, tests::fake},
        datapath::DatapathStats,
        pool::{AllocatorKind, PoolStats},
        rules::RuleTable,
        stats::StatsView,
    };
    use openmetrics_parser::prometheus::parse_prometheus;
    use std::collections::{BTreeMap, BTreeSet};

    /// A view with every kind of output (remapped, on demand, unicast), a label value that
    /// needs escaping, and the XDP counters: every family has samples.
    fn view() -> StatsView {
        let c = Config::parse(
            "t",
            "rules:\n\
             \x20 - name: video-a\n\
             \x20   input: {interface: in0, group: 239.1.1.1, port: 5000}\n\
             \x20   outputs:\n\
             \x20     - {interface: out0}\n\
             \x20     - {interface: out1, group: 239.2.2.2, port: 6000, vlan: 30}\n\
             \x20     - {interface: out1, group: 239.3.3.3, on_demand: true}\n\
             \x20     - {interface: out0, destination: 198.18.2.2, port: 7000}\n\
             \x20 - name: \"b\\\"c\"\n\
             \x20   input: {interface: in0, group: 239.1.1.2}\n\
             \x20   outputs: [{interface: out1}]\n\
             \x20 - name: feed\n\
             \x20   inputs: [{interface: in0, group: 239.1.1.3, port: 5000}, {interface: out1, group: 239.1.1.4, port: 5000}]\n\
             \x20   merge: rtp\n\
             \x20   outputs: [{interface: out0}]\n",
        )
        .unwrap();
        let t = RuleTable::compile(&c, "t", &fake()).unwrap();
        let mut d = DatapathStats::new([4, 1, 1].into_iter());
        d.rules[2].merge.leg(1).first = 5;
        d.rules[0].packets = 10;
        d.rules[0].bytes = 1000;
        d.rules[0].outputs[1].packets = 9;
        d.rules[0].outputs[1].ttl_expired = 1;
        let pool = PoolStats {
            capacity: 64,
            free: 60,
            low_water: 50,
            rejected: 0,
        };
        StatsView {
            sockets: vec![crate::datapath::SocketCounters {
                interface: "in0".into(),
                queue: 0,
                ingress: true,
                rx_ring_full: 7,
                fill_ring_empty: 5,
                ..Default::default()
            }],
            ..StatsView::build(
                &t,
                &d,
                Some(&[12, 10, 10, 2, 0, 0, 0, 0, 0]),
                &pool,
                AllocatorKind::Lockfree,
            )
        }
    }

    /// Family name -> the label sets of its samples, from a strict parse of `text`. Each
    /// sample line is parsed under its family's HELP and TYPE on its own: the parser also
    /// demands one set of label names per family, which Prometheus does not (a unicast output
    /// is labelled `destination` where a multicast one has `group`).
    fn parse(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
        let mut families: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        let (mut help, mut kind, mut family) = ("", "", String::new());
        for line in text.lines() {
            if line.starts_with("# HELP ") {
                help = line;
                continue;
            }
            if let Some(t) = line.strip_prefix("# TYPE ") {
                kind = line;
                family = t.split(' ').next().unwrap().to_owned();
                assert!(
                    help.starts_with(&format!("# HELP {family} ")),
                    "no HELP before {line}"
                );
                assert!(
                    families.insert(family.clone(), Vec::new()).is_none(),
                    "{family} twice"
                );
                continue;
            }
            let one = format!("{help}\n{kind}\n{line}\n");
            let exposition = parse_prometheus(&one).unwrap_or_else(|e| panic!("{e:?}: {line}"));
            let parsed = exposition
                .families
                .get(&family)
                .unwrap_or_else(|| panic!("{line} is not of the family {family}"));
            let labels = parsed
                .iter_samples()
                .map(|s| {
                    s.get_labelset()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<BTreeMap<_, _>>()
                })
                .collect::<Vec<_>>();
            assert_eq!(labels.len(), 1, "{line}");
            families.get_mut(&family).unwrap().extend(labels);
        }
        families
    }

    #[test]
    fn the_exposition_is_valid_prometheus_text() {
        let text = view().render_prometheus();
        let families = parse(&text);
        // The whole text at once, too, for what spans lines (the parser's one rule that
        // Prometheus lacks aside): without the unicast output, whose label names differ.
        let multicast_only = text
            .lines()
            .filter(|l| !l.contains("destination="))
            .fold(String::new(), |acc, l| acc + l + "\n");
        let whole = parse_prometheus(&multicast_only).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            whole.families.keys().cloned().collect::<BTreeSet<_>>(),
            families.keys().cloned().collect::<BTreeSet<_>>()
        );
        for (name, samples) in &families {
            assert!(!samples.is_empty(), "{name} has no samples in {text}");
        }
        // The quote in the rule name is escaped (the parser hands values back as written).
        assert!(
            families["relay_rule_received_packets_total"]
                .iter()
                .any(|l| l["rule"] == r#"b\"c"#),
            "{:?}",
            families["relay_rule_received_packets_total"]
        );
        let unicast = &families["relay_output_sent_packets_total"];
        assert!(
            unicast
                .iter()
                .any(|l| l.get("destination").map(String::as_str) == Some("198.18.2.2"))
        );
        let reasons: BTreeSet<&str> = families["relay_output_dropped_packets_total"]
            .iter()
            .map(|l| l["reason"].as_str())
            .collect();
        assert!(
            reasons.contains("ttl_expired") && reasons.contains("no_frame"),
            "{reasons:?}"
        );
    }

    /// The metric names in a PromQL expression, each with its label matchers (`name`, `op`,
    /// `value`), and the labels of its `by (...)` clauses.
    type Selector = (String, Vec<(String, String, String)>);

    fn selectors(expr: &str) -> (Vec<Selector>, Vec<String>) {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut found = Vec::new();
        let mut at = 0;
        while let Some(i) = expr[at..].find("relay_").map(|i| at + i) {
            let name: String = expr[i..].chars().take_while(|c| ident(*c)).collect();
            at = i + name.len();
            if expr[..i].chars().next_back().is_some_and(ident) {
                continue;
            }
            let mut matchers = Vec::new();
            if let Some(body) = expr[at..].strip_prefix('{') {
                let body = &body[..body.find('}').expect("an unclosed selector")];
                for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    let op_at = m.find(['=', '!']).expect("a label matcher");
                    let op: String = m[op_at..]
                        .chars()
                        .take_while(|c| "=!~".contains(*c))
                        .collect();
                    let value = m[op_at + op.len()..].trim().trim_matches('"');
                    matchers.push((m[..op_at].trim().to_owned(), op, value.to_owned()));
                }
            }
            found.push((name, matchers));
        }
        let by = expr
            .match_indices("by (")
            .flat_map(|(i, _)| {
                let rest = &expr[i + 4..];
                rest[..rest.find(')').unwrap()]
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        (found, by)
    }

    /// Every query string in the dashboard: panel targets and template variables.
    fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition" | "query", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
            _ => {}
        }
    }

    /// The dashboard and the exposition cannot drift apart: every metric the dashboard
    /// queries is exposed, with every label it selects, groups by or matches a value of.
    #[test]
    fn the_dashboard_queries_only_what_the_relay_exposes() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/grafana/relay.json"
        );
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let families = parse(&view().render_prometheus());
        let mut exprs = Vec::new();
        queries(&dashboard, &mut exprs);
        // Labels Prometheus adds when it scrapes, not the relay.
        let scraped = ["instance", "job"];
        let mut used = BTreeSet::new();
        for expr in &exprs {
            let (found, by) = selectors(expr);
            for (name, matchers) in &found {
                used.insert(name.clone());
                let samples = families.get(name).unwrap_or_else(|| {
                    panic!("{path}: `{expr}` queries {name}, which the relay does not expose")
                });
                let has = |label: &str| samples.iter().any(|s| s.contains_key(label));
                for (label, op, value) in matchers {
                    if scraped.contains(&label.as_str()) {
                        continue;
                    }
                    assert!(has(label), "{path}: `{expr}`: {name} has no label {label}");
                    // Fixed values (not a dashboard variable) must be values the relay writes.
                    let wanted: Vec<&str> = match op.as_str() {
                        "=" => vec![value.as_str()],
                        "=~" if !value.contains('$') => value.split('|').collect(),
                        _ => vec![],
                    };
                    for w in wanted {
                        assert!(
                            samples
                                .iter()
                                .any(|s| s.get(label).map(String::as_str) == Some(w)),
                            "{path}: `{expr}`: no {name} sample has {label}=\"{w}\""
                        );
                    }
                }
            }
            for label in by.iter().filter(|l| !scraped.contains(&l.as_str())) {
                for (name, _) in &found {
                    assert!(
                        families[name].iter().all(|s| s.contains_key(label)),
                        "{path}: `{expr}` groups {name} by {label}, which it lacks"
                    );
                }
            }
        }
        // The dashboard covers the exposition (a family added later gets a panel) and has
        // queries at all.
        let exposed: BTreeSet<String> = families.keys().cloned().collect();
        assert_eq!(used, exposed, "{path}: metrics queried vs exposed");
    }

    fn req(method: &str, path: &str, version: u8) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            version,
        }
    }

    fn split(reply: &[u8]) -> (String, String) {
        let text = String::from_utf8(reply.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn answers_get_and_head_on_metrics_and_404_elsewhere() {
        let body = "relay_pool_low_water_frames 5\n";
        let (head, got) = split(&route(&req("GET", "/metrics", 1), || body.into()));
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {EXPOSITION}\r\nContent-Length: {}\r\nConnection: close",
                body.len()
            )
        );
        assert_eq!(got, body);
        // HEAD: the same head, no body.
        let (head_only, none) = split(&route(&req("HEAD", "/metrics?x=1", 1), || body.into()));
        assert_eq!(head_only, head);
        assert_eq!(none, "");
        // Answered in the version asked in.
        let (head10, _) = split(&route(&req("GET", "/metrics", 0), || body.into()));
        assert!(head10.starts_with("HTTP/1.0 200 OK\r\n"), "{head10}");
        for (method, path, status) in [
            ("GET", "/", "404 Not Found"),
            ("GET", "/metricsx", "404 Not Found"),
            ("HEAD", "/other", "404 Not Found"),
            ("POST", "/metrics", "405 Method Not Allowed"),
        ] {
            let reply = route(&req(method, path, 1), || {
                panic!("rendered for {method} {path}")
            });
            let (head, body) = split(&reply);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(body.len(), if method == "HEAD" { 0 } else { len }, "{head}");
        }
        let (head405, _) = split(&route(&req("DELETE", "/metrics", 1), String::new));
        assert!(head405.contains("\r\nAllow: GET, HEAD"), "{head405}");
    }

    #[test]
    fn parses_complete_partial_and_invalid_heads() {
        assert_eq!(
            Request::parse(b"GET /metrics HTTP/1.0\r\nAccept: */*\r\n\r\n"),
            Parsed::Complete(req("GET", "/metrics", 0))
        );
        assert_eq!(Request::parse(b""), Parsed::Partial);
        assert_eq!(
            Request::parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        );
        assert_eq!(
            Request::parse(b"\x16\x03\x01 not http\r\n\r\n"),
            Parsed::Invalid
        );
    }
}
