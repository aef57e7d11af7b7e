//! `streamblk serve`: open the disks, serve each on its socket, shut down
//! cleanly on SIGTERM.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::cache::{self, ImageCache};
use crate::engine::{Base, Disk, LocalBases, SECTOR_SIZE};
use crate::fetch::{FetchConfig, Fetcher, ProfileReplay, StreamedBase};
use crate::profile::{Profile, TraceRecorder};
use crate::store::{ImageId, ImageStore};
use crate::vhost::{self, DiskContext, VhostUserBlkBackend};
use crate::DisplayChain;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/streamblk/control.sock";

/// Most queues a disk may have.
const MAX_QUEUES: u16 = 64;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A disk to serve (repeatable):
    /// name=N,socket=PATH,overlay=DIR,(image=IMAGE|base=RAWFILE)[,queues=Q][,readonly][,serial=S]
    /// [,record-trace=PATH[,trace-secs=N][,trace-mib=M]]
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// The image store for image= disks: a directory, file://, http(s):// or s3://bucket/prefix.
    #[arg(long)]
    pub store: Option<String>,
    /// Where the Local Caches of images live.
    #[arg(long, default_value = "/var/cache/streamblk")]
    pub cache_dir: PathBuf,
    /// Cache directory size limit in MiB: least recently used images that
    /// no disk uses are evicted beyond it (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub cache_size_mib: u64,
    /// Background fill rate cap in MB/s (0: no background fill). Demand
    /// fetching is never capped.
    #[arg(long, default_value_t = 50.0)]
    pub fill_rate: f64,
    /// Boot profile streaming rate cap in MB/s (0: no cap).
    #[arg(long, default_value_t = 200.0)]
    pub profile_rate: f64,
    /// Seconds a guest read of a missing chunk keeps retrying before it fails with IOERR.
    #[arg(long, default_value_t = 30.0)]
    pub fetch_deadline: f64,
    /// Seconds one fetch attempt may take.
    #[arg(long, default_value_t = 10.0)]
    pub fetch_timeout: f64,
    /// Chunk fetches in flight at once.
    #[arg(long, default_value_t = 8)]
    pub fetch_concurrency: usize,
    /// Microseconds a queue worker polls its ring for more requests before
    /// sleeping (0: never poll). Adapts downwards while polls find nothing.
    #[arg(long, default_value_t = vhost::DEFAULT_POLL_US)]
    pub poll_us: u64,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The control socket `streamblk status` reads.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// How far (MiB) boot profile streaming runs ahead of the guest.
    #[arg(long, default_value_t = 64)]
    pub profile_window_mib: u64,
}

/// Where a disk's base comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// A local raw file, served as is.
    Base(PathBuf),
    /// An image in the store.
    Image(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub socket: PathBuf,
    pub overlay: PathBuf,
    pub source: DiskSource,
    pub queues: u16,
    pub readonly: bool,
    pub serial: String,
    pub record_trace: Option<PathBuf>,
    /// Trace recording window: seconds after attach, and MiB read.
    pub trace_secs: u64,
    pub trace_mib: u64,
}

