//! What the open-model profiles tell people: the progress line, the end-of-run tables and
//! the `--json-report` document. Only shapes and formatting live here.
//!
//! The JSON schema is fixed (benches/compare parses it): `profile`, `settings`, `result`,
//! then `phases` (spike), `ramp` (ramp), `server` (--watch-pid), `visibility_ms`
//! (--probe-visibility) and `verification` (--verify). Fields may be added, never renamed.

use std::fmt::Write as _;

use serde::Serialize;

use crate::fd_limit::FdLimit;
use crate::open_stats::{PhaseResult, Progress};
use crate::proc_watch::ServerUsage;
use crate::ramp_plan::StepOutcome;
use crate::report::{count, LatencyMs};
use crate::verify::Verification;
use crate::visibility::VisibilityReport;

/// The ramp's section of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    pub p99_bound_ms: f64,
    /// 0 when no step held.
    pub max_held_events_per_s: f64,
    pub steps: Vec<StepOutcome>,
}

/// The generator's own footprint, so a reader can tell whether it was the bottleneck.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratorReport {
    pub connections: usize,
    pub source_ips: Vec<String>,
    /// Time to open every connection with --open-connections-first.
    pub preopen_s: Option<f64>,
    /// loadtest's VmRSS right after pre-opening (idle connections only).
    pub rss_after_open_bytes: Option<u64>,
    pub rss_max_bytes: u64,
    pub cpu_seconds: f64,
    pub fd_limit: FdLimit,
    /// Requests still in flight when the duration limit ended the run.
    pub abandoned_requests: usize,
}

/// The verification section: replay's checks plus a verdict.
#[derive(Debug, Clone, Serialize)]
pub struct VerificationReport {
    #[serde(flatten)]
    pub checks: Verification,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// The `--json-report` document.
#[derive(Debug, Clone, Serialize)]
pub struct OpenReport<S: Serialize> {
    pub profile: &'static str,
    pub match_id: String,
    pub settings: S,
    pub result: PhaseResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Vec<PhaseResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visibility_ms: Option<VisibilityReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationReport>,
    pub generator: GeneratorReport,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// One progress line: elapsed, phase, target and achieved rate, answers, window p99.
pub fn progress_line(p: &Progress) -> String {
    let window = p.window.as_secs_f64().max(1e-3);
    let p99 = p
        .window_p99_ms
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"));
    format!(
        "[{:>5.0}s] {:<8} target {:>9}/s achieved {:>9}/s  2xx {} 4xx {} 5xx {} err {}  p99 {p99}",
        p.elapsed.as_secs_f64(),
        p.phase,
        count(p.target_events_per_s.round() as u64),
        count((p.events_accepted as f64 / window).round() as u64),
        count(p.ok),
        count(p.client_errors),
        count(p.server_errors),
        count(p.errors),
    )
}

fn status_counts(r: &PhaseResult) -> String {
    r.requests
        .by_status
        .iter()
        .map(|(k, v)| format!("{k} {}", count(*v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The end-of-run table of one result, with phases under it when there are several.
pub fn render_result(result: &PhaseResult, phases: &[PhaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== {} ({:.1} s measured)",
        result.name, result.measured_s
    );
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>9} {} {:>9}",
        "phase",
        "target/s",
        "events/s",
        "req/s",
        LatencyMs::header(9),
        "failed"
    );
    let row = |out: &mut String, name: &str, r: &PhaseResult| {
        let l = &r.latency_ms;
        let _ = writeln!(
            out,
            "{:<10} {:>10.0} {:>10.0} {:>9.0} {} {:>9}",
            name,
            r.target_events_per_s,
            r.achieved_events_per_s,
            r.achieved_requests_per_s,
            l.cells(9),
            r.failed_attempts
        );
    };
    for p in phases {
        row(&mut out, &p.name, p);
    }
    // The merged row is named apart from the phases (a spike run has a "spike" phase).
    row(
        &mut out,
        if phases.is_empty() {
            &result.name
        } else {
            "all"
        },
        result,
    );
    let e = &result.events;
    let _ = writeln!(
        out,
        "events: {} sent, {} accepted, {} rejected, {} given up; ack mismatches {}",
        count(e.sent),
        count(e.accepted),
        count(e.rejected),
        count(e.given_up),
        count(result.ack_mismatches)
    );
    let _ = writeln!(
        out,
        "requests: {} attempts ({})",
        count(result.requests.sent),
        status_counts(result)
    );
    out
}

/// The ramp's steps.
pub fn render_ramp(ramp: &RampReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== ramp steps (p99 bound {} ms)", ramp.p99_bound_ms);
    let _ = writeln!(
        out,
        "{:<7} {:>12} {:>12} {:>9} {:>9} {:>6}",
        "kind", "target/s", "achieved/s", "p99 ms", "errors", "held"
    );
    for s in &ramp.steps {
        let _ = writeln!(
            out,
            "{:<7} {:>12.0} {:>12.0} {:>9.2} {:>9} {:>6}",
            s.kind,
            s.target_events_per_s,
            s.achieved_events_per_s,
            s.p99_ms,
            s.errors,
            if s.held { "yes" } else { "no" }
        );
    }
    let _ = writeln!(out, "max held: {:.0} events/s", ramp.max_held_events_per_s);
    out
}

/// The watched server, the probes and the generator.
pub fn render_extras(
    server: Option<&ServerUsage>,
    visibility: Option<&VisibilityReport>,
    generator: &GeneratorReport,
) -> String {
    let mut out = String::new();
    if let Some(s) = server {
        let _ = writeln!(
            out,
            "server pid {}: {:.2} cpu s ({:.2} cores), {:.2} cpu us/event, rss max {}, end {}, \
             VmHWM {}",
            s.pid,
            s.cpu_seconds,
            s.cpu_cores,
            s.cpu_us_per_event,
            mib(s.rss_max_bytes),
            mib(s.rss_end_bytes),
            mib(s.vm_hwm_bytes)
        );
    }
    if let Some(v) = visibility {
        let _ = writeln!(
            out,
            "visibility: {} probes, {} seen, {} unseen, {} posts failed; p50 {:.0} ms, \
             p99 {:.0} ms, max {:.0} ms",
            v.probes, v.seen, v.unseen, v.post_failed, v.p50, v.p99, v.max
        );
    }
    let _ = writeln!(
        out,
        "loadtest: {} connections from {} source ip(s), rss max {}{}, cpu {:.2} s",
        count(generator.connections as u64),
        generator.source_ips.len().max(1),
        mib(generator.rss_max_bytes),
        generator
            .rss_after_open_bytes
            .map(|b| format!(" ({} right after opening)", mib(b)))
            .unwrap_or_default(),
        generator.cpu_seconds
    );
    out
}
