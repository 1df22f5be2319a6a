//! An ingest node whose broker is down still starts listening within a few seconds and
//! says so on `/readyz` (503), instead of waiting out librdkafka's 60 s request timeout
//! while it tries to create the topics. No stack needed: the broker address is a closed
//! port.

mod common;
use common::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ingest_listens_and_answers_503_while_no_broker_answers() {
    let names = Names::new("nobroker");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanfinity"));
    command.args(["ingest", "--shards", "2"]);
    let mut sets = names.settings("127.0.0.1:1");
    sets.push(format!("http.listen=\"{listen}\""));
    sets.push("kafka.admin_timeout_ms=1000".to_string());
    for set in &sets {
        command.args(["--set", set]);
    }
    let started = Instant::now();
    let _server = Running(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fanfinity"),
    );
    let ready = eventually(Duration::from_secs(15), "an answer on /readyz", || {
        try_request(&listen, "GET", "/readyz", &[], b"").ok()
    });
    assert_eq!(ready.status, 503, "{}", ready.text());
    // The admin timeout is 1 s; allow for a slow machine, not for librdkafka's 60 s.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "listening took {:?}",
        started.elapsed()
    );
}
