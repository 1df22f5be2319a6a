//! The sink's hot path after Kafka: consumed record bytes into `EventRow`s, and a batch
//! of rows encoded in RowBinary and sent as one INSERT, as `BatchWriter` sends it.
//!
//! Records are realistic events (fixed seed) that went through the service's own decode
//! path and [`EventRecord::encode`], so the bytes are what a consumer reads from
//! `fanfinity.events`.
//!
//! - `sink_rows/<rows>` (1,000 and 20,000): [`EventRecord::decode`] (sonic-rs, with its
//!   checks) and [`EventRow::from_record`] for every record, as the consumer does before
//!   it batches. Bytes are the Kafka record values read.
//! - `sink_insert/<compression>/<rows>` (1, 1,000 and 20,000 rows; `none`, the default,
//!   and `lz4`): [`BatchWriter::insert`], the sink's own call, into the `clickhouse`
//!   crate's mock server (`test-util` feature) on loopback. The crate keeps its RowBinary
//!   encoder private, so the encoding cannot be timed alone; what is timed is the whole
//!   insert as the sink runs it: RowBinary encoding in the crate's 256 KiB chunks, lz4
//!   when on, the HTTP/1.1 request streamed over a fresh loopback connection (the mock
//!   closes each one; a real server keeps it alive) and the mock reading the whole body
//!   on another thread before it answers 200. The 1-row batch shows that fixed cost;
//!   the rest is per row. Nothing is parsed or stored on the server side, so this is a
//!   client-side ceiling, not a ClickHouse figure (`benches/sink_batch.rs` is that).
//!   Bytes are the RowBinary size of the rows, computed from the column types.
//!
//! Both groups report rows/s (criterion's "elements") and bytes/s.
//!
//! ```sh
//! cargo bench --bench clickhouse_encode
//! ```

use std::cell::Cell;
use std::hint::black_box;
use std::process::ExitCode;

use anyhow::Context;
use clickhouse::test::{handlers, Mock};
use criterion::{BenchmarkId, Criterion, Throughput};
use fanfinity::app::config::{ClickHouseConfig, WireCompression};
use fanfinity::event::{EventRecord, RecordError};
use fanfinity::sink::row::{EventRow, KafkaPosition};
use fanfinity::sink::writer::BatchWriter;

#[allow(dead_code)]
#[path = "support/events.rs"]
mod events;

// The service runs on mimalloc; rows are mostly owned strings.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Seed of the bench events; fixed so every run encodes the same rows.
const SEED: u64 = 0x00c1_1c45;
/// Partitions of `fanfinity.events` the records are spread over.
const KAFKA_PARTITIONS: usize = 3;
/// Batch sizes: one row (the fixed cost of an insert), a small batch, and the sink's
/// default `max_batch_rows`.
const INSERT_ROWS: [usize; 3] = [1, 1_000, 20_000];
/// Batch sizes for turning records into rows.
const ROW_BATCHES: [usize; 2] = [1_000, 20_000];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("clickhouse_encode: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let most = INSERT_ROWS
        .into_iter()
        .chain(ROW_BATCHES)
        .max()
        .unwrap_or(0);
    let values = events::records(SEED, most)
        .context("build the bench events")?
        .iter()
        .map(EventRecord::encode)
        .collect::<Result<Vec<_>, _>>()
        .context("encode the bench records")?;
    let rows = rows_from_records(&values).context("turn the bench records into rows")?;

    let mut criterion = Criterion::default().configure_from_args();
    bench_rows(&mut criterion, &values);
    bench_inserts(&mut criterion, &rows)?;
    criterion.final_summary();
    Ok(())
}

fn bench_rows(criterion: &mut Criterion, values: &[Vec<u8>]) {
    let mut group = criterion.benchmark_group("sink_rows");
    for count in ROW_BATCHES {
        let batch = &values[..count];
        group.throughput(Throughput::ElementsAndBytes {
            elements: count as u64,
            bytes: batch.iter().map(Vec::len).sum::<usize>() as u64,
        });
        group.bench_function(BenchmarkId::from_parameter(count), |b| {
            b.iter(|| rows_from_records(black_box(batch)))
        });
    }
    group.finish();
}

/// What the consumer does with each record of a poll before batching it.
fn rows_from_records(values: &[Vec<u8>]) -> Result<Vec<EventRow>, RecordError> {
    values
        .iter()
        .enumerate()
        .map(|(offset, value)| {
            let position = KafkaPosition {
                partition: (offset % KAFKA_PARTITIONS) as i32,
                offset: offset as i64,
            };
            EventRecord::decode(value).map(|record| EventRow::from_record(record, position))
        })
        .collect()
}

fn bench_inserts(criterion: &mut Criterion, rows: &[EventRow]) -> anyhow::Result<()> {
    // The mock serves from its own runtime thread, as a server would from its own process.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the mock server's runtime")?;
    let mut mock = {
        let _entered = server.enter();
        Mock::new()
    };
    mock.non_exhaustive();

    let failures = Cell::new(0usize);
    let mut group = criterion.benchmark_group("sink_insert");
    for (name, compression) in [
        ("none", WireCompression::None),
        ("lz4", WireCompression::Lz4),
    ] {
        let config = ClickHouseConfig {
            url: mock.url().to_string(),
            compression,
            ..ClickHouseConfig::default()
        };
        let writer = BatchWriter::new(&config).context("create the batch writer")?;
        mock.add(handlers::record::<EventRow>());
        writer
            .insert(&rows[..1])
            .with_context(|| format!("first insert into the mock server ({name})"))?;

        for count in INSERT_ROWS {
            let batch = &rows[..count];
            group.throughput(Throughput::ElementsAndBytes {
                elements: count as u64,
                bytes: batch.iter().map(row_binary_len).sum::<usize>() as u64,
            });
            group.bench_function(BenchmarkId::new(name, count), |b| {
                b.iter(|| {
                    mock.add(handlers::record::<EventRow>());
                    if writer.insert(black_box(batch)).is_err() {
                        failures.set(failures.get() + 1);
                    }
                })
            });
        }
    }
    group.finish();

    if failures.get() > 0 {
        anyhow::bail!(
            "{} inserts into the mock server failed; the timings are not valid",
            failures.get()
        );
    }
    Ok(())
}

/// Bytes of `row` in RowBinary: UUID 16, a String its LEB128 length and bytes, `Enum8` 1,
/// `Nullable` a flag byte plus the value when present, `DateTime` 4.
fn row_binary_len(row: &EventRow) -> usize {
    fn string(text: &str) -> usize {
        let len_bytes = (usize::BITS - text.len().leading_zeros())
            .div_ceil(7)
            .max(1);
        len_bytes as usize + text.len()
    }
    16 + string(&row.match_id)
        + string(&row.user_id)
        + 1
        + string(&row.team)
        + 1
        + row.client_ts_ms.map_or(0, |_| 8)
        + 4
        + 4
        + 8
        + string(&row.payload)
        + 4
        + 8
}
