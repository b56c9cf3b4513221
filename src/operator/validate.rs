//! Validate: the raw `EventPublisher` spec, once, into a [`ValidatedPublisher`] the later steps
//! use (and never the raw spec again). The API server already enforced the CRD's bounds and CEL
//! rules; this step derives what they cannot express: the relay's own configuration document
//! (validated by the relay's own rules) and the Secret files each Pod mounts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use crate::broker::BrokerConfig;
use crate::broker::kafka::KafkaConfig;
use crate::broker::rabbitmq::{QueueBinding, RabbitMqConfig};
use crate::broker::routing::Routing;
use crate::broker::sns_sqs::SnsSqsConfig;
use crate::crd::EventPublisher;
use crate::crd::common::TlsSecretRefs;
use crate::crd::event_publisher::{DeletionPolicy, RoutingStrategy};
use crate::delivery::circuit::CircuitBreakerConfig;
use crate::delivery::retry::RetryPolicy;
use crate::relay::config::{DeadLetterConfig, HttpConfig, OutboxConfig, RelayConfig, WorkersConfig};
use crate::schema::compatibility::CompatibilityMode;

/// Where the relay's configuration document is mounted in every container.
pub const CONFIG_DIR: &str = "/etc/inventory-outbox";
/// File name of the document inside the ConfigMap and [`CONFIG_DIR`].
pub const CONFIG_FILE: &str = "relay.yaml";
/// Where Secret volumes are mounted, one directory per role.
pub const SECRETS_DIR: &str = "/var/run/secrets/inventory-outbox";
/// The relay's HTTP port (probes, metrics, admin API, status).
pub const HTTP_PORT: u16 = 8080;

/// A spec the operator cannot run; the message names the field. The object waits for a change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidSpec {
    #[error("metadata.{0} is missing")]
    Metadata(&'static str),
    #[error(
        "metadata.name {0:?} is longer than 63 characters: it is the publisher's key in the outbox and a label value"
    )]
    NameTooLong(String),
    #[error("{0}")]
    RelayConfig(String),
}

/// One Secret key mounted as a file and read into an environment variable of the container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretFile {
    /// Role, and the directory under [`SECRETS_DIR`]: `database`, `amqp`, `kafka-sasl`, ...
    pub role: &'static str,
    pub secret: String,
    pub key: String,
    /// Environment variable the relay's configuration names.
    pub env: &'static str,
}

impl SecretFile {
    pub fn mount_dir(&self) -> String {
        format!("{SECRETS_DIR}/{}", self.role)
    }

    /// The file inside the mounted volume.
    pub fn path(&self) -> String {
        format!("{}/{}", self.mount_dir(), self.key)
    }
}

/// Everything later steps need, derived once from the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedPublisher {
    pub name: String,
    pub namespace: String,
    pub generation: Option<i64>,
    pub owner: OwnerReference,
    /// The relay's configuration document, as the relay itself validates it.
    pub relay: RelayConfig,
    /// Secret files mounted into every container of the publisher.
    pub secret_files: Vec<SecretFile>,
    /// The admin API token (mounted, not turned into an environment variable).
    pub admin_token: Option<SecretFile>,
    /// TLS material (CA bundles, client certificates), mounted only: the relay's
    /// configuration names the files.
    pub tls_files: Vec<SecretFile>,
    /// The settings that switch certificate verification off (`broker.kafka.tls.insecureSkipVerify`, …),
    /// for the Warning Event.
    pub insecure_tls: Vec<&'static str>,
    /// Relay replicas to run now: 0 while paused.
    pub replicas: i32,
    pub paused: bool,
    pub resources: Option<ResourceRequirements>,
    /// Destinations the provision step creates besides the single routing destination.
    pub extra_destinations: Vec<String>,
    pub compatibility: CompatibilityMode,
    pub deletion_policy: DeletionPolicy,
    /// `kafka`, `rabbitmq` or `snsSqs`.
    pub broker_kind: &'static str,
}