impl std::str::FromStr for DiskSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Self> {
        let (mut name, mut socket, mut overlay, mut source, mut serial, mut record_trace) =
            (None, None, None, None, None, None);
        let mut queues = 1u16;
        let (mut trace_secs, mut trace_mib) = (120u64, 4096u64);
        let mut readonly = false;
        for field in spec.split(',') {
            let (key, value) = match field.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (field, None),
            };
            let need = |v: Option<&str>| match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(anyhow::anyhow!("disk spec field {key:?} needs a value")),
            };
            match key {
                "name" => name = Some(need(value)?),
                "socket" => socket = Some(PathBuf::from(need(value)?)),
                "overlay" => overlay = Some(PathBuf::from(need(value)?)),
                "base" | "image" if source.is_some() => bail!("disk spec names both image= and base="),
                "base" => source = Some(DiskSource::Base(PathBuf::from(need(value)?))),
                "image" => source = Some(DiskSource::Image(need(value)?)),
                "queues" => {
                    let v = need(value)?;
                    queues = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUES).contains(q))
                        .with_context(|| format!("queues={v}: must be a number from 1 to {MAX_QUEUES}"))?;
                }
                "readonly" if value.is_none() => readonly = true,
                "serial" => {
                    let v = need(value)?;
                    if v.len() > 20 {
                        bail!("serial={v}: at most 20 bytes");
                    }
                    serial = Some(v);
                }
                "record-trace" => record_trace = Some(PathBuf::from(need(value)?)),
                "trace-secs" | "trace-mib" => {
                    let v = need(value)?;
                    let n: u64 = v
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .with_context(|| format!("{key}={v}: must be a positive number"))?;
                    if key == "trace-secs" {
                        trace_secs = n;
                    } else {
                        trace_mib = n;
                    }
                }
                _ => bail!("unknown disk spec field {field:?}"),
            }
        }
        let name = name.context("disk spec needs name=")?;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("disk name {name:?}: use letters, digits, '-', '_' and '.'");
        }
        Ok(DiskSpec {
            socket: socket.with_context(|| format!("disk {name}: needs socket="))?,
            overlay: overlay.with_context(|| format!("disk {name}: needs overlay="))?,
            source: source.with_context(|| format!("disk {name}: needs image= or base="))?,
            queues,
            readonly,
            serial: serial.unwrap_or_else(|| name.chars().take(20).collect()),
            record_trace,
            trace_secs,
            trace_mib,
            name,
        })
    }
}

#[derive(Debug)]
pub struct ServeConfig {
    pub disks: Vec<DiskSpec>,
    pub store: Option<String>,
    pub cache_dir: PathBuf,
    pub cache_limit: Option<u64>,
    pub fetch: FetchConfig,
    pub profile_window: u64,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub poll: Duration,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(args: ServeArgs) -> anyhow::Result<Self> {
        let disks = args
            .disks
            .iter()
            .map(|s| s.parse::<DiskSpec>().with_context(|| format!("--disk {s}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if disks.is_empty() {
            bail!("nothing to serve: give at least one --disk");
        }
        let mut names = HashSet::new();
        let mut sockets = HashSet::new();
        let mut overlays = HashSet::new();
        for d in &disks {
            if !names.insert(&d.name) {
                bail!("two disks are named {}", d.name);
            }
            if !sockets.insert(&d.socket) {
                bail!("two disks use socket {}", d.socket.display());
            }
            if !overlays.insert(&d.overlay) {
                bail!(
                    "two disks use overlay {}: each guest needs its own",
                    d.overlay.display()
                );
            }
            if matches!(d.source, DiskSource::Image(_)) && args.store.is_none() {
                bail!("disk {}: image= needs --store", d.name);
            }
        }
        let secs = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e6 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!("--{what} {v}: must be a positive number of seconds"))
            }
        };
        for (what, v) in [("fill-rate", args.fill_rate), ("profile-rate", args.profile_rate)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("--{what} {v}: must be a number of MB/s, 0 or more");
            }
        }
        if args.poll_us > vhost::MAX_POLL_US {
            bail!("--poll-us {}: at most {}", args.poll_us, vhost::MAX_POLL_US);
        }
        if args.fetch_concurrency == 0 || args.fetch_concurrency > 256 {
            bail!("--fetch-concurrency {}: must be from 1 to 256", args.fetch_concurrency);
        }
        let fetch = FetchConfig {
            concurrency: args.fetch_concurrency,
            low_concurrency: (args.fetch_concurrency / 2).max(1),
            fill_rate: Some((args.fill_rate * 1e6) as u64),
            profile_rate: (args.profile_rate > 0.0).then_some((args.profile_rate * 1e6) as u64),
            attempt_timeout: secs("fetch-timeout", args.fetch_timeout)?,
            deadline: secs("fetch-deadline", args.fetch_deadline)?,
            background_fill: args.fill_rate > 0.0,
        };
        Ok(ServeConfig {
            disks,
            store: args.store,
            cache_dir: args.cache_dir,
            cache_limit: (args.cache_size_mib > 0).then_some(args.cache_size_mib << 20),
            fetch,
            profile_window: args.profile_window_mib.max(1) << 20,
            control_socket: args.control_socket,
            metrics_listen: args.metrics_listen,
            poll: Duration::from_micros(args.poll_us),
        })
    }
}

