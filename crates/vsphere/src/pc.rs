//! The property collector (`RetrievePropertiesEx` with `ContinueRetrievePropertiesEx`
//! paging), container views over the inventory, the search index and the server's clock.

use crate::error::{Error, Fault, FaultKind};
use crate::session::Client;
use crate::soap::{MoRef, Request};
use crate::xml::Element;

/// What to read: some properties of objects of one type, from a list of objects or
/// everything a container view holds.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    /// The managed object type (`VirtualMachine`).
    pub kind: String,
    /// Property paths (`name`, `config.hardware.device`).
    pub paths: Vec<String>,
    /// Which objects.
    pub objects: Objects,
}

/// The objects a [`FilterSpec`] reads.
#[derive(Debug, Clone)]
pub enum Objects {
    /// These ones.
    List(Vec<MoRef>),
    /// Everything in this container view.
    View(MoRef),
}

/// One object's properties as the server returned them.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// `(path, val)` pairs.
    pub props: Vec<(String, Element)>,
    /// Properties the server could not read, with why.
    pub missing: Vec<(String, Fault)>,
}

impl ObjectContent {
    /// The value of `path`.
    pub fn get(&self, path: &str) -> Option<&Element> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// The text of `path`.
    pub fn text(&self, path: &str) -> Option<&str> {
        self.get(path).map(|e| e.text.as_str())
    }
}

/// Objects per page asked of the server (a hint: it may send fewer).
pub const PAGE: u32 = 500;

impl Client {
    /// Reads the properties `spec` names, following the server's pages to the end.
    pub async fn retrieve(&self, spec: &FilterSpec) -> Result<Vec<ObjectContent>, Error> {
        match self.retrieve_once(spec).await {
            // vcsim (and some real servers) report an expired session per property, in
            // missingSet, rather than as a fault.
            Err(e) if e.fault().is_some_and(|f| f.kind == FaultKind::NotAuthenticated) && self.can_relogin() => {
                self.relogin("RetrievePropertiesEx", self.deadline()).await?;
                self.retrieve_once(spec).await
            }
            r => r,
        }
    }

    async fn retrieve_once(&self, spec: &FilterSpec) -> Result<Vec<ObjectContent>, Error> {
        let pc = self.content().property_collector.clone();
        let mut req = Request::new("RetrievePropertiesEx", &pc);
        req.open("specSet", None).open("propSet", None).text("type", &spec.kind);
        for p in &spec.paths {
            req.text("pathSet", p);
        }
        req.close("propSet");
        match &spec.objects {
            Objects::List(objs) => {
                for o in objs {
                    req.open("objectSet", None).moref("obj", o).close("objectSet");
                }
            }
            Objects::View(view) => {
                req.open("objectSet", None)
                    .moref("obj", view)
                    .text("skip", true)
                    .open("selectSet", Some("TraversalSpec"))
                    .text("name", "traverseView")
                    .text("type", "ContainerView")
                    .text("path", "view")
                    .text("skip", false)
                    .close("selectSet")
                    .close("objectSet");
            }
        }
        req.close("specSet").open("options", None).text("maxObjects", PAGE).close("options");
        let mut out = Vec::new();
        let mut r = self.invoke(req).await?;
        let mut pages = 0u32;
        loop {
            pages += 1;
            let (objects, token) = parse_result(&r)?;
            out.extend(objects);
            let Some(token) = token else { break };
            if pages > 1_000_000 {
                return Err(Error::Protocol("RetrievePropertiesEx: the server keeps sending pages".into()));
            }
            let mut next = Request::new("ContinueRetrievePropertiesEx", &pc);
            next.text("token", token);
            r = self.invoke(next).await?;
        }
        if let Some((path, f)) =
            out.iter().flat_map(|o| o.missing.iter()).find(|(_, f)| f.kind == FaultKind::NotAuthenticated)
        {
            let mut f = f.clone();
            f.message = format!("reading {path}: {}", f.message);
            return Err(Error::Fault(Box::new(f)));
        }
        Ok(out)
    }

