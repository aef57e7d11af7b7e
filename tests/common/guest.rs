//! A test guest under QEMU (TCG) whose root disk is a streamblk socket.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Builds (or finds cached) the test guest: kernel, initrd, rootfs image.
pub fn build_guest() -> PathBuf {
    build_guest_with("guest", 64, 0)
}

/// A guest with a `disk_mb` root disk holding `bulk_mb` of random data it
/// never reads, cached under `target/tmp/NAME`.
pub fn build_guest_with(name: &str, disk_mb: u64, bulk_mb: u64) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/mkguest.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .env("GUEST_DISK_MB", disk_mb.to_string())
        .env("GUEST_BULK_MB", bulk_mb.to_string())
        .status()
        .expect("run mkguest.sh");
    assert!(status.success(), "mkguest.sh failed");
    out
}

pub struct Qemu {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub console: Vec<String>,
}

impl Qemu {
    /// Boots the guest with its root disk on `socket`.
    pub fn boot(guest: &Path, socket: &Path, queues: usize, extra_cmdline: &str) -> Qemu {
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-smp", "1", "-no-reboot", "-nic", "none"])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-machine", "memory-backend=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={},reconnect-ms=1000", socket.display()))
            .args(["-device", &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}")])
            .arg("-kernel")
            .arg(guest.join("vmlinuz"))
            .arg("-initrd")
            .arg(guest.join("initrd.img"))
            .args(["-append", &format!("console=ttyS0 quiet panic=-1 {extra_cmdline}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64 (is qemu-system-x86 installed?)");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Qemu {
            child,
            stdin,
            lines,
            console: Vec::new(),
        }
    }

    /// Waits for a console line containing `marker`; panics on GUEST-FAIL,
    /// on QEMU exiting, or after `timeout`.
    pub fn expect(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("guest| {line}");
                    self.console.push(line.clone());
                    assert!(!line.contains("GUEST-FAIL"), "guest failed: {line}");
                    assert!(!line.contains("CHECK-FAIL"), "guest check failed: {line}");
                    if line.contains(marker) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {marker} from the guest within {timeout:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("QEMU exited before the guest printed {marker}"),
            }
        }
    }

    pub fn saw(&self, marker: &str) -> bool {
        self.console.iter().any(|l| l.contains(marker))
    }

    pub fn send_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for QEMU to exit (the guest powers off).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                eprintln!("guest| {line}");
                self.console.push(line);
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
