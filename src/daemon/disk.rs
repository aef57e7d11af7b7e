//! One served disk: its engine disk, its socket and the accept loop that
//! serves frontends on it, and how it stops.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::images::{Images, OpenImage};
use super::spec::{DiskSource, DiskSpec};
use super::Error;
use crate::control::status::{DiskState, DiskStatus};
use crate::engine::{Base, Disk, LocalBases, SECTOR_SIZE};
use crate::profile::TraceRecorder;
use crate::vhost::{self, DiskContext, VhostUserBlkBackend};
use crate::DisplayChain;

/// How long removing a disk waits for its accept loop to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

type Active = Arc<Mutex<Option<Arc<VhostUserBlkBackend>>>>;

/// Where a disk came from, which decides whether a config reload may remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Config,
    Api,
}

/// What a disk is started with: the daemon's shared parts and settings.
pub(crate) struct DiskEnv<'a> {
    pub(crate) images: &'a Images,
    pub(crate) bases: &'a LocalBases,
    pub(crate) runtime: &'a tokio::runtime::Handle,
    pub(crate) poll: Duration,
    /// Group given the disk's socket, mode 0660.
    pub(crate) socket_group: Option<&'a str>,
    /// Hears of an accept loop that ends with an error.
    pub(crate) failed: tokio::sync::mpsc::UnboundedSender<String>,
}

pub(crate) struct ServedDisk {
    pub(crate) spec: DiskSpec,
    pub(crate) origin: Origin,
    ctx: Arc<DiskContext>,
    active: Active,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Keeps the image open while the disk exists.
    _image: Option<Arc<OpenImage>>,
}

impl ServedDisk {
    /// Opens the disk's base and overlay and starts serving it on its socket.
    /// Nothing is left behind on failure.
    pub(crate) fn start(spec: DiskSpec, origin: Origin, env: &DiskEnv<'_>) -> Result<ServedDisk, Error> {
        let socket_gid = env.socket_group.map(crate::control::group_id).transpose()?;
        let name = spec.name.clone();
        let in_disk = |e: &dyn std::error::Error| Error::OpenDisk(name.clone(), DisplayChain(e).to_string());
        let (base, image): (Arc<dyn Base>, _) = match &spec.source {
            DiskSource::Base(path) => (env.bases.get(path).map_err(|e| in_disk(&e))?, None),
            DiskSource::Image(i) => {
                let img = env.images.open(i)?;
                (img.base(), Some(img))
            }
        };
        if !base.size().is_multiple_of(SECTOR_SIZE) || base.size() == 0 {
            return Err(Error::BaseSize(name, base.size()));
        }
        // A new overlay is a guest's first boot; an existing one is a reboot
        // or a reconnect after a restart, not a boot to learn from.
        let first_boot = overlay_is_new(&spec.overlay);
        let mut disk = Disk::open(base, &spec.overlay, spec.readonly).map_err(|e| in_disk(&e))?;
        if let Some(path) = &spec.record_trace {
            let t = TraceRecorder::create(path, Duration::from_secs(spec.trace_secs), spec.trace_mib << 20)
                .map_err(|e| in_disk(&e))?;
            disk = disk.with_trace(t);
        } else if let Some(t) = image.as_ref().filter(|_| first_boot).and_then(|i| i.boot_recorder()) {
            tracing::info!(disk = %name, trace = %t.path().display(), "recording the first boot for a learned profile");
            disk = disk.with_trace(t);
        }
        let mut serial = [0u8; 20];
        serial[..spec.serial.len()].copy_from_slice(spec.serial.as_bytes());
        let ctx = Arc::new(DiskContext {
            capacity_sectors: disk.size() / SECTOR_SIZE,
            disk: Arc::new(disk),
            serial,
            runtime: env.runtime.clone(),
            stopping: Default::default(),
            poll: env.poll,
            stats: Default::default(),
            waiting: Default::default(),
            bad_request_log: Default::default(),
        });
        let listener = vhost::listen(&spec.socket).map_err(|e| in_disk(&e))?;
        if let Some(gid) = socket_gid {
            use std::os::unix::fs::PermissionsExt;
            let set = std::fs::set_permissions(&spec.socket, std::fs::Permissions::from_mode(0o660))
                .and_then(|()| std::os::unix::fs::chown(&spec.socket, None, Some(gid)));
            if let Err(e) = set {
                let _ = std::fs::remove_file(&spec.socket);
                return Err(Error::SocketPermissions(spec.socket.clone(), e));
            }
        }
        let active: Active = Default::default();
        let thread = {
            let (name, ctx, active, queues) = (name.clone(), ctx.clone(), active.clone(), spec.queues as usize);
            let failed = env.failed.clone();
            std::thread::Builder::new()
                .name(format!("accept-{name}"))
                .spawn(move || {
                    if let Err(e) = vhost::serve(&name, listener, ctx.clone(), queues, active) {
                        if !ctx.stopping.load(Ordering::Acquire) {
                            let _ = failed.send(format!("disk {name}: {}", DisplayChain(&e)));
                        }
                    }
                })
                .map_err(|e| {
                    let _ = std::fs::remove_file(&spec.socket);
                    Error::Thread(e)
                })?
        };
        if let Some(t) = ctx.disk.trace().cloned() {
            // The trace ends on time, whether or not the guest reads again.
            env.runtime.spawn(async move { t.finish_on_time().await });
        }
        tracing::info!(disk = %name, socket = %spec.socket.display(), "serving");
        Ok(ServedDisk {
            spec,
            origin,
            ctx,
            active,
            thread: Some(thread),
            _image: image,
        })
    }

