//! A structural OpenAPI v3 validator for CRD schemas, as the API server (with
//! `kubectl --validate=strict`) applies them: types, required fields, enums, bounds, unknown
//! fields, int-or-string, preserve-unknown-fields, nullable. CEL rules are checked separately.

use serde_json::Value;

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => false,
    }
}

pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = schema.get(key) {
            let matched = branches.iter().filter(|b| {
                let mut e = Vec::new();
                validate(b, value, path, &mut e);
                e.is_empty()
            });
            if matched.count() == 0 {
                errors.push(format!("{path}: matches none of {key}"));
            }
        }
    }
    if let Some(Value::Array(all)) = schema.get("allOf") {
        for b in all {
            validate(b, value, path, errors);
        }
    }
    if let Some(Value::String(ty)) = schema.get("type") {
        if !type_ok(ty, value) {
            errors.push(format!("{path}: expected {ty}, got {value}"));
            return;
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(value) {
            errors.push(format!("{path}: {value} is not one of {options:?}"));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let excl = schema.get("exclusiveMinimum") == Some(&Value::Bool(true));
            if n < min || (excl && n == min) {
                errors.push(format!("{path}: {n} is below the minimum {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let excl = schema.get("exclusiveMaximum") == Some(&Value::Bool(true));
            if n > max || (excl && n == max) {
                errors.push(format!("{path}: {n} is above the maximum {max}"));
            }
        }
    }
    if let Some(s) = value.as_str() {
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if (s.chars().count() as u64) < min {
                errors.push(format!("{path}: shorter than {min}"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = req.as_str() {
                if !obj.contains_key(r) {
                    errors.push(format!("{path}.{r}: required"));
                }
            }
        }
        let preserve =
            schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        let additional = schema.get("additionalProperties");
        for (k, v) in obj {
            let child = format!("{path}.{k}");
            if let Some(s) = props.and_then(|p| p.get(k)) {
                validate(s, v, &child, errors);
            } else if let Some(a) = additional.filter(|a| a.is_object()) {
                validate(a, v, &child, errors);
            } else if !preserve && additional != Some(&Value::Bool(true)) {
                errors.push(format!("{child}: unknown field"));
            }
        }
    }
}

/// Validate a whole object. apiVersion, kind and metadata are the API server's business (a
/// CRD schema does not describe them), so only their types are checked.
pub fn validate_object(schema: &Value, object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let mut schema = schema.clone();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
        props.insert("kind".into(), serde_json::json!({"type": "string"}));
        props.insert(
            "metadata".into(),
            serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    }
    validate(&schema, object, "", &mut errors);
    errors
}
