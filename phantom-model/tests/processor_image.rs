//! Tests for `phantom_model::processor::image` against the Pillow/torchvision reference fixture
//! in `tests/fixtures/phantom-ref/images` (see section 5 of the fixture README).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use phantom_model::processor::image::{
    CANDIDATE_GRIDS, DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, PixelValues, RgbImage,
    TILE_SIZE, choose_grid, resize_bicubic, round_to_bf16,
};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

/// Records the largest single allocation made by this test binary, so the oversized-header test
/// can prove that no pixel buffer was allocated (a lazily committed 30 GB buffer would otherwise
/// go unnoticed).
struct TrackingAllocator;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the only addition is an
// atomic bookkeeping update, which does not allocate.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/phantom-ref/images"
    ))
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn reference_json() -> serde_json::Value {
    serde_json::from_slice(&read_fixture("preprocess.json")).expect("preprocess.json parses")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tile's bytes in CHW order, as `pil_to_tensor` lays them out.
fn chw_bytes(tile: &RgbImage) -> Vec<u8> {
    (0..3)
        .flat_map(|c| tile.pixels().map(move |p| p.0[c]))
        .collect()
}

fn tile_values(pv: &PixelValues, tile: usize) -> &[f32] {
    let len = 3 * (TILE_SIZE * TILE_SIZE) as usize;
    &pv.data[tile * len..(tile + 1) * len]
}

fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn json_strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect()
}

