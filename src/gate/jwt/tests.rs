//! Unit tests of the token parsing and claims.

use super::*;

#[test]
fn strict_claims_refuse_duplicates() {
    let ok: StrictClaims = serde_json::from_str(r#"{"a":1,"b":{"c":[1,2,{"d":null}]}}"#).unwrap();
    assert_eq!(ok.0.len(), 2);
    assert!(serde_json::from_str::<StrictClaims>(r#"{"a":1,"a":2}"#).is_err());
    assert!(serde_json::from_str::<StrictClaims>(r#"{"a":{"b":1,"b":2}}"#).is_err());
    assert!(serde_json::from_str::<StrictClaims>(r#"[1]"#).is_err());
    assert!(serde_json::from_str::<StrictClaims>(r#""x""#).is_err());
}

#[test]
fn claim_texts() {
    assert_eq!(claim_text(&serde_json::json!("x")).as_deref(), Some("x"));
    assert_eq!(
        claim_text(&serde_json::json!(true)).as_deref(),
        Some("true")
    );
    assert_eq!(claim_text(&serde_json::json!(42)).as_deref(), Some("42"));
    assert_eq!(
        claim_text(&serde_json::json!({"sub": "svc", "act": {"sub": "older"}})).as_deref(),
        Some("svc")
    );
    assert_eq!(
        claim_text(&serde_json::json!(["a", "b"])).as_deref(),
        Some("a")
    );
    assert_eq!(claim_text(&serde_json::json!([])), None);
    assert_eq!(claim_text(&serde_json::json!(null)), None);
}

#[test]
fn numeric_claims() {
    let claims = serde_json::json!({"a": 5, "b": 5.4, "c": "5", "d": -1, "e": 1e300});
    let Value::Object(map) = claims else {
        unreachable!()
    };
    assert_eq!(numeric_claim(&map, "a"), Ok(Some(5)));
    assert_eq!(numeric_claim(&map, "b"), Ok(Some(5)));
    assert_eq!(numeric_claim(&map, "x"), Ok(None));
    assert!(numeric_claim(&map, "c").is_err());
    assert!(numeric_claim(&map, "d").is_err());
    assert!(numeric_claim(&map, "e").is_err());
}

#[test]
fn split() {
    assert!(split_token("a.b.c").is_ok());
    for bad in [
        "",
        "a",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "a..c",
        ".b.c",
        "a.b.",
        "a.b.c=",
        "a b.c.d",
        "é.b.c",
    ] {
        assert!(split_token(bad).is_err(), "{bad}");
    }
}
