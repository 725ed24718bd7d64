//! A small namespace-aware XML tree for SOAP responses: `xsi:type` resolved by namespace
//! (whatever its prefix), size, depth and element-count limits, and no DTDs or entities.
//!
//! vSphere answers are polymorphic (`<backing xsi:type="VirtualDiskFlatVer2BackingInfo">`),
//! which serde cannot dispatch on, so responses become a tree of [`Element`]s that the typed
//! model reads by name.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;

/// The namespace of SOAP envelopes.
pub const SOAP_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The vSphere API namespace.
pub const VIM25: &str = "urn:vim25";
/// The XML Schema instance namespace (`xsi:type`).
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// What a parse may consume. Every response is parsed under limits, so a hostile or broken
/// server cannot make the client allocate without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest document in bytes.
    pub max_bytes: usize,
    /// The deepest nesting of elements.
    pub max_depth: usize,
    /// The most elements in one document.
    pub max_elements: usize,
}

impl Default for Limits {
    /// Room for a property-collector page of thousands of VMs with all their devices.
    fn default() -> Self {
        Self { max_bytes: 256 << 20, max_depth: 96, max_elements: 4_000_000 }
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML at byte {offset}: {message}")]
pub struct XmlError {
    /// Where in the input.
    pub offset: u64,
    /// What was wrong.
    pub message: String,
}

/// Which namespace an element is in, as far as the client cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ns {
    /// `urn:vim25`.
    Vim25,
    /// The SOAP envelope namespace.
    SoapEnv,
    /// No namespace.
    None,
    /// Any other.
    Other(String),
}

/// One element: its name, its `xsi:type` and MoRef `type` attribute, its children and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The namespace.
    pub ns: Ns,
    /// The local name.
    pub name: String,
    /// The local part of `xsi:type` (`VirtualDisk`, `string`, `ArrayOfManagedObjectReference`).
    pub xsi_type: Option<String>,
    /// The unqualified `type` attribute a managed object reference carries.
    pub type_attr: Option<String>,
    /// Child elements in order.
    pub children: Vec<Element>,
    /// The text directly inside (entities resolved), concatenated.
    pub text: String,
}

impl Element {
    /// An element with a name and nothing else (for tests and the simulator).
    pub fn new(name: &str) -> Self {
        Self {
            ns: Ns::Vim25,
            name: name.to_owned(),
            xsi_type: None,
            type_attr: None,
            children: Vec::new(),
            text: String::new(),
        }
    }

    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child called `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The element at a dotted path of child names (`config.hardware`).
    pub fn path(&self, path: &str) -> Option<&Element> {
        path.split('.').try_fold(self, |e, step| e.child(step))
    }

    /// The text of the child `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// The child `name` parsed (numbers, booleans); `None` when absent or unparsable.
    pub fn parse_of<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.text_of(name).and_then(|t| t.trim().parse().ok())
    }

    /// The type this element declares: `xsi:type`, else its name.
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }
}

/// Parses a whole document into its root element.
pub fn parse(input: &[u8], limits: Limits) -> Result<Element, XmlError> {
    if input.len() > limits.max_bytes {
        return Err(XmlError {
            offset: 0,
            message: format!("the document is {} bytes, more than the limit of {}", input.len(), limits.max_bytes),
        });
    }
    let text = std::str::from_utf8(input)
        .map_err(|e| XmlError { offset: e.valid_up_to() as u64, message: "the document is not UTF-8".into() })?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    loop {
        let at = reader.buffer_position();
        let err = |message: String| XmlError { offset: at, message };
        let (ns, event) = reader.read_resolved_event().map_err(|e| err(e.to_string()))?;
        let ns = match ns {
            ResolveResult::Bound(n) => match n.0 {
                SOAP_ENV => Ns::SoapEnv,
                VIM25 => Ns::Vim25,
                other => Ns::Other(other.to_owned()),
            },
            ResolveResult::Unbound => Ns::None,
            ResolveResult::Unknown(p) => return Err(err(format!("undeclared namespace prefix {p:?}"))),
        };
        match event {
            Event::Start(e) | Event::Empty(e) if root.is_some() => {
                let _ = e;
                return Err(err("content after the root element".into()));
            }
            Event::Start(e) => {
                elements += 1;
                if elements > limits.max_elements {
                    return Err(err(format!("more than {} elements", limits.max_elements)));
                }
                if stack.len() >= limits.max_depth {
                    return Err(err(format!("nesting deeper than {}", limits.max_depth)));
                }
                stack.push(open(&reader, &e, ns).map_err(err)?);
            }
            Event::Empty(e) => {
                elements += 1;
                if elements > limits.max_elements {
                    return Err(err(format!("more than {} elements", limits.max_elements)));
                }
                let el = open(&reader, &e, ns).map_err(err)?;
                attach(&mut stack, &mut root, el);
            }
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                let el = stack.pop().ok_or_else(|| err("an end tag without a start".into()))?;
                attach(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                let t = t.xml10_content();
                push_text(&mut stack, &t).map_err(err)?;
            }
            Event::CData(t) => {
                let t = t.into_inner().into_owned();
                push_text(&mut stack, &t).map_err(err)?;
            }
            Event::GeneralRef(r) => {
                let name = r.into_inner();
                let c = resolve_entity(&name).ok_or_else(|| err(format!("unknown entity &{name};")))?;
                let mut b = [0u8; 4];
                push_text(&mut stack, c.encode_utf8(&mut b)).map_err(err)?;
            }
            Event::DocType(_) => return Err(err("DTDs are not accepted".into())),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError { offset: input.len() as u64, message: "the document ends inside an element".into() });
    }
    root.ok_or_else(|| XmlError { offset: 0, message: "the document has no element".into() })
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

fn push_text(stack: &mut [Element], t: &str) -> Result<(), String> {
    match stack.last_mut() {
        Some(e) => {
            e.text.push_str(t);
            Ok(())
        }
        None if t.trim().is_empty() => Ok(()),
        None => Err("text outside the root element".into()),
    }
}

/// The five predefined entities and character references; nothing else.
fn resolve_entity(name: &str) -> Option<char> {
    match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        _ => {
            let num = name.strip_prefix('#')?;
            let code = match num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => num.parse().ok()?,
            };
            char::from_u32(code).filter(|c| *c != '\0')
        }
    }
}

