//! Quantized weights held as the CPU kernels read them, outside Burn's tensors.
//!
//! Burn's flex backend keeps a quantized tensor's block scales in a vector that every clone of
//! the tensor copies, and a layer cannot hand its weight to a kernel without cloning it: a
//! decode step would copy every scale of the model once more than it reads them. So on flex a
//! quantized weight lives in its layer as a [`PackedWeight`] that the kernels borrow, and the
//! layer's parameter is a lazy stand-in of the same shape ([`PackedWeight::param`]) that
//! becomes Burn's quantized tensor only if something asks for its value (a module mapper,
//! another device). The layers use the packed weight only while that stand-in is untouched,
//! so a parameter replaced by a mapper is never shadowed by stale codes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use burn::module::{Param, ParamId};
use burn::prelude::*;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::quantize::{
    BLOCK, Quantization, column_scheme, nibble, nibble_code, row_scheme, transpose_into,
};

/// How the codes of a [`PackedWeight`] `[rows, cols]` are cut into blocks of [`BLOCK`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Down each column: a linear weight as Burn sees it, `[k, n]` (inputs × outputs).
    DownColumns,
    /// Along each row: a token embedding `[V, d]`.
    AlongRows,
}

/// The codes of a quantized matrix `[rows, cols]` (row-major as Burn sees it) as a kernel
/// reads them.
#[derive(Clone, Copy, Debug)]
pub enum Codes<'a> {
    /// One `i8` code per value.
    Bytes(&'a [i8]),
    /// Two 4-bit codes per byte, each stored as `c + 8`: byte `(p, j)` holds row `2p`'s code
    /// in its low nibble and row `2p + 1`'s in its high one (`[rows / 2, cols]`).
    RowPairs(&'a [u8]),
    /// Two 4-bit codes per byte along each row, each stored as `c + 8`: a block of 32 codes
    /// takes 16 bytes, byte `t` holding code `t` in its low nibble and code `t + 16` in its
    /// high one (`[rows, cols / 2]`).
    HalfBlocks(&'a [u8]),
    /// A linear weight `[k, n]` (`n` a multiple of 32) in panels of 32 columns, as the integer
    /// products of [`crate::kernels::vnni`] read them: panel `p` (columns `32p..32p + 32`)
    /// holds, for each group of four inputs `4g..4g + 4`, its columns' four codes side by side
    /// (`[n / 32][k / 4][32][4]`), each stored as `c + 128`: one `vpdpbusd` operand.
    Panels(&'a [u8]),
    /// [`Codes::Panels`] for 4-bit codes, each stored as `c + 8`, a group of a panel in 64
    /// bytes: byte `4j + t` holds input `4g + t` of column `j` in its low nibble and of column
    /// `j + 16` in its high one.
    PanelNibbles(&'a [u8]),
}

impl<'a> Codes<'a> {
    /// One `i8` per code, row-major: the codes themselves, or the row pairs unpacked (`cols`
    /// codes a row).
    pub fn bytes(self, cols: usize) -> Cow<'a, [i8]> {
        match self {
            Codes::Bytes(codes) => Cow::Borrowed(codes),
            Codes::RowPairs(pairs) => Cow::Owned(unpack_row_pairs(pairs, cols)),
            Codes::HalfBlocks(halves) => Cow::Owned(unpack_half_blocks(halves)),
            Codes::Panels(panels) => Cow::Owned(unpack_panels(panels, cols, false)),
            Codes::PanelNibbles(panels) => Cow::Owned(unpack_panels(panels, cols, true)),
        }
    }

    /// How many codes there are.
    pub fn count(self) -> usize {
        match self {
            Codes::Bytes(codes) => codes.len(),
            Codes::Panels(panels) => panels.len(),
            Codes::RowPairs(packed) | Codes::HalfBlocks(packed) | Codes::PanelNibbles(packed) => {
                2 * packed.len()
            }
        }
    }
}

/// Codes (each in `−8..=7`, in blocks of [`BLOCK`]) packed a block's two halves to a byte
/// ([`Codes::HalfBlocks`]).
pub fn pack_half_blocks(codes: &[i8]) -> Vec<u8> {
    // Sized up front: a collected flat map would grow to the next power of two and keep it.
    let mut halves = Vec::with_capacity(codes.len() / 2);
    for block in codes.chunks_exact(BLOCK) {
        let (low, high) = block.split_at(BLOCK / 2);
        halves.extend(
            low.iter()
                .zip(high)
                .map(|(&lo, &hi)| nibble(lo) | (nibble(hi) << 4)),
        );
    }
    halves
}

/// 4-bit codes as a checkpoint stores them (two to a byte, the even one in the low nibble,
/// each as `c + 8`; a whole number of blocks) regrouped a block's two halves to a byte
/// ([`Codes::HalfBlocks`]) in place, without unpacking them: a block keeps its 16 bytes.
pub fn half_blocks_from_pairs(mut bytes: Vec<u8>) -> Vec<u8> {
    for block in bytes.chunks_exact_mut(BLOCK / 2) {
        let pairs: [u8; BLOCK / 2] = (*block).try_into().expect("a block's 16 bytes");
        // Code t sits in byte t / 2 of its half, low nibble when t is even.
        let (low, high) = pairs.split_at(BLOCK / 4);
        for (t, byte) in block.iter_mut().enumerate() {
            let shift = 4 * (t % 2);
            let lo = (low[t / 2] >> shift) & 0x0f;
            let hi = (high[t / 2] >> shift) & 0x0f;
            *byte = lo | (hi << 4);
        }
    }
    bytes
}

/// [`pack_half_blocks`] undone.
pub fn unpack_half_blocks(halves: &[u8]) -> Vec<i8> {
    let mut codes = Vec::with_capacity(2 * halves.len());
    for block in halves.chunks_exact(BLOCK / 2) {
        codes.extend(block.iter().map(|&b| nibble_code(b)));
        codes.extend(block.iter().map(|&b| nibble_code(b >> 4)));
    }
    codes
}

/// Codes `[rows, cols]` (`rows` even, each in `−8..=7`) packed two rows to a byte row
/// ([`Codes::RowPairs`]).
pub fn pack_row_pairs(codes: &[i8], cols: usize) -> Vec<u8> {
    let mut pairs = Vec::with_capacity(codes.len() / 2);
    for pair in codes.chunks_exact(2 * cols) {
        let (even, odd) = pair.split_at(cols);
        pairs.extend(
            even.iter()
                .zip(odd)
                .map(|(&lo, &hi)| nibble(lo) | (nibble(hi) << 4)),
        );
    }
    pairs
}

/// [`pack_row_pairs`] undone: `[rows, cols]` codes.
pub fn unpack_row_pairs(pairs: &[u8], cols: usize) -> Vec<i8> {
    let mut codes = Vec::with_capacity(2 * pairs.len());
    for row in pairs.chunks_exact(cols) {
        codes.extend(row.iter().map(|&b| nibble_code(b)));
        codes.extend(row.iter().map(|&b| nibble_code(b >> 4)));
    }
    codes
}

/// Columns of a panel ([`Codes::Panels`]).
const PANEL: usize = 32;

/// A linear weight's codes in the checkpoint's order (`[n, k]`, each column's inputs
/// contiguous; `n` a multiple of 32, `k` of 4) laid out in panels: [`Codes::Panels`], or with
/// `nibbles` (codes in `−8..=7`) [`Codes::PanelNibbles`].
pub fn pack_panels(codes_nk: &[i8], n: usize, k: usize, nibbles: bool) -> Vec<u8> {
    debug_assert!(n.is_multiple_of(PANEL) && k.is_multiple_of(4) && codes_nk.len() == n * k);
    let group = if nibbles { 2 * PANEL } else { 4 * PANEL };
    let mut out = vec![0u8; n / PANEL * k / 4 * group];
    for (p, panel) in out.chunks_exact_mut(k / 4 * group).enumerate() {
        for (j, column) in codes_nk[p * PANEL * k..][..PANEL * k]
            .chunks_exact(k)
            .enumerate()
        {
            for (g, quad) in column.chunks_exact(4).enumerate() {
                let bytes = &mut panel[g * group..][..group];
                for (t, &c) in quad.iter().enumerate() {
                    if nibbles {
                        bytes[4 * (j % 16) + t] |= nibble(c) << (4 * (j / 16));
                    } else {
                        bytes[4 * j + t] = (c as u8) ^ 0x80;
                    }
                }
            }
        }
    }
    out
}

/// A linear weight's scales in the checkpoint's order (`[n, k / 32]`) laid out panel by panel
/// as [`Codes::Panels`] reads them: `[n / 32][k / 32][32]`, a panel's scales contiguous.
pub fn panel_scales<T: Copy>(scales_nk: &[T], k: usize) -> Vec<T> {
    let blocks = k / BLOCK;
    let mut out = scales_nk.to_vec();
    for (j, row) in scales_nk.chunks_exact(blocks).enumerate() {
        let (p, j) = (j / PANEL, j % PANEL);
        for (b, &s) in row.iter().enumerate() {
            out[(p * blocks + b) * PANEL + j] = s;
        }
    }
    out
}

/// [`panel_scales`] undone: `[k / 32, n]`, the blocks in row-major order as Burn sees them.
pub fn unpanel_scales<T: Copy>(panels: &[T], n: usize) -> Vec<T> {
    let blocks = panels.len() / n.max(1);
    let mut out = panels.to_vec();
    for (at, &s) in panels.iter().enumerate() {
        let (p, b, j) = (at / (blocks * PANEL), at / PANEL % blocks, at % PANEL);
        out[b * n + p * PANEL + j] = s;
    }
    out
}

/// [`pack_panels`] undone: the codes `[k, n]` as Burn sees the weight.
pub fn unpack_panels(panels: &[u8], n: usize, nibbles: bool) -> Vec<i8> {
    let count = if nibbles {
        2 * panels.len()
    } else {
        panels.len()
    };
    let k = count / n.max(1);
    let group = if nibbles { 2 * PANEL } else { 4 * PANEL };
    let mut codes = vec![0i8; count];
    for (p, panel) in panels.chunks_exact(k / 4 * group).enumerate() {
        for (g, bytes) in panel.chunks_exact(group).enumerate() {
            for j in 0..PANEL {
                for t in 0..4 {
                    codes[(4 * g + t) * n + p * PANEL + j] = if nibbles {
                        nibble_code(bytes[4 * (j % 16) + t] >> (4 * (j / 16)))
                    } else {
                        (bytes[4 * j + t] ^ 0x80) as i8
                    };
                }
            }
        }
    }
    codes
}

/// Whether the kernels read a linear weight `[k, n]` in panels ([`Codes::Panels`]): the
/// integer products of [`crate::kernels::vnni`] do, for whole panels.
fn panels_read(n: usize, k: usize) -> bool {
    #[cfg(all(feature = "cpu-kernels", target_arch = "x86_64"))]
    {
        n.is_multiple_of(PANEL) && k.is_multiple_of(BLOCK) && crate::kernels::vnni::available()
    }
    #[cfg(not(all(feature = "cpu-kernels", target_arch = "x86_64")))]
    {
        let _ = (n, k);
        false
    }
}

/// Whether the kernels read 4-bit linear weights two rows to a byte on this processor: the
/// integer products of [`crate::kernels::vnni`] do; other kernels read one byte per code.
fn row_pairs_read() -> bool {
    #[cfg(all(feature = "cpu-kernels", target_arch = "x86_64"))]
    {
        crate::kernels::vnni::available()
    }
    #[cfg(not(all(feature = "cpu-kernels", target_arch = "x86_64")))]
    {
        false
    }
}

/// Whether the kernels read 4-bit tables a block's two halves to a byte: the native row
/// kernels do; WebAssembly's integer row products read one byte per code.
fn half_blocks_read() -> bool {
    cfg!(all(feature = "cpu-kernels", not(target_family = "wasm")))
}

/// A quantized matrix as the CPU kernels read it: its codes ([`Codes`]), row-major as Burn
/// sees the matrix or in panels ([`Codes::Panels`]), and one f16 scale per block in the blocks'
/// row-major order or, with panels, panel by panel. Cloning it shares the values.
#[derive(Clone)]
pub struct PackedWeight(Arc<Packed>);

/// Owned [`Codes`].
enum Stored {
    Bytes(Vec<i8>),
    RowPairs(Vec<u8>),
    HalfBlocks(Vec<u8>),
    Panels(Vec<u8>),
    PanelNibbles(Vec<u8>),
}

struct Packed {
    codes: Stored,
    /// Every scale is an f16 value ([`crate::quantize`] rounds them up to one); held so, they
    /// take half the room and half the reads of f32.
    scales: Vec<f16>,
    shape: [usize; 2],
    blocks: Blocks,
    scheme: Quantization,
}

impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedWeight")
            .field("shape", &self.0.shape)
            .field("blocks", &self.0.blocks)
            .field("scheme", &self.0.scheme)
            .finish()
    }
}

impl PackedWeight {
    /// A linear weight from its codes and scales in the checkpoint's order (`[n, k]` and
    /// `[n, k / 32]`), laid out as Burn sees the weight: `[k, n]`, blocks down each column; in
    /// panels where the integer products read them so, else 4-bit codes two rows to a byte
    /// where the kernels read them so.
    ///
    /// # Panics
    /// Unless there are `n·k` codes and `n·k/32` scales.
    pub fn columns(codes: &[i8], scales: &[f16], n: usize, k: usize, scheme: Quantization) -> Self {
        check_lengths(codes.len(), scales.len(), n, k);
        let nibbles = scheme == Quantization::Q4;
        let panels = panels_read(n, k);
        let codes = if panels {
            let panels = pack_panels(codes, n, k, nibbles);
            if nibbles {
                Stored::PanelNibbles(panels)
            } else {
                Stored::Panels(panels)
            }
        } else {
            let codes_kn = transpose_into(codes, n, k, Vec::new());
            if nibbles && row_pairs_read() {
                Stored::RowPairs(pack_row_pairs(&codes_kn, n))
            } else {
                Stored::Bytes(codes_kn)
            }
        };
        let scales = if panels {
            panel_scales(scales, k)
        } else {
            transpose_into(scales, n, k / BLOCK, Vec::new())
        };
        Self(Arc::new(Packed {
            codes,
            scales,
            shape: [k, n],
            blocks: Blocks::DownColumns,
            scheme,
        }))
    }

    /// A table `[n, k]` (a token embedding) from its codes as the checkpoint stores them
    /// ([`Quantization::pack`]) and its scales (`[n, k / 32]`), kept in that order, blocks
    /// along each row. 4-bit codes are regrouped a block's two halves to a byte where the
    /// kernels read them so, in the stored bytes themselves: a large table is held once,
    /// never a byte per code on the way.
    ///
    /// # Panics
    /// Unless the bytes hold `n·k` codes and there are `n·k/32` scales.
    pub fn rows(
        stored: Cow<'_, [u8]>,
        scales: Vec<f16>,
        n: usize,
        k: usize,
        scheme: Quantization,
    ) -> Self {
        check_lengths(stored.len() * 8 / scheme.bits(), scales.len(), n, k);
        let codes = match scheme {
            // The same bytes read as signed codes, in place.
            Quantization::Q8 => {
                Stored::Bytes(stored.into_owned().into_iter().map(|b| b as i8).collect())
            }
            Quantization::Q4 if half_blocks_read() => {
                Stored::HalfBlocks(half_blocks_from_pairs(stored.into_owned()))
            }
            Quantization::Q4 => Stored::Bytes(scheme.unpack(&stored, n * k).into_owned()),
        };
        Self(Arc::new(Packed {
            codes,
            scales,
            shape: [n, k],
            blocks: Blocks::AlongRows,
            scheme,
        }))
    }

    /// The shape Burn sees: `[k, n]` for a linear weight, `[n, k]` for a table.
    pub fn shape(&self) -> [usize; 2] {
        self.0.shape
    }

    /// How the blocks lie.
    pub fn blocks(&self) -> Blocks {
        self.0.blocks
    }

    /// The codes, row-major in [`PackedWeight::shape`] or in panels.
    pub fn codes(&self) -> Codes<'_> {
        match &self.0.codes {
            Stored::Bytes(codes) => Codes::Bytes(codes),
            Stored::RowPairs(pairs) => Codes::RowPairs(pairs),
            Stored::HalfBlocks(halves) => Codes::HalfBlocks(halves),
            Stored::Panels(panels) => Codes::Panels(panels),
            Stored::PanelNibbles(panels) => Codes::PanelNibbles(panels),
        }
    }

    /// One scale per block, the blocks in row-major order, or panel by panel
    /// (`[n / 32][k / 32][32]`) for [`Codes::Panels`] and [`Codes::PanelNibbles`].
    pub fn scales(&self) -> &[f16] {
        &self.0.scales
    }

    /// One scale per block, the blocks in row-major order, in f32.
    fn row_major_scales(&self) -> Vec<f32> {
        match self.0.codes {
            Stored::Panels(_) | Stored::PanelNibbles(_) => {
                unpanel_scales(&self.0.scales, self.0.shape[1]).to_f32_vec()
            }
            _ => self.0.scales.to_f32_vec(),
        }
    }

    /// The codes and scales in the checkpoint's order: `[n, k]` and `[n, k / 32]`.
    pub fn parts(&self) -> (Vec<i8>, Vec<f32>) {
        let codes = self.codes().bytes(self.0.shape[1]);
        checkpoint_order(
            &codes,
            &self.row_major_scales(),
            self.0.shape,
            self.0.blocks,
        )
    }

    /// The same weight as Burn's quantized tensor data (a copy).
    pub fn data(&self) -> TensorData {
        let scheme = match self.0.blocks {
            Blocks::DownColumns => column_scheme(self.0.scheme),
            Blocks::AlongRows => row_scheme(self.0.scheme),
        };
        let bytes = self.codes().bytes(self.0.shape[1]);
        // Room for the scales, which Burn appends to the codes' allocation.
        let scales = self.row_major_scales();
        let mut codes = Vec::with_capacity(bytes.len() + size_of_val(scales.as_slice()) + 16);
        codes.extend_from_slice(&bytes);
        TensorData::quantized(codes, self.0.shape, scheme, &scales, None)
    }

    /// The lazy stand-in for this weight as parameter `id` on `device`: its shape, and Burn's
    /// quantized tensor of it once something asks for its value.
    pub fn param<const D: usize>(&self, id: ParamId, device: &Device) -> Param<Tensor<D>> {
        let packed = self.clone();
        let shape = Shape::from(self.0.shape.to_vec());
        Param::uninitialized(
            id,
            move |device, _| Tensor::<D>::from_data(packed.data(), device),
            device.clone(),
            false,
            shape,
        )
    }
}

