//! Request parsing and validation: what `POST /v1/events` spends on a body before Kafka.
//!
//! Three bodies of realistic events (`support/events.rs`, fixed seed): one object, a JSON
//! array of 100 and NDJSON of the same 100. For each body, group `decode/<shape>` runs:
//!
//! - `fanfinity`: the service's own [`decode_events`] (nesting scan, sonic-rs DOM parse,
//!   field validation of every event), giving the `EventRecord`s the handler encodes.
//! - `validate_only`: [`validate_event`] over values parsed beforehand, so the checks'
//!   share of `fanfinity` is visible on its own.
//! - `sonic_rs_dom` / `serde_json_dom`: the raw parse alone into each library's `Value`
//!   (an NDJSON body line by line), which is the parser's part of the cost.
//! - `sonic_rs_typed` / `serde_json_typed`: the reference decode into the same target,
//!   `Vec<EventRecord>`, through a serde-derived struct with the payload kept as compact
//!   JSON text. It does none of fanfinity's checks (match id charset, control characters,
//!   `ts` window, payload size), so it is a floor for a typed design, not a replacement.
//!
//! Each benchmark reports both events/s and bytes/s (criterion's `ElementsAndBytes`), the
//! bytes being the request body's length.
//!
//! ```sh
//! cargo bench --bench ingest_decode
//! ```
//!
//! Needs no broker or database.

use std::hint::black_box;
use std::process::ExitCode;

use criterion::{BenchmarkId, Criterion, Throughput};
use fanfinity::event::{EventRecord, EventType};
use fanfinity::ingest::decode::decode_events;
use fanfinity::ingest::validate::validate_event;
use serde::Deserialize;
use uuid::Uuid;

#[allow(dead_code)]
#[path = "support/events.rs"]
mod events;

use events::{Shape, MAX_EVENTS, RECEIVED_AT_MS};

// The service runs on mimalloc, and a DOM parse is mostly allocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Seed of the bench events; fixed so every run parses the same bytes.
const SEED: u64 = 0x00de_c0de;
/// Events in the array and NDJSON bodies: the handler's usual batch from the SDKs.
const BATCH_EVENTS: usize = 100;

/// One body to decode.
struct Case {
    name: &'static str,
    shape: Shape,
    body: Vec<u8>,
    events: usize,
}

fn main() -> ExitCode {
    let cases = match build_cases() {
        Ok(cases) => cases,
        Err(err) => {
            eprintln!("ingest_decode: cannot build the bench bodies: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut criterion = Criterion::default().configure_from_args();
    for case in &cases {
        bench_case(&mut criterion, case);
    }
    criterion.final_summary();
    ExitCode::SUCCESS
}

/// The three bodies, each checked once through every decoder so a failure is reported
/// here and not hidden inside a timed loop.
fn build_cases() -> anyhow::Result<Vec<Case>> {
    let wire = events::wire_events(SEED, BATCH_EVENTS);
    let mut cases = Vec::new();
    for (name, shape) in [
        ("single", Shape::Single),
        ("array_100", Shape::Array),
        ("ndjson_100", Shape::Ndjson),
    ] {
        let body = events::body(&wire, shape)?;
        let count = decode_events(&body, shape.format(), MAX_EVENTS, RECEIVED_AT_MS)
            .map_err(|err| anyhow::anyhow!("{name}: fanfinity refused the body: {err:?}"))?
            .len();
        let typed = (
            sonic_rs_typed(&body, shape)?.len(),
            serde_json_typed(&body, shape)?.len(),
        );
        let dom = (
            sonic_rs_dom(&body, shape)?.len(),
            serde_json_dom(&body, shape)?.len(),
        );
        let values = sonic_rs_values(&body, shape)?;
        let validated = validate_all(&values).map_or(0, |records| records.len());
        if typed != (count, count) || validated != count || dom.0 != dom.1 {
            anyhow::bail!("{name}: decoders disagree: {count} {typed:?} {validated} {dom:?}");
        }
        cases.push(Case {
            name,
            shape,
            body,
            events: count,
        });
    }
    Ok(cases)
}

fn bench_case(criterion: &mut Criterion, case: &Case) {
    let mut group = criterion.benchmark_group(format!("decode/{}", case.name));
    group.throughput(Throughput::ElementsAndBytes {
        elements: case.events as u64,
        bytes: case.body.len() as u64,
    });
    let (body, shape, format) = (case.body.as_slice(), case.shape, case.shape.format());

    group.bench_function(BenchmarkId::from_parameter("fanfinity"), |b| {
        b.iter(|| decode_events(black_box(body), format, MAX_EVENTS, RECEIVED_AT_MS))
    });
    // Parsed once here, outside the timing; only the checks are measured.
    if let Ok(values) = sonic_rs_values(body, shape) {
        group.bench_function(BenchmarkId::from_parameter("validate_only"), |b| {
            b.iter(|| validate_all(black_box(&values)))
        });
    }
    group.bench_function(BenchmarkId::from_parameter("sonic_rs_dom"), |b| {
        b.iter(|| sonic_rs_dom(black_box(body), shape))
    });
    group.bench_function(BenchmarkId::from_parameter("serde_json_dom"), |b| {
        b.iter(|| serde_json_dom(black_box(body), shape))
    });
    group.bench_function(BenchmarkId::from_parameter("sonic_rs_typed"), |b| {
        b.iter(|| sonic_rs_typed(black_box(body), shape))
    });
    group.bench_function(BenchmarkId::from_parameter("serde_json_typed"), |b| {
        b.iter(|| serde_json_typed(black_box(body), shape))
    });
    group.finish();
}

/// The lines of an NDJSON body that hold an event, as `decode_events` reads them.
fn ndjson_lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
}

/// The body as sonic-rs values, one per event, as `decode_events` hands them to
/// validation (array elements cloned out, as it does).
fn sonic_rs_values(body: &[u8], shape: Shape) -> sonic_rs::Result<Vec<sonic_rs::Value>> {
    use sonic_rs::JsonContainerTrait;
    match shape {
        Shape::Single => Ok(vec![sonic_rs::from_slice(body)?]),
        Shape::Array => {
            let value: sonic_rs::Value = sonic_rs::from_slice(body)?;
            Ok(value
                .as_array()
                .map_or_else(Vec::new, |array| array.iter().cloned().collect()))
        }
        Shape::Ndjson => ndjson_lines(body).map(sonic_rs::from_slice).collect(),
    }
}

fn validate_all(values: &[sonic_rs::Value]) -> Option<Vec<EventRecord>> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| validate_event(index, value, RECEIVED_AT_MS).ok())
        .collect()
}

