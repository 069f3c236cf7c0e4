//! Image preprocessing for Phantom: decoding, InternVL-style dynamic tiling and normalisation.
//!
//! This is a bit-exact port of the official pipeline
//! (`Image.open(..).convert('RGB')` → `dynamic_preprocess(min_num=1, max_num=6, image_size=448,
//! use_thumbnail=True)` → per-tile `ToTensor` + `Normalize`), including Pillow's default
//! `BICUBIC` resize. The module deliberately does not depend on Burn: every function returns
//! plain Rust data, so it compiles quickly and can be tested on its own.
//!
//! # Bit-exactness
//!
//! For lossless inputs (PNG, BMP, and in practice GIF) the tiles are byte-for-byte what Pillow
//! produces, and [`PixelValues`] is bit-for-bit what torchvision produces in float32. Lossy formats
//! (JPEG, lossy WebP) are decoded by the `image` crate rather than libjpeg-turbo / libwebp, and
//! those decoders may differ from Pillow's by a unit in the last place on some pixels; everything
//! after decoding is still exact.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ::image::{DynamicImage, ImageReader, Limits};

/// Re-exported so callers can name the tile type without depending on `image` themselves.
pub use ::image::RgbImage;

/// Side length, in pixels, of every square tile fed to the vision encoder.
pub const TILE_SIZE: u32 = 448;

/// The largest number of grid tiles the official code allows (the thumbnail comes on top).
pub const MAX_TILES_LIMIT: usize = 6;

/// Default upper bound on `width * height` of a decoded image: 64 Mi pixels (67,108,864).
///
/// It is checked against the header before any pixel buffer is allocated; at 8 bytes per pixel
/// (16-bit RGBA, the widest layout the enabled decoders produce) the decoded buffer stays under
/// 512 MiB.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Per-channel mean used by `Normalize` (ImageNet statistics), in R, G, B order.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];

/// Per-channel standard deviation used by `Normalize` (ImageNet statistics), in R, G, B order.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Candidate `(cols, rows)` grids in the exact order the official code scans them for
/// `max_num = 6`.
///
/// The official code builds the candidates as
/// `sorted(set((i, j) for n in range(1, N + 1) for i in range(1, n + 1) for j in range(1, n + 1)
/// if 1 <= i * j <= N), key=lambda x: x[0] * x[1])`. `sorted` is stable, so grids of equal area
/// keep the iteration order of the Python `set`, which is fixed by the hashes of small-int tuples
/// (not randomised, unlike `str` hashes). This list equals `target_ratios_in_order` stored in the
/// fixture's `preprocess.json`. Running that expression under CPython 3.11 for every
/// `N` in 1..=5 gives exactly this list filtered to `cols * rows <= N`, so [`choose_grid`]
/// filters it rather than keeping one table per `N`. The order only matters on exact ties.
pub const CANDIDATE_GRIDS: [(u32, u32); 14] = [
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 1),
    (1, 3),
    (4, 1),
    (1, 4),
    (2, 2),
    (1, 5),
    (5, 1),
    (6, 1),
    (2, 3),
    (1, 6),
    (3, 2),
];