fn json_f64s(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

const FIXTURE_IMAGES: [&str; 2] = ["coffee", "astronaut"];

#[test]
fn candidate_order_matches_reference() {
    let json = reference_json();
    let stored: Vec<(u32, u32)> = json["target_ratios_in_order"]
        .as_array()
        .expect("array")
        .iter()
        .map(|pair| {
            let pair = pair.as_array().expect("pair");
            (
                pair[0].as_u64().expect("int") as u32,
                pair[1].as_u64().expect("int") as u32,
            )
        })
        .collect();
    assert_eq!(stored, CANDIDATE_GRIDS.to_vec());
}

#[test]
fn grid_and_tile_count_for_fixtures() {
    let json = reference_json();
    let processor = ImageProcessor::default();
    for name in FIXTURE_IMAGES {
        let meta = &json["images"][name];
        let img = processor
            .decode(&read_fixture(&format!("{name}.png")))
            .expect("decodes");
        assert_eq!(u64::from(img.width()), meta["width"].as_u64().unwrap());
        assert_eq!(u64::from(img.height()), meta["height"].as_u64().unwrap());
        let grid = choose_grid(img.width(), img.height(), 6);
        let want = &meta["grid_cols_rows"];
        assert_eq!(
            (u64::from(grid.0), u64::from(grid.1)),
            (want[0].as_u64().unwrap(), want[1].as_u64().unwrap()),
            "{name}"
        );
        let tiles = processor.tiles(&img);
        assert_eq!(
            tiles.len() as u64,
            meta["n_tiles"].as_u64().unwrap(),
            "{name}"
        );
        assert!(
            tiles
                .iter()
                .all(|t| t.dimensions() == (TILE_SIZE, TILE_SIZE))
        );
    }
    // The spec's numbers, spelled out.
    assert_eq!(choose_grid(600, 400, 6), (3, 2));
    assert_eq!(choose_grid(512, 512, 6), (1, 1));
}

#[test]
fn tiles_match_reference_hashes() {
    let json = reference_json();
    let processor = ImageProcessor::default();
    for name in FIXTURE_IMAGES {
        let meta = &json["images"][name];
        let img = processor
            .decode(&read_fixture(&format!("{name}.png")))
            .expect("decodes");
        let tiles = processor.tiles(&img);
        let want_u8 = json_strings(&meta["uint8_tile_sha256"]);
        let want_f32 = json_strings(&meta["pixel_values_f32_sha256"]);
        let want_sum = json_f64s(&meta["pixel_values_f32_sum"]);
        let want_abs = json_f64s(&meta["pixel_values_f32_abs_sum"]);
        assert_eq!(tiles.len(), want_u8.len());

        let pv = processor.preprocess(&img);
        assert_eq!(pv.num_tiles, tiles.len());
        assert_eq!(pv.shape(), [tiles.len(), 3, 448, 448]);
        assert_eq!(pv.data.len(), tiles.len() * 3 * 448 * 448);

        for (i, tile) in tiles.iter().enumerate() {
            assert_eq!(
                sha256_hex(&chw_bytes(tile)),
                want_u8[i],
                "{name} tile {i} uint8"
            );
            let values = tile_values(&pv, i);
            assert_eq!(
                sha256_hex(&f32_le_bytes(values)),
                want_f32[i],
                "{name} tile {i} float32"
            );
            // The sums are f64 reductions in an unknown order, so compare loosely.
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let abs: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
            assert!(
                (sum - want_sum[i]).abs() < 1e-6 * want_abs[i],
                "{name} tile {i} sum"
            );
            assert!(
                (abs - want_abs[i]).abs() < 1e-6 * want_abs[i],
                "{name} tile {i} abs sum"
            );
        }
    }
}

#[test]
fn tiles_match_reference_tensors() {
    let bytes = read_fixture("preprocess.safetensors");
    let tensors = SafeTensors::deserialize(&bytes).expect("safetensors parses");
    let processor = ImageProcessor::default();
    for name in FIXTURE_IMAGES {
        let img = processor
            .decode(&read_fixture(&format!("{name}.png")))
            .expect("decodes");
        let tiles = processor.tiles(&img);
        let pv = processor.preprocess(&img);
        let n = tiles.len();

        let stride7 = tensors
            .tensor(&format!("{name}.tiles_uint8_stride7"))
            .expect("stride-7 tensor");
        assert_eq!(stride7.shape(), &[n, 3, 64, 64]);
        let mut ours = Vec::with_capacity(n * 3 * 64 * 64);
        for tile in &tiles {
            for c in 0..3 {
                for y in (0..TILE_SIZE).step_by(7) {
                    for x in (0..TILE_SIZE).step_by(7) {
                        ours.push(tile.get_pixel(x, y).0[c]);
                    }
                }
            }
        }
        assert_eq!(ours, stride7.data(), "{name} stride-7 samples");

        let row0 = tensors
            .tensor(&format!("{name}.pixel_values_row0"))
            .expect("row0 tensor");
        assert_eq!(row0.shape(), &[n, 3, 1, 448]);
        let mut ours = Vec::with_capacity(n * 3 * 448 * 4);
        for i in 0..n {
            let values = tile_values(&pv, i);
            for c in 0..3 {
                let plane = &values[c * 448 * 448..];
                ours.extend(f32_le_bytes(&plane[..448]));
            }
        }
        assert_eq!(ours, row0.data(), "{name} first rows");

        let sums = tensors
            .tensor(&format!("{name}.pixel_values_sum"))
            .expect("sum tensor");
        assert_eq!(sums.shape(), &[n]);
        for (i, chunk) in sums.data().chunks_exact(8).enumerate() {
            let want = f64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let values = tile_values(&pv, i);
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let scale: f64 = values.iter().map(|&v| f64::from(v).abs()).sum();
            assert!((sum - want).abs() < 1e-6 * scale, "{name} tile {i} sum");
        }
    }
}

#[test]
fn stored_tile_pngs_match_exactly() {
    let json = reference_json();
    let processor = ImageProcessor::default();
    for name in FIXTURE_IMAGES {
        let img = processor
            .decode(&read_fixture(&format!("{name}.png")))
            .expect("decodes");
        let tiles = processor.tiles(&img);
        let stored = json["images"][name]["stored_tile_pngs"]
            .as_object()
            .expect("object");
        assert!(!stored.is_empty());
        for (index, file) in stored {
            let index: usize = index.parse().expect("tile index");
            let reference = processor
                .decode(&read_fixture(file.as_str().expect("path")))
                .expect("tile PNG decodes");
            assert!(
                reference == tiles[index],
                "{name} tile {index} differs from {file}"
            );
        }
    }
}

#[test]
fn grid_choice_for_hand_derived_sizes() {
    let cases = [
        // (width, height, max_tiles, expected)
        (600, 400, 6, (3, 2)), // 1.5 is an exact candidate
        (1200, 800, 6, (3, 2)),
        (800, 1200, 6, (2, 3)),
        (300, 200, 6, (3, 2)), // unique exact match wins regardless of area
        (512, 512, 6, (1, 1)), // 1x1 vs 2x2 tie, area 262144 <= 401408
        (633, 633, 6, (1, 1)), // 400689 <= 401408
        (634, 634, 6, (2, 2)), // 401956 > 401408
        (700, 700, 6, (2, 2)),
        (1000, 400, 6, (3, 1)), // 2.5: tie 2x1 vs 3x1, area 400000 > 301056
        (250, 100, 6, (2, 1)),  // same tie, area too small
        (700, 350, 6, (2, 1)),
        (448, 896, 6, (1, 2)),
        (100, 150, 6, (2, 3)),
        (100, 1000, 6, (1, 6)),
        (2000, 300, 6, (6, 1)),
        (10000, 1, 6, (6, 1)),
        (1, 10000, 6, (1, 6)),
        (600, 400, 4, (2, 1)), // ties 1x1/2x1/2x2 at 0.5; only 2x1 passes the area test
        (1500, 1000, 2, (2, 1)),
        (600, 400, 1, (1, 1)),
        (600, 400, 0, (1, 1)),  // no candidates: the official default
        (600, 400, 99, (3, 2)), // clamped to 6
    ];
    for (w, h, max_tiles, want) in cases {
        assert_eq!(
            choose_grid(w, h, max_tiles),
            want,
            "{w}x{h} max {max_tiles}"
        );
    }
    // Degenerate sizes must not panic.
    let _ = choose_grid(0, 0, 6);
    let _ = choose_grid(0, 5, 6);
    let _ = choose_grid(5, 0, 6);
    let _ = choose_grid(u32::MAX, u32::MAX, 6);
}

#[test]
fn single_tile_budget_gives_no_thumbnail() {
    let processor = ImageProcessor::new(1).expect("valid");
    let img = processor
        .decode(&read_fixture("coffee.png"))
        .expect("decodes");
    let tiles = processor.tiles(&img);
    assert_eq!(tiles.len(), 1);
    assert_eq!(tiles[0].dimensions(), (448, 448));
    assert!(tiles[0] == resize_bicubic(&img, 448, 448));
    let pv = processor.preprocess(&img);
    assert_eq!(pv.shape(), [1, 3, 448, 448]);
}

#[test]
fn thumbnail_can_be_disabled() {
    let processor = ImageProcessor {
        use_thumbnail: false,
        ..ImageProcessor::default()
    };
    let img = processor
        .decode(&read_fixture("coffee.png"))
        .expect("decodes");
    assert_eq!(processor.tiles(&img).len(), 6);
}

#[test]
fn processor_configuration() {
    let default = ImageProcessor::default();
    assert_eq!(default.max_tiles, 6);
    assert!(default.use_thumbnail);
    assert_eq!(default.max_pixels, DEFAULT_MAX_PIXELS);
    for n in 1..=6 {
        assert_eq!(ImageProcessor::new(n).expect("valid").max_tiles, n);
    }
    assert!(matches!(
        ImageProcessor::new(0),
        Err(ImageError::InvalidMaxTiles(0))
    ));
    assert!(matches!(
        ImageProcessor::new(7),
        Err(ImageError::InvalidMaxTiles(7))
    ));
}

#[test]
fn preprocess_bytes_and_open_agree_with_decode() {
    let processor = ImageProcessor::default();
    let bytes = read_fixture("coffee.png");
    let decoded = processor.decode(&bytes).expect("decodes");
    let opened = processor
        .open(fixture_dir().join("coffee.png"))
        .expect("opens");
    assert!(decoded == opened);
    let pv = processor.preprocess_bytes(&bytes).expect("preprocesses");
    assert_eq!(pv, processor.preprocess(&decoded));
    assert_eq!(pv.num_tiles, 7);
}

#[test]
fn open_error_names_the_path() {
    let path = fixture_dir().join("no-such-image.png");
    let err = ImageProcessor::default()
        .open(&path)
        .expect_err("missing file");
    assert!(matches!(err, ImageError::File { .. }));
    assert!(err.to_string().contains("no-such-image.png"), "{err}");
}

#[test]
fn truncated_png_is_an_error() {
    let bytes = read_fixture("coffee.png");
    let processor = ImageProcessor::default();
    for len in [bytes.len() / 2, 100, 40, 8] {
        let err = processor.decode(&bytes[..len]).expect_err("truncated");
        assert!(
            matches!(err, ImageError::Decode(_) | ImageError::Io(_)),
            "len {len}: {err:?}"
        );
    }
}

#[test]
fn non_image_data_is_an_error() {
    let processor = ImageProcessor::default();
    // A fixed xorshift stream: reproducible "random" bytes without a dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    assert!(matches!(
        processor.decode(&noise),
        Err(ImageError::UnknownFormat)
    ));
    assert!(matches!(
        processor.decode(b""),
        Err(ImageError::UnknownFormat)
    ));
    assert!(matches!(
        processor.decode(b"definitely not an image"),
        Err(ImageError::UnknownFormat)
    ));
    assert!(processor.preprocess_bytes(&noise).is_err());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

