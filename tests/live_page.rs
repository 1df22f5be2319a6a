//! The live match page (`assets/match.html`, served at `/` and `/matches/{id}`) in a real
//! headless browser against a real `fanfinity serve` on the local stack: a few thousand
//! events of one match (20 minutes of history with a goal spike, then live traffic at the
//! current second) are posted, Debian's chromium loads the page, and the test checks that
//! the page's script drew the timeline and the live strip from the API.
//!
//! Writes `target/test-output/live_page.png` (screenshot) and `live_page.html` (the DOM
//! after the script ran). Needs `/usr/bin/chromium` (override with `CHROMIUM_BIN`); when
//! it is missing the test fails, unless `SKIP_BROWSER_TESTS=1` skips it on purpose.

#![cfg(feature = "stack-tests")]

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use fanfinity::auth::dev;
use fanfinity::auth::keys::new_key;
use fanfinity::auth::Role;
use fanfinity::event::EventType;
use serde_json::json;

/// How long events may take from the 202 to the aggregates.
const LAND: Duration = Duration::from_secs(90);
/// Wall-clock limit of one chromium run (its virtual time budget is 8 s).
const BROWSER_LIMIT: Duration = Duration::from_secs(90);
/// Every event type, as clients send them.
fn types() -> Vec<&'static str> {
    EventType::ALL.iter().map(|t| t.as_str()).collect()
}
const EMOJI: [&str; 5] = ["🔥", "⚽", "😱", "👏", "<b>x</b>"];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One event of type `kind` with the payload and team the page shows.
fn page_event(match_id: &str, n: usize, kind: &str, ts: Option<i64>) -> serde_json::Value {
    let team = ["ARG", "FRA", ""][n % 3];
    let mut e = json!({
        "event_id": new_id(),
        "match_id": match_id,
        "user_id": format!("fan-{}", n % 157),
        "type": kind,
    });
    if !team.is_empty() {
        e["team"] = json!(team);
    }
    if let Some(ts) = ts {
        e["ts"] = json!(ts);
    }
    match kind {
        "reaction" => e["payload"] = json!({"emoji": EMOJI[n % EMOJI.len()]}),
        "poll_vote" => {
            let option = ["messi", "mbappe", "di maria"][n % 3];
            e["payload"] = json!({"poll_id": "motm", "option": option});
        }
        _ => {}
    }
    e
}

fn post_batch(server_addr: &str, events: &[serde_json::Value]) {
    let body = serde_json::Value::Array(events.to_vec()).to_string();
    let auth = format!("Bearer {}", dev::ingest_key().key);
    let resp = request(
        server_addr,
        "POST",
        "/v1/events",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 202, "{}", resp.text());
}

/// The chromium binary, or `None` when browser tests are skipped on purpose.
fn chromium() -> Option<PathBuf> {
    if std::env::var("SKIP_BROWSER_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIP_BROWSER_TESTS=1: live page browser test skipped");
        return None;
    }
    let bin = std::env::var("CHROMIUM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    assert!(
        bin.is_file(),
        "chromium not found at {} (apt-get install chromium, or set CHROMIUM_BIN); \
         set SKIP_BROWSER_TESTS=1 to skip this test on purpose",
        bin.display()
    );
    Some(bin)
}

