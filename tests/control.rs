//! The control API and the config file: disks added and removed while
//! others serve, refusals, bad requests, access by peer credentials,
//! `--config` with `[[disk]]` tables, SIGHUP, and config errors.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// Runs `streamblk ARGS` expecting failure; returns its stderr.
fn streamblk_fails(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "streamblk {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

fn ctl(d: &Daemon) -> String {
    d.control.display().to_string()
}

/// Waits until the daemon's status satisfies `pred`.
fn wait_status(d: &Daemon, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.status();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn disk_state(s: &serde_json::Value, name: &str) -> Option<String> {
    s["disks"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
        .map(|d| d["state"].as_str().unwrap_or("").to_string())
}

/// Sends one raw line to the control socket; returns the parsed answer.
fn raw_request(socket: &Path, line: &[u8]) -> serde_json::Value {
    let mut c = UnixStream::connect(socket).unwrap();
    // The daemon may answer and hang up before reading all of a long request.
    let _ = c.write_all(line);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut buf = String::new();
    if let Err(e) = c.read_to_string(&mut buf) {
        return serde_json::json!({ "ok": false, "error": e.to_string() });
    }
    serde_json::from_str(&buf).unwrap_or_else(|e| panic!("answer {buf:?}: {e}"))
}

#[test]
fn disks_are_added_and_removed_live_without_disturbing_the_others() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let data = random_file(&base, 8 * MIB, 7);
    let daemon = Daemon::start(&[]);
    let c = ctl(&daemon);
    assert_eq!(daemon.status()["disks"].as_array().unwrap().len(), 0);

    let a = disk_spec("a", dir.path(), &base, ",queues=2");
    let out = streamblk(&["disk", "add", &a, "--control-socket", &c]);
    assert!(out.contains("disk a ready"), "{out}");
    let mut client_a = Client::connect(&dir.path().join("a.sock"), 2, MIB);
    client_a.write(4096, &[0x5a; 4096]);
    wait_status(&daemon, "a attached", |s| {
        disk_state(s, "a").as_deref() == Some("attached")
    });

    // A second disk comes and goes while A keeps serving.
    let b = disk_spec("b", dir.path(), &base, "");
    streamblk(&["disk", "add", &b, "--control-socket", &c]);
    assert_eq!(client_a.read(0, 8192)[4096..], [0x5a; 4096]);
    let mut client_b = Client::connect(&dir.path().join("b.sock"), 1, MIB);
    assert_eq!(client_b.read(MIB as u64, 4096), data[MIB..MIB + 4096]);

    // The same name, socket or overlay again, and a bad spec, are refused.
    let e = streamblk_fails(&["disk", "add", &a, "--control-socket", &c]);
    assert!(e.contains("two disks are named a"), "{e}");
    let e = streamblk_fails(&["disk", "add", "name=x,socket=s", "--control-socket", &c]);
    assert!(e.contains("needs overlay="), "{e}");
    let missing = format!(
        "name=m,socket={},overlay={},base=/nonexistent",
        dir.path().join("m.sock").display(),
        dir.path().join("m.ov").display()
    );
    let e = streamblk_fails(&["disk", "add", &missing, "--control-socket", &c]);
    assert!(e.contains("disk m") && e.contains("/nonexistent"), "{e}");
    assert!(!dir.path().join("m.sock").exists());

    // Removing an attached disk needs --force.
    let e = streamblk_fails(&["disk", "remove", "b", "--control-socket", &c]);
    assert!(e.contains("attached") && e.contains("--force"), "{e}");
    let list = streamblk(&["disk", "list", "--control-socket", &c]);
    assert!(list.contains("disk a") && list.contains("disk b"), "{list}");
    drop(client_b);
    wait_status(&daemon, "b waiting", |s| {
        disk_state(s, "b").as_deref() == Some("waiting")
    });
    let out = streamblk(&["disk", "remove", "b", "--control-socket", &c]);
    assert!(out.contains("disk b removed"), "{out}");
    assert!(!dir.path().join("b.sock").exists());
    let e = streamblk_fails(&["disk", "remove", "b", "--control-socket", &c]);
    assert!(e.contains("no disk named b"), "{e}");
    // A's name is free for reuse only once A is gone; A still serves.
    assert_eq!(client_a.read(0, 8192)[4096..], [0x5a; 4096]);

    // --force removes an attached disk.
    let out = streamblk(&["disk", "remove", "a", "--force", "--control-socket", &c]);
    assert!(out.contains("removed"), "{out}");
    // The frontend was disconnected: its requests are no longer served.
    let r = client_a.run_timeout(
        &[Op::Read {
            offset: 0,
            len: 4096,
            buf: 0,
        }],
        Duration::from_secs(2),
    );
    assert_ne!(r[0], Some(0), "a removed disk served a read");
    let json: serde_json::Value =
        serde_json::from_str(&streamblk(&["disk", "list", "--json", "--control-socket", &c])).unwrap();
    assert_eq!(json, serde_json::json!([]));
    // Its overlay kept the write: a new disk on it sees it.
    streamblk(&["disk", "add", &a, "--control-socket", &c]);
    let mut again = Client::connect(&dir.path().join("a.sock"), 2, MIB);
    assert_eq!(again.read(4096, 4096), vec![0x5a; 4096]);
}

#[test]
fn bad_requests_get_clear_errors_and_the_daemon_lives_on() {
    let daemon = Daemon::start(&[]);
    let s = &daemon.control;
    daemon.status();
    for (line, why) in [
        (&b"garbage\n"[..], "not JSON"),
        (b"{\"op\":\"status\"}\n", "version"),
        (b"{\"version\":9,\"op\":\"status\"}\n", "version 9"),
        (b"{\"version\":1,\"op\":\"reboot\"}\n", "unknown variant"),
        (b"{\"version\":1,\"op\":\"disk-add\",\"spec\":42}\n", "SPEC"),
        (
            b"{\"version\":1,\"op\":\"disk-add\",\"spec\":{\"name\":\"x\"}}\n",
            "needs socket=",
        ),
        (
            b"{\"version\":1,\"op\":\"disk-remove\",\"name\":\"nope\"}\n",
            "no disk named nope",
        ),
        (b"\xff\xfe\n", "read the request"),
    ] {
        let r = raw_request(s, line);
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"].as_str().unwrap().contains(why),
            "{}: {r}",
            String::from_utf8_lossy(line)
        );
    }
    // A request that never ends, and one far too long.
    let r = raw_request(s, &vec![b'x'; 200 << 10]);
    assert_eq!(r["ok"], false, "{r}");
    let r = raw_request(s, b"{\"version\":1,\"op\":\"disk-list\"}\n");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"], serde_json::json!([]));
}

/// A system user (and group) made for the test, removed after it if the test made it.
struct TestUser {
    name: String,
    created: bool,
}

impl TestUser {
    fn new(name: &str, groups: &[&str]) -> TestUser {
        let exists = Command::new("id").arg(name).output().unwrap().status.success();
        if !exists {
            let mut c = Command::new("useradd");
            c.args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]);
            if !groups.is_empty() {
                c.args(["--groups", &groups.join(",")]);
            }
            assert!(c.arg(name).status().unwrap().success(), "useradd {name}");
        }
        TestUser {
            name: name.into(),
            created: !exists,
        }
    }

    /// Runs `bin` (a streamblk this user can execute) as this user.
    fn streamblk(&self, bin: &std::path::Path, args: &[&str]) -> std::process::Output {
        Command::new("runuser")
            .args(["-u", &self.name, "--"])
            .arg(bin)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        if self.created {
            let _ = Command::new("userdel").arg(&self.name).status();
        }
    }
}