/// A well-formed PNG header announcing `width` x `height` RGB pixels, with an empty IDAT.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, adaptive filter, no interlace
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn oversized_header_is_rejected_before_allocating() {
    let processor = ImageProcessor::default();
    let png = png_claiming(100_000, 100_000);
    let err = processor.decode(&png).expect_err("too large");
    assert!(
        matches!(
            err,
            ImageError::TooLarge {
                width: 100_000,
                height: 100_000,
                max_pixels: DEFAULT_MAX_PIXELS
            }
        ),
        "{err:?}"
    );
    // 30 GB would have been needed; nothing in this binary legitimately allocates 256 MiB.
    assert!(LARGEST_ALLOCATION.load(Ordering::Relaxed) < 256 << 20);

    // The limit is configurable, and applies at the exact boundary.
    let small = ImageProcessor {
        max_pixels: 600 * 400 - 1,
        ..ImageProcessor::default()
    };
    assert!(matches!(
        small.decode(&read_fixture("coffee.png")),
        Err(ImageError::TooLarge {
            width: 600,
            height: 400,
            ..
        })
    ));
    let exact = ImageProcessor {
        max_pixels: 600 * 400,
        ..ImageProcessor::default()
    };
    assert!(exact.decode(&read_fixture("coffee.png")).is_ok());
}

