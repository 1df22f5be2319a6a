//! Building the Kafka records of a request: from validated `EventRecord`s to the
//! `OutgoingRecord`s (key = match id, value = the JSON record) handed to the producer.
//!
//! Group `kafka_record/<events>` (1 and 100 events of one request, realistic and from a
//! fixed seed, decoded by the service's own decode path beforehand):
//!
//! - `build`: `outgoing_records`, the handler's step between decoding and `send_batch`:
//!   [`EventRecord::encode`] (sonic-rs), the Kafka size check and the owned key and
//!   value.
//! - `encode_sonic_rs` / `encode_serde_json`: the record's JSON encoding alone, with the
//!   library the service uses and with serde_json as the reference.
//!
//! Not included: librdkafka's copy of the record into its queue and everything after it
//! (`benches/producer_handoff.rs` measures that against a broker). Each benchmark reports
//! events/s and bytes/s, the bytes being the keys and values produced.
//!
//! ```sh
//! cargo bench --bench kafka_record
//! ```

use std::hint::black_box;
use std::process::ExitCode;

use criterion::{BenchmarkId, Criterion, Throughput};
use fanfinity::app::config::KafkaConfig;
use fanfinity::event::EventRecord;
use fanfinity::ingest::decode::outgoing_records;

#[allow(dead_code)]
#[path = "support/events.rs"]
mod events;

// The service runs on mimalloc; every record is two fresh allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Seed of the bench events; fixed so every run encodes the same records.
const SEED: u64 = 0x00ca_fca0;

fn main() -> ExitCode {
    let records = match events::records(SEED, 100) {
        Ok(records) => records,
        Err(err) => {
            eprintln!("kafka_record: cannot build the bench events: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let max_message_bytes = KafkaConfig::default().max_message_bytes;

    let mut criterion = Criterion::default().configure_from_args();
    for count in [1, 100] {
        let request = &records[..count];
        let outgoing = match outgoing_records(request, max_message_bytes) {
            Ok(outgoing) => outgoing,
            Err(err) => {
                eprintln!("kafka_record: the service would refuse the bench events: {err}");
                return ExitCode::FAILURE;
            }
        };
        let bytes: usize = outgoing.iter().map(|r| r.key.len() + r.payload.len()).sum();

        let mut group = criterion.benchmark_group(format!("kafka_record/{count}"));
        group.throughput(Throughput::ElementsAndBytes {
            elements: count as u64,
            bytes: bytes as u64,
        });
        group.bench_function(BenchmarkId::from_parameter("build"), |b| {
            b.iter(|| outgoing_records(black_box(request), max_message_bytes))
        });
        group.bench_function(BenchmarkId::from_parameter("encode_sonic_rs"), |b| {
            b.iter(|| {
                black_box(request)
                    .iter()
                    .map(EventRecord::encode)
                    .collect::<Result<Vec<_>, _>>()
            })
        });
        group.bench_function(BenchmarkId::from_parameter("encode_serde_json"), |b| {
            b.iter(|| {
                black_box(request)
                    .iter()
                    .map(serde_json::to_vec)
                    .collect::<Result<Vec<_>, _>>()
            })
        });
        group.finish();
    }
    criterion.final_summary();
    ExitCode::SUCCESS
}