/// The codes and scales of a `[rows, cols]` matrix laid out as `blocks` says, in the
/// checkpoint's order: `[n, k]` and `[n, k / 32]`.
pub(crate) fn checkpoint_order(
    codes: &[i8],
    scales: &[f32],
    [rows, cols]: [usize; 2],
    blocks: Blocks,
) -> (Vec<i8>, Vec<f32>) {
    match blocks {
        Blocks::DownColumns => (
            transpose_into(codes, rows, cols, Vec::new()),
            transpose_into(scales, rows / BLOCK, cols, Vec::new()),
        ),
        Blocks::AlongRows => (codes.to_vec(), scales.to_vec()),
    }
}

/// The packed weights of a model by the id of the parameter each stands in for.
pub type PackedWeights = HashMap<ParamId, PackedWeight>;

/// # Panics
/// Unless there are `n·k` codes and `n·k/32` scales.
fn check_lengths(codes: usize, scales: usize, n: usize, k: usize) {
    assert!(
        codes == n * k && scales * BLOCK == n * k,
        "{n}x{k} codes with one scale per block of {BLOCK}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::f16_scales;

    /// Codes covering `−7..=7` (what a checkpoint holds) in an order that tells neighbours
    /// apart.
    fn codes(count: usize) -> Vec<i8> {
        (0..count)
            .map(|i| ((i * 7 + i / 5) % 15) as i8 - 7)
            .collect()
    }

    #[test]
    fn nibble_layouts_round_trip_and_hold_no_spare_room() {
        let (rows, cols) = (6, 3 * BLOCK);
        let c = codes(rows * cols);
        let halves = pack_half_blocks(&c);
        assert_eq!(
            (halves.len(), halves.capacity()),
            (c.len() / 2, c.len() / 2)
        );
        assert_eq!(unpack_half_blocks(&halves), c);
        let pairs = pack_row_pairs(&c, cols);
        assert_eq!((pairs.len(), pairs.capacity()), (c.len() / 2, c.len() / 2));
        assert_eq!(unpack_row_pairs(&pairs, cols), c);
    }

    #[test]
    fn panels_round_trip_to_the_weight_as_burn_sees_it() {
        // Three panels, five blocks; 8-bit codes over their whole range.
        let (n, k) = (96, 5 * BLOCK);
        let wide: Vec<i8> = (0..n * k).map(|i| ((i * 37 + i / 7) % 255) as i8).collect();
        let scales: Vec<f16> = (0..n * k / BLOCK)
            .map(|i| f16::from_f32(0.25 + i as f32 / 64.0))
            .collect();
        let scales_kn = transpose_into(&scales, n, k / BLOCK, Vec::new());
        for (c, nibbles) in [(wide, false), (codes(n * k), true)] {
            let panels = pack_panels(&c, n, k, nibbles);
            assert_eq!(panels.len(), if nibbles { n * k / 2 } else { n * k });
            let codes_kn = transpose_into(&c, n, k, Vec::new());
            assert_eq!(
                unpack_panels(&panels, n, nibbles),
                codes_kn,
                "nibbles {nibbles}"
            );
            let stored = if nibbles {
                Codes::PanelNibbles(&panels)
            } else {
                Codes::Panels(&panels)
            };
            assert_eq!(stored.count(), n * k);
            assert_eq!(stored.bytes(n).as_ref(), codes_kn.as_slice());
            // Column 40 (panel 1, column 8), block 3: its scale, where the kernels read it.
            let in_panels = panel_scales(&scales, k);
            assert_eq!(
                in_panels[(k / BLOCK + 3) * 32 + 8],
                scales[40 * k / BLOCK + 3]
            );
            assert_eq!(unpanel_scales(&in_panels, n), scales_kn);
        }
    }

    #[test]
    fn a_linear_weight_gives_back_its_checkpoint_order_in_any_layout() {
        // Whole panels (where the processor reads them) and a width that is not.
        for n in [96, 70] {
            let k = 3 * BLOCK;
            let c = codes(n * k);
            let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.5 + i as f32 / 8.0).collect();
            for scheme in [Quantization::Q8, Quantization::Q4] {
                let w = PackedWeight::columns(&c, &f16_scales(&scales), n, k, scheme);
                assert_eq!(w.shape(), [k, n]);
                assert_eq!(w.parts(), (c.clone(), scales.clone()), "{scheme} {n}");
            }
        }
    }

    #[test]
    fn stored_pairs_regroup_into_the_half_blocks_of_their_codes() {
        let c = codes(5 * BLOCK);
        let stored = Quantization::Q4.pack(&c);
        assert_eq!(half_blocks_from_pairs(stored), pack_half_blocks(&c));
        let scales = vec![0.5; c.len() / BLOCK];
        for scheme in [Quantization::Q8, Quantization::Q4] {
            let stored = Cow::Owned(scheme.pack(&c));
            let table = PackedWeight::rows(stored, f16_scales(&scales), 5, BLOCK, scheme);
            assert_eq!(table.codes().bytes(BLOCK), c, "{scheme}");
            assert_eq!(table.parts(), (c.clone(), scales.clone()), "{scheme}");
        }
    }
}
