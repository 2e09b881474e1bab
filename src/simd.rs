//! Run-time selection between an AVX-512 build of a function and the portable one.
//!
//! [`multiversion!`] compiles one body three times: for AVX-512 (with FMA), for AVX2 with FMA,
//! and for the baseline target. Bodies use only IEEE operations whose results do not depend on the instruction set
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
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::simd::avx2() {
                    // SAFETY: the CPU has the features `mid` was compiled for.
                    return unsafe { mid($($arg),*) };
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

/// Whether the AVX2 + FMA builds may run (CPUs without AVX-512; the same numbers again).
#[cfg(target_arch = "x86_64")]
pub fn avx2() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("MINITRON_KERNEL").map_or(true, |v| v != "portable")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    })
}

/// Sum of `v` in a fixed order that vectorises: sixteen running partial sums (element `i` into
/// lane `i % 16`), then the lanes folded pairwise. The same order on every instruction set.
#[inline(always)]
pub fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(it.remainder()) {
        *a += x;
    }
    fold16(acc)
}

/// Σ v², in the order of [`sum_f32`], each term fused into its lane (`mul_add`).
#[inline(always)]
pub fn sum_sq_f32(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for i in 0..16 {
            acc[i] = c[i].mul_add(c[i], acc[i]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(it.remainder()) {
        *a = x.mul_add(x, *a);
    }
    fold16(acc)
}

#[inline(always)]
fn fold16(mut acc: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Largest value of `v` (−∞ when empty); order-independent, written to vectorise.
#[inline(always)]
pub fn max_f32(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(it.remainder()) {
        *a = a.max(x);
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// Sum of `v` in f64 with eight partial sums (lane `i % 8`), folded pairwise.
#[inline(always)]
pub fn sum_f64(v: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(it.remainder()) {
        *a += x;
    }
    let mut w = 4;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}