    fn backend(&self) -> Option<Arc<VhostUserBlkBackend>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn attached(&self) -> bool {
        self.backend().is_some()
    }

    pub(crate) fn status(&self) -> DiskStatus {
        let backend = self.backend();
        let state = if self.ctx.stopping.load(Ordering::Acquire) {
            DiskState::Stopping
        } else if backend.is_some() {
            DiskState::Attached
        } else {
            DiskState::Waiting
        };
        DiskStatus {
            name: self.spec.name.clone(),
            socket: self.spec.socket.clone(),
            overlay: self.spec.overlay.clone(),
            source: match &self.spec.source {
                DiskSource::Base(p) => format!("base={}", p.display()),
                DiskSource::Image(i) => format!("image={i}"),
            },
            queues: self.spec.queues,
            readonly: self.spec.readonly,
            state,
            connected: backend.is_some(),
            inflight: backend.map_or(0, |b| b.inflight() as u64),
            origin: match self.origin {
                Origin::Config => "config",
                Origin::Api => "api",
            }
            .into(),
            spec: self.spec.to_spec_string(),
            io: self.ctx.stats.snapshot(),
        }
    }

    /// Marks the disk stopping: its queues take no new requests.
    pub(crate) fn begin_stop(&self) {
        self.ctx.stopping.store(true, Ordering::Release);
    }

    /// Stops serving: waits for requests in flight, makes the overlay
    /// durable, disconnects a frontend still connected, removes the socket
    /// and releases the image.
    pub(crate) fn stop(mut self, drain: Duration, wait_thread: bool) -> bool {
        let name = self.spec.name.clone();
        self.begin_stop();
        let mut clean = true;
        let attached = self.backend();
        if let Some(backend) = &attached {
            if !backend.drain(drain) {
                tracing::error!(disk = %name, "requests still in flight at stop");
                clean = false;
            }
        } else {
            // Wake the accept loop: it sees the connection end, then `stopping`.
            wake_accept(&self.spec.socket);
        }
        if let Some(backend) = &attached {
            // Forced: hang up on the frontend so its accept loop ends now.
            backend.hang_up();
            tracing::warn!(disk = %name, "removed while attached: frontend disconnected");
        }
        if let Some(t) = self.ctx.disk.trace() {
            t.finish();
        }
        if let Err(e) = self.ctx.disk.flush() {
            tracing::error!(disk = %name, "final flush failed: {}", DisplayChain(&e));
            clean = false;
        }
        let _ = std::fs::remove_file(&self.spec.socket);
        if let Some(t) = self.thread.take().filter(|_| wait_thread) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(disk = %name, "a frontend is still connected; it is no longer served");
            }
        }
        clean
    }
}

/// True if the overlay directory does not exist yet or is empty.
fn overlay_is_new(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Connects to a disk's socket and hangs up, so an accept loop blocked in
/// accept(2) wakes.
fn wake_accept(socket: &Path) {
    if let Ok(c) = std::os::unix::net::UnixStream::connect(socket) {
        drop(c);
    }
}
