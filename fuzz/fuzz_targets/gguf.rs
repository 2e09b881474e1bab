//! A GGUF file of arbitrary bytes: opening it, reading its metadata and every tensor's data must
//! either work or return an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir_in("/dev/shm").expect("scratch folder");
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, data).expect("write");
    if let Ok(g) = minitron::format::gguf::GgufFile::open(&p) {
        for t in &g.tensors {
            let _ = g.data(t);
            let _ = g.f32_values(&t.name);
        }
    }
});