/// The raw parse with sonic-rs: one value per body, or per NDJSON line.
fn sonic_rs_dom(body: &[u8], shape: Shape) -> sonic_rs::Result<Vec<sonic_rs::Value>> {
    match shape {
        Shape::Single | Shape::Array => Ok(vec![sonic_rs::from_slice(body)?]),
        Shape::Ndjson => ndjson_lines(body).map(sonic_rs::from_slice).collect(),
    }
}

/// The raw parse with serde_json: one value per body, or per NDJSON line.
fn serde_json_dom(body: &[u8], shape: Shape) -> serde_json::Result<Vec<serde_json::Value>> {
    match shape {
        Shape::Single | Shape::Array => Ok(vec![serde_json::from_slice(body)?]),
        Shape::Ndjson => ndjson_lines(body).map(serde_json::from_slice).collect(),
    }
}

/// An event as a serde-derived decoder reads it; `P` is the library's own `Value`.
#[derive(Deserialize)]
struct TypedEvent<P> {
    event_id: Option<Uuid>,
    match_id: String,
    user_id: String,
    #[serde(rename = "type")]
    event_type: EventType,
    ts: Option<i64>,
    team: Option<String>,
    payload: Option<P>,
}

impl<P> TypedEvent<P> {
    fn into_record(self, payload: Option<String>) -> EventRecord {
        EventRecord {
            event_id: self.event_id.unwrap_or_else(Uuid::now_v7),
            match_id: self.match_id,
            user_id: self.user_id,
            event_type: self.event_type,
            ts: self.ts,
            team: self.team,
            payload,
            received_at: RECEIVED_AT_MS,
        }
    }
}

/// Typed decode with sonic-rs, payload re-serialized compact as `validate_event` does.
fn sonic_rs_typed(body: &[u8], shape: Shape) -> sonic_rs::Result<Vec<EventRecord>> {
    let events: Vec<TypedEvent<sonic_rs::Value>> = match shape {
        Shape::Single => vec![sonic_rs::from_slice(body)?],
        Shape::Array => sonic_rs::from_slice(body)?,
        Shape::Ndjson => ndjson_lines(body)
            .map(sonic_rs::from_slice)
            .collect::<Result<_, _>>()?,
    };
    events
        .into_iter()
        .map(|mut event| {
            let payload = event.payload.take().map(|p| sonic_rs::to_string(&p));
            Ok(event.into_record(payload.transpose()?))
        })
        .collect()
}

/// Typed decode with serde_json, payload re-serialized compact.
fn serde_json_typed(body: &[u8], shape: Shape) -> serde_json::Result<Vec<EventRecord>> {
    let events: Vec<TypedEvent<serde_json::Value>> = match shape {
        Shape::Single => vec![serde_json::from_slice(body)?],
        Shape::Array => serde_json::from_slice(body)?,
        Shape::Ndjson => ndjson_lines(body)
            .map(serde_json::from_slice)
            .collect::<Result<_, _>>()?,
    };
    events
        .into_iter()
        .map(|mut event| {
            let payload = event.payload.take().map(|p| serde_json::to_string(&p));
            Ok(event.into_record(payload.transpose()?))
        })
        .collect()
}
