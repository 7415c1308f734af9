//! The API's request bodies checked into what the node runs: sizes, rates,
//! durations and switches, a VM's spec and a migration's settings, every
//! value in its range with the field named.

use super::*;

impl Amount {
    pub(super) fn size(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Amount::Int(n) => Ok(*n),
            Amount::Text(s) => {
                parse_size(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    pub(super) fn rate(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Amount::Int(n) => Ok(*n),
            Amount::Text(s) => {
                parse_rate(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    pub(super) fn bandwidth(&self, field: &str) -> Result<Option<u64>, ApiError> {
        match self {
            Amount::Int(0) => Ok(None),
            Amount::Int(n) => Ok(Some(*n)),
            Amount::Text(s) => {
                parse_bandwidth(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }

    pub(super) fn duration(&self, field: &str) -> Result<Duration, ApiError> {
        match self {
            Amount::Int(ms) => Ok(Duration::from_millis(*ms)),
            Amount::Text(s) => {
                parse_duration(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
            }
        }
    }
}

impl Switch {
    pub(super) fn on(&self, field: &str) -> Result<bool, ApiError> {
        match self {
            Switch::Bool(b) => Ok(*b),
            Switch::Text(s) if s == "on" => Ok(true),
            Switch::Text(s) if s == "off" => Ok(false),
            Switch::Text(s) => Err(ApiError::bad_request(format!(
                "{field}: {s:?} is not on or off"
            ))),
        }
    }
}

pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

impl CreateVm {
    pub(super) fn spec(self) -> Result<VmSpec, ApiError> {
        if !crate::agent::node::valid_name(&self.name) {
            return Err(ApiError::bad_request(format!(
                "name {:?}: use 1 to 255 letters, digits, '-', '_' and '.'",
                self.name
            )));
        }
        let memory = self.memory.size("memory")?;
        crate::memory::GuestMemory::check_size(memory)
            .map_err(|e| ApiError::bad_request(format!("memory: {e}")))?;
        let workload = match &self.workload {
            None => WorkloadPattern::Hot {
                bytes: (64u64 << 20).min(memory),
            },
            Some(w) => w
                .parse::<WorkloadPattern>()
                .map_err(|e| ApiError::bad_request(format!("workload: {e}")))?,
        };
        let dirty_rate = match &self.dirty_rate {
            None => 100_000_000,
            Some(r) => r.rate("dirty_rate")?,
        };
        let fill = match &self.fill {
            None => FillSpec::default(),
            Some(f) => f
                .parse::<FillSpec>()
                .map_err(|e| ApiError::bad_request(format!("fill: {e}")))?,
        };
        let guest = match self.guest.as_deref() {
            None | Some("sim") => GuestKind::Sim,
            Some("kvm") => GuestKind::Kvm,
            Some(g) => {
                return Err(ApiError::bad_request(format!(
                    "guest: {g:?} is not sim or kvm"
                )))
            }
        };
        let priority = match &self.priority {
            None => crate::agent::records::Priority::default(),
            Some(p) => p
                .parse()
                .map_err(|e| ApiError::bad_request(format!("priority: {e}")))?,
        };
        let spec = VmSpec {
            name: self.name,
            memory,
            workload,
            dirty_rate,
            fill,
            guest,
            priority,
            preferred_owners: self.preferred_owners.unwrap_or_default(),
            image: self.image,
            seed: self.seed.unwrap_or(1),
            incarnation: crate::agent::node::new_incarnation(),
        };
        spec.check().map_err(ApiError::bad_request)?;
        Ok(spec)
    }
}

impl MigrationParams {
    /// The migration's configuration: what the request names, over the
    /// node's `defaults`.
    pub(super) fn config(&self, defaults: MigrationConfig) -> Result<MigrationConfig, ApiError> {
        let mut c = defaults;
        if let Some(n) = self.channels {
            c.channels = n;
        }
        if let Some(codec) = &self.codec {
            c.codec = codec
                .parse::<CodecChoice>()
                .map_err(|e| ApiError::bad_request(format!("codec: {e}")))?;
        }
        if let Some(b) = &self.max_bandwidth {
            c.max_bandwidth = b.bandwidth("max_bandwidth")?;
        }
        if let Some(d) = &self.downtime_limit {
            c.downtime_limit = d.duration("downtime_limit")?;
        }
        if let Some(v) = &self.verify {
            c.verify = v
                .parse::<VerifyMode>()
                .map_err(|e| ApiError::bad_request(format!("verify: {e}")))?;
        }
        if let Some(a) = &self.auto_converge {
            c.auto_converge = a.on("auto_converge")?;
        }
        if let Some(t) = &self.completion_timeout {
            c.completion_timeout = Some(t.duration("completion_timeout")?);
        }
        if let Some(t) = &self.peer_timeout {
            c.peer_timeout = t.duration("peer_timeout")?;
        }
        if let Some(t) = &self.progress_timeout {
            c.progress_timeout = t.duration("progress_timeout")?;
        }
        if let Some(p) = self.leave_paused {
            c.leave_paused = p;
        }
        if let Some(d) = &self.delta {
            c.delta = d.on("delta")?;
        }
        if let Some(d) = &self.dense {
            c.dense = d.on("dense")?;
        }
        c.validate()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(c)
    }
}
