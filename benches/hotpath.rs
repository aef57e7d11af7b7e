//! The hot path against qemu-storage-daemon, through the same vhost-user-blk
//! client (libblkio), in one run.
//!
//! Both daemons serve one 1 GiB file of random data (page-cache warm) with
//! the same number of queues; each row runs against them alternately for a
//! few rounds and the medians are compared. A page-cache `pread` loop over
//! the same file gives the physical limit. Run on demand, never in CI:
//!
//! ```text
//! cargo build --release && cargo bench --bench hotpath
//! ```
//!
//! Environment: `STREAMBLK_BIN` (default `target/release/streamblk`),
//! `HOTPATH_ROUNDS` (5), `HOTPATH_SECS` (2, per row, target and round),
//! `QSD_AIO` (`io_uring` or `threads`; default: whichever is faster here),
//! `QSD_BIN` (default `qemu-storage-daemon`), `HOTPATH_ROWS` (only the rows
//! whose name contains it).

use std::fs::File;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const FILE_SIZE: u64 = 1 << 30;
/// Client buffer region per queue: enough for 16 x 4 KiB and 4 x 128 KiB.
const REGION_PER_QUEUE: usize = 1 << 20;
/// No single request may take longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Marks a flush in a completion's user data.
const FLUSH_TAG: usize = usize::MAX;

/// Child processes to kill however the benchmark ends.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn kill_children() {
    let pids = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        // SAFETY: kill(2) on a child we spawned; at worst it is already gone.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// A daemon under test; killed when dropped.
struct Server {
    name: &'static str,
    socket: PathBuf,
    child: Child,
    cmdline: String,
}

