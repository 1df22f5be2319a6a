//! A small validator for the subset of OpenAPI 3.0 / JSON Schema that `docs/openapi.yaml`
//! uses for its answers, so tests can check what the server sends against what the file
//! promises.
//!
//! Supported: `type` (`integer` means a JSON number without a fraction or exponent as
//! serde_json reads it, so `1.0` is not an integer), `nullable`, `required`, `properties`,
//! `additionalProperties` (`false`, `true` or a schema), `items`, `enum`, `minimum`,
//! `maximum`, `minItems`, `maxItems`, `minLength`, `maxLength` and `$ref` to
//! `#/components/...`. Annotations (`description`, `format`, `example`, `examples`,
//! `default`, `title`) are ignored. Any other keyword in a schema being validated is
//! reported as an error rather than silently skipped, so the file cannot grow a
//! constraint the tests do not check.
//!
//! Use from a test crate with `#[path = "common/schema.rs"] mod schema;` (or declare it
//! in `common/mod.rs`).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

/// Keywords that carry no constraint.
const ANNOTATIONS: &[&str] = &[
    "description",
    "format",
    "example",
    "examples",
    "default",
    "title",
];
/// Keywords the validator checks.
const CHECKED: &[&str] = &[
    "type",
    "nullable",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "$ref",
];
/// The HTTP methods an OpenAPI path item may hold.
pub const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// An OpenAPI document, held as JSON.
#[derive(Debug, Clone)]
pub struct Spec {
    pub root: Value,
}

