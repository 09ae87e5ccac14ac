//! The static configuration file (`lb-agent run --config FILE`): services without
//! Kubernetes.
//!
//! ```yaml
//! services:
//!   - name: web          # unique
//!     vip: 192.0.2.10
//!     port: 80
//!     protocol: TCP      # TCP | UDP
//!     backends: ["10.0.1.2:8080", "10.0.1.3:8080"]
//! ```

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::model::{BackendSpec, Protocol, ServiceId, ServiceSpec};

/// Why a configuration file was refused. Every message names the place (line, service,
/// field) so the user can fix it; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML or does not have the expected shape.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has a value the data path cannot serve.
    #[error("{path}: line {line}: services[{index}] ({name}): {field}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Line of the offending service entry.
        line: usize,
        /// Index of the service in `services`.
        index: usize,
        /// Name of the service.
        name: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    #[serde(default)]
    backends: Vec<SocketAddrV4>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Vec<ServiceSpec>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses YAML, naming the field path (`services[0].vip`) and the position of any error.
fn deserialize(text: &str, origin: &str) -> Result<RawFile, ConfigError> {
    let mut at = String::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            // `Spanned` adds a `value` level that means nothing to the user.
            at = e.path().to_string().replace(".value", "");
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let message = if at.is_empty() || at == "." { e.to_string() } else { format!("{at}: {e}") };
        ConfigError::Syntax { path: origin.to_string(), message }
    })
}

/// Parses and validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Vec<ServiceSpec>, ConfigError> {
    let raw = if text.trim().is_empty() { RawFile { services: Vec::new() } } else { deserialize(text, origin)? };
    let mut names = HashMap::new();
    let mut keys = HashMap::new();
    let mut services = Vec::with_capacity(raw.services.len());
    for (index, spanned) in raw.services.into_iter().enumerate() {
        let line = spanned.defined.line() as usize;
        let s = spanned.value;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            line,
            index,
            name: s.name.clone(),
            field,
            message,
        };
        if s.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if let Some(first) = names.insert(s.name.clone(), index) {
            return Err(invalid("name", format!("duplicate: services[{first}] has the same name")));
        }
        if !usable_unicast(s.vip) {
            return Err(invalid("vip", format!("{} is not a usable unicast address", s.vip)));
        }
        if s.port == 0 {
            return Err(invalid("port", "must be 1-65535".into()));
        }
        if let Some(first) = keys.insert((s.vip, s.port, s.protocol), index) {
            return Err(invalid(
                "port",
                format!("{}:{}/{} is already served by services[{first}]", s.vip, s.port, s.protocol),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &s.backends {
            if !usable_unicast(*b.ip()) || b.port() == 0 {
                return Err(invalid("backends", format!("{b} is not a usable address and port")));
            }
            if !seen.insert(*b) {
                return Err(invalid("backends", format!("{b} is listed twice")));
            }
        }
        services.push(ServiceSpec {
            id: ServiceId::Static(s.name),
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            backends: s.backends.into_iter().map(BackendSpec::active).collect(),
            interface: None,
        });
    }
    Ok(services)
}

/// An address the data path can use as a VIP or a backend.
fn usable_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
services:
  - name: web          # unique
    vip: 192.0.2.10
    port: 80
    protocol: TCP
    backends: [\"10.0.1.2:8080\", \"10.0.1.3:8080\"]
  - name: dns
    vip: 192.0.2.10
    port: 53
    protocol: UDP
    backends:
      - 10.0.1.2:5353
";

    #[test]
    fn parses_the_documented_format() {
        let s = parse(GOOD, "t.yaml").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].id, ServiceId::Static("web".into()));
        assert_eq!(s[0].backends[1].addr, "10.0.1.3:8080".parse().unwrap());
        assert_eq!(s[1].protocol, Protocol::Udp);
        assert_eq!(s[1].key().port, 53);
    }

    #[test]
    fn empty_file_means_no_services() {
        assert!(parse("", "t").unwrap().is_empty());
        assert!(parse("services: []\n", "t").unwrap().is_empty());
    }

    fn err(text: &str) -> String {
        parse(text, "t.yaml").unwrap_err().to_string()
    }

    #[test]
    fn syntax_errors_name_line_and_field() {
        let e = err("services:\n  - name: web\n    vip: 192.0.2.300\n    port: 80\n    protocol: TCP\n");
        assert!(e.contains("services[0].vip"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        let e = err("services:\n  - name: web\n    vip: 192.0.2.1\n    port: 80\n    protocol: SCTP\n");
        assert!(e.contains("services[0].protocol") && e.contains("SCTP"), "{e}");
        let e = err("services:\n  - name: web\n    vip: 192.0.2.1\n    port: 70000\n    protocol: TCP\n");
        assert!(e.contains("services[0].port"), "{e}");
        let e = err("services:\n  - name: web\n    vip: 192.0.2.1\n    prot: 80\n");
        assert!(e.contains("unknown field `prot`"), "{e}");
        let e = err(
            "services:\n  - name: web\n    vip: 192.0.2.1\n    port: 80\n    protocol: TCP\n    backends: [\"10.0.0.1\"]\n",
        );
        assert!(e.contains("services[0].backends[0]"), "{e}");
    }

    #[test]
    fn semantic_errors_name_line_service_and_field() {
        let dup = format!("{GOOD}  - name: web\n    vip: 192.0.2.11\n    port: 80\n    protocol: TCP\n");
        let e = err(&dup);
        assert_eq!(e, "t.yaml: line 13: services[2] (web): name: duplicate: services[0] has the same name");
        let clash = format!("{GOOD}  - name: web2\n    vip: 192.0.2.10\n    port: 80\n    protocol: TCP\n");
        assert!(
            err(&clash)
                .contains("line 13: services[2] (web2): port: 192.0.2.10:80/TCP is already served by services[0]")
        );
        let e = err("services:\n  - name: a\n    vip: 0.0.0.0\n    port: 80\n    protocol: TCP\n");
        assert!(e.contains("line 2: services[0] (a): vip"), "{e}");
        let e = err("services:\n  - name: a\n    vip: 192.0.2.1\n    port: 0\n    protocol: TCP\n");
        assert!(e.contains("port: must be 1-65535"), "{e}");
        let e = err(
            "services:\n  - name: a\n    vip: 192.0.2.1\n    port: 1\n    protocol: TCP\n    backends: [\"10.0.0.1:80\", \"10.0.0.1:80\"]\n",
        );
        assert!(e.contains("backends: 10.0.0.1:80 is listed twice"), "{e}");
        let e = err(
            "services:\n  - name: a\n    vip: 192.0.2.1\n    port: 1\n    protocol: TCP\n    backends: [\"10.0.0.1:0\"]\n",
        );
        assert!(e.contains("backends: 10.0.0.1:0 is not a usable"), "{e}");
    }

    #[test]
    fn same_port_different_protocol_is_fine() {
        let t = "services:\n  - {name: a, vip: 192.0.2.1, port: 53, protocol: TCP}\n  - {name: b, vip: 192.0.2.1, port: 53, protocol: UDP}\n";
        assert_eq!(parse(t, "t").unwrap().len(), 2);
    }
}
