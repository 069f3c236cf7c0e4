//! `phantom-infer preprocess`: an image through the released tiling and normalisation, written
//! as `pixel_values` for comparison with the Python pipeline.

use std::path::PathBuf;

use clap::Args;
use phantom_infer::io::write_f32;
use phantom_model::processor::image::ImageProcessor;

/// Arguments of `preprocess`.
#[derive(Args, Debug)]
pub struct PreprocessArgs {
    /// The image.
    #[arg(long)]
    image: PathBuf,
    /// Most tiles (1–6).
    #[arg(long, default_value_t = 6)]
    max_tiles: usize,
    /// Output safetensors file (`pixel_values`, f32 [N, 3, 448, 448]).
    #[arg(long)]
    out: PathBuf,
}

/// `phantom-infer preprocess`.
pub fn preprocess(args: PreprocessArgs) -> anyhow::Result<()> {
    let processor = ImageProcessor::new(args.max_tiles)?;
    let image = processor.open(&args.image)?;
    let pixels = processor.preprocess(&image);
    let shape = pixels.shape().to_vec();
    write_f32(&args.out, &[("pixel_values", shape, pixels.data)])?;
    eprintln!("{} tile(s) → {}", pixels.num_tiles, args.out.display());
    Ok(())
}