/// Mounted TLS files of one connection: the CA under role `ca_role`, the client certificate
/// under `client_role`; returns the relay's file settings.
fn tls_files(
    refs: &TlsSecretRefs,
    ca_role: &'static str,
    client_role: &'static str,
    mounted: &mut Vec<SecretFile>,
) -> crate::tls::TlsFiles {
    let mut mount = |role: &'static str, secret: &str, key: &str| {
        let file = SecretFile {
            role,
            secret: secret.to_owned(),
            key: key.to_owned(),
            env: "",
        };
        let path = std::path::PathBuf::from(file.path());
        mounted.push(file);
        path
    };
    let ca_file = refs.ca_secret_ref.as_ref().map(|r| mount(ca_role, &r.name, &r.key));
    let (cert_file, key_file) = match &refs.client_certificate_secret_ref {
        Some(c) => (
            Some(mount(client_role, &c.name, &c.cert_key)),
            Some(mount(client_role, &c.name, &c.key_key)),
        ),
        None => (None, None),
    };
    crate::tls::TlsFiles {
        ca_file,
        cert_file,
        key_file,
        key_password_file: None,
        insecure_skip_verify: refs.insecure_skip_verify,
    }
}

/// Derives the validated publisher from the stored object.
pub fn validate(publisher: &EventPublisher) -> Result<ValidatedPublisher, InvalidSpec> {
    let name = publisher.metadata.name.clone().ok_or(InvalidSpec::Metadata("name"))?;
    let namespace = publisher.namespace().ok_or(InvalidSpec::Metadata("namespace"))?;
    if name.len() > 63 {
        return Err(InvalidSpec::NameTooLong(name));
    }
    let owner = publisher
        .controller_owner_ref(&())
        .ok_or(InvalidSpec::Metadata("uid"))?;
    let spec = &publisher.spec;
    let mut secret_files = vec![SecretFile {
        role: "database",
        secret: spec.outbox.database_url_secret_ref.name.clone(),
        key: spec.outbox.database_url_secret_ref.key.clone(),
        env: "DATABASE_URL",
    }];
    let mut mounted_tls = Vec::new();
    let mut insecure_tls = Vec::new();
    let postgres_tls = spec.outbox.tls.as_ref().map(|refs| {
        if refs.insecure_skip_verify {
            insecure_tls.push("outbox.tls.insecureSkipVerify");
        }
        let files = tls_files(refs, "postgres-ca", "postgres-client", &mut mounted_tls);
        crate::store::PostgresTls {
            ca_file: files.ca_file,
            cert_file: files.cert_file,
            key_file: files.key_file,
            insecure_skip_verify: files.insecure_skip_verify,
            ..crate::store::PostgresTls::default()
        }
    });
    let positive = |v: i64| u64::try_from(v).unwrap_or(0);
    let positive32 = |v: i32| u32::try_from(v).unwrap_or(0);

    let (broker, broker_kind) = if let Some(k) = &spec.broker.kafka {
        let topology = spec
            .topology
            .kafka
            .clone()
            .unwrap_or(crate::crd::event_publisher::KafkaTopologySpec {
                partitions: KafkaConfig::default().partitions,
                replication_factor: None,
                min_insync_replicas: None,
                config_entries: Vec::new(),
            });
        let (username_env, password_env) = match &k.credentials_secret_ref {
            Some(c) => {
                secret_files.push(SecretFile {
                    role: "kafka-sasl",
                    secret: c.name.clone(),
                    key: c.username_key.clone(),
                    env: "KAFKA_SASL_USERNAME",
                });
                secret_files.push(SecretFile {
                    role: "kafka-sasl",
                    secret: c.name.clone(),
                    key: c.password_key.clone(),
                    env: "KAFKA_SASL_PASSWORD",
                });
                (
                    Some("KAFKA_SASL_USERNAME".to_owned()),
                    Some("KAFKA_SASL_PASSWORD".to_owned()),
                )
            }
            None => (None, None),
        };
        let config = KafkaConfig {
            bootstrap_servers: k.bootstrap_servers.clone(),
            client_id: k.client_id.clone(),
            mode: k.mode,
            dead_letter_topic: spec
                .dead_letter
                .destination
                .clone()
                .unwrap_or_else(|| format!("{name}.dlq")),
            partitions: topology.partitions,
            replication_factor: topology.replication_factor,
            min_insync_replicas: topology.min_insync_replicas,
            topic_config: topology
                .config_entries
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect::<BTreeMap<_, _>>(),
            message_timeout_ms: positive32(i32::try_from(k.message_timeout_ms).unwrap_or(i32::MAX)),
            linger_ms: positive32(i32::try_from(k.linger_ms).unwrap_or(0)),
            compression: k.compression,
            security_protocol: k.security_protocol,
            sasl_mechanism: k.sasl_mechanism,
            sasl_username_env: username_env,
            sasl_password_env: password_env,
            tls: k.tls.as_ref().map(|refs| {
                if refs.insecure_skip_verify {
                    insecure_tls.push("broker.kafka.tls.insecureSkipVerify");
                }
                tls_files(refs, "kafka-ca", "kafka-client", &mut mounted_tls)
            }),
            ..KafkaConfig::default()
        };
        (BrokerConfig::Kafka(config), "kafka")
    } else if let Some(r) = &spec.broker.rabbitmq {
        secret_files.push(SecretFile {
            role: "amqp",
            secret: r.url_secret_ref.name.clone(),
            key: r.url_secret_ref.key.clone(),
            env: "AMQP_URL",
        });
        let queues = spec
            .topology
            .rabbitmq
            .as_ref()
            .map(|t| {
                t.queues
                    .iter()
                    .map(|q| QueueBinding {
                        name: q.name.clone(),
                        binding_key: q.binding_key.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let config = RabbitMqConfig {
            dead_letter_exchange: spec.dead_letter.destination.clone(),
            dead_letter_queue: spec.dead_letter.queue.clone(),
            confirm_timeout_ms: positive(r.confirm_timeout_ms),
            connect_timeout_ms: positive(r.connect_timeout_ms),
            mandatory: r.mandatory,
            queues,
            tls: r
                .tls
                .as_ref()
                .map(|refs| tls_files(refs, "amqp-ca", "amqp-client", &mut mounted_tls)),
            ..RabbitMqConfig::new("AMQP_URL", r.exchange.clone())
        };
        (BrokerConfig::Rabbitmq(config), "rabbitmq")
    } else if let Some(s) = &spec.broker.sns_sqs {
        let (key_env, secret_env) = match &s.credentials_secret_ref {
            Some(c) => {
                secret_files.push(SecretFile {
                    role: "aws",
                    secret: c.name.clone(),
                    key: c.access_key_id_key.clone(),
                    env: "AWS_ACCESS_KEY_ID",
                });
                secret_files.push(SecretFile {
                    role: "aws",
                    secret: c.name.clone(),
                    key: c.secret_access_key_key.clone(),
                    env: "AWS_SECRET_ACCESS_KEY",
                });
                (
                    Some("AWS_ACCESS_KEY_ID".to_owned()),
                    Some("AWS_SECRET_ACCESS_KEY".to_owned()),
                )
            }
            None => (None, None),
        };
        let ca_file = s.ca_secret_ref.as_ref().map(|r| {
            let file = SecretFile {
                role: "aws-ca",
                secret: r.name.clone(),
                key: r.key.clone(),
                env: "",
            };
            let path = std::path::PathBuf::from(file.path());
            mounted_tls.push(file);
            path
        });
        let config = SnsSqsConfig {
            endpoint_url: s.endpoint_url.clone(),
            ca_file,
            fifo: s.fifo,
            mode: s.mode,
            dead_letter_queue: spec.dead_letter.destination.clone(),
            max_receive_count: spec
                .topology
                .sns_sqs
                .as_ref()
                .map_or(5, |t| positive32(t.max_receive_count)),
            access_key_id_env: key_env,
            secret_access_key_env: secret_env,
            ..SnsSqsConfig::new(s.region.clone(), s.target)
        };
        (BrokerConfig::SnsSqs(config), "snsSqs")
    } else {
        return Err(InvalidSpec::RelayConfig(
            "broker must set exactly one of kafka, rabbitmq or snsSqs".into(),
        ));
    };

    let routing = match spec.routing.strategy {
        RoutingStrategy::Single => Routing::Single {
            destination: spec.routing.destination.clone().unwrap_or_default(),
        },
        RoutingStrategy::PerAggregateType => Routing::PerAggregateType {
            template: spec.routing.template.clone().unwrap_or_default(),
        },
        RoutingStrategy::PerEventType => Routing::PerEventType {
            template: spec.routing.template.clone().unwrap_or_default(),
        },
    };
    let admin_token = spec.admin_token_secret_ref.as_ref().map(|r| SecretFile {
        role: "admin",
        secret: r.name.clone(),
        key: r.key.clone(),
        env: "",
    });
    let relay = RelayConfig {
        publisher: name.clone(),
        outbox: OutboxConfig {
            database_url_env: "DATABASE_URL".into(),
            schema: spec.outbox.schema.clone(),
            min_poll_interval_ms: positive(spec.outbox.min_poll_interval_ms),
            max_poll_interval_ms: positive(spec.outbox.max_poll_interval_ms),
            batch_size: usize::try_from(spec.outbox.batch_size).unwrap_or(0),
            max_connections: positive32(spec.outbox.max_connections),
            // The provision init container migrates before the relays start.
            migrate: false,
            read_ahead: true,
            wake_up: spec.outbox.wake_up,
            tls: postgres_tls,
        },
        broker,
        routing,
        retry: RetryPolicy {
            initial_interval_ms: positive(spec.retry.initial_interval_ms),
            multiplier: spec.retry.multiplier,
            max_interval_ms: positive(spec.retry.max_interval_ms),
            max_attempts: positive32(spec.retry.max_attempts),
            jitter: spec.retry.jitter,
        },
        dead_letter: DeadLetterConfig {
            block_aggregate: spec.dead_letter.block_aggregate,
        },
        circuit_breaker: CircuitBreakerConfig {
            failure_threshold: positive32(spec.circuit_breaker.failure_threshold),
            failure_rate_threshold: spec.circuit_breaker.failure_rate_threshold,
            minimum_calls: positive32(spec.circuit_breaker.minimum_calls),
            window_ms: positive(spec.circuit_breaker.window_ms),
            open_duration_ms: positive(spec.circuit_breaker.open_duration_ms),
            half_open_probes: positive32(spec.circuit_breaker.half_open_probes),
        },
        workers: WorkersConfig {
            heartbeat_interval_ms: positive(spec.leases.heartbeat_interval_ms),
            lease_duration_ms: positive(spec.leases.duration_ms),
        },
        health: Default::default(),
        http: HttpConfig {
            // Overridden per Pod with its Pod IP (RELAY_HTTP_LISTEN).
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], HTTP_PORT))),
            admin_token_file: admin_token.as_ref().map(|t| t.path().into()),
        },
    };
    // The relay's own rules: what the relay would refuse at start is refused here, on the object.
    validate_relay_config(&relay)?;
    Ok(ValidatedPublisher {
        name,
        namespace,
        generation: publisher.metadata.generation,
        owner,
        relay,
        secret_files,
        admin_token,
        tls_files: mounted_tls,
        insecure_tls,
        replicas: if spec.paused { 0 } else { spec.replicas },
        paused: spec.paused,
        resources: spec.resources.clone(),
        extra_destinations: spec.topology.destinations.clone(),
        compatibility: spec.schema.compatibility,
        deletion_policy: spec.deletion_policy,
        broker_kind,
    })
}

