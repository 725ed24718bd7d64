//! SOAP envelopes: building requests (parameters in WSDL order, optional ones omitted) and
//! reading responses, where an HTTP 500 with a `soapenv:Fault` becomes a typed [`Fault`].

use std::fmt::Display;

use crate::error::{Error, Fault};
use crate::xml::{self, Element, Limits, Ns, escape};

/// A managed object reference: its type and value (`VirtualMachine`, `vm-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// The managed object type.
    pub kind: String,
    /// The value.
    pub value: String,
}

impl MoRef {
    /// A reference.
    pub fn new(kind: &str, value: &str) -> Self {
        Self { kind: kind.to_owned(), value: value.to_owned() }
    }

    /// Reads `<x type="Kind">value</x>`.
    pub fn from_element(e: &Element) -> Option<Self> {
        let kind = e.type_attr.clone()?;
        let value = e.text.trim();
        (!value.is_empty()).then(|| Self { kind, value: value.to_owned() })
    }
}

impl Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A request body under construction.
#[derive(Debug)]
pub struct Request {
    method: String,
    this: MoRef,
    buf: String,
}

impl Request {
    /// Starts `method` on `this`.
    pub fn new(method: &str, this: &MoRef) -> Self {
        let mut buf = String::with_capacity(512);
        buf.push_str(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><"#,
        );
        buf.push_str(method);
        buf.push_str(r#" xmlns="urn:vim25">"#);
        let mut r = Self { method: method.to_owned(), this: this.clone(), buf };
        r.moref("_this", this);
        r
    }

    /// The method's name.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The object it is called on.
    pub fn this(&self) -> &MoRef {
        &self.this
    }

    /// `<tag type="Kind">value</tag>`.
    pub fn moref(&mut self, tag: &str, m: &MoRef) -> &mut Self {
        self.buf.push_str(&format!(r#"<{tag} type="{}">{}</{tag}>"#, escape(&m.kind), escape(&m.value)));
        self
    }

    /// `<tag type="Kind" xsi:type="ManagedObjectReference">value</tag>`, where the WSDL says
    /// `anyType` (an `ArrayUpdateSpec`'s `removeKey`).
    pub fn any_moref(&mut self, tag: &str, m: &MoRef) -> &mut Self {
        self.buf.push_str(&format!(
            r#"<{tag} type="{}" xsi:type="ManagedObjectReference">{}</{tag}>"#,
            escape(&m.kind),
            escape(&m.value)
        ));
        self
    }

    /// `<tag>value</tag>`, escaped.
    pub fn text(&mut self, tag: &str, value: impl Display) -> &mut Self {
        let v = value.to_string();
        self.buf.push_str(&format!("<{tag}>{}</{tag}>", escape(&v)));
        self
    }

    /// Escaped text inside the element opened last (one with attributes, such as
    /// `<value xsi:type="xsd:string">`).
    pub fn content(&mut self, value: impl Display) -> &mut Self {
        self.buf.push_str(&escape(&value.to_string()));
        self
    }

    /// `<tag>` when `value` is there; nothing otherwise (optional parameters are omitted).
    pub fn opt(&mut self, tag: &str, value: Option<impl Display>) -> &mut Self {
        if let Some(v) = value {
            self.text(tag, v);
        }
        self
    }

    /// Opens `<tag>` or `<tag xsi:type="T">`; close it with [`Request::close`].
    pub fn open(&mut self, tag: &str, xsi_type: Option<&str>) -> &mut Self {
        match xsi_type {
            Some(t) => self.buf.push_str(&format!(r#"<{tag} xsi:type="{t}">"#)),
            None => self.buf.push_str(&format!("<{tag}>")),
        }
        self
    }

    /// Closes `</tag>`.
    pub fn close(&mut self, tag: &str) -> &mut Self {
        self.buf.push_str(&format!("</{tag}>"));
        self
    }

    /// The finished envelope.
    pub fn finish(mut self) -> String {
        self.buf.push_str(&format!("</{}></soapenv:Body></soapenv:Envelope>", self.method));
        self.buf
    }
}

/// Reads a response: `Ok` with the `<MethodResponse>` element, or the fault it carries. The
/// HTTP status is checked by the caller (only 200 and 500 reach here).
pub fn parse_response(body: &[u8], method: &str, this: &MoRef, limits: Limits) -> Result<Element, Error> {
    let root =
        xml::parse(body, limits).map_err(|source| Error::Xml { context: format!("the answer to {method}"), source })?;
    if root.ns != Ns::SoapEnv || root.name != "Envelope" {
        return Err(Error::Protocol(format!("the answer to {method} is not a SOAP envelope (<{}>)", root.name)));
    }
    let body = root
        .children
        .into_iter()
        .find(|c| c.ns == Ns::SoapEnv && c.name == "Body")
        .ok_or_else(|| Error::Protocol(format!("the answer to {method} has no SOAP body")))?;
    let first = body
        .children
        .into_iter()
        .next()
        .ok_or_else(|| Error::Protocol(format!("the answer to {method} has an empty SOAP body")))?;
    if first.ns == Ns::SoapEnv && first.name == "Fault" {
        let message = first.text_of("faultstring").unwrap_or_default().to_owned();
        let detail = first.child("detail").and_then(|d| d.children.first());
        return Err(Error::Fault(Box::new(Fault::from_detail(detail, &message, method, Some(&this.to_string())))));
    }
    let want = format!("{method}Response");
    if first.name != want {
        return Err(Error::Protocol(format!("the answer to {method} is <{}>, not <{want}>", first.name)));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FaultKind;

    #[test]
    fn requests_escape_and_keep_order() {
        let mut r = Request::new("Login", &MoRef::new("SessionManager", "SessionManager"));
        r.text("userName", "a<b").text("password", "p&'\"").opt("locale", None::<&str>);
        let s = r.finish();
        assert!(s.contains(r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>a&lt;b</userName><password>p&amp;&apos;&quot;</password></Login>"#), "{s}");
        assert!(xml::parse(s.as_bytes(), Limits::default()).is_ok());
    }

    #[test]
    fn a_fault_becomes_typed_with_its_context() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode>
<faultstring>Error caused by file /vmfs/volumes/ds/vm/vm-000003.vmdk</faultstring>
<detail><FileFaultFault xmlns="urn:vim25" xsi:type="FileFault"><file>/vmfs/volumes/ds/vm/vm-000003.vmdk</file></FileFaultFault></detail>
</soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let this = MoRef::new("VirtualMachine", "vm-42");
        let e = parse_response(body.as_bytes(), "QueryChangedDiskAreas", &this, Limits::default()).unwrap_err();
        let f = e.fault().unwrap();
        assert_eq!((f.kind, f.type_name.as_str()), (FaultKind::FileFault, "FileFault"));
        assert_eq!(f.object.as_deref(), Some("VirtualMachine:vm-42"));
        assert!(
            e.to_string()
                .starts_with("QueryChangedDiskAreas failed on VirtualMachine:vm-42: FileFault: Error caused by file")
        );
    }

    #[test]
    fn the_wrong_response_element_is_a_protocol_error() {
        let body = r#"<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body><OtherResponse xmlns="urn:vim25"/></e:Body></e:Envelope>"#;
        let e = parse_response(body.as_bytes(), "Login", &MoRef::new("SessionManager", "S"), Limits::default());
        assert!(matches!(e, Err(Error::Protocol(m)) if m.contains("OtherResponse")));
    }
}
