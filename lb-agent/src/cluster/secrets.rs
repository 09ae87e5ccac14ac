//! BGP session passwords: `kubernetes.io/basic-auth` Secrets in the agents' own namespace,
//! watched there (the agent may read no other Secret), read by name.

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::Store;

/// The Secret type a password Secret must have (the only type the agent watches).
pub const PASSWORD_SECRET_TYPE: &str = "kubernetes.io/basic-auth";

/// Why a peer's password cannot be had, naming the Secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// No such Secret (of the right type) in the agents' namespace.
    #[error(
        "password Secret {0:?} not found in the agents' namespace (it must be there, of type kubernetes.io/basic-auth)"
    )]
    NotFound(String),
    /// The Secret has no `password` key.
    #[error("password Secret {0:?} has no `password` key")]
    NoKey(String),
    /// The password is not UTF-8.
    #[error("password Secret {0:?}: `password` is not UTF-8 text")]
    NotText(String),
}

/// The password in `secret` (the one named `name`, if found).
pub fn password_of(secret: Option<&Secret>, name: &str) -> Result<String, PasswordError> {
    let secret = secret
        .filter(|s| s.type_.as_deref() == Some(PASSWORD_SECRET_TYPE))
        .ok_or_else(|| PasswordError::NotFound(name.into()))?;
    let bytes =
        secret.data.as_ref().and_then(|d| d.get("password")).ok_or_else(|| PasswordError::NoKey(name.into()))?;
    String::from_utf8(bytes.0.clone()).map_err(|_| PasswordError::NotText(name.into()))
}

/// The password of Secret `name` in the watched `secrets`.
pub fn bgp_password(secrets: &Store<Secret>, name: &str) -> Result<String, PasswordError> {
    let all = secrets.state();
    password_of(all.iter().find(|s| s.metadata.name.as_deref() == Some(name)).map(AsRef::as_ref), name)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn a_password_comes_from_a_basic_auth_secrets_password_key_or_the_secret_is_named() {
        let ok = secret(PASSWORD_SECRET_TYPE, &[("password", b"s3cret")]);
        assert_eq!(password_of(Some(&ok), "bgp"), Ok("s3cret".into()));
        assert_eq!(password_of(None, "bgp"), Err(PasswordError::NotFound("bgp".into())));
        let opaque = secret("Opaque", &[("password", b"s3cret")]);
        assert_eq!(password_of(Some(&opaque), "bgp"), Err(PasswordError::NotFound("bgp".into())));
        let nokey = secret(PASSWORD_SECRET_TYPE, &[("username", b"x")]);
        assert_eq!(password_of(Some(&nokey), "bgp"), Err(PasswordError::NoKey("bgp".into())));
        let binary = secret(PASSWORD_SECRET_TYPE, &[("password", &[0xff, 0xfe])]);
        assert_eq!(password_of(Some(&binary), "bgp"), Err(PasswordError::NotText("bgp".into())));
    }
}