struct Served {
    name: String,
    socket: PathBuf,
    ctx: Arc<DiskContext>,
    active: Arc<Mutex<Option<Arc<VhostUserBlkBackend>>>>,
}

/// The images the disks use, opened once each.
struct Images {
    bases: HashMap<String, Arc<dyn Base>>,
    caches: Vec<(Arc<ImageCache>, Option<Arc<ProfileReplay>>)>,
    fetcher: Option<Fetcher>,
}

impl Images {
    fn status(&self) -> serde_json::Value {
        let images: Vec<_> = self
            .caches
            .iter()
            .map(|(c, p)| {
                let (have, all) = c.fill();
                let profile = p.as_ref().map(|p| {
                    let (first, done) = p.times_ms();
                    serde_json::json!({
                        "chunks": p.len(),
                        "streamed": p.counters.streamed.load(Ordering::Relaxed),
                        "hits": p.counters.hits.load(Ordering::Relaxed),
                        "stalls": p.counters.stalls.load(Ordering::Relaxed),
                        "first_read_ms": first,
                        "done_ms": done,
                    })
                });
                serde_json::json!({
                    "id": c.id().to_hex(),
                    "chunks": all,
                    "filled": have,
                    "percent": crate::fetch::pct(have, all),
                    "hits": c.counters.hits.load(Ordering::Relaxed),
                    "misses": c.counters.misses.load(Ordering::Relaxed),
                    "profile": profile,
                })
            })
            .collect();
        let fetch = self.fetcher.as_ref().map(|f| {
            let n = f.counters();
            serde_json::json!({
                "store": f.store().url(),
                "store_chunks": n.store_chunks.load(Ordering::Relaxed),
                "store_bytes": n.store_bytes.load(Ordering::Relaxed),
                "corrupt_chunks": n.corrupt_chunks.load(Ordering::Relaxed),
                "failed_attempts": n.failed_attempts.load(Ordering::Relaxed),
                "guest_waits": n.demand_waits.load(Ordering::Relaxed),
                "guest_wait_ms": n.demand_wait_us.load(Ordering::Relaxed) / 1000,
                "by_class": {
                    "background": n.by_class[0].load(Ordering::Relaxed),
                    "profile": n.by_class[1].load(Ordering::Relaxed),
                    "demand": n.by_class[2].load(Ordering::Relaxed),
                },
            })
        });
        serde_json::json!({ "images": images, "fetch": fetch })
    }

    /// One log line per image and one for the fetcher: the numbers an
    /// operator watches while images stream.
    fn log_stats(&self) {
        for (c, _) in &self.caches {
            let (have, all) = c.fill();
            tracing::info!(
                image = %c.id(),
                chunks = have,
                of = all,
                hits = c.counters.hits.load(Ordering::Relaxed),
                misses = c.counters.misses.load(Ordering::Relaxed),
                "cache {:.1}% filled",
                crate::fetch::pct(have, all)
            );
        }
        if let Some(f) = &self.fetcher {
            let n = f.counters();
            let waits = n.demand_waits.load(Ordering::Relaxed);
            tracing::info!(
                store_chunks = n.store_chunks.load(Ordering::Relaxed),
                store_bytes = n.store_bytes.load(Ordering::Relaxed),
                corrupt_chunks = n.corrupt_chunks.load(Ordering::Relaxed),
                failed_attempts = n.failed_attempts.load(Ordering::Relaxed),
                guest_waits = waits,
                guest_wait_ms = n.demand_wait_us.load(Ordering::Relaxed) / 1000,
                "fetched from {}",
                f.store().url()
            );
        }
    }
}

