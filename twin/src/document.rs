//! Twin documents: the three sections, their versions and `$metadata`, merge patches and limits.
//!
//! A [`Twin`] holds `tags` (service-only, invisible to the device), `properties.desired`
//! (written by the service, read by the device) and `properties.reported` (written by the
//! device). Every write goes through one of [`Twin::patch_reported`], [`Twin::patch_service`]
//! or [`Twin::replace_service`], which validate the input (spec §3.6), merge it (§3.5) into a
//! copy, check the size limits on the *result*, and only then commit. A failed write leaves the
//! twin exactly as it was.
//!
//! Decisions where the spec leaves room (each pinned by a test below):
//! - A new twin has root `version` 2, both section `$version`s at 1 and etag counter 1
//!   (`AAAAAAAAAAE=`), whatever its initial content (§3.3 [OBS]).
//! - The etag counter moves on every service write (PATCH or PUT, even one that changes
//!   nothing) and never on a device reported patch (§3.3 [REC]); the root `version` moves on
//!   every write.
//! - Depth: the section root is depth 0; an object or array that is the value of a key of a
//!   depth-`d` container (or an element of a depth-`d` array) is at depth `d + 1`. Containers
//!   may sit at depth ≤ [`MAX_DEPTH`]; scalars may sit inside a depth-10 container. That is
//!   the example in Azure's documentation: `{"one":{…{"ten":{"property":"value"}}…}}` is valid,
//!   one more nested object is not.
//! - Keys beginning with `$` are silently dropped from service and device input at every
//!   object level of the section (so a twin fetched with `$metadata`/`$version` can be sent
//!   back); elsewhere `$` in a key is rejected. Arrays are opaque leaf values, stored verbatim
//!   (nulls included), but the key and value rules apply inside them and a `$`-key there is
//!   rejected rather than silently altered.
//! - A section (`tags`, `properties`, `properties.desired`) that is `null` in a service body is
//!   treated as absent, for both PATCH and PUT.
//! - The desired notification after a PATCH is the validated patch (nulls kept, `$`-keys
//!   dropped) plus `"$version"`.
//! - Size ([`section_size`]): `null` counts 4 bytes like a boolean, and every array element
//!   costs one extra byte, so that arrays of nulls or of empty containers are not free.
//! - Integers must lie in `-4503599627370496..=4503599627370495` (Azure's documented range,
//!   one more on the negative side than the positive). serde_json already reads integer
//!   literals beyond 64 bits as floats, which are allowed.
//!
//! Nothing here recurses without a depth guard: inputs nested deeper than the limits are
//! rejected before the walk goes further, and [`section_size`] is iterative.

use serde_json::{Map, Number, Value};

/// Size limit of `tags`, in bytes of [`section_size`].
pub const TAGS_LIMIT: usize = 8 * 1024;
/// Size limit of `properties.desired`.
pub const DESIRED_LIMIT: usize = 32 * 1024;
/// Size limit of `properties.reported`.
pub const REPORTED_LIMIT: usize = 32 * 1024;
/// Deepest level at which an object or array may sit below a section root (the root is 0).
pub const MAX_DEPTH: usize = 10;
/// Longest key, in UTF-8 bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest string value, in UTF-8 bytes.
pub const MAX_STRING_BYTES: usize = 4 * 1024;
/// Largest integer a twin value may hold (2^52 − 1).
pub const MAX_INTEGER: i64 = 4_503_599_627_370_495;
/// Smallest integer a twin value may hold (−2^52).
pub const MIN_INTEGER: i64 = -4_503_599_627_370_496;
/// Bytes [`section_size`] counts for a JSON `null` (only possible inside arrays).
pub const NULL_SIZE: usize = 4;

const LAST_UPDATED: &str = "$lastUpdated";
const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";
const METADATA: &str = "$metadata";
const VERSION: &str = "$version";

// Field names of the stored layout (see `Twin::to_value`).
const F_TAGS: &str = "tags";
const F_DESIRED: &str = "desired";
const F_REPORTED: &str = "reported";
const F_DESIRED_METADATA: &str = "desiredMetadata";
const F_REPORTED_METADATA: &str = "reportedMetadata";
const F_DESIRED_VERSION: &str = "desiredVersion";
const F_REPORTED_VERSION: &str = "reportedVersion";
const F_VERSION: &str = "version";
const F_ETAG_COUNTER: &str = "etagCounter";

/// Why a twin write was refused, or why a stored twin could not be read.
///
/// `section` and `path` use the service's dotted names: `tags`, `properties.desired`,
/// `properties.reported`, then keys, with `[i]` for array elements
/// (`properties.desired.fan[2].speed`). Over-long or control-character keys are shortened
/// and escaped in paths, so the messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TwinError {
    /// The body, a section, or `properties` is not a JSON object.
    #[error("{section} must be a JSON object")]
    NotAnObject { section: String },
    /// The section would exceed its size limit after the write.
    #[error("{section} would be {size} bytes, over its {limit}-byte limit")]
    TooLarge {
        section: String,
        size: usize,
        limit: usize,
    },
    /// An object or array is nested deeper than `limit` levels below the section root.
    #[error("{section} nests objects deeper than {limit} levels")]
    TooDeep { section: String, limit: usize },
    /// A key breaks the key rules.
    #[error("invalid key at {path}: {reason}")]
    InvalidKey { path: String, reason: &'static str },
    /// A value breaks the value rules.
    #[error("invalid value at {path}: {reason}")]
    InvalidValue { path: String, reason: &'static str },
    /// The stored document is not a twin this module wrote (or a counter would overflow).
    #[error("stored twin is corrupt: {0}")]
    Corrupt(String),
}

/// A device twin as stored: the three sections, desired and reported `$metadata`, the section
/// versions, the root version and the etag counter.
///
/// Invariants: the three sections and the two metadata trees are JSON objects; the sections
/// hold only valid keys and values within [`MAX_DEPTH`] (sizes may exceed the limits only if
/// the stored document did).
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    tags: Value,
    desired: Value,
    reported: Value,
    desired_metadata: Value,
    reported_metadata: Value,
    desired_version: u64,
    reported_version: u64,
    version: u64,
    etag_counter: u64,
}

impl Twin {
    /// A new twin, optionally seeded from an initial twin
    /// `{"tags":{…},"properties":{"desired":{…}}}` (other fields, including
    /// `properties.reported`, are ignored). The seed is validated like a service PUT.
    ///
    /// The result has `version` 2, desired and reported `$version` 1 and etag counter 1.
    pub fn new(initial: Option<&Value>, now: &str) -> Result<Twin, TwinError> {
        let stamp = Stamp::desired(now, 1);
        let (tags, desired) = match initial {
            Some(body) => {
                let parts = ServiceBody::parse(body, Mode::Replace)?;
                (
                    parts.tags.unwrap_or_default(),
                    parts.desired.unwrap_or_default(),
                )
            }
            None => (Map::new(), Map::new()),
        };
        check_size(&tags, Section::Tags)?;
        check_size(&desired, Section::Desired)?;
        let desired_metadata = build_object_metadata(&desired, &stamp);
        let mut reported_metadata = Map::new();
        Stamp::time_only(now).apply(&mut reported_metadata);
        Ok(Twin {
            tags: Value::Object(tags),
            desired: Value::Object(desired),
            reported: Value::Object(Map::new()),
            desired_metadata: Value::Object(desired_metadata),
            reported_metadata: Value::Object(reported_metadata),
            desired_version: 1,
            reported_version: 1,
            version: 2,
            etag_counter: 1,
        })
    }

    /// Reads a twin stored by [`Twin::to_value`]. Anything else is [`TwinError::Corrupt`]:
    /// missing or mistyped fields, sections breaking the key/value/depth rules, metadata
    /// nested deeper than the sections allow. Size limits are not checked here, so an
    /// oversize stored twin still loads and can be shrunk by a patch.
    pub fn from_value(v: &Value) -> Result<Twin, TwinError> {
        let root = v
            .as_object()
            .ok_or_else(|| corrupt("not a JSON object".to_owned()))?;
        let field = |name: &str| {
            root.get(name)
                .ok_or_else(|| corrupt(format!("missing field {name}")))
        };
        let section = |name: &str, section: Section| -> Result<Value, TwinError> {
            let value = field(name)?;
            if !value.is_object() {
                return Err(corrupt(format!("{name} is not an object")));
            }
            check_value(value, 0, &mut Path::new(section))
                .map_err(|e| corrupt(format!("{name}: {e}")))?;
            Ok(value.clone())
        };
        let metadata = |name: &str| -> Result<Value, TwinError> {
            let value = field(name)?;
            if !value.is_object() {
                return Err(corrupt(format!("{name} is not an object")));
            }
            // Metadata nodes of leaves sit one level below the deepest data container.
            if !containers_within(value, 0, MAX_DEPTH + 1) {
                return Err(corrupt(format!("{name} is nested too deeply")));
            }
            Ok(value.clone())
        };
        let counter = |name: &str| -> Result<u64, TwinError> {
            field(name)?
                .as_u64()
                .ok_or_else(|| corrupt(format!("{name} is not an unsigned integer")))
        };
        Ok(Twin {
            tags: section(F_TAGS, Section::Tags)?,
            desired: section(F_DESIRED, Section::Desired)?,
            reported: section(F_REPORTED, Section::Reported)?,
            desired_metadata: metadata(F_DESIRED_METADATA)?,
            reported_metadata: metadata(F_REPORTED_METADATA)?,
            desired_version: counter(F_DESIRED_VERSION)?,
            reported_version: counter(F_REPORTED_VERSION)?,
            version: counter(F_VERSION)?,
            etag_counter: counter(F_ETAG_COUNTER)?,
        })
    }

