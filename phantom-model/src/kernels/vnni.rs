//! Products of quantized weights ([`crate::quantize`], laid out `[k, n]` as
//! [`super::quant`] reads them) with many activation rows, in integers, on processors with
//! AVX512-VNNI (Intel Ice Lake and Sapphire Rapids on, AMD Zen 4 on): one `vpdpbusd`
//! multiplies sixteen groups of four byte pairs and adds each group's sum into a 32-bit lane,
//! four times the work of an f32 FMA on the same register width.
//!
//! The activations are quantized like the weights ([`super::activations`]): a block's integer
//! sum is exact, and only the activations' rounding (at most half a step of 1/127 of the
//! block's largest value) separates the result from the product with the dequantized weights.
//! `vpdpbusd` takes one operand unsigned, so the weight codes are shifted by 128 as they are
//! packed and `128 · Σ x` is taken off each block's sum. 4-bit codes stored two rows to a byte
//! ([`Codes::RowPairs`], each `c + 8`) are unsigned already: a decode step splits each byte
//! into its two rows' codes with a mask and a shift and takes `8 · Σ x` off instead, reading
//! half the bytes; a prompt's panel packing unpacks them to the 8-bit layout.
//!
//! Only on x86-64. Prompts and vision tiles ([`matmul`]) pack a panel of weight codes at a
//! time for a register-blocked micro kernel; a decode step's few rows ([`matvec`]) stream the
//! codes once in memory order, as [`super::quant::matvec`] does, and interleave each pass's
//! rows in registers: a few shuffles per 64 bytes where the float kernel widens every code to
//! f32 before its FMA.

use super::activations::quantize_activations;
use crate::packed::Codes;
use crate::quantize::{BLOCK, Scale, nibble_code};

/// Rows of a micro tile: six rows by two registers of sums, in integers and in f32, fit in the
/// 32 vector registers with the weights and a broadcast activation.
const MR: usize = 6;
/// Columns of a micro tile (two registers of sixteen lanes) and of a packed weight panel.
const NR: usize = 32;
/// Inputs of one `vpdpbusd` group.
const GROUP: usize = 4;

/// Whether this processor has the VNNI byte products (and the AVX-512 the kernels use with
/// them), detected once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// A pointer the tasks of one product share, each writing its own part of what it points to.
struct Shared<T>(*mut T);
// SAFETY: every use hands each task a part of the buffer no other task touches.
unsafe impl<T> Sync for Shared<T> {}

/// Bytes of packed weight codes a product holds at a time: a second-level cache's worth, so
/// that the micro kernels read a slab of panels while it is still there, and a large weight
/// is never copied whole.
const SLAB: usize = 2 << 20;

/// Panels `p0..p1` of the weight codes `[k, n]` and scales `[k / 32, n]` into `packed` and
/// `packed_scales` (cleared first, their capacity kept), as the micro kernel reads them:
/// panel `p` of [`NR`] columns holds groups of four consecutive inputs of each of its
/// columns side by side (`[k / 4][NR][4]`, each code shifted to `c + 128`), its scales
/// `[k / 32][NR]`. Columns past `n` get code 0 (byte 128) and scale 0. The codes are read in
/// memory order, a block of 32 rows a task, each row through every panel of the slab: a
/// panel's rows lie `n` bytes apart, and reading a panel at a time touched a new page per
/// row.
#[allow(clippy::too_many_arguments)]
fn pack_slab<S: Scale>(
    codes: Codes<'_>,
    scales: &[S],
    k: usize,
    n: usize,
    (p0, p1): (usize, usize),
    packed: &mut Vec<u8>,
    packed_scales: &mut Vec<f32>,
) {
    let blocks = k / BLOCK;
    let (panel_codes, panel_scales) = (k * NR, blocks * NR);
    packed.clear();
    packed_scales.clear();
    packed.reserve((p1 - p0) * panel_codes);
    packed_scales.reserve((p1 - p0) * panel_scales);
    let (to, to_scales) = (
        Shared(packed.as_mut_ptr()),
        Shared(packed_scales.as_mut_ptr()),
    );
    let (to, to_scales) = (&to, &to_scales);
    super::for_each_index(blocks, |b| {
        for p in p0..p1 {
            let (j0, width) = (p * NR, NR.min(n - p * NR));
            // SAFETY: block `b`'s scales of panel `p` are this task's alone, within the
            // capacity.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    to_scales.0.add((p - p0) * panel_scales + b * NR),
                    NR,
                )
            };
            for (s, scale) in out.iter_mut().zip(&scales[b * n + j0..][..width]) {
                *s = scale.get();
            }
            out[width..].fill(0.0);
        }
        // A group's four rows at a time, left to right through the slab.
        for g in b * BLOCK / GROUP..(b + 1) * BLOCK / GROUP {
            for p in p0..p1 {
                let (j0, width) = (p * NR, NR.min(n - p * NR));
                // SAFETY: group `g` of panel `p` is this task's alone (block `b`), within the
                // capacity.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(
                        to.0.add((p - p0) * panel_codes + g * GROUP * NR),
                        GROUP * NR,
                    )
                };
                match codes {
                    Codes::Bytes(codes) if width == NR => {
                        let rows: [&[i8]; GROUP] =
                            std::array::from_fn(|r| &codes[(g * GROUP + r) * n + j0..][..NR]);
                        // SAFETY: `available()` (checked by the only caller) detected
                        // AVX-512, which implies the SSE2 this uses; each row holds `NR`
                        // codes and `out` a group.
                        unsafe { x86::interleave(rows, out) };
                    }
                    Codes::RowPairs(pairs) if width == NR => {
                        let rows: [&[u8]; 2] =
                            std::array::from_fn(|h| &pairs[(g * GROUP / 2 + h) * n + j0..][..NR]);
                        // SAFETY: as above.
                        unsafe { x86::interleave_pairs(rows, out) };
                    }
                    _ => pack_group(codes, n, g, j0, width, out),
                }
            }
        }
    });
    // SAFETY: the tasks wrote every block of every panel of the slab.
    unsafe {
        packed.set_len((p1 - p0) * panel_codes);
        packed_scales.set_len((p1 - p0) * panel_scales);
    }
}

