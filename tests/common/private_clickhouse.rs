//! A ClickHouse server private to one test, which the test may stop and start again.
//!
//! Fault tests that take ClickHouse away cannot touch the shared dev stack's server: other
//! tests (and other people) use it at the same time. This one runs Debian's
//! `clickhouse-server` (18.16, as `make stack-up` installs it) with a config like
//! `scripts/stack.sh`'s: loopback only, free ports, no interserver port, the default user
//! without a password, and every path (data, tmp, logs) in a fresh directory that is
//! removed on drop. Stopping and starting again keeps the ports and the data directory,
//! so a restart looks to fanfinity like the same server coming back.
//!
//! The process is only ever signalled by its own child PID.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{eventually, free_port, try_request, Response};

/// How long a start may take before the test gives up. 18.16 answers within a second on
/// an empty data directory; the margin is for a loaded 2-core machine.
const START_LIMIT: Duration = Duration::from_secs(30);

/// How long a SIGTERM may take before SIGKILL. An idle 18.16 stops within 2 s; with a
/// client on a keep-alive connection (the sink's) it closes its listeners at once but keeps
/// serving that connection for another 10-15 s before it exits.
const STOP_LIMIT: Duration = Duration::from_secs(25);

/// A running (or stopped) private `clickhouse-server`.
pub struct PrivateClickHouse {
    child: Option<Child>,
    pub http_port: u16,
    pub tcp_port: u16,
    /// Config, data, tmp and logs; removed on drop.
    dir: PathBuf,
}

