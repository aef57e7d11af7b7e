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