/// Group `g` of a panel narrower than [`NR`] from `j0`, one code at a time.
fn pack_group(codes: Codes<'_>, n: usize, g: usize, j0: usize, width: usize, out: &mut [u8]) {
    let code = |i: usize, j: usize| match codes {
        Codes::Bytes(codes) => codes[i * n + j],
        Codes::RowPairs(pairs) => nibble_code(pairs[i / 2 * n + j] >> (4 * (i % 2))),
        // A table's layout, and the panels, which need no packing: `matmul` turns them away.
        Codes::HalfBlocks(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => 0,
    };
    for j in 0..NR {
        for t in 0..GROUP {
            out[j * GROUP + t] = if j < width {
                (code(g * GROUP + t, j0 + j) as u8) ^ 0x80
            } else {
                0x80
            };
        }
    }
}

/// `y = x · (c·s)` for `x` `[m, k]` (f32, row-major), codes `[k, n]` and scales `[k / 32, n]`
/// (`k` a multiple of 32), with the activations quantized per block: `[m, n]`. `None` where
/// the processor lacks the VNNI products.
pub fn matmul<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Option<Vec<f32>> {
    debug_assert_eq!(codes.count(), k * n);
    debug_assert_eq!(scales.len(), k * n / BLOCK);
    debug_assert!(k.is_multiple_of(BLOCK));
    if !available() || matches!(codes, Codes::HalfBlocks(_)) {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0.0; m * n]);
    }
    if let Codes::Panels(_) | Codes::PanelNibbles(_) = codes {
        return stored_panels(x, m, k, codes, S::as_f16(scales)?, n);
    }
    let activations = quantize_activations(x, m, k);
    let mut y = Vec::<f32>::with_capacity(m * n);
    let to = Shared(y.as_mut_ptr());
    let to = &to;
    let panels = n.div_ceil(NR);
    let per_slab = (SLAB / (k * NR)).max(1);
    let (mut packed, mut packed_scales) = (Vec::new(), Vec::new());
    for p0 in (0..panels).step_by(per_slab) {
        let p1 = (p0 + per_slab).min(panels);
        pack_slab(
            codes,
            scales,
            k,
            n,
            (p0, p1),
            &mut packed,
            &mut packed_scales,
        );
        let (packed, packed_scales) = (&packed, &packed_scales);
        super::for_each_index(p1 - p0, |i| {
            let p = p0 + i;
            let panel = (
                &packed[i * k * NR..][..k * NR],
                &packed_scales[i * k / BLOCK * NR..][..k / BLOCK * NR],
            );
            let width = NR.min(n - p * NR);
            // SAFETY: columns `p·NR..+width` of `y`'s `m` rows are this task's alone, within
            // its capacity; `available()` detected every feature the micro kernels enable.
            unsafe {
                let out = (to.0.add(p * NR), n, width);
                let weight = (panel.0.as_ptr(), panel.1.as_ptr().cast::<u8>(), NR);
                x86::panel_rows::<false, false>(&activations, m, k, weight, out);
            }
        });
    }
    // SAFETY: the tasks wrote every row of every panel's columns.
    unsafe { y.set_len(m * n) };
    Some(y)
}

/// `y = x · (c·s)` for codes stored in panels ([`Codes::Panels`], [`Codes::PanelNibbles`];
/// `n` a multiple of [`NR`]) and their f16 scales panel by panel (`[n / 32][k / 32][32]`):
/// the micro kernel reads each panel where it lies, for a prompt's rows and a decode step's
/// alike.
fn stored_panels(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[half::f16],
    n: usize,
) -> Option<Vec<f32>> {
    let (panels, nibbles) = match codes {
        Codes::Panels(panels) => (panels, false),
        Codes::PanelNibbles(panels) => (panels, true),
        _ => return None,
    };
    let panel_bytes = if nibbles { k * NR / 2 } else { k * NR };
    if !n.is_multiple_of(NR)
        || !k.is_multiple_of(BLOCK)
        || panels.len() != n / NR * panel_bytes
        || scales.len() * BLOCK != k * n
    {
        return None;
    }
    let activations = quantize_activations(x, m, k);
    let panels_at = |p: usize| panels[p * panel_bytes..].as_ptr();
    let mut y = Vec::<f32>::with_capacity(m * n);
    let to = Shared(y.as_mut_ptr());
    let to = &to;
    // A run of neighbouring panels a task, so that each core streams long stretches of
    // memory (a 4-bit panel of a 896-input weight is 14 KiB).
    let count = n / NR;
    let per_task = count.div_ceil(4 * super::threads()).max(1);
    let per_task = if m == 1 {
        per_task.next_multiple_of(2)
    } else {
        per_task
    };
    super::for_each_index(count.div_ceil(per_task), |task| {
        let run = task * per_task..((task + 1) * per_task).min(count);
        if m == 1 {
            // A decode step's single row: two panels side by side, four chains of sums.
            for p in run.clone().step_by(2).filter(|&p| p + 1 < run.end) {
                let weight = |p: usize| (panels_at(p), scales[p * k / BLOCK * NR..].as_ptr());
                // SAFETY: as below, for the columns of panels `p` and `p + 1`.
                unsafe {
                    let out = to.0.add(p * NR);
                    if nibbles {
                        x86::pair::<true>(&activations, k, [weight(p), weight(p + 1)], out);
                    } else {
                        x86::pair::<false>(&activations, k, [weight(p), weight(p + 1)], out);
                    }
                }
            }
        }
        let single = if m == 1 {
            run.end - run.len() % 2..run.end
        } else {
            run
        };
        for p in single {
            let at = p * k / BLOCK * NR;
            let weight = (panels_at(p), scales[at..].as_ptr().cast::<u8>(), NR);
            // SAFETY: columns `p·NR..+NR` of `y`'s `m` rows are this task's alone, within its
            // capacity; the panel holds `k` inputs of `NR` columns and `k / 32` blocks of `NR`
            // scales; `available()` detected every feature the micro kernels enable.
            unsafe {
                let out = (to.0.add(p * NR), n, NR);
                if nibbles {
                    x86::panel_rows::<true, true>(&activations, m, k, weight, out);
                } else {
                    x86::panel_rows::<false, true>(&activations, m, k, weight, out);
                }
            }
        }
    });
    // SAFETY: the tasks wrote every row of every panel's columns.
    unsafe { y.set_len(m * n) };
    Some(y)
}

