//! The admin server: who may read `/metrics`, and what it does with clients that misbehave.

use sse_relay::emulator::Upstream;
use sse_relay::sink::Sink;

use crate::support::{TestRelay, both_streams, everything_to, quiet_upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_of_the_admin_token_is_case_insensitive() {
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = both_streams(&upstream, "", &everything_to(&sink, "")).replace(
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", token: \"${ADMIN_TOKEN}\" }",
    );
    let relay = TestRelay::start_with_env(&yaml, &[("ADMIN_TOKEN", "admin-0009")]).await;
    let client = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", relay.admin);
    for (authorization, expected_status) in [
        ("Bearer admin-0009", 200),
        ("bearer admin-0009", 200),
        ("BEARER admin-0009", 200),
        ("Bearer  admin-0009", 200),
        ("Basic admin-0009", 401),
        ("bearer admin-0010", 401),
    ] {
        let response = client
            .get(&metrics_url)
            .header("authorization", authorization)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected_status, "Authorization: {authorization}");
    }
    relay.stop().await;
}
