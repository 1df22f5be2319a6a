//! Creates and checks fanfinity's three topics: events, retry and dead letters.
//!
//! Creation is idempotent: a topic that exists is left alone and only checked (partition
//! count, from cluster metadata). Retention is set at creation; an existing topic's
//! retention is the operator's to change, so it is not altered here.

use std::time::Duration;

use futures_lite::future::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Serialize;
use tracing::{info, warn};

use crate::app::config::KafkaConfig;

/// Why topic administration failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot create the kafka admin client")]
    Client(#[source] KafkaError),
    #[error("cannot create topic {topic}")]
    Create {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot read metadata from {brokers}")]
    Metadata {
        brokers: String,
        #[source]
        source: KafkaError,
    },
}

/// What `topics describe` reports for one topic.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopicState {
    pub name: String,
    /// `None` when the topic does not exist.
    pub partitions: Option<usize>,
    pub expected_partitions: usize,
}

/// Topic administration over the Kafka admin API.
pub struct TopicAdmin {
    admin: AdminClient<DefaultClientContext>,
    config: KafkaConfig,
    timeout: Duration,
}

impl TopicAdmin {
    /// Connects an admin client to the configured brokers.
    ///
    /// # Errors
    /// [`TopicError::Client`] when librdkafka refuses the configuration.
    pub fn new(config: &KafkaConfig) -> Result<Self, TopicError> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", format!("{}-admin", config.client_id))
            .create()
            .map_err(TopicError::Client)?;
        Ok(Self {
            admin,
            config: config.clone(),
            timeout: Duration::from_millis(config.admin_timeout_ms),
        })
    }

    fn names(&self) -> [&str; 3] {
        [
            &self.config.topic,
            &self.config.retry_topic,
            &self.config.dead_topic,
        ]
    }

    /// Creates any of the three topics that is missing, then checks all three.
    ///
    /// # Errors
    /// A creation the broker refused for a reason other than "already exists", or
    /// metadata that cannot be read.
    pub fn ensure(&self) -> Result<Vec<TopicState>, TopicError> {
        let retention = self.config.retention_ms.to_string();
        let new_topics: Vec<NewTopic<'_>> = self
            .names()
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                )
                .set("retention.ms", &retention)
            })
            .collect();
        // Both bounds: `operation_timeout` is how long the broker may take, the request
        // timeout how long we wait for any broker at all (librdkafka's default, 60 s,
        // would hold an ingest node's start when no broker answers).
        let options = AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout));
        let results =
            block_on(self.admin.create_topics(&new_topics, &options)).map_err(|source| {
                TopicError::Create {
                    topic: self.names().join(","),
                    source,
                }
            })?;
        for result in results {
            match result {
                Ok(topic) => info!(topic, partitions = self.config.partitions, "topic created"),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    info!(topic, "topic exists")
                }
                Err((topic, code)) => {
                    return Err(TopicError::Create {
                        source: KafkaError::AdminOp(code),
                        topic,
                    })
                }
            }
        }
        let states = self.describe()?;
        for state in &states {
            if state.partitions != Some(state.expected_partitions) {
                warn!(
                    topic = %state.name,
                    partitions = ?state.partitions,
                    expected = state.expected_partitions,
                    "topic partition count differs from configuration"
                );
            }
        }
        Ok(states)
    }

    /// Reads the three topics' partition counts from cluster metadata.
    ///
    /// # Errors
    /// [`TopicError::Metadata`] when no broker answers.
    pub fn describe(&self) -> Result<Vec<TopicState>, TopicError> {
        let metadata = self
            .admin
            .inner()
            .fetch_metadata(None, self.timeout)
            .map_err(|source| TopicError::Metadata {
                brokers: self.config.brokers.clone(),
                source,
            })?;
        let expected = self.config.partitions.max(0) as usize;
        Ok(self
            .names()
            .iter()
            .map(|name| {
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == *name && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .filter(|n| *n > 0);
                TopicState {
                    name: (*name).to_string(),
                    partitions,
                    expected_partitions: expected,
                }
            })
            .collect())
    }
}
