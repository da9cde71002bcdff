//! Verifying two running nodes against each other, and repairing them.
//!
//! Both nodes recompute per-bucket hashes of every record's leaves from their stores (so
//! a damaged record or a drifted incremental digest shows too); buckets that differ are
//! listed record by record on both sides and the records that differ are reported. With
//! repair, each side receives the other's full state of those records and merges it with
//! the merge rule (a damaged record is replaced), so both end with the state of the union
//! of their events: nothing either side had is lost, and the result is the same whichever
//! node was right. Only entity types (and scopes) both nodes replicate are compared.
//! The report also carries what each node's anti-entropy loop last saw (its status).
//!
//! The anti-entropy loop (`ops::anti_entropy`) reuses the pieces: `common_scopes`,
//! `node_filters`, `entity_names`, `records_page`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::api::{ApiClient, ApiError, StateEntry};
use crate::digest::HASHING;
use crate::ids::{EntityFilter, EntityName, Scope};
use crate::merge::IdState;
use crate::metrics::AntiEntropyStatus;
use crate::store::{FORMAT_VERSION, VerifyHashes};

/// One side of a differing record.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Side {
    /// The node has no record with this id (or it counts as absent: a lone tombstone).
    Missing,
    /// The node's stored record is damaged.
    Damaged,
    /// The node has the record.
    Present {
        /// The winning version, as `<ms>.<counter>@<node>`.
        winner: String,
        /// Whether the winner is a tombstone.
        deleted: bool,
        /// How many conflict leaves it has.
        conflicts: usize,
        /// The whole merge state (not serialised), for repair.
        #[serde(skip)]
        state: IdState,
    },
}

impl Side {
    fn summary(&self) -> String {
        match self {
            Side::Missing => "missing".into(),
            Side::Damaged => "DAMAGED".into(),
            Side::Present {
                winner,
                deleted,
                conflicts,
                ..
            } => {
                let mut s = winner.clone();
                if *deleted {
                    s.push_str(" (deleted)");
                }
                if *conflicts > 0 {
                    s.push_str(&format!(" +{conflicts} conflicts"));
                }
                s
            }
        }
    }
}

/// A record the two nodes disagree on.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The record on node A.
    pub a: Side,
    /// The record on node B.
    pub b: Side,
}

impl Difference {
    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        format!(
            "{}/{}: A {} | B {}",
            self.entity,
            self.id,
            self.a.summary(),
            self.b.summary()
        )
    }
}

/// The result for one entity type.
#[derive(Clone, Debug, Serialize)]
pub struct EntityReport {
    /// The entity type.
    pub entity: EntityName,
    /// The scopes compared (empty: every scope).
    pub scopes: Vec<Scope>,
    /// Records on A counted in the hashes.
    pub records_a: u64,
    /// Records on B counted in the hashes.
    pub records_b: u64,
    /// Buckets compared record by record: hashes differ or hold a damaged record.
    pub differing_buckets: usize,
    /// The records that differ.
    pub differences: Vec<Difference>,
    /// Set with repair: records whose state the merge changed on A (a record sent that A
    /// already held as sent is not counted).
    pub repaired_a: usize,
    /// Records whose state the merge changed on B (with repair).
    pub repaired_b: usize,
    /// Whether a second pass agreed after repair; `None` without repair.
    pub converged_after_repair: Option<bool>,
    /// Records neither side can repair (damaged on one, absent on the other).
    pub unrepairable: Vec<Uuid>,
}

/// The result of comparing two nodes.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Node A's id.
    pub a: String,
    /// Node B's id.
    pub b: String,
    /// One report per entity type compared.
    pub entities: Vec<EntityReport>,
    /// Entity types only one of the nodes replicates, not compared.
    pub skipped: Vec<String>,
    /// What node A's anti-entropy loop last saw (`None`: a node without it).
    pub anti_entropy_a: Option<AntiEntropyStatus>,
    /// What node B's anti-entropy loop last saw.
    pub anti_entropy_b: Option<AntiEntropyStatus>,
}