impl Server {
    fn spawn(name: &'static str, program: &str, args: &[String], socket: &Path) -> Server {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .env("RUST_LOG", "warn");
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the benchmark, even if it is killed.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {program}: {e}")));
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(child.id());
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while !socket.exists() {
            if Instant::now() > deadline {
                fail(&format!("{name}: socket {} never appeared", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Server {
            name,
            socket: socket.to_path_buf(),
            child,
            cmdline: std::iter::once(program.to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            fail(&format!("{} exited: {status}", self.name));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fail(msg: &str) -> ! {
    kill_children();
    eprintln!("hotpath: {msg}");
    std::process::exit(1);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("{name}={v}: not a valid value"))),
        Err(_) => default,
    }
}

/// xorshift64*: cheap enough not to show up next to the I/O.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    RandRead,
    RandWrite,
    SeqRead,
}

/// One row's workload.
#[derive(Clone, Copy)]
struct Job {
    kind: Kind,
    bs: usize,
    /// Requests in flight per queue.
    qd: usize,
    queues: usize,
    poll: bool,
    /// A flush after every this many writes.
    flush_every: Option<u64>,
    /// streamblk serves the file as a fully cached streamed image (image=)
    /// rather than as a local base (base=).
    streamed: bool,
}

#[derive(Default)]
struct Stats {
    ios: u64,
    bytes: u64,
    secs: f64,
    /// Latencies in ns (only collected at depth 1).
    lat: Vec<u64>,
}

impl Stats {
    fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }

    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }

    fn lat_us(&mut self) -> (f64, f64, f64) {
        if self.lat.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        self.lat.sort_unstable();
        let n = self.lat.len();
        let mean = self.lat.iter().sum::<u64>() as f64 / n as f64;
        let pct = |p: f64| self.lat[((n as f64 * p) as usize).min(n - 1)] as f64;
        (mean / 1e3, pct(0.50) / 1e3, pct(0.99) / 1e3)
    }
}

/// A connected vhost-user-blk client.
struct Client {
    _blkio: Blkio,
    queues: Vec<Blkioq>,
    region: usize,
}

impl Client {
    fn connect(socket: &Path, queues: usize, poll: bool) -> Client {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match Self::try_connect(socket, queues, poll) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => fail(&format!("connect to {}: {e}", socket.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn try_connect(socket: &Path, queues: usize, poll: bool) -> Result<Client, String> {
        fn e(what: &'static str) -> impl Fn(blkio::Error) -> String {
            move |err| format!("{what}: {}", err.message())
        }
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        b.set_str("path", &socket.to_string_lossy()).map_err(e("path"))?;
        b.connect().map_err(e("connect"))?;
        let (blocking, polled) = if poll { (0, queues) } else { (queues, 0) };
        b.set_i32("num-queues", blocking as i32).map_err(e("num-queues"))?;
        b.set_i32("num-poll-queues", polled as i32)
            .map_err(e("num-poll-queues"))?;
        let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
        if capacity != FILE_SIZE {
            return Err(format!("capacity {capacity}, expected {FILE_SIZE}"));
        }
        let started = b.start().map_err(e("start"))?;
        let region = b
            .alloc_mem_region(REGION_PER_QUEUE * queues)
            .map_err(e("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(e("map_mem_region"))?;
        Ok(Client {
            _blkio: b,
            queues: if poll { started.poll_queues } else { started.queues },
            region: region.addr,
        })
    }
}

/// Runs `job` on one queue for `warmup + secs`; counts only after the warmup.
fn run_queue(q: &mut Blkioq, buf: usize, job: Job, warmup: Duration, secs: Duration, seed: u64) -> Stats {
    let mut rng = Rng(seed | 1);
    let blocks = FILE_SIZE / job.bs as u64;
    let mut seq = rng.below(blocks);
    let mut next_offset = |rng: &mut Rng| -> u64 {
        if job.kind == Kind::SeqRead {
            seq = (seq + 1) % blocks;
            seq * job.bs as u64
        } else {
            rng.below(blocks) * job.bs as u64
        }
    };
    let mut started = vec![Instant::now(); job.qd];
    let mut writes = 0u64;
    let submit = |q: &mut Blkioq, slot: usize, offset: u64, writes: &mut u64| {
        let p = buf + slot * job.bs;
        match job.kind {
            Kind::RandWrite => {
                *writes += 1;
                q.write(offset, p as *const u8, job.bs, slot, ReqFlags::empty())
            }
            _ => q.read(offset, p as *mut u8, job.bs, slot, ReqFlags::empty()),
        }
    };
    let start = Instant::now();
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        submit(q, slot, next_offset(&mut rng), &mut writes);
    }
    let mut comps: Vec<MaybeUninit<Completion>> = (0..job.qd + 1).map(|_| MaybeUninit::uninit()).collect();
    let mut stats = Stats::default();
    let lat = job.qd == 1;
    let mut measuring = false;
    let mut measure_start = start;
    let mut flush_pending = false;
    let mut inflight = job.qd;
    loop {
        let n = if job.poll {
            let give_up = Instant::now() + IO_TIMEOUT;
            loop {
                match q.do_io(&mut comps, 0, None, None) {
                    Ok(0) if Instant::now() > give_up => fail("a request took longer than 10 s"),
                    Ok(0) => continue,
                    Ok(n) => break n,
                    Err(e) => fail(&format!("do_io: {}", e.message())),
                }
            }
        } else {
            let mut t = IO_TIMEOUT;
            match q.do_io(&mut comps, 1, Some(&mut t), None) {
                Ok(n) => n,
                Err(e) => fail(&format!("do_io: {}", e.message())),
            }
        };
        let now = Instant::now();
        if !measuring && now - start >= warmup {
            measuring = true;
            measure_start = now;
        }
        let done = measuring && now - measure_start >= secs;
        inflight -= n;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                fail(&format!("request failed: {}", c.ret));
            }
            if c.user_data == FLUSH_TAG {
                flush_pending = false;
                continue;
            }
            let slot = c.user_data;
            if measuring {
                stats.ios += 1;
                stats.bytes += job.bs as u64;
                if lat {
                    stats.lat.push((now - started[slot]).as_nanos() as u64);
                }
            }
            if done {
                continue;
            }
            if let Some(every) = job.flush_every {
                if !flush_pending && writes > 0 && writes.is_multiple_of(every) {
                    flush_pending = true;
                    inflight += 1;
                    q.flush(FLUSH_TAG, ReqFlags::empty());
                }
            }
            started[slot] = Instant::now();
            inflight += 1;
            submit(q, slot, next_offset(&mut rng), &mut writes);
        }
        if done {
            stats.secs = (now - measure_start).as_secs_f64();
            break;
        }
    }
    // Let what is still in flight finish before the client goes away.
    let mut left = inflight;
    let deadline = Instant::now() + IO_TIMEOUT;
    while left > 0 && Instant::now() < deadline {
        let mut t = Duration::from_millis(100);
        let n = if job.poll {
            q.do_io(&mut comps, 0, None, None)
        } else {
            q.do_io(&mut comps, 0, Some(&mut t), None)
        }
        .unwrap_or(0);
        left = left.saturating_sub(n);
    }
    stats
}

/// Runs `job` against a server: fresh connection, one thread per queue.
fn run_target(server: &mut Server, job: Job, warmup: Duration, secs: Duration, seed: u64) -> Stats {
    server.check_alive();
    let mut client = Client::connect(&server.socket, job.queues, job.poll);
    let region = client.region;
    let per_queue: Vec<Stats> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let buf = region + i * REGION_PER_QUEUE;
                s.spawn(move || run_queue(q, buf, job, warmup, secs, seed.wrapping_add(i as u64 * 7919)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| fail("a client thread panicked")))
            .collect()
    });
    drop(client);
    merge(per_queue)
}

fn merge(parts: Vec<Stats>) -> Stats {
    let mut all = Stats::default();
    for p in parts {
        all.ios += p.ios;
        all.bytes += p.bytes;
        all.secs = all.secs.max(p.secs);
        all.lat.extend(p.lat);
    }
    all
}

/// The page-cache limit: 4 KiB random preads of the file, `threads` threads.
fn run_pread(file: &File, threads: usize, warmup: Duration, secs: Duration, seed: u64) -> Stats {
    let parts: Vec<Stats> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng(seed.wrapping_add(t as u64 * 104_729) | 1);
                    let mut buf = vec![0u8; 4096];
                    let blocks = FILE_SIZE / 4096;
                    let mut stats = Stats::default();
                    let start = Instant::now();
                    let mut measure_start = None;
                    loop {
                        let off = rng.below(blocks) * 4096;
                        let t0 = Instant::now();
                        if file.read_at(&mut buf, off).unwrap_or(0) != 4096 {
                            fail("short pread");
                        }
                        let t1 = Instant::now();
                        match measure_start {
                            None if t1 - start >= warmup => measure_start = Some(t1),
                            None => {}
                            Some(m) => {
                                stats.ios += 1;
                                stats.bytes += 4096;
                                if threads == 1 {
                                    stats.lat.push((t1 - t0).as_nanos() as u64);
                                }
                                if t1 - m >= secs {
                                    stats.secs = (t1 - m).as_secs_f64();
                                    break;
                                }
                            }
                        }
                    }
                    stats
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| fail("a pread thread panicked")))
            .collect()
    });
    merge(parts)
}

