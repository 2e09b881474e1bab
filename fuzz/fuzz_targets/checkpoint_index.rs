//! A checkpoint folder whose `model.safetensors.index.json` is arbitrary bytes, beside a valid
//! config and two small valid shards: opening it and reading every tensor must either work or
//! return an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../fixtures/tiny-llama3/config.json");
const SHARD: &[u8] = include_bytes!("../../fixtures/tiny-llama3/model.safetensors");

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir_in("/dev/shm").expect("scratch folder");
    std::fs::write(dir.path().join("config.json"), CONFIG).expect("write");
    for name in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        std::fs::write(dir.path().join(name), SHARD).expect("write");
    }
    std::fs::write(dir.path().join("model.safetensors.index.json"), data).expect("write");
    if let Ok(ck) = minitron::model::Checkpoint::open(dir.path()) {
        for spec in ck.specs() {
            let _ = ck.read_f32(&spec.name);
        }
    }
});