impl VerifyReport {
    /// Whether the nodes agreed (before repair), on everything compared.
    pub fn agreed(&self) -> bool {
        self.entities.iter().all(|e| e.differences.is_empty())
    }

    /// Whether they agree now: agreed, or repair made them converge.
    pub fn consistent(&self) -> bool {
        self.entities
            .iter()
            .all(|e| e.differences.is_empty() || e.converged_after_repair == Some(true))
    }
}

/// One line on what a node's anti-entropy loop last saw, for `jetsync verify`.
pub fn describe_anti_entropy(status: Option<&AntiEntropyStatus>) -> String {
    let Some(s) = status else {
        return "not reported (a node of an older version)".into();
    };
    if !s.running && s.rounds == 0 {
        return "not running in this node's process".into();
    }
    let mut out = format!(
        "{} round(s); since start {} divergent record(s) found, {} healed, {} refused",
        s.rounds, s.divergent_total, s.healed_total, s.refused_total
    );
    if let Some(last) = &s.last {
        out.push_str(&format!(
            "; last round {} ({} peer(s), {} divergent, {} healed{})",
            last.result,
            last.peers.len(),
            last.divergent,
            last.healed,
            if last.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {}", last.errors.join("; "))
            }
        ));
    }
    out
}

/// Verifying or repairing failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A node API call failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A node's reply does not have the expected shape.
    #[error("node {node} sent an unexpected {what}: {detail}")]
    Reply {
        /// The node that sent it.
        node: String,
        /// Which reply it was.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A node keeps its records in another store format than this build: their record
    /// states cannot be compared or merged (a rolling upgrade not finished).
    #[error(
        "node {node} keeps records in store format {}, this jetsync in format {supported}: \
         record states cannot be compared across formats (they keep different conflict lists \
         for the same events); upgrade node {node} (its store is upgraded in place on open) and \
         verify again",
        if *found == 0 { "2 or older".to_string() } else { found.to_string() }
    )]
    StoreFormat {
        /// The node of the other format.
        node: String,
        /// The format it reported (0: none, a node of format 2 or older).
        found: u32,
        /// This build's format.
        supported: u32,
    },
    /// A node hashes records as another build does: records outside the default scope
    /// hash differently on the two whatever they hold, so differing hashes say nothing.
    #[error(
        "node {node} hashes records as {} jetsync does (hashing {found}, this one \
         {supported}): records outside the default scope hash differently on the two, so \
         the hashes cannot be compared; upgrade node {node} and verify again",
        if *found < *supported { "an older" } else { "a newer" }
    )]
    Hashing {
        /// The node of the other hashing.
        node: String,
        /// The hashing it reported (0: none, an older build).
        found: u32,
        /// This build's hashing.
        supported: u32,
    },
}

/// Differing buckets lead to comparing record states, which only nodes of this build's
/// store format can exchange.
pub(crate) fn check_formats(sides: [(&str, &VerifyHashes); 2]) -> Result<(), VerifyError> {
    if let Some((node, h)) = sides.iter().find(|(_, h)| h.format != FORMAT_VERSION) {
        return Err(VerifyError::StoreFormat {
            node: node.to_string(),
            found: h.format,
            supported: FORMAT_VERSION,
        });
    }
    match sides.iter().find(|(_, h)| h.hashing != HASHING) {
        Some((node, h)) => Err(VerifyError::Hashing {
            node: node.to_string(),
            found: h.hashing,
            supported: HASHING,
        }),
        None => Ok(()),
    }
}