/// What a row reports; the ratio is streamblk / qsd.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Measure {
    Iops,
    Mbps,
    Latency,
}

struct Row {
    name: &'static str,
    job: Job,
    measure: Measure,
}

fn rows() -> Vec<Row> {
    let j = |kind, bs, qd, queues, poll, flush_every| Job {
        kind,
        bs,
        qd,
        queues,
        poll,
        flush_every,
        streamed: false,
    };
    let cached = |job: Job| Job { streamed: true, ..job };
    use Kind::*;
    use Measure::*;
    vec![
        Row {
            name: "4K randread QD1, blocking",
            job: j(RandRead, 4096, 1, 1, false, None),
            measure: Latency,
        },
        Row {
            name: "4K randread QD1, polling",
            job: j(RandRead, 4096, 1, 1, true, None),
            measure: Latency,
        },
        Row {
            name: "4K randread QD16, blocking",
            job: j(RandRead, 4096, 16, 1, false, None),
            measure: Iops,
        },
        Row {
            name: "4K randread QD16, polling",
            job: j(RandRead, 4096, 16, 1, true, None),
            measure: Iops,
        },
        Row {
            name: "4K randwrite QD16, blocking",
            job: j(RandWrite, 4096, 16, 1, false, None),
            measure: Iops,
        },
        Row {
            name: "4K randwrite QD16 + flush/64, blocking",
            job: j(RandWrite, 4096, 16, 1, false, Some(64)),
            measure: Iops,
        },
        Row {
            name: "128K seqread QD4, blocking",
            job: j(SeqRead, 128 << 10, 4, 1, false, None),
            measure: Mbps,
        },
        Row {
            name: "4K randread 2 queues x QD16, blocking",
            job: j(RandRead, 4096, 16, 2, false, None),
            measure: Iops,
        },
        Row {
            name: "4K randread 2 queues x QD16, polling",
            job: j(RandRead, 4096, 16, 2, true, None),
            measure: Iops,
        },
        Row {
            name: "cached streamed image: 4K randread QD1, blocking",
            job: cached(j(RandRead, 4096, 1, 1, false, None)),
            measure: Latency,
        },
        Row {
            name: "cached streamed image: 4K randread QD16, blocking",
            job: cached(j(RandRead, 4096, 16, 1, false, None)),
            measure: Iops,
        },
        Row {
            name: "cached streamed image: 128K seqread QD4, blocking",
            job: cached(j(SeqRead, 128 << 10, 4, 1, false, None)),
            measure: Mbps,
        },
    ]
}