    /// The stored form: `{"tags":{…},"desired":{…},"reported":{…},"desiredMetadata":{…},
    /// "reportedMetadata":{…},"desiredVersion":N,"reportedVersion":M,"version":V,
    /// "etagCounter":E}`. Not a wire format; use the views for that.
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        out.insert(F_TAGS.into(), self.tags.clone());
        out.insert(F_DESIRED.into(), self.desired.clone());
        out.insert(F_REPORTED.into(), self.reported.clone());
        out.insert(F_DESIRED_METADATA.into(), self.desired_metadata.clone());
        out.insert(F_REPORTED_METADATA.into(), self.reported_metadata.clone());
        out.insert(F_DESIRED_VERSION.into(), self.desired_version.into());
        out.insert(F_REPORTED_VERSION.into(), self.reported_version.into());
        out.insert(F_VERSION.into(), self.version.into());
        out.insert(F_ETAG_COUNTER.into(), self.etag_counter.into());
        Value::Object(out)
    }

    /// A device's reported-properties PATCH (MQTT). Merges `patch` into `reported` (`null`
    /// deletes, `$`-keys ignored), bumps the reported `$version` and the root `version`, and
    /// updates the reported metadata. The etag does not change. Returns the new reported
    /// `$version`, for the `204` response topic.
    pub fn patch_reported(&mut self, patch: &Value, now: &str) -> Result<u64, TwinError> {
        let Value::Object(patch) = patch else {
            return Err(not_an_object(Section::Reported.name()));
        };
        let patch = sanitize_object(patch, 0, Mode::Patch, &mut Path::new(Section::Reported))?;
        let reported_version = bump(self.reported_version)?;
        let version = bump(self.version)?;
        let stamp = Stamp::time_only(now);
        let mut reported = object_clone(&self.reported);
        let mut metadata = object_clone(&self.reported_metadata);
        merge_patch(&mut reported, Some(&mut metadata), &patch, &stamp);
        stamp.apply(&mut metadata);
        check_size(&reported, Section::Reported)?;

        self.reported = Value::Object(reported);
        self.reported_metadata = Value::Object(metadata);
        self.reported_version = reported_version;
        self.version = version;
        Ok(reported_version)
    }

    /// A service `PATCH /twins/{id}`. The body is a twin fragment; only `tags` and
    /// `properties.desired` are used, both optional. Each present section is merged.
    ///
    /// If `properties.desired` was present, the desired `$version` goes up by one and the
    /// result is `Some(notification)`: the desired patch (nulls kept) with `"$version"` set
    /// to the new version, to publish on the desired-properties topic. Otherwise `None`.
    /// The etag counter and root `version` go up on every call that succeeds.
    pub fn patch_service(&mut self, body: &Value, now: &str) -> Result<Option<Value>, TwinError> {
        let parts = ServiceBody::parse(body, Mode::Patch)?;
        let etag_counter = bump(self.etag_counter)?;
        let version = bump(self.version)?;

        let tags = match &parts.tags {
            Some(patch) => {
                let mut tags = object_clone(&self.tags);
                merge_patch(&mut tags, None, patch, &Stamp::time_only(now));
                check_size(&tags, Section::Tags)?;
                Some(tags)
            }
            None => None,
        };
        let desired = match parts.desired {
            Some(patch) => {
                let desired_version = bump(self.desired_version)?;
                let stamp = Stamp::desired(now, desired_version);
                let mut desired = object_clone(&self.desired);
                let mut metadata = object_clone(&self.desired_metadata);
                merge_patch(&mut desired, Some(&mut metadata), &patch, &stamp);
                stamp.apply(&mut metadata);
                check_size(&desired, Section::Desired)?;
                let mut notification = patch;
                notification.insert(VERSION.into(), desired_version.into());
                Some((desired, metadata, desired_version, notification))
            }
            None => None,
        };

        if let Some(tags) = tags {
            self.tags = Value::Object(tags);
        }
        self.etag_counter = etag_counter;
        self.version = version;
        Ok(
            desired.map(|(desired, metadata, desired_version, notification)| {
                self.desired = Value::Object(desired);
                self.desired_metadata = Value::Object(metadata);
                self.desired_version = desired_version;
                Value::Object(notification)
            }),
        )
    }

    /// A service `PUT /twins/{id}`. Replaces `tags` and/or `properties.desired` with the
    /// body's, only for the sections present (nulls inside are dropped, `$`-keys ignored).
    ///
    /// If desired was replaced, its `$version` goes up by one, its metadata is rebuilt, and
    /// the result is `Some(full new desired document with "$version")`. Etag counter and
    /// root `version` go up on every call that succeeds.
    pub fn replace_service(&mut self, body: &Value, now: &str) -> Result<Option<Value>, TwinError> {
        let parts = ServiceBody::parse(body, Mode::Replace)?;
        let etag_counter = bump(self.etag_counter)?;
        let version = bump(self.version)?;
        if let Some(tags) = &parts.tags {
            check_size(tags, Section::Tags)?;
        }
        let desired = match parts.desired {
            Some(desired) => {
                check_size(&desired, Section::Desired)?;
                let desired_version = bump(self.desired_version)?;
                let metadata =
                    build_object_metadata(&desired, &Stamp::desired(now, desired_version));
                Some((desired, metadata, desired_version))
            }
            None => None,
        };

        if let Some(tags) = parts.tags {
            self.tags = Value::Object(tags);
        }
        self.etag_counter = etag_counter;
        self.version = version;
        Ok(desired.map(|(desired, metadata, desired_version)| {
            let mut notification = desired.clone();
            notification.insert(VERSION.into(), desired_version.into());
            self.desired = Value::Object(desired);
            self.desired_metadata = Value::Object(metadata);
            self.desired_version = desired_version;
            Value::Object(notification)
        }))
    }

    /// The body of the MQTT twin GET response:
    /// `{"desired":{…,"$version":N},"reported":{…,"$version":M}}`. No tags, no `$metadata`.
    pub fn device_view(&self) -> Value {
        let mut out = Map::new();
        out.insert(
            "desired".into(),
            with_version(&self.desired, None, self.desired_version),
        );
        out.insert(
            "reported".into(),
            with_version(&self.reported, None, self.reported_version),
        );
        Value::Object(out)
    }

    /// The twin part of the service view (`GET /twins/{id}`):
    /// `{"tags":{…},"properties":{"desired":{…,"$metadata":{…},"$version":N},
    /// "reported":{…,"$metadata":{…},"$version":M}},"version":V,"etag":"…"}`.
    /// The caller adds the identity fields (`deviceId`, `status`, …).
    pub fn service_view(&self) -> Value {
        let mut properties = Map::new();
        properties.insert(
            "desired".into(),
            with_version(
                &self.desired,
                Some(&self.desired_metadata),
                self.desired_version,
            ),
        );
        properties.insert(
            "reported".into(),
            with_version(
                &self.reported,
                Some(&self.reported_metadata),
                self.reported_version,
            ),
        );
        let mut out = Map::new();
        out.insert("tags".into(), self.tags.clone());
        out.insert("properties".into(), Value::Object(properties));
        out.insert("version".into(), self.version.into());
        out.insert("etag".into(), self.etag().into());
        Value::Object(out)
    }

    /// The twin etag: base64 of the 8-byte big-endian etag counter (`AAAAAAAAAAE=` for a
    /// new twin). Unquoted, as Azure puts it in the JSON body.
    pub fn etag(&self) -> String {
        base64(&self.etag_counter.to_be_bytes())
    }

    /// Whether an `If-Match` header value matches this twin: `*`, or a comma-separated list
    /// of etags, each optionally quoted and optionally weak (`W/"…"`).
    pub fn etag_matches(&self, if_match: &str) -> bool {
        let etag = self.etag();
        if_match.split(',').map(str::trim).any(|candidate| {
            let candidate = candidate.strip_prefix("W/").unwrap_or(candidate);
            let candidate = candidate
                .strip_prefix('"')
                .and_then(|c| c.strip_suffix('"'))
                .unwrap_or(candidate);
            // `*`, quoted or not: the Azure service SDKs send `If-Match: "*"` without an etag.
            candidate == "*" || candidate == etag
        })
    }

    /// The root `version`: goes up on every write.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The desired `$version`.
    pub fn desired_version(&self) -> u64 {
        self.desired_version
    }

    /// The reported `$version`.
    pub fn reported_version(&self) -> u64 {
        self.reported_version
    }

    /// The tags (always a JSON object).
    pub fn tags(&self) -> &Value {
        &self.tags
    }

    /// The desired properties, without `$metadata`/`$version` (always a JSON object).
    pub fn desired(&self) -> &Value {
        &self.desired
    }

    /// The reported properties, without `$metadata`/`$version` (always a JSON object).
    pub fn reported(&self) -> &Value {
        &self.reported
    }
}

