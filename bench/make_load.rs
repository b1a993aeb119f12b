//! Writes what the h2load benchmarks send: gRPC-framed request bodies and a
//! token signed with a fresh HMAC secret.
//!
//! `cargo run --release --example make_load -- OUTDIR [INSTANCE]` writes
//! `OUTDIR/hmac.secret`, `OUTDIR/token` (HS256, sub/act `bench-client`, aud
//! `gridgate`, valid 2 hours), `OUTDIR/fmb.bin` (FindMissingBlobs with 10
//! digests) and `OUTDIR/caps.bin` (GetCapabilities).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use gridgate::proto::build::bazel::remote::execution::v2 as re;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message;

fn frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
    out
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: make_load OUTDIR [INSTANCE]"))?,
    );
    let instance = args.next().unwrap_or_else(|| "main".into());
    std::fs::create_dir_all(&out)?;

    let mut secret = [0u8; 48];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(out.join("hmac.secret"), &secret)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "sub": "bench-user", "act": "bench-client", "aud": "gridgate",
        "iat": now, "exp": now + 7200,
    });
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?;
    std::fs::write(out.join("token"), token)?;

    let digests = (0..10u64)
        .map(|i| {
            let data = format!("bench blob {i}").repeat(100 + i as usize * 37);
            gridgate::reapi::digest::BlobKey::of(data.as_bytes()).to_digest()
        })
        .collect();
    let fmb = re::FindMissingBlobsRequest {
        instance_name: instance.clone(),
        blob_digests: digests,
        digest_function: 0,
    };
    std::fs::write(out.join("fmb.bin"), frame(&fmb))?;
    let caps = re::GetCapabilitiesRequest {
        instance_name: instance,
    };
    std::fs::write(out.join("caps.bin"), frame(&caps))?;
    Ok(())
}
