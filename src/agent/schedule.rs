//! The rolling update's schedule, as Cluster-Aware Updating's self-updating
//! mode has one: `{prefix}update/schedule` holds what to run and when
//! (`"sun 03:00"`, a weekday and a time in UTC, or `"every 24h"`), and the
//! coordinator starts the run when it is due, once per slot: a run records
//! the slot it was started for, so a coordinator that dies between starting
//! a run and moving the schedule on never starts it twice.

use super::etcd::{Cmp, Op, Txn};
use super::mirror::{parse_json, Versioned};
use super::node::{now_ms, Node, NodeError};
use super::rolling::{unavailable, RunState, StartUpdate, UpdateRun};
use super::store::{Liveness, LAYOUT_VERSION};
use serde::{Deserialize, Serialize};

const DAY_MS: u64 = 86_400_000;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// The shortest and longest `every` period.
const EVERY_MS: (u64, u64) = (1_000, 366 * DAY_MS);

/// When a scheduled update runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Each week on a day (0 = Monday) at a time of day, UTC, ms.
    Weekly {
        /// 0 = Monday.
        day: u64,
        /// ms after midnight UTC.
        at_ms: u64,
    },
    /// Every period, the first one period after it was scheduled.
    Every(u64),
}

impl std::str::FromStr for When {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(d) = s.strip_prefix("every ") {
            let p = crate::units::parse_duration(d.trim()).map_err(|e| format!("every: {e}"))?;
            let ms = p.as_millis().min(u128::from(u64::MAX)) as u64;
            let (lo, hi) = EVERY_MS;
            if !(lo..=hi).contains(&ms) {
                return Err(format!("every {d}: out of range (1s to 366 days)"));
            }
            return Ok(Self::Every(ms));
        }
        let (day, time) = s
            .split_once(' ')
            .ok_or_else(|| format!("{s:?}: \"DAY HH:MM\" (UTC) or \"every DURATION\""))?;
        let day = DAYS
            .iter()
            .position(|d| day.eq_ignore_ascii_case(d))
            .ok_or_else(|| format!("day {day:?}: mon, tue, wed, thu, fri, sat or sun"))?;
        let (h, m) = time
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("time {time:?}: HH:MM"))?;
        let (h, m): (u64, u64) = match (h.parse(), m.parse()) {
            (Ok(h), Ok(m)) if h < 24 && m < 60 && m_len(time) => (h, m),
            _ => return Err(format!("time {time:?}: HH:MM, 00:00 to 23:59")),
        };
        Ok(Self::Weekly {
            day: day as u64,
            at_ms: (h * 60 + m) * 60_000,
        })
    }
}

fn m_len(time: &str) -> bool {
    time.trim()
        .split_once(':')
        .is_some_and(|(_, m)| m.len() == 2)
}

impl When {
    /// The first time it is due after `after_ms` (ms since the Unix epoch).
    pub fn next_after(self, after_ms: u64) -> u64 {
        match self {
            Self::Every(p) => after_ms.saturating_add(p),
            Self::Weekly { day, at_ms } => {
                let today = after_ms / DAY_MS;
                // 1970-01-01 was a Thursday (3, counting Monday as 0).
                (0..=7)
                    .map(|k| today + k)
                    .filter(|d| (d + 3) % 7 == day)
                    .map(|d| d * DAY_MS + at_ms)
                    .find(|t| *t > after_ms)
                    .expect("a weekday recurs within 8 days")
            }
        }
    }
}

/// `{prefix}update/schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateSchedule {
    /// The layout's version.
    pub version: u32,
    /// When, as written (`"sun 03:00"`, `"every 24h"`).
    pub schedule: String,
    /// What each run does.
    pub request: StartUpdate,
    /// When the next run is due, ms since the Unix epoch.
    pub next_at_ms: u64,
    /// The last run it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
}

impl Versioned for UpdateSchedule {
    fn version(&self) -> u32 {
        self.version
    }
}

/// The body of `PUT /v1/cluster/update/schedule`: `schedule` beside the
/// fields of `POST /v1/cluster/update`, any other field refused.
#[derive(Debug, Clone, Serialize)]
pub struct SetSchedule {
    /// `"DAY HH:MM"` (UTC) or `"every DURATION"`.
    pub schedule: String,
    /// What each run does.
    #[serde(flatten)]
    pub request: StartUpdate,
}

impl<'de> Deserialize<'de> for SetSchedule {
    /// By hand: serde's `flatten` shows the request only the fields it
    /// names, so its refusal of unknown ones never sees a misspelt one.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut fields = serde_json::Map::deserialize(d)?;
        let schedule = fields
            .remove("schedule")
            .ok_or_else(|| D::Error::missing_field("schedule"))?;
        let schedule = String::deserialize(schedule)
            .map_err(|e| D::Error::custom(format!("schedule: {e}")))?;
        let request = StartUpdate::deserialize(serde_json::Value::Object(fields))
            .map_err(D::Error::custom)?;
        Ok(Self { schedule, request })
    }
}

