//! A `katz worker` process for the service tests.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{katz_bin, root};

/// A `katz worker` process, killed when dropped.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(queue: &str, name: &str, extra: &[&str]) -> Worker {
        let args = ["worker", "--queue", queue, "--name", name, "--threads", "1"];
        Worker::spawn(&args, name, extra)
    }

    /// `katz ARGS EXTRA` from the repository root, its output in a log named after `name`.
    pub fn spawn(args: &[&str], name: &str, extra: &[&str]) -> Worker {
        let log = std::env::temp_dir().join(format!("katz-test-{}-{name}.log", std::process::id()));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(katz_bin())
            .args(args)
            .args(extra)
            .env("KATZ_LOG", "info,ort=warn")
            .current_dir(root())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("katz {} starts: {e}", args[0]));
        Worker { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
