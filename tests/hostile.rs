//! Hostile AMQP input that no ordinary client library will produce, sent
//! with a raw AMQP 0-9-1 publisher against the real `beds` binary: the node
//! must answer (or park) and keep serving, never crash or stall.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use beds::client::{CallOptions, Client};
use common::consume_n;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend(channel.to_be_bytes());
    f.extend((payload.len() as u32).to_be_bytes());
    f.extend(payload);
    f.push(0xCE);
    f
}

fn short(b: &[u8]) -> Vec<u8> {
    let mut v = vec![b.len() as u8];
    v.extend(b);
    v
}

fn long(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend(b);
    v
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut v = class.to_be_bytes().to_vec();
    v.extend(id.to_be_bytes());
    v.extend(args);
    v
}

/// Reads frames until method `class.id` arrives; returns its arguments.
fn expect(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut body = vec![0u8; size + 1];
        s.read_exact(&mut body).unwrap();
        if head[0] != 1 {
            continue;
        }
        let (c, m) = (
            u16::from_be_bytes([body[0], body[1]]),
            u16::from_be_bytes([body[2], body[3]]),
        );
        assert_eq!(
            (c, m),
            (class, id),
            "unexpected method: {:?}",
            &body[4..body.len().min(200)]
        );
        return body[4..size].to_vec();
    }
}

/// Publishes one message with raw properties; waits for the confirm.
/// `props` is (property flags, encoded property list).
fn raw_publish(exchange: &str, key: &str, props: (u16, Vec<u8>), body: &[u8]) {
    let mut s = TcpStream::connect("127.0.0.1:5672").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect(&mut s, 10, 10);
    let mut start_ok = 0u32.to_be_bytes().to_vec();
    start_ok.extend(short(b"PLAIN"));
    start_ok.extend(long(b"\0guest\0guest"));
    start_ok.extend(short(b"en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &start_ok)))
        .unwrap();
    let tune = expect(&mut s, 10, 30);
    let mut tune_ok = tune[..6].to_vec();
    tune_ok.extend(0u16.to_be_bytes());
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .unwrap();
    let mut open = short(b"/");
    open.extend(short(b""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open))).unwrap();
    expect(&mut s, 10, 41);
    s.write_all(&frame(1, 1, &method(20, 10, &short(b""))))
        .unwrap();
    expect(&mut s, 20, 11);
    s.write_all(&frame(1, 1, &method(85, 10, &[0]))).unwrap();
    expect(&mut s, 85, 11);
    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(short(exchange.as_bytes()));
    publish.extend(short(key.as_bytes()));
    publish.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &publish)))
        .unwrap();
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend(0u16.to_be_bytes());
    header.extend((body.len() as u64).to_be_bytes());
    header.extend(props.0.to_be_bytes());
    header.extend(props.1);
    s.write_all(&frame(2, 1, &header)).unwrap();
    s.write_all(&frame(3, 1, body)).unwrap();
    expect(&mut s, 60, 80); // basic.ack: RabbitMQ took it
}

