//! Transactions: compares on a key's revisions or value, then operations
//! when they all hold (or others when one does not). The coordinator's
//! writes are transactions that check its fencing token and each VM's
//! placement revision, so a deposed coordinator changes nothing.

use super::proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use super::{revision_of, Etcd, EtcdError, KeyValue};

/// One compare of a transaction.
#[derive(Debug, Clone)]
pub struct Cmp(Compare);

impl Cmp {
    fn new(key: &[u8], result: compare::CompareResult, target: compare::TargetUnion) -> Self {
        let kind = match target {
            compare::TargetUnion::Version(_) => compare::CompareTarget::Version,
            compare::TargetUnion::CreateRevision(_) => compare::CompareTarget::Create,
            compare::TargetUnion::ModRevision(_) => compare::CompareTarget::Mod,
            compare::TargetUnion::Value(_) => compare::CompareTarget::Value,
            compare::TargetUnion::Lease(_) => compare::CompareTarget::Lease,
        };
        Self(Compare {
            result: result as i32,
            target: kind as i32,
            key: key.to_vec(),
            range_end: Vec::new(),
            target_union: Some(target),
        })
    }

    /// `key` does not exist.
    pub fn absent(key: &[u8]) -> Self {
        Self::new(
            key,
            compare::CompareResult::Equal,
            compare::TargetUnion::CreateRevision(0),
        )
    }

    /// `key` was created at `revision` (0: does not exist).
    pub fn created_at(key: &[u8], revision: i64) -> Self {
        Self::new(
            key,
            compare::CompareResult::Equal,
            compare::TargetUnion::CreateRevision(revision),
        )
    }

    /// `key` was last changed at `revision` (0: does not exist).
    pub fn modified_at(key: &[u8], revision: i64) -> Self {
        Self::new(
            key,
            compare::CompareResult::Equal,
            compare::TargetUnion::ModRevision(revision),
        )
    }

    /// `key` holds `value`.
    pub fn value_is(key: &[u8], value: &[u8]) -> Self {
        Self::new(
            key,
            compare::CompareResult::Equal,
            compare::TargetUnion::Value(value.to_vec()),
        )
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub struct Op(RequestOp);

impl Op {
    /// Sets `key` to `value`, bound to `lease` when given.
    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Self {
        Self(RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                lease: lease.unwrap_or(0),
                ..Default::default()
            })),
        })
    }

    /// Reads `key`.
    pub fn get(key: &[u8]) -> Self {
        Self(RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        })
    }

    /// Deletes `key`.
    pub fn delete(key: &[u8]) -> Self {
        Self(RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                },
            )),
        })
    }
}

/// A transaction: `when` every compare holds, `then`, else `otherwise`.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    req: TxnRequest,
}

/// How a transaction went.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Every compare held (the `then` branch ran).
    pub succeeded: bool,
    /// The store's revision after it.
    pub revision: i64,
    /// What each `get` of the branch that ran read, in order.
    pub reads: Vec<Option<KeyValue>>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a compare.
    pub fn when(mut self, c: Cmp) -> Self {
        self.req.compare.push(c.0);
        self
    }

    /// Adds an operation to run when every compare holds.
    pub fn then(mut self, op: Op) -> Self {
        self.req.success.push(op.0);
        self
    }

    /// Adds an operation to run when a compare fails.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.req.failure.push(op.0);
        self
    }
}

impl Etcd {
    /// Runs `txn` atomically.
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        self.count(true);
        let r = self
            .kv(&txn.req, |mut c, r| async move { c.txn(r).await })
            .await?;
        let reads = r
            .responses
            .into_iter()
            .filter_map(|op| match op.response {
                Some(response_op::Response::ResponseRange(range)) => {
                    Some(range.kvs.into_iter().next())
                }
                _ => None,
            })
            .collect();
        Ok(TxnResult {
            succeeded: r.succeeded,
            revision: revision_of(r.header.as_ref())?,
            reads,
        })
    }
}