/// Errors raised while configuring the processor or reading an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// `max_tiles` was outside `1..=6`.
    #[error("max_tiles must be between 1 and {MAX_TILES_LIMIT}, got {0}")]
    InvalidMaxTiles(usize),

    /// The data does not start with the signature of any enabled format.
    #[error("data is not a recognised image (supported formats: PNG, JPEG, WebP, GIF, BMP)")]
    UnknownFormat,

    /// The header announces more pixels than [`ImageProcessor::max_pixels`] allows.
    #[error("image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")]
    TooLarge {
        /// Width announced by the image header.
        width: u32,
        /// Height announced by the image header.
        height: u32,
        /// The limit that was exceeded.
        max_pixels: u64,
    },

    /// The header announces an image with no pixels.
    #[error("image has no pixels ({width}x{height})")]
    Empty {
        /// Width announced by the image header.
        width: u32,
        /// Height announced by the image header.
        height: u32,
    },

    /// The decoder rejected the data (truncated, corrupt, unsupported variant, or a decoder limit).
    #[error("cannot decode image: {0}")]
    Decode(#[source] ::image::ImageError),

    /// Reading the underlying data failed.
    #[error("cannot read image data: {0}")]
    Io(#[source] std::io::Error),

    /// Any of the above, for an image read from a file.
    #[error("{}: {}", .path.display(), .source)]
    File {
        /// The file that was being read.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<ImageError>,
    },
}

/// Normalised pixels for a batch of tiles, ready to become a `[num_tiles, 3, 448, 448]` tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// Row-major `[num_tiles, 3, TILE_SIZE, TILE_SIZE]` float32 values.
    pub data: Vec<f32>,
    /// Number of tiles (grid tiles plus the thumbnail, if any).
    pub num_tiles: usize,
    /// Side length of every tile ([`ImageProcessor::tile_size`]).
    pub tile_size: usize,
}

impl PixelValues {
    /// The tensor shape `[num_tiles, 3, tile_size, tile_size]` of [`PixelValues::data`].
    #[must_use]
    pub fn shape(&self) -> [usize; 4] {
        [self.num_tiles, 3, self.tile_size, self.tile_size]
    }

    /// The tiles of several pictures, in order, as one set (`None` when there are none).
    pub fn concat<'a>(pictures: impl IntoIterator<Item = &'a PixelValues>) -> Option<Self> {
        let mut all: Option<Self> = None;
        for p in pictures {
            match all.as_mut() {
                None => all = Some(p.clone()),
                Some(all) => {
                    all.data.extend_from_slice(&p.data);
                    all.num_tiles += p.num_tiles;
                }
            }
        }
        all
    }

    /// The tiles as a `[num_tiles, 3, side, side]` tensor on `device`.
    pub fn to_tensor(&self, device: &burn::prelude::Device) -> burn::prelude::Tensor<4> {
        burn::prelude::Tensor::from_data(
            burn::tensor::TensorData::new(self.data.clone(), self.shape()),
            device,
        )
    }
}

/// Configuration of the dynamic-tiling preprocessor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageProcessor {
    /// Maximum number of grid tiles, `1..=6` (default 6, as hard-coded by the released code).
    /// Values above 6 are treated as 6 by [`choose_grid`].
    pub max_tiles: usize,
    /// Whether to append a whole-image 448x448 thumbnail when the grid has more than one tile
    /// (default `true`, as in the released code).
    pub use_thumbnail: bool,
    /// Largest accepted `width * height` when decoding (default [`DEFAULT_MAX_PIXELS`]).
    pub max_pixels: u64,
    /// Tile side in pixels: the vision tower's `image_size` (448 for every released model).
    pub tile_size: u32,
}

impl Default for ImageProcessor {
    fn default() -> Self {
        Self {
            max_tiles: MAX_TILES_LIMIT,
            use_thumbnail: true,
            max_pixels: DEFAULT_MAX_PIXELS,
            tile_size: TILE_SIZE,
        }
    }
}

impl ImageProcessor {
    /// A processor with the given tile budget and the default thumbnail and pixel-limit settings.
    ///
    /// # Errors
    ///
    /// [`ImageError::InvalidMaxTiles`] unless `1 <= max_tiles <= 6`.
    pub fn new(max_tiles: usize) -> Result<Self, ImageError> {
        if !(1..=MAX_TILES_LIMIT).contains(&max_tiles) {
            return Err(ImageError::InvalidMaxTiles(max_tiles));
        }
        Ok(Self {
            max_tiles,
            ..Self::default()
        })
    }

