//! `server:`: the channels gridgate listens on (BuildGrid's `!channel` keys).

use std::net::{SocketAddr, ToSocketAddrs};

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn channel(&self, key: &str, c: &RawChannel) -> Result<ChannelConfig, ConfigError> {
        let address = match (&c.address, c.port) {
            (Some(a), None) => a.clone(),
            (None, Some(port)) => format!("[::]:{port}"),
            (Some(_), Some(_)) => {
                return Err(self.err(key, "give either `address` or the older `port`, not both"))
            }
            (None, None) => {
                return Err(self.err(
                    &format!("{key}.address"),
                    "missing: e.g. \"127.0.0.1:50051\" or \"unix:/run/gridgate.sock\"",
                ))
            }
        };
        let listen = self.listen_addr(&format!("{key}.address"), &address)?;
        let creds = c.credentials.as_ref().filter(|c| !c.is_empty());
        let insecure = match c.insecure_mode {
            Some(v) => v,
            // BuildGrid requires the key; without it, credentials decide.
            None => creds.is_none(),
        };
        let tls = match (insecure, creds) {
            (true, None) => None,
            (true, Some(_)) => return Err(self.err(
                &format!("{key}.insecure-mode"),
                "is true but credentials are given: gridgate will not silently serve plaintext; \
                     set insecure-mode: false to use TLS, or remove the credentials",
            )),
            (false, None) => {
                return Err(self.err(
                    &format!("{key}.credentials"),
                    "insecure-mode is false, so TLS credentials are required \
                     (tls-server-key and tls-server-cert)",
                ))
            }
            (false, Some(cr)) => {
                let ck = format!("{key}.credentials");
                let key_file = cr.tls_server_key.as_deref().ok_or_else(|| {
                    self.err(
                        &format!("{ck}.tls-server-key"),
                        "missing: the server's PEM private key",
                    )
                })?;
                let cert_file = cr.tls_server_cert.as_deref().ok_or_else(|| {
                    self.err(
                        &format!("{ck}.tls-server-cert"),
                        "missing: the server's PEM certificate chain",
                    )
                })?;
                Some(TlsConfig {
                    key: self.readable_file(&format!("{ck}.tls-server-key"), key_file)?,
                    cert: self.readable_file(&format!("{ck}.tls-server-cert"), cert_file)?,
                    client_ca: cr
                        .tls_client_certs
                        .as_deref()
                        .map(|p| self.readable_file(&format!("{ck}.tls-client-certs"), p))
                        .transpose()?,
                })
            }
        };
        if matches!(listen, ListenAddr::Unix(_)) && c.allow_open {
            return Err(self.err(
                &format!("{key}.allow-open"),
                "only applies to TCP addresses (a Unix socket is local already)",
            ));
        }
        Ok(ChannelConfig {
            address,
            listen,
            tls,
            allow_open: c.allow_open,
        })
    }

    pub(super) fn listen_addr(&self, key: &str, address: &str) -> Result<ListenAddr, ConfigError> {
        if let Some(rest) = address.strip_prefix("unix:") {
            // BuildGrid writes unix:///tmp/sock; gRPC also accepts unix:/tmp/sock.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(self.err(key, "unix: needs a socket path"));
            }
            return Ok(ListenAddr::Unix(self.path(path)));
        }
        if let Ok(addr) = address.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        let mut resolved = address.to_socket_addrs().map_err(|e| {
            self.err(
                key,
                &format!("{address:?} is not host:port, [ipv6]:port or unix:PATH ({e})"),
            )
        })?;
        resolved
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| self.err(key, &format!("{address:?} resolves to no address")))
    }
}
