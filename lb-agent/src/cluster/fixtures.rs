//! Objects the pure modules' unit tests build.

use k8s_openapi::{
    api::core::v1::{Node, NodeCondition, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::crd::{LoadBalancerConfig, LoadBalancerConfigSpec};

/// Node `name` with `labels`, Ready or not.
pub fn node(name: &str, labels: &[(&str, &str)], ready: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Config `name` handing out `addresses`, everything else at its default.
pub fn config(name: &str, addresses: &str) -> LoadBalancerConfig {
    let spec: LoadBalancerConfigSpec =
        serde_json::from_value(serde_json::json!({ "addresses": [addresses] })).unwrap_or_else(|e| panic!("{e}"));
    LoadBalancerConfig::new(name, spec)
}