    /// Decodes an encoded image (format guessed from its content) into 8-bit RGB, converting the
    /// way Pillow's `convert('RGB')` does.
    ///
    /// The dimensions are read from the header and checked against [`Self::max_pixels`] before
    /// any pixel buffer is allocated. Alpha is dropped, never composited; grayscale is replicated
    /// to three channels. For 16-bit PNGs Pillow keeps the high byte of each RGB(A)/LA sample,
    /// but clips 16-bit grayscale (its `I;16` mode) to 255; both behaviours are reproduced.
    ///
    /// # Errors
    ///
    /// [`ImageError::UnknownFormat`] for data that is not a supported image,
    /// [`ImageError::TooLarge`] / [`ImageError::Empty`] for bad header dimensions, and
    /// [`ImageError::Decode`] for truncated or corrupt data.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        self.decode_with(|| Ok(Cursor::new(bytes)))
    }

    /// Reads and decodes an image file; see [`Self::decode`].
    ///
    /// # Errors
    ///
    /// [`ImageError::File`], naming the path and wrapping the I/O or decoding error.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<RgbImage, ImageError> {
        let path = path.as_ref();
        // Streaming from the file (rather than reading it whole) keeps memory bounded by the
        // pixel limit even for enormous files.
        self.decode_with(|| File::open(path).map(BufReader::new))
            .map_err(|source| ImageError::File {
                path: path.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Tiles a `width` x `height` image becomes: its grid, plus the thumbnail when the grid
    /// has more than one tile.
    #[must_use]
    pub fn tile_count(&self, width: u32, height: u32) -> usize {
        let (cols, rows) = choose_grid_for(width, height, self.max_tiles, self.tile_size);
        let grid = (cols * rows) as usize;
        grid + usize::from(grid > 1 && self.use_thumbnail)
    }

    /// Splits an image into the tiles the vision encoder sees: the grid from [`choose_grid`],
    /// row-major, then a 448x448 thumbnail of the whole image if the grid has more than one
    /// tile and [`Self::use_thumbnail`] is set.
    #[must_use]
    pub fn tiles(&self, img: &RgbImage) -> Vec<RgbImage> {
        let side = self.tile_size;
        let (cols, rows) = choose_grid_for(img.width(), img.height(), self.max_tiles, side);
        let resized = resize_bicubic(img, side * cols, side * rows);
        let mut tiles = Vec::with_capacity((cols * rows) as usize + 1);
        for row in 0..rows {
            for col in 0..cols {
                let view =
                    ::image::imageops::crop_imm(&resized, col * side, row * side, side, side);
                tiles.push(view.to_image());
            }
        }
        if self.use_thumbnail && tiles.len() > 1 {
            tiles.push(resize_bicubic(img, side, side));
        }
        tiles
    }

    /// Tiles an image and normalises every tile into a `[N, 3, 448, 448]` float32 batch.
    ///
    /// Each value is `(f32(u8) / 255 - mean) / std` computed in float32, which is exactly what
    /// torchvision's `ToTensor` + `Normalize` produce (the official `Resize(448)` is a no-op on a
    /// 448x448 tile). The released model rounds these to bfloat16; see [`round_to_bf16`].
    #[must_use]
    pub fn preprocess(&self, img: &RgbImage) -> PixelValues {
        let tiles = self.tiles(img);
        let plane = (self.tile_size * self.tile_size) as usize;
        let mut data = Vec::with_capacity(tiles.len() * 3 * plane);
        for tile in &tiles {
            for channel in 0..3 {
                let (mean, std) = (IMAGENET_MEAN[channel], IMAGENET_STD[channel]);
                data.extend(
                    tile.pixels()
                        .map(|px| (f32::from(px.0[channel]) / 255.0 - mean) / std),
                );
            }
        }
        PixelValues {
            data,
            num_tiles: tiles.len(),
            tile_size: self.tile_size as usize,
        }
    }

    /// [`Self::decode`] followed by [`Self::preprocess`].
    ///
    /// # Errors
    ///
    /// As for [`Self::decode`].
    pub fn preprocess_bytes(&self, bytes: &[u8]) -> Result<PixelValues, ImageError> {
        Ok(self.preprocess(&self.decode(bytes)?))
    }

    /// Shared decoding path. `open_source` is called twice: once to read the header, once to
    /// decode, because `image`'s reader is consumed by the header probe.
    fn decode_with<R, F>(&self, mut open_source: F) -> Result<RgbImage, ImageError>
    where
        R: BufRead + Seek,
        F: FnMut() -> std::io::Result<R>,
    {
        let mut source = open_source().map_err(ImageError::Io)?;
        let png_gray = png_is_grayscale(&mut source)?;
        let probe = ImageReader::new(source)
            .with_guessed_format()
            .map_err(ImageError::Io)?;
        if probe.format().is_none() {
            return Err(ImageError::UnknownFormat);
        }
        // Header only: no decoder allocates the pixel buffer in `into_dimensions`.
        let (width, height) = probe.into_dimensions().map_err(ImageError::Decode)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 {
            return Err(ImageError::Empty { width, height });
        }
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge {
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }

        let mut reader = ImageReader::new(open_source().map_err(ImageError::Io)?)
            .with_guessed_format()
            .map_err(ImageError::Io)?;
        // Pin the dimensions to what the probe saw and bound allocations by the widest pixel
        // layout (16 bytes for f32 RGBA) plus slack for decoder scratch space, so a source that
        // changes between the two reads cannot make us allocate more than we checked.
        let mut limits = Limits::default();
        limits.max_image_width = Some(width);
        limits.max_image_height = Some(height);
        limits.max_alloc = Some(pixels.saturating_mul(16).saturating_add(64 << 20));
        reader.limits(limits);
        let decoded = reader.decode().map_err(ImageError::Decode)?;
        Ok(to_rgb_like_pillow(decoded, png_gray))
    }
}

/// Whether the source is a PNG whose IHDR colour type is 0 (grayscale), leaving the reader
/// rewound to the start.
///
/// The `image` crate expands a 16-bit grayscale PNG with a `tRNS` chunk to gray+alpha, which is
/// indistinguishable from a true gray+alpha PNG, yet Pillow converts the two differently.
fn png_is_grayscale<R: Read + Seek>(source: &mut R) -> Result<bool, ImageError> {
    const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
    // Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4) + bit depth (1).
    const COLOUR_TYPE_OFFSET: usize = 25;
    let mut head = Vec::with_capacity(COLOUR_TYPE_OFFSET + 1);
    source
        .by_ref()
        .take(COLOUR_TYPE_OFFSET as u64 + 1)
        .read_to_end(&mut head)
        .map_err(ImageError::Io)?;
    source.seek(SeekFrom::Start(0)).map_err(ImageError::Io)?;
    Ok(head.len() > COLOUR_TYPE_OFFSET
        && head.starts_with(SIGNATURE)
        && &head[12..16] == b"IHDR"
        && head[COLOUR_TYPE_OFFSET] == 0)
}

/// Converts any decoded colour layout to RGB8 with the semantics of Pillow's
/// `Image.open(..).convert('RGB')`.
fn to_rgb_like_pillow(img: DynamicImage, png_gray: bool) -> RgbImage {
    // Pillow unpacks 16-bit RGB/RGBA/LA PNG samples by keeping the most significant byte.
    let high_byte = |v: u16| (v >> 8) as u8;
    // Pillow opens 16-bit grayscale PNGs as `I;16`, whose conversion to RGB saturates at 255.
    let clip = |v: u16| v.min(255) as u8;
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, _] = rgba.get_pixel(x, y).0;
            ::image::Rgb([r, g, b])
        }),
        DynamicImage::ImageLuma8(gray) => {
            RgbImage::from_fn(w, h, |x, y| ::image::Rgb([gray.get_pixel(x, y).0[0]; 3]))
        }
        DynamicImage::ImageLumaA8(gray) => {
            RgbImage::from_fn(w, h, |x, y| ::image::Rgb([gray.get_pixel(x, y).0[0]; 3]))
        }
        DynamicImage::ImageLuma16(gray) => RgbImage::from_fn(w, h, |x, y| {
            ::image::Rgb([clip(gray.get_pixel(x, y).0[0]); 3])
        }),
        DynamicImage::ImageLumaA16(gray) => {
            let convert = if png_gray { clip } else { high_byte };
            RgbImage::from_fn(w, h, |x, y| {
                ::image::Rgb([convert(gray.get_pixel(x, y).0[0]); 3])
            })
        }
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(w, h, |x, y| {
            ::image::Rgb(rgb.get_pixel(x, y).0.map(high_byte))
        }),
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, _] = rgba.get_pixel(x, y).0;
            ::image::Rgb([r, g, b].map(high_byte))
        }),
        // Float layouts come only from HDR formats that are not enabled; `image`'s own
        // conversion is the best available there.
        other => other.to_rgb8(),
    }
}

