//! config.json text: parsing it must either give a configuration whose derived sizes can be
//! computed without overflow or division by zero, or return an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) =
        minitron::model::LlamaConfig::from_json_str(text, std::path::Path::new("config.json"))
    {
        let _ = (c.gqa_groups(), c.q_dim(), c.kv_dim(), c.parameter_count());
    }
});
