//! The control API: JSON requests on a unix socket (status, add, remove,
//! list and show disks, show an image), open to root and one configured
//! group only; and the Prometheus metrics endpoint. It knows nothing of how
//! the daemon does what it is asked: a [`Handler`] answers.

pub(crate) mod status;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use status::{DiskState, DiskStatus, ImageStatus, Status};

/// The protocol version this build speaks.
pub(crate) const VERSION: u32 = 1;
/// Longest request accepted.
const MAX_REQUEST: u64 = 64 << 10;
/// Connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("bind control socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("control socket {0}: another daemon answers on it")]
    InUse(PathBuf),
    #[error("set the owner group and mode of control socket {0}")]
    Permissions(PathBuf, #[source] io::Error),
    #[error("no group named {0}")]
    NoGroup(String),
    #[error("bind metrics address {0}")]
    BindMetrics(std::net::SocketAddr, #[source] io::Error),
    #[error("start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
}

/// A request: `{"version": 1, "op": "disk-add", "spec": ...}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Op {
    /// The whole status document.
    Status,
    /// Adds a disk; `spec` is a SPEC string or an object of its fields.
    DiskAdd {
        spec: serde_json::Value,
    },
    /// Removes a disk; refused while a frontend is attached unless `force`.
    DiskRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    DiskList,
    DiskShow {
        name: String,
    },
    ImageShow {
        id: String,
    },
}

/// The answer: `{"version": 1, "ok": true, "result": ...}` or
/// `{"version": 1, "ok": false, "error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answers control requests; an `Err` is sent to the client as its error.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(&self, op: Op) -> Result<serde_json::Value, String>;
}

/// Who may use the control socket besides root and the daemon's own user.
#[derive(Clone, Copy, Debug)]
struct Access {
    gid: Option<libc::gid_t>,
}

/// Resolves a group name (or number) to its id.
pub(crate) fn group_id(name: &str) -> Result<libc::gid_t, Error> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| Error::NoGroup(name.into()))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of grp.
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(Error::NoGroup(name.into()));
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is plain data (integers and pointers); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// The credentials of the process at the other end of `conn`.
fn peer_credentials(conn: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// The supplementary groups of a process, from /proc.
fn process_groups(pid: libc::pid_t) -> Vec<libc::gid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        })
        .unwrap_or_default()
}

impl Access {
    /// Root, the daemon's own user, or a member of the group.
    fn check(&self, cred: &libc::ucred) -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if cred.uid == 0 || cred.uid == me {
            return Ok(());
        }
        if let Some(g) = self.gid {
            if cred.gid == g || process_groups(cred.pid).contains(&g) {
                return Ok(());
            }
        }
        Err(format!(
            "permission denied: uid {} is not root{}",
            cred.uid,
            match self.gid {
                Some(g) => format!(" nor in the control group (gid {g})"),
                None => " (no control group is configured)".into(),
            }
        ))
    }
}

/// Binds the control socket (mode 0660, group `group` if given) and
/// answers requests with `handler`, from a thread of its own, until the
/// process ends.
pub(crate) fn serve(path: &Path, group: Option<&str>, handler: Arc<dyn Handler>) -> Result<(), Error> {
    let gid = group.map(group_id).transpose()?;
    let err = |e| Error::Bind(path.to_path_buf(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A stale socket from a dead daemon; a live one would be refused below.
    if UnixStream::connect(path).is_ok() {
        return Err(Error::InUse(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    let perm = |e| Error::Permissions(path.to_path_buf(), e);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(perm)?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(perm)?;
    }
    let access = Access { gid };
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    let _ = reply(&conn, Err("busy: too many control connections".into()));
                    continue;
                }
                let (handler, busy) = (handler.clone(), busy.clone());
                let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                    answer(conn, access, &*handler);
                    busy.fetch_sub(1, Ordering::AcqRel);
                });
                if let Err(e) = spawned {
                    tracing::warn!("control connection thread: {e}");
                }
            }
        })
        .map_err(|e| Error::Thread("control", e))?;
    Ok(())
}

