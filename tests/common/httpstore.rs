//! A small HTTP server for a store directory, with faults the tests switch
//! on and off: errors, stalls, corrupt chunks, latency. Loopback only.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 503 for everything.
    Error,
    /// Accept requests, never answer (until the fault is cleared).
    Stall,
    /// Flip a byte in every chunk served.
    Corrupt,
}

pub struct HttpStore {
    pub url: String,
    state: Arc<State>,
}

struct State {
    root: PathBuf,
    fault: Mutex<Fault>,
    delay: Mutex<Duration>,
    /// GETs per path that got a 200.
    served: Mutex<HashMap<String, u64>>,
    chunk_bytes: AtomicU64,
    stop: AtomicBool,
}

impl HttpStore {
    pub fn start(root: PathBuf) -> HttpStore {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            root,
            fault: Mutex::new(Fault::None),
            delay: Mutex::new(Duration::ZERO),
            served: Mutex::new(HashMap::new()),
            chunk_bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        HttpStore { url, state }
    }

    pub fn set_fault(&self, f: Fault) {
        *self.state.fault.lock().unwrap() = f;
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    /// Chunk GETs answered with 200, per chunk path.
    pub fn chunk_requests(&self) -> HashMap<String, u64> {
        self.state
            .served
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("/chunks/"))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.state.chunk_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for HttpStore {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.set_fault(Fault::None);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn serve(conn: TcpStream, s: &State) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("/").to_string(),
        );
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                body_len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; body_len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let delay = *s.delay.lock().unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let fault = *s.fault.lock().unwrap();
        match fault {
            Fault::Stall => {
                while *s.fault.lock().unwrap() == Fault::Stall {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return; // drop the connection: the client gave up long ago
            }
            Fault::Error => {
                let _ = out.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            _ => {}
        }
        let rel = path.trim_start_matches('/');
        let file = s.root.join(rel);
        let ok = !rel.split('/').any(|p| p == "..") && file.is_file();
        if !ok || (method != "GET" && method != "HEAD") {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let mut data = std::fs::read(&file).unwrap();
        if fault == Fault::Corrupt && rel.starts_with("chunks/") {
            let n = data.len();
            data[n / 2] ^= 0x55;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nLast-Modified: Mon, 02 Nov 2026 10:00:00 GMT\r\nETag: \"{}\"\r\n\r\n",
            data.len(),
            data.len()
        );
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method == "GET" {
            if out.write_all(&data).is_err() {
                return;
            }
            *s.served.lock().unwrap().entry(path.clone()).or_default() += 1;
            if rel.starts_with("chunks/") {
                s.chunk_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A forward HTTP proxy, as a site's P2P or caching proxy would be: it
/// takes absolute-form requests (`GET http://host:port/path`), sends each
/// to its origin on a connection of its own, and relays the answer.
/// Counts the requests it relayed, per origin-form path. Loopback only.
pub struct ForwardProxy {
    pub url: String,
    relayed: Arc<Mutex<HashMap<String, u64>>>,
    stop: Arc<AtomicBool>,
}

impl ForwardProxy {
    pub fn start() -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let relayed = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (relayed.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let r = r.clone();
                std::thread::spawn(move || relay(conn, &r));
            }
        });
        ForwardProxy { url, relayed, stop }
    }

    /// Requests relayed, per path.
    pub fn relayed(&self) -> HashMap<String, u64> {
        self.relayed.lock().unwrap().clone()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn relay(conn: TcpStream, relayed: &Mutex<HashMap<String, u64>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some((origin, path)) = target
            .strip_prefix("http://")
            .map(|rest| rest.split_at(rest.find('/').unwrap_or(rest.len())))
        else {
            let _ = out.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            return;
        };
        let path = if path.is_empty() { "/" } else { path };
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                body_len = v.trim().parse().unwrap_or(0);
            }
            if !lower.starts_with("proxy-") && !lower.starts_with("connection:") {
                request.push_str(&h);
            }
        }
        request.push_str("\r\n");
        let mut body = vec![0u8; body_len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // One origin connection per request, its write side shut after the
        // request: the origin answers and closes, and the answer is all read.
        let answer = TcpStream::connect(origin).and_then(|mut up| {
            up.write_all(request.as_bytes())?;
            up.write_all(&body)?;
            up.shutdown(std::net::Shutdown::Write)?;
            let mut answer = Vec::new();
            up.read_to_end(&mut answer)?;
            Ok(answer)
        });
        let Ok(answer) = answer else {
            let _ = out.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        *relayed.lock().unwrap().entry(path.to_string()).or_default() += 1;
        if out.write_all(&answer).is_err() {
            return;
        }
    }
}
