//! The control socket: a unix socket that answers every connection with the
//! daemon's status as one JSON document (`streamblk status` reads it).

use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind control socket {0}")]
    Bind(std::path::PathBuf, #[source] io::Error),
}

/// Serves `status()` on `path` from a thread of its own, until the process ends.
pub fn serve_status(path: &Path, status: impl Fn() -> serde_json::Value + Send + 'static) -> Result<(), Error> {
    let err = |e| Error::Bind(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A stale socket from a dead daemon; a live one would be refused below.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another daemon answers on it",
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut doc = status().to_string();
                doc.push('\n');
                let _ = conn.write_all(doc.as_bytes());
            }
        })
        .map_err(err)?;
    Ok(())
}

/// Reads the status document from a daemon's control socket.
pub fn read_status(path: &Path) -> io::Result<serde_json::Value> {
    let mut conn = std::os::unix::net::UnixStream::connect(path)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut buf = String::new();
    io::Read::read_to_string(&mut conn, &mut buf)?;
    serde_json::from_str(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Serves Prometheus metrics, `metrics()` in the text exposition format, to
/// every HTTP request on `addr`, from a thread of its own.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: impl Fn() -> String + Send + 'static,
) -> Result<std::net::SocketAddr, Error> {
    let err = |e| Error::Bind(std::path::PathBuf::from(addr.to_string()), e);
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                // The request itself does not matter: read what came, answer.
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = io::Read::read(&mut conn, &mut buf);
                let body = metrics();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body.as_bytes()));
            }
        })
        .map_err(err)?;
    Ok(local)
}

/// The status document as Prometheus metrics.
pub fn prometheus(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP streamblk_{name} {help}\n# TYPE streamblk_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "streamblk_{name}{labels} {v}");
        }
    };
    let images = status["images"].as_array().cloned().unwrap_or_default();
    let per_image = |key: &str| -> Vec<(String, u64)> {
        images
            .iter()
            .map(|i| {
                (
                    format!("{{image=\"{}\"}}", i["id"].as_str().unwrap_or("")),
                    i[key].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    metric(
        "image_chunks",
        "Non-zero chunks of the image.",
        "gauge",
        per_image("chunks"),
    );
    metric(
        "image_cached_chunks",
        "Non-zero chunks in the Local Cache.",
        "gauge",
        per_image("filled"),
    );
    metric(
        "cache_hits_total",
        "Guest reads served from the cache.",
        "counter",
        per_image("hits"),
    );
    metric(
        "cache_misses_total",
        "Guest reads that waited for a fetch.",
        "counter",
        per_image("misses"),
    );
    let f = &status["fetch"];
    if !f.is_null() {
        let one = |k: &str| vec![(String::new(), f[k].as_u64().unwrap_or(0))];
        metric(
            "store_chunks_total",
            "Chunks fetched from the store.",
            "counter",
            one("store_chunks"),
        );
        metric(
            "store_bytes_total",
            "Bytes fetched from the store.",
            "counter",
            one("store_bytes"),
        );
        metric(
            "corrupt_chunks_total",
            "Chunks that failed verification.",
            "counter",
            one("corrupt_chunks"),
        );
        metric(
            "fetch_failures_total",
            "Failed fetch attempts.",
            "counter",
            one("failed_attempts"),
        );
        metric(
            "guest_waits_total",
            "Guest reads that waited on a fetch.",
            "counter",
            one("guest_waits"),
        );
        metric(
            "guest_wait_ms_total",
            "Time guests waited on fetches, ms.",
            "counter",
            one("guest_wait_ms"),
        );
    }
    let disks = status["disks"].as_array().cloned().unwrap_or_default();
    metric(
        "disk_attached",
        "1 while a frontend is connected to the disk.",
        "gauge",
        disks
            .iter()
            .map(|d| {
                (
                    format!("{{disk=\"{}\"}}", d["name"].as_str().unwrap_or("")),
                    u64::from(d["connected"] == true),
                )
            })
            .collect(),
    );
    out
}