/// Picks the `(cols, rows)` tiling grid for a `width` x `height` image, exactly as the official
/// `find_closest_aspect_ratio` does.
///
/// Candidates are [`CANDIDATE_GRIDS`] with `cols * rows <= max_tiles`, scanned in order; the grid
/// whose `cols / rows` is closest to `width / height` wins. On an exact tie a later candidate
/// replaces the current one only if `width * height > 0.5 * 448² * cols * rows`. `max_tiles`
/// above 6 is treated as 6; with `max_tiles == 0` (no candidates) the official default `(1, 1)`
/// is returned.
#[must_use]
pub fn choose_grid(width: u32, height: u32, max_tiles: usize) -> (u32, u32) {
    choose_grid_for(width, height, max_tiles, TILE_SIZE)
}

/// [`choose_grid`] for tiles of `tile_size` pixels (the tie rule's area threshold scales with it).
#[must_use]
pub fn choose_grid_for(width: u32, height: u32, max_tiles: usize, tile_size: u32) -> (u32, u32) {
    let max_tiles = max_tiles.min(MAX_TILES_LIMIT) as u32;
    // Both quotients are correctly rounded f64 divisions of exactly representable integers, the
    // same as Python's `/`, so the differences and the `==` tie test match bit for bit.
    let aspect = f64::from(width) / f64::from(height);
    // Python compares the int area with the float threshold exactly; the threshold
    // 0.5 * 448² * k is an integer, so compare 2 * area against 448² * k in integers.
    let double_area = 2 * u128::from(width) * u128::from(height);
    let tile_area = u128::from(tile_size) * u128::from(tile_size);

    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for &(cols, rows) in CANDIDATE_GRIDS.iter().filter(|(c, r)| c * r <= max_tiles) {
        let diff = (aspect - f64::from(cols) / f64::from(rows)).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (cols, rows);
        } else if diff == best_diff && double_area > tile_area * u128::from(cols * rows) {
            best = (cols, rows);
        }
    }
    best
}

