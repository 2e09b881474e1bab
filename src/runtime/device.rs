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
