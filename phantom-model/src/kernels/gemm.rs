//! Matrix products of many activation rows with a weight: `C = A · Wᵀ` for `A` `[m, k]` and
//! `W` `[n, k]` (the checkpoints' `[out, in]`), accumulated in f32.
//!
//! The classic blocked scheme: a block of `W` is packed into column slivers `NR` wide, a block
//! of `A` into row slivers `MR` tall, and a register-blocked micro kernel runs over the packed
//! slivers, so every load feeds `MR` or `NR` multiply-adds from the caches. Each core takes
//! its own share of the output columns. Two packings share that driver: `A` in f32 with `W` in
//! f32, f16 or bf16 widened to f32 as it is packed ([`matmul`]), and both in bf16 kept as
//! neighbouring pairs along the depth for the AVX512-BF16 pair products
//! ([`super::dpbf16`], [`matmul_bf16`]). The micro kernels are written with AVX-512 and AVX2
//! intrinsics and chosen at run time; elsewhere the `gemm` crate computes the product.

// The blocked driver runs with the x86 micro kernels only.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_mut, unused_variables)
)]

use half::bf16;

use super::dot::Weight;

/// Columns of a block of `W` (packed once per depth block and shared by every row block).
const NC: usize = 2048;
/// Depth of a block: an `MR × KC` sliver of `A` and a `KC × NR` sliver of `W` stay in L1/L2.
/// Even, so that a block never splits a bf16 pair.
const KC: usize = 256;
/// Rows of a block of `A` (its packed panel stays in L2).
const MC: usize = 144;

/// `C = A · Wᵀ`: `a` `[m, k]` row-major, `w` `[n, k]` row-major; `[m, n]` row-major. The
/// output columns are split between the cores.
pub fn matmul<W: Weight>(a: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    matmul_into(a, m, k, (w, k), n, &mut c, super::threads());
    c
}

/// [`matmul`] into `c`, on the calling thread only (for callers that already split their work
/// over the cores), with the rows of `w` `ldw` values apart (`ldw ≥ k`: the first `k` values of
/// each longer row).
pub fn matmul_serial<W: Weight>(
    a: &[f32],
    m: usize,
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    c: &mut [f32],
) {
    matmul_into(a, m, k, (w, ldw), n, c, 1);
}

fn matmul_into<W: Weight>(
    a: &[f32],
    m: usize,
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    c: &mut [f32],
    threads: usize,
) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert!(ldw >= k && (n == 0 || w.len() >= (n - 1) * ldw + k));
    debug_assert_eq!(c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let operands = Widened { a, w, ldw, k };
        if avx512 {
            blocked::<_, 12, 32>(&operands, m, n, c, threads, x86::micro_avx512);
            return;
        }
        if avx2 {
            blocked::<_, 6, 16>(&operands, m, n, c, threads, x86::micro_avx2);
            return;
        }
    }
    c.fill(0.0);
    fallback(a, m, k, (w, ldw), n, c);
}