impl PrivateClickHouse {
    /// Writes the config into a fresh directory named after `tag` (use the test's
    /// [`super::Names::database`], which is unique per run), starts the server and waits
    /// until it answers `SELECT 1`.
    ///
    /// # Panics
    /// If `clickhouse-server` is missing or does not answer within 30 s; the message
    /// carries its error log.
    pub fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fanfinity-clickhouse-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("create the clickhouse directory");
        let mut server = Self {
            child: None,
            http_port: free_port(),
            tcp_port: free_port(),
            dir,
        };
        server.write_config();
        server.restart();
        server
    }

    /// The HTTP interface, for `clickhouse.url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// Whether the server process is running (it may still be starting).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same ports and data directory (after
    /// [`PrivateClickHouse::stop`]) and waits until it answers `SELECT 1`.
    ///
    /// # Panics
    /// As [`PrivateClickHouse::start`]; also if it is already running.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "private clickhouse is already running"
        );
        let stdout = self.open_append("stdout.log");
        let stderr = self.open_append("stdout.log");
        let mut command = Command::new("clickhouse-server");
        command
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            // ClickHouse resolves some relative paths against its working directory.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // If the test process dies without unwinding (Ctrl-C, abort), the kernel kills the
        // server too, so no orphan keeps its ports and directory on a shared machine. The
        // signal follows the spawning *thread*, so a test keeps its server on one thread.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .spawn()
            .expect("spawn clickhouse-server (Debian's package; `make stack-up` installs it)");
        self.child = Some(child);
        self.wait_answering(START_LIMIT);
    }

    /// Stops the server with SIGTERM (SIGKILL after 25 s) and waits for it to exit, so
    /// its ports refuse every connection when this returns. Returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        let Some(mut child) = self.child.take() else {
            return started.elapsed();
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on the PID of our own child, which we have not reaped yet
            // (so the PID cannot have been reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        while started.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = child.try_wait() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        started.elapsed()
    }

    /// Runs `sql` over HTTP; `Err` when the server does not answer at all.
    pub fn try_query(&self, sql: &str) -> std::io::Result<Response> {
        try_request(&self.addr(), "POST", "/", &[], sql.as_bytes())
    }

    /// Runs `sql` and returns the text answer.
    ///
    /// # Panics
    /// If the server does not answer or answers anything but 200.
    pub fn query(&self, sql: &str) -> String {
        let resp = self
            .try_query(sql)
            .unwrap_or_else(|err| panic!("private clickhouse did not answer {sql}: {err}"));
        assert_eq!(
            resp.status,
            200,
            "private clickhouse refused {sql}: {}",
            resp.text()
        );
        resp.text()
    }

    /// Distinct event ids stored for a match, sorted (none while the table does not exist
    /// yet). The private-server counterpart of [`super::stored_ids`].
    pub fn stored_ids(&self, database: &str, match_id: &str) -> Vec<String> {
        let sql = format!(
            "SELECT DISTINCT toString(event_id) FROM {database}.events \
             WHERE match_id = '{match_id}' FORMAT TabSeparated"
        );
        match self.rows_or_missing(&sql) {
            Some(text) => {
                let mut ids: Vec<String> = text.lines().map(str::to_string).collect();
                ids.sort();
                ids
            }
            None => Vec::new(),
        }
    }

    /// `(count(), uniqExact(event_id))` for a match; `(0, 0)` while the table does not
    /// exist yet.
    pub fn count_and_unique(&self, database: &str, match_id: &str) -> (u64, u64) {
        let sql = format!(
            "SELECT count(), uniqExact(event_id) FROM {database}.events \
             WHERE match_id = '{match_id}' FORMAT TabSeparated"
        );
        let Some(text) = self.rows_or_missing(&sql) else {
            return (0, 0);
        };
        let mut parts = text.split_whitespace().map(|p| {
            p.parse::<u64>()
                .unwrap_or_else(|_| panic!("not a count: {text}"))
        });
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    /// Waits up to `limit` until the server holds at least `expected` distinct ids of the
    /// match, and returns them sorted. The private-server counterpart of
    /// [`super::wait_for_ids`]; it polls the cheap count and reads the ids once.
    pub fn wait_for_ids(
        &self,
        database: &str,
        match_id: &str,
        expected: usize,
        limit: Duration,
    ) -> Vec<String> {
        eventually(
            limit,
            &format!("{expected} events of {match_id} in the private ClickHouse"),
            || {
                let (_, unique) = self.count_and_unique(database, match_id);
                (unique as usize >= expected).then_some(())
            },
        );
        self.stored_ids(database, match_id)
    }

    /// The last lines of the server's error log, for failure messages.
    pub fn error_log_tail(&self) -> String {
        tail(&self.dir.join("error.log"), 20)
    }

    /// Answer text, or `None` if the database or table does not exist yet.
    fn rows_or_missing(&self, sql: &str) -> Option<String> {
        let resp = self
            .try_query(sql)
            .unwrap_or_else(|err| panic!("private clickhouse did not answer {sql}: {err}"));
        if resp.status == 200 {
            return Some(resp.text());
        }
        assert!(
            resp.text().contains("doesn't exist"),
            "private clickhouse refused {sql}: {}",
            resp.text()
        );
        None
    }

    /// Polls `SELECT 1` until it answers, failing fast if the process exits.
    fn wait_answering(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(resp) = self.try_query("SELECT 1") {
                if resp.status == 200 && resp.text().trim() == "1" {
                    return;
                }
            }
            let exited = self
                .child
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited || started.elapsed() > limit {
                panic!(
                    "private clickhouse on {} {} ({:?}); stdout:\n{}\nerror log:\n{}",
                    self.addr(),
                    if exited {
                        "exited while starting"
                    } else {
                        "did not answer SELECT 1"
                    },
                    started.elapsed(),
                    tail(&self.dir.join("stdout.log"), 20),
                    self.error_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn open_append(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .expect("open the private clickhouse's stdout log")
    }

    /// The same shape as `scripts/stack.sh`'s `write_clickhouse_config`: our own paths
    /// instead of /var/lib/clickhouse, no interserver port, loopback only.
    fn write_config(&self) {
        let dir = self.dir.display();
        let config = format!(
            r#"<?xml version="1.0"?>
<!-- Written by tests/common/private_clickhouse.rs for one test. -->
<yandex>
    <logger>
        <level>information</level>
        <log>{dir}/server.log</log>
        <errorlog>{dir}/error.log</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/data/tmp/</tmp_path>
    <user_files_path>{dir}/data/user_files/</user_files_path>
    <format_schema_path>{dir}/data/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
"#,
            http = self.http_port,
            tcp = self.tcp_port,
        );
        let users = r#"<?xml version="1.0"?>
<!-- Written by tests/common/private_clickhouse.rs for one test. -->
<yandex>
    <profiles>
        <default></default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default></default>
    </quotas>
</yandex>
"#;
        std::fs::write(self.dir.join("config.xml"), config).expect("write config.xml");
        std::fs::write(self.dir.join("users.xml"), users).expect("write users.xml");
    }
}

impl Drop for PrivateClickHouse {
    /// SIGKILL (the data is thrown away anyway), then removes the directory.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last `lines` lines of a text file, or a note that it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    match std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        Ok(_) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("({} unreadable: {err})", path.display()),
    }
}