/// The schedule's key.
pub fn schedule_key(prefix: &str) -> Vec<u8> {
    format!("{prefix}update/schedule").into_bytes()
}

/// A schedule's JSON, checked.
pub fn parse_schedule(bytes: &[u8]) -> Result<UpdateSchedule, String> {
    let s: UpdateSchedule = parse_json(bytes)?;
    s.schedule.parse::<When>()?;
    if s.request.command.is_empty() || s.request.command.len() > super::rolling::MAX_COMMAND {
        return Err("command: out of range".into());
    }
    Ok(s)
}

impl Node {
    fn schedule_store(&self) -> Result<&Liveness, NodeError> {
        self.store_for("a scheduled update")
    }

    /// `GET /v1/cluster/update/schedule`.
    pub async fn update_schedule(&self) -> Result<UpdateSchedule, NodeError> {
        let live = self.schedule_store()?;
        let kv = live
            .etcd()
            .get(&schedule_key(live.prefix()))
            .await
            .map_err(unavailable)?
            .ok_or_else(|| NodeError::NotFound("no update is scheduled".into()))?;
        parse_schedule(&kv.value).map_err(unavailable)
    }

    /// `PUT /v1/cluster/update/schedule`: sets (or replaces) the schedule,
    /// its request checked as `POST /v1/cluster/update` checks one.
    pub async fn set_update_schedule(&self, req: SetSchedule) -> Result<UpdateSchedule, NodeError> {
        let live = self.schedule_store()?;
        let when: When = req
            .schedule
            .parse()
            .map_err(|e| NodeError::BadRequest(format!("schedule: {e}")))?;
        self.check_update(&req.request)?;
        let s = UpdateSchedule {
            version: LAYOUT_VERSION,
            schedule: req.schedule.trim().to_string(),
            request: req.request,
            next_at_ms: when.next_after(now_ms()),
            last_run: None,
        };
        let json = serde_json::to_vec(&s).expect("records serialize");
        live.etcd()
            .put(&schedule_key(live.prefix()), &json, None)
            .await
            .map_err(unavailable)?;
        tracing::info!(schedule = %s.schedule, next_at_ms = s.next_at_ms, "rolling update scheduled");
        Ok(s)
    }

    /// `DELETE /v1/cluster/update/schedule`.
    pub async fn remove_update_schedule(&self) -> Result<UpdateSchedule, NodeError> {
        let s = self.update_schedule().await?;
        let live = self.schedule_store()?;
        live.etcd()
            .delete(&schedule_key(live.prefix()))
            .await
            .map_err(unavailable)?;
        Ok(s)
    }
}

/// How long after its time a slot may still start (its coordinator was
/// down, etcd out of reach, or the last run still ran); later, it is
/// skipped and the schedule says why.
pub const LATENESS_MS: u64 = 60 * 60 * 1000;

/// What to do with a due slot.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    /// Start its run.
    Start,
    /// Not now: a run of an earlier slot still runs.
    Wait,
    /// Move on, recording this (its run's id, or why it was skipped).
    Done(String),
}

/// What to do at `now` with the slot due at `slot`, `last` the latest run.
fn decide(now: u64, slot: u64, last: Option<&UpdateRun>) -> Slot {
    if let Some(r) = last.filter(|r| r.scheduled_for_ms == Some(slot)) {
        return Slot::Done(r.id.clone());
    }
    let late = now.saturating_sub(slot) > LATENESS_MS;
    match last {
        Some(r) if r.state == RunState::Running && late => Slot::Done(format!(
            "skipped: run {} still ran {} min after the slot",
            r.id,
            LATENESS_MS / 60_000
        )),
        Some(r) if r.state == RunState::Running => Slot::Wait,
        _ if late => Slot::Done(format!(
            "missed: nothing could start it within {} min of its time",
            LATENESS_MS / 60_000
        )),
        _ => Slot::Start,
    }
}

