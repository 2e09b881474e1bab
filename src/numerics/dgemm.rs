//! A safe face on the f64 GEMM of the `gemm` crate (the one candle's CPU matmul uses), for the
//! GPTQ code's large f64 products.

/// `c (m×n) = a (m×k) · b (k×n)` (row-major, contiguous), or `c += a · b` when `accumulate`,
/// on the calling thread: callers parallelise over independent products, so the sums and
/// their order do not depend on the thread count.
pub fn gemm_f64(
    m: usize,
    n: usize,
    k: usize,
    a: &[f64],
    b: &[f64],
    c: &mut [f64],
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
            c.iter_mut().for_each(|v| *v = 0.0);
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
            1.0,
            1.0,
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
        gemm_f64(m, n, k, &a, &b, &mut c, true);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = 1.0 + (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12, "({i}, {j})");
            }
        }
        gemm_f64(m, n, k, &a, &b, &mut c, false);
        let want: f64 = (0..k).map(|t| a[t] * b[t * n]).sum();
        assert!((c[0] - want).abs() < 1e-12);
    }
}
