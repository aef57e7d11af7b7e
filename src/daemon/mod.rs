//! The daemon: settings and config file, the image registry, the served
//! disks and their accept loops, the control API's answers, signals and
//! shutdown. The CLI only parses arguments into [`ServeRequest`] and calls
//! [`run`]. It touches no guest memory: `vhost` serves each disk.

mod config;
mod disk;
mod images;
mod learn;
mod notify;
mod spec;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use config::{ConfigError, ConfigFile, Options, PeerList, Settings, DEFAULT_CONTROL_SOCKET};
use disk::{DiskEnv, Origin, ServedDisk};
use images::Images;
pub use spec::DiskSpec;

use crate::control::{self, DiskStatus, Op, Status};
use crate::engine::LocalBases;
use crate::DisplayChain;

/// How long a stopping disk waits for its requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the open images' fill and the fetch counters are logged.
const STATS_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("image= disks need a store (--store)")]
    NoStore,
    #[error("open the store: {0}")]
    OpenStore(String),
    #[error("image {0}: {1}")]
    OpenImage(String, String),
    #[error("cache {0}: {1}")]
    OpenCache(PathBuf, String),
    #[error("disk {0}: {1}")]
    OpenDisk(String, String),
    #[error("disk {0}: base size {1} is not a positive multiple of 512")]
    BaseSize(String, u64),
    #[error("set the group and mode of socket {0}")]
    SocketPermissions(PathBuf, #[source] std::io::Error),
    #[error("start a disk thread")]
    Thread(#[source] std::io::Error),
    #[error("start P2P")]
    P2p(#[source] crate::p2p::Error),
    #[error("start the I/O runtime")]
    Runtime(#[source] std::io::Error),
    #[error("install signal handlers")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error("no disk named {0}")]
    NoSuchDisk(String),
    #[error("disk {0} is attached to a frontend (a running guest): stop the guest first, or use --force")]
    Attached(String),
    #[error("disk {0} is still starting")]
    Starting(String),
    #[error("{0}")]
    Failed(String),
    #[error("shutdown was not clean")]
    Unclean,
}

/// What `streamblk serve` asks for: command-line options and disks, and
/// the config file they override.
#[derive(Debug, Default)]
pub struct ServeRequest {
    pub options: Options,
    pub disks: Vec<DiskSpec>,
    pub config: Option<PathBuf>,
}

impl ServeRequest {
    /// The settings and disks: the file's, overridden (options) or
    /// extended (disks) by the command line's.
    pub fn resolve(&self) -> Result<(Settings, Options, Vec<DiskSpec>), Error> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let options = file.options.overridden_by(&self.options);
        let settings = Settings::try_from(&options)?;
        let mut disks = file.disks;
        disks.extend(self.disks.iter().cloned());
        config::check_disks(&disks)?;
        if settings.store.is_none() && disks.iter().any(config::needs_store) {
            return Err(Error::NoStore);
        }
        Ok((settings, options, disks))
    }
}

enum Slot {
    /// Reserved while its image and overlay open.
    Starting(DiskSpec),
    Running(ServedDisk),
}

impl Slot {
    fn spec(&self) -> &DiskSpec {
        match self {
            Slot::Starting(s) => s,
            Slot::Running(d) => &d.spec,
        }
    }
}

/// A running daemon: its images and disks.
pub struct Daemon {
    settings: Settings,
    runtime: tokio::runtime::Handle,
    images: Arc<Images>,
    bases: LocalBases,
    disks: Mutex<BTreeMap<String, Slot>>,
    failed: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a disk and starts serving it; the others are not touched.
    fn add_disk(&self, spec: DiskSpec, origin: Origin) -> Result<DiskStatus, Error> {
        {
            let mut disks = self.lock();
            let specs: Vec<&DiskSpec> = disks.values().map(Slot::spec).chain([&spec]).collect();
            config::check_disks(specs)?;
            if self.settings.store.is_none() && config::needs_store(&spec) {
                return Err(Error::NoStore);
            }
            disks.insert(spec.name.clone(), Slot::Starting(spec.clone()));
        }
        let name = spec.name.clone();
        let env = DiskEnv {
            images: &self.images,
            bases: &self.bases,
            runtime: &self.runtime,
            poll: self.settings.poll,
            socket_group: self.settings.socket_group.as_deref(),
            failed: self.failed.clone(),
        };
        let started = ServedDisk::start(spec, origin, &env);
        let mut disks = self.lock();
        match started {
            Ok(d) => {
                let status = d.status();
                disks.insert(name, Slot::Running(d));
                Ok(status)
            }
            Err(e) => {
                disks.remove(&name);
                Err(e)
            }
        }
    }

    /// Removes a disk: refused while a frontend is attached unless `force`.
    fn remove_disk(&self, name: &str, force: bool) -> Result<(), Error> {
        let disk = {
            let mut disks = self.lock();
            match disks.get(name) {
                None => return Err(Error::NoSuchDisk(name.into())),
                Some(Slot::Starting(_)) => return Err(Error::Starting(name.into())),
                Some(Slot::Running(d)) if d.attached() && !force => return Err(Error::Attached(name.into())),
                Some(Slot::Running(_)) => {}
            }
            let Some(Slot::Running(d)) = disks.remove(name) else {
                unreachable!("checked above")
            };
            d
        };
        let attached = disk.attached();
        let clean = disk.stop(DRAIN_TIMEOUT, true);
        tracing::info!(disk = %name, attached, clean, "removed");
        Ok(())
    }

    fn disk_statuses(&self) -> Vec<DiskStatus> {
        self.lock()
            .values()
            .filter_map(|s| match s {
                Slot::Running(d) => Some(d.status()),
                Slot::Starting(_) => None,
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        let (images, fetch) = self.images.status();
        let p2p = self.images.p2p().map(|p| {
            let mut s = p.status();
            if let Some(f) = &fetch {
                (s.peer_chunks, s.peer_bytes) = (f.peer_chunks, f.peer_bytes);
            }
            s
        });
        Status {
            disks: self.disk_statuses(),
            images,
            fetch,
            p2p,
            cache: self.images.cache_status(),
        }
    }

    /// Applies a re-read config: disks it no longer names are removed
    /// (unless attached), new ones added, changed ones replaced.
    fn reload(&self, request: &ServeRequest, current: &mut Options) {
        let (settings, options, wanted) = match request.resolve() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("config reload failed, nothing changed: {}", DisplayChain(&e));
                return;
            }
        };
        let mut later = Vec::new();
        for key in options.changed_keys(current) {
            match key {
                "fill-rate" | "profile-rate" => tracing::info!("config reload: {key} changed"),
                _ => later.push(key),
            }
        }
        if settings.fetch.background_fill && !self.settings.fetch.background_fill {
            // A fill-rate of 0 at start means no fill task exists to speed up.
            later.push("fill-rate (from 0: background fill starts)");
        }
        self.images
            .set_rates(settings.fetch.fill_rate, settings.fetch.profile_rate);
        if !later.is_empty() {
            tracing::warn!(
                "config reload: {} changed; takes effect at the next restart",
                later.join(", ")
            );
        }
        *current = options;
        let wanted: BTreeMap<String, DiskSpec> = wanted.into_iter().map(|d| (d.name.clone(), d)).collect();
        let have: Vec<(String, DiskSpec, Origin)> = self
            .lock()
            .values()
            .filter_map(|s| match s {
                Slot::Running(d) => Some((d.spec.name.clone(), d.spec.clone(), d.origin)),
                Slot::Starting(_) => None,
            })
            .collect();
        let mut blocked = std::collections::HashSet::new();
        for (name, spec, origin) in &have {
            let keep = wanted.get(name) == Some(spec);
            if keep || *origin != Origin::Config {
                if !keep && wanted.contains_key(name) {
                    tracing::error!(disk = %name, "config reload: a disk added through the API has this name; not changed");
                    blocked.insert(name.clone());
                }
                continue;
            }
            match self.remove_disk(name, false) {
                Ok(()) => tracing::info!(disk = %name, "config reload: removed"),
                Err(e) => {
                    tracing::error!(disk = %name, "config reload: not removed: {}", DisplayChain(&e));
                    blocked.insert(name.clone());
                }
            }
        }
        for (name, spec) in wanted {
            if blocked.contains(&name) || have.iter().any(|(n, s, _)| *n == name && *s == spec) {
                continue;
            }
            match self.add_disk(spec, Origin::Config) {
                Ok(_) => tracing::info!(disk = %name, "config reload: added"),
                Err(e) => tracing::error!(disk = %name, "config reload: not added: {}", DisplayChain(&e)),
            }
        }
    }

    /// Stops every disk (requests in flight finish, overlays are flushed)
    /// and persists the caches. True if all went well.
    fn shutdown(&self) -> bool {
        let disks = std::mem::take(&mut *self.lock());
        let running: Vec<ServedDisk> = disks
            .into_values()
            .filter_map(|s| match s {
                Slot::Running(d) => Some(d),
                Slot::Starting(_) => None,
            })
            .collect();
        for d in &running {
            d.begin_stop();
        }
        let mut clean = true;
        for d in running {
            clean &= d.stop(DRAIN_TIMEOUT, false);
        }
        // The stopped disks' boot traces become learned profiles now, not
        // at the next start.
        self.images.finish_learning();
        self.images.log_stats();
        clean
    }
}

impl control::Handler for Daemon {
    fn handle(&self, op: Op) -> Result<serde_json::Value, String> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| e.to_string());
        let err = |e: Error| DisplayChain(&e).to_string();
        match op {
            Op::Status => json(serde_json::to_value(self.status())),
            Op::DiskList => json(serde_json::to_value(self.disk_statuses())),
            Op::DiskShow { name } => {
                let d = self.disk_statuses().into_iter().find(|d| d.name == name);
                json(serde_json::to_value(d.ok_or_else(|| err(Error::NoSuchDisk(name)))?))
            }
            Op::ImageShow { id } => {
                let i = self
                    .images
                    .status()
                    .0
                    .into_iter()
                    .find(|i| i.id == id || i.names.contains(&id));
                json(serde_json::to_value(i.ok_or_else(|| format!("no open image {id}"))?))
            }
            Op::DiskAdd { spec } => {
                let spec = DiskSpec::from_json(&spec).map_err(|e| e.to_string())?;
                let status = self.add_disk(spec, Origin::Api).map_err(err)?;
                tracing::info!(disk = %status.name, "added through the control API");
                json(serde_json::to_value(status))
            }
            Op::DiskRemove { name, force } => {
                self.remove_disk(&name, force).map_err(err)?;
                Ok(serde_json::json!({ "removed": name }))
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT (or a disk fails): serves the
/// configured disks, the control socket and the metrics endpoint; SIGHUP
/// re-reads the config file.
pub fn run(request: ServeRequest) -> Result<(), Error> {
    let (settings, mut options, disks) = request.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("streamblk-io")
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    // Handlers first: a SIGTERM that arrives once a disk's socket exists
    // must drain and flush, not kill the daemon with the default action.
    let _guard = runtime.enter();
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(Error::Signal)?;
    let (failed, mut failures) = tokio::sync::mpsc::unbounded_channel();
    let p2p = match &settings.p2p {
        Some(c) => Some(Arc::new(
            crate::p2p::P2p::start(c, settings.fetch.deadline, runtime.handle()).map_err(Error::P2p)?,
        )),
        None => None,
    };
    let daemon = Arc::new(Daemon {
        images: Images::new(&settings, runtime.handle().clone(), p2p)?,
        settings: settings.clone(),
        runtime: runtime.handle().clone(),
        bases: LocalBases::default(),
        disks: Mutex::default(),
        failed,
    });
    for spec in disks {
        if let Err(e) = daemon.add_disk(spec, Origin::Config) {
            daemon.shutdown();
            return Err(e);
        }
    }
    let started = control::serve(
        &settings.control_socket,
        settings.control_group.as_deref(),
        daemon.clone(),
    )
    .map_err(Error::from)
    .and_then(|()| {
        if let Some(addr) = settings.metrics_listen {
            let d = daemon.clone();
            let bound = control::serve_metrics(addr, move || d.status().prometheus())?;
            tracing::info!(%bound, "serving metrics");
        }
        Ok(())
    });
    if let Err(e) = started {
        daemon.shutdown();
        return Err(e);
    }

    enum Event {
        Stop,
        Reload,
        Failed(String),
        Tick,
    }
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    notify::notify("READY=1");
    tracing::info!(control = %settings.control_socket.display(), "ready");
    let failure = loop {
        let event = runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => Event::Stop,
                _ = int.recv() => Event::Stop,
                _ = hup.recv() => Event::Reload,
                msg = failures.recv() => msg.map_or(Event::Stop, Event::Failed),
                _ = tick.tick() => Event::Tick,
            }
        });
        match event {
            Event::Stop => break None,
            Event::Failed(msg) => break Some(msg),
            Event::Tick => daemon.images.log_stats(),
            Event::Reload => {
                notify::notify("RELOADING=1");
                if let Some(p) = daemon.images.p2p() {
                    p.reload();
                }
                match &request.config {
                    Some(path) => {
                        tracing::info!(config = %path.display(), "SIGHUP: re-reading the config file");
                        daemon.reload(&request, &mut options);
                    }
                    None => tracing::info!("SIGHUP: no config file to re-read"),
                }
                notify::notify("READY=1");
            }
        }
    };

    // Stop taking requests, let those in flight finish, make writes durable.
    notify::notify("STOPPING=1");
    tracing::info!("shutting down");
    // Out of the fleet first, so peers stop choosing this host as a home.
    if let Some(p) = daemon.images.p2p() {
        runtime.block_on(p.leave());
    }
    let clean = daemon.shutdown();
    let _ = std::fs::remove_file(&settings.control_socket);
    if let Some(msg) = failure {
        return Err(Error::Failed(msg));
    }
    if !clean {
        return Err(Error::Unclean);
    }
    tracing::info!("stopped");
    Ok(())
}
