//! The two float types GPTQ's arithmetic runs in: f64 (the reference, and a fallback) and f32
//! (what the export uses: half the memory traffic and twice the lanes of f64).

use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

/// f32 or f64.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
    /// `x_r[k] −= e_r · u[k]` for `k` in `from..to` over the rows of `xs` (`[rows, n]`), on the
    /// widest vectors the CPU has (the same bits on every path: no fused multiply-add).
    fn subtract_outer(xs: &mut [Self], n: usize, errs: &[Self], u: &[Self], from: usize, to: usize);
    /// `v` in this type: borrowed when it already is f32.
    fn from_f32_slice(v: &[f32]) -> std::borrow::Cow<'_, [Self]>;
}

/// The subtraction kernel of [`Real::subtract_outer`] and the trait for one float type.
macro_rules! real {
    ($t:ty, $kernel:ident, |$v:ident| $conv:expr) => {
        multiversion! {
            fn $kernel(xs: &mut [$t], n: usize, errs: &[$t], u: &[$t], from: usize, to: usize) {
                for (x, &e) in xs.chunks_mut(n).zip(errs) {
                    for (xk, &uk) in x[from..to].iter_mut().zip(&u[from..to]) {
                        *xk -= e * uk;
                    }
                }
            }
        }

        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn subtract_outer(
                xs: &mut [Self],
                n: usize,
                errs: &[Self],
                u: &[Self],
                from: usize,
                to: usize,
            ) {
                $kernel(xs, n, errs, u, from, to)
            }
            fn from_f32_slice($v: &[f32]) -> std::borrow::Cow<'_, [Self]> {
                $conv
            }
        }
    };
}

real!(f64, subtract_outer_f64, |v| std::borrow::Cow::Owned(
    v.iter().map(|&x| x as f64).collect()
));
// f32 moments are multiplied as they are: no copy on the refit's hot path.
real!(f32, subtract_outer_f32, |v| std::borrow::Cow::Borrowed(v));

/// `Σ x_k y_k` in eight interleaved partial sums, combined in a fixed order: vectorizable, and
/// the same bits on every run, thread count and instruction set (no fused multiply-add).
#[inline(always)]
pub fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&a, &b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}
