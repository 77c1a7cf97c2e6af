//! `relay`: forwards multicast UDP between interfaces with XDP and AF_XDP.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::error;
use relay::{
    client,
    control::{self, Reply, Request},
    daemon,
    pool::AllocatorKind,
};

#[derive(Parser)]
#[command(
    version,
    about = "Multicast UDP relay: steers matching multicast with XDP into AF_XDP sockets and \
             forwards it, rewritten per output, to the interfaces the rules name",
    after_long_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    client: Option<ClientCmd>,
    /// The YAML rules file (runs the relay).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Frame allocator; overrides `allocator:` in the file.
    #[arg(long, value_enum)]
    allocator: Option<AllocatorKind>,
    /// Data path threads; overrides `workers:` in the file.
    #[arg(long)]
    workers: Option<usize>,
    /// Check everything the start needs, without starting, and exit: 0 if it would run.
    ///
    /// The file against this machine's interfaces and CPUs, the capabilities, the control
    /// socket path, the metrics address (bound and closed), the XDP program (loaded, not
    /// attached), the UMEM against RLIMIT_MEMLOCK, and a throw-away AF_XDP bind on every
    /// queue the relay binds (zero-copy support, a queue another relay holds). Notes, such as
    /// that `bind: auto` will run in copy mode, go to standard output; the first problem is
    /// the error, with the message the start would give.
    #[arg(long)]
    check: bool,
}

/// Which relay a client command talks to.
#[derive(clap::Args)]
struct Target {
    /// The relay's config file: its `control:` names the socket [default:
    /// /etc/relay/rules.yaml].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control socket; overrides the config file's `control:`.
    #[arg(long)]
    control: Option<PathBuf>,
}

impl Target {
    /// The socket to talk to; `config` is a `--config` given before the subcommand.
    fn socket(&self, config: Option<&PathBuf>) -> Result<PathBuf> {
        let file = self
            .config
            .as_ref()
            .or(config)
            .map_or_else(|| PathBuf::from(client::DEFAULT_CONFIG), PathBuf::clone);
        client::control_path(
            self.control.as_deref(),
            &file,
            self.config.is_some() || config.is_some(),
        )
    }
}

/// `--watch [SECONDS]` and `--count N`.
#[derive(clap::Args)]
struct Watch {
    /// Print again every SECONDS (default 1), redrawn in place on a terminal; `relay stats`
    /// then shows rates (packets/s, bits/s, drops/s) over the interval. Ctrl-C stops.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
    /// With --watch: stop after N updates.
    #[arg(long, value_name = "N", requires = "watch")]
    count: Option<u64>,
}

