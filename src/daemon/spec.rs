//! `DiskSpec`: one disk to serve, parsed alike from `--disk`, from a
//! `[[disk]]` table of the config file and from the control API.

use std::path::PathBuf;

use serde::Serialize;

/// Most queues a disk may have.
pub const MAX_QUEUES: u16 = 64;

/// Where a disk's base comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSource {
    /// A local raw file, served as is.
    Base(PathBuf),
    /// An image in the store, by name or id.
    Image(String),
}

/// One disk: its socket, its overlay, its base and how it is presented.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskSpec {
    pub name: String,
    pub socket: PathBuf,
    pub overlay: PathBuf,
    pub source: DiskSource,
    pub queues: u16,
    pub readonly: bool,
    pub serial: String,
    pub record_trace: Option<PathBuf>,
    /// Trace recording window: seconds after attach, and MiB read.
    pub trace_secs: u64,
    pub trace_mib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("disk spec field {0:?} needs a value")]
    NeedsValue(String),
    #[error("disk spec field {0:?} takes no value (write just {0})")]
    TakesNoValue(String),
    #[error("unknown disk spec field {0:?}")]
    UnknownField(String),
    #[error("disk spec names both image= and base=")]
    BothSources,
    #[error("disk spec field {0:?} is given twice")]
    Repeated(String),
    #[error("queues={0}: must be a number from 1 to {MAX_QUEUES}")]
    Queues(String),
    #[error("serial={0}: at most 20 bytes")]
    Serial(String),
    #[error("{0}={1}: must be a positive number")]
    NotPositive(String, String),
    #[error("disk spec needs name=")]
    NoName,
    #[error("disk name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("disk {0}: needs {1}")]
    Missing(String, &'static str),
    #[error("disk spec field {0:?}: {1}")]
    BadType(String, &'static str),
}

impl SpecError {
    /// The field the error is about, if one.
    pub fn field(&self) -> Option<&str> {
        match self {
            SpecError::NeedsValue(k)
            | SpecError::TakesNoValue(k)
            | SpecError::UnknownField(k)
            | SpecError::Repeated(k)
            | SpecError::NotPositive(k, _)
            | SpecError::BadType(k, _) => Some(k),
            SpecError::Queues(_) => Some("queues"),
            SpecError::Serial(_) => Some("serial"),
            SpecError::BadName(_) => Some("name"),
            SpecError::BothSources => Some("image"),
            SpecError::NoName | SpecError::Missing(..) => None,
        }
    }
}

/// One field's value: `Some(text)` for `key=text`, `None` for a bare flag.
pub type FieldValue = Option<String>;

impl DiskSpec {
    /// Builds a spec from `(key, value)` fields, the one parser behind every
    /// way a disk is named.
    pub fn from_fields(fields: impl IntoIterator<Item = (String, FieldValue)>) -> Result<Self, SpecError> {
        let (mut name, mut socket, mut overlay, mut source, mut serial, mut record_trace) =
            (None, None, None, None, None, None);
        let mut queues = 1u16;
        let (mut trace_secs, mut trace_mib) = (120u64, 4096u64);
        let mut readonly = false;
        let mut seen = std::collections::HashSet::new();
        for (key, value) in fields {
            if !seen.insert(key.clone()) {
                return Err(SpecError::Repeated(key));
            }
            let need = |v: FieldValue| match v {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(SpecError::NeedsValue(key.clone())),
            };
            match key.as_str() {
                "name" => name = Some(need(value)?),
                "socket" => socket = Some(PathBuf::from(need(value)?)),
                "overlay" => overlay = Some(PathBuf::from(need(value)?)),
                "base" | "image" if source.is_some() => return Err(SpecError::BothSources),
                "base" => source = Some(DiskSource::Base(PathBuf::from(need(value)?))),
                "image" => source = Some(DiskSource::Image(need(value)?)),
                "queues" => {
                    let v = need(value)?;
                    queues = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUES).contains(q))
                        .ok_or(SpecError::Queues(v))?;
                }
                "readonly" => match value {
                    None => readonly = true,
                    Some(_) => return Err(SpecError::TakesNoValue(key)),
                },
                "serial" => {
                    let v = need(value)?;
                    if v.len() > 20 {
                        return Err(SpecError::Serial(v));
                    }
                    serial = Some(v);
                }
                "record-trace" => record_trace = Some(PathBuf::from(need(value)?)),
                "trace-secs" | "trace-mib" => {
                    let v = need(value)?;
                    let n: u64 = v
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| SpecError::NotPositive(key.clone(), v.clone()))?;
                    if key == "trace-secs" {
                        trace_secs = n;
                    } else {
                        trace_mib = n;
                    }
                }
                _ => return Err(SpecError::UnknownField(key)),
            }
        }
        let name = name.ok_or(SpecError::NoName)?;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(SpecError::BadName(name));
        }
        Ok(DiskSpec {
            socket: socket.ok_or_else(|| SpecError::Missing(name.clone(), "socket="))?,
            overlay: overlay.ok_or_else(|| SpecError::Missing(name.clone(), "overlay="))?,
            source: source.ok_or_else(|| SpecError::Missing(name.clone(), "image= or base="))?,
            queues,
            readonly,
            serial: serial.unwrap_or_else(|| name.chars().take(20).collect()),
            record_trace,
            trace_secs,
            trace_mib,
            name,
        })
    }

    /// From a table of typed values (a `[[disk]]` table, a JSON object):
    /// strings and numbers are field values, `readonly = true` is the flag.
    pub fn from_table<'a>(table: impl IntoIterator<Item = (&'a str, Scalar)>) -> Result<Self, SpecError> {
        let mut fields = Vec::new();
        for (key, value) in table {
            match value {
                Scalar::Str(s) => fields.push((key.to_string(), Some(s))),
                Scalar::Int(n) => fields.push((key.to_string(), Some(n.to_string()))),
                Scalar::Bool(true) if key == "readonly" => fields.push((key.to_string(), None)),
                Scalar::Bool(false) if key == "readonly" => {}
                Scalar::Bool(_) => {
                    return Err(SpecError::BadType(key.to_string(), "a string or number, not a boolean"))
                }
                Scalar::Other => return Err(SpecError::BadType(key.to_string(), "a string, number or boolean")),
            }
        }
        Self::from_fields(fields)
    }

    /// From a JSON value: the SPEC string, or an object of its fields.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, SpecError> {
        match v {
            serde_json::Value::String(s) => s.parse(),
            serde_json::Value::Object(map) => Self::from_table(map.iter().map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => Scalar::Str(s.clone()),
                    serde_json::Value::Bool(b) => Scalar::Bool(*b),
                    serde_json::Value::Number(n) => n.as_i64().map_or(Scalar::Other, Scalar::Int),
                    _ => Scalar::Other,
                };
                (k.as_str(), s)
            })),
            _ => Err(SpecError::BadType(
                "spec".into(),
                "a SPEC string or an object of its fields",
            )),
        }
    }

    /// The spec in `--disk` form.
    pub fn to_spec_string(&self) -> String {
        let mut s = format!(
            "name={},socket={},overlay={},",
            self.name,
            self.socket.display(),
            self.overlay.display()
        );
        match &self.source {
            DiskSource::Base(p) => s += &format!("base={}", p.display()),
            DiskSource::Image(i) => s += &format!("image={i}"),
        }
        s += &format!(",queues={},serial={}", self.queues, self.serial);
        if self.readonly {
            s += ",readonly";
        }
        if let Some(t) = &self.record_trace {
            s += &format!(
                ",record-trace={},trace-secs={},trace-mib={}",
                t.display(),
                self.trace_secs,
                self.trace_mib
            );
        }
        s
    }
}