/// Resolves every image= in the store, opens its Local Cache and starts
/// filling it. Fails (before any socket exists) if the store is unreachable
/// or an image is missing or bad.
fn open_images(config: &ServeConfig, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Images> {
    let mut images = Images {
        bases: HashMap::new(),
        caches: Vec::new(),
        fetcher: None,
    };
    let names: Vec<&String> = config
        .disks
        .iter()
        .filter_map(|d| match &d.source {
            DiskSource::Image(i) => Some(i),
            DiskSource::Base(_) => None,
        })
        .collect();
    let Some(location) = &config.store else {
        return Ok(images);
    };
    if names.is_empty() {
        return Ok(images);
    }
    let store = ImageStore::open(location, false).map_err(|e| anyhow::anyhow!("{}", DisplayChain(&e)))?;
    let fetcher = Fetcher::new(store.clone(), config.fetch.clone(), runtime.handle());
    std::fs::create_dir_all(&config.cache_dir)
        .with_context(|| format!("create cache directory {}", config.cache_dir.display()))?;
    let mut by_id: HashMap<ImageId, (Arc<ImageCache>, Option<Arc<ProfileReplay>>)> = HashMap::new();
    for name in names {
        if images.bases.contains_key(name) {
            continue;
        }
        let fail = |e: &dyn std::error::Error| anyhow::anyhow!("image {name}: {}", DisplayChain(e));
        let (id, manifest) = runtime.block_on(store.manifest(name)).map_err(|e| fail(&e))?;
        let (cache, replay) = match by_id.get(&id) {
            Some(c) => c.clone(),
            None => {
                let profile = match runtime.block_on(store.profile(&id)).map_err(|e| fail(&e))? {
                    Some(bytes) => {
                        let p = Profile::parse(&bytes, manifest.chunk_size, manifest.chunk_count())
                            .map_err(|e| fail(&e))?;
                        Some(Arc::new(ProfileReplay::new(p, manifest.chunk_count())))
                    }
                    None => None,
                };
                let c = Arc::new(ImageCache::open(&config.cache_dir, id, Arc::new(manifest)).map_err(|e| fail(&e))?);
                let (have, all) = c.fill();
                tracing::info!(
                    image = %name,
                    id = %id,
                    profile_chunks = profile.as_ref().map_or(0, |p| p.len()),
                    "cache has {have}/{all} chunks"
                );
                let window = (config.profile_window / c.manifest().chunk_size as u64).max(1) as u32;
                fetcher.start_fill(&c, profile.clone(), window, runtime.handle());
                by_id.insert(id, (c.clone(), profile.clone()));
                images.caches.push((c.clone(), profile.clone()));
                (c, profile)
            }
        };
        images.bases.insert(
            name.clone(),
            Arc::new(StreamedBase::new(cache, fetcher.clone(), replay)),
        );
    }
    images.fetcher = Some(fetcher);
    if let Some(limit) = config.cache_limit {
        let root = config.cache_dir.clone();
        let in_use: HashSet<ImageId> = by_id.keys().copied().collect();
        runtime.spawn(async move {
            loop {
                let (root, in_use) = (root.clone(), in_use.clone());
                if let Ok(removed) = tokio::task::spawn_blocking(move || cache::evict(&root, limit, &in_use)).await {
                    for r in removed {
                        tracing::info!(image = %r, "evicted from the cache");
                    }
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
    }
    Ok(images)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::try_from(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("streamblk-io")
        .enable_all()
        .build()
        .context("start the I/O runtime")?;
    let bases = LocalBases::default();
    let images = open_images(&config, &runtime)?;
    let mut served = Vec::new();
    let mut listeners = Vec::new();
    for spec in &config.disks {
        let base: Arc<dyn Base> = match &spec.source {
            DiskSource::Base(path) => bases
                .get(path)
                .map_err(|e| anyhow::anyhow!("disk {}: {}", spec.name, DisplayChain(&e)))?,
            DiskSource::Image(image) => images.bases[image].clone(),
        };
        if !base.size().is_multiple_of(SECTOR_SIZE) || base.size() == 0 {
            bail!(
                "disk {}: base size {} is not a positive multiple of 512",
                spec.name,
                base.size()
            );
        }
        let mut disk = Disk::open(base, &spec.overlay, spec.readonly)
            .map_err(|e| anyhow::anyhow!("disk {}: {}", spec.name, DisplayChain(&e)))?;
        if let Some(path) = &spec.record_trace {
            let t = TraceRecorder::create(path, Duration::from_secs(spec.trace_secs), spec.trace_mib << 20)
                .map_err(|e| anyhow::anyhow!("disk {}: {}", spec.name, DisplayChain(&e)))?;
            disk = disk.with_trace(t);
        }
        let mut serial = [0u8; 20];
        serial[..spec.serial.len()].copy_from_slice(spec.serial.as_bytes());
        let ctx = Arc::new(DiskContext {
            capacity_sectors: disk.size() / SECTOR_SIZE,
            disk: Arc::new(disk),
            serial,
            runtime: runtime.handle().clone(),
            stopping: Default::default(),
            poll: config.poll,
        });
        listeners.push(
            vhost::listen(&spec.socket).map_err(|e| anyhow::anyhow!("disk {}: {}", spec.name, DisplayChain(&e)))?,
        );
        served.push(Served {
            name: spec.name.clone(),
            socket: spec.socket.clone(),
            ctx,
            active: Default::default(),
        });
    }

    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel();
    for ((s, listener), spec) in served.iter().zip(listeners).zip(&config.disks) {
        let (name, ctx, active, queues) = (s.name.clone(), s.ctx.clone(), s.active.clone(), spec.queues as usize);
        let failed_tx = failed_tx.clone();
        std::thread::Builder::new()
            .name(format!("accept-{name}"))
            .spawn(move || {
                if let Err(e) = vhost::serve(&name, listener, ctx, queues, active) {
                    let _ = failed_tx.send(format!("disk {name}: {}", DisplayChain(&e)));
                }
            })
            .context("start a disk thread")?;
        tracing::info!(disk = %s.name, socket = %s.socket.display(), "serving");
    }

    let images = Arc::new(images);
    let status = {
        let images = images.clone();
        let disks: Vec<_> = served
            .iter()
            .map(|s| (s.name.clone(), s.socket.clone(), s.active.clone()))
            .collect();
        Arc::new(move || {
            let mut status = images.status();
            status["disks"] = disks
                .iter()
                .map(|(name, socket, active)| {
                    let connected = active.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                    serde_json::json!({ "name": name, "socket": socket, "connected": connected })
                })
                .collect();
            status
        })
    };
    let s = status.clone();
    crate::control::serve_status(&config.control_socket, move || s())
        .map_err(|e| anyhow::anyhow!("{}", DisplayChain(&e)))?;
    if let Some(addr) = config.metrics_listen {
        let s = status.clone();
        let bound = crate::control::serve_metrics(addr, move || crate::control::prometheus(&s()))
            .map_err(|e| anyhow::anyhow!("{}", DisplayChain(&e)))?;
        tracing::info!(%bound, "serving metrics");
    }
    let failure = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        anyhow::Ok(tokio::select! {
            _ = term.recv() => None,
            _ = int.recv() => None,
            msg = failed_rx.recv() => msg,
        })
    })?;

    // Stop taking requests, let those in flight finish, make writes durable.
    tracing::info!("shutting down");
    let mut clean = true;
    for s in &served {
        s.ctx.stopping.store(true, Ordering::Release);
    }
    for s in &served {
        let active = s.active.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(backend) = active {
            if !backend.drain(Duration::from_secs(30)) {
                tracing::error!(disk = %s.name, "requests still in flight at shutdown");
                clean = false;
            }
        }
        if let Some(t) = s.ctx.disk.trace() {
            t.finish();
        }
        if let Err(e) = s.ctx.disk.flush() {
            tracing::error!(disk = %s.name, "final flush failed: {}", DisplayChain(&e));
            clean = false;
        }
        let _ = std::fs::remove_file(&s.socket);
    }
    images.log_stats();
    for (cache, _) in &images.caches {
        if let Err(e) = cache.persist() {
            tracing::error!(image = %cache.id(), "persisting the cache failed: {}", DisplayChain(&e));
            clean = false;
        }
    }
    if let Some(msg) = failure {
        bail!("{msg}");
    }
    if !clean {
        bail!("shutdown was not clean");
    }
    tracing::info!("stopped");
    // Worker threads may be blocked on their frontends: do not wait for them.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(disks: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        for d in disks {
            argv.extend(["--disk", d]);
        }
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: ServeArgs,
        }
        <P as clap::Parser>::parse_from(argv).a
    }

    #[test]
    fn disk_spec_parses_every_field() {
        let d: DiskSpec = "name=vm1,socket=/run/a.sock,overlay=/var/o1,base=/img/base.raw,queues=4,readonly,serial=SN1"
            .parse()
            .unwrap();
        assert_eq!(
            d,
            DiskSpec {
                name: "vm1".into(),
                socket: "/run/a.sock".into(),
                overlay: "/var/o1".into(),
                source: DiskSource::Base("/img/base.raw".into()),
                queues: 4,
                readonly: true,
                serial: "SN1".into(),
                record_trace: None,
                trace_secs: 120,
                trace_mib: 4096,
            }
        );
        let d: DiskSpec = "name=vm2,socket=s,overlay=o,image=debian".parse().unwrap();
        assert_eq!(d.source, DiskSource::Image("debian".into()));
        assert_eq!(d.serial, "vm2");
        assert_eq!(d.queues, 1);
    }

    #[test]
    fn disk_spec_rejects_bad_input_with_the_reason() {
        for (spec, why) in [
            ("socket=s,overlay=o,base=b", "needs name="),
            ("name=a,overlay=o,base=b", "needs socket="),
            ("name=a,socket=s,base=b", "needs overlay="),
            ("name=a,socket=s,overlay=o", "needs image= or base="),
            ("name=a,socket=s,overlay=o,base=b,image=i", "both"),
            ("name=a,socket=s,overlay=o,base=b,queues=0", "from 1 to"),
            ("name=a,socket=s,overlay=o,base=b,queues=x", "from 1 to"),
            ("name=a,socket=s,overlay=o,base=b,colour=red", "unknown"),
            (
                "name=a,socket=s,overlay=o,base=b,serial=123456789012345678901",
                "20 bytes",
            ),
            ("name=a/b,socket=s,overlay=o,base=b", "letters"),
            ("name=a,socket=,overlay=o,base=b", "needs a value"),
        ] {
            let err = spec.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn config_refuses_shared_sockets_and_overlays() {
        let e = ServeConfig::try_from(args(&[])).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
        let e = ServeConfig::try_from(args(&[
            "name=a,socket=s,overlay=o1,base=b",
            "name=b,socket=s,overlay=o2,base=b",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("socket"), "{e}");
        let e = ServeConfig::try_from(args(&[
            "name=a,socket=s1,overlay=o,base=b",
            "name=b,socket=s2,overlay=o,base=b",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("own"), "{e}");
        let c = ServeConfig::try_from(args(&[
            "name=a,socket=s1,overlay=o1,base=b",
            "name=b,socket=s2,overlay=o2,base=b",
        ]))
        .unwrap();
        assert_eq!(c.disks.len(), 2);
        let e = ServeConfig::try_from(args(&["name=a,socket=s1,overlay=o1,image=debian"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs --store"), "{e}");
    }
}