/// Code rows of one pass of [`matvec`] over its block sums: two `vpdpbusd` groups, eight
/// streams a row of codes apart.
const PASS: usize = 2 * GROUP;
/// Columns of one step of [`matvec`]: 64 codes of each row, one register.
const TILE: usize = 64;

/// `y = x · (c·s)` like [`matmul`], for the few activation rows of a decode step
/// ([`super::dot::MAX_ROWS`] or fewer; any count works): the code rows are split between the
/// cores as [`super::quant::matvec`] splits them, each pass interleaves eight rows of 64 codes
/// in registers and adds their products into integer block sums `[m, n]` that stay in cache,
/// and each block's sums are weighted by both scales into the outputs once. `None` where the
/// processor lacks the VNNI products.
pub fn matvec<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Option<Vec<f32>> {
    debug_assert_eq!(codes.count(), k * n);
    debug_assert_eq!(scales.len(), k * n / BLOCK);
    if !available() || matches!(codes, Codes::HalfBlocks(_)) {
        return None;
    }
    if let Codes::Panels(_) | Codes::PanelNibbles(_) = codes {
        return stored_panels(x, m, k, codes, S::as_f16(scales)?, n);
    }
    let activations = quantize_activations(x, m, k);
    Some(super::quant::by_code_rows(m, k, n, |range, out| {
        // SAFETY: `available()` detected every feature the kernel enables.
        unsafe {
            match codes {
                Codes::Bytes(codes) => {
                    let codes = (codes.as_ptr().cast::<u8>(), codes.len());
                    x86::code_rows::<_, false>(&activations, m, k, (codes, scales, n), range, out)
                }
                Codes::RowPairs(pairs) => {
                    let codes = (pairs.as_ptr(), pairs.len());
                    x86::code_rows::<_, true>(&activations, m, k, (codes, scales, n), range, out)
                }
                // A table's layout and the panels, turned away above.
                Codes::HalfBlocks(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => {}
            }
        }
    }))
}

/// `y = x · (c·s)ᵀ` for a quantized table laid out row-major (`[n, k]`, blocks along each row,
/// scales `[n, k / 32]`, [`super::quant_rows`]): the tied LM head of a decode step's few rows.
/// 8-bit codes lie a byte each ([`Codes::Bytes`]), 4-bit ones a block's two halves to a byte
/// ([`Codes::HalfBlocks`]). Each table row is read once, two blocks a `vpdpbusd` (the codes
/// made unsigned, `c + 128` or `c + 8` as they lie), into integer sums that start at minus the
/// shift times `Σ x`; the rows are split between the cores. Widening the codes to f32 instead
/// costs more than reading them. `None` where the processor lacks the VNNI products, or for a
/// linear weight's layout or scales not in f16.
pub fn table_rows<S: Scale>(
    x: &[f32],
    m: usize,
    k: usize,
    codes: Codes<'_>,
    scales: &[S],
    n: usize,
) -> Option<Vec<f32>> {
    let scales = S::as_f16(scales)?;
    let (table, halves): (&[u8], bool) = match codes {
        Codes::HalfBlocks(halves) => (halves, true),
        Codes::Bytes(bytes) => (bytemuck::cast_slice(bytes), false),
        Codes::RowPairs(_) | Codes::Panels(_) | Codes::PanelNibbles(_) => return None,
    };
    debug_assert_eq!(table.len() * if halves { 2 } else { 1 }, n * k);
    debug_assert_eq!(scales.len(), n * k / BLOCK);
    if !available() {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        return Some(vec![0.0; m * n]);
    }
    let a = quantize_activations(x, m, k);
    // Each block's shift times `Σ x` (the activations' offsets are `128 · Σ x`), spread over
    // the block's eight lanes: `8 · Σ x` for 4-bit codes, `128 · Σ x` for 8-bit ones.
    let lane_offsets: Vec<i32> = a
        .offsets
        .iter()
        .map(|&o| if halves { o / 128 } else { o / 8 })
        .collect();
    let per_task = super::dot::rows_per_task(n, k);
    let mut by_row = vec![0.0f32; n * m];
    super::for_each_chunk(&mut by_row, per_task * m, |task, out| {
        let weight = (table, scales);
        let j0 = task * per_task;
        // SAFETY: `available()` detected every feature the kernel enables.
        unsafe {
            if halves {
                x86::table_rows::<true>(&a, &lane_offsets, m, k, weight, j0, out)
            } else {
                x86::table_rows::<false>(&a, &lane_offsets, m, k, weight, j0, out)
            }
        }
    });
    Some(super::dot::row_major(by_row, m, n))
}

mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, MR, NR, PASS, TILE};
    use crate::kernels::activations::Activations;
    const PREFETCH: i32 = _MM_HINT_T1;
    const AHEAD: usize = 2;
    use half::f16;

    use crate::quantize::{BLOCK, Scale, nibble_code};

    /// Blocks of a table row whose scales [`table_rows`] holds in registers at a time.
    const SPAN: usize = 32;

    /// Four rows of [`NR`] codes interleaved into `out` (`[NR][4]`), each shifted by 128.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn interleave(rows: [&[i8]; GROUP], out: &mut [u8]) {
        debug_assert!(rows.iter().all(|r| r.len() >= NR) && out.len() >= GROUP * NR);
        let shift = _mm_set1_epi8(i8::MIN);
        for half in 0..NR / 16 {
            // SAFETY: each row holds `NR` codes, 16 read at a time.
            let rows = rows.map(|r| unsafe {
                _mm_xor_si128(_mm_loadu_si128(r.as_ptr().add(16 * half).cast()), shift)
            });
            // SAFETY: 64 bytes at `64·half`, within the 128 of `out`.
            unsafe { store_quads(rows, out.as_mut_ptr().add(64 * half)) };
        }
    }

    /// [`interleave`] for 4-bit codes two rows to a byte (`c + 8`, the even row in the low
    /// nibble): the four rows of two byte rows of [`NR`] bytes.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn interleave_pairs(pairs: [&[u8]; 2], out: &mut [u8]) {
        debug_assert!(pairs.iter().all(|r| r.len() >= NR) && out.len() >= GROUP * NR);
        let (low, shift) = (_mm_set1_epi8(0x0f), _mm_set1_epi8(120));
        for half in 0..NR / 16 {
            // SAFETY: each byte row holds `NR` bytes, 16 read at a time.
            let [p0, p1] =
                pairs.map(|r| unsafe { _mm_loadu_si128(r.as_ptr().add(16 * half).cast()) });
            // `c + 128` is the nibble plus 120.
            let nibbles = |p: __m128i| {
                [
                    _mm_add_epi8(_mm_and_si128(p, low), shift),
                    _mm_add_epi8(_mm_and_si128(_mm_srli_epi16::<4>(p), low), shift),
                ]
            };
            let ([r0, r1], [r2, r3]) = (nibbles(p0), nibbles(p1));
            // SAFETY: as in `interleave`.
            unsafe { store_quads([r0, r1, r2, r3], out.as_mut_ptr().add(64 * half)) };
        }
    }

    /// Sixteen columns of four rows as sixteen groups of their four bytes, at `out` (64
    /// bytes).
    #[target_feature(enable = "sse2")]
    #[inline]
    unsafe fn store_quads([r0, r1, r2, r3]: [__m128i; GROUP], out: *mut u8) {
        let (lo01, hi01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
        let (lo23, hi23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
        let quads = [
            _mm_unpacklo_epi16(lo01, lo23),
            _mm_unpackhi_epi16(lo01, lo23),
            _mm_unpacklo_epi16(hi01, hi23),
            _mm_unpackhi_epi16(hi01, hi23),
        ];
        for (q, v) in quads.into_iter().enumerate() {
            // SAFETY: the caller's 64 bytes at `out`.
            unsafe { _mm_storeu_si128(out.add(16 * q).cast(), v) };
        }
    }

    /// Rows `[r0, r1, r2, r3]` of 64 codes each (shifted by 128) interleaved as `vpdpbusd`
    /// reads them: register `q` holds, in its 128-bit lane `l`, columns `16l + 4q ..+ 4`, each
    /// as the four rows' bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn interleave_tile([r0, r1, r2, r3]: [__m512i; GROUP]) -> [__m512i; 4] {
        let (lo01, hi01) = (_mm512_unpacklo_epi8(r0, r1), _mm512_unpackhi_epi8(r0, r1));
        let (lo23, hi23) = (_mm512_unpacklo_epi8(r2, r3), _mm512_unpackhi_epi8(r2, r3));
        [
            _mm512_unpacklo_epi16(lo01, lo23),
            _mm512_unpackhi_epi16(lo01, lo23),
            _mm512_unpacklo_epi16(hi01, hi23),
            _mm512_unpackhi_epi16(hi01, hi23),
        ]
    }

    /// Sums in [`interleave_tile`]'s column order back in column order: a 4×4 transpose of
    /// 128-bit lanes (register `q`, lane `l` becomes register `l`, lane `q`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn columns_in_order([v0, v1, v2, v3]: [__m512; 4]) -> [__m512; 4] {
        let t0 = _mm512_shuffle_f32x4::<0x44>(v0, v1);
        let t1 = _mm512_shuffle_f32x4::<0xEE>(v0, v1);
        let t2 = _mm512_shuffle_f32x4::<0x44>(v2, v3);
        let t3 = _mm512_shuffle_f32x4::<0xEE>(v2, v3);
        [
            _mm512_shuffle_f32x4::<0x88>(t0, t2),
            _mm512_shuffle_f32x4::<0xDD>(t0, t2),
            _mm512_shuffle_f32x4::<0x88>(t1, t3),
            _mm512_shuffle_f32x4::<0xDD>(t1, t3),
        ]
    }

    /// Adds the products of code rows `i0..i1` (whole blocks) of the weight `(codes, scales,
    /// n)` with the quantized activations `a` (`m` rows) into `out` (`[m, n]`). The codes are
    /// `(pointer, bytes)`: one `i8` per code, or with `PAIRS` two rows to a byte
    /// ([`Codes::RowPairs`]). Per block, the integer sums `[m, n]` start at minus each row's
    /// shift offset; each pass adds eight code rows, 64 columns at a time interleaved in
    /// registers (columns past the last whole tile one at a time, in order); then the sums are
    /// weighted by both scales into `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn code_rows<S: Scale, const PAIRS: bool>(
        a: &Activations,
        m: usize,
        k: usize,
        ((codes, bytes), scales, n): ((*const u8, usize), &[S], usize),
        (i0, i1): (usize, usize),
        out: &mut [f32],
    ) {
        debug_assert!(bytes * if PAIRS { 2 } else { 1 } >= k * n);
        debug_assert!(scales.len() >= k / BLOCK * n);
        debug_assert!(a.codes.len() >= m * k && out.len() >= m * n && i1 <= k);
        // The byte row holding code row `i`, and the shift of its codes within the byte.
        let byte_row = |i: usize| if PAIRS { i / 2 } else { i };
        // Row pairs store `c + 8` (their offset is 8·Σx, a sixteenth of the 8-bit codes').
        let offset_shift = if PAIRS { 4 } else { 0 };
        let blocks = k / BLOCK;
        let full = n / TILE * TILE;
        let shift = _mm512_set1_epi8(i8::MIN);
        let low = _mm512_set1_epi8(0x0f);
        let mut sums = vec![0i32; m * n];
        let mut widened = Vec::new();
        for b0 in (i0..i1).step_by(BLOCK) {
            let b = b0 / BLOCK;
            for (r, row) in sums.chunks_exact_mut(n).enumerate() {
                row.fill(-(a.offsets[r * blocks + b] >> offset_shift));
            }
            for i in (b0..b0 + BLOCK).step_by(PASS) {
                for t0 in (0..full).step_by(TILE) {
                    // SAFETY: byte rows `byte_row(i)..byte_row(i + 8)` hold `n ≥ t0 + 64`
                    // bytes each.
                    let load = |q: usize| unsafe {
                        _mm512_loadu_si512(codes.add(byte_row(i + q) * n + t0).cast())
                    };
                    // The rows of the pass after next, ahead of their loads.
                    if i + AHEAD * PASS < i1 {
                        for q in (0..PASS).step_by(if PAIRS { 2 } else { 1 }) {
                            // SAFETY: a prefetch reads nothing; the address lies in `codes`.
                            unsafe {
                                let p = codes.add(byte_row(i + AHEAD * PASS + q) * n + t0);
                                _mm_prefetch::<PREFETCH>(p.cast());
                            }
                        }
                    }
                    let rows: [__m512i; PASS] = if PAIRS {
                        let pairs: [__m512i; PASS / 2] = std::array::from_fn(|h| load(2 * h));
                        std::array::from_fn(|q| {
                            let v = pairs[q / 2];
                            if q % 2 == 0 {
                                _mm512_and_si512(v, low)
                            } else {
                                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low)
                            }
                        })
                    } else {
                        std::array::from_fn(|q| _mm512_xor_si512(load(q), shift))
                    };
                    let w: [[__m512i; 4]; PASS / GROUP] = std::array::from_fn(|h| {
                        let g = GROUP * h;
                        interleave_tile([rows[g], rows[g + 1], rows[g + 2], rows[g + 3]])
                    });
                    for r in 0..m {
                        // SAFETY: row `r`'s activation codes `i..i + 8` and its sums
                        // `t0..t0 + 64` lie within their buffers.
                        unsafe {
                            let x = a.codes.as_ptr().add(r * k + i).cast::<i32>();
                            let xs: [__m512i; PASS / GROUP] = std::array::from_fn(|h| {
                                _mm512_set1_epi32(x.add(h).read_unaligned())
                            });
                            let s = sums.as_mut_ptr().add(r * n + t0);
                            for q in 0..4 {
                                let mut v = _mm512_loadu_si512(s.add(16 * q).cast());
                                for (w, &x) in w.iter().zip(&xs) {
                                    v = _mm512_dpbusd_epi32(v, w[q], x);
                                }
                                _mm512_storeu_si512(s.add(16 * q).cast(), v);
                            }
                        }
                    }
                }
                for j in full..n {
                    let column: [i32; PASS] = std::array::from_fn(|q| {
                        // SAFETY: byte `j` of byte row `byte_row(i + q)` lies in `codes`.
                        let byte = unsafe { *codes.add(byte_row(i + q) * n + j) };
                        i32::from(if PAIRS {
                            (byte >> (4 * (q % 2))) & 0x0f
                        } else {
                            byte ^ 0x80
                        })
                    });
                    for r in 0..m {
                        let x = &a.codes[r * k + i..r * k + i + PASS];
                        let dot: i32 = x.iter().zip(&column).map(|(&x, &c)| i32::from(x) * c).sum();
                        sums[r * n + j] += dot;
                    }
                }
            }
            let s = S::widen(&scales[b * n..(b + 1) * n], &mut widened);
            for r in 0..m {
                let x_scale = a.scales[r * blocks + b];
                let (row, sums) = (&mut out[r * n..(r + 1) * n], &sums[r * n..(r + 1) * n]);
                for t0 in (0..full).step_by(TILE) {
                    // SAFETY: 64 sums, scales and outputs from `t0` lie within the rows.
                    unsafe {
                        let sum = |q: usize| {
                            _mm512_cvtepi32_ps(_mm512_loadu_si512(
                                sums.as_ptr().add(t0 + 16 * q).cast(),
                            ))
                        };
                        let v = columns_in_order([sum(0), sum(1), sum(2), sum(3)]);
                        for (q, v) in v.into_iter().enumerate() {
                            let o = row.as_mut_ptr().add(t0 + 16 * q);
                            let w = _mm512_loadu_ps(s.as_ptr().add(t0 + 16 * q));
                            let scale = _mm512_mul_ps(_mm512_set1_ps(x_scale), w);
                            _mm512_storeu_ps(o, _mm512_fmadd_ps(v, scale, _mm512_loadu_ps(o)));
                        }
                    }
                }
                for j in full..n {
                    row[j] = (sums[j] as f32).mul_add(x_scale * s[j], row[j]);
                }
            }
        }
    }

    /// Fills `out` (`[rows, m]`) with the products of the table rows from `j0` (half blocks
    /// with `HALVES`, else a byte a code) and the `m` quantized activation rows `a`
    /// (`lane_offsets`: each block's offset per lane, see [`super::table_rows`]): two blocks a
    /// step, a last odd block in scalars. The blocks' weights (both scales) and offsets are
    /// taken 32 blocks at a time into two registers each, from which every step picks its two
    /// blocks' lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn table_rows<const HALVES: bool>(
        a: &Activations,
        lane_offsets: &[i32],
        m: usize,
        k: usize,
        (table, scales): (&[u8], &[f16]),
        j0: usize,
        out: &mut [f32],
    ) {
        let blocks = k / BLOCK;
        let stride = if HALVES { k / 2 } else { k };
        debug_assert!(table.len() >= (j0 + out.len() / m) * stride);
        debug_assert!(scales.len() >= (j0 + out.len() / m) * blocks);
        debug_assert!(a.scales.len() >= m * blocks && lane_offsets.len() >= m * blocks);
        let low = _mm256_set1_epi8(0x0f);
        // Lanes 0..8 take the first block of a step, lanes 8..16 the second.
        let first_step = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let two = _mm512_set1_epi32(2);
        for (t, o) in out.chunks_exact_mut(m).enumerate() {
            let j = j0 + t;
            let row = &table[j * stride..(j + 1) * stride];
            let s = &scales[j * blocks..(j + 1) * blocks];
            // Blocks `2p` and `2p + 1` of the row as unsigned codes, in order.
            let pair = |p: usize| {
                if !HALVES {
                    // SAFETY: the two blocks' 64 bytes lie within the row.
                    let v = unsafe { _mm512_loadu_si512(row.as_ptr().add(64 * p).cast()) };
                    return _mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN));
                }
                // SAFETY: the two blocks' 32 bytes lie within the row.
                let v = unsafe { _mm256_loadu_si256(row.as_ptr().add(32 * p).cast()) };
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                // [lo(2p) lo(2p+1) hi(2p) hi(2p+1)] → [lo(2p) hi(2p) lo(2p+1) hi(2p+1)].
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                _mm512_shuffle_i64x2::<0b11_01_10_00>(both, both)
            };
            for (r, o) in o.iter_mut().enumerate() {
                let ax = &a.codes[r * k..(r + 1) * k];
                let xs = &a.scales[r * blocks..(r + 1) * blocks];
                let offs = &lane_offsets[r * blocks..(r + 1) * blocks];
                let mut acc = _mm512_setzero_ps();
                for b0 in (0..blocks / 2 * 2).step_by(SPAN) {
                    let count = (blocks / 2 * 2 - b0).min(SPAN);
                    // Blocks `b0..b0 + count`: sixteen to a register, the rest of the last
                    // register zero.
                    let table = |half: usize| {
                        let start = b0 + 16 * half;
                        let lanes = count.saturating_sub(16 * half).min(16);
                        let mask = ((1u32 << lanes) - 1) as __mmask16;
                        // SAFETY: the masked loads read `lanes` values from block `start`,
                        // within the row's scales and the activations' tables (none at all
                        // for an empty register, whose address may lie past them).
                        unsafe {
                            let w = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                mask,
                                s.as_ptr().wrapping_add(start).cast(),
                            ));
                            let x = _mm512_maskz_loadu_ps(mask, xs.as_ptr().wrapping_add(start));
                            let offset = _mm512_maskz_loadu_epi32(
                                mask,
                                offs.as_ptr().wrapping_add(start).cast(),
                            );
                            (
                                _mm512_mul_ps(w, x),
                                _mm512_sub_epi32(_mm512_setzero_si512(), offset),
                            )
                        }
                    };
                    let ((weight_lo, start_lo), (weight_hi, start_hi)) = (table(0), table(1));
                    let mut lanes = first_step;
                    for p in b0 / 2..(b0 + count) / 2 {
                        // SAFETY: the activation codes of blocks `2p`, `2p + 1`: 64 bytes.
                        let x = unsafe { _mm512_loadu_si512(ax.as_ptr().add(64 * p).cast()) };
                        let start = _mm512_permutex2var_epi32(start_lo, lanes, start_hi);
                        let dot = _mm512_dpbusd_epi32(start, pair(p), x);
                        let weight = _mm512_permutex2var_ps(weight_lo, lanes, weight_hi);
                        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), weight, acc);
                        lanes = _mm512_add_epi32(lanes, two);
                    }
                }
                let mut total = _mm512_reduce_add_ps(acc);
                if blocks % 2 == 1 {
                    // The last block: signed codes times the activation codes.
                    let b = blocks - 1;
                    let dot: i32 = (0..BLOCK)
                        .map(|i| {
                            let c = if HALVES {
                                let byte = row[b * BLOCK / 2 + i % (BLOCK / 2)];
                                nibble_code(byte >> (4 * (i / (BLOCK / 2))))
                            } else {
                                row[b * BLOCK + i] as i8
                            };
                            i32::from(c) * i32::from(ax[b * BLOCK + i])
                        })
                        .sum();
                    total += dot as f32 * (s[b].get() * xs[b]);
                }
                *o = total;
            }
        }
    }

    /// Group `g` of a panel's codes as two `vpdpbusd` operands, columns 0–15 and 16–31: two
    /// 64-byte loads, or with `NIBBLES` one, split into low and high nibbles by `low` (0x0f).
    ///
    /// # Safety
    /// The panel holds group `g`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn panel_group<const NIBBLES: bool>(
        codes: *const u8,
        g: usize,
        low: __m512i,
    ) -> (__m512i, __m512i) {
        // SAFETY: the caller's.
        unsafe {
            if NIBBLES {
                let v = _mm512_loadu_si512(codes.add(g * GROUP * NR / 2).cast());
                (
                    _mm512_and_si512(v, low),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), low),
                )
            } else {
                let p = codes.add(g * GROUP * NR);
                (
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                )
            }
        }
    }

    /// Every one of the `m` rows of one panel's outputs, [`MR`] rows at a time by [`micro`]:
    /// `out` is `(row 0's first column, row stride, width)`.
    ///
    /// # Safety
    /// As [`micro`]'s, for rows `0..m`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn panel_rows<const NIBBLES: bool, const HALF: bool>(
        a: &Activations,
        m: usize,
        k: usize,
        weight: (*const u8, *const u8, usize),
        (out, stride, width): (*mut f32, usize, usize),
    ) {
        for r0 in (0..m).step_by(MR) {
            // SAFETY: the caller's, for rows `r0..r0 + MR.min(m - r0)`.
            unsafe {
                let out = (out.add(r0 * stride), stride, width);
                match MR.min(m - r0) {
                    1 => micro::<1, NIBBLES, HALF>(a, r0, k, weight, out),
                    2 => micro::<2, NIBBLES, HALF>(a, r0, k, weight, out),
                    3 => micro::<3, NIBBLES, HALF>(a, r0, k, weight, out),
                    4 => micro::<4, NIBBLES, HALF>(a, r0, k, weight, out),
                    5 => micro::<5, NIBBLES, HALF>(a, r0, k, weight, out),
                    _ => micro::<MR, NIBBLES, HALF>(a, r0, k, weight, out),
                }
            }
        }
    }

    /// One activation row's outputs of two panels (`(codes, f16 scales)` each, as
    /// [`micro`] reads them) into `out` (their 64 columns): a decode step's product, whose
    /// single row gives [`micro`] only two chains of `vpdpbusd` to wait on.
    ///
    /// # Safety
    /// As [`micro`]'s, for row 0 and both panels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn pair<const NIBBLES: bool>(
        a: &Activations,
        k: usize,
        panels: [(*const u8, *const half::f16); 2],
        out: *mut f32,
    ) {
        debug_assert!(a.codes.len() >= k);
        let blocks = k / BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut sums = [[_mm512_setzero_ps(); 2]; 2];
        for b in 0..blocks {
            let mut dots = [[_mm512_setzero_si512(); 2]; 2];
            for g in b * BLOCK / GROUP..(b + 1) * BLOCK / GROUP {
                // SAFETY: four codes of the row at inputs `4g..4g + 4`.
                let x = unsafe {
                    _mm512_set1_epi32(
                        a.codes
                            .as_ptr()
                            .add(g * GROUP)
                            .cast::<i32>()
                            .read_unaligned(),
                    )
                };
                for (dot, &(codes, _)) in dots.iter_mut().zip(&panels) {
                    // SAFETY: group `g` of each panel, as in `micro`.
                    let (w0, w1) = unsafe { panel_group::<NIBBLES>(codes, g, low) };
                    dot[0] = _mm512_dpbusd_epi32(dot[0], w0, x);
                    dot[1] = _mm512_dpbusd_epi32(dot[1], w1, x);
                }
            }
            let x_scale = _mm512_set1_ps(a.scales[b]);
            let offset = _mm512_set1_epi32(if NIBBLES {
                a.offsets[b] / 16
            } else {
                a.offsets[b]
            });
            for ((sum, dot), &(_, scales)) in sums.iter_mut().zip(&dots).zip(&panels) {
                // SAFETY: block `b`'s `NR` scales of each panel at `b · NR`.
                let s = unsafe {
                    let p = scales.add(b * NR);
                    [
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16).cast())),
                    ]
                };
                for v in 0..2 {
                    let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[v], offset));
                    sum[v] = _mm512_fmadd_ps(exact, _mm512_mul_ps(x_scale, s[v]), sum[v]);
                }
            }
        }
        for (i, sum) in sums.iter().enumerate() {
            // SAFETY: the 64 columns of `out`.
            unsafe {
                _mm512_storeu_ps(out.add(i * NR), sum[0]);
                _mm512_storeu_ps(out.add(i * NR + 16), sum[1]);
            }
        }
    }

    /// Rows `r0..r0 + R` of one panel's outputs into `out` (`R` rows `stride` floats apart,
    /// the panel's first `width` columns): per block of 32 inputs, eight `vpdpbusd` steps into
    /// integer sums, which are shifted back, converted and added into the f32 sums weighted by
    /// both scales. The panel is `(codes, scales, scale_stride)`: its groups of 128 bytes (64
    /// with `NIBBLES`, two columns' codes to a byte as [`Codes::PanelNibbles`] holds them),
    /// and block `b`'s [`NR`] scales at `scales + b · scale_stride` elements, f16 with `HALF`,
    /// else f32.
    ///
    /// # Safety
    /// The panel holds `k` inputs of [`NR`] columns; `a` holds rows `r0..r0 + R`; `out` the
    /// tile's `width` columns of `R` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn micro<const R: usize, const NIBBLES: bool, const HALF: bool>(
        a: &Activations,
        r0: usize,
        k: usize,
        (codes, scales, scale_stride): (*const u8, *const u8, usize),
        (out, stride, width): (*mut f32, usize, usize),
    ) {
        debug_assert!(a.codes.len() >= (r0 + R) * k && (1..=NR).contains(&width));
        let blocks = k / BLOCK;
        let low = _mm512_set1_epi8(0x0f);
        let mut sums = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..blocks {
            let mut dots = [[_mm512_setzero_si512(); 2]; R];
            for g in b * BLOCK / GROUP..(b + 1) * BLOCK / GROUP {
                // SAFETY: group `g` of the panel is 128 bytes at `g · 128` (64 at `g · 64`
                // with `NIBBLES`).
                let (w0, w1) = unsafe { panel_group::<NIBBLES>(codes, g, low) };
                for (r, dot) in dots.iter_mut().enumerate() {
                    // SAFETY: four codes of row `r0 + r` at inputs `4g..4g + 4`.
                    let x = unsafe {
                        let p = a.codes.as_ptr().add((r0 + r) * k + g * GROUP);
                        _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
                    };
                    dot[0] = _mm512_dpbusd_epi32(dot[0], w0, x);
                    dot[1] = _mm512_dpbusd_epi32(dot[1], w1, x);
                }
            }
            // SAFETY: block `b`'s scales are `NR` values at `b · scale_stride`.
            let s = unsafe {
                if HALF {
                    let p = scales.cast::<u16>().add(b * scale_stride);
                    [
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(16).cast())),
                    ]
                } else {
                    let p = scales.cast::<f32>().add(b * scale_stride);
                    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                }
            };
            for (r, (sum, dot)) in sums.iter_mut().zip(&dots).enumerate() {
                let at = (r0 + r) * blocks + b;
                let x_scale = _mm512_set1_ps(a.scales[at]);
                // The codes' shift times `Σ x`: 128 for bytes, 8 for nibbles (the offsets are
                // `128 · Σ x`, so a sixteenth is exact).
                let offset = _mm512_set1_epi32(if NIBBLES {
                    a.offsets[at] / 16
                } else {
                    a.offsets[at]
                });
                for v in 0..2 {
                    let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[v], offset));
                    sum[v] = _mm512_fmadd_ps(exact, _mm512_mul_ps(x_scale, s[v]), sum[v]);
                }
            }
        }
        // Lanes of each register within `width`.
        let lanes = |v: usize| ((1u32 << width.saturating_sub(16 * v).min(16)) - 1) as __mmask16;
        for (r, sum) in sums.iter().enumerate() {
            // SAFETY: row `r` of `out` holds `width` floats; masked lanes are not touched.
            unsafe {
                let p = out.add(r * stride);
                if width == NR {
                    _mm512_storeu_ps(p, sum[0]);
                    _mm512_storeu_ps(p.add(16), sum[1]);
                } else {
                    _mm512_mask_storeu_ps(p, lanes(0), sum[0]);
                    if width > 16 {
                        _mm512_mask_storeu_ps(p.add(16), lanes(1), sum[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::activations::Activations;
    use crate::packed::{pack_half_blocks, pack_panels, pack_row_pairs, panel_scales};
    use crate::quantize::{Quantization, f16_scales};
    use crate::testing::{QuantizedWeight, quantized_weight, values, worst, x_wt};
    use half::f16;

    /// The product with both operands' codes and scales, in f64: what the integer products
    /// must give up to the f32 rounding of the sums.
    fn reference(
        a: &Activations,
        m: usize,
        k: usize,
        codes: &[i8],
        scales: &[f32],
        n: usize,
    ) -> Vec<f32> {
        let blocks = k / BLOCK;
        let mut y = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut total = 0f64;
                for b in 0..blocks {
                    let dot: i64 = (b * BLOCK..(b + 1) * BLOCK)
                        .map(|i| i64::from(a.codes[r * k + i]) * i64::from(codes[j * k + i]))
                        .sum();
                    total += dot as f64
                        * f64::from(a.scales[r * blocks + b])
                        * f64::from(scales[j * blocks + b]);
                }
                y[r * n + j] = total as f32;
            }
        }
        y
    }

    #[test]
    fn integer_products_equal_the_products_of_both_codes() {
        if !available() {
            eprintln!("no AVX512-VNNI here: the integer products are not run");
            return;
        }
        // Row tails of every micro tile, panel tails, one panel and many.
        for (m, k, n) in [
            (1, 32, 1),
            (2, 64, 17),
            (3, 96, 32),
            (5, 128, 33),
            (6, 64, 64),
            (7, 160, 70),
            (13, 896, 129),
            (40, 224, 530),
            (1, 896, 4864),
            (8, 256, 192),
            (1, 64, 200),
        ] {
            let x = values(m * k, 11 + k as u64);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let QuantizedWeight {
                    codes,
                    scales,
                    codes_kn,
                    scales_kn,
                    dequantized,
                } = quantized_weight(n, k, 12 + n as u64, scheme);
                let a = quantize_activations(&x, m, k);
                let exact = reference(&a, m, k, &codes, &scales, n);
                let float = x_wt(&x, m, k, &dequantized, n);
                let bytes = Codes::Bytes(&codes_kn);
                let prompt = matmul(&x, m, k, bytes, &scales_kn, n).expect("available");
                let decode = matvec(&x, m, k, bytes, &scales_kn, n).expect("available");
                if scheme == Quantization::Q4 {
                    // Two rows to a byte: the same integer sums.
                    let pairs = pack_row_pairs(&codes_kn, n);
                    let pairs = Codes::RowPairs(&pairs);
                    for (kernel, got, want) in [
                        ("matmul", matmul(&x, m, k, pairs, &scales_kn, n), &prompt),
                        ("matvec", matvec(&x, m, k, pairs, &scales_kn, n), &decode),
                    ] {
                        let got = got.expect("available");
                        assert_eq!(&got, want, "{kernel} row pairs {m}x{k}x{n}");
                    }
                }
                for (kernel, got) in [("matmul", prompt), ("matvec", decode)] {
                    let what = format!("{kernel} {scheme} {m}x{k}x{n}");
                    let e = worst(&got, &exact);
                    assert!(e <= 1e-5 * (k as f32).sqrt(), "{what}: off by {e}");
                    // Against the float activations: only their rounding to 1/127 of each
                    // block's largest value apart.
                    let e = worst(&got, &float);
                    assert!(e <= 0.02 * (k as f32).sqrt(), "{what}: {e} from f32");
                }
            }
        }
    }

    #[test]
    fn stored_panels_equal_the_products_of_both_codes() {
        if !available() {
            return;
        }
        // A decode row over pairs of panels, an odd panel and one alone, and runs of panels
        // that end in a pair and an odd one (23 panels: runs of 4 and 3 on two cores, of 6
        // and 5 on one); prompt rows.
        for (m, k, n) in [
            (1, 32, 32),
            (1, 896, 128),
            (1, 64, 96),
            (1, 64, 32 * 23),
            (2, 64, 96),
            (7, 160, 64),
            (13, 96, 32),
            (40, 224, 160),
        ] {
            let x = values(m * k, 41 + k as u64);
            let a = quantize_activations(&x, m, k);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let w = quantized_weight(n, k, 42 + n as u64, scheme);
                let half_scales = f16_scales(&w.scales);
                let rounded: Vec<f32> = half_scales.iter().map(|s| s.to_f32()).collect();
                let exact = reference(&a, m, k, &w.codes, &rounded, n);
                let nibbles = scheme == Quantization::Q4;
                let panels = pack_panels(&w.codes, n, k, nibbles);
                let codes = if nibbles {
                    Codes::PanelNibbles(&panels)
                } else {
                    Codes::Panels(&panels)
                };
                assert_eq!(
                    codes.bytes(n).as_ref(),
                    w.codes_kn.as_slice(),
                    "{scheme} layout"
                );
                let scales = panel_scales(&half_scales, k);
                for (kernel, got) in [
                    ("matmul", matmul(&x, m, k, codes, &scales, n)),
                    ("matvec", matvec(&x, m, k, codes, &scales, n)),
                ] {
                    let e = worst(&got.expect("available"), &exact);
                    assert!(
                        e <= 1e-5 * (k as f32).sqrt(),
                        "{kernel} {scheme} panels {m}x{k}x{n}: off by {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn table_products_equal_the_products_of_both_codes() {
        if !available() {
            return;
        }
        // An odd last block, one task's rows and many, one to eight activation rows, rows of
        // more blocks than the registers hold at a time (two spans; a span, a short one and
        // an odd block).
        for (m, k, n) in [
            (1, 32, 3),
            (2, 96, 40),
            (1, 896, 1000),
            (8, 160, 77),
            (3, 64, 1),
            (1, 2048, 40),
            (2, 1120, 50),
        ] {
            let x = values(m * k, 21 + k as u64);
            let a = quantize_activations(&x, m, k);
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let w = quantized_weight(n, k, 22 + n as u64, scheme);
                let exact = reference(&a, m, k, &w.codes, &w.scales, n);
                let halves = pack_half_blocks(&w.codes);
                let codes = match scheme {
                    Quantization::Q8 => Codes::Bytes(&w.codes),
                    Quantization::Q4 => Codes::HalfBlocks(&halves),
                };
                let scales = f16_scales(&w.scales);
                let got = table_rows(&x, m, k, codes, &scales, n).expect("available");
                let e = worst(&got, &exact);
                assert!(
                    e <= 1e-5 * (k as f32).sqrt(),
                    "{scheme} {m}x{k}x{n}: off by {e}"
                );
                // The packed tables' scales only: f32 ones go to the widening kernel.
                assert!(table_rows(&x, m, k, codes, &w.scales, n).is_none());
            }
        }
        let pairs = Codes::RowPairs(&[0; 16]);
        let one = [f16::ONE];
        assert!(table_rows(&[0.0; 32], 1, 32, pairs, &one, 1).is_none());
    }

    #[test]
    fn a_nan_activation_reaches_every_output() {
        if !available() {
            return;
        }
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        x[40] = f32::NAN;
        for n in [2, 64] {
            let codes = vec![1i8; 64 * n];
            let scales = vec![1.0; 2 * n];
            let codes = Codes::Bytes(&codes);
            let y = matmul(&x, 1, 64, codes, &scales, n).expect("available");
            assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
            let y = matvec(&x, 1, 64, codes, &scales, n).expect("available");
            assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
            let halves = vec![0x99u8; 32 * n];
            let scales = f16_scales(&scales);
            let y = table_rows(&x, 1, 64, Codes::HalfBlocks(&halves), &scales, n);
            assert!(y.expect("available").iter().all(|v| v.is_nan()));
            let y = table_rows(&x, 1, 64, codes, &scales, n);
            assert!(y.expect("available").iter().all(|v| v.is_nan()));
        }
    }
}