/// A typed value of a table field.
#[derive(Clone, Debug)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Bool(bool),
    Other,
}

impl std::str::FromStr for DiskSpec {
    type Err = SpecError;

    /// `name=N,socket=PATH,...`: comma-separated fields, `key=value` or a bare flag.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        DiskSpec::from_fields(spec.split(',').map(|field| match field.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (field.to_string(), None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_parses_every_field() {
        let d: DiskSpec = "name=vm1,socket=/run/a.sock,overlay=/var/o1,base=/img/base.raw,queues=4,readonly,serial=SN1"
            .parse()
            .unwrap();
        assert_eq!(
            d,
            DiskSpec {
                name: "vm1".into(),
                socket: "/run/a.sock".into(),
                overlay: "/var/o1".into(),
                source: DiskSource::Base("/img/base.raw".into()),
                queues: 4,
                readonly: true,
                serial: "SN1".into(),
                record_trace: None,
                trace_secs: 120,
                trace_mib: 4096,
            }
        );
        let d: DiskSpec = "name=vm2,socket=s,overlay=o,image=debian".parse().unwrap();
        assert_eq!(d.source, DiskSource::Image("debian".into()));
        assert_eq!(d.serial, "vm2");
        assert_eq!(d.queues, 1);
    }

    #[test]
    fn disk_spec_rejects_bad_input_with_the_reason() {
        for (spec, why) in [
            ("socket=s,overlay=o,base=b", "needs name="),
            ("name=a,overlay=o,base=b", "needs socket="),
            ("name=a,socket=s,base=b", "needs overlay="),
            ("name=a,socket=s,overlay=o", "needs image= or base="),
            ("name=a,socket=s,overlay=o,base=b,image=i", "both"),
            ("name=a,socket=s,overlay=o,base=b,queues=0", "from 1 to"),
            ("name=a,socket=s,overlay=o,base=b,queues=x", "from 1 to"),
            ("name=a,socket=s,overlay=o,base=b,colour=red", "unknown"),
            (
                "name=a,socket=s,overlay=o,base=b,serial=123456789012345678901",
                "20 bytes",
            ),
            ("name=a/b,socket=s,overlay=o,base=b", "letters"),
            ("name=a,socket=,overlay=o,base=b", "needs a value"),
            ("name=a,socket=s,overlay=o,base=b,readonly=yes", "takes no value"),
            ("name=a,name=b,socket=s,overlay=o,base=b", "twice"),
            ("name=a,socket=s,overlay=o,base=b,trace-secs=0", "positive"),
        ] {
            let err = spec.parse::<DiskSpec>().unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn json_object_and_string_give_the_same_spec() {
        let s: DiskSpec = "name=a,socket=s,overlay=o,image=i,queues=2,readonly".parse().unwrap();
        let obj = serde_json::json!({
            "name": "a", "socket": "s", "overlay": "o", "image": "i", "queues": 2, "readonly": true
        });
        assert_eq!(DiskSpec::from_json(&obj).unwrap(), s);
        let text = serde_json::json!("name=a,socket=s,overlay=o,image=i,queues=2,readonly");
        assert_eq!(DiskSpec::from_json(&text).unwrap(), s);
        assert_eq!(s.to_spec_string().parse::<DiskSpec>().unwrap(), s);
        let e = DiskSpec::from_json(&serde_json::json!({"name": "a", "queues": [1]})).unwrap_err();
        assert!(e.to_string().contains("queues"), "{e}");
        let e = DiskSpec::from_json(&serde_json::json!(7)).unwrap_err();
        assert!(e.to_string().contains("SPEC"), "{e}");
        let e = DiskSpec::from_json(&serde_json::json!({"name": true})).unwrap_err();
        assert!(e.to_string().contains("boolean"), "{e}");
    }
}
