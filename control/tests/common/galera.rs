//! A 3-node MariaDB Galera cluster started by a test, on 127.0.0.1, stopped on drop.
//!
//! Three `mariadbd` processes with their own data directories under one temp dir and
//! their own ports (client, Galera group communication, IST, SST; all picked free),
//! `wsrep_on=ON` with Debian's galera-4 provider, `binlog_format=ROW`,
//! `innodb_autoinc_lock_mode=2`, `wsrep_sst_method=rsync`, and causal reads
//! (`wsrep_sync_wait=1`: a read waits until its member has applied what the cluster
//! committed before it, so a client sees its own writes whichever member it reads).
//! Only the first member gets a fresh system database (`mariadb-install-db`); it starts
//! with `--wsrep-new-cluster` (what `galera_new_cluster` does), and the other two join
//! with empty data directories and receive a full state transfer from it by rsync.
//! [`Galera::start`] waits, with deadlines, until every member reports
//! `wsrep_cluster_size=3` and `wsrep_ready=ON`, then creates the `ember` user (password
//! `ember`, every right on databases named `ember_*`) through the first member.
//!
//! Users: as root (the test command) the servers run as the `mysql` system user
//! (`--user=mysql`, their directories chowned to it). Running them as root with
//! `--user=root` works for the first member but not for the state transfer: the
//! joiner's rsync daemon, started by root, drops to `nobody` and cannot enter the data
//! directory. As another user, they run as that user.
//!
//! Nothing listens on 3306 and no socket outside the temp dir is used, so the session's
//! MariaDB is untouched. Start-up takes about 25–40 s on a loaded 2-core machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MARIADBD: &str = "/usr/sbin/mariadbd";
const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";
/// How long one member may take to become ready (a state transfer included).
const READY: Duration = Duration::from_secs(240);
/// How long a member may take to stop on SIGTERM before it is killed.
const STOP: Duration = Duration::from_secs(30);

/// One member.
pub struct Member {
    child: Child,
    dir: PathBuf,
    /// Client port on 127.0.0.1.
    pub port: u16,
    gcomm: u16,
}

/// A running 3-node Galera cluster.
pub struct Galera {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn require(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run scripts/install-test-deps.sh (mariadb-server, galera-4, rsync)"
    );
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Member {
    fn sock(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("err.log")
    }

    /// Run SQL as root over the member's socket; stdout, or the error text.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg(format!("--socket={}", self.sock().display()))
            .args(["-uroot", "-N", "-B", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn mariadb: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A `SHOW STATUS` value, if the member answers.
    pub fn status(&self, name: &str) -> Option<String> {
        let out = self
            .sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
            .ok()?;
        out.split_whitespace().nth(1).map(str::to_string)
    }

    fn check_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "mariadbd in {} exited with {st}; its log ends:\n{}",
                self.dir.display(),
                tail(&self.log())
            );
        }
    }