#[test]
fn zero_sized_header_is_rejected() {
    let err = ImageProcessor::default()
        .decode(&png_claiming(0, 10))
        .expect_err("empty");
    assert!(
        matches!(err, ImageError::Empty { .. } | ImageError::Decode(_)),
        "{err:?}"
    );
}

fn encode_png(img: DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).expect("encodes");
    out.into_inner()
}

#[test]
fn colour_layouts_convert_like_pillow() {
    let processor = ImageProcessor::default();
    let (w, h) = (5, 3);
    let value = |x: u32, y: u32| (x * 40 + y * 7) as u8;

    // 8-bit grayscale: replicated.
    let gray = ImageBuffer::from_fn(w, h, |x, y| Luma([value(x, y)]));
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageLuma8(gray)))
        .expect("decodes");
    assert!(
        rgb.enumerate_pixels()
            .all(|(x, y, p)| p.0 == [value(x, y); 3])
    );

    // Grayscale + alpha: alpha dropped, not composited.
    let gray_alpha = ImageBuffer::from_fn(w, h, |x, y| LumaA([value(x, y), (x * 60) as u8]));
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageLumaA8(gray_alpha)))
        .expect("decodes");
    assert!(
        rgb.enumerate_pixels()
            .all(|(x, y, p)| p.0 == [value(x, y); 3])
    );

    // RGBA, including fully transparent pixels: the colour survives.
    let rgba = ImageBuffer::from_fn(w, h, |x, y| {
        Rgba([
            value(x, y),
            255 - value(x, y),
            17,
            if x == 0 { 0 } else { 128 },
        ])
    });
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageRgba8(rgba)))
        .expect("decodes");
    assert!(
        rgb.enumerate_pixels()
            .all(|(x, y, p)| p.0 == [value(x, y), 255 - value(x, y), 17])
    );

    // 16-bit grayscale opens as Pillow's I;16 and saturates at 255 when converted.
    let samples = [0u16, 7, 255, 256, 300, 0x1234, 0xFFFF];
    let gray16 = ImageBuffer::from_fn(samples.len() as u32, 1, |x, _| Luma([samples[x as usize]]));
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageLuma16(gray16)))
        .expect("decodes");
    let got: Vec<u8> = rgb.pixels().map(|p| p.0[0]).collect();
    assert_eq!(got, [0, 7, 255, 255, 255, 255, 255]);
    assert!(rgb.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));

    // 16-bit gray + alpha and 16-bit RGB(A): Pillow keeps the most significant byte.
    let gray_alpha16 = ImageBuffer::from_fn(samples.len() as u32, 1, |x, _| {
        LumaA([samples[x as usize], 0])
    });
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageLumaA16(gray_alpha16)))
        .expect("decodes");
    let got: Vec<u8> = rgb.pixels().map(|p| p.0[0]).collect();
    assert_eq!(got, [0, 0, 0, 1, 1, 0x12, 0xFF]);

    let rgb16 = ImageBuffer::from_fn(2, 1, |x, _| {
        Rgb(if x == 0 {
            [0xABCD, 0x00FF, 0x0100]
        } else {
            [0xFFFF, 0x8000, 0x7FFF]
        })
    });
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageRgb16(rgb16)))
        .expect("decodes");
    assert_eq!(rgb.get_pixel(0, 0).0, [0xAB, 0x00, 0x01]);
    assert_eq!(rgb.get_pixel(1, 0).0, [0xFF, 0x80, 0x7F]);

    let rgba16 = ImageBuffer::from_fn(1, 1, |_, _| Rgba([0x1234u16, 0x5678, 0x9ABC, 0]));
    let rgb = processor
        .decode(&encode_png(DynamicImage::ImageRgba16(rgba16)))
        .expect("decodes");
    assert_eq!(rgb.get_pixel(0, 0).0, [0x12, 0x56, 0x9A]);
}

