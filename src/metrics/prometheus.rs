//! Prometheus text exposition (format 0.0.4) of every metric fanfinity keeps.
//!
//! Latency is exported as true histograms (`_bucket{le=..}`, `_sum`, `_count`) computed
//! from each shard's hdrhistogram at scrape time, so `histogram_quantile()` works across
//! shards and nodes; `docs/metrics.md` explains how to read them.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::histogram::Recorder;
use super::shard::ShardMetrics;
use crate::sink::status::{ClickHouseState, SinkStatus};

/// Upper bounds of the request latency buckets, in microseconds.
const LATENCY_BOUNDS_US: [u64; 15] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Upper bounds of the sink batch size buckets, in rows.
const BATCH_ROW_BOUNDS: [u64; 9] = [10, 100, 500, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000];

/// Producer state at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct ProducerView {
    pub kafka_up: bool,
    pub queue_depth: usize,
    pub queue_limit: usize,
    /// Times the watchdog replaced a stuck producer.
    pub resets: u64,
}

/// Everything a scrape reads. Parts absent in a subcommand (`ingest` has no sink,
/// `consume` no shards) are simply left out.
#[derive(Default)]
pub struct Sources<'a> {
    pub shards: &'a [Arc<ShardMetrics>],
    pub producer: Option<ProducerView>,
    pub sink: Option<&'a SinkStatus>,
}

/// Renders the exposition text.
pub fn render(sources: &Sources<'_>) -> String {
    let mut out = String::with_capacity(8 * 1024);
    render_shards(&mut out, sources.shards);
    if let Some(producer) = sources.producer {
        gauge(
            &mut out,
            "fanfinity_kafka_up",
            "1 when a Kafka broker is reachable.",
            producer.kafka_up as u64,
        );
        gauge(
            &mut out,
            "fanfinity_producer_queue_messages",
            "Records queued in the producer or awaiting acknowledgement.",
            producer.queue_depth as u64,
        );
        gauge(
            &mut out,
            "fanfinity_producer_queue_limit_messages",
            "Queue depth at which requests get 503.",
            producer.queue_limit as u64,
        );
        counter(
            &mut out,
            "fanfinity_producer_resets_total",
            "Times a stuck producer (fatal error, or failing with a broker up) was replaced.",
            producer.resets,
        );
    }
    if let Some(sink) = sources.sink {
        render_sink(&mut out, sink);
    }
    out
}

fn render_shards(out: &mut String, shards: &[Arc<ShardMetrics>]) {
    if shards.is_empty() {
        return;
    }
    header(
        out,
        "fanfinity_http_requests_total",
        "counter",
        "HTTP requests answered, by shard, route and status (499: client went away).",
    );
    for shard in shards {
        shard.with_stats(|stats| {
            for ((route, status), count) in &stats.requests {
                let _ = writeln!(
                    out,
                    "fanfinity_http_requests_total{{shard=\"{}\",route=\"{}\",\
                     status=\"{status}\"}} {count}",
                    shard.shard,
                    route.as_str()
                );
            }
        });
    }
    header(
        out,
        "fanfinity_events_accepted_total",
        "counter",
        "Events answered 202, by shard.",
    );
    for shard in shards {
        let accepted = shard.with_stats(|s| s.events_accepted).unwrap_or(0);
        let _ = writeln!(
            out,
            "fanfinity_events_accepted_total{{shard=\"{}\"}} {accepted}",
            shard.shard
        );
    }
    header(
        out,
        "fanfinity_http_request_duration_seconds",
        "histogram",
        "Request latency from first byte parsed to answer ready, by shard and route.",
    );
    for shard in shards {
        shard.with_stats(|stats| {
            for (route, rec) in &stats.latency_us {
                let labels = format!("shard=\"{}\",route=\"{}\"", shard.shard, route.as_str());
                histogram_seconds(out, "fanfinity_http_request_duration_seconds", &labels, rec);
            }
        });
    }
    render_connections(out, shards);
}

