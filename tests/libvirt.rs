//! libvirt for real: the example domain in `qemu-configs/` is valid libvirt
//! XML, and libvirt (Debian's libvirtd, TCG) boots a guest whose disk is a
//! streamblk vhostuser socket added with `streamblk disk add`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::guest::build_guest;
use common::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/qemu-configs/libvirt-domain.xml");
const BOOT: Duration = Duration::from_secs(300);

fn validate(path: &Path) {
    let out = Command::new("virt-xml-validate")
        .arg(path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate (Debian packages libvirt-clients, libxml2-utils)");
    assert!(
        out.status.success(),
        "{} is not a valid domain: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_domain_is_valid_libvirt_xml() {
    validate(Path::new(EXAMPLE));
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// libvirtd and virtlogd started by the test: stopped after it.
struct Started(Vec<&'static str>);

impl Drop for Started {
    fn drop(&mut self) {
        for pidfile in &self.0 {
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) of the daemon this test started, by its pid file.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// What Debian's libvirt-daemon-system would set up, and libvirtd and
/// virtlogd running (started here if they are not).
fn ensure_libvirtd() -> Started {
    let mut started = Started(Vec::new());
    if !run("getent", &["group", "libvirt-qemu"]).status.success() {
        ok("groupadd", &["--system", "libvirt-qemu"]);
    }
    if !run("id", &["libvirt-qemu"]).status.success() {
        ok(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "libvirt-qemu",
                "libvirt-qemu",
            ],
        );
    }
    for d in ["/var/log/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt"] {
        std::fs::create_dir_all(d).unwrap();
    }
    if run("virsh", &["-c", "qemu:///system", "version"]).status.success() {
        return started;
    }
    if !run("pgrep", &["-x", "virtlogd"]).status.success() {
        ok("virtlogd", &["-d"]);
        started.0.push("/run/virtlogd.pid");
    }
    ok("libvirtd", &["-d"]);
    started.0.insert(0, "/run/libvirtd.pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run("virsh", &["-c", "qemu:///system", "version"]).status.success() {
        assert!(Instant::now() < deadline, "libvirtd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    started
}

/// Destroys and undefines the test domain, whatever happened.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = run("virsh", &["-c", "qemu:///system", "destroy", &self.0]);
        let _ = run("virsh", &["-c", "qemu:///system", "undefine", &self.0]);
    }
}

/// `s` with `from` replaced by `to`, which must occur.
fn subst(s: String, from: &str, to: &str) -> String {
    assert!(s.contains(from), "the example no longer has {from:?}");
    s.replace(from, to)
}

fn disk_state(d: &Daemon, name: &str) -> Option<String> {
    d.status()["disks"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .map(|x| x["state"].as_str().unwrap_or("").to_string())
}

#[test]
fn libvirt_boots_a_guest_on_a_disk_added_with_disk_add() {
    let guest = build_guest();
    let _libvirtd = ensure_libvirtd();
    let dir = tmpdir();
    // libvirt's QEMU runs as libvirt-qemu: it must reach the socket and
    // read the kernel and initrd.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(guest.join(f), dir.path().join(f)).unwrap();
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let base = dir.path().join("base.raw");
    std::fs::copy(guest.join("rootfs.img"), &base).unwrap();

    let daemon = Daemon::start(&["--socket-group".into(), "libvirt-qemu".into()]);
    let c = daemon.control.display().to_string();
    daemon.status();
    let spec = disk_spec("lv", dir.path(), &base, ",queues=2");
    streamblk(&["disk", "add", &spec, "--control-socket", &c]);
    let socket = dir.path().join("lv.sock");

    let name = format!("streamblk-test-{}", std::process::id());
    let console = dir.path().join("console.log");
    let xml = std::fs::read_to_string(EXAMPLE).unwrap();
    let xml = subst(xml, "<domain type='kvm'>", "<domain type='qemu'>");
    let xml = subst(xml, "<name>vm1</name>", &format!("<name>{name}</name>"));
    let xml = subst(xml, "<memory unit='GiB'>2</memory>", "<memory unit='MiB'>512</memory>");
    let xml = subst(xml, "<vcpu>2</vcpu>", "<vcpu>1</vcpu>");
    let xml = subst(xml, "/run/streamblk/vm1.sock", &socket.display().to_string());
    let xml = subst(
        xml,
        "hvm</type>\n",
        &format!(
            "hvm</type>\n    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>console=ttyS0 quiet panic=-1 sbk.pause</cmdline>\n",
            dir.path().join("vmlinuz").display(),
            dir.path().join("initrd.img").display()
        ),
    );
    let xml = subst(xml, "      <boot order='1'/>\n", "");
    let xml = subst(
        xml,
        "<serial type='pty'/>\n    <console type='pty'/>",
        &format!(
            "<serial type='file'>\n      <source path='{}'/>\n    </serial>",
            console.display()
        ),
    );
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    validate(&xml_path);

    ok(
        "virsh",
        &["-c", "qemu:///system", "define", &xml_path.display().to_string()],
    );
    let domain = Domain(name.clone());
    ok("virsh", &["-c", "qemu:///system", "start", &name]);

    // The guest checks its files, writes, and waits (sbk.pause).
    let deadline = Instant::now() + BOOT;
    loop {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!log.contains("GUEST-FAIL") && !log.contains("CHECK-FAIL"), "{log}");
        if log.contains("GUEST-PAUSE") {
            assert!(
                log.contains("GUEST-CHECK-OK") && log.contains("GUEST-WRITE-OK"),
                "{log}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not boot through libvirt:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(disk_state(&daemon, "lv").as_deref(), Some("attached"));
    let out = run(BIN, &["disk", "remove", "lv", "--control-socket", &c]);
    assert!(!out.status.success(), "removed an attached disk");

    ok("virsh", &["-c", "qemu:///system", "destroy", &name]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while disk_state(&daemon, "lv").as_deref() != Some("waiting") {
        assert!(Instant::now() < deadline, "the disk stayed attached after destroy");
        std::thread::sleep(Duration::from_millis(100));
    }
    streamblk(&["disk", "remove", "lv", "--control-socket", &c]);
    assert!(!socket.exists());
    drop(domain);
}