    /// `mysql://ember:ember@127.0.0.1:PORT/DB`
    pub fn url(&self, db: &str) -> String {
        format!("mysql://ember:ember@127.0.0.1:{}/{db}", self.port)
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < STOP {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Galera {
    /// Start three members and wait until they form one ready cluster (blocking; call
    /// it from `spawn_blocking` in an async test).
    pub fn start() -> Galera {
        require(MARIADBD);
        require(PROVIDER);
        require("/usr/bin/rsync");
        require("/usr/bin/mariadb-install-db");
        let dir = tempfile::Builder::new()
            .prefix("ember-galera-")
            .tempdir()
            .expect("temp dir");
        let root = is_root();
        // The servers run as `mysql`: they must be able to enter the temp dir.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        let ports: Vec<[u16; 4]> = (0..3)
            .map(|_| [free_port(), free_port(), free_port(), free_port()])
            .collect();
        let cluster = ports
            .iter()
            .map(|p| format!("127.0.0.1:{}", p[1]))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..3 {
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(d.join("data")).expect("member dir");
            if root {
                let st = Command::new("chown")
                    .args(["-R", "mysql:mysql"])
                    .arg(&d)
                    .status()
                    .expect("chown");
                assert!(st.success(), "chown mysql {}", d.display());
            }
        }
        // Only the first member needs a system database; joiners get it by SST.
        let d0 = dir.path().join("n0");
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d0.join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db");
        if root {
            install.arg("--user=mysql");
        }
        let out = install.output().expect("spawn mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let base = dir.path().to_path_buf();
        let spawn = |i: usize, first: bool| -> Member {
            let d = base.join(format!("n{i}"));
            let [port, gcomm, ist, sst] = ports[i];
            let mut c = Command::new(MARIADBD);
            c.arg("--no-defaults");
            if root {
                c.arg("--user=mysql");
            }
            c.arg(format!("--datadir={}", d.join("data").display()))
                .arg(format!("--socket={}", d.join("sock").display()))
                .arg(format!("--pid-file={}", d.join("pid").display()))
                .arg(format!("--log-error={}", d.join("err.log").display()))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg("--skip-name-resolve")
                .arg("--max-connections=300")
                .arg("--innodb-buffer-pool-size=32M")
                .arg("--innodb-log-file-size=16M")
                .arg("--innodb-flush-log-at-trx-commit=2")
                .arg("--binlog-format=ROW")
                .arg("--innodb-autoinc-lock-mode=2")
                .arg("--wsrep-on=ON")
                .arg(format!("--wsrep-provider={PROVIDER}"))
                .arg("--wsrep-cluster-name=ember-test")
                .arg(format!("--wsrep-cluster-address=gcomm://{cluster}"))
                .arg(format!("--wsrep-node-name=n{i}"))
                .arg(format!("--wsrep-node-address=127.0.0.1:{gcomm}"))
                .arg(format!("--wsrep-node-incoming-address=127.0.0.1:{port}"))
                .arg(format!(
                    "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{gcomm};\
                     ist.recv_addr=127.0.0.1:{ist};gcache.size=64M"
                ))
                .arg(format!("--wsrep-sst-receive-address=127.0.0.1:{sst}"))
                .arg("--wsrep-sst-method=rsync")
                .arg("--wsrep-sync-wait=1");
            if first {
                c.arg("--wsrep-new-cluster");
            }
            let child = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn mariadbd");
            Member {
                child,
                dir: d,
                port,
                gcomm,
            }
        };
        let mut g = Galera {
            members: vec![spawn(0, true)],
            dir,
        };
        g.wait(
            |m| m.status("wsrep_ready").as_deref() == Some("ON"),
            "first member ready",
        );
        g.members.push(spawn(1, false));
        g.members.push(spawn(2, false));
        g.wait(
            |m| {
                m.status("wsrep_cluster_size").as_deref() == Some("3")
                    && m.status("wsrep_ready").as_deref() == Some("ON")
                    && m.status("wsrep_local_state_comment").as_deref() == Some("Synced")
            },
            "three members synced",
        );
        let users = "CREATE USER IF NOT EXISTS 'ember'@'127.0.0.1' IDENTIFIED BY 'ember'; \
             CREATE USER IF NOT EXISTS 'ember'@'localhost' IDENTIFIED BY 'ember'; \
             GRANT ALL PRIVILEGES ON `ember\\_%`.* TO 'ember'@'127.0.0.1'; \
             GRANT ALL PRIVILEGES ON `ember\\_%`.* TO 'ember'@'localhost'; \
             CREATE DATABASE IF NOT EXISTS ember_test;";
        if let Err(e) = g.members[0].sql(users) {
            panic!("create the ember user on Galera: {e}");
        }
        g
    }

    /// Poll every member until `ready` holds for all, or panic with their logs.
    fn wait(&mut self, ready: impl Fn(&Member) -> bool, what: &str) {
        let t = Instant::now();
        loop {
            for m in &mut self.members {
                m.check_alive();
            }
            if self.members.iter().all(&ready) {
                return;
            }
            if t.elapsed() > READY {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("== {} ==\n{}", m.dir.display(), tail(&m.log())))
                    .collect();
                panic!(
                    "Galera: {what} not reached within {READY:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A fresh database (`ember_g_…`) and its URL on each member.
    pub fn fresh_db(&self) -> Vec<String> {
        let name = format!("ember_g_{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = self.members[0].sql(&format!("CREATE DATABASE `{name}`")) {
            panic!("create database {name}: {e}");
        }
        // DDL replicates in total order, but a loaded member may apply it a moment later.
        let t = Instant::now();
        for m in &self.members {
            while !m
                .sql(&format!("SHOW DATABASES LIKE '{name}'"))
                .is_ok_and(|o| o.contains(&name))
            {
                assert!(
                    t.elapsed() < READY,
                    "database {name} never reached every member"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.members.iter().map(|m| m.url(&name)).collect()
    }

    /// The group communication ports (`gcomm://` addresses), for logs.
    pub fn gcomm(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.gcomm).collect()
    }

    /// The temp dir holding every member's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Galera {
    fn drop(&mut self) {
        // Joiners first, the first member last (it is the donor of any transfer).
        for m in self.members.iter_mut().rev() {
            m.stop();
        }
    }
}