/// Per-shard connection gauge and the closes the server decided (docs/connections.md).
fn render_connections(out: &mut String, shards: &[Arc<ShardMetrics>]) {
    use super::shard::ConnectionStats as C;
    header(
        out,
        "fanfinity_http_open_connections",
        "gauge",
        "Connections a shard serves right now (refused ones not included).",
    );
    for shard in shards {
        let open = C::read(&shard.connections.open);
        let _ = writeln!(
            out,
            "fanfinity_http_open_connections{{shard=\"{}\"}} {open}",
            shard.shard
        );
    }
    header(
        out,
        "fanfinity_http_connections_closed_total",
        "counter",
        "Connections the server answered and closed on its own, by shard and reason.",
    );
    for shard in shards {
        let c = &shard.connections;
        for (reason, value) in [
            ("too_many_connections", &c.refused_over_limit),
            ("header_timeout", &c.header_timeouts),
            ("idle_timeout", &c.idle_timeouts),
            ("malformed_request", &c.malformed),
        ] {
            let _ = writeln!(
                out,
                "fanfinity_http_connections_closed_total{{shard=\"{}\",reason=\"{reason}\"}} {}",
                shard.shard,
                C::read(value)
            );
        }
    }
    header(
        out,
        "fanfinity_http_connections_handed_off_total",
        "counter",
        "Connections a shard accepted and handed to a less loaded shard.",
    );
    for shard in shards {
        let _ = writeln!(
            out,
            "fanfinity_http_connections_handed_off_total{{shard=\"{}\"}} {}",
            shard.shard,
            C::read(&shard.connections.handed_off)
        );
    }
}

