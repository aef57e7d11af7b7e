//! A store host in a network namespace of its own, reached over a veth pair
//! with a tc tbf rate limit: real TCP over a real bandwidth cap. Everything
//! is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct StoreHost {
    ns: String,
    nginx: Child,
    pub url: String,
    pub access_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl StoreHost {
    /// Serves `root` with nginx at 10.213.N.2:8080 inside a new namespace,
    /// behind a veth pair shaped to `rate` (tc syntax, e.g. "100mbit").
    pub fn start(root: &Path, rate: &str) -> StoreHost {
        let id = std::process::id() % 200 + 20;
        let ns = format!("sbk-store-{}", std::process::id());
        let (host_if, ns_if) = (format!("sbkh{id}"), format!("sbks{id}"));
        let (host_ip, ns_ip) = (format!("10.213.{id}.1"), format!("10.213.{id}.2"));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns]);
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        run(&["ip", "link", "set", &ns_if, "netns", &ns]);
        run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        run(&["ip", "netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"]);
        run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        // Shape both directions; the store's egress is what a boot waits on.
        shape(None, &host_if, rate);
        shape(Some(&ns), &ns_if, rate);

        let (nginx, dir, access_log) = start_nginx(&ns, &ns_ip, root);
        let url = format!("http://{ns_ip}:8080");
        let host = StoreHost {
            ns,
            nginx,
            url,
            access_log,
            _dir: dir,
        };
        wait_for_port(&format!("{ns_ip}:8080"), &host.ns);
        host
    }

    /// (path, status, bytes) per request so far.
    pub fn requests(&self) -> Vec<(String, u16, u64)> {
        access_log(&self.access_log)
    }

    /// Bytes of chunks served.
    pub fn chunk_bytes(&self) -> u64 {
        chunk_bytes(&self.requests())
    }
}

impl Drop for StoreHost {
    fn drop(&mut self) {
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
        delete_netns(&self.ns);
    }
}

/// Serves `root` with nginx at `ip`:8080 inside `ns`; its directory and access log.
pub fn start_nginx(ns: &str, ip: &str, root: &Path) -> (Child, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let access_log = dir.path().join("access.log");
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  log_format store '$request_uri $status $body_bytes_sent $remote_addr';\n  access_log {log} store;\n\
               client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
               uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
               server {{ listen {ip}:8080; root {root}; sendfile on; }}\n}}\n",
            dir = dir.path().display(),
            log = access_log.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    let nginx = Command::new("ip")
        .args(["netns", "exec", ns, "nginx", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nginx (is it installed?)");
    (nginx, dir, access_log)
}

/// Waits up to 20 s for a TCP listener at `addr` (inside `ns`, for the message).
pub fn wait_for_port(addr: &str, ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (path, status, bytes) per request in an nginx access log of ours.
pub fn access_log(path: &Path) -> Vec<(String, u16, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Bytes of chunks among `requests`.
pub fn chunk_bytes(requests: &[(String, u16, u64)]) -> u64 {
    requests
        .iter()
        .filter(|r| r.0.starts_with("/chunks/"))
        .map(|r| r.2)
        .sum()
}

/// Kills every process in `ns` (nginx's workers outlive a killed master and
/// would keep the namespace and its veths alive), then deletes it, which
/// deletes its ends of veth pairs, and so the pairs.
pub fn delete_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) on a process of the test's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Limits `dev`'s egress (in namespace `ns`, or the host's) to `rate` with tbf.
pub fn shape(ns: Option<&str>, dev: &str, rate: &str) {
    let mut args = vec![];
    if let Some(n) = ns {
        args.extend(["ip", "netns", "exec", n]);
    }
    args.extend([
        "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "100ms",
    ]);
    run(&args);
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
