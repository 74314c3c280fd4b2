//! A nanodist client in Rust, generated from protos/ with tonic and prost, that runs the interop
//! scenario against live servers and prints one `name value...` line per result for the Python test.
//!
//! Usage: nanodist-interop PS_ADDRESS BARRIER_ADDRESS LOCK_ADDRESS

pub mod nanodist {
    pub mod v1 {
        tonic::include_proto!("nanodist.v1");
    }
}

use nanodist::v1::barrier_client::BarrierClient;
use nanodist::v1::key_value_client::KeyValueClient;
use nanodist::v1::lock_client::LockClient;
use nanodist::v1::parameter_server_client::ParameterServerClient;
use nanodist::v1::{
    gradient_entry, optimizer, AcquireRequest, AddRequest, DType, GradientEntry, InitEntry, InitRequest,
    Optimizer, PullEntry, PullRequest, PushRequest, ReleaseRequest, Tensor, WaitRequest,
};

/// The documented key placement: CRC-32 (IEEE) of the UTF-8 key, modulo the number of shards.
fn shard_of(key: &str, shards: u32) -> u32 {
    crc32fast::hash(key.as_bytes()) % shards
}

fn f32_tensor(values: &[f32]) -> Tensor {
    Tensor {
        dtype: DType::Float32 as i32,
        shape: vec![values.len() as i64],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn f64_tensor(values: &[f64]) -> Tensor {
    Tensor {
        dtype: DType::Float64 as i32,
        shape: vec![values.len() as i64],
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn dense(key: &str, tensor: Tensor) -> GradientEntry {
    GradientEntry { key: key.into(), gradient: Some(gradient_entry::Gradient::Dense(tensor)), offset: 0 }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (ps_address, barrier_address, lock_address) = (&args[1], &args[2], &args[3]);
    let mut ps = ParameterServerClient::connect(format!("http://{ps_address}")).await?
        .max_decoding_message_size(64 << 20);

    for key in ["w", "layer0/w", "emb/table", "ünïcode", "a-very-long-key-name-0123456789"] {
        println!("shard {key} {}", shard_of(key, 2));
    }

    // 1. Init a float32 key (SGD) and a float64 key (Adam).
    let sgd = Optimizer { kind: optimizer::Kind::Sgd as i32, learning_rate: 0.5, ..Default::default() };
    let adam = Optimizer { kind: optimizer::Kind::Adam as i32, learning_rate: 0.1, ..Default::default() };
    let init = ps.init(InitRequest {
        entries: vec![
            InitEntry { key: "interop/f32".into(), value: Some(f32_tensor(&[1.0, 2.0, 3.0, 4.0])), optimizer: Some(sgd), ..Default::default() },
            InitEntry { key: "interop/f64".into(), value: Some(f64_tensor(&[1.0, 2.0, 3.0])), optimizer: Some(adam), ..Default::default() },
        ],
    }).await?.into_inner();
    println!("init {}", init.results.iter().filter(|r| r.created).count());

    // 2. Push gradients twice (ASP: each applies at once).
    for step in 0..2 {
        let push = ps.push(PushRequest {
            entries: vec![
                dense("interop/f32", f32_tensor(&[0.5, 0.25, -1.0, 2.0])),
                dense("interop/f64", f64_tensor(&[0.1, -0.2, 0.3])),
            ],
            worker_id: 0,
            step,
            request_id: format!("rust-push-{step}"),
            fencing_token: 0,
            ..Default::default()
        }).await?.into_inner();
        println!("push {step} versions {:?}", push.versions);
    }

    // 3. Pull, and print the raw bytes for a byte-for-byte comparison.
    let pulled = ps.pull(PullRequest {
        entries: vec![
            PullEntry { key: "interop/f32".into(), rows: vec![] },
            PullEntry { key: "interop/f64".into(), rows: vec![] },
        ],
        ..Default::default()
    }).await?.into_inner();
    for entry in &pulled.entries {
        if let Some(nanodist::v1::value_entry::Value::Dense(tensor)) = &entry.value {
            println!("pull {} {} {}", entry.key, entry.version, hex(&tensor.data));
        }
    }

    // 7. A bad request: 15 bytes of data for a 4-element float32 tensor.
    let mut bad = f32_tensor(&[0.0; 4]);
    bad.data.truncate(15);
    let status = ps
        .push(PushRequest { entries: vec![dense("interop/f32", bad)], ..Default::default() })
        .await
        .expect_err("a malformed tensor must be refused");
    println!("bad {:?} {}", status.code(), status.message());

    // 5. Lock: acquire, read the fencing token, release.
    let mut locks = LockClient::connect(format!("http://{lock_address}")).await?;
    let held = locks.acquire(AcquireRequest {
        name: "interop-lock".into(), owner: "rust".into(), ttl_ms: 10_000, wait_timeout_ms: 10_000, mode: 0,
        ..Default::default()
    }).await?.into_inner();
    println!("lock {}", held.fencing_token);
    locks.release(ReleaseRequest { name: "interop-lock".into(), lease_id: held.lease_id }).await?;

    // 6. Add to a counter, twice with one request id: the retry is answered, not applied again.
    let mut kv = KeyValueClient::connect(format!("http://{lock_address}")).await?;
    let add = AddRequest { key: "interop-counter".into(), delta: 5, request_id: "rust-add-1".into() };
    let added = kv.add(add.clone()).await?.into_inner();
    let retried = kv.add(add).await?.into_inner();
    assert_eq!(retried.value, added.value, "a retried Add was applied twice");
    println!("add {}", added.value);

    // 4. Join a barrier with the two Python processes the test started.
    let mut barrier = BarrierClient::connect(format!("http://{barrier_address}")).await?;
    let released = barrier.wait(WaitRequest {
        name: "interop".into(), parties: 3, member_id: "rust".into(), timeout_ms: 30_000, session_id: String::new(),
        request_id: "rust-wait-1".into(),
    }).await?.into_inner();
    println!("barrier {} {}", released.generation, released.arrival_index);
    Ok(())
}