fn reply(mut conn: &UnixStream, r: Result<serde_json::Value, String>) -> io::Result<()> {
    let resp = match r {
        Ok(v) => Response {
            version: VERSION,
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => Response {
            version: VERSION,
            ok: false,
            result: None,
            error: Some(e),
        },
    };
    let mut doc = serde_json::to_string(&resp).unwrap_or_default();
    doc.push('\n');
    conn.write_all(doc.as_bytes())
}

/// Serves one connection: one request, one response.
fn answer(conn: UnixStream, access: Access, handler: &dyn Handler) {
    let cred = match peer_credentials(&conn) {
        Ok(c) => c,
        Err(e) => {
            let _ = reply(&conn, Err(format!("read peer credentials: {e}")));
            return;
        }
    };
    if let Err(e) = access.check(&cred) {
        tracing::warn!(uid = cred.uid, pid = cred.pid, "control request refused: {e}");
        let _ = reply(&conn, Err(e));
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line);
    let result = match read {
        Err(e) => Err(format!("read the request: {e}")),
        // A client that sends nothing wants the status (the first protocol).
        Ok(0) => handler.handle(Op::Status),
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(_) => parse_request(&line).and_then(|op| {
            if !matches!(
                op,
                Op::Status | Op::DiskList | Op::DiskShow { .. } | Op::ImageShow { .. }
            ) {
                tracing::info!(uid = cred.uid, pid = cred.pid, "control request: {}", line.trim());
            }
            handler.handle(op)
        }),
    };
    let _ = reply(&conn, result);
}

fn parse_request(line: &str) -> Result<Op, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad request: not JSON: {e}"))?;
    match v.get("version").and_then(|v| v.as_u64()) {
        None => return Err("bad request: needs a \"version\" field (a number)".into()),
        Some(n) if n != u64::from(VERSION) => {
            return Err(format!(
                "unsupported protocol version {n}: this daemon speaks {VERSION}"
            ))
        }
        Some(_) => {}
    }
    let r: Request = serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))?;
    Ok(r.op)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("connect to {0}")]
    Connect(PathBuf, #[source] io::Error),
    #[error("talk to {0}")]
    Io(PathBuf, #[source] io::Error),
    #[error("bad response from {0}: {1}")]
    BadResponse(PathBuf, String),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the daemon at `path`; its result, or its error.
pub(crate) fn request(path: &Path, op: Op) -> Result<serde_json::Value, ClientError> {
    let mut conn = UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_path_buf(), e))?;
    let io = |e| ClientError::Io(path.to_path_buf(), e);
    conn.set_read_timeout(Some(Duration::from_secs(300))).map_err(io)?;
    let mut req = serde_json::to_string(&Request { version: VERSION, op }).unwrap_or_default();
    req.push('\n');
    // A refused client may find the connection closed before it writes.
    let written = conn.write_all(req.as_bytes());
    let mut buf = String::new();
    let read = conn.read_to_string(&mut buf);
    if buf.is_empty() {
        written.map_err(io)?;
        read.map_err(io)?;
    }
    let resp: Response =
        serde_json::from_str(&buf).map_err(|e| ClientError::BadResponse(path.to_path_buf(), e.to_string()))?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(resp.error.unwrap_or_default()))
    }
}

/// Reads the status document from a daemon's control socket.
pub fn read_status(path: &Path) -> io::Result<serde_json::Value> {
    request(path, Op::Status).map_err(|e| match e {
        ClientError::Connect(_, e) | ClientError::Io(_, e) => e,
        e => io::Error::other(e.to_string()),
    })
}

/// Serves Prometheus metrics, `metrics()` in the text exposition format, to
/// every HTTP request on `addr`, from a thread of its own.
pub(crate) fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: impl Fn() -> String + Send + 'static,
) -> Result<std::net::SocketAddr, Error> {
    let err = |e| Error::BindMetrics(addr, e);
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                // The request itself does not matter: read what came, answer.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
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
        .map_err(|e| Error::Thread("metrics", e))?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        let op = parse_request(r#"{"version":1,"op":"disk-remove","name":"a","force":true}"#).unwrap();
        assert!(matches!(op, Op::DiskRemove { ref name, force: true } if name == "a"));
        let op = parse_request(r#"{"version":1,"op":"disk-add","spec":"name=a"}"#).unwrap();
        assert!(matches!(op, Op::DiskAdd { .. }));
        for (req, why) in [
            ("nonsense", "not JSON"),
            (r#"{"op":"status"}"#, "version"),
            (r#"{"version":2,"op":"status"}"#, "version 2"),
            (r#"{"version":1,"op":"explode"}"#, "unknown variant"),
            (r#"{"version":1,"op":"disk-remove"}"#, "name"),
            (r#"{"version":1}"#, "op"),
        ] {
            let e = parse_request(req).unwrap_err();
            assert!(e.contains(why), "{req}: {e}");
        }
    }

    #[test]
    fn access_allows_root_and_the_group_only() {
        let a = Access { gid: Some(4242) };
        let cred = |uid, gid| libc::ucred { pid: 0, uid, gid };
        assert!(a.check(&cred(0, 0)).is_ok());
        assert!(a.check(&cred(54321, 4242)).is_ok());
        let e = a.check(&cred(54321, 100)).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        assert!(Access { gid: None }.check(&cred(54321, 4242)).is_err());
    }
}
