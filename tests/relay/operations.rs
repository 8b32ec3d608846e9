//! The operator's files: the Grafana dashboard and the Prometheus alert rules use only metrics
//! the relay exports and the README documents. (`promtool check rules` and `promtool test
//! rules` run in CI, from `.ci/run`.)

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every `sse_relay_…` name in `text`, a histogram's series named by their histogram.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("sse_relay_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .map_or(name.clone(), str::to_owned);
        names.insert(name);
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_relay_exports_and_documents() {
    // The names the relay registers are string literals in telemetry.rs.
    let registered: BTreeSet<String> = metric_names(&read("src/telemetry.rs"))
        .into_iter()
        .filter(|name| read("src/telemetry.rs").contains(&format!("\"{name}\"")))
        .collect();
    let readme = read("README.md");
    let documented: BTreeSet<String> = readme
        .lines()
        .filter(|line| line.starts_with("| `sse_relay_"))
        .flat_map(metric_names)
        .collect();
    let dashboard = read("deploy/grafana/sse-relay.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let alerts = read("deploy/prometheus/alerts.yaml");
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 7, "{file} uses {used:?}");
        let unknown: Vec<&String> = used.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the relay does not export: {unknown:?}"
        );
        let undocumented: Vec<&String> = used.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "{file} uses metrics the README's table does not document: {undocumented:?}"
        );
    }
    // And the README documents every metric the relay exports.
    let missing: Vec<&String> = registered.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "exported but not in the README's table: {missing:?}"
    );
}

#[test]
fn a_misspelt_metric_would_be_caught() {
    let names = metric_names("rate(sse_relay_delivery_duration_seconds_bucket[5m]) + sse_relay_queue_dept");
    assert_eq!(
        names,
        BTreeSet::from([
            "sse_relay_delivery_duration_seconds".to_owned(),
            "sse_relay_queue_dept".to_owned()
        ])
    );
}
