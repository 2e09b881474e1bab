//! A safe face on the f32/f64 GEMM of the `gemm` crate (the one candle's CPU matmul uses), for
//! the GPTQ code's large products.

use super::Real;

/// `c (m×n) = a (m×k) · b (k×n)` (row-major, contiguous), or `c += a · b` when `accumulate`,
/// on the calling thread: callers parallelise over independent products, so the sums and
/// their order do not depend on the thread count.
pub fn gemm_full<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    c: &mut [T],
    accumulate: bool,
) {
    assert_eq!(a.len(), m * k, "lhs is m × k");
    assert_eq!(b.len(), k * n, "rhs is k × n");
    assert_eq!(c.len(), m * n, "dst is m × n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.iter_mut().for_each(|v| *v = T::ZERO);
        }
        return;
    }
    // SAFETY: the three slices hold exactly the row-major matrices the strides describe
    // (checked above), `c` is borrowed mutably and so aliases neither input, and the call
    // reads and writes nothing outside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `c −= a · b` on row-major views with unit column stride: `a` is `m × k` with rows `lda`
/// apart, `b` `k × n` with rows `ldb` apart, `c` `m × n` with rows `ldc` apart (each slice
/// starts at the view's first element). On the calling thread, as [`gemm_full`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_sub<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    gemm_view(m, n, k, a, (lda, 1), b, (ldb, 1), c, ldc, -T::ONE, true);
}

/// `c = a · b` on row-major views (as [`gemm_sub`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    gemm_view(m, n, k, a, (lda, 1), b, (ldb, 1), c, ldc, T::ONE, false);
}

/// `c = [c +] beta · a · b` with `a` and `b` given by (row stride, column stride), `c` by its
/// row stride (unit columns).
#[allow(clippy::too_many_arguments)]
pub fn gemm_view<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    c: &mut [T],
    ldc: usize,
    beta: T,
    read_dst: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, ldc, n, 1) < c.len(), "dst view fits");
    if k == 0 {
        if !read_dst {
            for r in 0..m {
                c[r * ldc..r * ldc + n]
                    .iter_mut()
                    .for_each(|v| *v = T::ZERO);
            }
        }
        return;
    }
    assert!(last(m, a_rs, k, a_cs) < a.len(), "lhs view fits");
    assert!(last(k, b_rs, n, b_cs) < b.len(), "rhs view fits");
    // SAFETY: the asserts keep every element of each view inside its slice; `c` is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            c.as_mut_ptr(),
            ldc,
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            beta,
            read_dst,
        );
    }
}

/// [`gemm_view`] on pointers, for a product whose output and inputs are disjoint parts of one
/// matrix.
///
/// # Safety
/// Every element of the three views must be inside live allocations, and no element of the
/// `c` view may be an element of the `a` or `b` view.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut T,
    ldc: usize,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
    beta: T,
    read_dst: bool,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            read_dst,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            T::ONE,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_triple_loop() {
        let (m, n, k) = (7, 13, 9);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut c = vec![1.0; m * n];
        gemm_full(m, n, k, &a, &b, &mut c, true);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = 1.0 + (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12, "({i}, {j})");
            }
        }
        gemm_full(m, n, k, &a, &b, &mut c, false);
        let want: f64 = (0..k).map(|t| a[t] * b[t * n]).sum();
        assert!((c[0] - want).abs() < 1e-12);
    }

    #[test]
    fn strided_subtraction_touches_only_its_view() {
        // A 3 × 3 view at column 2 of a 5-wide c; a is 3 × 2 in 3-wide rows; b 2 × 3 in 6.
        let a: Vec<f64> = (0..9).map(|i| i as f64).collect();
        let b: Vec<f64> = (0..12).map(|i| (i as f64) * 0.5).collect();
        let mut c = [10.0; 15];
        gemm_sub(3, 3, 2, &a, 3, &b, 6, &mut c[2..], 5);
        for i in 0..3 {
            for j in 0..5 {
                let want = if j >= 2 {
                    10.0 - (0..2)
                        .map(|t| a[i * 3 + t] * b[t * 6 + (j - 2)])
                        .sum::<f64>()
                } else {
                    10.0
                };
                assert_eq!(c[i * 5 + j], want, "({i}, {j})");
            }
        }
    }
}