/// Compares nodes `a` and `b` (optionally only `only` entity types); with `repair`,
/// merges each side's state of the differing records into the other.
pub async fn verify(
    api: &ApiClient,
    a: &str,
    b: &str,
    only: &[EntityName],
    repair: bool,
) -> Result<VerifyReport, VerifyError> {
    let api = api.clone().with_timeout(Duration::from_secs(120));
    let (filters_a, anti_entropy_a) = node_filters(&api, a).await?;
    let (filters_b, anti_entropy_b) = node_filters(&api, b).await?;
    let mut entities: Vec<EntityName> = if only.is_empty() {
        let mut all = entity_names(&api, a).await?;
        all.extend(entity_names(&api, b).await?);
        all.sort();
        all.dedup();
        all
    } else {
        only.to_vec()
    };
    entities.sort();
    let mut report = VerifyReport {
        a: a.into(),
        b: b.into(),
        entities: Vec::new(),
        skipped: Vec::new(),
        anti_entropy_a,
        anti_entropy_b,
    };
    for entity in entities {
        let Some(scopes) = common_scopes(&filters_a, &filters_b, &entity) else {
            report.skipped.push(entity.to_string());
            continue;
        };
        report
            .entities
            .push(verify_entity(&api, a, b, &entity, &scopes, repair).await?);
    }
    Ok(report)
}

/// The scopes of `entity` both filter lists replicate: `Some([])` for all of them, `None`
/// if one side does not replicate the entity (or they share no scope).
pub(crate) fn common_scopes(
    a: &[EntityFilter],
    b: &[EntityFilter],
    entity: &EntityName,
) -> Option<Vec<Scope>> {
    let scopes_of = |f: &[EntityFilter]| -> Option<Option<Vec<Scope>>> {
        if f.is_empty() {
            return Some(None);
        }
        let mine: Vec<&EntityFilter> = f.iter().filter(|x| &x.entity == entity).collect();
        if mine.is_empty() {
            return None;
        }
        if mine.iter().any(|x| x.scopes.is_empty()) {
            return Some(None);
        }
        Some(Some(mine.iter().flat_map(|x| x.scopes.clone()).collect()))
    };
    match (scopes_of(a)?, scopes_of(b)?) {
        (None, None) => Some(Vec::new()),
        (Some(s), None) | (None, Some(s)) => Some(s),
        (Some(x), Some(y)) => {
            let both: Vec<Scope> = x.into_iter().filter(|s| y.contains(s)).collect();
            (!both.is_empty()).then_some(both)
        }
    }
}

/// A node's entity filters and, if it reports one, its anti-entropy status (from `status`).
pub(crate) async fn node_filters(
    api: &ApiClient,
    node: &str,
) -> Result<(Vec<EntityFilter>, Option<AntiEntropyStatus>), VerifyError> {
    let status = api.call(node, "status", json!({})).await?;
    let filters =
        serde_json::from_value(status["entities"].clone()).map_err(|e| VerifyError::Reply {
            node: node.into(),
            what: "status",
            detail: e.to_string(),
        })?;
    // A node of an older version reports none.
    let anti_entropy = serde_json::from_value(status["anti_entropy"].clone()).ok();
    Ok((filters, anti_entropy))
}

pub(crate) async fn entity_names(
    api: &ApiClient,
    node: &str,
) -> Result<Vec<EntityName>, VerifyError> {
    let digests = api.call(node, "digest", json!({})).await?;
    let names = digests
        .as_object()
        .map(|m| m.keys().filter_map(|k| EntityName::new(k).ok()).collect())
        .unwrap_or_default();
    Ok(names)
}

async fn hashes(
    api: &ApiClient,
    node: &str,
    entity: &EntityName,
    scopes: &[Scope],
) -> Result<VerifyHashes, VerifyError> {
    let v = api
        .call(
            node,
            "verify_hashes",
            json!({"entity": entity, "scopes": scopes}),
        )
        .await?;
    serde_json::from_value(v).map_err(|e| VerifyError::Reply {
        node: node.into(),
        what: "verify_hashes reply",
        detail: e.to_string(),
    })
}

/// The records of one page (`None` for a damaged one) and where the next starts.
pub(crate) type RecordsPage = (BTreeMap<Uuid, Option<IdState>>, Option<Uuid>);

