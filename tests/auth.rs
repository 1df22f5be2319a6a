//! API keys against the real server: who may post, who may read, what everyone else
//! gets, and keys replaced without a restart. Real services only (`make stack-up`).

#![cfg(feature = "stack-tests")]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use fanfinity::auth::dev;
use fanfinity::auth::keys::{new_key, NewKey};
use fanfinity::auth::Role;
use serde_json::json;

fn start_with_dev_keys(names: &Names) -> Server {
    let keys = keys_setting(&[dev::ingest_key().entry, dev::read_key().entry]);
    Server::start("serve", names, &brokers(), &["auth.enabled=true", &keys])
}

fn post_with(server: &Server, headers: &[(&str, &str)], match_id: &str) -> Response {
    let body = json!([event(&new_id(), match_id, "fan", "cheer")]).to_string();
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(&server.addr(), "POST", "/v1/events", &all, body.as_bytes())
}

/// SIGHUP to the server: re-read its configuration.
fn send_hup(pid: &str) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", pid])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
}

/// SIGHUP, then time for a reload that must be refused (nothing observable changes).
fn hup_and_settle(pid: &str) {
    send_hup(pid);
    std::thread::sleep(Duration::from_millis(500));
}

fn bearer(key: &NewKey) -> String {
    format!("Bearer {}", key.key)
}

#[test]
fn ingest_needs_an_ingest_key_and_queries_a_read_key() {
    let names = Names::new("authroles");
    let server = start_with_dev_keys(&names);
    let (ingest, read) = (dev::ingest_key(), dev::read_key());
    let m = "auth-m1";

    let none = post_with(&server, &[], m);
    assert_eq!(none.status, 401, "{}", none.text());
    assert_eq!(none.json()["error"], "unauthorized");
    assert_eq!(
        none.header("connection"),
        Some("close"),
        "the body was not read"
    );
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"fanfinity\"")
    );

    let wrong_role = post_with(&server, &[("Authorization", &bearer(&read))], m);
    assert_eq!(wrong_role.status, 403, "{}", wrong_role.text());
    assert_eq!(wrong_role.json()["error"], "forbidden");

    let mut forged = ingest.key.clone();
    forged.replace_range(forged.len() - 4.., "abcd");
    let bad = post_with(&server, &[("X-Fanfinity-Key", &forged)], m);
    assert_eq!(bad.status, 401, "{}", bad.text());
    assert!(!bad.text().contains(&forged), "the key is never echoed");

    let by_bearer = post_with(&server, &[("Authorization", &bearer(&ingest))], m);
    assert_eq!(by_bearer.status, 202, "{}", by_bearer.text());
    let by_header = post_with(&server, &[("X-Fanfinity-Key", &ingest.key)], m);
    assert_eq!(by_header.status, 202, "{}", by_header.text());

    let path = format!("/v1/matches/{m}/metrics");
    let query = |headers: &[(&str, &str)]| request(&server.addr(), "GET", &path, headers, b"");
    assert_eq!(query(&[]).status, 401);
    assert_eq!(query(&[("Authorization", &bearer(&ingest))]).status, 403);
    // Authorized: 200, or 404 `unknown_match` while the sink has not stored it yet.
    let read_ok = query(&[("Authorization", &bearer(&read))]);
    assert!(
        read_ok.status == 200 || read_ok.json()["error"] == "unknown_match",
        "{}",
        read_ok.text()
    );

    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(server.get(open).status, 200, "{open} needs no key");
    }
    // The public development keys are printed at start-up on purpose; a key a client
    // presented is never logged.
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(!log.contains(&forged), "a presented key is never logged");
    drop(server);
    drop_database(&names);
}

#[test]
fn a_request_without_a_key_is_refused_before_its_body_is_asked_for() {
    let names = Names::new("authexpect");
    let server = start_with_dev_keys(&names);
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        )
        .expect("send head");
    let mut first = [0u8; 12];
    stream
        .read_exact(&mut first)
        .expect("an answer without the body");
    assert_eq!(&first, b"HTTP/1.1 401", "no 100 Continue first");
    drop(server);
    drop_database(&names);
}

#[test]
fn keys_are_replaced_on_sighup_without_a_restart() {
    let names = Names::new("authreload");
    let old = new_key("old app", vec![Role::Ingest]).expect("key");
    let new = new_key("new app", vec![Role::Ingest]).expect("key");
    let dir = std::env::temp_dir().join(format!("fanfinity-{}", names.database));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("keys.toml");
    let write_keys = |key: &NewKey| {
        let text = format!(
            "[auth]\nenabled = true\n\n[[auth.keys]]\nid = \"{}\"\nroles = [\"ingest\"]\nhash = \"{}\"\n",
            key.entry.id, key.entry.hash
        );
        std::fs::write(&file, text).expect("write keys");
    };
    write_keys(&old);
    // The file's auth section wins over the test default (auth off) only if no --set
    // turns it off again; so turn it on explicitly too.
    let server = Server::start_with_config(
        "serve",
        &names,
        &brokers(),
        Some(&file),
        &["auth.enabled=true"],
    );
    let m = "reload-m1";
    assert_eq!(
        post_with(&server, &[("Authorization", &bearer(&old))], m).status,
        202
    );
    assert_eq!(
        post_with(&server, &[("Authorization", &bearer(&new))], m).status,
        401
    );

    write_keys(&new);
    let pid = server.child.as_ref().expect("running").id().to_string();
    send_hup(&pid);
    eventually(
        Duration::from_secs(10),
        "the new key to be accepted",
        || (post_with(&server, &[("Authorization", &bearer(&new))], m).status == 202).then_some(()),
    );
    assert_eq!(
        post_with(&server, &[("Authorization", &bearer(&old))], m).status,
        401
    );

    // A set with no ingest key would lock every client out: refused, the keys stay.
    std::fs::write(
        &file,
        format!(
            "[auth]\nenabled = true\n\n[[auth.keys]]\nid = \"{}\"\nroles = [\"read\"]\nhash = \"{}\"\n",
            new.entry.id, new.entry.hash
        ),
    )
    .expect("write");
    hup_and_settle(&pid);
    assert_eq!(
        post_with(&server, &[("Authorization", &bearer(&new))], m).status,
        202
    );

    // A broken file is refused and the keys in force stay.
    std::fs::write(&file, "[auth]\nkeys = \"not a list\"\n").expect("write");
    hup_and_settle(&pid);
    assert_eq!(
        post_with(&server, &[("Authorization", &bearer(&new))], m).status,
        202
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("keys reloaded"), "reload logged");
    assert!(log.contains("reload refused"), "bad reload logged");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    drop_database(&names);
}

#[test]
fn serve_refuses_to_start_with_auth_on_and_no_keys() {
    let names = Names::new("authnokeys");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fanfinity"));
    command.arg("serve");
    for set in names.settings(&brokers()) {
        command.arg("--set").arg(set);
    }
    command.args([
        "--set",
        "auth.enabled=true",
        "--set",
        "http.listen=\"127.0.0.1:0\"",
    ]);
    let out = command.output().expect("run fanfinity");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no key has the ingest role"), "{stderr}");
}