#[test]
fn bmp_round_trip() {
    let processor = ImageProcessor::default();
    let coffee = processor
        .decode(&read_fixture("coffee.png"))
        .expect("decodes");
    let mut bmp = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(coffee.clone())
        .write_to(&mut bmp, ImageFormat::Bmp)
        .expect("encodes");
    assert!(processor.decode(bmp.get_ref()).expect("decodes") == coffee);
}

fn test_pattern(w: u32, h: u32) -> RgbImage {
    // Hard edges and a gradient, so the kernel's negative lobes clip at 0 and 255.
    RgbImage::from_fn(w, h, |x, y| {
        let checker = if (x / 3 + y / 2) % 2 == 0 { 255 } else { 0 };
        Rgb([
            checker,
            ((x * 255) / w.max(1)) as u8,
            ((x * y * 13) % 256) as u8,
        ])
    })
}

fn transpose(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.height(), img.width(), |x, y| *img.get_pixel(y, x))
}

#[test]
fn resize_passes_follow_pillows_order() {
    let img = test_pattern(37, 23);
    // The height shrinks by at most twice the width's shrink: horizontal pass into a u8
    // image, then vertical, gives the same bytes as one call.
    for (w, h) in [(13, 50), (5, 3), (100, 100), (80, 23), (20, 9)] {
        let full = resize_bicubic(&img, w, h);
        assert_eq!(full.dimensions(), (w, h));
        let staged = resize_bicubic(&resize_bicubic(&img, w, img.height()), w, h);
        assert!(full == staged, "{w}x{h} horizontal first");
    }
    // The height shrinks by more (a portrait photo to a square tile, say): vertical first.
    for (w, h) in [(61, 11), (50, 3), (40, 5), (30, 2)] {
        let full = resize_bicubic(&img, w, h);
        assert_eq!(full.dimensions(), (w, h));
        let staged = resize_bicubic(&resize_bicubic(&img, img.width(), h), w, h);
        assert!(full == staged, "{w}x{h} vertical first");
        let other = resize_bicubic(&resize_bicubic(&img, w, img.height()), w, h);
        assert!(full != other, "{w}x{h}: the order shows in the bytes");
    }
    // Each pass is the other one on the transposed image.
    for (w, h) in [(61, 23), (13, 23), (37, 50), (37, 7)] {
        let direct = resize_bicubic(&img, w, h);
        let via_transpose = transpose(&resize_bicubic(&transpose(&img), h, w));
        assert!(direct == via_transpose, "{w}x{h}");
    }
}

/// The noise image of `tests/fixtures/pillow_resize/make.py`: a hash of (x, y, channel, seed).
fn hashed_noise(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb(std::array::from_fn(|c| {
            let mut v = x.wrapping_mul(73_856_093)
                ^ y.wrapping_mul(19_349_663)
                ^ (c as u32).wrapping_mul(83_492_791)
                ^ seed;
            v = (v ^ (v >> 15)).wrapping_mul(2_246_822_519);
            v = (v ^ (v >> 13)).wrapping_mul(3_266_489_917);
            v ^= v >> 16;
            (v >> 24) as u8
        }))
    })
}

