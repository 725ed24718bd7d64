//! The account's privileges: which privilege IDs the server knows (`privilegeList`) and which
//! of them the session holds on an entity (`HasPrivilegeOnEntity`). Asking about an ID the
//! server does not know fails the whole call on some releases, so callers filter through the
//! known list first ([`Client::has_privileges`] does).

use std::collections::{BTreeMap, HashSet};

use crate::error::Error;
use crate::session::Client;
use crate::soap::{MoRef, Request};

/// What the session holds on one entity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Each privilege asked that the server knows: held or not.
    pub known: BTreeMap<String, bool>,
    /// Privileges asked that the server does not know (not asked: on this release they do
    /// not exist, so nothing needs them).
    pub unknown: Vec<String>,
}

impl Held {
    /// The known privileges not held.
    pub fn missing(&self) -> Vec<&str> {
        self.known.iter().filter(|(_, held)| !**held).map(|(p, _)| p.as_str()).collect()
    }
}

impl Client {
    /// Every privilege ID the server knows.
    pub async fn privilege_ids(&self) -> Result<HashSet<String>, Error> {
        let auth = self
            .content()
            .authorization_manager
            .clone()
            .ok_or_else(|| Error::Protocol("the server has no authorization manager".into()))?;
        let list = self.property(&auth, "privilegeList").await?;
        Ok(list
            .map(|l| l.children.iter().filter_map(|p| p.text_of("privId")).map(|t| t.trim().to_owned()).collect())
            .unwrap_or_default())
    }

    /// Which of `wanted` this session holds on `entity`, asking only about the IDs in `known`
    /// (from [`Client::privilege_ids`]). An empty `known` (a server that lists no privileges,
    /// as vcsim) means asking one privilege per call ([`Client::has_privileges_one_by_one`]).
    pub async fn has_privileges(
        &self,
        entity: &MoRef,
        wanted: &[&str],
        known: &HashSet<String>,
    ) -> Result<Held, Error> {
        if known.is_empty() {
            return self.has_privileges_one_by_one(entity, wanted).await;
        }
        let (ask, unknown): (Vec<&str>, Vec<&str>) = wanted.iter().partition(|p| known.contains(**p));
        Ok(Held {
            known: self.ask_privileges(entity, &ask).await?.into_iter().collect(),
            unknown: unknown.iter().map(|p| (*p).to_owned()).collect(),
        })
    }

    /// One `HasPrivilegeOnEntity` call about `ask`, each paired with its answer.
    async fn ask_privileges(&self, entity: &MoRef, ask: &[&str]) -> Result<Vec<(String, bool)>, Error> {
        if ask.is_empty() {
            return Ok(Vec::new());
        }
        let auth = self
            .content()
            .authorization_manager
            .clone()
            .ok_or_else(|| Error::Protocol("the server has no authorization manager".into()))?;
        let session = self.session_key().ok_or_else(|| Error::Protocol("not logged in".into()))?;
        let mut req = Request::new("HasPrivilegeOnEntity", &auth);
        req.moref("entity", entity).text("sessionId", &session);
        for p in ask {
            req.text("privId", p);
        }
        let r = self.invoke(req).await?;
        let answers: Vec<bool> = r.children_named("returnval").map(|b| b.text.trim() == "true").collect();
        if answers.len() != ask.len() {
            return Err(Error::Protocol(format!(
                "HasPrivilegeOnEntity on {entity} answered {} times for {} privileges",
                answers.len(),
                ask.len()
            )));
        }
        Ok(ask.iter().map(|p| (*p).to_owned()).zip(answers).collect())
    }

    /// Which of `wanted` this session holds on `entity`, asking one privilege per call: for a
    /// server whose `privilegeList` is empty, so unknown IDs cannot be filtered out first. An
    /// ID the server refuses as invalid is counted unknown.
    pub async fn has_privileges_one_by_one(&self, entity: &MoRef, wanted: &[&str]) -> Result<Held, Error> {
        let mut held = Held::default();
        for p in wanted {
            match self.ask_privileges(entity, &[p]).await {
                Ok(answer) => held.known.extend(answer),
                Err(e) if e.fault().is_some_and(|f| f.kind == crate::FaultKind::InvalidArgument) => {
                    held.unknown.push((*p).to_owned());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(held)
    }
}