/// The coordinator's look at the schedule: starts the run when it is due
/// and none runs, then moves the schedule on, on its token. A start that
/// etcd refuses for now is tried again next round, within
/// [`LATENESS_MS`] of the slot.
pub async fn due(node: &Node, live: &Liveness, mirror: &super::mirror::Mirror, token: i64) {
    let key = schedule_key(live.prefix());
    // The mirror says whether a slot is due; etcd, as it stands, what it is.
    let due_now = mirror
        .value(&key)
        .and_then(|v| parse_schedule(&v).ok())
        .is_some_and(|s| now_ms() >= s.next_at_ms);
    if !due_now {
        return;
    }
    let Ok(Some(kv)) = live.etcd().get(&key).await else {
        return;
    };
    let Ok(mut s) = parse_schedule(&kv.value) else {
        return;
    };
    let now = now_ms();
    if now < s.next_at_ms {
        return;
    }
    let Ok(when) = s.schedule.parse::<When>() else {
        return;
    };
    // The last run, and whether it was this slot's.
    let last = match node.update_run().await {
        Ok((run, _)) => Some(run),
        Err(NodeError::NotFound(_)) => None,
        Err(_) => return,
    };
    let id = match decide(now, s.next_at_ms, last.as_ref()) {
        Slot::Wait => return,
        Slot::Done(id) => id,
        Slot::Start => match node.start_run(s.request.clone(), Some(s.next_at_ms)).await {
            Ok(run) => {
                tracing::info!(id = %run.id, schedule = %s.schedule, "scheduled rolling update started");
                run.id
            }
            // Tried again next round, while the slot is not too late.
            Err(NodeError::Unavailable(e)) => {
                tracing::warn!(error = %e, "the scheduled rolling update cannot start yet");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the scheduled rolling update cannot start");
                e.to_string()
            }
        },
    };
    s.last_run = Some(id);
    s.next_at_ms = when.next_after(now);
    let json = serde_json::to_vec(&s).expect("records serialize");
    let coordinator = super::coordinator::key(live.prefix());
    let txn = Txn::new()
        .when(Cmp::created_at(&coordinator, token))
        .when(Cmp::modified_at(&key, kv.mod_revision))
        .then(Op::put(&key, &json, None));
    if let Err(e) = live.etcd().txn(&txn).await {
        tracing::warn!(error = %e, "moving the update schedule on failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_slot_starts_once_waits_for_a_run_and_is_skipped_when_too_late() {
        let slot = 1_000_000_000u64;
        let run = |id: &str, state: RunState, scheduled_for_ms: Option<u64>| {
            let mut r: UpdateRun = serde_json::from_value(serde_json::json!({
                "version": 1, "id": id, "command": "true", "failback": true, "state": "running",
                "nodes": [], "started_at_ms": 1
            }))
            .unwrap();
            r.state = state;
            r.scheduled_for_ms = scheduled_for_ms;
            r
        };
        assert_eq!(decide(slot, slot, None), Slot::Start);
        let done = run("u1", RunState::Completed, Some(slot - 86_400_000));
        assert_eq!(decide(slot + 5, slot, Some(&done)), Slot::Start);
        // Started for this slot already (its coordinator died before moving on).
        let ours = run("u2", RunState::Running, Some(slot));
        assert_eq!(decide(slot + 5, slot, Some(&ours)), Slot::Done("u2".into()));
        // An earlier run still runs: wait, then give the slot up.
        let older = run("u3", RunState::Running, None);
        assert_eq!(decide(slot + 5, slot, Some(&older)), Slot::Wait);
        let late = slot + LATENESS_MS + 1;
        assert!(matches!(decide(late, slot, Some(&older)), Slot::Done(why) if why.contains("u3")));
        assert!(matches!(decide(late, slot, None), Slot::Done(why) if why.starts_with("missed")));
        assert_eq!(decide(slot + LATENESS_MS, slot, None), Slot::Start);
    }

    #[test]
    fn a_schedule_with_a_field_it_does_not_know_is_refused() {
        let parse = |v: serde_json::Value| serde_json::from_value::<SetSchedule>(v);
        let s = parse(serde_json::json!({"schedule": "every 1h", "command": "true"})).unwrap();
        assert_eq!(
            (s.schedule.as_str(), s.request.command.as_str()),
            ("every 1h", "true")
        );
        let e =
            parse(serde_json::json!({"schedule": "every 1h", "command": "true", "comand": "x"}));
        assert!(e.unwrap_err().to_string().contains("comand"));
    }

    #[test]
    fn weekly_times_fall_on_their_day_in_utc() {
        let w: When = "sun 03:00".parse().unwrap();
        // 2026-12-04 is a Friday.
        let fri_noon = 1_796_385_600_000u64;
        assert_eq!((fri_noon / DAY_MS + 3) % 7, 4);
        let next = w.next_after(fri_noon);
        assert_eq!((next / DAY_MS + 3) % 7, 6);
        assert_eq!(next % DAY_MS, 3 * 3_600_000);
        assert!(next > fri_noon && next - fri_noon < 7 * DAY_MS);
        // Due exactly now: the next is a week on.
        assert_eq!(w.next_after(next), next + 7 * DAY_MS);
    }

    #[test]
    fn schedules_are_range_checked_naming_what_is_wrong() {
        assert_eq!("every 24h".parse::<When>(), Ok(When::Every(DAY_MS)));
        for (bad, says) in [
            ("every 0s", "out of range"),
            ("funday 03:00", "day"),
            ("sun 24:00", "time"),
            ("sun 3:5", "time"),
            ("sunday", "DAY HH:MM"),
        ] {
            let e = bad.parse::<When>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