/// `C = A · Wᵀ` for `a` `[m, k]` and `w` `[n, k]` both in bf16 (row-major), on the AVX512-BF16
/// pair products; `[m, n]` in f32. `None` where the processor lacks them.
pub fn matmul_bf16(a: &[bf16], m: usize, k: usize, w: &[bf16], n: usize) -> Option<Vec<f32>> {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    if !super::dpbf16::available() {
        return None;
    }
    let mut c = vec![0.0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    if m > 0 && n > 0 && k > 0 {
        let operands = Pairs { a, w, k };
        blocked::<_, 12, 32>(
            &operands,
            m,
            n,
            &mut c,
            super::threads(),
            super::dpbf16::micro,
        );
    }
    Some(c)
}

/// The portable path: widen the weight a block at a time into the `gemm` crate.
fn fallback<W: Weight>(
    a: &[f32],
    m: usize,
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    c: &mut [f32],
) {
    for j0 in (0..n).step_by(NC) {
        let cols = NC.min(n - j0);
        let mut widened = vec![0.0f32; cols * k];
        for (j, row) in widened.chunks_exact_mut(k).enumerate() {
            W::widen(&w[(j0 + j) * ldw..(j0 + j) * ldw + k], row);
        }
        // SAFETY: `a` is [m, k] row-major, `widened` is [cols, k] row-major read as its
        // transpose [k, cols], and the destination is columns j0..j0+cols of the [m, n] `c`.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                c.as_mut_ptr().add(j0),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                widened.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// The two operands of a blocked product and how they are packed for its micro kernel.
trait Operands: Sync {
    /// A packed value: one f32, or a pair of bf16 neighbours along the depth.
    type Packed: bytemuck::Pod;
    /// Depth values one packed value holds.
    const DEPTH: usize;

    /// The depth `k` of the product.
    fn depth(&self) -> usize;

    /// Packs rows `jc..jc+nc` of `W`, depth `pc..pc+kc`, as slivers of `NR` columns: sliver
    /// `s`, step `p`, lane `j` holds depth `pc + p·DEPTH..` of row `jc + s·NR + j` (zeros past
    /// the last row or depth).
    fn pack_b<const NR: usize>(
        &self,
        jc: usize,
        nc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [Self::Packed],
    );

    /// Packs rows `ic..ic+mc` of `A`, depth `pc..pc+kc`, as slivers of `MR` rows: sliver `s`,
    /// step `p`, lane `i` holds depth `pc + p·DEPTH..` of row `ic + s·MR + i` (zeros past the
    /// last row or depth).
    fn pack_a<const MR: usize>(
        &self,
        ic: usize,
        mc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [Self::Packed],
    );
}

/// `A` in f32 and `W` in any [`Weight`] type (rows `ldw` apart), widened to f32 as it is
/// packed.
struct Widened<'a, W> {
    a: &'a [f32],
    w: &'a [W],
    ldw: usize,
    k: usize,
}

impl<W: Weight> Operands for Widened<'_, W> {
    type Packed = f32;
    const DEPTH: usize = 1;

    fn depth(&self) -> usize {
        self.k
    }

    fn pack_b<const NR: usize>(
        &self,
        jc: usize,
        nc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [f32],
    ) {
        let mut widened = [0.0f32; KC];
        for_each_lane::<NR, _>(nc, kc, packed, |row, sliver, j| {
            let start = (jc + row) * self.ldw + pc;
            W::widen(&self.w[start..start + kc], &mut widened[..kc]);
            for (p, &v) in widened[..kc].iter().enumerate() {
                sliver[p * NR + j] = v;
            }
        });
    }

    fn pack_a<const MR: usize>(
        &self,
        ic: usize,
        mc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [f32],
    ) {
        for_each_lane::<MR, _>(mc, kc, packed, |row, sliver, i| {
            let start = (ic + row) * self.k + pc;
            for (p, &v) in self.a[start..start + kc].iter().enumerate() {
                sliver[p * MR + i] = v;
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
/// `A` and `W` both in bf16, packed as pairs of depth neighbours (the low half holds the
/// even depth), the operand layout of the AVX512-BF16 pair products.
struct Pairs<'a> {
    a: &'a [bf16],
    w: &'a [bf16],
    k: usize,
}

#[cfg(target_arch = "x86_64")]
/// `values` (one row's depth block) as pairs into lane `lane` of a sliver `width` lanes wide.
fn pack_pairs(values: &[bf16], sliver: &mut [u32], width: usize, lane: usize) {
    let mut pairs = values.chunks_exact(2);
    for (p, pair) in pairs.by_ref().enumerate() {
        sliver[p * width + lane] =
            u32::from(pair[0].to_bits()) | u32::from(pair[1].to_bits()) << 16;
    }
    if let [last] = pairs.remainder() {
        sliver[values.len() / 2 * width + lane] = u32::from(last.to_bits());
    }
}

#[cfg(target_arch = "x86_64")]
impl Operands for Pairs<'_> {
    type Packed = u32;
    const DEPTH: usize = 2;

    fn depth(&self) -> usize {
        self.k
    }

    fn pack_b<const NR: usize>(
        &self,
        jc: usize,
        nc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [u32],
    ) {
        for_each_lane::<NR, _>(nc, kc.div_ceil(2), packed, |row, sliver, j| {
            let start = (jc + row) * self.k + pc;
            pack_pairs(&self.w[start..start + kc], sliver, NR, j);
        });
    }

    fn pack_a<const MR: usize>(
        &self,
        ic: usize,
        mc: usize,
        pc: usize,
        kc: usize,
        packed: &mut [u32],
    ) {
        for_each_lane::<MR, _>(mc, kc.div_ceil(2), packed, |row, sliver, i| {
            let start = (ic + row) * self.k + pc;
            pack_pairs(&self.a[start..start + kc], sliver, MR, i);
        });
    }
}

/// Calls `f(row, sliver, lane)` for every lane of the slivers `WIDTH` lanes wide that hold
/// `rows` rows of `steps` packed values each, `sliver` being the lane's sliver of `packed`;
/// the lanes past the last row are zeroed.
fn for_each_lane<const WIDTH: usize, P: bytemuck::Pod>(
    rows: usize,
    steps: usize,
    packed: &mut [P],
    mut f: impl FnMut(usize, &mut [P], usize),
) {
    for s in 0..rows.div_ceil(WIDTH) {
        let sliver = &mut packed[s * WIDTH * steps..(s + 1) * WIDTH * steps];
        for lane in 0..WIDTH {
            let row = s * WIDTH + lane;
            if row < rows {
                f(row, sliver, lane);
            } else {
                (0..steps).for_each(|p| sliver[p * WIDTH + lane] = P::zeroed());
            }
        }
    }
}

/// A micro kernel: `C[MR × NR] (+)= A sliver · B sliver` over `steps` packed steps, where the A
/// sliver holds `MR` packed values per step and the B sliver `NR`; `accumulate` adds to `C`
/// instead of overwriting it; `c` points at the tile's first element, rows `ldc` apart.
type Micro<P> =
    unsafe fn(steps: usize, a: *const P, b: *const P, c: *mut f32, ldc: usize, accumulate: bool);

/// The packing buffers of a thread, kept between products: fresh multi-megabyte buffers on
/// every call would cost a page fault per 4 KiB touched.
struct Scratch(Vec<f32>);

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    /// This thread's buffer (empty the first time, or when it is in use further up the stack).
    fn take() -> Self {
        Self(SCRATCH.with(std::cell::Cell::take))
    }

    /// Two buffers of the given lengths of 4-byte values, carved out of this one.
    fn split<P: bytemuck::Pod>(&mut self, a: usize, b: usize) -> (&mut [P], &mut [P]) {
        if self.0.len() < a + b {
            self.0.resize(a + b, 0.0);
        }
        let values: &mut [P] = bytemuck::cast_slice_mut(&mut self.0[..a + b]);
        values.split_at_mut(a)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        SCRATCH.with(|cell| {
            // Keep the larger of this buffer and any that was put back meanwhile.
            let other = cell.take();
            cell.set(if other.len() > buffer.len() {
                other
            } else {
                buffer
            });
        });
    }
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes only its own columns of the output, and nothing reads them until
// all tasks are done.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// The blocked product of `operands` (`[m, k]` times `[n, k]`ᵀ) into `c` (`[m, n]`) with
/// `MR × NR` micro tiles; the columns are split between `threads` tasks.
fn blocked<O: Operands, const MR: usize, const NR: usize>(
    operands: &O,
    m: usize,
    n: usize,
    c: &mut [f32],
    threads: usize,
    micro: Micro<O::Packed>,
) {
    let k = operands.depth();
    let out = Out(c.as_mut_ptr());
    // Column ranges in multiples of NR, one per task.
    let per_task = n.div_ceil(threads.max(1)).div_ceil(NR) * NR;
    let tasks = n.div_ceil(per_task);
    let run = |t: usize| {
        // Moves the whole `Send` wrapper into the closure: a closure would otherwise capture
        // only its raw-pointer field, which is not `Send`.
        #[allow(clippy::redundant_locals)]
        let out = out;
        let j_start = t * per_task;
        let j_end = n.min(j_start + per_task);
        let max_steps = KC.div_ceil(O::DEPTH);
        let mut scratch = Scratch::take();
        let (packed_b, packed_a) = scratch.split::<O::Packed>(
            max_steps * NC.min(per_task).div_ceil(NR) * NR,
            MC.div_ceil(MR) * MR * max_steps,
        );
        for jc in (j_start..j_end).step_by(NC) {
            let nc = NC.min(j_end - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let steps = kc.div_ceil(O::DEPTH);
                operands.pack_b::<NR>(jc, nc, pc, kc, packed_b);
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    operands.pack_a::<MR>(ic, mc, pc, kc, packed_a);
                    for jr in (0..nc).step_by(NR) {
                        let cols = NR.min(nc - jr);
                        let b_sliver = &packed_b[jr * steps..(jr + NR) * steps];
                        for ir in (0..mc).step_by(MR) {
                            let rows = MR.min(mc - ir);
                            let a_sliver = &packed_a[ir * steps..(ir + MR) * steps];
                            let (row, col) = (ic + ir, jc + jr);
                            // SAFETY: the slivers hold steps·MR and steps·NR values; a full
                            // tile lies inside this task's columns of `c` ([m, n], row stride
                            // n), and a partial one goes through a local tile.
                            unsafe {
                                if rows == MR && cols == NR {
                                    let tile = out.0.add(row * n + col);
                                    micro(
                                        steps,
                                        a_sliver.as_ptr(),
                                        b_sliver.as_ptr(),
                                        tile,
                                        n,
                                        pc > 0,
                                    );
                                } else {
                                    let mut local = [[0.0f32; NR]; MR];
                                    let tile = local.as_mut_ptr().cast::<f32>();
                                    micro(
                                        steps,
                                        a_sliver.as_ptr(),
                                        b_sliver.as_ptr(),
                                        tile,
                                        NR,
                                        false,
                                    );
                                    for (r, values) in local.iter().enumerate().take(rows) {
                                        let dst = out.0.add((row + r) * n + col);
                                        for (j, &v) in values.iter().enumerate().take(cols) {
                                            if pc > 0 {
                                                *dst.add(j) += v;
                                            } else {
                                                *dst.add(j) = v;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        super::for_each_index(tasks, run);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Declares the accumulators of a tile, runs the packed steps with one broadcast of A per
    /// row and two loads of B per step, then writes the tile back: every accumulator a named
    /// local, so that all of them stay in registers.
    macro_rules! tile {
        ($steps:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $accumulate:expr, $width:expr,
         $zero:ident, $load:ident, $load_b:ident, $store:ident, $set1:ident, $fma:ident,
         $add:ident,
         [$(($i:expr, $r0:ident, $r1:ident)),*]) => {{
            const MR: usize = [$($i),*].len();
            $(let mut $r0 = $zero(); let mut $r1 = $zero();)*
            for p in 0..$steps {
                // SAFETY: p < steps, within the slivers (MR values of A, 2·width of B per
                // step).
                unsafe {
                    let b0 = $load_b($b.add(p * 2 * $width));
                    let b1 = $load_b($b.add(p * 2 * $width + $width));
                    let ap = $a.add(p * MR);
                    $(
                        let ai = $set1(*ap.add($i));
                        $r0 = $fma(ai, b0, $r0);
                        $r1 = $fma(ai, b1, $r1);
                    )*
                }
            }
            $(
                // SAFETY: the tile has MR rows of 2·width values, rows ldc apart.
                unsafe {
                    let dst = $c.add($i * $ldc);
                    if $accumulate {
                        $r0 = $add($r0, $load(dst));
                        $r1 = $add($r1, $load(dst.add($width)));
                    }
                    $store(dst, $r0);
                    $store(dst.add($width), $r1);
                }
            )*
        }};
    }

    /// The 12 × 32 AVX-512 tile of [`tile!`] (24 accumulators, two B registers per step),
    /// with B loaded by `$load_b`, A broadcast by `$set1` and multiplied-added by `$fma`.
    macro_rules! tile_12x32 {
        ($steps:expr, $a:expr, $b:expr, $c:expr, $ldc:expr, $accumulate:expr,
         $load_b:ident, $set1:ident, $fma:ident) => {
            tile!(
                $steps,
                $a,
                $b,
                $c,
                $ldc,
                $accumulate,
                16,
                _mm512_setzero_ps,
                _mm512_loadu_ps,
                $load_b,
                _mm512_storeu_ps,
                $set1,
                $fma,
                _mm512_add_ps,
                [
                    (0, c00, c01),
                    (1, c10, c11),
                    (2, c20, c21),
                    (3, c30, c31),
                    (4, c40, c41),
                    (5, c50, c51),
                    (6, c60, c61),
                    (7, c70, c71),
                    (8, c80, c81),
                    (9, c90, c91),
                    (10, ca0, ca1),
                    (11, cb0, cb1)
                ]
            )
        };
    }

    pub(in crate::kernels) use {tile, tile_12x32};

    /// 12 × 32 tile: 24 AVX-512 accumulators, each step two loads of B and 12 broadcasts of A.
    ///
    /// # Safety
    ///
    /// The processor has AVX-512F; `a` holds `12·kc` values, `b` `32·kc`, and `c` a 12 × 32
    /// tile with rows `ldc` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn micro_avx512(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        tile_12x32!(
            kc,
            a,
            b,
            c,
            ldc,
            accumulate,
            _mm512_loadu_ps,
            _mm512_set1_ps,
            _mm512_fmadd_ps
        );
    }

    /// 6 × 16 tile: 12 AVX2 accumulators, each step two loads of B and 6 broadcasts of A.
    ///
    /// # Safety
    ///
    /// The processor has AVX2 and FMA; `a` holds `6·kc` values, `b` `16·kc`, and `c` a 6 × 16
    /// tile with rows `ldc` apart.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_avx2(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        tile!(
            kc,
            a,
            b,
            c,
            ldc,
            accumulate,
            8,
            _mm256_setzero_ps,
            _mm256_loadu_ps,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_set1_ps,
            _mm256_fmadd_ps,
            _mm256_add_ps,
            [
                (0, c00, c01),
                (1, c10, c11),
                (2, c20, c21),
                (3, c30, c31),
                (4, c40, c41),
                (5, c50, c51)
            ]
        );
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::testing::{values, worst, x_wt as reference};

    #[test]
    fn blocked_products_equal_the_f64_product() {
        // Tails in every dimension, depths across several KC blocks, row blocks past MC.
        for (m, k, n) in [
            (1, 1, 1),
            (9, 17, 3),
            (13, 300, 33),
            (25, 513, 70),
            (150, 96, 40),
            (40, 64, 2100),
        ] {
            let a = values(m * k, 1 + k as u64);
            let w = values(n * k, 2 + n as u64);
            let tol = 2e-5 * (k as f32).sqrt() + 1e-6;
            let e = worst(&matmul(&a, m, k, &w, n), &reference(&a, m, k, &w, n));
            assert!(e <= tol, "f32 {m}x{k}x{n}: off by {e}");
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wb_f: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let e = worst(&matmul(&a, m, k, &wb, n), &reference(&a, m, k, &wb_f, n));
            assert!(e <= tol, "bf16 {m}x{k}x{n}: off by {e}");
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wh_f: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let e = worst(&matmul(&a, m, k, &wh, n), &reference(&a, m, k, &wh_f, n));
            assert!(e <= tol, "f16 {m}x{k}x{n}: off by {e}");
            let mut portable = vec![0.0f32; m * n];
            fallback(&a, m, k, (&w, k), n, &mut portable);
            let e = worst(&portable, &reference(&a, m, k, &w, n));
            assert!(e <= tol, "portable {m}x{k}x{n}: off by {e}");
        }
    }

    #[test]
    fn a_weight_with_longer_rows_is_read_to_the_depth() {
        // The first k values of rows ldw apart, as attention reads a prefix of its keys.
        let (m, k, n, ldw) = (30, 70, 45, 301);
        let a = values(m * k, 7);
        let wide = values(n * ldw, 8);
        let w: Vec<f32> = wide
            .chunks_exact(ldw)
            .flat_map(|r| r[..k].to_vec())
            .collect();
        let want = reference(&a, m, k, &w, n);
        let mut got = vec![f32::NAN; m * n];
        matmul_serial(&a, m, k, (&wide, ldw), n, &mut got);
        let e = worst(&got, &want);
        assert!(e <= 2e-5 * (k as f32).sqrt(), "off by {e}");
        let mut portable = vec![0.0f32; m * n];
        fallback(&a, m, k, (&wide, ldw), n, &mut portable);
        assert!(worst(&portable, &want) <= 2e-5 * (k as f32).sqrt());
    }
}