/// The size of a section (or any value) by the spec's formula (§3.6): over every object
/// member, the UTF-8 length of its key plus the size of its value; a string counts its UTF-8
/// length, a number 8, a boolean 4, `null` [`NULL_SIZE`]; objects count their members, arrays
/// their elements plus one byte per element. Members whose key begins with `$` (`$metadata`,
/// `$version`) are not counted. Iterative, so any nesting depth is safe.
pub fn section_size(v: &Value) -> usize {
    let mut total: usize = 0;
    let mut pending = vec![v];
    while let Some(value) = pending.pop() {
        let size = match value {
            Value::Null => NULL_SIZE,
            Value::Bool(_) => 4,
            Value::Number(_) => 8,
            Value::String(s) => s.len(),
            Value::Array(items) => {
                pending.extend(items.iter());
                items.len()
            }
            Value::Object(members) => {
                let mut keys: usize = 0;
                for (key, member) in members {
                    if !key.starts_with('$') {
                        keys = keys.saturating_add(key.len());
                        pending.push(member);
                    }
                }
                keys
            }
        };
        total = total.saturating_add(size);
    }
    total
}

/// The three sections, for limits and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Tags,
    Desired,
    Reported,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Tags => "tags",
            Section::Desired => "properties.desired",
            Section::Reported => "properties.reported",
        }
    }

    fn limit(self) -> usize {
        match self {
            Section::Tags => TAGS_LIMIT,
            Section::Desired => DESIRED_LIMIT,
            Section::Reported => REPORTED_LIMIT,
        }
    }
}

/// How to read a section from input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A merge patch: nulls are kept (they mean delete).
    Patch,
    /// A replacement document: nulls are dropped.
    Replace,
}

/// The sections a service body carries, validated.
struct ServiceBody {
    tags: Option<Map<String, Value>>,
    desired: Option<Map<String, Value>>,
}

impl ServiceBody {
    fn parse(body: &Value, mode: Mode) -> Result<ServiceBody, TwinError> {
        let Value::Object(root) = body else {
            return Err(not_an_object("twin"));
        };
        let tags = match root.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(tags)) => Some(sanitize_object(
                tags,
                0,
                mode,
                &mut Path::new(Section::Tags),
            )?),
            Some(_) => return Err(not_an_object(Section::Tags.name())),
        };
        let desired = match root.get("properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(properties)) => match properties.get("desired") {
                None | Some(Value::Null) => None,
                Some(Value::Object(desired)) => Some(sanitize_object(
                    desired,
                    0,
                    mode,
                    &mut Path::new(Section::Desired),
                )?),
                Some(_) => return Err(not_an_object(Section::Desired.name())),
            },
            Some(_) => return Err(not_an_object("properties")),
        };
        Ok(ServiceBody { tags, desired })
    }
}

/// One step of a path inside a section.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Where the validator is, for error messages. Rendered only on error.
struct Path<'a> {
    section: Section,
    steps: Vec<Step<'a>>,
}

impl<'a> Path<'a> {
    fn new(section: Section) -> Path<'a> {
        Path {
            section,
            steps: Vec::new(),
        }
    }

    fn render(&self) -> String {
        let mut out = self.section.name().to_owned();
        for step in &self.steps {
            match step {
                Step::Key(key) => {
                    out.push('.');
                    push_display_key(&mut out, key);
                }
                Step::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }

    fn invalid_key(&self, reason: &'static str) -> TwinError {
        TwinError::InvalidKey {
            path: self.render(),
            reason,
        }
    }

    fn invalid_value(&self, reason: &'static str) -> TwinError {
        TwinError::InvalidValue {
            path: self.render(),
            reason,
        }
    }

    fn too_deep(&self) -> TwinError {
        TwinError::TooDeep {
            section: self.section.name().to_owned(),
            limit: MAX_DEPTH,
        }
    }
}

/// Appends a key for an error message: at most 64 characters, control characters escaped.
fn push_display_key(out: &mut String, key: &str) {
    const SHOWN: usize = 64;
    for (i, c) in key.chars().enumerate() {
        if i == SHOWN {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
}

/// Validates and copies a section object (at `depth`) from input: drops `$`-keys, checks
/// keys and values, keeps nulls in [`Mode::Patch`] and drops them in [`Mode::Replace`].
/// Recursion stops at [`MAX_DEPTH`].
fn sanitize_object<'a>(
    object: &'a Map<String, Value>,
    depth: usize,
    mode: Mode,
    path: &mut Path<'a>,
) -> Result<Map<String, Value>, TwinError> {
    let mut out = Map::new();
    for (key, value) in object {
        if key.starts_with('$') {
            continue;
        }
        path.steps.push(Step::Key(key));
        check_key(key, path)?;
        let kept = match value {
            Value::Null => match mode {
                Mode::Patch => Some(Value::Null),
                Mode::Replace => None,
            },
            Value::Object(child) => {
                if depth + 1 > MAX_DEPTH {
                    return Err(path.too_deep());
                }
                Some(Value::Object(sanitize_object(
                    child,
                    depth + 1,
                    mode,
                    path,
                )?))
            }
            leaf => {
                check_value(leaf, depth + 1, path)?;
                Some(leaf.clone())
            }
        };
        path.steps.pop();
        if let Some(kept) = kept {
            out.insert(key.clone(), kept);
        }
    }
    Ok(out)
}

/// Checks a value kept verbatim (a stored section, or anything inside an array) sitting at
/// `depth`: every key and value rule, no `$`-keys at all. Recursion stops at [`MAX_DEPTH`].
fn check_value<'a>(value: &'a Value, depth: usize, path: &mut Path<'a>) -> Result<(), TwinError> {
    match value {
        Value::Null | Value::Bool(_) => Ok(()),
        Value::Number(n) => check_number(n, path),
        Value::String(s) if s.len() > MAX_STRING_BYTES => {
            Err(path.invalid_value("string longer than 4096 bytes"))
        }
        Value::String(_) => Ok(()),
        Value::Array(items) => {
            if depth > MAX_DEPTH {
                return Err(path.too_deep());
            }
            for (i, item) in items.iter().enumerate() {
                path.steps.push(Step::Index(i));
                check_value(item, depth + 1, path)?;
                path.steps.pop();
            }
            Ok(())
        }
        Value::Object(members) => {
            if depth > MAX_DEPTH {
                return Err(path.too_deep());
            }
            for (key, member) in members {
                path.steps.push(Step::Key(key));
                check_key(key, path)?;
                check_value(member, depth + 1, path)?;
                path.steps.pop();
            }
            Ok(())
        }
    }
}

/// The key rules of §3.6. `path` already ends with this key.
fn check_key(key: &str, path: &Path<'_>) -> Result<(), TwinError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(path.invalid_key("longer than 1024 bytes"));
    }
    for c in key.chars() {
        let reason = match c {
            '.' => "contains '.'",
            '$' => "contains '$'",
            ' ' => "contains a space",
            c if c.is_control() => "contains a control character",
            _ => continue,
        };
        return Err(path.invalid_key(reason));
    }
    Ok(())
}

fn check_number(n: &Number, path: &Path<'_>) -> Result<(), TwinError> {
    let in_range = if let Some(i) = n.as_i64() {
        (MIN_INTEGER..=MAX_INTEGER).contains(&i)
    } else {
        // An integer beyond i64 is out of range; anything else is a float, which is allowed.
        n.as_u64().is_none()
    };
    if in_range {
        Ok(())
    } else {
        Err(path.invalid_value("integer outside -4503599627370496..=4503599627370495"))
    }
}

/// Whether every object or array in `value` (which sits at `depth`) sits at depth ≤ `max`.
/// Recursion stops at `max`.
fn containers_within(value: &Value, depth: usize, max: usize) -> bool {
    match value {
        Value::Object(members) => {
            depth <= max
                && members
                    .values()
                    .all(|m| containers_within(m, depth + 1, max))
        }
        Value::Array(items) => {
            depth <= max && items.iter().all(|i| containers_within(i, depth + 1, max))
        }
        _ => true,
    }
}