/// Per-round samples of one row on one target: one value, or mean/p50/p99.
#[derive(Default, Clone)]
struct Samples(Vec<[f64; 3]>);

impl Samples {
    fn push(&mut self, measure: Measure, mut s: Stats) {
        self.0.push(match measure {
            Measure::Iops => [s.iops(), 0.0, 0.0],
            Measure::Mbps => [s.mbps(), 0.0, 0.0],
            Measure::Latency => {
                let (mean, p50, p99) = s.lat_us();
                [mean, p50, p99]
            }
        });
    }

    fn median(&self, i: usize) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(|s| s[i]).collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
}

/// Writes `FILE_SIZE` bytes of random data to `path` (and so into the page cache).
fn make_file(path: &Path) {
    let mut f = File::create(path).unwrap_or_else(|e| fail(&format!("create {}: {e}", path.display())));
    let mut rng = Rng(0x5eed);
    let mut chunk = vec![0u8; 4 << 20];
    for _ in 0..FILE_SIZE / chunk.len() as u64 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&chunk)
            .unwrap_or_else(|e| fail(&format!("write {}: {e}", path.display())));
    }
}

/// Reads the whole file once so it is in the page cache.
fn warm(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| fail(&format!("open {}: {e}", path.display())));
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < FILE_SIZE {
        off += f.read_at(&mut buf, off).unwrap_or(0).max(1) as u64;
    }
}

fn qsd_args(file: &Path, socket: &Path, aio: &str, queues: usize) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("file,filename={},node-name=f,aio={aio}", file.display()),
        "--blockdev".into(),
        "raw,file=f,node-name=disk".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ),
    ]
}

fn fmt_value(measure: Measure, v: f64) -> String {
    match measure {
        Measure::Iops => format!("{:.0}k IOPS", v / 1e3),
        Measure::Mbps => format!("{v:.0} MB/s"),
        Measure::Latency => format!("{v:.1} µs"),
    }
}

