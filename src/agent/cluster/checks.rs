//! The cluster file's checks: each node's entry with its defaults,
//! addresses, certificates, image folders and the API's limits.

use super::*;

/// Most folders `image_dirs` may name.
pub(super) const MAX_IMAGE_DIRS: usize = 64;

/// `image_dirs`: 1 to [`MAX_IMAGE_DIRS`] absolute paths.
pub(super) fn check_image_dirs(dirs: &[PathBuf]) -> Result<(), String> {
    if dirs.is_empty() || dirs.len() > MAX_IMAGE_DIRS {
        return Err(format!(
            "image_dirs: {} folders is out of range (1 to {MAX_IMAGE_DIRS}; leave it out to take any path)",
            dirs.len()
        ));
    }
    match dirs.iter().find(|d| !d.is_absolute()) {
        Some(d) => Err(format!(
            "image_dirs: {} is not an absolute path",
            d.display()
        )),
        None => Ok(()),
    }
}

/// A PEM certificate file's first certificate, DER.
pub(super) fn read_cert(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .map(|c| c.to_vec())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The `[api]` table, defaults applied, each value in its range.
pub(super) fn api_limits(raw: &RawApi) -> Result<crate::agent::listen::ApiLimits, String> {
    use std::time::Duration;
    let mut limits = crate::agent::listen::ApiLimits::default();
    if let Some(n) = raw.max_connections {
        if !(1..=65_536).contains(&n) {
            return Err(format!("max_connections: {n} is out of range (1 to 65536)"));
        }
        limits.max_connections = n;
    }
    let duration = |field: &str, text: &str, lo: Duration, hi: Duration| {
        let d = crate::units::parse_duration(text).map_err(|e| format!("{field}: {e}"))?;
        if d < lo || d > hi {
            return Err(format!("{field}: {d:?} is out of range ({lo:?} to {hi:?})"));
        }
        Ok(d)
    };
    if let Some(t) = &raw.header_timeout {
        limits.header_timeout = duration(
            "header_timeout",
            t,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?;
    }
    if let Some(t) = &raw.request_timeout {
        limits.request_timeout = duration(
            "request_timeout",
            t,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
    }
    Ok(limits)
}

/// `host:port` with a non-empty host and a port number.
pub(crate) fn check_address(addr: &str) -> Result<(), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() {
        return Err("the host is empty");
    }
    port.parse::<u16>()
        .map_err(|_| "the port is not a number from 0 to 65535")?;
    Ok(())
}

/// What every node's entry falls back on: the cluster file's folder and
/// its `[defaults]`.
pub(super) struct NodeDefaults<'a> {
    pub(super) dir: &'a Path,
    pub(super) defaults: &'a RawDefaults,
    pub(super) max_bandwidth: Option<u64>,
    pub(super) insecure_api: bool,
    pub(super) state_dir: &'a Path,
}

impl NodeDefaults<'_> {
    /// Checks one `[[node]]` entry, every field in its range, and fills in
    /// the defaults.
    pub(super) fn node_spec(&self, n: RawNode) -> Result<NodeSpec, String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
        if n.name.is_empty()
            || n.name.len() > crate::wire::MAX_LABEL_LEN
            || !n.name.chars().all(valid)
        {
            return Err(format!(
                "node name {:?}: use 1 to 255 letters, digits, '-', '_' and '.'",
                n.name
            ));
        }
        let name = &n.name;
        for (field, addr) in [("control", &n.control), ("data", &n.data)] {
            check_address(addr).map_err(|why| format!("node {name}: {field} {addr:?}: {why}"))?;
        }
        let memory_capacity =
            amount(&n.memory_capacity, name, "memory_capacity", false)?.unwrap_or(0);
        if memory_capacity == 0 || memory_capacity > MAX_NODE_MEMORY {
            return Err(format!(
                "node {name}: memory_capacity {memory_capacity} is out of range (1 byte to 1 PiB)"
            ));
        }
        let (max_concurrent_migrations, auto_concurrency) = match n
            .max_concurrent_migrations
            .or(self.defaults.max_concurrent_migrations)
        {
            None => (DEFAULT_MAX_CONCURRENT_MIGRATIONS, false),
            Some(Concurrency::Fixed(n)) => (n, false),
            // Its choice is one or two (see `ops::auto`).
            Some(Concurrency::Auto) => (DEFAULT_MAX_CONCURRENT_MIGRATIONS, true),
        };
        if max_concurrent_migrations == 0 || max_concurrent_migrations > MAX_CONCURRENT {
            return Err(format!(
                "node {name}: max_concurrent_migrations {max_concurrent_migrations} is out of range (1 to {MAX_CONCURRENT})"
            ));
        }
        let max_bandwidth = match &n.max_bandwidth {
            Some(a) => amount(a, name, "max_bandwidth", true)?,
            None => self.max_bandwidth,
        };
        let (lo, hi) = crate::migration::ranges::BANDWIDTH;
        if let Some(b) = max_bandwidth.filter(|b| *b < lo || *b > hi) {
            return Err(format!(
                "node {name}: max_bandwidth {b} B/s is out of range ({lo} to {hi})"
            ));
        }
        let codec = match n.codec.as_deref().or(self.defaults.codec.as_deref()) {
            Some(c) => c
                .parse::<CodecChoice>()
                .map_err(|e| format!("node {name}: codec {c:?}: {e}"))?,
            None => CodecChoice::Auto,
        };
        let update_hook = n.update_hook.or_else(|| self.defaults.update_hook.clone());
        if update_hook.as_ref().is_some_and(|h| h.is_empty()) {
            return Err(format!("node {name}: update_hook is empty"));
        }
        let preview_hook = n
            .preview_hook
            .or_else(|| self.defaults.preview_hook.clone());
        if preview_hook.as_ref().is_some_and(|h| h.is_empty()) {
            return Err(format!("node {name}: preview_hook is empty"));
        }
        let failback_retention = match n
            .failback_retention
            .as_ref()
            .or(self.defaults.failback_retention.as_ref())
        {
            Some(a) => amount(a, name, "failback_retention", false)?.unwrap_or(0),
            // A quarter of its memory: enough for the VMs a drain sends
            // away to fail back by delta.
            None => memory_capacity / 4,
        };
        if failback_retention > MAX_RETENTION {
            return Err(format!(
                "node {name}: failback_retention {failback_retention} is out of range (0 to 1 PiB)"
            ));
        }
        let api_cert = match (&n.tls_cert, self.insecure_api) {
            (Some(c), _) => Some(
                read_cert(&self.dir.join(c))
                    .map_err(|e| format!("node {name}: tls_cert: {e}"))?,
            ),
            (None, true) => None,
            (None, false) => return Err(format!(
                "node {name}: no tls_cert: the control API is served over HTTPS (make a pair with `ferry tls-cert`), or say insecure_api = true for plain HTTP on a trusted network"
            )),
        };
        let state_dir = match &n.state_dir {
            Some(d) => self.dir.join(d),
            None => self.dir.join(self.state_dir).join(name),
        };
        let failback_retention_dir = match &n.failback_retention_dir {
            Some(d) => self.dir.join(d),
            None => state_dir.join("retained"),
        };
        // Its folder of its own: never the kept last copies' folders.
        if failback_retention_dir == state_dir || failback_retention_dir == state_dir.join("guests")
        {
            return Err(format!(
                "node {name}: failback_retention_dir {} is its state folder: give the images a folder of their own",
                failback_retention_dir.display()
            ));
        }
        Ok(NodeSpec {
            failback_retention,
            failback_retention_dir,
            state_dir,
            api_cert,
            api_key_file: n.tls_key.as_ref().map(|k| self.dir.join(k)),
            name: n.name,
            control: n.control,
            data: n.data,
            memory_capacity,
            max_concurrent_migrations,
            auto_concurrency,
            max_bandwidth,
            codec,
            dense: n.dense.or(self.defaults.dense).unwrap_or(true),
            kin_bases: n.kin_bases.or(self.defaults.kin_bases).unwrap_or(true),
            update_hook,
            preview_hook,
        })
    }
}

/// The most `failback_retention` may be: 1 PiB.
const MAX_RETENTION: u64 = 1 << 50;

/// A size (`rate`: a bandwidth, where 0 means none) of a node's `field`.
pub(super) fn amount(
    a: &Amount,
    node: &str,
    field: &str,
    rate: bool,
) -> Result<Option<u64>, String> {
    match a {
        Amount::Bytes(0) if rate => Ok(None),
        Amount::Bytes(n) => Ok(Some(*n)),
        Amount::Text(s) if rate => {
            parse_bandwidth(s).map_err(|e| format!("node {node}: {field}: {e}"))
        }
        Amount::Text(s) => parse_size(s)
            .map(Some)
            .map_err(|e| format!("node {node}: {field}: {e}")),
    }
}
