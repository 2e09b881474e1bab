//! A safetensors file of arbitrary bytes: opening it and reading every tensor it declares must
//! either work or return an error, never panic or read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir_in("/dev/shm").expect("scratch folder");
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, data).expect("write");
    if let Ok(f) = minitron::model::checkpoint::SafetensorsFile::open(&p) {
        for name in f.tensors.keys() {
            let _ = f.bytes(name);
        }
    }
});
