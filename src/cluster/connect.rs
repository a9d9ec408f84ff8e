//! Reading what the cluster needs to start: the fleet secret (the keys
//! that seal what is stored) and the Redis client, with its password file
//! and CA bundle.

use super::keys::FleetKeys;
use super::ClusterError;
use crate::config::ClusterConfig;

pub(super) fn read_keys(config: &ClusterConfig) -> Result<FleetKeys, ClusterError> {
    let secret = crate::secret_file::read_bytes(&config.secret_file, "secret_file")
        .map_err(ClusterError::File)?;
    FleetKeys::new(&secret, &config.key_prefix).map_err(|source| ClusterError::Secret {
        path: config.secret_file.clone(),
        source,
    })
}

pub(super) fn redis_client(config: &ClusterConfig) -> Result<redis::Client, ClusterError> {
    use redis::IntoConnectionInfo;
    let redis_err = |e: redis::RedisError| ClusterError::Redis(e.to_string());
    let mut info = config
        .redis
        .as_str()
        .into_connection_info()
        .map_err(redis_err)?;
    if let Some(path) = &config.redis_password_file {
        let password = crate::secret_file::read_password(path, "redis_password_file")
            .map_err(ClusterError::File)?;
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    match &config.redis_ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| ClusterError::Ca {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            crate::tls::load_certs(path, "cluster.redis_ca_file").map_err(|e| {
                ClusterError::Ca {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(redis_err)
        }
        None => redis::Client::open(info).map_err(redis_err),
    }
}
