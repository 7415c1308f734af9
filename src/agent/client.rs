//! The control API's routes as typed calls on [`Peers`]: requests are the
//! API's own bodies ([`super::request`]) and answers are read into its own
//! views, so the CLI and the agents calling each other share one
//! definition of every field with the API that serves it.

use super::cluster::NodeSpec;
use super::node::{KinCopy, MigrationView, NodeView, VmView};
use super::ops::OperationView;
use super::peer::{PeerError, Peers};
use super::preview::{Preview, PreviewRequest};
use super::request::{CreateMigration, CreateVm, Drain, Resolve, Resume, Stop, Stopping, Update};
use super::retain::RetainedView;
use super::rolling::{StartUpdate, UpdateRun};
use super::schedule::{SetSchedule, UpdateSchedule};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The name the API gives a state or kind (`running`, `migrating-in`,
/// `drain`): its JSON string.
pub fn name_of(v: impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// `text` as one URL path segment: anything but unreserved characters is
/// percent-encoded, so a name cannot reach another route or add a query;
/// `None` for names a URL would take as a step (empty, `.`, `..`).
pub fn segment(text: &str) -> Option<String> {
    if matches!(text, "" | "." | "..") {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// `text` as a path segment of a call to `node`, or the error saying why not.
fn seg(node: &NodeSpec, text: &str) -> Result<String, PeerError> {
    segment(text).ok_or_else(|| PeerError::Invalid {
        node: node.name.clone(),
        message: format!("{text:?} is no name or id"),
    })
}

impl Peers {
    /// `method path` on `node` with an optional body, the answer read as `T`.
    pub async fn typed<T: DeserializeOwned>(
        &self,
        node: &NodeSpec,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, PeerError> {
        let invalid = |message: String| PeerError::Invalid {
            node: node.name.clone(),
            message,
        };
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| invalid(format!("the request to {path} does not serialize: {e}")))?;
        let answer = self.call(node, method, path, body.as_ref()).await?;
        serde_json::from_value(answer)
            .map_err(|e| invalid(format!("its answer to {path} does not read: {e}")))
    }

    async fn get_as<T: DeserializeOwned>(&self, n: &NodeSpec, path: &str) -> Result<T, PeerError> {
        self.typed(n, Method::GET, path, None::<&()>).await
    }

    /// `GET /v1/retained/{vm}`: the image VM `vm` left node `n` with.
    pub async fn retained(&self, n: &NodeSpec, vm: &str) -> Result<RetainedView, PeerError> {
        self.get_as(n, &format!("/v1/retained/{}", seg(n, vm)?))
            .await
    }

    /// `GET /v1/retained/{vm}/hashes`: the hashes of pages
    /// `first..first + count` of that image (at most
    /// [`super::retain::MAX_HASHES`]).
    pub async fn retained_hashes(
        &self,
        n: &NodeSpec,
        vm: &str,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, PeerError> {
        let path = format!(
            "/v1/retained/{}/hashes?first={first}&count={count}",
            seg(n, vm)?
        );
        let want = count.min(super::retain::MAX_HASHES) as usize * 8;
        let bytes = self.get_bytes(n, &path, want).await?;
        if bytes.len() != want {
            return Err(PeerError::Invalid {
                node: n.name.clone(),
                message: format!("{path} answered {} bytes, not {want}", bytes.len()),
            });
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
            .collect())
    }

    /// `GET /v1/bases?image=&memory=`: the copies node `n` holds of VMs
    /// made from RAM image `image`, of `memory` bytes, newest first.
    pub async fn kin_copies(
        &self,
        n: &NodeSpec,
        image: &str,
        memory: u64,
    ) -> Result<Vec<KinCopy>, PeerError> {
        let path = format!("/v1/bases?image={}&memory={memory}", seg(n, image)?);
        self.get_as(n, &path).await
    }

    /// `POST /v1/bases/{vm}/tags`: each page's xxh3 hash and tag under
    /// `key`, pages `first..first + count` (at most
    /// [`super::retain::MAX_HASHES`]), of the copy VM `vm` left node `n`
    /// with by `migration`.
    pub async fn kin_tags(
        &self,
        n: &NodeSpec,
        (vm, migration): (&str, &str),
        key: &[u8; 32],
        (first, count): (u64, u64),
    ) -> Result<Vec<(u64, u64)>, PeerError> {
        let path = format!("/v1/bases/{}/tags", seg(n, vm)?);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let body =
            serde_json::json!({"migration": migration, "key": hex, "first": first, "count": count});
        let want = count.min(super::retain::MAX_HASHES) as usize * 16;
        let bytes = self
            .bytes(n, Method::POST, &path, Some(&body), want)
            .await?;
        if bytes.len() != want {
            return Err(PeerError::Invalid {
                node: n.name.clone(),
                message: format!("{path} answered {} bytes, not {want}", bytes.len()),
            });
        }
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        Ok(bytes
            .chunks_exact(16)
            .map(|p| (word(&p[..8]), word(&p[8..])))
            .collect())
    }

    /// `GET /v1/node`.
    pub async fn node(&self, n: &NodeSpec) -> Result<NodeView, PeerError> {
        self.get_as(n, "/v1/node").await
    }

    /// `GET /v1/vms`.
    pub async fn vms(&self, n: &NodeSpec) -> Result<Vec<VmView>, PeerError> {
        self.get_as(n, "/v1/vms").await
    }

    /// `GET /v1/vms/{name}`.
    pub async fn vm(&self, n: &NodeSpec, name: &str) -> Result<VmView, PeerError> {
        self.get_as(n, &format!("/v1/vms/{}", seg(n, name)?)).await
    }

    /// `POST /v1/vms`.
    pub async fn create_vm(&self, n: &NodeSpec, vm: &CreateVm) -> Result<VmView, PeerError> {
        self.typed(n, Method::POST, "/v1/vms", Some(vm)).await
    }

    /// `DELETE /v1/nodes/{name}`: takes node `name` out of the cluster.
    pub async fn remove_node(
        &self,
        n: &NodeSpec,
        name: &str,
        force: bool,
    ) -> Result<super::RemovedNode, PeerError> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/nodes/{}{query}", seg(n, name)?);
        self.typed(n, Method::DELETE, &path, None::<&()>).await
    }

    /// `DELETE /v1/vms/{name}[?force=true]`.
    pub async fn delete_vm(
        &self,
        n: &NodeSpec,
        name: &str,
        force: bool,
    ) -> Result<VmView, PeerError> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("/v1/vms/{}{query}", seg(n, name)?);
        self.typed(n, Method::DELETE, &path, None::<&()>).await
    }

    /// `POST /v1/migrations`.
    pub async fn migrate(
        &self,
        n: &NodeSpec,
        m: &CreateMigration,
    ) -> Result<MigrationView, PeerError> {
        self.typed(n, Method::POST, "/v1/migrations", Some(m)).await
    }

    /// `GET /v1/migrations`.
    pub async fn migrations(&self, n: &NodeSpec) -> Result<Vec<MigrationView>, PeerError> {
        self.get_as(n, "/v1/migrations").await
    }

    /// `GET /v1/migrations/{id}`.
    pub async fn migration(&self, n: &NodeSpec, id: &str) -> Result<MigrationView, PeerError> {
        self.get_as(n, &format!("/v1/migrations/{}", seg(n, id)?))
            .await
    }

    /// `DELETE /v1/migrations/{id}`: cancel it.
    pub async fn cancel_migration(
        &self,
        n: &NodeSpec,
        id: &str,
    ) -> Result<MigrationView, PeerError> {
        let path = format!("/v1/migrations/{}", seg(n, id)?);
        self.typed(n, Method::DELETE, &path, None::<&()>).await
    }

    /// `POST /v1/migrations/{id}/resolve`.
    pub async fn resolve(
        &self,
        n: &NodeSpec,
        id: &str,
        r: &Resolve,
    ) -> Result<MigrationView, PeerError> {
        let path = format!("/v1/migrations/{}/resolve", seg(n, id)?);
        self.typed(n, Method::POST, &path, Some(r)).await
    }

    /// `POST /v1/node/drain`.
    pub async fn drain(&self, n: &NodeSpec, d: &Drain) -> Result<OperationView, PeerError> {
        self.typed(n, Method::POST, "/v1/node/drain", Some(d)).await
    }

    /// `POST /v1/nodes/{name}/{action}` on `via`: any agent hands it to the
    /// coordinator, which starts it on node `name`. An agent without the
    /// route (an older version) is asked on `name`'s own route instead
    /// when it is that node.
    pub async fn act_on<T: DeserializeOwned>(
        &self,
        via: &NodeSpec,
        name: &str,
        action: &str,
        body: &impl Serialize,
    ) -> Result<T, PeerError> {
        let path = format!("/v1/nodes/{}/{action}", seg(via, name)?);
        match self.typed(via, Method::POST, &path, Some(body)).await {
            Err(PeerError::Api {
                status: 404,
                code,
                message,
                ..
            }) if code == "not_found"
                && message.starts_with("no such route")
                && via.name == name =>
            {
                let path = format!("/v1/node/{action}");
                self.typed(via, Method::POST, &path, Some(body)).await
            }
            answer => answer,
        }
    }

    /// `POST /v1/node/resume`.
    pub async fn resume(&self, n: &NodeSpec, r: &Resume) -> Result<OperationView, PeerError> {
        self.typed(n, Method::POST, "/v1/node/resume", Some(r))
            .await
    }

    /// `POST /v1/node/update`.
    pub async fn update(&self, n: &NodeSpec, u: &Update) -> Result<OperationView, PeerError> {
        self.typed(n, Method::POST, "/v1/node/update", Some(u))
            .await
    }

    /// `POST /v1/node/stop`.
    pub async fn stop(&self, n: &NodeSpec, s: &Stop) -> Result<Stopping, PeerError> {
        self.typed(n, Method::POST, "/v1/node/stop", Some(s)).await
    }

    /// `GET /v1/operations`.
    pub async fn operations(&self, n: &NodeSpec) -> Result<Vec<OperationView>, PeerError> {
        self.get_as(n, "/v1/operations").await
    }

    /// `GET /v1/operations/{id}`.
    pub async fn operation(&self, n: &NodeSpec, id: &str) -> Result<OperationView, PeerError> {
        self.get_as(n, &format!("/v1/operations/{}", seg(n, id)?))
            .await
    }

    /// `DELETE /v1/operations/{id}`: cancel it.
    pub async fn cancel_operation(
        &self,
        n: &NodeSpec,
        id: &str,
    ) -> Result<OperationView, PeerError> {
        let path = format!("/v1/operations/{}", seg(n, id)?);
        self.typed(n, Method::DELETE, &path, None::<&()>).await
    }

    /// `POST /v1/cluster/update`: asks the cluster for a rolling update.
    pub async fn start_update(
        &self,
        n: &NodeSpec,
        u: &StartUpdate,
    ) -> Result<UpdateRun, PeerError> {
        self.typed(n, Method::POST, "/v1/cluster/update", Some(u))
            .await
    }

    /// `GET /v1/cluster/update`.
    pub async fn update_run(&self, n: &NodeSpec) -> Result<UpdateRun, PeerError> {
        self.get_as(n, "/v1/cluster/update").await
    }

    /// `POST /v1/node/preview`: what an update would install there.
    pub async fn preview(&self, n: &NodeSpec, p: &PreviewRequest) -> Result<Preview, PeerError> {
        self.typed(n, Method::POST, "/v1/node/preview", Some(p))
            .await
    }

    /// `GET /v1/cluster/update/schedule`.
    pub async fn update_schedule(&self, n: &NodeSpec) -> Result<UpdateSchedule, PeerError> {
        self.get_as(n, "/v1/cluster/update/schedule").await
    }

    /// `PUT /v1/cluster/update/schedule`.
    pub async fn set_update_schedule(
        &self,
        n: &NodeSpec,
        s: &SetSchedule,
    ) -> Result<UpdateSchedule, PeerError> {
        self.typed(n, Method::PUT, "/v1/cluster/update/schedule", Some(s))
            .await
    }

    /// `DELETE /v1/cluster/update/schedule`.
    pub async fn remove_update_schedule(&self, n: &NodeSpec) -> Result<UpdateSchedule, PeerError> {
        self.typed(
            n,
            Method::DELETE,
            "/v1/cluster/update/schedule",
            None::<&()>,
        )
        .await
    }

    /// `DELETE /v1/cluster/update`: the run stops after the current node.
    pub async fn cancel_update(&self, n: &NodeSpec) -> Result<UpdateRun, PeerError> {
        self.typed(n, Method::DELETE, "/v1/cluster/update", None::<&()>)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_one_path_segment() {
        let s = |t| segment(t).unwrap();
        assert_eq!(s("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(s("x?force=true"), "x%3Fforce%3Dtrue");
        assert_eq!(s("../node/stop"), "..%2Fnode%2Fstop");
        assert_eq!(s("é"), "%C3%A9");
        for step in ["", ".", ".."] {
            assert_eq!(segment(step), None, "{step:?}");
        }
    }
}