    /// A view of every object of `kinds` under `container` (recursively).
    pub async fn create_container_view(&self, container: &MoRef, kinds: &[&str]) -> Result<MoRef, Error> {
        let vm = self
            .content()
            .view_manager
            .clone()
            .ok_or_else(|| Error::Protocol("the server has no view manager (ESXi before 4.0?)".into()))?;
        let mut req = Request::new("CreateContainerView", &vm);
        req.moref("container", container);
        for k in kinds {
            req.text("type", k);
        }
        req.text("recursive", true);
        let r = self.invoke(req).await?;
        r.child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol("CreateContainerView returned no view".into()))
    }

    /// Destroys a view made by [`Client::create_container_view`].
    pub async fn destroy_view(&self, view: &MoRef) -> Result<(), Error> {
        self.invoke(Request::new("DestroyView", view)).await.map(|_| ())
    }

    /// One property of one object, when the server has it.
    pub async fn property(&self, obj: &MoRef, path: &str) -> Result<Option<Element>, Error> {
        let spec = FilterSpec {
            kind: obj.kind.clone(),
            paths: vec![path.to_owned()],
            objects: Objects::List(vec![obj.clone()]),
        };
        let mut objs = self.retrieve(&spec).await?;
        Ok(objs.pop().and_then(|mut o| o.props.pop().filter(|(p, _)| p == path).map(|(_, v)| v)))
    }

    /// Every object of `kind` in the inventory with the properties `paths`.
    pub async fn inventory(&self, kind: &str, paths: &[&str]) -> Result<Vec<ObjectContent>, Error> {
        let root = self.content().root_folder.clone();
        self.inventory_in(&root, kind, paths).await
    }

    /// Every object of `kind` under `container` (a folder, datacenter, cluster or resource
    /// pool, recursively) with the properties `paths`.
    pub async fn inventory_in(
        &self,
        container: &MoRef,
        kind: &str,
        paths: &[&str],
    ) -> Result<Vec<ObjectContent>, Error> {
        let view = self.create_container_view(container, &[kind]).await?;
        let spec = FilterSpec {
            kind: kind.to_owned(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            objects: Objects::View(view.clone()),
        };
        let r = self.retrieve(&spec).await;
        if let Err(e) = self.destroy_view(&view).await {
            tracing::warn!("could not destroy the container view {view}: {e}");
        }
        r
    }

    /// A VM by its instance UUID (vCenter-unique, the stable key) or BIOS UUID.
    pub async fn find_vm_by_uuid(&self, uuid: &str, instance: bool) -> Result<Option<MoRef>, Error> {
        let mut req = Request::new("FindByUuid", &self.content().search_index);
        req.text("uuid", uuid).text("vmSearch", true).text("instanceUuid", instance);
        Ok(self.invoke(req).await?.child("returnval").and_then(MoRef::from_element))
    }

    /// An object by inventory path (`DC1/vm/Folder/VMName`).
    pub async fn find_by_inventory_path(&self, path: &str) -> Result<Option<MoRef>, Error> {
        let mut req = Request::new("FindByInventoryPath", &self.content().search_index);
        req.text("inventoryPath", path);
        Ok(self.invoke(req).await?.child("returnval").and_then(MoRef::from_element))
    }

    /// The server's clock (`2026-11-22T10:00:00.123Z`): snapshot ages are computed on it.
    pub async fn current_time(&self) -> Result<String, Error> {
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let r = self.invoke(Request::new("CurrentTime", &si)).await?;
        r.text_of("returnval")
            .map(|t| t.trim().to_owned())
            .ok_or_else(|| Error::Protocol("CurrentTime returned nothing".into()))
    }
}

/// Reads a `RetrievePropertiesEx` or `ContinueRetrievePropertiesEx` response: its objects,
/// and the token of the next page if there is one. An empty response means nothing matched.
pub fn parse_result(response: &Element) -> Result<(Vec<ObjectContent>, Option<String>), Error> {
    let Some(rv) = response.child("returnval") else { return Ok((Vec::new(), None)) };
    let objects = rv.children_named("objects").map(object_content).collect::<Result<Vec<_>, _>>()?;
    let token = rv.text_of("token").map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned);
    Ok((objects, token))
}

fn object_content(o: &Element) -> Result<ObjectContent, Error> {
    let obj = o
        .child("obj")
        .and_then(MoRef::from_element)
        .ok_or_else(|| Error::Protocol("an ObjectContent without obj".into()))?;
    let mut props = Vec::new();
    for p in o.children_named("propSet") {
        let (Some(name), Some(val)) = (p.text_of("name"), p.child("val")) else {
            return Err(Error::Protocol(format!("a property of {obj} without name or val")));
        };
        props.push((name.to_owned(), val.clone()));
    }
    let mut missing = Vec::new();
    for m in o.children_named("missingSet") {
        let path = m.text_of("path").unwrap_or_default().to_owned();
        let lmf = m.child("fault");
        let detail = lmf.and_then(|f| f.child("fault"));
        let message = lmf.and_then(|f| f.text_of("localizedMessage")).unwrap_or_default();
        missing
            .push((path.clone(), Fault::from_detail(detail, message, "RetrievePropertiesEx", Some(&obj.to_string()))));
    }
    Ok(ObjectContent { obj, props, missing })
}
