//! Shared test harness: a streamblk daemon process and a vhost-user-blk
//! client (libblkio's Rust crate) driving it.
#![allow(dead_code)]

pub mod fleet;
pub mod frontend;
pub mod guest;
pub mod httpstore;
pub mod netns;
pub mod powercutfs;
pub mod ring;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const BIN: &str = env!("CARGO_BIN_EXE_streamblk");

/// A running `streamblk serve`. Killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub args: Vec<String>,
    pub control: PathBuf,
    /// Its stderr (unless STREAMBLK_TEST_LOG sends it to the test's):
    /// printed, with how it ended, if the test fails while it is around.
    pub log: Option<PathBuf>,
}

/// A control socket path of its own for each daemon a test starts.
fn control_socket() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("streamblk-test-ctl-{}-{n}.sock", std::process::id()))
}

impl Daemon {
    pub fn start(args: &[String]) -> Daemon {
        Daemon::start_in(None, args)
    }

    /// Starts the daemon inside network namespace `netns` (its sockets and
    /// files are the host's; only its network is the namespace's).
    pub fn start_in(netns: Option<&str>, args: &[String]) -> Daemon {
        let inherit = std::env::var("STREAMBLK_TEST_LOG").is_ok();
        let control = control_socket();
        let log = (!inherit).then(|| control.with_extension("log"));
        let stderr = match &log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create the daemon's log")),
            None => Stdio::inherit(),
        };
        let mut cmd = match netns {
            // `ip netns exec` execs the daemon: the child's pid is the daemon's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .arg("serve")
            .arg("--control-socket")
            .arg(&control)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn streamblk");
        Daemon {
            child,
            args: args.to_vec(),
            control,
            log,
        }
    }

    /// The daemon's status document (see `streamblk status --json`).
    pub fn status(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match streamblk::control::read_status(&self.control) {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => panic!("status: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// One `--disk` argument per spec.
    pub fn with_disks<S: AsRef<str>>(specs: &[S]) -> Daemon {
        let args: Vec<String> = specs
            .iter()
            .flat_map(|s| ["--disk".to_string(), s.as_ref().to_string()])
            .collect();
        Daemon::start(&args)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let ended = self.child.try_wait().ok().flatten();
            eprintln!(
                "--- daemon {} ({}), its log's end:",
                self.child.id(),
                ended.map_or("still running".to_string(), |s| format!("had exited: {s}"))
            );
            if let Some(text) = self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("daemon| {l}");
                }
            }
        }
        self.kill();
        let _ = std::fs::remove_file(&self.control);
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Waits (up to 20 s) for a socket file to appear.
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn disk_spec(name: &str, dir: &Path, base: &Path, extra: &str) -> String {
    format!(
        "name={name},socket={},overlay={},base={}{extra}",
        dir.join(format!("{name}.sock")).display(),
        dir.join(format!("{name}.overlay")).display(),
        base.display()
    )
}

/// A file of `len` pseudo-random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    std::fs::write(path, &data).unwrap();
    data
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A vhost-user-blk client with one shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

/// One request for [`Client::run`].
#[derive(Clone, Debug)]
pub enum Op {
    Read { offset: u64, len: usize, buf: usize },
    Write { offset: u64, len: usize, buf: usize },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

impl Client {
    /// Connects, retrying while the daemon comes up (up to 20 s).
    pub fn connect(socket: &Path, queues: usize, region_len: usize) -> Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Self::try_connect(socket, queues, region_len) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect to {}: {e}", socket.display()),
            }
        }
    }

    pub fn try_connect(socket: &Path, queues: usize, region_len: usize) -> Result<Client, String> {
        Self::try_connect_sized(socket, queues, region_len, None)
    }