/// One page of the records in `buckets` on `node`, after `after`, from `op`
/// (`bucket_records`, or anti-entropy's `sync_records`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn records_page(
    api: &ApiClient,
    node: &str,
    op: &str,
    entity: &EntityName,
    scopes: &[Scope],
    buckets: &[usize],
    cells: Option<&std::collections::BTreeSet<u16>>,
    after: Option<Uuid>,
    limit: usize,
) -> Result<RecordsPage, VerifyError> {
    let mut body = json!({"entity": entity, "scopes": scopes, "buckets": buckets, "after": after, "limit": limit, "format": FORMAT_VERSION});
    if let Some(cells) = cells {
        // The cells narrow the buckets (anti-entropy's `sync_records` only).
        body["cells"] = json!(cells);
    }
    let page = api.call(node, op, body).await?;
    let bad = |detail: String| VerifyError::Reply {
        node: node.into(),
        what: "record states reply",
        detail,
    };
    let mut out = BTreeMap::new();
    for r in page["records"].as_array().cloned().unwrap_or_default() {
        let id: Uuid = serde_json::from_value(r["id"].clone()).map_err(|e| bad(e.to_string()))?;
        let state = if r["state"] == "damaged" {
            None
        } else {
            Some(serde_json::from_value(r["state"].clone()).map_err(|e| bad(e.to_string()))?)
        };
        out.insert(id, state);
    }
    let next = match page["next"].as_str() {
        Some(n) => Some(n.parse().map_err(|e: uuid::Error| bad(e.to_string()))?),
        None => None,
    };
    Ok((out, next))
}

