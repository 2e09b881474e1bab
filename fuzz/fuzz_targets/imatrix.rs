//! An importance matrix of arbitrary bytes (GGUF or llama.cpp's legacy `.dat`): reading it and
//! checking it against a model must either work or return an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../fixtures/tiny-llama3/config.json");

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir_in("/dev/shm").expect("scratch folder");
    let p = dir.path().join("x.imatrix");
    std::fs::write(&p, data).expect("write");
    if let Ok(im) = minitron::calib::Imatrix::read(&p) {
        let c = minitron::model::LlamaConfig::from_json_str(CONFIG, &p).expect("fixture config");
        let _ = im.check_against(&c, &p);
        for e in im.entries.values() {
            let _ = e.mean();
        }
    }
});
