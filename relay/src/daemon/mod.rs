//! The daemon: starts the relay from its config file, serves the control socket, follows
//! interfaces, signals and reloads, and stops it cleanly.
//!
//! [`run`] is the start and the main loop; `running` holds what a running relay owns and how
//! it follows interfaces, `reload` how a change reaches it, `switch` how the rules move from
//! one table to the next (or back), `tracking` the next hops and listeners the rules send to,
//! and `signals` the stop and reload flags the signals set.

mod reload;
mod running;
mod signals;
mod switch;
mod tracking;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex, atomic::Ordering, mpsc},
    time::Duration,
};

use anyhow::Result;
use log::{error, info, warn};

use crate::{
    allmulti::{self, AllMulti},
    config::{Config, InterfaceInfo},
    control,
    datapath::{Datapath, Settings},
    loader::Steering,
    membership::Memberships,
    pool::AllocatorKind,
    preflight,
    querier::Querier,
    report,
    rules::RuleTable,
    stats::StatsView,
    sys::LiveSystem,
};
use running::Running;
use signals::{RELOAD, STOP, install_signal_handlers};
use tracking::{await_next_hops, track_listeners, track_next_hops};

/// What the command line asks of the daemon, in terms that do not depend on its shape.
pub struct Options {
    /// The YAML rules file.
    pub config: PathBuf,
    /// Frame allocator; overrides `allocator:` in the file.
    pub allocator: Option<AllocatorKind>,
    /// Data path threads; overrides `workers:` in the file.
    pub workers: Option<usize>,
    /// Check everything the start needs against this machine, print what was found, and
    /// return without starting.
    pub check: bool,
}

/// Runs the relay until SIGINT or SIGTERM (or, with `check`, checks that it would start).
/// A relay that ran exits with failure when frames leaked: not every frame was accounted for
/// at the stop.
pub fn run(options: Options) -> Result<ExitCode> {
    let config_path = &options.config;
    let file = config_path.display().to_string();
    let mut config = Config::load(config_path)?;
    if let Some(w) = options.workers {
        config.workers = Some(w);
    }
    if options.check
        && let Some(why) = config.no_interface_here(&file, &LiveSystem)
    {
        anyhow::bail!(why);
    }
    // The file against this machine: its interfaces, and the CPUs `cpus:` names.
    let mut table = RuleTable::compile(&config, &file, &LiveSystem)?;
    if options.check {
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
    crate::sys::require_capabilities()?;
    // Before anything is created that must be cleaned up: a SIGTERM during the start then
    // stops the relay through its normal exit, which removes the control socket.
    install_signal_handlers()?;

    let allocator = options.allocator.unwrap_or(config.allocator);
    info!("frame allocator: {}", allocator.describe());
    if config.poll == crate::config::PollMode::Busy {
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
    let ingress: Vec<(String, InterfaceInfo)> = table
        .ingress
        .iter()
        .filter(|i| i.info.exists())
        .map(|i| (i.name.clone(), i.info))
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
        Settings {
            frames: config.umem.frames,
            frame_size: config.umem.frame_size,
            bind: config.bind,
            allocator,
            separate: config.umem.separate.clone(),
            workers,
            cpus: config.cpus.clone(),
            poll: config.poll,
        },
    )?;
    for (ifindex, queue, fd) in &bindings {
        steering.set_socket(*ifindex, *queue, fd)?;
    }
    datapath.start()?;
    for (iface, info) in &ingress {
        let mode = steering.attach(iface, info.ifindex, config.xdp_mode)?;
        info!("{iface}: XDP program attached in {} mode", mode.describe());
    }
    let monitor = datapath.monitor();
    // `relay capture`: checked against the rules running when it starts.
    let capturing = monitor.clone();
    let capturer: control::Capturer = Arc::new(move |filter: crate::capture::Filter| {
        filter.check(&capturing.table())?;
        capturing.tap().start(filter, crate::capture::QUEUE_FRAMES)
    });
    let counters = steering.counters();
    let listening = querier.clone();
    let me = crate::stats::RelayId::this(config_path);
    let snapshot: control::Snapshot = Arc::new(move || {
        let (table, stats) = monitor.stats();
        StatsView {
            relay: Some(me.clone()),
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
    let control_file = control_socket
        .with_capture(capturer)
        .serve(snapshot.clone(), reloader)?;
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
            match relay.reload(&control::ReloadMode::default()) {
                Ok(summary) => info!("SIGHUP: {summary}"),
                Err(e) => error!("SIGHUP: reload refused, the running rules stay: {e:#}"),
            }
        }
        if let Ok((change, reply)) = reload_rx.recv_timeout(Duration::from_millis(50)) {
            let what = match &change {
                control::Change::Reload(mode) => format!(
                    "reload{}{}",
                    if mode.dry_run { " --dry-run" } else { "" },
                    if mode.strict { " --strict" } else { "" }
                ),
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
