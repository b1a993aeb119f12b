//! Claims: strict parsing (no duplicate names), numeric claims, and the identity they map to.

use super::*;

/// The identity that (verified) claims give under a claim mapping: for each field the
/// first mapped claim present wins (see [`ClaimMapping`]); `default_workflow` (the
/// provider's first configured audience) is the workflow when no workflow claim is
/// present. The method is [`AuthMethod::Jwt`]; it has no certificate.
pub fn identity_from_claims(
    mapping: &ClaimMapping,
    claims: Map<String, Value>,
    default_workflow: Option<&str>,
) -> Identity {
    let actor = first_claim(&claims, &mapping.actor);
    let subject = first_claim(&claims, &mapping.subject);
    let workflow =
        first_claim(&claims, &mapping.workflow).or_else(|| default_workflow.map(str::to_owned));
    Identity {
        method: AuthMethod::Jwt,
        actor,
        subject,
        workflow,
        claims: Arc::new(claims),
        certificate: None,
    }
}

/// A numeric claim as whole seconds: absent is `None`, another type is an error.
pub(super) fn numeric_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f.round() as u64))
                    }
                    _ => Err(AuthError::InvalidClaim(name)),
                }
            }
        }
        Some(_) => Err(AuthError::InvalidClaim(name)),
    }
}

pub(super) fn first_claim(claims: &Map<String, Value>, names: &[String]) -> Option<String> {
    names
        .iter()
        .find_map(|name| claims.get(name).and_then(claim_text))
}

/// A claim as identity text: strings as they are, numbers and booleans as JSON text,
/// an object by its `sub` (RFC 8693 `act`), a list by its first element.
pub(super) fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(map) => map.get("sub").and_then(Value::as_str).map(str::to_owned),
        Value::Array(items) => items.first().and_then(|first| match first {
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(first.to_string()),
            _ => None,
        }),
        Value::Null => None,
    }
}

/// The token's claims, refusing duplicate member names at any depth (RFC 7519 lets a
/// parser refuse them; two parsers picking different duplicates is a classic bypass).
pub(super) struct StrictClaims(pub(super) Map<String, Value>);

impl<'de> Deserialize<'de> for StrictClaims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(StrictVisitor)? {
            Value::Object(map) => Ok(StrictClaims(map)),
            _ => Err(de::Error::custom("the claims are not a JSON object")),
        }
    }
}

pub(super) struct StrictValue(pub(super) Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

pub(super) struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let StrictValue(value) = access.next_value()?;
            if map.insert(key, value).is_some() {
                return Err(de::Error::custom("duplicate member name"));
            }
        }
        Ok(Value::Object(map))
    }
}