fn open(reader: &NsReader<&[u8]>, e: &BytesStart<'_>, ns: Ns) -> Result<Element, String> {
    let name = e.local_name().as_ref().to_owned();
    let (mut xsi_type, mut type_attr) = (None, None);
    for a in e.attributes() {
        let a = a.map_err(|e| format!("bad attribute in <{name}>: {e}"))?;
        let (ans, local) = reader.resolver().resolve_attribute(a.key);
        if local.as_ref() != "type" {
            continue;
        }
        let value: Cow<'_, str> = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| format!("bad attribute in <{name}>: {e}"))?;
        match ans {
            ResolveResult::Bound(n) if n.0 == XSI => {
                // `vim25:VirtualDisk` or `VirtualDisk`: the type's local part.
                let v = value.rsplit(':').next().unwrap_or_default();
                xsi_type = Some(v.to_owned());
            }
            ResolveResult::Unbound => type_attr = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(Element { ns, name, xsi_type, type_attr, children: Vec::new(), text: String::new() })
}

/// Escapes text for element content and attribute values.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Element, XmlError> {
        parse(s.as_bytes(), Limits::default())
    }

    #[test]
    fn xsi_type_is_resolved_by_namespace_not_prefix() {
        let doc = r#"<r xmlns="urn:vim25" xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"
            xmlns:xsi="urn:not-the-schema-instance">
            <a XMLSchema-instance:type="VirtualDisk"/>
            <b xsi:type="Decoy"/>
            <c type="VirtualMachine">vm-1</c></r>"#;
        let r = p(doc).unwrap();
        assert_eq!(r.ns, Ns::Vim25);
        assert_eq!(r.child("a").unwrap().xsi_type.as_deref(), Some("VirtualDisk"));
        assert_eq!(r.child("b").unwrap().xsi_type, None);
        let c = r.child("c").unwrap();
        assert_eq!((c.type_attr.as_deref(), c.text.as_str()), (Some("VirtualMachine"), "vm-1"));
    }

    #[test]
    fn entities_and_character_references_resolve_and_nothing_else_does() {
        let r = p("<r>a &amp; b &lt;&#65;&#x42;&gt;</r>").unwrap();
        assert_eq!(r.text, "a & b <AB>");
        assert!(p("<r>&custom;</r>").unwrap_err().message.contains("unknown entity"));
        let dtd = r#"<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x "boom">]><r>&x;</r>"#;
        assert!(p(dtd).unwrap_err().message.contains("DTD"));
    }

    #[test]
    fn limits_refuse_with_a_reason() {
        let deep = "<a>".repeat(200) + &"</a>".repeat(200);
        assert!(p(&deep).unwrap_err().message.contains("nesting"));
        let many = format!("<r>{}</r>", "<x/>".repeat(50));
        let small = Limits { max_elements: 10, ..Limits::default() };
        assert!(parse(many.as_bytes(), small).unwrap_err().message.contains("elements"));
        let tiny = Limits { max_bytes: 4, ..Limits::default() };
        assert!(parse(b"<r></r>", tiny).unwrap_err().message.contains("limit"));
    }

    #[test]
    fn broken_documents_are_errors() {
        for bad in ["", "<a>", "<a></b>", "<a/><b/>", "text", "<x:a/>", "<a>\u{0}</a>\u{0}"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&[0xff, 0xfe], Limits::default()).is_err());
    }

    #[test]
    fn escape_round_trips() {
        let s = r#"a<b>&"c'"#;
        let r = p(&format!("<r>{}</r>", escape(s))).unwrap();
        assert_eq!(r.text, s);
    }
}