/// Resizes with Pillow's default `Image.resize` filter (`BICUBIC`), reproducing its output
/// exactly.
///
/// Pillow's algorithm (`ImagingResample` in `Resample.c`): a separable convolution with the cubic
/// kernel `a = -0.5`, stretched by the downscale factor so downscaling is antialiased, one pass
/// per axis into an 8-bit intermediate. Weights are computed in f64, normalised to sum to 1, and
/// applied in 22-bit fixed point. A pass is skipped when its axis keeps its size, so a same-size
/// resize is a copy.
///
/// The order of the passes matters, because the intermediate is rounded to 8 bits: Pillow runs
/// the horizontal pass first unless the height shrinks by more than twice as many pixels as the
/// width does (`in_h - out_h > 2 * (in_w - out_w)`, with the height shrinking), which is the case
/// for most portrait photos. This is Pillow 13's rule; Pillow 12 and older always went
/// horizontal first, so on such images they differ from Pillow 13 (and from this function) by a
/// few levels.
///
/// An empty input resized to a non-empty size yields black pixels (Pillow cannot hold an empty
/// image, so there is nothing to match).
#[must_use]
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    if !need_horizontal && !need_vertical {
        return img.clone();
    }

    let src = img.as_raw();
    let src_stride = in_w as usize * 3;
    let vertical = Coefficients::new(in_h, height);
    if need_vertical && vertical_pass_first(in_w, in_h, width, height) {
        let temp = resample_vertical(src, src_stride, &vertical, 0);
        let out = if need_horizontal {
            resample_horizontal(&temp, src_stride, &Coefficients::new(in_w, width))
        } else {
            temp
        };
        return buffer_to_image(width, height, out);
    }
    if !need_horizontal {
        let out = resample_vertical(src, src_stride, &vertical, 0);
        return buffer_to_image(width, height, out);
    }
    // Only the source rows some output row reads need the horizontal pass.
    let first_row = vertical.windows.first().map_or(0, |w| w.start);
    let end_row = vertical.windows.last().map_or(0, |w| w.start + w.len);
    let horizontal = Coefficients::new(in_w, width);
    let rows = &src[first_row * src_stride..end_row * src_stride];
    let temp = resample_horizontal(rows, src_stride, &horizontal);
    let out = if need_vertical {
        resample_vertical(&temp, width as usize * 3, &vertical, first_row)
    } else {
        temp
    };
    buffer_to_image(width, height, out)
}