    /// Like `try_connect`, with `queue_size` entries per queue if given.
    pub fn try_connect_sized(
        socket: &Path,
        queues: usize,
        region_len: usize,
        queue_size: Option<i32>,
    ) -> Result<Client, String> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| e.message().to_string())?;
        b.set_str("path", socket.to_str().unwrap())
            .map_err(|e| e.message().to_string())?;
        b.connect().map_err(|e| format!("connect: {}", e.message()))?;
        if let Some(n) = queue_size {
            b.set_i32("queue-size", n)
                .map_err(|e| format!("queue-size: {}", e.message()))?;
        }
        b.set_i32("num-queues", queues as i32)
            .map_err(|e| format!("num-queues: {}", e.message()))?;
        let capacity = b
            .get_u64("capacity")
            .map_err(|e| format!("capacity: {}", e.message()))?;
        let started = b.start().map_err(|e| format!("start: {}", e.message()))?;
        let region = b
            .alloc_mem_region(region_len)
            .map_err(|e| format!("alloc: {}", e.message()))?;
        b.map_mem_region(&region).map_err(|e| format!("map: {}", e.message()))?;
        Ok(Client {
            blkio: b,
            queues: started.queues,
            region,
            capacity,
        })
    }

    /// The shared buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for the client's life and only this
        // client touches it while no request is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Submits every op (op i on queue i % queues), waits for all, returns
    /// each op's result (0 or -errno), or None for ops that did not complete
    /// within `timeout`.
    ///
    /// Like a guest driver, it honours the device's segment size: a buffer
    /// longer than SIZE_MAX goes as several segments of one request.
    pub fn run_timeout(&mut self, ops: &[Op], timeout: Duration) -> Vec<Option<i32>> {
        let base = self.region.addr;
        let nq = self.queues.len();
        // The iovecs must outlive the submission (do_io below).
        let mut iovecs: Vec<Vec<libc::iovec>> = Vec::new();
        let segments = |at: usize, len: usize| -> Vec<libc::iovec> {
            let seg = streamblk::virtio_blk::SIZE_MAX as usize;
            (0..len.div_ceil(seg))
                .map(|k| libc::iovec {
                    iov_base: (base + at + k * seg) as *mut libc::c_void,
                    iov_len: seg.min(len - k * seg),
                })
                .collect()
        };
        for (i, op) in ops.iter().enumerate() {
            let q = &mut self.queues[i % nq];
            match *op {
                Op::Read { offset, len, buf } | Op::Write { offset, len, buf }
                    if len > streamblk::virtio_blk::SIZE_MAX as usize =>
                {
                    let v = segments(buf, len);
                    let n = v.len() as u32;
                    if matches!(op, Op::Read { .. }) {
                        q.readv(offset, v.as_ptr(), n, i, ReqFlags::empty());
                    } else {
                        q.writev(offset, v.as_ptr(), n, i, ReqFlags::empty());
                    }
                    iovecs.push(v);
                }
                Op::Read { offset, len, buf } => q.read(offset, (base + buf) as *mut u8, len, i, ReqFlags::empty()),
                Op::Write { offset, len, buf } => q.write(offset, (base + buf) as *const u8, len, i, ReqFlags::empty()),
                Op::Flush => q.flush(i, ReqFlags::empty()),
                Op::Discard { offset, len } => q.discard(offset, len, i, ReqFlags::empty()),
                Op::WriteZeroes { offset, len } => q.write_zeroes(offset, len, i, ReqFlags::empty()),
            }
        }
        let mut results = vec![None; ops.len()];
        let mut left: Vec<usize> = (0..nq).map(|q| (q..ops.len()).step_by(nq).count()).collect();
        let deadline = Instant::now() + timeout;
        let mut completions: Vec<MaybeUninit<Completion>> = (0..256).map(|_| MaybeUninit::uninit()).collect();
        for (qi, q) in self.queues.iter_mut().enumerate() {
            while left[qi] > 0 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let mut t = deadline - now;
                let want = left[qi].min(completions.len());
                let n = match q.do_io(&mut completions, want, Some(&mut t), None) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                for c in &completions[..n] {
                    // SAFETY: do_io initialised the first n completions.
                    let c = unsafe { c.assume_init_read() };
                    results[c.user_data] = Some(c.ret);
                    left[qi] -= 1;
                }
            }
        }
        drop(iovecs);
        results
    }

    /// Like `run_timeout`, asserting every op completed.
    pub fn run(&mut self, ops: &[Op]) -> Vec<i32> {
        self.run_timeout(ops, Duration::from_secs(60))
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| panic!("op {i} ({:?}) did not complete", ops[i])))
            .collect()
    }

    /// Reads `len` bytes at `offset` (through buffer offset 0), in
    /// requests no larger than the device takes.
    pub fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let ops = Self::pieces(len, |at, n| Op::Read {
            offset: offset + at as u64,
            len: n,
            buf: at,
        });
        let r = self.run(&ops);
        assert!(r.iter().all(|&r| r == 0), "read {offset}+{len}: {r:?}");
        self.buf()[..len].to_vec()
    }

    /// Writes `data` at `offset` (through buffer offset 0).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.buf()[..data.len()].copy_from_slice(data);
        let ops = Self::pieces(data.len(), |at, n| Op::Write {
            offset: offset + at as u64,
            len: n,
            buf: at,
        });
        let r = self.run(&ops);
        assert!(r.iter().all(|&r| r == 0), "write {offset}+{}: {r:?}", data.len());
    }

    /// `len` bytes as requests of at most MAX_REQUEST_BYTES.
    fn pieces(len: usize, op: impl Fn(usize, usize) -> Op) -> Vec<Op> {
        let max = streamblk::virtio_blk::MAX_REQUEST_BYTES as usize / 4096 * 4096;
        (0..len.div_ceil(max).max(1))
            .map(|k| op(k * max, max.min(len - k * max)))
            .collect()
    }

    pub fn flush(&mut self) {
        assert_eq!(self.run(&[Op::Flush])[0], 0, "flush");
    }
}

/// blake3-free, dependency-free digest for "the base did not change".
pub fn file_digest(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("streamblk-test").tempdir().unwrap()
}

pub fn path_of(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Imports `image` into the store directory `store`; returns the image id.
pub fn import(image: &Path, store: &Path, name: &str, chunk_size: u64) -> String {
    let out = Command::new(BIN)
        .args(["image", "import"])
        .arg(image)
        .arg("--store")
        .arg(store)
        .args(["--name", name, "--chunk-size", &chunk_size.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `streamblk serve ARGS` expecting it to fail; returns its stderr.
pub fn serve_fails(args: &[String]) -> String {
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--control-socket")
        .arg(control_socket())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "serve {args:?} succeeded");
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve {args:?} neither failed nor exited");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the streamblk binary with `args`, asserting success; returns stdout.
pub fn streamblk(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "streamblk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
