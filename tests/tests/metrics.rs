//! The Prometheus endpoint under clients that misbehave: ten that connect and send nothing
//! and one that asks and never reads (an answer of megabytes, so the relay's writes to it
//! block), or a hundred at once, or more than it serves at once; a scrape is answered all the
//! same. Other paths get 404, HEAD gets the head alone.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use relay_tests::{
    netns::{Netns, require_root},
    relay_proc::{RelayProc, relay_bin},
    topo::Topology,
};

mod common;
use common::serial;

const PORT: u16 = 9469;

/// `rules` rules of `outputs` outputs each, on the topology's interfaces.
fn config(rules: usize, outputs: usize) -> String {
    let mut yaml = format!("metrics: 127.0.0.1:{PORT}\nrules:\n");
    for r in 0..rules {
        yaml += &format!(
            "  - name: rule-{r}\n    input: {{ interface: rin, group: 239.10.{}.{}, port: 5000 }}\n    outputs:\n",
            r / 250,
            r % 250 + 1
        );
        for o in 0..outputs {
            yaml += &format!(
                "      - {{ interface: rout{}, group: 239.20.{r}.{}, port: 6000 }}\n",
                o % 2,
                o + 1
            );
        }
    }
    yaml
}

/// An answer: the head, the body, and how long it took to arrive whole.
struct Answer {
    head: String,
    body: Vec<u8>,
    took: Duration,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }
}

/// Sends `request` to the endpoint in `ns` and reads the answer to its end.
fn ask(ns: &Netns, request: &'static str) -> Result<Answer> {
    ns.run(move || {
        let start = Instant::now();
        let mut c = TcpStream::connect(("127.0.0.1", PORT))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(request.as_bytes())?;
        let mut all = Vec::new();
        c.read_to_end(&mut all).context("reading the answer")?;
        let took = start.elapsed();
        let Some(at) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
            bail!("no head in {:?}", String::from_utf8_lossy(&all));
        };
        Ok(Answer {
            head: String::from_utf8(all[..at].to_vec())?,
            body: all[at + 4..].to_vec(),
            took,
        })
    })
    .join()
    .unwrap()
}

const SCRAPE: &str = "GET /metrics HTTP/1.1\r\nHost: relay\r\nAccept: text/plain\r\n\r\n";

/// A scrape that must be answered, whole and well-formed, within a second.
fn scrape_answers(ns: &Netns, while_: &str) -> Answer {
    let a = ask(ns, SCRAPE).unwrap_or_else(|e| panic!("{while_}: {e:#}"));
    assert!(
        a.head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{while_}: {}",
        a.head
    );
    assert_eq!(
        a.header("Content-Length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(a.body.len()),
        "{while_}: {}",
        a.head
    );
    let body = String::from_utf8_lossy(&a.body);
    assert!(
        body.contains("# TYPE relay_pool_low_water_frames gauge\n"),
        "{while_}: {body}"
    );
    assert!(
        a.took < Duration::from_secs(1),
        "{while_}: the scrape took {:?}",
        a.took
    );
    a
}

/// `n` connections to the endpoint in `ns` that send nothing.
fn silent(ns: &Netns, n: usize) -> Vec<TcpStream> {
    ns.run(move || {
        (0..n)
            .map(|_| Ok(TcpStream::connect(("127.0.0.1", PORT))?))
            .collect::<Result<Vec<_>>>()
    })
    .join()
    .unwrap()
    .unwrap()
}

/// A connection that asks for the metrics and never reads, with a small receive buffer so
/// the answer backs up into the relay's send buffer.
fn never_reads(ns: &Netns) -> TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
    };
    ns.run(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::RcvBuf, &4096)?;
        connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, PORT))?;
        let mut c = TcpStream::from(fd);
        c.write_all(SCRAPE.as_bytes())?;
        Ok(c)
    })
    .join()
    .unwrap()
    .unwrap()
}

/// Bytes the relay has queued and not yet sent to the client at local port `port`, from
/// `ss`, polled until there are some (3 s at most).
fn unsent_to(ns: &Netns, port: u16) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let ss = ns
            .exec(&["ss", "-tnH", "state", "established", "sport", "=", ":9469"])
            .unwrap();
        let queued = ss
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4 && f[3].ends_with(&format!(":{port}")))
                    .then(|| f[1].parse::<u64>().unwrap())
            })
            .next()
            .unwrap_or(0);
        if queued > 0 || Instant::now() > deadline {
            return queued;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_scrape_is_answered_while_clients_stall() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    // 100 rules of 30 outputs: an exposition of megabytes, more than the socket buffers hold.
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &config(100, 30), &[]).unwrap();
    let full = scrape_answers(&topo.relay, "with no other client");

    let stalled = never_reads(&topo.relay);
    let port = stalled.local_addr().unwrap().port();
    let unsent = unsent_to(&topo.relay, port);
    assert!(
        unsent > 0,
        "the relay's answer to the client that never reads did not back up \
         ({} bytes of exposition)",
        full.body.len()
    );
    let idle = silent(&topo.relay, 10);
    scrape_answers(
        &topo.relay,
        "with ten silent clients and one that never reads",
    );
    // Still stuck: the answer was not lost or cut short to make room.
    assert!(unsent_to(&topo.relay, port) > 0);
    drop((stalled, idle));

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
}

#[test]
fn crowds_wrong_paths_and_head() {
    require_root();
    let _serial = serial();
    let topo = Topology::new(2).unwrap();
    let relay = RelayProc::start(&relay_bin(), &topo.relay, &config(2, 2), &[]).unwrap();

    let crowd = silent(&topo.relay, 100);
    let get = scrape_answers(&topo.relay, "with a hundred silent clients");
    drop(crowd);

    let other = ask(&topo.relay, "GET /other HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    assert!(
        other.head.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{}",
        other.head
    );
    let head = ask(&topo.relay, "HEAD /metrics HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    assert!(
        head.head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        head.head
    );
    assert_eq!(head.header("Content-Type"), get.header("Content-Type"));
    let length: usize = head.header("Content-Length").unwrap().parse().unwrap();
    assert!(length > 0, "{}", head.head);
    assert!(head.body.is_empty(), "HEAD sent a body: {:?}", head.body);

    // Past the clients it serves at once, one more is told to come back, not queued; the
    // silent ones are let go at their deadline (2 s) while still connected, and scrapes are
    // answered again.
    let crowd = silent(&topo.relay, relay::metrics::MAX_CLIENTS);
    // Each is counted once its thread starts: until then the next may still be admitted.
    let deadline = Instant::now() + Duration::from_secs(3);
    let busy = loop {
        let a = ask(&topo.relay, SCRAPE).unwrap();
        if !a.head.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break a;
        }
    };
    assert!(
        busy.head
            .starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{}",
        busy.head
    );
    std::thread::sleep(relay::metrics::REQUEST_DEADLINE + Duration::from_millis(500));
    scrape_answers(
        &topo.relay,
        "after the crowd's deadline, the crowd still connected",
    );
    drop(crowd);

    let exit = relay.stop(Duration::from_secs(3)).unwrap();
    assert!(exit.status.success(), "{}", exit.stderr);
}