/// Pillow's choice of pass order: vertical first when the height shrinks by more than twice
/// as many pixels as the width (a width that grows counts as a negative shrink).
fn vertical_pass_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let shrink_h = i64::from(in_h) - i64::from(out_h);
    let shrink_w = i64::from(in_w) - i64::from(out_w);
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

/// Wraps a buffer this module built with exactly `width * height * 3` bytes.
fn buffer_to_image(width: u32, height: u32, data: Vec<u8>) -> RgbImage {
    let expected = width as usize * height as usize * 3;
    debug_assert_eq!(data.len(), expected);
    // The length is correct by construction; the fallback only exists to avoid a panic path.
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Fixed-point precision of Pillow's 8-bit resampler: 32 bits minus 8 for the pixel value and 2
/// of headroom for kernels whose partial sums leave `[0, 1]`.
const PRECISION_BITS: u32 = 22;

/// Input pixels feeding one output pixel along one axis.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: usize,
    len: usize,
}

/// Per-axis filter taps: for output pixel `i`, `windows[i]` and the first `windows[i].len` of
/// `weights[i * stride..]`, as 22-bit fixed-point integers.
struct Coefficients {
    windows: Vec<Window>,
    weights: Vec<i32>,
    stride: usize,
}

impl Coefficients {
    /// Mirrors Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`. The floating
    /// point operations are kept in Pillow's order so every weight rounds identically.
    fn new(in_size: u32, out_size: u32) -> Self {
        const SUPPORT: f64 = 2.0;
        // Pillow receives the source box as C floats, so the span goes through f32 first.
        let span = f64::from(in_size as f32);
        let scale = span / f64::from(out_size);
        let filter_scale = scale.max(1.0);
        let support = SUPPORT * filter_scale;
        let inv_filter_scale = 1.0 / filter_scale;
        let stride = support.ceil() as usize * 2 + 1;

        let mut windows = Vec::with_capacity(out_size as usize);
        let mut weights = vec![0i32; out_size as usize * stride];
        let mut taps = Vec::with_capacity(stride);
        for (out, row) in weights.chunks_exact_mut(stride).enumerate() {
            let centre = (out as f64 + 0.5) * scale;
            // `as` truncates toward zero like C's `(int)` cast.
            let start = ((centre - support + 0.5) as i64).max(0);
            let end = ((centre + support + 0.5) as i64).min(i64::from(in_size));
            let len = (end - start).max(0) as usize;
            let start = start as usize;

            taps.clear();
            let mut total = 0.0;
            for i in start..start + len {
                let w = bicubic((i as f64 - centre + 0.5) * inv_filter_scale);
                taps.push(w);
                total += w;
            }
            for (dst, &w) in row.iter_mut().zip(&taps) {
                let w = if total != 0.0 { w / total } else { w };
                *dst = to_fixed_point(w);
            }
            windows.push(Window { start, len });
        }
        Self {
            windows,
            weights,
            stride,
        }
    }

