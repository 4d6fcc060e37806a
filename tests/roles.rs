//! The roles of one installation as separate `beds` processes on one
//! prefix (the shipped config): segundo serves the warehouse and cool
//! storage, tercero accounts and sessions, appServer the rest; each answers
//! another role's template with WRONG_BROKER naming the right broker, and
//! opens only the databases its templates use.

mod common;

use beds::broker::reply::Reply;
use beds::client::{CallOptions, Client};
use common::cluster::Cluster;
use serde_json::{json, Value};

async fn call(c: &Client, broker: &str, body: Value) -> Reply {
    let opts = CallOptions {
        timeout: std::time::Duration::from_secs(15),
        ..Default::default()
    };
    c.call(broker, &body, &opts).await.unwrap()
}

fn rows(r: &Reply) -> Vec<Value> {
    assert!(r.is_ok(), "expected ok, got {r:?}");
    let data = r.data.clone().unwrap_or_default();
    data.into_iter()
        .map(|row| serde_json::to_value(row).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_serves_its_own_domains_and_points_at_the_others() {
    let cluster = Cluster::new("roles");
    // segundo opens the warehouse; appServer and tercero never do: theirs
    // points at a closed port and they still start.
    let nowhere = [("BEDS__DATABASES__WAREHOUSE__PORT", "1")];
    let _seg = cluster.node("segundo", "seg-1", &[]).await;
    let _ter = cluster.node("tercero", "ter-1", &nowhere).await;
    let _app = cluster.node("appServer", "app-1", &nowhere).await;
    let c = Client::connect(common::AMQP_URL, cluster.prefix())
        .await
        .unwrap();

    // segundo: a bulk load, loaded twice (replaced, not doubled), a report.
    let load = json!({"template": "wh_sales", "op": "load", "data": {"rows": [
        {"sale_id": 1, "day": "2026-01-02", "region": "north", "product": "tea", "qty": 3, "amount": 7.5},
        {"sale_id": 2, "day": "2026-06-02", "region": "south", "product": "tea", "qty": 1, "amount": 2.5},
        {"sale_id": 3, "day": "2026-06-03", "region": "north", "product": "cup", "qty": 2, "amount": 10}
    ]}});
    assert_eq!(
        rows(&call(&c, "whBroker", load.clone()).await)[0]["loaded"],
        3
    );
    assert_eq!(rows(&call(&c, "whBroker", load).await)[0]["loaded"], 3);
    let report = call(
        &c,
        "whBroker",
        json!({"template": "wh_sales", "op": "by_region", "data": {"from": "2026-01-01T00:00:00Z", "to": "2026-12-31T00:00:00Z"}}),
    )
    .await;
    assert_eq!(
        rows(&report),
        vec![
            json!({"region": "north", "qty": 5, "amount": "17.50", "sales": 2}),
            json!({"region": "south", "qty": 1, "amount": "2.50", "sales": 1}),
        ]
    );
    // Cool storage: the move is a request on cBroker, and repeating it
    // moves nothing more.
    let mv =
        json!({"template": "wh_cool", "op": "move", "data": {"before": "2026-06-01T00:00:00Z"}});
    assert_eq!(rows(&call(&c, "cBroker", mv.clone()).await)[0]["moved"], 1);
    assert_eq!(rows(&call(&c, "cBroker", mv).await)[0]["moved"], 0);
    let stats = call(&c, "cBroker", json!({"template": "wh_cool", "op": "stats"})).await;
    assert_eq!(
        rows(&stats)[0],
        json!({"hot": 2, "cool": 1, "oldest_hot": "2026-06-02"})
    );

    // tercero: an account, and a session that expires.
    let acct = call(
        &c,
        "uBroker",
        json!({"template": "account", "op": "create", "data": {"username": "ada", "email": "ada@example.org"}}),
    )
    .await;
    let id = rows(&acct)[0]["id"].as_i64().unwrap();
    let again = call(
        &c,
        "uBroker",
        json!({"template": "account", "op": "create", "data": {"username": "ada", "email": "other@example.org"}}),
    )
    .await;
    assert_eq!(again.code(), Some("CONFLICT"));
    let off = call(
        &c,
        "uBroker",
        json!({"template": "account", "op": "disable", "data": {"id": id}}),
    )
    .await;
    assert_eq!(rows(&off)[0]["status"], "disabled");

    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let past = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let open = |token: &str, expires: &str| json!({"template": "session", "op": "open", "data": {"account_id": id, "token": token, "expires": expires, "data": {"lang": "en"}}});
    assert!(call(&c, "sBroker", open("t-live", &later)).await.is_ok());
    assert!(call(&c, "sBroker", open("t-gone", &past)).await.is_ok());
    let get = |token: &str| json!({"template": "session", "op": "get", "data": {"token": token}});
    let live = call(&c, "sBroker", get("t-live")).await;
    assert_eq!(rows(&live)[0]["data"], json!({"lang": "en"}));
    // Expired: never returned, even before the TTL monitor removes it.
    assert_eq!(
        call(&c, "sBroker", get("t-gone")).await.code(),
        Some("NOT_FOUND")
    );
    let close = json!({"template": "session", "op": "close", "data": {"token": "t-live"}});
    assert_eq!(call(&c, "sBroker", close).await.affected, Some(1));
    assert_eq!(
        call(&c, "sBroker", get("t-live")).await.code(),
        Some("NOT_FOUND")
    );

    // Another role's template: WRONG_BROKER naming who serves it.
    let usr_on_wh = call(
        &c,
        "whBroker",
        json!({"template": "usr", "op": "read", "data": {"id": 1}}),
    )
    .await;
    assert_eq!(usr_on_wh.code(), Some("WRONG_BROKER"));
    assert_eq!(
        usr_on_wh.error.as_ref().unwrap().message,
        "template \"usr\" is served by mBroker, rBroker, wBroker, not by broker whBroker"
    );
    let wh_on_r = call(&c, "rBroker", json!({"template": "wh_cool", "op": "stats"})).await;
    assert_eq!(wh_on_r.code(), Some("WRONG_BROKER"));
    assert!(wh_on_r
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("served by cBroker"));
    let cool_on_wh = call(
        &c,
        "whBroker",
        json!({"template": "wh_cool", "op": "stats"}),
    )
    .await;
    assert_eq!(cool_on_wh.code(), Some("WRONG_BROKER"));
    // appServer still serves its own.
    let usr = call(&c, "wBroker", json!({"template": "usr", "op": "create", "data": {"name": "Ada", "email": "ada@example.org"}})).await;
    assert!(usr.is_ok(), "{usr:?}");
    c.close().await;
}