/// What a write stamps on the metadata nodes it touches.
struct Stamp<'a> {
    now: &'a str,
    /// The new desired `$version`; `None` for reported (and tags, which keep no metadata).
    version: Option<u64>,
}

impl<'a> Stamp<'a> {
    /// A stamp without a version: reported metadata (tags keep no metadata at all).
    fn time_only(now: &'a str) -> Stamp<'a> {
        Stamp { now, version: None }
    }

    fn desired(now: &'a str, version: u64) -> Stamp<'a> {
        Stamp {
            now,
            version: Some(version),
        }
    }

    fn apply(&self, node: &mut Map<String, Value>) {
        node.insert(LAST_UPDATED.into(), self.now.into());
        if let Some(version) = self.version {
            node.insert(LAST_UPDATED_VERSION.into(), version.into());
        }
    }

    fn leaf(&self) -> Value {
        let mut node = Map::new();
        self.apply(&mut node);
        Value::Object(node)
    }
}

/// JSON merge patch (RFC 7396 with the §3.5 details) of a validated `patch` into `target`,
/// keeping `metadata` (if any) in step: touched nodes are stamped, deleted keys lose their
/// metadata subtree. The caller stamps the root. Recursion follows `patch`, whose depth
/// [`sanitize_object`] has bounded.
fn merge_patch(
    target: &mut Map<String, Value>,
    mut metadata: Option<&mut Map<String, Value>>,
    patch: &Map<String, Value>,
    stamp: &Stamp<'_>,
) {
    for (key, change) in patch {
        match change {
            Value::Null => {
                target.remove(key);
                if let Some(metadata) = metadata.as_deref_mut() {
                    metadata.remove(key);
                }
            }
            Value::Object(child_patch) => match target.get_mut(key) {
                Some(Value::Object(child)) => match metadata.as_deref_mut() {
                    Some(metadata) => {
                        let mut child_metadata = match metadata.remove(key) {
                            Some(Value::Object(node)) => node,
                            _ => Map::new(),
                        };
                        merge_patch(child, Some(&mut child_metadata), child_patch, stamp);
                        stamp.apply(&mut child_metadata);
                        metadata.insert(key.clone(), Value::Object(child_metadata));
                    }
                    None => merge_patch(child, None, child_patch, stamp),
                },
                _ => {
                    let fresh = strip_nulls(child_patch);
                    if let Some(metadata) = metadata.as_deref_mut() {
                        metadata.insert(
                            key.clone(),
                            Value::Object(build_object_metadata(&fresh, stamp)),
                        );
                    }
                    target.insert(key.clone(), Value::Object(fresh));
                }
            },
            leaf => {
                target.insert(key.clone(), leaf.clone());
                if let Some(metadata) = metadata.as_deref_mut() {
                    metadata.insert(key.clone(), stamp.leaf());
                }
            }
        }
    }
}

/// A validated patch object with its deletions removed, for when it lands where no object
/// was. Arrays are kept verbatim.
fn strip_nulls(patch: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in patch {
        match value {
            Value::Null => {}
            Value::Object(child) => {
                out.insert(key.clone(), Value::Object(strip_nulls(child)));
            }
            other => {
                out.insert(key.clone(), other.clone());
            }
        }
    }
    out
}

/// Fresh metadata for a whole object: every object node and leaf stamped.
fn build_object_metadata(object: &Map<String, Value>, stamp: &Stamp<'_>) -> Map<String, Value> {
    let mut node = Map::new();
    stamp.apply(&mut node);
    for (key, value) in object {
        let child = match value {
            Value::Object(child) => Value::Object(build_object_metadata(child, stamp)),
            _ => stamp.leaf(),
        };
        node.insert(key.clone(), child);
    }
    node
}

/// A section with `$metadata` (if given) and `$version` added, for the views.
fn with_version(section: &Value, metadata: Option<&Value>, version: u64) -> Value {
    let mut out = object_clone(section);
    if let Some(metadata) = metadata {
        out.insert(METADATA.into(), metadata.clone());
    }
    out.insert(VERSION.into(), version.into());
    Value::Object(out)
}

/// A copy of an object (the struct invariant says it is one; anything else reads as empty).
fn object_clone(value: &Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    }
}

fn check_size(section: &Map<String, Value>, which: Section) -> Result<(), TwinError> {
    let mut size: usize = 0;
    for (key, value) in section {
        if !key.starts_with('$') {
            size = size
                .saturating_add(key.len())
                .saturating_add(section_size(value));
        }
    }
    if size > which.limit() {
        return Err(TwinError::TooLarge {
            section: which.name().to_owned(),
            size,
            limit: which.limit(),
        });
    }
    Ok(())
}

fn bump(counter: u64) -> Result<u64, TwinError> {
    counter
        .checked_add(1)
        .ok_or_else(|| corrupt("a version counter would overflow".to_owned()))
}

fn corrupt(message: String) -> TwinError {
    TwinError::Corrupt(message)
}

fn not_an_object(section: &str) -> TwinError {
    TwinError::NotAnObject {
        section: section.to_owned(),
    }
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        let sextet = |shift: u32| char::from(ALPHABET[((group >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: &str = "2026-11-29T05:46:02.5359650Z";
    const T1: &str = "2026-11-29T05:47:00.0000000Z";
    const T2: &str = "2026-11-29T05:48:00.0000000Z";
    const T3: &str = "2026-11-29T05:49:00.0000000Z";

    fn fresh() -> Twin {
        Twin::new(None, T0).unwrap()
    }

    fn with_reported(reported: Value) -> Twin {
        let mut twin = fresh();
        twin.patch_reported(&reported, T0).unwrap();
        twin
    }

    /// `n` objects nested under keys `l1`…`ln`, innermost holding `{"leaf": 1}`.
    fn nested(n: usize) -> Value {
        let mut v = json!({"leaf": 1});
        for i in (1..=n).rev() {
            let mut m = Map::new();
            m.insert(format!("l{i}"), v);
            v = Value::Object(m);
        }
        v
    }

    /// An object whose `section_size` is exactly `n` (n ≥ 3): keys `k00`… with strings.
    fn object_of_size(n: usize) -> Value {
        let mut m = Map::new();
        let mut left = n;
        let mut i = 0;
        while left > 0 {
            let key = format!("k{i:02}");
            let room = (left - key.len()).min(4000);
            left -= key.len() + room;
            m.insert(key, Value::String("x".repeat(room)));
            i += 1;
            assert!(
                left == 0 || left >= 3,
                "pick a size that splits into chunks"
            );
        }
        let v = Value::Object(m);
        assert_eq!(section_size(&v), n);
        v
    }

    fn desired_body(desired: Value) -> Value {
        json!({"properties": {"desired": desired}})
    }

    /// Builds a value `depth` arrays deep without recursion.
    fn deep_arrays(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    /// Builds a value `depth` objects deep without recursion.
    fn deep_objects(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            let mut m = Map::new();
            m.insert("a".into(), v);
            v = Value::Object(m);
        }
        v
    }

    /// Takes a deep value apart iteratively: serde_json's own drop would recurse.
    fn drop_deep(v: Value) {
        let mut pending = vec![v];
        while let Some(v) = pending.pop() {
            match v {
                Value::Array(items) => pending.extend(items),
                Value::Object(members) => pending.extend(members.into_iter().map(|(_, v)| v)),
                _ => {}
            }
        }
    }

    #[test]
    fn document_new_twin_versions_and_metadata() {
        let twin = fresh();
        assert_eq!(twin.version(), 2);
        assert_eq!(twin.desired_version(), 1);
        assert_eq!(twin.reported_version(), 1);
        assert_eq!(twin.etag(), "AAAAAAAAAAE=");
        assert_eq!(twin.tags(), &json!({}));
        assert_eq!(twin.desired(), &json!({}));
        assert_eq!(twin.reported(), &json!({}));
        let view = twin.service_view();
        assert_eq!(
            view["properties"]["desired"]["$metadata"],
            json!({"$lastUpdated": T0, "$lastUpdatedVersion": 1})
        );
        assert_eq!(
            view["properties"]["reported"]["$metadata"],
            json!({"$lastUpdated": T0})
        );
    }

    #[test]
    fn document_new_twin_from_initial() {
        let initial = json!({
            "deviceId": "ignored",
            "tags": {"site": {"building": "B1", "gone": null}, "$junk": 1},
            "properties": {
                "desired": {"fan": {"speed": 3}, "$version": 9, "$metadata": {}, "off": null},
                "reported": {"ignored": true}
            }
        });
        let twin = Twin::new(Some(&initial), T0).unwrap();
        assert_eq!(twin.version(), 2);
        assert_eq!(twin.desired_version(), 1);
        assert_eq!(twin.reported_version(), 1);
        assert_eq!(twin.etag(), "AAAAAAAAAAE=");
        assert_eq!(twin.tags(), &json!({"site": {"building": "B1"}}));
        assert_eq!(twin.desired(), &json!({"fan": {"speed": 3}}));
        assert_eq!(twin.reported(), &json!({}));
        let stamp = json!({"$lastUpdated": T0, "$lastUpdatedVersion": 1});
        assert_eq!(
            twin.service_view()["properties"]["desired"]["$metadata"],
            json!({
                "$lastUpdated": T0, "$lastUpdatedVersion": 1,
                "fan": {"$lastUpdated": T0, "$lastUpdatedVersion": 1, "speed": stamp}
            })
        );

        // Null sections are absent.
        let twin = Twin::new(Some(&json!({"tags": null, "properties": null})), T0).unwrap();
        assert_eq!(twin.tags(), &json!({}));
        let twin = Twin::new(Some(&json!({"properties": {"desired": null}})), T0).unwrap();
        assert_eq!(twin.desired(), &json!({}));
    }

    #[test]
    fn document_new_twin_rejects_bad_initial() {
        let cases: Vec<(Value, TwinError)> = vec![
            (json!([]), not_an_object("twin")),
            (json!({"tags": 1}), not_an_object("tags")),
            (json!({"properties": []}), not_an_object("properties")),
            (
                json!({"properties": {"desired": "x"}}),
                not_an_object("properties.desired"),
            ),
            (
                json!({"tags": {"a.b": 1}}),
                TwinError::InvalidKey {
                    path: "tags.a.b".into(),
                    reason: "contains '.'",
                },
            ),
            (
                json!({"tags": object_of_size(TAGS_LIMIT + 1)}),
                TwinError::TooLarge {
                    section: "tags".into(),
                    size: TAGS_LIMIT + 1,
                    limit: TAGS_LIMIT,
                },
            ),
            (
                desired_body(nested(MAX_DEPTH + 1)),
                TwinError::TooDeep {
                    section: "properties.desired".into(),
                    limit: MAX_DEPTH,
                },
            ),
        ];
        for (initial, expected) in cases {
            assert_eq!(Twin::new(Some(&initial), T0), Err(expected), "{initial}");
        }
    }

    #[test]
    fn document_etag_format() {
        let cases = [
            (0, "AAAAAAAAAAA="),
            (1, "AAAAAAAAAAE="),
            (2, "AAAAAAAAAAI="),
            (3, "AAAAAAAAAAM="),
            (255, "AAAAAAAAAP8="),
            (256, "AAAAAAAAAQA="),
            (u64::MAX, "//////////8="),
        ];
        for (counter, expected) in cases {
            let mut twin = fresh();
            twin.etag_counter = counter;
            assert_eq!(twin.etag(), expected, "{counter}");
            assert_eq!(twin.service_view()["etag"], json!(expected));
        }
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn document_etag_matches() {
        let twin = fresh();
        let cases = [
            ("*", true),
            ("AAAAAAAAAAE=", true),
            ("\"AAAAAAAAAAE=\"", true),
            ("W/\"AAAAAAAAAAE=\"", true),
            ("\"AAAAAAAAAAI=\", \"AAAAAAAAAAE=\"", true),
            ("AAAAAAAAAAI=", false),
            ("", false),
            ("\"", false),
        ];
        for (header, expected) in cases {
            assert_eq!(twin.etag_matches(header), expected, "{header}");
        }
    }

    #[test]
    fn document_reported_patch_keeps_etag_service_writes_bump_it() {
        let mut twin = fresh();
        assert_eq!(twin.patch_reported(&json!({"t": 1}), T1), Ok(2));
        assert_eq!(twin.patch_reported(&json!({"t": 2}), T1), Ok(3));
        assert_eq!(twin.etag(), "AAAAAAAAAAE=");
        assert_eq!(twin.version(), 4);
        assert_eq!(twin.reported_version(), 3);
        assert_eq!(twin.desired_version(), 1);

        twin.patch_service(&json!({"tags": {"a": 1}}), T2).unwrap();
        assert_eq!(twin.etag(), "AAAAAAAAAAI=");
        assert_eq!(twin.version(), 5);
        twin.patch_service(&desired_body(json!({"x": 1})), T2)
            .unwrap();
        assert_eq!(twin.etag(), "AAAAAAAAAAM=");
        assert_eq!(twin.version(), 6);
        twin.replace_service(&json!({"tags": {}}), T2).unwrap();
        assert_eq!(twin.etag(), "AAAAAAAAAAQ=");
        assert_eq!(twin.version(), 7);
        // A service write that carries no section still counts as a write.
        assert_eq!(twin.patch_service(&json!({"deviceId": "d"}), T2), Ok(None));
        assert_eq!(twin.etag(), "AAAAAAAAAAU=");
        assert_eq!(twin.version(), 8);
        assert_eq!(twin.reported_version(), 3);
    }

    #[test]
    fn document_merge_semantics() {
        let cases = [
            // (before, patch, after)
            (json!({}), json!({"a": 1}), json!({"a": 1})),
            (json!({"a": 1, "b": 2}), json!({"a": null}), json!({"b": 2})),
            (json!({"a": 1}), json!({"missing": null}), json!({"a": 1})),
            (
                json!({"a": {"b": 1, "c": 2}}),
                json!({"a": {"b": 5, "d": 4}}),
                json!({"a": {"b": 5, "c": 2, "d": 4}}),
            ),
            (
                json!({"a": {"b": 1, "c": 2}}),
                json!({"a": {"b": null}}),
                json!({"a": {"c": 2}}),
            ),
            // Object replaces a scalar, its nulls stripped.
            (
                json!({"a": 1}),
                json!({"a": {"b": 1, "c": null, "d": {"e": null}}}),
                json!({"a": {"b": 1, "d": {}}}),
            ),
            (json!({}), json!({"a": {"b": null}}), json!({"a": {}})),
            // Scalar replaces an object.
            (json!({"a": {"b": 1}}), json!({"a": "s"}), json!({"a": "s"})),
            // Arrays replace wholesale and keep their nulls.
            (
                json!({"a": [1, 2, 3]}),
                json!({"a": [null, {"x": null}]}),
                json!({"a": [null, {"x": null}]}),
            ),
            (json!({"a": {"b": 1}}), json!({"a": [1]}), json!({"a": [1]})),
            (
                json!({"a": [1]}),
                json!({"a": {"b": 1}}),
                json!({"a": {"b": 1}}),
            ),
            (json!({"a": 1}), json!({}), json!({"a": 1})),
            (
                json!({"a": true, "b": 1.5}),
                json!({"a": false, "b": -2}),
                json!({"a": false, "b": -2}),
            ),
        ];
        for (before, patch, after) in cases {
            let mut twin = with_reported(before.clone());
            twin.patch_reported(&patch, T1).unwrap();
            assert_eq!(twin.reported(), &after, "reported {before} + {patch}");

            // Same semantics for desired and tags through the service PATCH.
            let mut twin = fresh();
            twin.patch_service(
                &json!({"tags": before, "properties": {"desired": before}}),
                T0,
            )
            .unwrap();
            twin.patch_service(
                &json!({"tags": patch, "properties": {"desired": patch}}),
                T1,
            )
            .unwrap();
            assert_eq!(twin.desired(), &after, "desired {before} + {patch}");
            assert_eq!(twin.tags(), &after, "tags {before} + {patch}");
        }
    }

    #[test]
    fn document_dollar_keys_ignored_in_patches() {
        let mut twin = with_reported(json!({"a": {"b": 1}}));
        let version = twin
            .patch_reported(
                &json!({
                    "$version": 99,
                    "$metadata": {"a": {"$lastUpdated": "x"}},
                    "a": {"$x": 1, "c": 2},
                    "$a": null
                }),
                T1,
            )
            .unwrap();
        assert_eq!(version, 3);
        assert_eq!(twin.reported(), &json!({"a": {"b": 1, "c": 2}}));

        // A fetched twin sent back as a PATCH keeps working.
        let mut twin = fresh();
        twin.patch_service(&desired_body(json!({"x": 1})), T1)
            .unwrap();
        let fetched = twin.service_view();
        let notification = twin.patch_service(&fetched, T2).unwrap().unwrap();
        assert_eq!(notification, json!({"x": 1, "$version": 3}));
        assert_eq!(twin.desired(), &json!({"x": 1}));
        // …and as a PUT.
        let fetched = twin.service_view();
        let notification = twin.replace_service(&fetched, T2).unwrap().unwrap();
        assert_eq!(notification, json!({"x": 1, "$version": 4}));
    }

    #[test]
    fn document_reported_metadata_after_nested_updates_and_deletes() {
        let mut twin = fresh();
        twin.patch_reported(&json!({"a": {"b": 1}, "keep": true}), T1)
            .unwrap();
        twin.patch_reported(&json!({"a": {"c": {"d": 2}}}), T2)
            .unwrap();
        let meta = &twin.service_view()["properties"]["reported"]["$metadata"];
        assert_eq!(
            meta,
            &json!({
                "$lastUpdated": T2,
                "keep": {"$lastUpdated": T1},
                "a": {
                    "$lastUpdated": T2,
                    "b": {"$lastUpdated": T1},
                    "c": {"$lastUpdated": T2, "d": {"$lastUpdated": T2}}
                }
            })
        );

        twin.patch_reported(&json!({"a": {"c": null}}), T3).unwrap();
        let meta = &twin.service_view()["properties"]["reported"]["$metadata"];
        assert_eq!(
            meta,
            &json!({
                "$lastUpdated": T3,
                "keep": {"$lastUpdated": T1},
                "a": {"$lastUpdated": T3, "b": {"$lastUpdated": T1}}
            })
        );

        // A scalar replacing an object drops the object's metadata subtree.
        twin.patch_reported(&json!({"a": 7}), T3).unwrap();
        let meta = &twin.service_view()["properties"]["reported"]["$metadata"];
        assert_eq!(meta["a"], json!({"$lastUpdated": T3}));
        // An object replacing a scalar gets full metadata.
        twin.patch_reported(&json!({"keep": {"x": [1, {"y": 2}]}}), T3)
            .unwrap();
        let meta = &twin.service_view()["properties"]["reported"]["$metadata"];
        assert_eq!(
            meta["keep"],
            json!({"$lastUpdated": T3, "x": {"$lastUpdated": T3}})
        );
    }

    #[test]
    fn document_desired_metadata_versions() {
        let mut twin = fresh();
        twin.patch_service(&desired_body(json!({"a": {"b": 1}, "z": 0})), T1)
            .unwrap(); // desired $version 2
        twin.patch_service(&desired_body(json!({"a": {"c": 2}})), T2)
            .unwrap(); // 3
        let meta = &twin.service_view()["properties"]["desired"]["$metadata"];
        assert_eq!(
            meta,
            &json!({
                "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                "z": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
                "a": {
                    "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                    "b": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
                    "c": {"$lastUpdated": T2, "$lastUpdatedVersion": 3}
                }
            })
        );
        twin.patch_service(&desired_body(json!({"a": {"b": null}})), T3)
            .unwrap(); // 4
        let meta = &twin.service_view()["properties"]["desired"]["$metadata"];
        assert_eq!(meta["a"]["$lastUpdatedVersion"], json!(4));
        assert_eq!(meta["a"].get("b"), None);
        assert_eq!(meta["z"]["$lastUpdatedVersion"], json!(2));
        // Tags-only writes leave desired metadata alone.
        twin.patch_service(&json!({"tags": {"t": 1}}), T3).unwrap();
        let after = &twin.service_view()["properties"]["desired"]["$metadata"];
        assert_eq!(after["$lastUpdatedVersion"], json!(4));
    }

    #[test]
    fn document_patch_notification_keeps_nulls_and_version() {
        let mut twin = fresh();
        twin.patch_service(&desired_body(json!({"x": 1, "y": {"z": 1}})), T1)
            .unwrap();
        let body = json!({
            "tags": {"a": 1},
            "properties": {"desired": {"x": null, "y": {"z": 2, "w": null}, "$version": 1}}
        });
        let notification = twin.patch_service(&body, T2).unwrap();
        assert_eq!(
            notification,
            Some(json!({"x": null, "y": {"z": 2, "w": null}, "$version": 3}))
        );
        assert_eq!(twin.desired(), &json!({"y": {"z": 2}}));
        assert_eq!(twin.desired_version(), 3);
        assert_eq!(twin.tags(), &json!({"a": 1}));
    }

    #[test]
    fn document_tags_only_patch_returns_none() {
        let mut twin = fresh();
        let cases = [
            json!({"tags": {"a": 1}}),
            json!({"tags": {"a": 1}, "properties": {"reported": {"r": 1}}}),
            json!({"tags": {"a": 1}, "properties": {"desired": null}}),
            json!({"tags": {"a": 1}, "properties": {}}),
        ];
        for body in cases {
            assert_eq!(twin.patch_service(&body, T1), Ok(None), "{body}");
        }
        assert_eq!(twin.desired_version(), 1);
        assert_eq!(twin.reported(), &json!({}));
        assert_eq!(twin.version(), 6);
    }

    #[test]
    fn document_put_replaces_only_present_sections() {
        let mut twin = Twin::new(
            Some(&json!({"tags": {"old": 1}, "properties": {"desired": {"d": {"e": 1}}}})),
            T0,
        )
        .unwrap();
        twin.patch_reported(&json!({"r": 1}), T0).unwrap();

        // Desired only: tags kept.
        let body = desired_body(json!({"n": {"m": 2, "gone": null}, "$version": 7}));
        let notification = twin.replace_service(&body, T1).unwrap();
        assert_eq!(notification, Some(json!({"n": {"m": 2}, "$version": 2})));
        assert_eq!(twin.desired(), &json!({"n": {"m": 2}}));
        assert_eq!(twin.tags(), &json!({"old": 1}));
        assert_eq!(twin.reported(), &json!({"r": 1}));
        let stamp = json!({"$lastUpdated": T1, "$lastUpdatedVersion": 2});
        assert_eq!(
            twin.service_view()["properties"]["desired"]["$metadata"],
            json!({
                "$lastUpdated": T1, "$lastUpdatedVersion": 2,
                "n": {"$lastUpdated": T1, "$lastUpdatedVersion": 2, "m": stamp}
            })
        );

        // Tags only: desired kept, no notification, desired version unchanged.
        assert_eq!(
            twin.replace_service(&json!({"tags": {"new": 1}}), T2),
            Ok(None)
        );
        assert_eq!(twin.tags(), &json!({"new": 1}));
        assert_eq!(twin.desired(), &json!({"n": {"m": 2}}));
        assert_eq!(twin.desired_version(), 2);

        // Both, including an empty desired.
        let body = json!({"tags": {}, "properties": {"desired": {}}});
        assert_eq!(
            twin.replace_service(&body, T3),
            Ok(Some(json!({"$version": 3})))
        );
        assert_eq!(twin.tags(), &json!({}));
        assert_eq!(twin.desired(), &json!({}));
        assert_eq!(
            twin.service_view()["properties"]["desired"]["$metadata"],
            json!({"$lastUpdated": T3, "$lastUpdatedVersion": 3})
        );
    }

    #[test]
    fn document_limits() {
        let invalid_key = |path: &str, reason| TwinError::InvalidKey {
            path: path.into(),
            reason,
        };
        let invalid_value = |path: &str, reason| TwinError::InvalidValue {
            path: path.into(),
            reason,
        };
        let integer = "integer outside -4503599627370496..=4503599627370495";
        let long_string = "string longer than 4096 bytes";
        let too_deep = TwinError::TooDeep {
            section: "properties.reported".into(),
            limit: MAX_DEPTH,
        };
        let mut deep_array = nested(MAX_DEPTH - 1);
        // Innermost object is at depth 9; an array there sits at depth 10.
        let mut inner = &mut deep_array;
        for i in 1..MAX_DEPTH {
            inner = &mut inner[format!("l{i}")];
        }
        inner["arr"] = json!([1, 2]);
        let mut too_deep_array = deep_array.clone();
        let mut inner = &mut too_deep_array;
        for i in 1..MAX_DEPTH {
            inner = &mut inner[format!("l{i}")];
        }
        inner["arr"] = json!([[1]]);

        let cases: Vec<(&str, Value, Result<(), TwinError>)> = vec![
            ("depth 10 ok", nested(MAX_DEPTH), Ok(())),
            ("depth 11", nested(MAX_DEPTH + 1), Err(too_deep.clone())),
            ("array at depth 10", deep_array, Ok(())),
            (
                "array in array at depth 11",
                too_deep_array,
                Err(too_deep.clone()),
            ),
            (
                "dot",
                json!({"a": {"b.c": 1}}),
                Err(invalid_key("properties.reported.a.b.c", "contains '.'")),
            ),
            (
                "space",
                json!({"a b": 1}),
                Err(invalid_key("properties.reported.a b", "contains a space")),
            ),
            (
                "inner dollar",
                json!({"a$": 1}),
                Err(invalid_key("properties.reported.a$", "contains '$'")),
            ),
            (
                "C0",
                json!({"a\u{1}": 1}),
                Err(invalid_key(
                    "properties.reported.a\\u{1}",
                    "contains a control character",
                )),
            ),
            (
                "DEL",
                json!({"a\u{7f}": 1}),
                Err(invalid_key(
                    "properties.reported.a\\u{7f}",
                    "contains a control character",
                )),
            ),
            (
                "C1",
                json!({"a\u{85}": 1}),
                Err(invalid_key(
                    "properties.reported.a\\u{85}",
                    "contains a control character",
                )),
            ),
            ("key 1024 bytes", json!({"k".repeat(1024): 1}), Ok(())),
            (
                "key 1024 bytes multibyte",
                json!({"é".repeat(512): 1}),
                Ok(()),
            ),
            (
                "key 1025 bytes",
                json!({"k".repeat(1025): 1}),
                Err(invalid_key(
                    &format!("properties.reported.{}…", "k".repeat(64)),
                    "longer than 1024 bytes",
                )),
            ),
            (
                "key 1026 bytes multibyte",
                json!({"é".repeat(513): 1}),
                Err(invalid_key(
                    &format!("properties.reported.{}…", "é".repeat(64)),
                    "longer than 1024 bytes",
                )),
            ),
            ("empty key", json!({"": 1}), Ok(())),
            ("unicode key", json!({"température": 1}), Ok(())),
            ("string 4096", json!({"s": "x".repeat(4096)}), Ok(())),
            (
                "string 4097",
                json!({"s": "x".repeat(4097)}),
                Err(invalid_value("properties.reported.s", long_string)),
            ),
            (
                "string in array",
                json!({"s": [1, "x".repeat(4097)]}),
                Err(invalid_value("properties.reported.s[1]", long_string)),
            ),
            ("max int", json!({"i": MAX_INTEGER}), Ok(())),
            ("min int", json!({"i": MIN_INTEGER}), Ok(())),
            (
                "max int + 1",
                json!({"i": MAX_INTEGER + 1}),
                Err(invalid_value("properties.reported.i", integer)),
            ),
            (
                "min int - 1",
                json!({"i": MIN_INTEGER - 1}),
                Err(invalid_value("properties.reported.i", integer)),
            ),
            (
                "u64 max",
                json!({"i": u64::MAX}),
                Err(invalid_value("properties.reported.i", integer)),
            ),
            (
                "i64 min",
                json!({"i": i64::MIN}),
                Err(invalid_value("properties.reported.i", integer)),
            ),
            (
                "int in array",
                json!({"a": [{"i": i64::MAX}]}),
                Err(invalid_value("properties.reported.a[0].i", integer)),
            ),
            ("big float", json!({"f": 1e300}), Ok(())),
            ("fraction", json!({"f": -0.5}), Ok(())),
            (
                "key in array",
                json!({"a": [{"b.c": 1}]}),
                Err(invalid_key("properties.reported.a[0].b.c", "contains '.'")),
            ),
            (
                "dollar key in array",
                json!({"a": [{"$b": 1}]}),
                Err(invalid_key("properties.reported.a[0].$b", "contains '$'")),
            ),
            ("null in array", json!({"a": [null]}), Ok(())),
            ("size at limit", object_of_size(REPORTED_LIMIT), Ok(())),
            (
                "size over limit",
                object_of_size(REPORTED_LIMIT + 1),
                Err(TwinError::TooLarge {
                    section: "properties.reported".into(),
                    size: REPORTED_LIMIT + 1,
                    limit: REPORTED_LIMIT,
                }),
            ),
            (
                "not an object",
                json!([1]),
                Err(not_an_object("properties.reported")),
            ),
            (
                "null body",
                Value::Null,
                Err(not_an_object("properties.reported")),
            ),
        ];
        for (name, patch, expected) in cases {
            let mut twin = fresh();
            let got = twin.patch_reported(&patch, T1).map(|_| ());
            assert_eq!(got, expected, "{name}");

            // The same rules apply to desired and tags, with their own section names.
            if patch.is_object() {
                let expected = expected.map_err(|e| match e {
                    TwinError::TooLarge { .. } => None,
                    TwinError::TooDeep { limit, .. } => Some(TwinError::TooDeep {
                        section: "properties.desired".into(),
                        limit,
                    }),
                    TwinError::InvalidKey { path, reason } => Some(TwinError::InvalidKey {
                        path: path.replace("properties.reported", "properties.desired"),
                        reason,
                    }),
                    TwinError::InvalidValue { path, reason } => Some(TwinError::InvalidValue {
                        path: path.replace("properties.reported", "properties.desired"),
                        reason,
                    }),
                    other => Some(other),
                });
                if let Err(None) = expected {
                    continue; // sizes differ per section: tested below
                }
                let got = twin
                    .patch_service(&desired_body(patch.clone()), T1)
                    .map(|_| ())
                    .map_err(Some);
                assert_eq!(got, expected, "desired {name}");
                let got = twin
                    .replace_service(&desired_body(patch.clone()), T1)
                    .map(|_| ())
                    .map_err(Some);
                assert_eq!(got, expected, "desired PUT {name}");
            }
        }
    }

    #[test]
    fn document_size_limits_per_section() {
        let too_large = |section: &str, limit: usize| TwinError::TooLarge {
            section: section.into(),
            size: limit + 1,
            limit,
        };
        let mut twin = fresh();
        let ok = json!({"tags": object_of_size(TAGS_LIMIT)});
        assert!(twin.patch_service(&ok, T1).is_ok());
        assert!(twin.replace_service(&ok, T1).is_ok());
        let over = json!({"tags": object_of_size(TAGS_LIMIT + 1)});
        assert_eq!(
            twin.patch_service(&over, T1),
            Err(too_large("tags", TAGS_LIMIT))
        );
        assert_eq!(
            twin.replace_service(&over, T1),
            Err(too_large("tags", TAGS_LIMIT))
        );

        let ok = desired_body(object_of_size(DESIRED_LIMIT));
        assert!(twin.patch_service(&ok, T1).is_ok());
        assert!(twin.replace_service(&ok, T1).is_ok());
        let over = desired_body(object_of_size(DESIRED_LIMIT + 1));
        let expected = Err(too_large("properties.desired", DESIRED_LIMIT));
        assert_eq!(twin.patch_service(&over, T1), expected);
        assert_eq!(twin.replace_service(&over, T1), expected);
    }

    #[test]
    fn document_limits_apply_to_the_merged_result() {
        // Two halves fit separately but not together.
        let mut twin = with_reported(object_of_size(REPORTED_LIMIT - 100));
        let before = twin.clone();
        let err = twin.patch_reported(&json!({"extra": "x".repeat(200)}), T1);
        assert!(matches!(err, Err(TwinError::TooLarge { .. })), "{err:?}");
        assert_eq!(twin, before);
        // Deleting in the same patch makes room.
        let patch = json!({"k00": null, "extra": "x".repeat(200)});
        assert_eq!(twin.patch_reported(&patch, T1), Ok(3));

        // A stored oversize twin can be shrunk, but not grown or kept oversize.
        let mut stored = fresh().to_value();
        let mut big = object_of_size(REPORTED_LIMIT + 1000);
        big["k09"] = json!("small");
        stored["reported"] = big;
        let mut twin = Twin::from_value(&stored).unwrap();
        let err = twin.patch_reported(&json!({"k09": "x"}), T1);
        assert!(matches!(err, Err(TwinError::TooLarge { .. })), "{err:?}");
        assert_eq!(twin.patch_reported(&json!({"k00": null}), T1), Ok(2));
    }

    #[test]
    fn document_failed_writes_leave_twin_unchanged() {
        let mut twin = Twin::new(
            Some(&json!({"tags": {"t": 1}, "properties": {"desired": {"d": 1}}})),
            T0,
        )
        .unwrap();
        twin.patch_reported(&json!({"r": 1}), T0).unwrap();
        let before = twin.clone();

        let bad_reported = [
            json!({"ok": 1, "bad.key": 2}),
            json!({"ok": 1, "deep": nested(MAX_DEPTH + 1)}),
            object_of_size(REPORTED_LIMIT + 1),
            json!(3),
        ];
        for patch in bad_reported {
            assert!(twin.patch_reported(&patch, T1).is_err(), "{patch}");
            assert_eq!(twin, before, "{patch}");
        }
        // Valid tags, invalid desired: neither is applied.
        let bad_service = [
            json!({"tags": {"t": 2}, "properties": {"desired": {"bad key": 1}}}),
            json!({"tags": {"t": 2}, "properties": {"desired": object_of_size(DESIRED_LIMIT + 1)}}),
            json!({"tags": object_of_size(TAGS_LIMIT + 1), "properties": {"desired": {"d": 2}}}),
            json!({"tags": {"t": 2}, "properties": 5}),
            json!({"tags": "x", "properties": {"desired": {"d": 2}}}),
        ];
        for body in bad_service {
            assert!(twin.patch_service(&body, T1).is_err(), "{body}");
            assert_eq!(twin, before, "PATCH {body}");
            assert!(twin.replace_service(&body, T1).is_err(), "{body}");
            assert_eq!(twin, before, "PUT {body}");
        }
    }

    #[test]
    fn document_counter_overflow_is_an_error() {
        for field in [
            "version",
            "etagCounter",
            "desiredVersion",
            "reportedVersion",
        ] {
            let mut stored = fresh().to_value();
            stored[field] = json!(u64::MAX);
            let mut twin = Twin::from_value(&stored).unwrap();
            let before = twin.clone();
            let reported = twin.patch_reported(&json!({"a": 1}), T1);
            let service = twin.patch_service(&desired_body(json!({"a": 1})), T1);
            let put = twin.replace_service(&desired_body(json!({"a": 1})), T1);
            let failures = [reported.is_err(), service.is_err(), put.is_err()];
            assert!(failures.iter().any(|f| *f), "{field}");
            if field != "reportedVersion" {
                assert!(service.is_err() && put.is_err(), "{field}");
            }
            if let Err(e) = service {
                assert!(matches!(e, TwinError::Corrupt(_)), "{field}");
                assert_eq!(twin.desired(), before.desired());
            }
        }
    }

    #[test]
    fn document_stored_round_trip() {
        let mut twin = Twin::new(
            Some(&json!({"tags": {"t": {"u": 1}}, "properties": {"desired": {"d": [1, null]}}})),
            T0,
        )
        .unwrap();
        twin.patch_reported(&json!({"r": {"s": "x"}}), T1).unwrap();
        twin.patch_service(&desired_body(json!({"e": 2.5})), T2)
            .unwrap();
        let stored = twin.to_value();
        assert_eq!(stored["version"], json!(4));
        assert_eq!(stored["etagCounter"], json!(2));
        assert_eq!(stored["desiredVersion"], json!(2));
        assert_eq!(stored["reportedVersion"], json!(2));
        let text = serde_json::to_string(&stored).unwrap();
        let reread: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(Twin::from_value(&reread), Ok(twin));
    }

    #[test]
    fn document_corrupt_stored_values() {
        let good = fresh().to_value();
        let mut cases: Vec<(&str, Value)> = vec![
            ("number", json!(5)),
            ("null", Value::Null),
            ("array", json!([good.clone()])),
        ];
        let mut edit = |name: &'static str, f: &dyn Fn(&mut Map<String, Value>)| {
            let mut v = good.clone();
            if let Value::Object(m) = &mut v {
                f(m);
            }
            cases.push((name, v));
        };
        for field in [
            "tags",
            "desired",
            "reported",
            "desiredMetadata",
            "reportedMetadata",
            "desiredVersion",
            "reportedVersion",
            "version",
            "etagCounter",
        ] {
            edit(field, &|m| {
                m.remove(field);
            });
            edit(field, &|m| {
                m.insert(field.into(), json!("x"));
            });
        }
        edit("negative version", &|m| {
            m.insert("version".into(), json!(-1));
        });
        edit("float version", &|m| {
            m.insert("version".into(), json!(1.5));
        });
        edit("section with bad key", &|m| {
            m.insert("desired".into(), json!({"a.b": 1}));
        });
        edit("section with dollar key", &|m| {
            m.insert("reported".into(), json!({"$version": 1}));
        });
        edit("section too deep", &|m| {
            m.insert("tags".into(), nested(MAX_DEPTH + 1));
        });
        edit("metadata too deep", &|m| {
            m.insert("desiredMetadata".into(), nested(MAX_DEPTH + 2));
        });
        for (name, stored) in cases {
            let got = Twin::from_value(&stored);
            assert!(matches!(got, Err(TwinError::Corrupt(_))), "{name}: {got:?}");
        }
        // Unknown fields are tolerated.
        let mut extra = good.clone();
        extra["future"] = json!(1);
        assert!(Twin::from_value(&extra).is_ok());
    }

    #[test]
    fn document_device_view_shape() {
        let mut twin = Twin::new(
            Some(&json!({"tags": {"t": 1}, "properties": {"desired": {"d": {"e": 1}}}})),
            T0,
        )
        .unwrap();
        twin.patch_reported(&json!({"r": 1}), T1).unwrap();
        assert_eq!(
            twin.device_view(),
            json!({
                "desired": {"d": {"e": 1}, "$version": 1},
                "reported": {"r": 1, "$version": 2}
            })
        );
        assert_eq!(
            fresh().device_view(),
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
    }

    #[test]
    fn document_service_view_shape() {
        let mut twin = Twin::new(Some(&json!({"tags": {"t": 1}})), T0).unwrap();
        twin.patch_reported(&json!({"r": 1}), T1).unwrap();
        assert_eq!(
            twin.service_view(),
            json!({
                "tags": {"t": 1},
                "properties": {
                    "desired": {
                        "$metadata": {"$lastUpdated": T0, "$lastUpdatedVersion": 1},
                        "$version": 1
                    },
                    "reported": {
                        "r": 1,
                        "$metadata": {"$lastUpdated": T1, "r": {"$lastUpdated": T1}},
                        "$version": 2
                    }
                },
                "version": 3,
                "etag": "AAAAAAAAAAE="
            })
        );
    }

    #[test]
    fn document_section_size_formula() {
        let cases = [
            (json!({}), 0),
            (json!({"a": 1}), 1 + 8),
            (json!({"a": 1.5}), 1 + 8),
            (json!({"ab": "xyz"}), 2 + 3),
            (json!({"a": true}), 1 + 4),
            (json!({"é": "é"}), 2 + 2),
            (json!({"a": {"b": {"c": false}}}), 3 + 4),
            (json!({"a": {}}), 1),
            (
                json!({"a": [1, "xy", null, true]}),
                1 + (8 + 1) + (2 + 1) + (4 + 1) + (4 + 1),
            ),
            (json!({"a": [[], {}]}), 1 + 2),
            (json!({"a": [{"b": 1}]}), 1 + 1 + 1 + 8),
            (
                json!({"a": 1, "$version": 4, "$metadata": {"a": {"$lastUpdated": "x"}}}),
                9,
            ),
            (json!("abc"), 3),
            (Value::Null, NULL_SIZE),
        ];
        for (value, expected) in cases {
            assert_eq!(section_size(&value), expected, "{value}");
        }
    }

    #[test]
    fn document_deep_input_never_panics() {
        const DEPTH: usize = 100_000;
        for deep in [deep_arrays(DEPTH), deep_objects(DEPTH)] {
            assert!(section_size(&deep) > 0);
            let wrapped = json!({"a": Value::Null});
            let mut wrapped = wrapped;
            wrapped["a"] = deep;

            let mut twin = fresh();
            let err = twin.patch_reported(&wrapped, T1);
            assert!(matches!(err, Err(TwinError::TooDeep { .. })), "{err:?}");

            let mut body = json!({"tags": {}, "properties": {"desired": {}}});
            body["properties"]["desired"] = wrapped;
            assert!(matches!(
                twin.patch_service(&body, T1),
                Err(TwinError::TooDeep { .. })
            ));
            assert!(matches!(
                twin.replace_service(&body, T1),
                Err(TwinError::TooDeep { .. })
            ));
            assert!(matches!(
                Twin::new(Some(&body), T1),
                Err(TwinError::TooDeep { .. })
            ));
            assert_eq!(twin, fresh());

            let mut stored = fresh().to_value();
            stored["reported"] = body["properties"]["desired"].take();
            assert!(matches!(
                Twin::from_value(&stored),
                Err(TwinError::Corrupt(_))
            ));
            let mut metadata_stored = fresh().to_value();
            metadata_stored["desiredMetadata"] = stored["reported"].take();
            assert!(matches!(
                Twin::from_value(&metadata_stored),
                Err(TwinError::Corrupt(_))
            ));
            drop_deep(metadata_stored);
            drop_deep(stored);
            drop_deep(body);
        }
    }

    #[test]
    fn document_error_messages() {
        let cases = [
            (not_an_object("twin"), "twin must be a JSON object"),
            (
                TwinError::TooLarge {
                    section: "tags".into(),
                    size: 9000,
                    limit: TAGS_LIMIT,
                },
                "tags would be 9000 bytes, over its 8192-byte limit",
            ),
            (
                TwinError::TooDeep {
                    section: "tags".into(),
                    limit: MAX_DEPTH,
                },
                "tags nests objects deeper than 10 levels",
            ),
            (
                TwinError::InvalidKey {
                    path: "tags.a".into(),
                    reason: "contains a space",
                },
                "invalid key at tags.a: contains a space",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn quoted_star_matches_any_etag() {
        let twin = Twin::new(None, "2026-01-01T00:00:00.0000000Z").unwrap();
        assert!(twin.etag_matches("\"*\""));
        assert!(twin.etag_matches("*"));
        assert!(!twin.etag_matches("\"AAAAAAAAAAA=\""));
    }
}
