//! A small HTTP image store for `scripts/bench-boot.sh`.
//!
//! Serves the files of a store directory (manifests/, names/, chunks/,
//! profiles/) with plain GETs, waiting a fixed delay per request (the
//! store's latency: tc here has no netem), and counts the bytes it serves.
//! Control paths:
//!   GET /__stats            {"requests": N, "bytes": N, "chunk_requests": N, "chunk_bytes": N}
//!   GET /__reset            zero the counters
//!   GET /__profiles/on|off  serve or hide (404) profiles/*
//! Extra files outside the store: --file /URLPATH=LOCALPATH (e.g. the raw image).
//!
//! It replaced a Python server whose threads take turns on the interpreter
//! lock: about a millisecond more per request (3.0 against 2.0 ms one at a
//! time over the benchmark's 1 Gbit/s link; README, "The boot benchmark").
//! Here every request waits and reads on its own blocking thread, so
//! requests overlap as they would on a real store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

/// Files up to this size are read whole; larger ones (the raw image) are streamed.
const WHOLE_MAX: u64 = 8 << 20;
/// The piece a streamed file is read and sent in.
const PIECE: usize = 1 << 20;

/// A tiny HTTP image store for scripts/bench-boot.sh.
#[derive(Parser)]
struct Args {
    /// The store directory.
    root: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    listen: std::net::IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Wait per request (ms).
    #[arg(long, default_value_t = 1.0)]
    delay_ms: f64,
    /// An extra file outside the store: /URLPATH=LOCALPATH.
    #[arg(long = "file", value_name = "/URLPATH=LOCALPATH")]
    files: Vec<String>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    bytes: AtomicU64,
    chunk_requests: AtomicU64,
    chunk_bytes: AtomicU64,
}

struct Server {
    root: PathBuf,
    delay: Duration,
    extra: HashMap<String, PathBuf>,
    profiles: AtomicBool,
    stats: Stats,
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn small(code: StatusCode, body: &'static str, ctype: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(CONTENT_TYPE, ctype.parse().unwrap());
    r
}

fn json(body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn not_found() -> Response<Body> {
    small(StatusCode::NOT_FOUND, "not found\n", "text/plain")
}

/// An opened file: its whole bytes, or the file to stream.
enum Opened {
    Whole(Vec<u8>),
    Stream(std::fs::File, u64),
}

impl Server {
    /// The local file a URL path names, if it may be served.
    fn resolve(&self, path: &str) -> Option<PathBuf> {
        if let Some(p) = self.extra.get(path) {
            return Some(p.clone());
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == ".." || p.contains('\0')) {
            return None;
        }
        if parts[0] == "profiles" && !self.profiles.load(Ordering::Relaxed) {
            return None;
        }
        let rel: PathBuf = parts.iter().collect();
        // Belt and braces: nothing but plain names below the root.
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return None;
        }
        Some(self.root.join(rel))
    }

    fn count(&self, path: &str, n: u64) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(n, Ordering::Relaxed);
        if path.starts_with("/chunks/") {
            self.stats.chunk_requests.fetch_add(1, Ordering::Relaxed);
            self.stats.chunk_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn control(&self, path: &str) -> Response<Body> {
        let s = &self.stats;
        match path {
            "/__stats" => json(format!(
                r#"{{"requests": {}, "bytes": {}, "chunk_requests": {}, "chunk_bytes": {}}}"#,
                s.requests.load(Ordering::Relaxed),
                s.bytes.load(Ordering::Relaxed),
                s.chunk_requests.load(Ordering::Relaxed),
                s.chunk_bytes.load(Ordering::Relaxed),
            )),
            "/__reset" => {
                for c in [&s.requests, &s.bytes, &s.chunk_requests, &s.chunk_bytes] {
                    c.store(0, Ordering::Relaxed);
                }
                json("{}".into())
            }
            "/__profiles/on" | "/__profiles/off" => {
                self.profiles.store(path.ends_with("/on"), Ordering::Relaxed);
                json("{}".into())
            }
            _ => small(StatusCode::NOT_FOUND, "{}", "application/json"),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path().to_string();
        if path.starts_with("/__") {
            return Ok(self.control(&path));
        }
        let head = req.method() == Method::HEAD;
        if !head && req.method() != Method::GET {
            return Ok(small(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n", "text/plain"));
        }
        // The delay and the open and read on a blocking thread of their own:
        // a precise sleep (tokio's timer rounds up to the next millisecond),
        // and no request waits for another's.
        let server = self.clone();
        let opened = tokio::task::spawn_blocking(move || {
            std::thread::sleep(server.delay);
            let full = server.resolve(&path).ok_or(())?;
            let f = std::fs::File::open(&full).map_err(|_| ())?;
            let meta = f.metadata().map_err(|_| ())?;
            if !meta.is_file() {
                return Err(());
            }
            let size = meta.len();
            if head || size > WHOLE_MAX {
                return Ok((path, Opened::Stream(f, size)));
            }
            let mut buf = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(&mut { f }, &mut buf).map_err(|_| ())?;
            Ok((path, Opened::Whole(buf)))
        })
        .await
        .expect("the blocking task does not panic");
        let Ok((path, opened)) = opened else {
            return Ok(not_found());
        };
        let (size, body): (u64, Body) = match opened {
            Opened::Stream(_, size) if head => (size, Full::new(Bytes::new()).map_err(|e| match e {}).boxed_unsync()),
            Opened::Whole(buf) => {
                let n = buf.len() as u64;
                self.count(&path, n);
                (n, Full::new(Bytes::from(buf)).map_err(|e| match e {}).boxed_unsync())
            }
            Opened::Stream(f, size) => {
                // Counted as it is read, as the Python server counted what sendfile sent.
                let file = tokio::fs::File::from_std(f);
                let this = self.clone();
                this.stats.requests.fetch_add(1, Ordering::Relaxed);
                if path.starts_with("/chunks/") {
                    this.stats.chunk_requests.fetch_add(1, Ordering::Relaxed);
                }
                let pieces = futures::stream::unfold((file, this, path), |(mut file, this, path)| async move {
                    let mut buf = vec![0u8; PIECE];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            this.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                            if path.starts_with("/chunks/") {
                                this.stats.chunk_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Some((Ok(Frame::data(Bytes::from(buf))), (file, this, path)))
                        }
                        // hyper drops the body at its first error.
                        Err(e) => Some((Err(e), (file, this, path))),
                    }
                });
                (size, StreamBody::new(pieces.boxed()).boxed_unsync())
            }
        };
        let mut r = Response::new(body);
        r.headers_mut()
            .insert(CONTENT_TYPE, "application/octet-stream".parse().unwrap());
        r.headers_mut().insert(CONTENT_LENGTH, size.into());
        Ok(r)
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let abs = |p: &Path| std::path::absolute(p);
    let server = Arc::new(Server {
        root: abs(&a.root)?,
        delay: Duration::from_secs_f64(a.delay_ms.max(0.0) / 1000.0),
        extra: a
            .files
            .iter()
            .map(|spec| {
                let (url, local) = spec.split_once('=').unwrap_or((spec, ""));
                Ok((format!("/{}", url.trim_start_matches('/')), abs(Path::new(local))?))
            })
            .collect::<std::io::Result<_>>()?,
        profiles: AtomicBool::new(true),
        stats: Stats::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(a.listen, a.port)).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let server = server.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| server.clone().handle(req));
                // Keep-alive, as a real store; a client's hang-up is no error of ours.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
