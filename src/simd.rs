//! Run-time selection between an AVX-512 build of a function and the portable one.
//!
//! [`multiversion!`] compiles one body twice: once for AVX-512 (with FMA), once for the baseline
//! target. Bodies use only IEEE operations whose results do not depend on the instruction set
//! (`+`, `*`, `mul_add`, `sqrt`, comparisons), so both builds give identical numbers; the fast
//! one is chosen when the CPU has the features and `MINITRON_KERNEL` is not `portable`.

macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::simd::avx512() {
                    // SAFETY: the CPU has the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Whether the AVX-512 builds may run.
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MINITRON_KERNEL").map_or(true, |v| v != "portable")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    })
}