/// Talk to a running relay over its control socket.
#[derive(Subcommand)]
enum ClientCmd {
    /// Counters per rule and output, the XDP program's, the data path's, each socket's, and
    /// the pool's.
    Stats {
        /// Print JSON instead of a table (with --watch: one line of rates per update).
        #[arg(long)]
        json: bool,
        /// Add the busiest groups of each rule with a group range (at most 32 per rule).
        #[arg(long)]
        groups: bool,
        #[command(flatten)]
        watch: Watch,
        #[command(flatten)]
        target: Target,
    },
    /// The rules as they run: each input, and where and how each output sends (TTL or hop
    /// limit, remapping, VLAN, DSCP, unicast, source rewrites, on demand).
    Rules {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Re-reads the config file and switches to its rules without dropping a packet of the
    /// rules that stay (SIGHUP does the same). A file that does not validate is refused.
    /// What `--check` warns about (an interface that does not exist) is printed and logged.
    Reload {
        /// Refuse the file when it draws warnings (exit 1; the running rules stay).
        #[arg(long)]
        strict: bool,
        /// Validate the file as a reload would, in the running relay, and say which rules
        /// would be added, removed and changed, without applying it; exit 1 when the reload
        /// would be refused.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Adds one rule to the running relay: FILE holds one entry of `rules:` in YAML (a
    /// mapping, or a list of one `- name: ...` item; `-` reads standard input). The config
    /// file is not changed; a reload forgets the rule.
    AddRule {
        file: PathBuf,
        /// Refuse the rule when it draws warnings (an interface that does not exist).
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Removes a rule, by name, from the running relay (until the next reload). Removing the
    /// last one leaves the relay running idle.
    RemoveRule {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// The IGMP/MLD state on the interfaces of on-demand outputs: who is querier, and
    /// each group's listeners (filter mode, sources, expiry, last reporter).
    Members {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        watch: Watch,
        #[command(flatten)]
        target: Target,
    },
    /// Copies of the frames the relay receives and sends, as pcapng (tcpdump on the relay
    /// host sees none of them: XDP takes them first). Taken off the data path through a
    /// bounded queue: a capture never slows forwarding; what it could not take is counted
    /// as capture_dropped in `relay stats`. Ctrl-C stops.
    Capture {
        /// Frames of this rule only.
        #[arg(long, value_name = "NAME")]
        rule: Option<String>,
        /// Frames sent on this interface only, and the received frames of rules that send
        /// there.
        #[arg(long, value_name = "IFACE")]
        output: Option<String>,
        /// Stop after N frames (received and sent together) [default: until Ctrl-C].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// The pcapng file to write; `-` writes to standard output (`-w - | tcpdump -r -`).
        #[arg(short = 'w', value_name = "FILE")]
        write: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Checks that the relay answers.
    Ping {
        #[command(flatten)]
        target: Target,
    },
}

const AFTER_HELP: &str = "\
Running:
  relay --config /etc/relay/rules.yaml --check   check against this machine, exit 0 if it would run
                                                 (nothing is attached; notes such as copy mode
                                                 are printed, the first problem is the error)
  relay --config /etc/relay/rules.yaml           run (as root, or with CAP_NET_ADMIN, CAP_NET_RAW,
                                                 CAP_BPF, CAP_PERFMON and CAP_IPC_LOCK)

Signals: SIGTERM/SIGINT stop (detach XDP, drain, print counters, exit 0); SIGHUP reloads the file.

Config file (YAML): allocator (lockfree (or lock-free)|mutex), umem {frames, frame_size, separate
[interfaces with a UMEM of their own]}, xdp_mode
(auto|native|skb), bind (auto|zerocopy|copy), workers (default: one per ingress rx queue,
up to the CPUs), cpus (CPUs to pin the workers to), poll (sleep|busy), control (socket
path), metrics (address
for Prometheus), rules: [{name, input {interface, group, port?, source?, vlan? (1-4094 or
untagged; any when absent)}, outputs [{interface, group?, port?, ttl? (alias hop_limit),
vlan? (tag with this VID; untagged when absent), dscp? (0-63; ECN kept), destination?,
source?, source_port?, on_demand? (only while a host on the interface is a member)}]}],
querier {query_interval, query_response_interval, last_member_query_interval, robustness}
(IGMP/MLD timers for on_demand outputs). Groups and sources are IPv4 or IPv6,
one family per rule. Unknown keys are errors. An interface that does not exist yet is a
warning: its rules start idle and come alive when it appears.

Client commands (stats, rules, members, reload, add-rule, remove-rule, capture, ping) find the control
socket through --config FILE (default /etc/relay/rules.yaml) and its `control:`; --control PATH
names it directly. `relay stats --watch` shows rates, redrawn every second.

Files: /etc/relay/rules.yaml (the packaged config), /run/relay/relay.sock (control socket).
More: /usr/share/doc/relay/OPERATIONS.md, or docs/OPERATIONS.md in the source.";

fn main() -> ExitCode {
    // The XDP loader's own debug output (BTF, relocations) is not the relay's: RUST_LOG=debug
    // leaves it at info unless RUST_LOG names it (`aya=debug`), which then wins.
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(log::LevelFilter::Info)
        .filter_module("aya", log::LevelFilter::Info)
        .format_timestamp_millis();
    if let Ok(spec) = std::env::var("RUST_LOG") {
        logger.parse_filters(&spec);
    }
    logger.init();
    let cli = Cli::parse();
    let is_client = cli.client.is_some();
    let result = match cli.client {
        Some(cmd) => client(cmd, cli.config.as_ref()),
        None => match cli.config {
            Some(config) => daemon::run(daemon::Options {
                config,
                allocator: cli.allocator,
                workers: cli.workers,
                check: cli.check,
            }),
            None => Err(anyhow::anyhow!(
                "--config FILE is required to run the relay (or give a subcommand: see --help)"
            )),
        },
    };
    match result {
        Ok(code) => code,
        // `relay stats --watch | head`: head has what it wanted.
        Err(e) if is_client && client::stdout_closed(&e) => ExitCode::SUCCESS,
        // A client's error is a message to the person who typed the command, not a log line.
        Err(e) if is_client => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn client(cmd: ClientCmd, config: Option<&PathBuf>) -> Result<ExitCode> {
    let (req, path) = match &cmd {
        ClientCmd::Stats {
            json,
            groups,
            watch,
            target,
        } => {
            let show = if *json {
                client::Show::Json
            } else {
                client::Show::Table
            };
            let show = client::View::Stats {
                show,
                groups: *groups,
            };
            return client::show(&target.socket(config)?, show, watch.watch, watch.count);
        }
        ClientCmd::Members {
            json,
            watch,
            target,
        } => {
            let show = client::View::Members { json: *json };
            return client::show(&target.socket(config)?, show, watch.watch, watch.count);
        }
        ClientCmd::Rules { json, target } => {
            let show = client::View::Rules { json: *json };
            return client::show(&target.socket(config)?, show, None, None);
        }
        ClientCmd::Capture {
            rule,
            output,
            count,
            write,
            target,
        } => {
            let filter = relay::capture::Filter {
                rule: rule.clone(),
                output: output.clone(),
            };
            return client::capture(&target.socket(config)?, filter, *count, write);
        }
        ClientCmd::Ping { target } => (Request::Ping, target.socket(config)?),
        ClientCmd::Reload {
            strict,
            dry_run: true,
            target,
        } => {
            // The file the relay must be running, when one was named; relative to the
            // client's directory, which the relay does not share.
            let file = target.config.as_ref().or(config).map(std::path::absolute);
            let req = Request::ReloadDryRun {
                strict: *strict,
                file: file.transpose()?,
            };
            return client::dry_run(&target.socket(config)?, &req);
        }
        ClientCmd::Reload { strict, target, .. } => {
            (Request::Reload { strict: *strict }, target.socket(config)?)
        }
        ClientCmd::AddRule {
            file,
            strict,
            target,
        } => {
            let (rule, source) = if file.as_os_str() == "-" {
                (
                    std::io::read_to_string(std::io::stdin())
                        .context("reading the rule from standard input")?,
                    "standard input".to_owned(),
                )
            } else {
                (
                    std::fs::read_to_string(file)
                        .with_context(|| format!("reading {}", file.display()))?,
                    file.display().to_string(),
                )
            };
            // Checked here first, so a rule that does not parse is refused with its own
            // file's name before anything is sent.
            relay::config::Rule::parse_one(&source, &rule)?;
            let req = Request::AddRule {
                rule,
                source: Some(source),
                strict: *strict,
            };
            (req, target.socket(config)?)
        }
        ClientCmd::RemoveRule { name, target } => (
            Request::RemoveRule { name: name.clone() },
            target.socket(config)?,
        ),
    };
    match control::request(&path, &req)? {
        Reply::Pong { version } => println!("relay {version} is running"),
        Reply::Reloaded(summary) => println!("done: {summary}"),
        Reply::Stats(_) => anyhow::bail!("the relay answered with counters to {req:?}"),
        Reply::Capturing(_) => anyhow::bail!("the relay started a capture in answer to {req:?}"),
        Reply::Error(e) => anyhow::bail!("the relay refused the request: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}