/// Runs headless chromium on `url` with `mode` (`--dump-dom` or `--screenshot=…`) in its
/// own process group and a fresh profile; kills the whole group after
/// [`BROWSER_LIMIT`]. Returns stdout.
fn run_chromium(bin: &Path, url: &str, mode: &str, tag: &str) -> String {
    let profile = std::env::temp_dir().join(format!(
        "fanfinity-page-profile-{}-{tag}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&profile).expect("create chromium profile dir");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.display()),
            "--window-size=1280,900",
            "--virtual-time-budget=8000",
            mode,
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {}: {err}", bin.display()));
    let pgid = child.id();
    // Drain the pipes on threads so a chatty chromium cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break Some(status);
        }
        if started.elapsed() > BROWSER_LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever happened, nothing of this chromium (renderer, zygote, …) may outlive it.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    match status {
        None => panic!(
            "chromium {mode} did not finish within {BROWSER_LIMIT:?}; stderr:\n{}",
            tail(&stderr)
        ),
        Some(s) if !s.success() => {
            panic!("chromium {mode} failed ({s}); stderr:\n{}", tail(&stderr))
        }
        Some(_) => stdout,
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The value of `attr="…"` on the first tag that has it.
fn attr<'a>(dom: &'a str, attr: &str) -> Option<&'a str> {
    let needle = format!(" {attr}=\"");
    let start = dom.find(&needle)? + needle.len();
    let len = dom[start..].find('"')?;
    Some(&dom[start..start + len])
}

/// Polls `probe` until it answers `Ok` or `limit` passes; then fails with its last answer.
fn wait_for(limit: Duration, what: &str, mut probe: impl FnMut() -> Result<(), String>) {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(()) => return,
            Err(last) if started.elapsed() > limit => {
                panic!("timed out after {limit:?} waiting for {what}; last answer: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn output_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
    std::fs::create_dir_all(&dir).expect("create target/test-output");
    dir
}

#[test]
fn live_match_page_draws_timeline_and_live_strip_in_chromium() {
    let Some(chromium) = chromium() else { return };

    let tag = format!("{}_{}", std::process::id(), now_ms() % 100_000_000);
    let names = Names {
        prefix: format!("page.{tag}"),
        database: format!("page_{tag}"),
    };
    // Auth on: the page gets its read key only from `#key=` in the URL, so a loaded page
    // proves it sent the key on every query (a query without it is answered 401).
    let read = new_key("live page test", vec![Role::Read]).expect("make a read key");
    let keys = keys_setting(&[dev::ingest_key().entry, read.entry.clone()]);
    let server = Server::start("serve", &names, &brokers(), &["auth.enabled=true", &keys]);
    let addr = server.addr();
    let get = |path: &str| request(&addr, "GET", path, &[("X-Fanfinity-Key", &read.key)], b"");
    let m = format!("page-m-{}", now_ms() % 1_000_000);

    // The page is served at `/` and `/matches/{id}` as HTML, without a key (the key is
    // typed into the page).
    for path in ["/".to_string(), format!("/matches/{m}")] {
        let resp = server.get(&path);
        assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
        assert!(
            resp.header("content-type")
                .is_some_and(|v| v.starts_with("text/html")),
            "GET {path} content type: {:?}",
            resp.header("content-type")
        );
        assert!(
            resp.text().contains("data-state"),
            "GET {path} is not the page"
        );
    }

    // History: 20 minutes before `start` (a whole minute, so `to=start` counts exactly
    // the history and the goal fills one 1-minute bucket), a steady trickle of every
    // type, and a goal at minute -6 (goal celebrations and reactions, 15x the baseline).
    let start = now_ms() / 60_000 * 60_000;
    let mut history = Vec::new();
    let mut n = 0;
    for minute in (1..=20i64).rev() {
        let per_minute = if minute == 6 { 900 } else { 60 };
        for i in 0..per_minute {
            let kind = if minute == 6 && i % 3 != 2 {
                if i % 3 == 0 {
                    "goal_celebration"
                } else {
                    "reaction"
                }
            } else {
                types()[n % EventType::ALL.len()]
            };
            let ts = start - minute * 60_000 + (i as i64 * 60_000 / per_minute as i64);
            history.push(page_event(&m, n, kind, Some(ts)));
            n += 1;
        }
    }
    for batch in history.chunks(500) {
        post_batch(&addr, batch);
    }
    let history_len = history.len();

    // Live traffic at the current second for as long as the test runs, so the page's
    // 60-second strip has data whenever chromium loads it (bounded by `stop`).
    let stop = Arc::new(AtomicBool::new(false));
    let live = {
        let stop = stop.clone();
        let addr = addr.clone();
        let m = m.clone();
        std::thread::spawn(move || {
            let mut n = 100_000;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                let batch: Vec<_> = (0..20)
                    .map(|i| {
                        n += 1;
                        page_event(&m, n, types()[(n + i) % EventType::ALL.len()], None)
                    })
                    .collect();
                post_batch(&addr, &batch);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    // The aggregates count all of the history (10 s buckets: `to` is widened to a whole
    // bucket), and the live window sees the live traffic.
    wait_for(LAND, "the history in /metrics", || {
        let resp = get(&format!("/v1/matches/{m}/metrics?bucket=10s&to={start}"));
        let total = (resp.status == 200).then(|| resp.json()["total_events"].as_u64());
        match total {
            Some(Some(n)) if n == history_len as u64 => Ok(()),
            _ => Err(format!("{} {}", resp.status, tail(&resp.text()))),
        }
    });
    wait_for(LAND, "live events in /live", || {
        let resp = get(&format!("/v1/matches/{m}/live"));
        let total = (resp.status == 200).then(|| resp.json()["total_events"].as_u64());
        match total {
            Some(Some(n)) if n > 0 => Ok(()),
            _ => Err(format!("{} {}", resp.status, tail(&resp.text()))),
        }
    });

    assert_eq!(
        server.get(&format!("/v1/matches/{m}/live")).status,
        401,
        "the query API must need the key the page is given"
    );
    let url = format!("http://{addr}/matches/{m}#key={}", read.key);
    let out = output_dir();
    let png = out.join("live_page.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &chromium,
        &url,
        &format!("--screenshot={}", png.display()),
        "shot",
    );
    let dom = run_chromium(&chromium, &url, "--dump-dom", "dom");
    let list = run_chromium(
        &chromium,
        &format!("http://{addr}/#key={}", read.key),
        "--dump-dom",
        "list",
    );
    stop.store(true, Ordering::Relaxed);
    let _ = live.join();
    std::fs::write(out.join("live_page.html"), &dom).expect("write DOM dump");

    let image = std::fs::read(&png)
        .unwrap_or_else(|err| panic!("no screenshot at {}: {err}", png.display()));
    assert!(
        image.starts_with(b"\x89PNG") && image.len() > 10_000,
        "screenshot {} is not a drawn PNG ({} bytes)",
        png.display(),
        image.len()
    );

    let body_tag = dom
        .find("<body")
        .map(|i| &dom[i..i + dom[i..].find('>').unwrap_or(0)])
        .unwrap_or("");
    let state = attr(body_tag, "data-state");
    let shown_error = dom
        .find("id=\"error\"")
        .map(|i| &dom[i..i + dom[i..].find("</div>").unwrap_or(0)])
        .unwrap_or("");
    assert_eq!(
        state,
        Some("loaded"),
        "page state {state:?}; body tag {body_tag}; error element {shown_error}; DOM in {}",
        out.join("live_page.html").display()
    );
    let points: u64 = attr(&dom, "data-points")
        .and_then(|v| v.parse().ok())
        .expect("data-points on the chart");
    let live_points: u64 = attr(&dom, "data-live-points")
        .and_then(|v| v.parse().ok())
        .expect("data-live-points on the chart");
    assert!(points > 0, "main chart drew no buckets");
    assert!(live_points > 0, "live strip drew no seconds");
    // `/` lists the match (from `/v1/matches`) with a link to its page.
    std::fs::write(out.join("live_page_list.html"), &list).expect("write list DOM dump");
    assert!(
        list.contains(&format!("href=\"/matches/{m}\"")),
        "the match list at / does not link to /matches/{m}; DOM in {}",
        out.join("live_page_list.html").display()
    );
    // API strings are text, never markup: the `<b>x</b>` emoji must arrive escaped.
    assert!(!dom.contains("<b>x</b>"), "API data was parsed as HTML");

    drop(server);
    drop_database(&names);
}
