//! NBD URIs as nbdcopy and qemu spell them: `nbd://HOST[:PORT][/EXPORT]` and
//! `nbd+unix:///[EXPORT]?socket=PATH`.

use std::path::PathBuf;

use crate::Target;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed NBD URI: where to connect and which export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// Where the server listens.
    pub target: Target,
    /// The export name (often empty).
    pub export: String,
}

impl Uri {
    /// Whether `s` looks like an NBD URI at all (so a caller can tell URIs from paths).
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// Parses `s`, saying what is wrong with it when it does not parse. TLS (`nbds://`) and
    /// vsock are not supported.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("NBD URI {s:?}: {why}");
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            // An empty path (`nbd+unix://?socket=PATH`, as nbdkit's `$uri` spells the default
            // export) is the empty export name, as libnbd reads it.
            let rest = match rest.strip_prefix('/') {
                Some(r) => r,
                None if rest.starts_with('?') => rest,
                None => return Err(bad("expected nbd+unix:///EXPORT?socket=PATH")),
            };
            let (export, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("no socket= in the query"))?;
            return Ok(Self {
                target: Target::Unix(PathBuf::from(percent_decode(socket)?)),
                export: percent_decode(export)?,
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
            if authority.is_empty() {
                return Err(bad("no host"));
            }
            if export.contains('?') {
                return Err(bad("query parameters are only understood for nbd+unix"));
            }
            let host_port = if authority.starts_with('[') {
                // [v6]:port
                let end = authority.find(']').ok_or_else(|| bad("unclosed ["))?;
                match &authority[end + 1..] {
                    "" => format!("{}:{DEFAULT_PORT}", &authority[..=end]),
                    p if p.starts_with(':') => authority.to_owned(),
                    _ => return Err(bad("junk after ]")),
                }
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() => {
                        p.parse::<u16>().map_err(|_| bad("the port is not a number"))?;
                        authority.to_owned()
                    }
                    Some(_) => return Err(bad("no host")),
                    None => format!("{authority}:{DEFAULT_PORT}"),
                }
            };
            return Ok(Self { target: Target::Tcp(host_port), export: percent_decode(export)? });
        }
        Err(bad("only nbd:// and nbd+unix:// are supported"))
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(|| format!("truncated escape in {s:?}"))?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape in {s:?}"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_nbdcopy_accepts() {
        let u = Uri::parse("nbd+unix:///disk%201?socket=/tmp/s.sock").unwrap();
        assert_eq!(u, Uri { target: Target::Unix("/tmp/s.sock".into()), export: "disk 1".into() });
        let u = Uri::parse("nbd+unix:///?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.export, "");
        // nbdkit's own `$uri` for its default export.
        let u = Uri::parse("nbd+unix://?socket=/tmp/s.sock").unwrap();
        assert_eq!(u, Uri { target: Target::Unix("/tmp/s.sock".into()), export: String::new() });
        assert_eq!(Uri::parse("nbd://127.0.0.1:10810/x").unwrap().target, Target::Tcp("127.0.0.1:10810".into()));
        assert_eq!(Uri::parse("nbd://host").unwrap().target, Target::Tcp("host:10809".into()));
        assert_eq!(Uri::parse("nbd://[::1]").unwrap().target, Target::Tcp("[::1]:10809".into()));
        for bad in [
            "nbd://",
            "nbd://h:port",
            "nbds://h",
            "nbd+unix:///x",
            "nbd+unix:///?socket=",
            "nbd+unix://x?socket=/s",
            "/dev/sda",
            "nbd://h/%4",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }
}
