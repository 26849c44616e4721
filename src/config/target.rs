//! Upstream target URLs (`http://tasks.bar:8080`, `https://bar.internal`).

use std::net::{IpAddr, SocketAddr};

use http::uri::{Authority, Uri};

/// A parsed upstream target: where to connect and what to send as Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    /// `host:port` as written (sent as the Host header unless the route preserves the client's).
    pub authority: Authority,
    pub host: TargetHost,
    pub port: u16,
    /// `https://`: connections are TLS.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Ip(IpAddr),
    /// Resolved at start and every `dns_refresh`; every A/AAAA record is a target.
    Name(String),
}

impl TargetUrl {
    pub fn parse(s: &str) -> Result<TargetUrl, String> {
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("`{s}` is not a URL ({e}); expected `http://host:port`"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "`{s}` uses scheme `{other}`; expected `http://host:port` or `https://host:port`"
                ));
            }
            None => return Err(format!("`{s}` has no scheme; expected `http://host:port`")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host; expected `http://host:port`"))?
            .clone();
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{s}` contains credentials; they are not allowed in target URLs"
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "`{s}` has a path or query; expected `http://host:port` (use the route's rewrite_prefix for paths)"
            ));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host = authority.host();
        let host = match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => TargetHost::Ip(ip),
            Err(_) if host.is_empty() => return Err(format!("`{s}` has an empty host")),
            Err(_) => TargetHost::Name(host.to_ascii_lowercase()),
        };
        Ok(TargetUrl {
            authority,
            host,
            port,
            tls,
        })
    }

    /// The host to verify the certificate of an `https://` target against.
    pub fn server_name(&self) -> &str {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            TargetHost::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            TargetHost::Name(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = TargetUrl::parse("http://tasks.bar:8080").unwrap();
        assert_eq!(t.host, TargetHost::Name("tasks.bar".into()));
        assert_eq!(t.port, 8080);
        assert_eq!(t.authority.as_str(), "tasks.bar:8080");
        let t = TargetUrl::parse("http://127.0.0.1").unwrap();
        assert_eq!(t.socket_addr(), Some("127.0.0.1:80".parse().unwrap()));
        let t = TargetUrl::parse("http://[::1]:9000/").unwrap();
        assert_eq!(t.socket_addr(), Some("[::1]:9000".parse().unwrap()));
        let t = TargetUrl::parse("https://bar.internal").unwrap();
        assert!(t.tls);
        assert_eq!(t.port, 443);
    }

    #[test]
    fn rejects_bad_targets() {
        for bad in [
            "tasks.bar:8080",
            "ftp://x",
            "http://x/path",
            "http://u:p@x",
            "http://x?q=1",
            "",
        ] {
            assert!(TargetUrl::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