struct TestGroup(String, bool);

impl Drop for TestGroup {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("groupdel").arg(&self.0).status();
        }
    }
}

#[test]
fn control_socket_admits_root_and_its_group_only() {
    if unsafe_geteuid() != 0 {
        eprintln!("skipped: needs root to create users");
        return;
    }
    let group = "sbtest-ctl";
    let exists = Command::new("getent")
        .args(["group", group])
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        assert!(Command::new("groupadd")
            .args(["--system", group])
            .status()
            .unwrap()
            .success());
    }
    let _group = TestGroup(group.into(), !exists);
    let member = TestUser::new("sbtest-member", &[group]);
    let other = TestUser::new("sbtest-other", &[]);

    let dir = tmpdir();
    // The build tree may sit in a directory only root can enter (a clone in
    // mktemp's 0700 directory): give the other users a copy they can run.
    let bins = tmpdir();
    std::fs::set_permissions(bins.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bins.path().join("streamblk");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(&["--control-group".into(), group.into()]);
    daemon.status();
    // The harness puts the control socket in /tmp, which every user may search.
    let sock = daemon.control.clone();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    let gid = String::from_utf8(Command::new("getent").args(["group", group]).output().unwrap().stdout).unwrap();
    let gid: u32 = gid.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(meta.gid(), gid, "socket group");

    let s = sock.display().to_string();
    let out = member.streamblk(&bin, &["disk", "list", "--control-socket", &s]);
    assert!(out.status.success(), "member: {}", String::from_utf8_lossy(&out.stderr));
    let out = other.streamblk(&bin, &["disk", "list", "--control-socket", &s]);
    assert!(!out.status.success());
    // With the socket opened up to everyone, the daemon's own check refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = other.streamblk(&bin, &["disk", "list", "--control-socket", &s]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");
    let spec = format!(
        "name=x,socket={},overlay={},base=/dev/null",
        dir.path().join("x.sock").display(),
        dir.path().join("x.ov").display()
    );
    let out = other.streamblk(&bin, &["disk", "add", &spec, "--control-socket", &s]);
    assert!(!out.status.success());
    assert!(!dir.path().join("x.sock").exists());
    drop(daemon);
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn config_file_disks_serve_and_sighup_applies_changes() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let data = random_file(&base, 4 * MIB, 9);
    let disk_table = |name: &str, extra: &str| {
        format!(
            "[[disk]]\nname = \"{name}\"\nsocket = \"{}\"\noverlay = \"{}\"\nbase = \"{}\"\n{extra}\n",
            dir.path().join(format!("{name}.sock")).display(),
            dir.path().join(format!("{name}.ov")).display(),
            base.display()
        )
    };
    let config = dir.path().join("streamblk.toml");
    std::fs::write(
        &config,
        format!(
            "# test config\nfill-rate = 0\ncache-dir = \"{}\"\n\n{}{}",
            dir.path().join("cache").display(),
            disk_table("one", "queues = 2\nserial = \"S1\""),
            disk_table("two", "")
        ),
    )
    .unwrap();
    let cli_disk = disk_spec("three", dir.path(), &base, "");
    let daemon = Daemon::start(&[
        "--config".into(),
        config.display().to_string(),
        "--disk".into(),
        cli_disk,
    ]);
    let mut one = Client::connect(&dir.path().join("one.sock"), 2, MIB);
    assert_eq!(one.read(0, 4096), data[..4096]);
    let s = daemon.status();
    let one_status = s["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "one")
        .unwrap();
    assert_eq!(one_status["queues"], 2, "{s}");
    assert_eq!(s["disks"].as_array().unwrap().len(), 3, "{s}");
    // An API disk is not the config's to remove.
    let api = disk_spec("api", dir.path(), &base, "");
    streamblk(&["disk", "add", &api, "--control-socket", &ctl(&daemon)]);

    // Drop "two", add "four", keep "one" (attached) as it is.
    std::fs::write(
        &config,
        format!(
            "fill-rate = 0\ncache-dir = \"{}\"\n{}{}",
            dir.path().join("cache").display(),
            disk_table("one", "queues = 2\nserial = \"S1\""),
            disk_table("four", "")
        ),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let s = wait_status(&daemon, "reloaded", |s| {
        disk_state(s, "four").is_some() && disk_state(s, "two").is_none()
    });
    for name in ["one", "three", "api"] {
        assert!(disk_state(&s, name).is_some(), "{name} kept: {s}");
    }
    assert!(!dir.path().join("two.sock").exists());
    assert_eq!(one.read(4096, 4096), data[4096..8192]);
    let mut four = Client::connect(&dir.path().join("four.sock"), 1, MIB);
    assert_eq!(four.read(0, 4096), data[..4096]);

    // A broken file on reload changes nothing and the daemon lives on.
    std::fs::write(&config, "colour = \"red\"\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let s = daemon.status();
    assert_eq!(s["disks"].as_array().unwrap().len(), 4, "{s}");
}

#[test]
fn config_errors_name_the_key_and_line() {
    let dir = tmpdir();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "fill-rate = 10\n\n[[disk]]\nname = \"a\"\nsokcet = \"/x\"\n").unwrap();
    let err = serve_fails(&["--config".into(), config.display().to_string()]);
    assert!(err.contains("line 5") && err.contains("sokcet"), "{err}");
    std::fs::write(&config, "fill-rate = 10\ncache-dri = \"/x\"\n").unwrap();
    let err = serve_fails(&["--config".into(), config.display().to_string()]);
    assert!(err.contains("line 2") && err.contains("cache-dri"), "{err}");
    let err = serve_fails(&["--config".into(), "/nonexistent.toml".into()]);
    assert!(err.contains("/nonexistent.toml"), "{err}");
}

#[test]
fn sighup_changes_fill_and_profile_rates_live() {
    let dir = tmpdir();
    let raw = dir.path().join("image.raw");
    random_file(&raw, 2 * MIB, 5);
    let store = dir.path().join("store");
    import(&raw, &store, "img", 64 << 10);
    let config = dir.path().join("c.toml");
    let write = |fill: u32, profile: u32| {
        let text = format!(
            "store = \"{}\"\ncache-dir = \"{}\"\nfill-rate = {fill}\nprofile-rate = {profile}\n\n[[disk]]\nname = \"img\"\nsocket = \"{}\"\noverlay = \"{}\"\nimage = \"img\"\n",
            store.display(),
            dir.path().join("cache").display(),
            dir.path().join("img.sock").display(),
            dir.path().join("img.ov").display()
        );
        std::fs::write(&config, text).unwrap();
    };
    write(1, 2);
    let daemon = Daemon::start(&["--config".into(), config.display().to_string()]);
    let s = daemon.status();
    assert_eq!(s["fetch"]["fill_rate_cap"], 1_000_000, "{s}");
    assert_eq!(s["fetch"]["profile_rate_cap"], 2_000_000, "{s}");
    write(3, 0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let s = wait_status(&daemon, "new rates", |s| s["fetch"]["fill_rate_cap"] == 3_000_000);
    assert!(
        s["fetch"]["profile_rate_cap"].is_null(),
        "profile-rate 0 is no cap: {s}"
    );
    assert!(disk_state(&s, "img").is_some(), "{s}");
}
