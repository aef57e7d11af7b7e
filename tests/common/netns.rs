//! A store host in a network namespace of its own, reached over a veth pair
//! with a tc tbf rate limit: real TCP over a real bandwidth cap. Everything
//! is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(args: &[&str]) {
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
        for (netns, dev) in [(None, &host_if), (Some(&ns), &ns_if)] {
            let mut args = vec![];
            if let Some(n) = netns {
                args.extend(["ip", "netns", "exec", n.as_str()]);
            }
            args.extend([
                "tc",
                "qdisc",
                "add",
                "dev",
                dev.as_str(),
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "100ms",
            ]);
            run(&args);
        }

        let dir = tempfile::tempdir().unwrap();
        let access_log = dir.path().join("access.log");
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  log_format store '$request_uri $status $body_bytes_sent';\n  access_log {log} store;\n\
                   client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
                   uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
                   server {{ listen {ns_ip}:8080; root {root}; sendfile on; }}\n}}\n",
                dir = dir.path().display(),
                log = access_log.display(),
                root = root.display(),
            ),
        )
        .unwrap();
        let nginx = Command::new("ip")
            .args(["netns", "exec", &ns, "nginx", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx (is it installed?)");
        let url = format!("http://{ns_ip}:8080");
        let host = StoreHost {
            ns,
            nginx,
            url,
            access_log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(
            &format!("{ns_ip}:8080").parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(Instant::now() < deadline, "nginx did not come up in {}", host.ns);
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    /// (path, status, bytes) per request so far.
    pub fn requests(&self) -> Vec<(String, u16, u64)> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.to_string(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Bytes of chunks served.
    pub fn chunk_bytes(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.0.starts_with("/chunks/"))
            .map(|r| r.2)
            .sum()
    }
}

impl Drop for StoreHost {
    fn drop(&mut self) {
        // Every process in the namespace: nginx's workers outlive a killed
        // master, and would keep the namespace (and its veth) alive.
        let pids = Command::new("ip").args(["netns", "pids", &self.ns]).output();
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
        if let Ok(out) = pids {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a process of the test's own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