    fn taps(&self, out: usize) -> (Window, &[i32]) {
        let window = self.windows[out];
        let offset = out * self.stride;
        (window, &self.weights[offset..offset + window.len])
    }
}

/// Keys' cubic convolution kernel with `a = -0.5`, written with Pillow's operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Scales a normalised weight to 22-bit fixed point, rounding half away from zero exactly as
/// Pillow's `(int)(w * (1 << 22) ± 0.5)` does (add in f64, then truncate).
fn to_fixed_point(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

/// Converts a fixed-point accumulator back to a byte, saturating like Pillow's `clip8`.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding bias every accumulator starts from, so the final shift rounds to nearest.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

// The i32 accumulators cannot overflow: normalised cubic weights have a positive part summing
// to well under 1.2, so |acc| < 255 * 1.2 * 2^22 + 2^21 < 2^31.

/// Horizontal pass over packed RGB rows; returns rows of `coeffs.windows.len()` pixels.
fn resample_horizontal(src: &[u8], src_stride: usize, coeffs: &Coefficients) -> Vec<u8> {
    let out_w = coeffs.windows.len();
    let rows = src.len() / src_stride;
    let mut out = Vec::with_capacity(rows * out_w * 3);
    for row in src.chunks_exact(src_stride) {
        for x in 0..out_w {
            let (window, weights) = coeffs.taps(x);
            let pixels = &row[window.start * 3..(window.start + window.len) * 3];
            let mut acc = [HALF; 3];
            for (px, &k) in pixels.chunks_exact(3).zip(weights) {
                for (a, &v) in acc.iter_mut().zip(px) {
                    *a += i32::from(v) * k;
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// Vertical pass; `row_offset` is the source row that `src`'s first row corresponds to.
fn resample_vertical(
    src: &[u8],
    stride: usize,
    coeffs: &Coefficients,
    row_offset: usize,
) -> Vec<u8> {
    let out_h = coeffs.windows.len();
    let mut out = Vec::with_capacity(out_h * stride);
    // Accumulating whole rows at a time walks memory linearly; integer addition is
    // associative, so the result equals Pillow's per-pixel loop.
    let mut acc = vec![HALF; stride];
    for y in 0..out_h {
        let (window, weights) = coeffs.taps(y);
        acc.fill(HALF);
        for (i, &k) in weights.iter().enumerate() {
            let start = (window.start + i - row_offset) * stride;
            let row = &src[start..start + stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * k;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

/// Rounds every value to the nearest bfloat16 (ties to even) and stores it back as f32,
/// matching `tensor.to(torch.bfloat16)`.
///
/// The released `generate()` casts `pixel_values` to bf16 before the vision tower; apply this to
/// [`PixelValues::data`] to reproduce that input exactly. NaNs stay NaN (quietened), infinities
/// stay infinite, and values beyond the bf16 range round to infinity as in PyTorch.
pub fn round_to_bf16(values: &mut [f32]) {
    for v in values {
        let bits = v.to_bits();
        let rounded = if v.is_nan() {
            (bits | 0x0040_0000) & 0xFFFF_0000
        } else {
            // Adding 0x7FFF plus the lowest kept bit rounds half to even; a carry out of the
            // mantissa correctly bumps the exponent (up to infinity).
            let lsb = (bits >> 16) & 1;
            (bits + 0x7FFF + lsb) & 0xFFFF_0000
        };
        *v = f32::from_bits(rounded);
    }
}