#[test]
fn tiles_match_pillow_for_every_size_and_aspect() {
    let path = fixture_dir().join("../../pillow_resize/cases.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_slice(&text).expect("cases.json parses");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 60, "the grid of sizes is in the fixture");
    let mut failures = Vec::new();
    let mut images = std::collections::HashMap::new();
    for case in cases {
        let n = |k: &str| case[k].as_u64().expect("number") as u32;
        let (width, height, seed, max_tiles) = (n("width"), n("height"), n("seed"), n("max_tiles"));
        let img = images
            .entry((width, height, seed))
            .or_insert_with(|| hashed_noise(width, height, seed));
        let processor = ImageProcessor::new(max_tiles as usize).expect("valid budget");
        let grid = choose_grid(width, height, max_tiles as usize);
        let want_grid = (n_at(&case["grid"], 0), n_at(&case["grid"], 1));
        assert_eq!(grid, want_grid, "{width}x{height}, max {max_tiles}: grid");
        let tiles = processor.tiles(img);
        let want = case["tiles"].as_array().expect("tiles");
        assert_eq!(tiles.len(), want.len(), "{width}x{height}: tile count");
        for (i, (tile, reference)) in tiles.iter().zip(want).enumerate() {
            let sum: u64 = tile.as_raw().iter().map(|&b| u64::from(b)).sum();
            if sha256_hex(tile.as_raw()) != reference["sha256"].as_str().expect("hash") {
                failures.push(format!(
                    "{width}x{height} max {max_tiles} tile {i}: byte sum {sum}, Pillow's {}",
                    reference["sum"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} tile(s) differ from Pillow {}:\n{}",
        failures.len(),
        doc["pillow"],
        failures.join("\n")
    );
}

fn n_at(v: &serde_json::Value, i: usize) -> u32 {
    v[i].as_u64().expect("number") as u32
}

#[test]
fn resize_edge_cases() {
    let img = test_pattern(31, 17);
    assert!(resize_bicubic(&img, 31, 17) == img);
    let flat = RgbImage::from_pixel(29, 13, Rgb([10, 128, 250]));
    for (w, h) in [(1, 1), (7, 100), (300, 2), (29, 40), (448, 448)] {
        let out = resize_bicubic(&flat, w, h);
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
    }
    assert_eq!(resize_bicubic(&img, 0, 5).dimensions(), (0, 5));
    let empty = RgbImage::new(0, 0);
    let out = resize_bicubic(&empty, 4, 4);
    assert!(out.pixels().all(|p| p.0 == [0, 0, 0]));
    // Tiling a degenerate image must not panic either.
    assert_eq!(ImageProcessor::default().tiles(&empty).len(), 1);
}

#[test]
fn bf16_rounding_matches_torch() {
    let mut values = [
        1.0f32,
        1.0 + f32::EPSILON, // rounds down
        1.0 + 1.0 / 256.0,  // tie, even neighbour is 1.0
        1.0 + 3.0 / 256.0,  // tie, even neighbour is 1.015625
        -(1.0 + 3.0 / 256.0),
        0.1,
        f32::MAX, // beyond bf16 range: infinity, as in torch
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        f32::MIN_POSITIVE,
    ];
    round_to_bf16(&mut values);
    assert_eq!(values[0], 1.0);
    assert_eq!(values[1], 1.0);
    assert_eq!(values[2], 1.0);
    assert_eq!(values[3], 1.015_625);
    assert_eq!(values[4], -1.015_625);
    assert_eq!(values[5].to_bits(), 0x3DCD_0000); // 0.1 = 0x3DCCCCCD rounds up
    assert_eq!(values[6], f32::INFINITY);
    assert_eq!(values[7], f32::INFINITY);
    assert_eq!(values[8], f32::NEG_INFINITY);
    assert_eq!(values[9].to_bits(), (-0.0f32).to_bits());
    assert_eq!(values[10], f32::MIN_POSITIVE);
    assert!(values.iter().all(|v| v.to_bits() & 0xFFFF == 0));

    let mut nan = [f32::NAN, f32::from_bits(0x7F80_0001)];
    round_to_bf16(&mut nan);
    assert!(nan.iter().all(|v| v.is_nan()));

    // Rounding is idempotent on real pixel values.
    let pv = ImageProcessor::default()
        .preprocess_bytes(&read_fixture("astronaut.png"))
        .expect("preprocesses");
    let mut once = pv.data.clone();
    round_to_bf16(&mut once);
    let mut twice = once.clone();
    round_to_bf16(&mut twice);
    assert_eq!(once, twice);
    assert!(once.iter().zip(&pv.data).any(|(a, b)| a != b));
}