/// The relay's checks that need no environment (the credentials' variables are set only in
/// the Pods, from the mounted Secrets).
fn validate_relay_config(relay: &RelayConfig) -> Result<(), InvalidSpec> {
    let mut probe = relay.clone();
    // Env-dependent parts are checked in the Pod; the shape is checked here.
    if let BrokerConfig::Kafka(k) = &mut probe.broker {
        k.sasl_username_env = None;
        k.sasl_password_env = None;
        if k.security_protocol.uses_sasl() {
            k.security_protocol = crate::broker::kafka::KafkaSecurityProtocol::Plaintext;
            k.sasl_mechanism = None;
        }
    }
    if let BrokerConfig::SnsSqs(s) = &mut probe.broker {
        s.access_key_id_env = None;
        s.secret_access_key_env = None;
    }
    probe.validate().map_err(|e| InvalidSpec::RelayConfig(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stored Kafka EventPublisher (uid and generation set, as the API server returns it).
    pub fn kafka_publisher() -> EventPublisher {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "outbox.inventory.io/v1alpha1",
            "kind": "EventPublisher",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "0b3f3c5e-0000-4000-8000-000000000001", "generation": 3},
            "spec": {
                "outbox": {"databaseUrlSecretRef": {"name": "orders-db", "key": "url"}, "batchSize": 250},
                "broker": {"kafka": {"bootstrapServers": "kafka:9092"}},
                "routing": {"strategy": "single", "destination": "inventory.events"},
                "topology": {"kafka": {"partitions": 12, "replicationFactor": 1, "configEntries": [{"name": "retention.ms", "value": "86400000"}]}},
                "replicas": 2
            }
        }))
        .expect("EventPublisher fixture")
    }

    #[test]
    fn a_kafka_spec_becomes_the_relays_own_config_with_secrets_by_file() {
        let v = validate(&kafka_publisher()).expect("valid");
        assert_eq!(v.relay.publisher, "orders");
        assert_eq!(v.relay.outbox.batch_size, 250);
        assert!(!v.relay.outbox.migrate, "the init container migrates");
        let BrokerConfig::Kafka(k) = &v.relay.broker else {
            panic!("kafka broker expected: {:?}", v.relay.broker)
        };
        assert_eq!(k.partitions, 12);
        assert_eq!(k.dead_letter_topic, "orders.dlq");
        assert_eq!(k.topic_config.get("retention.ms").map(String::as_str), Some("86400000"));
        assert_eq!(v.secret_files.len(), 1);
        assert_eq!(
            v.secret_files[0].path(),
            "/var/run/secrets/inventory-outbox/database/url"
        );
        assert_eq!(v.replicas, 2);
        assert_eq!(v.owner.kind, "EventPublisher");
        assert_eq!(v.owner.controller, Some(true));
        assert_eq!(
            v.relay.workers,
            WorkersConfig::default(),
            "the relay's own lease defaults"
        );
    }

    #[test]
    fn the_lease_settings_reach_the_relay_config() {
        let mut p = kafka_publisher();
        p.spec.leases.duration_ms = 10_000;
        p.spec.leases.heartbeat_interval_ms = 1_000;
        let v = validate(&p).expect("valid");
        assert_eq!(v.relay.workers.lease_duration_ms, 10_000);
        assert_eq!(v.relay.workers.heartbeat_interval_ms, 1_000);
    }

    #[test]
    fn the_wake_up_mode_reaches_the_relay_config_and_defaults_to_notify() {
        let v = validate(&kafka_publisher()).expect("valid");
        assert_eq!(v.relay.outbox.wake_up, crate::delivery::WakeUp::Notify);
        let mut p = kafka_publisher();
        p.spec.outbox.wake_up = crate::delivery::WakeUp::Poll;
        let v = validate(&p).expect("valid");
        assert_eq!(v.relay.outbox.wake_up, crate::delivery::WakeUp::Poll);
    }

    #[test]
    fn tls_secrets_are_mounted_and_named_in_the_config_only_by_path() {
        let mut p = kafka_publisher();
        let refs: TlsSecretRefs = serde_json::from_value(serde_json::json!({
            "caSecretRef": {"name": "kafka-ca", "key": "ca.crt"},
            "clientCertificateSecretRef": {"name": "orders-kafka-client"},
        }))
        .expect("tls refs");
        let k = p.spec.broker.kafka.as_mut().expect("kafka");
        k.security_protocol = crate::broker::kafka::KafkaSecurityProtocol::Ssl;
        k.tls = Some(refs.clone());
        p.spec.outbox.tls = Some(TlsSecretRefs {
            client_certificate_secret_ref: None,
            ..refs
        });
        let v = validate(&p).expect("valid");
        let paths: Vec<String> = v.tls_files.iter().map(SecretFile::path).collect();
        assert_eq!(
            paths,
            vec![
                "/var/run/secrets/inventory-outbox/postgres-ca/ca.crt",
                "/var/run/secrets/inventory-outbox/kafka-ca/ca.crt",
                "/var/run/secrets/inventory-outbox/kafka-client/tls.crt",
                "/var/run/secrets/inventory-outbox/kafka-client/tls.key",
            ]
        );
        assert!(
            v.tls_files.iter().all(|f| f.env.is_empty()),
            "mounted, not put in the environment"
        );
        let BrokerConfig::Kafka(kafka) = &v.relay.broker else {
            panic!("kafka expected")
        };
        let tls = kafka.tls.as_ref().expect("kafka tls");
        assert_eq!(tls.key_file.as_deref(), Some(std::path::Path::new(&paths[3])));
        assert_eq!(
            v.relay.outbox.tls.as_ref().and_then(|t| t.ca_file.clone()),
            Some(paths[0].clone().into())
        );
        assert!(v.insecure_tls.is_empty());
        let (volumes, _) = super::super::build::secret_volumes(&v);
        let names: Vec<&str> = volumes.iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(
            names.contains(&"secret-kafka-client") && names.contains(&"secret-postgres-ca"),
            "{names:?}"
        );

        let k = p.spec.broker.kafka.as_mut().expect("kafka");
        k.tls = Some(TlsSecretRefs {
            insecure_skip_verify: true,
            ..TlsSecretRefs::default()
        });
        let v = validate(&p).expect("valid, with a warning");
        assert_eq!(v.insecure_tls, vec!["broker.kafka.tls.insecureSkipVerify"]);
    }

    #[test]
    fn an_sns_sqs_ca_bundle_is_mounted_and_named_in_the_config_by_path() {
        let mut p = kafka_publisher();
        p.spec.broker.kafka = None;
        p.spec.topology.kafka = None;
        p.spec.broker.sns_sqs = Some(
            serde_json::from_value(serde_json::json!({
                "region": "eu-west-1", "endpointUrl": "https://sqs.internal.example:8443", "target": "sqs",
                "caSecretRef": {"name": "internal-ca", "key": "ca.crt"},
            }))
            .expect("snsSqs spec"),
        );
        let v = validate(&p).expect("valid");
        let paths: Vec<String> = v.tls_files.iter().map(SecretFile::path).collect();
        assert_eq!(paths, vec!["/var/run/secrets/inventory-outbox/aws-ca/ca.crt"]);
        let BrokerConfig::SnsSqs(s) = &v.relay.broker else {
            panic!("snsSqs expected: {:?}", v.relay.broker)
        };
        assert_eq!(s.ca_file, Some(paths[0].clone().into()));
    }

    #[test]
    fn paused_runs_no_relays_and_a_long_name_is_refused() {
        let mut p = kafka_publisher();
        p.spec.paused = true;
        assert_eq!(validate(&p).expect("valid").replicas, 0);
        p.metadata.name = Some("x".repeat(64));
        assert!(matches!(validate(&p), Err(InvalidSpec::NameTooLong(_))));
    }

    #[test]
    fn sasl_credentials_are_mounted_and_named_in_the_config_only_by_variable() {
        let mut p = kafka_publisher();
        let k = p.spec.broker.kafka.as_mut().expect("kafka");
        k.security_protocol = crate::broker::kafka::KafkaSecurityProtocol::SaslSsl;
        k.sasl_mechanism = Some(crate::broker::kafka::KafkaSaslMechanism::ScramSha512);
        k.credentials_secret_ref = Some(crate::crd::common::UsernamePasswordRef {
            name: "kafka-user".into(),
            username_key: "username".into(),
            password_key: "password".into(),
        });
        let v = validate(&p).expect("valid");
        let envs: Vec<&str> = v.secret_files.iter().map(|f| f.env).collect();
        assert_eq!(envs, vec!["DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]);
        let document = serde_json::to_string(&v.relay).expect("serialize");
        assert!(
            document.contains("KAFKA_SASL_PASSWORD") && !document.contains("kafka-user"),
            "{document}"
        );
    }
}
