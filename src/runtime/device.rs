//! Device choice. The default build is CPU-only; `--device cuda` needs the `cuda` feature.

use candle_core::Device;

use crate::error::{Error, Result};

/// Resolves a `--device` value (`cpu` or `cuda[:N]`).
pub fn pick_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| Error::Invalid(format!("bad device `{s}`")))
                })
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                return Err(Error::Unsupported(
                    "--device cuda: this minitron was built without CUDA (rebuild with `--features cuda`, see scripts/build-cuda.sh)".into(),
                ));
            }
            // The CUDA libraries themselves (libcuda.so.1 from the driver, libcublas.so.13,
            // libcurand.so.10, libcudart.so.13) are linked: when one is missing the loader stops
            // before main and names it. What can fail here is the driver or the device.
            Device::new_cuda(ordinal).map_err(|e| {
                Error::Unsupported(format!(
                    "--device {s}: CUDA initialisation failed: {e}. Check that the GPU is visible \
                     (`nvidia-smi`) and that libcuda.so.1 on the library path is the driver's \
                     (a link-time stub answers every call with CUDA_ERROR_UNKNOWN)"
                ))
            })
        }
        other => Err(Error::Invalid(format!(
            "unknown device `{other}` (expected cpu or cuda[:N])"
        ))),
    }
}

/// Free and total memory of a GPU in bytes; `None` on a CPU, or when the driver does not say.
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

/// Bytes an artifact stores: a GGUF file's size, or a checkpoint folder's weight files
/// together (the shards its index lists, or its single file). `u64::MAX` when unreadable, so
/// that nothing unreadable is judged to fit.
pub fn stored_bytes(path: &std::path::Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(u64::MAX);
    }
    match crate::model::checkpoint::weight_files(path) {
        Ok(files) => files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add),
        Err(_) => u64::MAX,
    }
}

/// Whether models of `bytes` (stored) fit on `device` with room for the activations and
/// logits of a perplexity batch (`headroom` bytes): true only on a GPU that says how much is
/// free. Weights stay in their stored precision on a GPU, so stored bytes are what they take.
pub fn fits_resident(device: &Device, bytes: u64, headroom: u64) -> bool {
    match device_memory(device) {
        Some((free, _)) => bytes.saturating_add(bytes / 8).saturating_add(headroom) <= free as u64,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_never_holds_a_model_resident_for_perplexity() {
        assert_eq!(device_memory(&Device::Cpu), None);
        assert!(!fits_resident(&Device::Cpu, 1, 0));
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama3");
        let st = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        assert!(st > 0);
        assert_eq!(stored_bytes(&dir), st);
        assert_eq!(stored_bytes(&dir.join("no-such-folder")), u64::MAX);
    }
}