impl Spec {
    /// Reads a YAML (or JSON) OpenAPI file.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        let root: Value =
            serde_yaml::from_str(text).unwrap_or_else(|err| panic!("OpenAPI file: {err}"));
        Self { root }
    }

    /// Every documented `(path, method)`, method in upper case.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        if let Some(paths) = self.root["paths"].as_object() {
            for (path, item) in paths {
                for method in METHODS {
                    if item.get(*method).is_some() {
                        out.insert((path.clone(), method.to_uppercase()));
                    }
                }
            }
        }
        out
    }

    /// The operation object of `(path, method)`.
    pub fn operation(&self, path: &str, method: &str) -> Option<&Value> {
        self.root["paths"].get(path)?.get(method.to_lowercase())
    }

    /// Follows `$ref`s (JSON pointers into this document) until a non-reference.
    pub fn deref<'a>(&'a self, mut value: &'a Value) -> Result<&'a Value, String> {
        for _ in 0..32 {
            let Some(target) = value.get("$ref").and_then(Value::as_str) else {
                return Ok(value);
            };
            value = self.pointer(target)?;
        }
        Err("$ref chain longer than 32".into())
    }

    fn pointer(&self, target: &str) -> Result<&Value, String> {
        let pointer = target
            .strip_prefix('#')
            .ok_or_else(|| format!("only local $refs are supported, not {target:?}"))?;
        self.root
            .pointer(pointer)
            .ok_or_else(|| format!("$ref {target:?} points at nothing"))
    }

    /// The parameters of an operation (path-item parameters first), `$ref`s resolved.
    pub fn parameters(&self, path: &str, method: &str) -> Vec<&Value> {
        let item = &self.root["paths"][path];
        let op = &item[method.to_lowercase()];
        let mut out = Vec::new();
        for list in [&item["parameters"], &op["parameters"]] {
            for p in list.as_array().into_iter().flatten() {
                out.push(self.deref(p).unwrap_or_else(|err| panic!("{err}")));
            }
        }
        out
    }

    /// The response object documented for `status` (exact code, then `4XX`-style range,
    /// then `default`), `$ref` resolved.
    pub fn response(&self, path: &str, method: &str, status: u16) -> Result<&Value, String> {
        let op = self
            .operation(path, method)
            .ok_or_else(|| format!("{method} {path} is not documented"))?;
        let responses = &op["responses"];
        let range = format!("{}XX", status / 100);
        let found = [status.to_string(), range, "default".to_string()]
            .iter()
            .find_map(|key| responses.get(key.as_str()))
            .ok_or_else(|| format!("{method} {path} documents no {status} answer"))?;
        self.deref(found)
    }

    /// Validates `value` against `schema`; every violation, each with its JSON path.
    pub fn validate(&self, schema: &Value, value: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Validates against `#/components/schemas/{name}`.
    pub fn validate_named(&self, name: &str, value: &Value) -> Result<(), Vec<String>> {
        let schema = serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
        self.validate(&schema, value)
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(obj) = schema.as_object() else {
            if schema != &Value::Bool(true) {
                errors.push(format!("{at}: schema is not an object: {schema}"));
            }
            return;
        };
        if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
            // OpenAPI 3.0 ignores a $ref's siblings; refuse the ones that would be
            // silently lost (such as `nullable`).
            if let Some(extra) = obj.keys().find(|k| *k != "$ref" && *k != "description") {
                errors.push(format!(
                    "{at}: `{extra}` beside $ref {target} has no effect"
                ));
            }
            match self.pointer(target) {
                Ok(resolved) => self.check(resolved, value, at, errors),
                Err(err) => errors.push(format!("{at}: {err}")),
            }
            return;
        }
        for key in obj.keys() {
            if !CHECKED.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                errors.push(format!("{at}: unsupported schema keyword `{key}`"));
            }
        }
        if value.is_null() {
            if obj.get("nullable") != Some(&Value::Bool(true)) {
                errors.push(format!("{at}: null, but the schema is not nullable"));
            }
            return;
        }
        if let Some(ty) = obj.get("type") {
            let ty = ty.as_str().unwrap_or("?");
            let ok = match ty {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "boolean" => value.is_boolean(),
                "number" => value.is_number(),
                "integer" => value.is_i64() || value.is_u64(),
                other => {
                    errors.push(format!("{at}: unknown type `{other}`"));
                    return;
                }
            };
            if !ok {
                errors.push(format!("{at}: expected {ty}, got {}", short(value)));
                return;
            }
        }
        if let Some(allowed) = obj.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                errors.push(format!(
                    "{at}: {} is not one of {}",
                    short(value),
                    Value::Array(allowed.clone())
                ));
            }
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = obj.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    errors.push(format!("{at}: {n} is below the minimum {min}"));
                }
            }
            if let Some(max) = obj.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    errors.push(format!("{at}: {n} is above the maximum {max}"));
                }
            }
        }
        if let Some(s) = value.as_str() {
            let chars = s.chars().count() as u64;
            if let Some(min) = obj.get("minLength").and_then(Value::as_u64) {
                if chars < min {
                    errors.push(format!("{at}: string shorter than {min}"));
                }
            }
            if let Some(max) = obj.get("maxLength").and_then(Value::as_u64) {
                if chars > max {
                    errors.push(format!("{at}: string longer than {max}"));
                }
            }
        }
        if let Some(items) = value.as_array() {
            let len = items.len() as u64;
            if let Some(min) = obj.get("minItems").and_then(Value::as_u64) {
                if len < min {
                    errors.push(format!("{at}: {len} items, fewer than {min}"));
                }
            }
            if let Some(max) = obj.get("maxItems").and_then(Value::as_u64) {
                if len > max {
                    errors.push(format!("{at}: {len} items, more than {max}"));
                }
            }
            if let Some(item_schema) = obj.get("items") {
                for (i, item) in items.iter().enumerate() {
                    self.check(item_schema, item, &format!("{at}[{i}]"), errors);
                }
            }
        }
        if let Some(fields) = value.as_object() {
            for name in obj
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !fields.contains_key(name) {
                    errors.push(format!("{at}: missing required property `{name}`"));
                }
            }
            let props = obj.get("properties").and_then(Value::as_object);
            for (name, field) in fields {
                let path = format!("{at}.{name}");
                match props.and_then(|p| p.get(name)) {
                    Some(field_schema) => self.check(field_schema, field, &path, errors),
                    None => match obj.get("additionalProperties") {
                        None | Some(Value::Bool(true)) => {}
                        Some(Value::Bool(false)) => {
                            errors.push(format!("{at}: property `{name}` is not documented"))
                        }
                        Some(extra) => self.check(extra, field, &path, errors),
                    },
                }
            }
        }
    }

    /// Object schemas reachable from `schema` that say nothing about
    /// `additionalProperties` (so any extra field would pass unnoticed), by JSON path.
    pub fn open_objects(&self, schema: &Value, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        self.walk_open(schema, at, &mut out, &mut seen);
        out
    }

    fn walk_open(
        &self,
        schema: &Value,
        at: &str,
        out: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
            if seen.insert(target.to_string()) {
                if let Ok(resolved) = self.pointer(target) {
                    self.walk_open(resolved, target, out, seen);
                }
            }
            return;
        }
        if schema.get("type").and_then(Value::as_str) == Some("object")
            && schema.get("additionalProperties").is_none()
        {
            out.push(at.to_string());
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, field) in props {
                self.walk_open(field, &format!("{at}.{name}"), out, seen);
            }
        }
        if let Some(items) = schema.get("items") {
            self.walk_open(items, &format!("{at}[]"), out, seen);
        }
        if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            self.walk_open(extra, &format!("{at}.*"), out, seen);
        }
    }
}

/// A value shortened for error messages.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 80 {
        format!("{}...", text.chars().take(77).collect::<String>())
    } else {
        text
    }
}