/// Waits (up to 5 minutes) until a daemon's images are fully cached.
fn wait_filled(control: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = streamblk::control::read_status(control) {
            let images = s["images"].as_array().cloned().unwrap_or_default();
            if !images.is_empty() && images.iter().all(|i| i["filled"] == i["chunks"]) {
                return;
            }
        }
        if Instant::now() > deadline {
            fail("the streamed image did not fill within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter-less run is the only mode.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_children();
        default_hook(info);
    }));

    let rounds: usize = env_or("HOTPATH_ROUNDS", 5);
    let secs = Duration::from_secs_f64(env_or("HOTPATH_SECS", 2.0));
    let warmup = Duration::from_millis(300);
    let bin: PathBuf = std::env::var_os("STREAMBLK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/streamblk"));
    if !bin.is_file() {
        fail(&format!(
            "streamblk binary {} not found: run `cargo build --release` first or set STREAMBLK_BIN",
            bin.display()
        ));
    }
    let qsd_bin = std::env::var("QSD_BIN").unwrap_or_else(|_| "qemu-storage-daemon".into());
    let mut rows = rows();
    if let Ok(filter) = std::env::var("HOTPATH_ROWS") {
        rows.retain(|r| r.name.contains(filter.as_str()));
        if rows.is_empty() {
            fail(&format!("HOTPATH_ROWS={filter} matches no row"));
        }
    }

    // Bound the whole run: a hung daemon must not hang the benchmark.
    let per_run = warmup + secs + Duration::from_secs(1);
    let budget = per_run * (rounds * (rows.len() * 2 + 3) + 8) as u32 + Duration::from_secs(180);
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        fail(&format!("benchmark exceeded its time budget of {budget:?}"));
    });

    let dir = tempfile::Builder::new()
        .prefix("streamblk-hotpath")
        .tempdir()
        .unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    let file = dir.path().join("disk.raw");
    eprintln!("hotpath: writing 1 GiB of random data to {}", file.display());
    make_file(&file);
    warm(&file);

    // One pair of daemons per queue count, so each row's daemons have as many
    // queues as its client uses (an unused queue costs qemu-storage-daemon).
    let store = dir.path().join("store");
    let spawn_streamblk = |queues: usize, writes: bool, streamed: bool| {
        let tag = format!(
            "{queues}q{}{}",
            if writes { "-w" } else { "" },
            if streamed { "-s" } else { "" }
        );
        let socket = dir.path().join(format!("streamblk-{tag}.sock"));
        let control = dir.path().join(format!("control-{tag}.sock"));
        let overlay = dir.path().join(format!("overlay-{tag}"));
        let mut args = vec![
            "serve".to_string(),
            "--control-socket".into(),
            control.display().to_string(),
        ];
        let source = if streamed {
            // The whole image fills as fast as it can before the rows run.
            let cache = dir.path().join(format!("cache-{tag}"));
            args.extend(
                [
                    "--store",
                    store.to_str().unwrap(),
                    "--cache-dir",
                    cache.to_str().unwrap(),
                    "--fill-rate",
                    "100000",
                ]
                .map(String::from),
            );
            "image=bench".to_string()
        } else {
            format!("base={}", file.display())
        };
        args.extend([
            "--disk".to_string(),
            format!(
                "name=b,socket={},overlay={},{source},queues={queues}",
                socket.display(),
                overlay.display()
            ),
        ]);
        let server = Server::spawn("streamblk", &bin.to_string_lossy(), &args, &socket);
        if streamed {
            wait_filled(&control);
        }
        server
    };
    let spawn_qsd = |queues: usize, aio: &str, writes: bool, tag: &str| {
        let socket = dir.path().join(format!(
            "qsd-{aio}-{queues}q{}{tag}.sock",
            if writes { "-w" } else { "" }
        ));
        Server::spawn(
            "qemu-storage-daemon",
            &qsd_bin,
            &qsd_args(&file, &socket, aio, queues),
            &socket,
        )
    };

    // qemu-storage-daemon: io_uring or threads, whichever is faster here.
    let calib = Job {
        kind: Kind::RandRead,
        bs: 4096,
        qd: 16,
        queues: 1,
        poll: false,
        flush_every: None,
        streamed: false,
    };
    let (aio, qsd_note) = match std::env::var("QSD_AIO") {
        Ok(aio) => {
            let note = format!("aio={aio} (set by QSD_AIO)");
            (aio, note)
        }
        Err(_) => {
            const AIOS: [&str; 2] = ["io_uring", "threads"];
            let mut cands: Vec<(Server, Samples)> = AIOS
                .iter()
                .map(|aio| (spawn_qsd(1, aio, false, "-calib"), Samples::default()))
                .collect();
            for round in 0..3 {
                for (s, samples) in cands.iter_mut() {
                    samples.push(Measure::Iops, run_target(s, calib, warmup, secs, round as u64 + 1));
                }
            }
            let best = usize::from(cands[1].1.median(0) > cands[0].1.median(0));
            let mut note = String::new();
            for (i, aio) in AIOS.iter().enumerate() {
                note.push_str(&format!(
                    "{}aio={aio}: {}",
                    if i > 0 { "; " } else { "" },
                    fmt_value(Measure::Iops, cands[i].1.median(0))
                ));
            }
            note.push_str(&format!(
                " on 4K randread QD16, 1 queue (blocking, median of 3 runs) -> using aio={}",
                AIOS[best]
            ));
            eprintln!("hotpath: qemu-storage-daemon {note}");
            (AIOS[best].to_string(), note)
        }
    };
    // Writes get daemons of their own, so the read rows read the base
    // rather than an overlay that earlier write rows scattered blocks into.
    let key = |job: &Job| (job.queues, job.kind == Kind::RandWrite, job.streamed);
    let mut keys: Vec<(usize, bool, bool)> = rows.iter().map(|r| key(&r.job)).collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.iter().any(|k| k.2) {
        eprintln!("hotpath: importing the file into a local store for the cached-image rows");
        let out = std::process::Command::new(&bin)
            .args(["image", "import"])
            .arg(&file)
            .arg("--store")
            .arg(&store)
            .args(["--name", "bench"])
            .output()
            .unwrap_or_else(|e| fail(&format!("run streamblk image import: {e}")));
        if !out.status.success() {
            fail(&format!("image import: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    let mut servers: Vec<((usize, bool, bool), [Server; 2])> = keys
        .iter()
        .map(|&(q, w, st)| {
            (
                (q, w, st),
                [
                    spawn_streamblk(q, w, st),
                    spawn_qsd(q, &aio, w, if st { "-s" } else { "" }),
                ],
            )
        })
        .collect();

    let mut results: Vec<[Samples; 2]> = vec![Default::default(); rows.len()];
    let mut pread: [Samples; 3] = Default::default();
    let pfile = File::open(&file).unwrap_or_else(|e| fail(&format!("open {}: {e}", file.display())));
    for round in 0..rounds {
        eprintln!("hotpath: round {}/{rounds}", round + 1);
        for (r, row) in rows.iter().enumerate() {
            let seed = (round * 1000 + r) as u64 + 1;
            // Alternate who goes first.
            for t in 0..2 {
                let which = (t + round) % 2;
                let pair = servers
                    .iter_mut()
                    .find(|(k, _)| *k == key(&row.job))
                    .map(|(_, pair)| pair)
                    .unwrap_or_else(|| fail("no daemons for a row's queue count"));
                let server = &mut pair[which];
                let stats = run_target(server, row.job, warmup, secs, seed);
                results[r][which].push(row.measure, stats);
                let last = results[r][which].0.last().copied().unwrap_or_default();
                eprintln!(
                    "hotpath:   {} / {}: {}",
                    row.name,
                    server.name,
                    fmt_value(row.measure, last[0])
                );
            }
        }
        let seed = round as u64 * 31 + 5;
        pread[0].push(Measure::Latency, run_pread(&pfile, 1, warmup, secs, seed));
        pread[1].push(Measure::Iops, run_pread(&pfile, 1, warmup, secs, seed));
        pread[2].push(Measure::Iops, run_pread(&pfile, 2, warmup, secs, seed));
    }
    for (_, pair) in servers.iter_mut() {
        pair.iter_mut().for_each(Server::check_alive);
    }

    let command = format!(
        "cargo bench --bench hotpath (HOTPATH_ROUNDS={rounds}, HOTPATH_SECS={})",
        secs.as_secs_f64()
    );
    println!();
    println!("## streamblk vs qemu-storage-daemon: hot path");
    println!();
    println!(
        "`{command}`; 1 GiB random file in the page cache, both daemons with as many queues as the row's \
         client uses (write rows on daemons of their own), libblkio client (virtio-blk-vhost-user), medians of {rounds} rounds of {}s per row and target, alternating. \
         Latency ratios: lower is better; throughput ratios: higher is better.",
        secs.as_secs_f64()
    );
    println!();
    println!("| row | streamblk | qemu-storage-daemon | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    for (row, [sb, q]) in rows.iter().zip(&results) {
        let metrics: &[(&str, usize)] = match row.measure {
            Measure::Latency => &[("mean", 0), ("p50", 1), ("p99", 2)],
            _ => &[("", 0)],
        };
        for &(label, i) in metrics {
            let (a, b) = (sb.median(i), q.median(i));
            let name = if label.is_empty() {
                row.name.to_string()
            } else {
                format!("{}: {label} latency", row.name)
            };
            println!(
                "| {name} | {} | {} | {:.2}x |",
                fmt_value(row.measure, a),
                fmt_value(row.measure, b),
                a / b
            );
        }
    }
    for (i, label) in ["mean", "p50", "p99"].iter().enumerate() {
        println!(
            "| limit: page-cache pread 4K random, 1 thread: {label} latency | {} | | |",
            fmt_value(Measure::Latency, pread[0].median(i))
        );
    }
    println!(
        "| limit: page-cache pread 4K random, 1 thread | {} | | |",
        fmt_value(Measure::Iops, pread[1].median(0))
    );
    println!(
        "| limit: page-cache pread 4K random, 2 threads | {} | | |",
        fmt_value(Measure::Iops, pread[2].median(0))
    );
    println!();
    println!("qemu-storage-daemon: {qsd_note}");
    println!();
    println!("```");
    for (_, [sb, q]) in &servers {
        println!("{}", q.cmdline);
        println!("{}", sb.cmdline);
    }
    println!("```");
    drop(servers);
    kill_children();
}