const CONTENT_TYPE: u16 = 1 << 15;
const HEADERS: u16 = 1 << 13;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const MESSAGE_ID: u16 = 1 << 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_amqp_properties_neither_crash_nor_stall_the_node() {
    // The binary must protect itself without help from the environment.
    let (mut child, _debris, prefix, log) =
        common::spawn_node("hostile", &[("RUST_MIN_STACK", None)]).await;
    let client = Client::connect(common::AMQP_URL, &prefix).await.unwrap();
    let list = json!({"template": "usr", "op": "list"});
    let opts = CallOptions {
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let ready = client.call("rBroker", &list, &opts).await.expect("node up");
    assert!(ready.is_ok());

    // Replies to the raw requests land in a queue of the test's own.
    let replies = common::reply_queue(&prefix).await;

    let body = br#"{"template":"usr","op":"list"}"#.to_vec();
    // 1. A header table nested 15,000 deep (about 90 KB, within one frame).
    let mut table = 0u32.to_be_bytes().to_vec();
    for _ in 0..15_000 {
        let mut entry = short(b"d");
        entry.push(b'F');
        entry.extend(&table);
        table = long(&entry);
    }
    let mut p = short(b"application/json");
    p.extend(&table);
    p.extend(short(b"deep"));
    p.extend(short(replies.as_bytes()));
    let (ex, rb) = (prefix.clone(), "rBroker");
    let props = (CONTENT_TYPE | HEADERS | CORRELATION_ID | REPLY_TO, p);
    let b = body.clone();
    tokio::task::spawn_blocking(move || {
        // Building the frame recurses too: give this thread a deep stack.
        std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(move || raw_publish(&ex, rb, props, &b))
            .unwrap()
            .join()
            .unwrap()
    })
    .await
    .unwrap();

    // 2. A message_id that is not UTF-8.
    let mut p = short(b"application/json");
    p.extend(short(b"bad"));
    p.extend(short(replies.as_bytes()));
    p.extend(short(b"id-\xff\xfe-\xc3"));
    let props = (CONTENT_TYPE | CORRELATION_ID | REPLY_TO | MESSAGE_ID, p);
    let (ex, b) = (prefix.clone(), body.clone());
    tokio::task::spawn_blocking(move || raw_publish(&ex, "rBroker", props, &b))
        .await
        .unwrap();

    let got = consume_n(&replies, 2, 20).await;
    let mut cids: Vec<String> = got
        .iter()
        .map(|d| d.properties.correlation_id().as_ref().unwrap().to_string())
        .collect();
    cids.sort();
    assert_eq!(cids, ["bad", "deep"], "both hostile requests were answered");
    for d in &got {
        let r: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(r["status"], "ok", "{r}");
    }
    let status = || {
        let q = std::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let mine: Vec<&str> = q.lines().filter(|l| l.starts_with(&prefix)).collect();
        format!(
            "queues:\n{}\nnode log:\n{}",
            mine.join("\n"),
            log.lock().unwrap()
        )
    };
    assert!(
        child.try_wait().unwrap().is_none(),
        "the node is still running\n{}",
        status()
    );
    let after = client.call("rBroker", &list, &opts).await;
    assert!(
        after.as_ref().is_ok_and(|r| r.is_ok()),
        "still serving: {after:?}\n{}",
        status()
    );
    let queue = format!("{prefix}.rBroker");
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let c = common::amqp().await;
            let ch = c.create_channel().await.unwrap();
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let q = ch
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap();
            let _ = c.close(200, "".into()).await;
            if q.message_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "work queue not drained\n{}", status());

    client.close().await;
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_address_that_breaks_the_connection_is_quarantined() {
    let env = common::TestEnv::start(common::Opts::default()).await;
    // A forged direct reply-to name: RabbitMQ 3.10 closes the publishing
    // connection when BEDS replies to it. Whatever the RabbitMQ version, the
    // node must end up serving, with the request parked or answered.
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to("amq.rabbitmq.reply-to.g1h2AA==.abc".into())
        .with_correlation_id("forged".into());
    env.client()
        .send("rBroker", br#"{"template":"usr","op":"list"}"#, props)
        .await
        .unwrap();
    let queue = env.queue("rBroker");
    let list = json!({"template": "usr", "op": "list"});
    let quick = CallOptions {
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let settled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if env.queue_len(&queue).await == 0 {
                let probe = env.client().call("rBroker", &list, &quick).await;
                if probe.is_ok_and(|r| r.is_ok()) {
                    return;
                }
            }
        }
    })
    .await;
    assert!(settled.is_ok(), "the node serves again");
    // RabbitMQ (3.10 on these machines) closes the connection on every
    // reply to the forged name, so the request can only end quarantined:
    // exactly one bare copy, saying why. A RabbitMQ that answers otherwise
    // makes this fail, for someone to look at, rather than pass unseen.
    let parked = env.drain_queue(&env.dlq("rBroker")).await;
    assert_eq!(parked.len(), 1, "the request is quarantined, once");
    let why = parked[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-beds-error-message").cloned());
    assert!(
        matches!(&why, Some(lapin::types::AMQPValue::LongString(s))
            if String::from_utf8_lossy(s.as_bytes()).contains("failed repeatedly")),
        "{why:?}"
    );
    assert_eq!(
        parked[0].delivery.data,
        br#"{"template":"usr","op":"list"}"#
    );
    env.finish().await;
}
