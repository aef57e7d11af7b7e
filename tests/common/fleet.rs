//! Hosts in network namespaces of their own on one switch: a store host
//! running nginx and N daemon hosts, each behind a veth pair whose two ends
//! are shaped with tbf (upload on the host's end, download on the switch's).
//! Every address lives inside the namespaces; everything is removed on drop.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Child;

use super::netns::{access_log, chunk_bytes, delete_netns, run, shape, start_nginx};

pub struct Fleet {
    /// The switch namespace, holding the bridge.
    switch: String,
    /// Per host: its namespace and its address.
    pub hosts: Vec<(String, String)>,
    store_ns: String,
    nginx: Child,
    pub store_url: String,
    _store_dir: tempfile::TempDir,
    access_log: PathBuf,
}

impl Fleet {
    /// A store serving `root` behind `store_rate`, and `n` hosts behind
    /// `host_rate` (tc syntax, e.g. "100mbit").
    pub fn start(root: &Path, store_rate: &str, n: usize, host_rate: &str) -> Fleet {
        let pid = std::process::id();
        let net = pid % 200 + 20;
        let switch = format!("sbk-sw-{pid}");
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &switch])
            .output();
        run(&["ip", "netns", "add", &switch]);
        let in_switch = |args: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &switch];
            a.extend_from_slice(args);
            run(&a);
        };
        in_switch(&["ip", "link", "add", "br0", "type", "bridge"]);
        in_switch(&["ip", "link", "set", "br0", "up"]);
        // Member 0 is the store, 1..=n the hosts.
        let mut members = Vec::new();
        for i in 0..=n {
            let ns = if i == 0 {
                format!("sbk-store-{pid}")
            } else {
                format!("sbk-h{i}-{pid}")
            };
            let ip = format!("10.214.{net}.{}", i + 1);
            let rate = if i == 0 { store_rate } else { host_rate };
            let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
            run(&["ip", "netns", "add", &ns]);
            let (inner, outer) = ("eth0", format!("p{i}"));
            // Made in the switch, then one end moved into the member.
            in_switch(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", inner]);
            in_switch(&["ip", "link", "set", inner, "netns", &ns]);
            in_switch(&["ip", "link", "set", &outer, "master", "br0"]);
            in_switch(&["ip", "link", "set", &outer, "up"]);
            let in_member = |args: &[&str]| {
                let mut a = vec!["ip", "netns", "exec", ns.as_str()];
                a.extend_from_slice(args);
                run(&a);
            };
            in_member(&["ip", "addr", "add", &format!("{ip}/24"), "dev", inner]);
            in_member(&["ip", "link", "set", inner, "up"]);
            in_member(&["ip", "link", "set", "lo", "up"]);
            shape(Some(&ns), inner, rate);
            shape(Some(&switch), &outer, rate);
            members.push((ns, ip));
        }
        let (store_ns, store_ip) = members.remove(0);
        let (nginx, store_dir, access_log) = start_nginx(&store_ns, &store_ip, root);
        let fleet = Fleet {
            switch,
            hosts: members,
            store_ns,
            nginx,
            store_url: format!("http://{store_ip}:8080"),
            _store_dir: store_dir,
            access_log,
        };
        // Reached from the first host's namespace, as the daemons will.
        let probe = format!("{store_ip}:8080");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let ok = std::process::Command::new("ip")
                .args(["netns", "exec", &fleet.hosts[0].0, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/{}/{}", store_ip, 8080))
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store at {probe} is unreachable from the hosts"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        fleet
    }

    /// Bytes of chunks the store has served.
    pub fn store_chunk_bytes(&self) -> u64 {
        chunk_bytes(&access_log(&self.access_log))
    }

    /// Requests of any kind the store has answered for `ip`.
    pub fn store_requests_from(&self, ip: &str) -> usize {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(ip))
            .count()
    }

    /// Chunk requests the store has answered.
    pub fn store_chunk_requests(&self) -> usize {
        access_log(&self.access_log)
            .iter()
            .filter(|r| r.0.starts_with("/chunks/"))
            .count()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
        for (ns, _) in &self.hosts {
            delete_netns(ns);
        }
        delete_netns(&self.store_ns);
        delete_netns(&self.switch);
    }
}

/// Flips a byte in every slot of every slab of the chunk store under
/// `cache` (a daemon that is not running): a liar serving them. Returns
/// the slots changed.
pub fn corrupt_chunk_store(cache: &Path) -> u64 {
    let mut flipped = 0;
    for e in std::fs::read_dir(cache.join("chunks")).unwrap() {
        let path = e.unwrap().path();
        let Some(size) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("slab.")?.parse::<u64>().ok())
        else {
            continue;
        };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        for slot in 0..len / size {
            let mut b = [0u8];
            file.read_exact_at(&mut b, slot * size + 1000).unwrap();
            file.write_all_at(&[b[0] ^ 0x5a], slot * size + 1000).unwrap();
            flipped += 1;
        }
    }
    flipped
}