/// Every record in `buckets` on `node`: `None` for a damaged one.
async fn bucket_records(
    api: &ApiClient,
    node: &str,
    entity: &EntityName,
    scopes: &[Scope],
    buckets: &[usize],
) -> Result<BTreeMap<Uuid, Option<IdState>>, VerifyError> {
    let mut out = BTreeMap::new();
    let mut after: Option<Uuid> = None;
    loop {
        let (page, next) = records_page(
            api,
            node,
            "bucket_records",
            entity,
            scopes,
            buckets,
            None,
            after,
            500,
        )
        .await?;
        out.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

fn side(slot: Option<&Option<IdState>>) -> Side {
    match slot {
        None => Side::Missing,
        Some(None) => Side::Damaged,
        Some(Some(state)) => Side::Present {
            winner: state
                .winner()
                .map(|w| w.version.to_string())
                .unwrap_or_default(),
            deleted: state.live().is_none(),
            conflicts: state.conflicts().len(),
            state: state.clone(),
        },
    }
}

fn leaves_equal(a: &IdState, b: &IdState) -> bool {
    a.leaves().eq(b.leaves())
}

async fn verify_entity(
    api: &ApiClient,
    a: &str,
    b: &str,
    entity: &EntityName,
    scopes: &[Scope],
    repair: bool,
) -> Result<EntityReport, VerifyError> {
    let (ha, hb) = futures::try_join!(
        hashes(api, a, entity, scopes),
        hashes(api, b, entity, scopes)
    )?;
    let mut buckets: Vec<usize> = (0..ha.buckets.len().min(hb.buckets.len()))
        .filter(|&i| ha.buckets[i] != hb.buckets[i])
        .collect();
    // Damaged records count as absent in the hashes; their buckets are compared too.
    for id in ha.damaged.iter().chain(&hb.damaged) {
        buckets.push(crate::digest::bucket_of(id));
    }
    buckets.sort_unstable();
    buckets.dedup();
    let mut report = EntityReport {
        entity: entity.clone(),
        scopes: scopes.to_vec(),
        records_a: ha.records,
        records_b: hb.records,
        differing_buckets: buckets.len(),
        differences: Vec::new(),
        repaired_a: 0,
        repaired_b: 0,
        converged_after_repair: None,
        unrepairable: Vec::new(),
    };
    if buckets.is_empty() {
        return Ok(report);
    }
    check_formats([(a, &ha), (b, &hb)])?;
    let (ra, rb) = futures::try_join!(
        bucket_records(api, a, entity, scopes, &buckets),
        bucket_records(api, b, entity, scopes, &buckets)
    )?;
    let mut ids: Vec<Uuid> = ra.keys().chain(rb.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for id in ids {
        let (sa, sb) = (ra.get(&id), rb.get(&id));
        let same = matches!((sa, sb), (Some(Some(x)), Some(Some(y))) if leaves_equal(x, y));
        if same {
            continue;
        }
        report.differences.push(Difference {
            entity: entity.clone(),
            id,
            a: side(sa),
            b: side(sb),
        });
        if let (Some(None) | None, Some(None) | None) = (sa, sb) {
            report.unrepairable.push(id);
        }
        if let Some(Some(x)) = sa {
            to_b.push(StateEntry {
                id,
                state: x.clone(),
            });
        }
        if let Some(Some(y)) = sb {
            to_a.push(StateEntry {
                id,
                state: y.clone(),
            });
        }
        // A record one side does not hold at all: the other side gets an empty state, so
        // it republishes its own versions of it (the stream may have lost them).
        if let (Some(Some(_)), None) = (sa, sb) {
            to_a.push(StateEntry {
                id,
                state: IdState::default(),
            });
        }
        if let (None, Some(Some(_))) = (sa, sb) {
            to_b.push(StateEntry {
                id,
                state: IdState::default(),
            });
        }
    }
    if repair {
        report.repaired_a = send_states(api, a, entity, to_a).await?;
        report.repaired_b = send_states(api, b, entity, to_b).await?;
        let (ha, hb) = futures::try_join!(
            hashes(api, a, entity, scopes),
            hashes(api, b, entity, scopes)
        )?;
        report.converged_after_repair =
            Some(ha.buckets == hb.buckets && ha.damaged.is_empty() && hb.damaged.is_empty());
    }
    Ok(report)
}

/// Sends states to `node` for merging; returns how many records it changed (a record it
/// already held as sent is not counted).
async fn send_states(
    api: &ApiClient,
    node: &str,
    entity: &EntityName,
    states: Vec<StateEntry>,
) -> Result<usize, VerifyError> {
    if states.is_empty() {
        return Ok(0);
    }
    let replies = api
        .call_batched(
            node,
            "merge_records",
            "states",
            &states,
            json!({"entity": entity, "format": FORMAT_VERSION}),
        )
        .await?;
    Ok(replies
        .iter()
        .map(|r| {
            // `changed` includes damaged records replaced.
            usize::try_from(r["changed"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX)
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(format: u32) -> VerifyHashes {
        VerifyHashes {
            buckets: vec![],
            damaged: vec![],
            records: 0,
            format,
            hashing: HASHING,
        }
    }

    #[test]
    fn hashes_are_compared_only_between_nodes_that_hash_alike() {
        let this = hashes(FORMAT_VERSION);
        // An older build's reply has no `hashing`.
        let mut old: serde_json::Value = serde_json::to_value(&this).unwrap();
        old.as_object_mut().unwrap().remove("hashing");
        let old: VerifyHashes = serde_json::from_value(old).unwrap();
        assert_eq!(old.hashing, 0);
        let e = check_formats([("a", &this), ("b", &old)]).unwrap_err();
        assert!(matches!(&e, VerifyError::Hashing { node, found: 0, .. } if node == "b"));
        let text = e.to_string();
        assert!(
            text.contains("an older jetsync") && text.contains("upgrade node b"),
            "{text}"
        );
    }

    #[test]
    fn states_are_compared_only_between_nodes_of_this_format() {
        let (this, old) = (hashes(FORMAT_VERSION), hashes(0));
        assert!(check_formats([("a", &this), ("b", &this)]).is_ok());
        let e = check_formats([("a", &this), ("b", &old)]).unwrap_err();
        assert!(matches!(&e, VerifyError::StoreFormat { node, found: 0, .. } if node == "b"));
        let text = e.to_string();
        assert!(
            text.contains("store format 2 or older") && text.contains("upgrade node b"),
            "{text}"
        );
    }
}