fn render_sink(out: &mut String, sink: &SinkStatus) {
    let report = sink.report();
    gauge(
        out,
        "fanfinity_sink_consumers_running",
        "Consumer threads draining Kafka into ClickHouse.",
        report.consumers_running as u64,
    );
    gauge(
        out,
        "fanfinity_clickhouse_up",
        "1 when the last insert succeeded, 0 when it failed (absent: none yet).",
        u64::from(report.clickhouse == ClickHouseState::Up),
    );
    counter(
        out,
        "fanfinity_sink_rows_inserted_total",
        "Rows inserted into ClickHouse.",
        sink.rows_inserted.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_batches_inserted_total",
        "Batches inserted into ClickHouse.",
        sink.batches_inserted.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_insert_failures_total",
        "Insert attempts that failed and were retried.",
        sink.insert_failures.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_invalid_records_total",
        "Records on the topic that were not valid events.",
        sink.invalid_records.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_dead_letters_total",
        "Records written to the dead-letter topic (invalid, or refused by ClickHouse).",
        sink.dead_letters.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_retry_letters_total",
        "Rows ClickHouse refused, written to the retry topic for another attempt.",
        sink.retry_letters.load(Ordering::Relaxed),
    );
    counter(
        out,
        "fanfinity_sink_retried_rows_stored_total",
        "Rows from the retry topic that ClickHouse accepted on a later attempt.",
        sink.retried_rows_stored.load(Ordering::Relaxed),
    );
    header(
        out,
        "fanfinity_sink_duplicates_dropped_total",
        "counter",
        "Rows not inserted because they were already in ClickHouse: their Kafka position \
         is in the ledger (redelivered), or their event was earlier in the batch or \
         inserted recently under another offset (resent).",
    );
    for (reason, value) in [
        ("redelivered", &sink.duplicates_redelivered),
        ("resent", &sink.duplicates_resent),
    ] {
        let _ = writeln!(
            out,
            "fanfinity_sink_duplicates_dropped_total{{reason=\"{reason}\"}} {}",
            value.load(Ordering::Relaxed)
        );
    }
    gauge(
        out,
        "fanfinity_sink_retry_waiting",
        "Retry-topic records held by this process until their next attempt is due.",
        sink.retry_waiting.load(Ordering::Relaxed),
    );
    gauge(
        out,
        "fanfinity_sink_schema_error",
        "1 while ClickHouse refuses the sink's table or grant (sink paused).",
        u64::from(report.schema_error),
    );

    header(
        out,
        "fanfinity_consumer_lag_messages",
        "gauge",
        "Messages between the committed position and the partition end (librdkafka stats).",
    );
    if let Ok(lag) = sink.lag.lock() {
        for ((topic, partition), value) in lag.iter() {
            let _ = writeln!(
                out,
                "fanfinity_consumer_lag_messages{{topic=\"{topic}\",\
                 partition=\"{partition}\"}} {value}"
            );
        }
    }

    if let Ok(rec) = sink.batch_rows.lock() {
        header(
            out,
            "fanfinity_sink_batch_rows",
            "histogram",
            "Rows per ClickHouse insert.",
        );
        histogram_raw(
            out,
            "fanfinity_sink_batch_rows",
            "",
            &rec,
            &BATCH_ROW_BOUNDS,
        );
    }
    if let Ok(rec) = sink.insert_us.lock() {
        header(
            out,
            "fanfinity_sink_insert_duration_seconds",
            "histogram",
            "Duration of successful ClickHouse inserts.",
        );
        histogram_seconds(out, "fanfinity_sink_insert_duration_seconds", "", &rec);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A histogram recorded in microseconds, exported in seconds.
fn histogram_seconds(out: &mut String, name: &str, labels: &str, rec: &Recorder) {
    histogram(out, name, labels, rec, &LATENCY_BOUNDS_US, 1e6);
}

/// A histogram exported in the unit it was recorded in.
fn histogram_raw(out: &mut String, name: &str, labels: &str, rec: &Recorder, bounds: &[u64]) {
    histogram(out, name, labels, rec, bounds, 1.0);
}

/// Writes `_bucket`, `_sum` and `_count` lines, dividing recorded values by `scale`.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    rec: &Recorder,
    bounds: &[u64],
    scale: f64,
) {
    let counts = rec.cumulative(bounds);
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in bounds.iter().zip(&counts) {
        let le = *bound as f64 / scale;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
        rec.count()
    );
    let braced = braces(labels);
    let _ = writeln!(out, "{name}_sum{braced} {}", rec.sum() as f64 / scale);
    let _ = writeln!(out, "{name}_count{braced} {}", rec.count());
}

/// `{labels}`, or nothing for an unlabelled series.
fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::shard::Route;
    use std::time::Instant;

    #[test]
    fn renders_per_shard_histograms_with_labels() {
        let shards = vec![
            Arc::new(ShardMetrics::new(0)),
            Arc::new(ShardMetrics::new(1)),
        ];
        shards[1].record(Route::Events, 202, Instant::now(), 3);
        let text = render(&Sources {
            shards: &shards,
            ..Sources::default()
        });
        assert!(text.contains(
            "fanfinity_http_requests_total{shard=\"1\",route=\"events\",status=\"202\"} 1"
        ));
        assert!(text.contains(
            "fanfinity_http_request_duration_seconds_bucket{shard=\"1\",route=\"events\",le=\"+Inf\"} 1"
        ));
        assert!(text.contains("fanfinity_events_accepted_total{shard=\"1\"} 3"));
        assert!(text.contains("# TYPE fanfinity_http_request_duration_seconds histogram"));
    }

    #[test]
    fn renders_sink_metrics() {
        let sink = SinkStatus::default();
        sink.insert_succeeded(500, 12_000);
        let text = render(&Sources {
            sink: Some(&sink),
            ..Sources::default()
        });
        assert!(text.contains("fanfinity_sink_rows_inserted_total 500"));
        assert!(text.contains("fanfinity_sink_duplicates_dropped_total{reason=\"resent\"} 0"));
        assert!(text.contains("fanfinity_sink_batch_rows_bucket{le=\"500\"} 1"));
        assert!(text.contains("fanfinity_clickhouse_up 1"));
        assert!(text.contains("fanfinity_sink_batch_rows_count 1\n"));
    }
}
