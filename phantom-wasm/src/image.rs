//! Canvas pixels → the image processor's RGB input.
//!
//! A page reads pictures through a canvas as straight (non-premultiplied) RGBA bytes. The
//! released pipeline opens images with Pillow and calls `convert("RGB")`, which drops the alpha
//! channel without blending; this does the same, so an opaque picture gives the processor the
//! bytes the native CLI decodes from the file.

use phantom_model::processor::image::RgbImage;

use crate::error::{Result, WasmError};

/// An RGB image from `width × height` RGBA bytes, refusing more than `max_pixels` pixels.
pub fn rgb_from_rgba(width: u32, height: u32, rgba: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(WasmError::Input(format!(
            "the image is empty ({width}×{height})"
        )));
    }
    if pixels > max_pixels {
        return Err(WasmError::Input(format!(
            "the image has {pixels} pixels, more than the {max_pixels} accepted"
        )));
    }
    if rgba.len() as u64 != pixels * 4 {
        return Err(WasmError::Input(format!(
            "{} bytes of pixels for a {width}×{height} RGBA image (expected {})",
            rgba.len(),
            pixels * 4
        )));
    }
    let rgb: Vec<u8> = rgba
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| WasmError::Input("the pixel buffer does not match its size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_is_dropped_not_blended() {
        let rgba = [10, 20, 30, 255, 40, 50, 60, 0];
        let img = rgb_from_rgba(2, 1, &rgba, 100).unwrap();
        assert_eq!(img.as_raw(), &[10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(rgb_from_rgba(0, 1, &[], 100).is_err());
        assert!(rgb_from_rgba(2, 2, &[0; 15], 100).is_err());
        assert!(rgb_from_rgba(20, 20, &[0; 1600], 100).is_err());
    }
}
