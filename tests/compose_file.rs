//! Checks `docker-compose.yml` and the `Dockerfile` without Docker: the dev machines and CI
//! have no Docker engine, so these files are read as data and held to what fanfinity needs
//! from them (glommio's io_uring and locked memory, the three topics, a current ClickHouse).

use std::path::PathBuf;

use serde_yaml::Value;

const TOPICS: [&str; 3] = [
    "fanfinity.events",
    "fanfinity.events.retry",
    "fanfinity.events.dead",
];

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn read_repo_file(name: &str) -> String {
    let path = repo_file(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn compose() -> Value {
    serde_yaml::from_str(&read_repo_file("docker-compose.yml"))
        .expect("docker-compose.yml is valid YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

/// A `command` or `entrypoint` may be a string or a list of strings; joins a list with
/// spaces so either form can be searched.
fn command_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Sequence(parts) => parts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// An `environment` value from either the map form or the `KEY=value` list form.
fn env_var(service: &Value, key: &str) -> Option<String> {
    match &service["environment"] {
        Value::Mapping(map) => map.get(key).map(|value| match value {
            Value::String(text) => text.clone(),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }),
        Value::Sequence(items) => items.iter().filter_map(Value::as_str).find_map(|item| {
            let (name, value) = item.split_once('=')?;
            (name == key).then(|| value.to_owned())
        }),
        _ => None,
    }
}

fn depends_on_condition<'a>(service: &'a Value, dependency: &str) -> Option<&'a str> {
    service["depends_on"][dependency]["condition"].as_str()
}

#[test]
fn compose_defines_kafka_clickhouse_topic_init_and_fanfinity() {
    let compose = compose();
    for name in ["kafka", "clickhouse", "topic-init", "fanfinity"] {
        service(&compose, name);
    }
}

#[test]
fn compose_runs_current_clickhouse() {
    let compose = compose();
    let image = service(&compose, "clickhouse")["image"]
        .as_str()
        .expect("clickhouse has an image");
    let tag = image
        .strip_prefix("clickhouse/clickhouse-server:")
        .unwrap_or_else(|| panic!("clickhouse image `{image}` is not the official one"));
    let major: u32 = tag
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("clickhouse tag `{tag}` does not start with a version"));
    assert!(major >= 24, "clickhouse {tag} is older than 24.x");
}

#[test]
fn compose_runs_official_kafka_in_kraft_mode() {
    let compose = compose();
    let kafka = service(&compose, "kafka");
    let image = kafka["image"].as_str().expect("kafka has an image");
    assert!(
        image.starts_with("apache/kafka:"),
        "kafka image is `{image}`"
    );

    let roles = env_var(kafka, "KAFKA_PROCESS_ROLES").expect("KAFKA_PROCESS_ROLES is set");
    assert!(
        roles.contains("broker") && roles.contains("controller"),
        "roles: {roles}"
    );
    let advertised =
        env_var(kafka, "KAFKA_ADVERTISED_LISTENERS").expect("KAFKA_ADVERTISED_LISTENERS is set");
    assert!(
        advertised.contains("kafka:9092"),
        "containers cannot reach {advertised}"
    );
}

#[test]
fn topic_init_creates_all_three_topics() {
    let compose = compose();
    let init = service(&compose, "topic-init");
    let script = format!(
        "{} {}",
        command_text(&init["entrypoint"]),
        command_text(&init["command"])
    );
    assert!(
        script.contains("kafka-topics.sh"),
        "topic-init does not run kafka-topics.sh"
    );
    assert!(
        script.contains("--create"),
        "topic-init does not create topics"
    );
    // Whole words, since `fanfinity.events` is a prefix of the other two names.
    let words: Vec<&str> = script
        .split(|c: char| c.is_whitespace() || c == ';' || c == '"' || c == '\'')
        .collect();
    for topic in TOPICS {
        assert!(words.contains(&topic), "topic-init does not create {topic}");
    }
    assert_eq!(
        depends_on_condition(init, "kafka"),
        Some("service_healthy"),
        "topic-init must wait for a healthy kafka"
    );
}

#[test]
fn fanfinity_may_lock_memory() {
    let compose = compose();
    let memlock = &service(&compose, "fanfinity")["ulimits"]["memlock"];
    let unlimited = |value: &Value| value.as_i64() == Some(-1);
    let ok = unlimited(memlock) || (unlimited(&memlock["soft"]) && unlimited(&memlock["hard"]));
    assert!(ok, "fanfinity memlock ulimit must be -1, found {memlock:?}");
}

#[test]
fn fanfinity_may_use_io_uring() {
    let compose = compose();
    let security_opt = service(&compose, "fanfinity")["security_opt"]
        .as_sequence()
        .expect("fanfinity has security_opt");
    let unconfined = security_opt
        .iter()
        .filter_map(Value::as_str)
        .any(|opt| opt == "seccomp=unconfined" || opt == "seccomp:unconfined");
    assert!(
        unconfined,
        "fanfinity needs seccomp=unconfined for io_uring"
    );
}

#[test]
fn fanfinity_starts_after_topics_and_healthy_clickhouse() {
    let compose = compose();
    let fanfinity = service(&compose, "fanfinity");
    assert_eq!(
        depends_on_condition(fanfinity, "topic-init"),
        Some("service_completed_successfully")
    );
    assert_eq!(
        depends_on_condition(fanfinity, "clickhouse"),
        Some("service_healthy")
    );
    assert!(
        fanfinity["healthcheck"]["test"].is_sequence()
            || fanfinity["healthcheck"]["test"].is_string(),
        "fanfinity has no healthcheck"
    );
}

#[test]
fn fanfinity_is_configured_for_the_compose_network() {
    let compose = compose();
    let fanfinity = service(&compose, "fanfinity");
    let expected = [
        ("FANFINITY_KAFKA__BROKERS", "kafka:9092"),
        ("FANFINITY_CLICKHOUSE__URL", "http://clickhouse:8123"),
        ("FANFINITY_CLICKHOUSE__COMPRESSION", "lz4"),
        ("FANFINITY_CLICKHOUSE__VALIDATION", "true"),
        ("FANFINITY_HTTP__LISTEN", "0.0.0.0:8080"),
    ];
    for (key, value) in expected {
        assert_eq!(env_var(fanfinity, key).as_deref(), Some(value), "{key}");
    }
    assert_eq!(
        command_text(&fanfinity["command"]),
        "fanfinity serve --config /etc/fanfinity/dev.toml"
    );
}

#[test]
fn compose_publishes_ports_on_loopback_only() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services is a map");
    for (name, service) in services {
        let Some(ports) = service["ports"].as_sequence() else {
            continue;
        };
        for port in ports {
            let port = port.as_str().unwrap_or_default();
            assert!(
                port.starts_with("127.0.0.1:"),
                "service {name:?} publishes `{port}` beyond loopback"
            );
        }
    }
}

#[test]
fn dockerfile_builds_fanfinity_binary() {
    let compose = compose();
    let build = &service(&compose, "fanfinity")["build"];
    let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
    assert_eq!(
        build["context"].as_str(),
        Some("."),
        "fanfinity builds from the repo root"
    );

    let text = read_repo_file(dockerfile);
    let stages: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| line.to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert!(
        stages.iter().any(|line| line.contains("rust:1-bookworm")),
        "no rust:1-bookworm builder stage in {stages:?}"
    );
    assert!(
        stages
            .last()
            .is_some_and(|line| line.contains("debian:bookworm-slim")),
        "the final stage is not debian:bookworm-slim: {stages:?}"
    );
    assert!(
        text.contains("--bin fanfinity"),
        "the builder does not build the fanfinity bin"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("COPY --from=builder") && line.contains("fanfinity")),
        "the runtime stage does not copy the fanfinity binary"
    );
}
