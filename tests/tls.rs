//! TLS to RabbitMQ (amqps with a client certificate), MariaDB (verified
//! identity) and MongoDB (with a client certificate), each through a TLS
//! proxy the test starts in front of the local server, with certificates
//! it generates. Paths in the config are relative to the config folder.

mod common;

use beds::client::Client;
use beds::config::{Config, Env};
use beds::ipl::Node;
use common::tls_proxy::{make_pki, Mode, TlsProxy};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_talks_tls_to_rabbitmq_mariadb_and_mongodb() {
    let scratch = common::Debris::new("tls");
    let (prefix, dir) = (scratch.prefix.clone(), scratch.dir.clone());
    let cfg = dir.join("config");
    let pki = make_pki(&cfg.join("tls"));
    let amqp = TlsProxy::start(&pki, "127.0.0.1:5672", Mode::Plain, true).await;
    let maria = TlsProxy::start(&pki, "127.0.0.1:3306", Mode::Mysql, false).await;
    let mongo_up = format!("127.0.0.1:{}", common::mongo_port());
    let mongo = TlsProxy::start(&pki, &mongo_up, Mode::Plain, true).await;
    common::write_config(
        &dir,
        &prefix,
        &prefix,
        &common::Opts {
            db_port: maria.port,
            mongo_port: mongo.port,
            ..Default::default()
        },
    );
    common::create_db(&prefix);
    let text = std::fs::read_to_string(cfg.join("beds.toml")).unwrap();
    let text = text.replacen("[amqp]\n", &format!("[amqp]\nport = {}\n", amqp.port), 1);
    let tls = r#"
[amqp.tls]
enabled = true
ca_file = "tls/ca.pem"
cert_file = "tls/client.pem"
key_file = "tls/client.key"

[databases.primary.tls]
enabled = true
ca_file = "tls/ca.pem"

[databases.docs.tls]
enabled = true
ca_file = "tls/ca.pem"
cert_file = "tls/client-combined.pem"
key_file = "tls/client-combined.pem"
"#;
    std::fs::write(cfg.join("beds.toml"), format!("{text}\n{tls}")).unwrap();
    for f in ["ca.pem", "client.pem", "client.key", "client-combined.pem"] {
        assert!(cfg.join("tls").join(f).is_file(), "the PKI wrote {f}");
    }
    let config = Config::load(&cfg, Env::Dev).unwrap();
    let node = Node::start(&config, &cfg)
        .await
        .expect("node starts over TLS");
    assert!(amqp.handshakes() >= 1, "RabbitMQ was reached through TLS");
    assert!(maria.handshakes() >= 1, "MariaDB was reached through TLS");
    assert!(mongo.handshakes() >= 1, "MongoDB was reached through TLS");

    // Requests flow end to end (the client itself talks plain AMQP).
    let client = Client::connect(common::AMQP_URL, &prefix).await.unwrap();
    let call = |broker: &'static str, payload: serde_json::Value| {
        let client = &client;
        async move {
            client
                .call(broker, &payload, &Default::default())
                .await
                .unwrap()
        }
    };
    let r = call(
        "rBroker",
        json!({"template": "tst", "op": "echo", "data": {"i": 7}}),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    let r = call(
        "wBroker",
        json!({"template": "note", "op": "create", "data": {"user_id": 1, "title": "over TLS"}}),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    node.stop().await;

    // Without TLS the proxies refuse the node: there is no silent
    // plaintext fallback, and IPL says which service.
    let plain = format!("{text}\n");
    std::fs::write(cfg.join("beds.toml"), plain).unwrap();
    let config = Config::load(&cfg, Env::Dev).unwrap();
    let before = amqp.failed_handshakes();
    match Node::start(&config, &cfg).await {
        Err(e) => {
            assert_eq!(e.exit_code(), 69, "{e}");
            assert!(e.to_string().contains("RabbitMQ"), "{e}");
        }
        Ok(n) => {
            n.stop().await;
            panic!("a plaintext node must not get through a TLS port");
        }
    }
    common::eventually(5, "the proxy saw the plaintext attempt", || async {
        amqp.failed_handshakes() > before
    })
    .await;
}
