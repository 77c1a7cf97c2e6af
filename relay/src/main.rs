//! `relay`: forwards multicast UDP between interfaces with XDP and AF_XDP.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use log::{error, info, warn};
use relay::{
    allmulti::{self, AllMulti},
    client,
    config::Config,
    control::{self, Reply, Request},
    datapath::Datapath,
    loader::Steering,
    membership::Memberships,
    neighbours::Neighbours,
    ondemand::{ListenKey, ListenSlot},
    pool::AllocatorKind,
    preflight,
    querier::Querier,
    report,
    rules::RuleTable,
    stats::StatsView,
    sys::LiveSystem,
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
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Adds one rule to the running relay: FILE holds one entry of `rules:` in YAML (a
    /// mapping, or a list of one `- name: ...` item; `-` reads standard input). The config
    /// file is not changed; a reload forgets the rule.
    AddRule {
        file: PathBuf,
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

Client commands (stats, rules, members, reload, add-rule, remove-rule, ping) find the control
socket through --config FILE (default /etc/relay/rules.yaml) and its `control:`; --control PATH
names it directly. `relay stats --watch` shows rates, redrawn every second.

Files: /etc/relay/rules.yaml (the packaged config), /run/relay/relay.sock (control socket).
More: /usr/share/doc/relay/OPERATIONS.md, or docs/OPERATIONS.md in the source.";

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::Relaxed);
    } else {
        STOP.store(true, Ordering::Relaxed);
    }
}

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
    let result = match cli.client {
        Some(cmd) => client(cmd, cli.config.as_ref()),
        None => run(cli),
    };
    match result {
        Ok(code) => code,
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
        ClientCmd::Ping { target } => (Request::Ping, target.socket(config)?),
        ClientCmd::Reload { target } => (Request::Reload, target.socket(config)?),
        ClientCmd::AddRule { file, target } => {
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
        Reply::Error(e) => anyhow::bail!("the relay refused the request: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let Some(config_path) = cli.config.as_ref() else {
        anyhow::bail!(
            "--config FILE is required to run the relay (or give a subcommand: see --help)"
        );
    };
    let file = config_path.display().to_string();
    let mut config = Config::load(config_path)?;
    if let Some(w) = cli.workers {
        config.workers = Some(w);
    }
    // The file against this machine: its interfaces, and the CPUs `cpus:` names.
    let mut table = RuleTable::compile(&config, &file, &LiveSystem)?;
    if cli.check {
        // Everything else the start needs, short of attaching XDP and binding for real.
        for warning in config.absent_interfaces(&file, &LiveSystem) {
            println!("warning: {warning}");
        }
        for note in preflight::check(&config, &file, &table)? {
            println!("{file}: note: {note}");
        }
        // Said, not done: --check changes nothing.
        let state = allmulti::state_path(&control::socket_path(config.control.as_ref()));
        if let Ok(text) = std::fs::read_to_string(&state) {
            let names: Vec<String> = allmulti::parse(&text)
                .0
                .into_iter()
                .map(|i| i.name)
                .collect();
            if !names.is_empty() {
                println!(
                    "{file}: note: {}: a relay that did not stop cleanly left allmulticast on \
                     ({}); the start turns it off where no group range needs it",
                    state.display(),
                    names.join(", ")
                );
            }
        }
        println!(
            "{file}: OK: {} rules, {} ingress and {} egress interfaces",
            table.rules.len(),
            table.ingress.len(),
            table.egress.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    relay::sys::require_capabilities()?;
    // Before anything is created that must be cleaned up: a SIGTERM during the start then
    // stops the relay through its normal exit, which removes the control socket.
    install_signal_handlers()?;

    let allocator = cli.allocator.unwrap_or(config.allocator);
    info!("frame allocator: {}", allocator.describe());
    if config.poll == relay::config::PollMode::Busy {
        info!("poll: busy: the data path workers busy-poll and never sleep (a whole CPU each)");
    }

    // Dropping `control_socket` (or, once served, `control_file`) removes the socket file, so
    // every way out of this function from here on, an error included, leaves none behind.
    let control_path = preflight::control_path(&file, config.control.as_ref())?;
    let control_socket = control::bind(&control_path)?;
    // Only now that this relay holds the control socket is the state file beside it its own:
    // what a relay killed before it could clean up left on is turned off (or kept, if a range
    // still needs it). Dropping `allmulti` turns off what this relay turned on.
    let mut allmulti = AllMulti::recover(allmulti::state_path(&control_path), &table)?;
    let metrics = config
        .metrics
        .map(|addr| preflight::metrics(&file, addr))
        .transpose()?;
    let mut steering = Steering::load(&table, config.umem.frame_size)?;
    preflight::umem_memlock(&file, &config.umem)?;
    let absent = table
        .ingress
        .iter()
        .map(|i| (&i.name, i.info))
        .chain(table.egress.iter().map(|e| (&e.name, e.info)))
        .filter(|(_, info)| !info.exists());
    for (name, _) in absent {
        warn!("{name}: the interface does not exist yet; its rules are idle until it appears");
    }
    let ingress: Vec<String> = table
        .ingress
        .iter()
        .filter(|i| i.info.exists())
        .map(|i| i.name.clone())
        .collect();
    let workers = preflight::workers(&config, &table);
    preflight::frame_budget(&file, config.umem.frames, &table, workers)?;
    let mut neighbours = None;
    track_next_hops(&mut neighbours, &mut table, &[])?;
    let querier = Arc::new(Querier::start(&config.querier)?);
    track_listeners(&querier, &mut table, &[])?;
    if let Some(n) = &neighbours {
        await_next_hops(n, Duration::from_secs(1));
    }
    let (mut datapath, bindings) = Datapath::new(
        table.clone(),
        config.umem.frames,
        config.umem.frame_size,
        config.bind,
        allocator,
        config.umem.separate.clone(),
        workers,
        config.cpus.clone(),
        config.poll,
    )?;
    for (ifindex, queue, fd) in &bindings {
        steering.set_socket(*ifindex, *queue, fd)?;
    }
    datapath.start()?;
    for iface in &ingress {
        let mode = steering.attach(iface, config.xdp_mode)?;
        info!("{iface}: XDP program attached in {} mode", mode.describe());
    }
    let monitor = datapath.monitor();
    let counters = steering.counters();
    let listening = querier.clone();
    let snapshot: control::Snapshot = Arc::new(move || {
        let (table, stats) = monitor.stats();
        StatsView {
            queriers: listening.describe(),
            sockets: monitor.sockets(),
            ..StatsView::build(
                &table,
                &stats,
                counters.read().ok().as_ref(),
                &monitor.pool(),
                monitor.allocator(),
            )
        }
    });
    // Reload requests from the control socket are carried out on this thread, which owns
    // the XDP program and the data path; the control thread waits for the answer.
    type ChangeRequest = (control::Change, mpsc::SyncSender<Result<String, String>>);
    let (reload_tx, reload_rx) = mpsc::channel::<ChangeRequest>();
    let reload_tx = Mutex::new(reload_tx);
    let reloader: control::Reloader = Arc::new(move |change| {
        let (tx, rx) = mpsc::sync_channel(1);
        reload_tx
            .lock()
            .map_err(|_| "the relay is stopping".to_owned())?
            .send((change, tx))
            .map_err(|_| "the relay is stopping".to_owned())?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the reload did not finish within 30 s".to_owned())?
    });
    let control_file = control_socket.serve(snapshot.clone(), reloader)?;
    if let Some(listener) = metrics {
        control::serve_metrics(listener, snapshot)?;
    }
    let memberships = Memberships::join(&table)?;
    // Ranges cannot be joined: their interfaces pass all multicast instead.
    allmulti.turn_on(&table)?;
    info!(
        "relaying {} rules ({} group memberships held); SIGINT or SIGTERM stops, SIGHUP reloads",
        table.rules.len(),
        memberships.len()
    );
    let mut relay = Running {
        config_path: config_path.clone(),
        config,
        steering,
        datapath,
        memberships,
        allmulti,
        neighbours,
        querier,
        gone: Vec::new(),
        bind_error: None,
    };

    let mut last_watch = std::time::Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        if last_watch.elapsed() >= Duration::from_millis(500) {
            last_watch = std::time::Instant::now();
            relay.watch_interfaces();
        }
        if RELOAD.swap(false, Ordering::Relaxed) {
            match relay.reload() {
                Ok(summary) => info!("SIGHUP: {summary}"),
                Err(e) => error!("SIGHUP: reload refused, the running rules stay: {e:#}"),
            }
        }
        if let Ok((change, reply)) = reload_rx.recv_timeout(Duration::from_millis(50)) {
            let what = match &change {
                control::Change::Reload => "reload".to_owned(),
                control::Change::AddRule { source, .. } => format!("add-rule from {source}"),
                control::Change::RemoveRule(n) => format!("remove-rule {n}"),
            };
            let result = relay.change(change).map_err(|e| format!("{e:#}"));
            match &result {
                Ok(summary) => info!("{what}: {summary}"),
                Err(e) => error!("{what} refused, the running rules stay: {e}"),
            }
            let _ = reply.send(result);
        }
    }

    info!("stopping: detaching XDP and draining");
    let Running {
        mut steering,
        datapath,
        memberships,
        allmulti,
        neighbours,
        ..
    } = relay;
    steering.detach();
    drop(memberships);
    drop(allmulti);
    drop(neighbours);
    let finished = datapath.stop();
    let xdp = steering.counters().read().ok();
    print!(
        "{}",
        report::shutdown(&finished.table, &finished, allocator, xdp.as_ref())
    );
    let account = finished.account;
    drop(finished);
    drop(steering);
    drop(control_file);
    if account.leaked() != 0 {
        error!("{} frames leaked", account.leaked());
        return Ok(ExitCode::FAILURE);
    }
    info!("all {} frames accounted for", account.frames);
    Ok(ExitCode::SUCCESS)
}

/// The running relay's parts that a reload changes.
struct Running {
    config_path: PathBuf,
    config: Config,
    steering: Steering,
    datapath: Datapath,
    memberships: Memberships,
    /// Allmulticast on the ingresses that receive group ranges.
    allmulti: AllMulti,
    /// Follows the next hops of unicast outputs; started with the first such output.
    neighbours: Option<Neighbours>,
    /// The IGMP/MLD querier of on-demand outputs (idle while there are none).
    querier: Arc<Querier>,
    /// Interfaces of the running rules that do not exist right now.
    gone: Vec<String>,
    /// Why binding to a re-created interface failed last time, so it is logged once.
    bind_error: Option<String>,
}

impl Running {
    /// Notices interfaces of the running rules that were deleted, and binds to them again
    /// when an interface of the same name reappears: its sockets and XDP program belonged to
    /// the old device, so the running rules are applied again, which opens sockets on the new
    /// one, attaches the program to a new ingress and joins its groups. Rules on other
    /// interfaces keep flowing throughout.
    fn watch_interfaces(&mut self) {
        // Names and ifindexes only: the table itself (perhaps thousands of rules) is not
        // copied twice a second.
        let known: Vec<(String, u32, bool)> = self.datapath.with_table(|t| {
            t.ingress
                .iter()
                .map(|i| (i.name.clone(), i.info.ifindex, true))
                .chain(
                    t.egress
                        .iter()
                        .map(|e| (e.name.clone(), e.info.ifindex, false)),
                )
                .collect()
        });
        let mut replaced = Vec::new();
        for (name, ifindex, ingress) in known {
            match relay::sys::ifindex(&name) {
                // Never seen: said at start, and nothing to close.
                None if ifindex == 0 => {}
                None if !self.gone.contains(&name) => {
                    warn!(
                        "{name}: the interface is gone; {} until an interface of that name is back",
                        if ingress {
                            "its rules receive nothing"
                        } else {
                            "its outputs' frames are dropped (interface_down)"
                        }
                    );
                    self.gone.push(name);
                }
                Some(now) if now != ifindex => replaced.push((name, ingress, ifindex == 0)),
                _ => {}
            }
        }
        if let Err(e) = self.retire_gone() {
            error!("closing the sockets of interfaces that went away: {e:#}");
        }
        let readdressed = self.datapath.with_table(readdressed);
        if replaced.is_empty() && readdressed.is_empty() {
            return;
        }
        for name in &readdressed {
            info!("{name}: its addresses changed; the outputs with `source: auto` follow");
        }
        for (name, ingress, new) in &replaced {
            self.gone.retain(|g| g != name);
            if *new {
                info!("{name}: the interface has appeared; binding to it");
            } else {
                info!("{name}: the interface is back (a new device); binding to it");
            }
            if *ingress && let Err(e) = self.steering.detach_iface(name) {
                // The kernel took the old link away with the old device.
                info!("{name}: the old XDP link is already gone ({e:#})");
            }
        }
        match self.apply_running() {
            Ok(summary) => {
                self.bind_error = None;
                if replaced.is_empty() {
                    info!("source addresses followed: {summary}");
                } else {
                    info!("rebound: {summary}");
                }
            }
            // Tried again at the next look; said again only if the reason changes.
            Err(e) => {
                let e = format!("{e:#}");
                if self.bind_error.as_ref() != Some(&e) {
                    error!(
                        "binding to the new interface failed; the running rules stay, and it is \
                         tried again every 0.5 s: {e}"
                    );
                    self.bind_error = Some(e);
                }
            }
        }
    }

    /// Re-reads the config file and switches to its rules. Everything is validated before
    /// anything changes; a refused file leaves the running rules as they were. Rules present
    /// before and after keep flowing: their BPF map entries are replaced in place and the
    /// workers switch tables between two passes.
    fn reload(&mut self) -> Result<String> {
        let new_config = Config::load(&self.config_path)?;
        self.apply(new_config)
    }

    /// Carries out a change asked for over the control socket. Rules added or removed this
    /// way change the running relay only: the file is not rewritten, and the next reload
    /// goes back to what it says.
    fn change(&mut self, change: control::Change) -> Result<String> {
        let mut config = self.config.clone();
        match change {
            control::Change::Reload => self.reload(),
            control::Change::AddRule { rule, source } => {
                let rule = relay::config::Rule::parse_one(&source, &rule)?;
                let name = rule.name.clone();
                config.rules.push(rule);
                // An error about the added rule is the added rule's source's, not the file's.
                let file = self.config_path.display().to_string();
                let table = RuleTable::compile(&config, &file, &LiveSystem).map_err(|mut e| {
                    if e.rule.as_deref() == Some(name.as_str()) {
                        e.file = source;
                    }
                    e
                })?;
                self.apply_table(config, table)
            }
            control::Change::RemoveRule(name) => {
                let before = config.rules.len();
                config.rules.retain(|r| r.name != name);
                if config.rules.len() == before {
                    let names: Vec<&str> =
                        self.config.rules.iter().map(|r| r.name.as_str()).collect();
                    anyhow::bail!(
                        "no rule named '{name}' (the running rules: {})",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    );
                }
                if config.rules.is_empty() {
                    // The relay idles, its XDP program detached, until a rule is added or the
                    // file reloaded (a file must still have rules).
                    return self.apply_table(config, RuleTable::default());
                }
                self.apply(config)
            }
        }
    }

    /// Closes the sockets of devices that no longer exist, with their frames taken back, and
    /// makes the XDP program forget them.
    fn retire_gone(&mut self) -> Result<()> {
        let retired = self.datapath.retire_gone()?;
        for r in &retired {
            if r.ingress {
                self.steering.release_iface(r.ifindex)?;
            }
        }
        if self.datapath.is_orphaned() {
            warn!(
                "every interface the relay had sockets on is gone: starting over on a new UMEM, \
                 the rules idle until their interfaces are back"
            );
            let account = self.datapath.rebuild()?;
            info!(
                "the old UMEM: {} frames, {} back in the pool, {} lost with devices, {} leaked",
                account.frames,
                account.in_pool + account.in_fill + account.in_tx,
                account.abandoned,
                account.leaked()
            );
        }
        Ok(())
    }

    /// Validates `new_config` against the system and switches to its rules.
    fn apply(&mut self, new_config: Config) -> Result<String> {
        let file = self.config_path.display().to_string();
        let new = RuleTable::compile(&new_config, &file, &LiveSystem)?;
        self.apply_table(new_config, new)
    }

    /// Applies the running rules again, to interfaces re-created or readdressed under them;
    /// an output whose `source: auto` has no address now drops its frames until it has.
    fn apply_running(&mut self) -> Result<String> {
        let file = self.config_path.display().to_string();
        let new = RuleTable::compile_running(&self.config, &file, &LiveSystem)?;
        self.apply_table(self.config.clone(), new)
    }

    fn apply_table(&mut self, new_config: Config, mut new: RuleTable) -> Result<String> {
        let file = self.config_path.display().to_string();
        // An interface re-created since the last look has new sockets coming: the old ones
        // go first, so the new ones can share the UMEM through a live socket.
        self.retire_gone()?;
        let old = self.datapath.table();
        // The old table's next hops stay followed until the switch is done either way.
        let old_targets = old.unicast_targets();
        track_next_hops(&mut self.neighbours, &mut new, &old_targets)?;
        // Likewise the old table's listeners: an on-demand output both tables have keeps its
        // slot, and so its state.
        let old_listeners = old.listen_targets();
        self.querier.set_timers(&new_config.querier);
        track_listeners(&self.querier, &mut new, &old_listeners)?;
        // Said in the log and in the reply to whoever asked for the change.
        let mut notes = Vec::new();
        for (what, changed) in [
            ("allocator", new_config.allocator != self.config.allocator),
            ("umem", new_config.umem != self.config.umem),
            ("workers", new_config.workers != self.config.workers),
            ("cpus", new_config.cpus != self.config.cpus),
            ("bind", new_config.bind != self.config.bind),
            ("poll", new_config.poll != self.config.poll),
            ("control", new_config.control != self.config.control),
            ("metrics", new_config.metrics != self.config.metrics),
        ] {
            if changed {
                let note = format!("{file}: `{what}` changed; it takes effect at the next start");
                warn!("{note}");
                notes.push(note);
            }
        }
        let switched = self.switch(&old, &new, new_config.xdp_mode);
        // Now only the table in use is followed; its slots are the ones it already holds.
        let kept = if switched.is_ok() { &new } else { &old };
        if let Some(n) = &self.neighbours {
            n.track(&kept.unicast_targets());
        }
        if let Err(e) = listener_slots(&self.querier, kept, &kept.listen_targets()) {
            warn!("on-demand outputs: {e:#}");
        }
        switched?;
        let names = |t: &RuleTable| t.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let (before, after) = (names(&old), names(&new));
        let added = after.iter().filter(|n| !before.contains(n)).count();
        let removed = before.iter().filter(|n| !after.contains(n)).count();
        let changed = new
            .rules
            .iter()
            .filter(|r| old.rules.iter().any(|o| o.name == r.name && o != *r))
            .count();
        // Settings that need a restart keep their running values; the rules are the new ones.
        self.config = Config {
            xdp_mode: new_config.xdp_mode,
            rules: new_config.rules,
            ..self.config.clone()
        };
        let mut summary = format!(
            "{} rules ({added} added, {removed} removed, {changed} changed)",
            new.rules.len()
        );
        if new.rules.is_empty() {
            summary.push_str("; the relay is idle until a rule is added");
        }
        for note in notes {
            summary.push_str(&format!("; warning: {note}"));
        }
        Ok(summary)
    }
}

/// Gives `table`'s unicast outputs their next-hop slots, starting the neighbour tracker at the
/// first one. The tracker follows those targets and `also` (what another table still in use
/// sends to), and nothing else: a target followed before keeps its slot, and so its MAC.
fn track_next_hops(
    neighbours: &mut Option<Neighbours>,
    table: &mut RuleTable,
    also: &[(u32, std::net::IpAddr)],
) -> Result<()> {
    let targets = table.unicast_targets();
    if targets.is_empty() && also.is_empty() && neighbours.is_none() {
        return Ok(());
    }
    let tracker = match neighbours {
        Some(n) => n,
        None => neighbours.insert(
            Neighbours::start().context("starting the neighbour tracker for unicast outputs")?,
        ),
    };
    let mut all = targets.clone();
    all.extend_from_slice(also);
    let mut slots = tracker.track(&all);
    slots.truncate(targets.len());
    table.set_next_hops(slots);
    Ok(())
}

/// Gives `table`'s on-demand outputs their listener slots. The querier follows those and
/// `also` (what another table still in use sends to), and nothing else: an output followed
/// before keeps its slot and state.
fn track_listeners(querier: &Querier, table: &mut RuleTable, also: &[ListenKey]) -> Result<()> {
    let targets = table.listen_targets();
    let mut all = targets.clone();
    all.extend_from_slice(also);
    let mut slots = listener_slots(querier, table, &all)?;
    slots.truncate(targets.len());
    table.set_listeners(slots);
    Ok(())
}

/// The querier's slots for `keys`, which it follows from now on (and nothing else); a new
/// interface among them is named from `table`.
fn listener_slots(
    querier: &Querier,
    table: &RuleTable,
    keys: &[ListenKey],
) -> Result<Vec<Arc<ListenSlot>>> {
    let name_of = |ifindex: u32| {
        table
            .egress
            .iter()
            .find(|e| e.info.ifindex == ifindex)
            .map(|e| e.name.clone())
    };
    querier
        .track(keys, &LiveSystem, &name_of)
        .context("starting the IGMP/MLD querier for on-demand outputs")
}

/// Waits, at most `limit`, for the next hops of the unicast outputs to resolve before the
/// relay starts steering: the first frames then go out rather than count as `no_neighbour`.
/// A next hop that does not answer in time only delays the start by `limit`.
fn await_next_hops(neighbours: &Neighbours, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let states = neighbours.describe();
        let waiting = states.iter().filter(|s| s.mac.is_none()).count();
        if waiting == 0 {
            return;
        }
        if start.elapsed() >= limit {
            warn!(
                "{waiting} of {} unicast next hops not resolved after {} ms; their frames count \
                 as no_neighbour until they are",
                states.len(),
                limit.as_millis()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Egress interfaces whose address `source: auto` stands for is no longer the one `table`
/// writes.
fn readdressed(table: &RuleTable) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    // Each interface's addresses read once per look, however many outputs it has.
    let mut addresses = std::collections::HashMap::new();
    for rule in &table.rules {
        for o in &rule.outputs {
            let egress = &table.egress[o.egress];
            if o.action.source_spec != Some(relay::config::SourceSpec::Auto)
                || !egress.info.exists()
                || out.contains(&egress.name)
            {
                continue;
            }
            let has = addresses
                .entry(egress.name.as_str())
                .or_insert_with(|| relay::sys::interface_addresses(&egress.name));
            let now = relay::config::auto_source(has, rule.group.is_ipv4());
            if now != o.action.source {
                out.push(egress.name.clone());
            }
        }
    }
    out
}

/// What a change did before its switch, so that a failure can put it back.
#[derive(Default)]
struct Undo {
    /// XSKMAP entries that were empty.
    xsks: Vec<(u32, u32)>,
    attached: Vec<String>,
    joined: Vec<relay::membership::Membership>,
    /// Interfaces turned allmulticast on.
    allmulti: Vec<allmulti::Iface>,
}

impl Running {
    /// Moves every part of the relay from `old` to `new`, all or nothing. What can fail
    /// without touching traffic comes first (sockets, XSKMAP entries, allmulticast for new
    /// ranges, XDP on new inputs, joins: the rule map has no key for a new input yet, so its
    /// frames still pass); then the workers switch, then the rule map; only then are old
    /// inputs detached, old groups left and the allmulticast no range needs any more turned
    /// off. A failure at any step puts back what the steps before it did.
    fn switch(
        &mut self,
        old: &RuleTable,
        new: &RuleTable,
        xdp_mode: relay::config::XdpModeConfig,
    ) -> Result<()> {
        let prepared = self.datapath.prepare(new)?;
        let mut undo = Undo::default();
        if let Err(e) = self.stage(new, xdp_mode, &prepared, &mut undo) {
            self.roll_back(undo);
            self.datapath.abort(prepared);
            return Err(e);
        }
        if let Err(e) = self.datapath.commit(prepared, new.clone()) {
            self.back_to(old, undo);
            return Err(e);
        }
        if let Err(e) = self.steering.update_rules(old, new) {
            if let Err(e2) = self.steering.update_rules(new, old) {
                error!("putting the old rules back into the rule map failed too: {e2:#}");
            }
            self.back_to(old, undo);
            return Err(e);
        }
        for a in self.steering.attached() {
            if !new.ingress.iter().any(|i| i.name == a)
                && let Err(e) = self.steering.detach_iface(&a)
            {
                warn!("{a}: {e:#}");
            }
        }
        self.memberships.leave_unwanted(new);
        self.allmulti.turn_off_unneeded(new);
        Ok(())
    }

    /// The steps of a switch that traffic does not see yet.
    fn stage(
        &mut self,
        new: &RuleTable,
        xdp_mode: relay::config::XdpModeConfig,
        prepared: &relay::datapath::Prepared,
        undo: &mut Undo,
    ) -> Result<()> {
        for (ifindex, queue, fd) in &prepared.bindings {
            if self.steering.set_socket(*ifindex, *queue, fd)? {
                undo.xsks.push((*ifindex, *queue));
            }
        }
        // Allmulticast only lets more multicast reach the stack (which drops what no socket
        // wants) until the rule map steers it, so it can come first; a refused attach after it
        // turns it off again.
        undo.allmulti = self.allmulti.turn_on(new)?;
        let attached = self.steering.attached();
        for i in new.ingress.iter().filter(|i| i.info.exists()) {
            if !attached.contains(&i.name) {
                let mode = self.steering.attach(&i.name, xdp_mode)?;
                info!(
                    "{}: XDP program attached in {} mode",
                    i.name,
                    mode.describe()
                );
                undo.attached.push(i.name.clone());
            }
        }
        undo.joined = self.memberships.join_new(new)?;
        Ok(())
    }

    /// Puts the workers back on `old`, then undoes the staged steps.
    fn back_to(&mut self, old: &RuleTable, undo: Undo) {
        if let Err(e) = self.datapath.switch_table(old.clone()) {
            error!("putting the workers back on the running rules: {e:#}");
        }
        self.roll_back(undo);
    }

    fn roll_back(&mut self, undo: Undo) {
        self.allmulti.undo(&undo.allmulti, "the change failed");
        self.memberships.leave(&undo.joined);
        for iface in undo.attached {
            if let Err(e) = self.steering.detach_iface(&iface) {
                warn!("{iface}: {e:#}");
            }
        }
        for (ifindex, queue) in undo.xsks {
            if let Err(e) = self.steering.unset_socket(ifindex, queue) {
                warn!("{e:#}");
            }
        }
    }
}

fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and the
        // sigaction struct is fully initialised (zeroed, then the handler set).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}
