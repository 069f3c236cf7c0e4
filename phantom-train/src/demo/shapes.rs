//! A built-in preference data set of coloured shapes, small enough to train a tiny Phantom
//! model from scratch on a CPU in minutes.
//!
//! Each sample is a small RGB image of filled shapes (circle, square, triangle) in well
//! separated colours on a light background, with a question about it, a correct (chosen)
//! answer and a rejected one. Counting questions show one to three shapes; questions about a
//! shape's colour, kind or side show that one shape, large: a model this small, trained for
//! minutes, learns what a picture shows, but not which of several shapes a question points
//! at. As in Phantom's preference triples, the rejected answer is usually a plausible but
//! wrong answer in the same sentence form, and otherwise a vague non-answer.
//!
//! Questions come from one fixed template per [`QuestionKind`] and answers are short and
//! uniform, so that a tiny model can learn them; the word that decides correctness is kept in
//! [`ShapeSample::key`] and can be found in any answer text with [`answer_key`]. Scenes are
//! laid out in coordinates relative to the image side, so one seed gives the same scenes,
//! questions and answers at every image size.
//!
//! Questions carry no `<image>` placeholder; the prompt builder adds it.

use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// Smallest and largest side of a shape, relative to the image side: three fit side by side
/// in two rows, and one fits in either half. Smaller shapes span too few 14-pixel patches of
/// the demo's 112-pixel tile to tell a circle from a square.
const SIZE_RANGE: (f32, f32) = (0.38, 0.45);
/// The same for a lone shape asked about by colour or kind.
const LONE_SIZE_RANGE: (f32, f32) = (0.5, 0.7);
/// Free border around the scene, relative to the image side.
const MARGIN: f32 = 0.03;
/// Least gap between the bounding boxes of two shapes, relative to the image side.
const GAP: f32 = 0.04;
/// Share of rejected answers that are wrong in the same form; the rest are vague.
const WRONG_SHARE: f64 = 0.7;
/// Random placement tries per shape before a scene is started over.
const PLACEMENT_TRIES: usize = 64;
/// Scene restarts before the fixed fallback layout is used.
const SCENE_TRIES: usize = 32;

/// What a question asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuestionKind {
    /// "What colour is the circle?" — asked about a shape that occurs once.
    Colour,
    /// "What shape is the red object?" — asked about a colour that occurs once.
    Shape,
    /// "How many shapes are there?"
    Count,
    /// "Is the red square on the left or the right?" — two shapes, one in each half.
    Position,
}

impl QuestionKind {
    /// Every kind, in the order [`generate`] cycles through them.
    pub const ALL: [Self; 4] = [Self::Colour, Self::Shape, Self::Count, Self::Position];

    /// Lower-case name, as written to the `kind` field of the JSONL file.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Colour => "colour",
            Self::Shape => "shape",
            Self::Count => "count",
            Self::Position => "position",
        }
    }

    /// The words that can answer a question of this kind.
    #[must_use]
    pub fn answer_words(self) -> &'static [&'static str] {
        match self {
            Self::Colour => &COLOUR_NAMES,
            Self::Shape => &SHAPE_NAMES,
            Self::Count => &COUNT_WORDS,
            Self::Position => &SIDES,
        }
    }
}

impl fmt::Display for QuestionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A shape that can be drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShapeKind {
    /// A disc filling its bounding square.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An upright isosceles triangle with its base at the bottom of the bounding square.
    Triangle,
}

const SHAPE_NAMES: [&str; 3] = ["circle", "square", "triangle"];

impl ShapeKind {
    /// Every shape.
    pub const ALL: [Self; 3] = [Self::Circle, Self::Square, Self::Triangle];

    /// Lower-case name used in questions and answers.
    #[must_use]
    pub fn name(self) -> &'static str {
        SHAPE_NAMES[self as usize]
    }
}

/// A colour of the palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow (a dark gold, to stand out from the light background).
    Yellow,
    /// Purple.
    Purple,
}

const COLOUR_NAMES: [&str; 5] = ["red", "green", "blue", "yellow", "purple"];
const COUNT_WORDS: [&str; 3] = ["one", "two", "three"];
const SIDES: [&str; 2] = ["left", "right"];

impl Colour {
    /// Every colour.
    pub const ALL: [Self; 5] = [
        Self::Red,
        Self::Green,
        Self::Blue,
        Self::Yellow,
        Self::Purple,
    ];

    /// Lower-case name used in questions and answers.
    #[must_use]
    pub fn name(self) -> &'static str {
        COLOUR_NAMES[self as usize]
    }

    /// Nominal RGB value; drawn shapes deviate from it by a little noise.
    #[must_use]
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [215, 40, 40],
            Self::Green => [40, 160, 60],
            Self::Blue => [40, 80, 215],
            Self::Yellow => [220, 180, 0],
            Self::Purple => [140, 50, 175],
        }
    }
}

/// One shape of a scene, in coordinates relative to the image side (0 = left/top edge,
/// 1 = right/bottom edge).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeObject {
    /// Which shape.
    pub shape: ShapeKind,
    /// Its colour.
    pub colour: Colour,
    /// Centre of its bounding square.
    pub centre: (f32, f32),
    /// Side of its bounding square.
    pub size: f32,
}

impl ShapeObject {
    /// Bounding square as `(left, top, right, bottom)`.
    #[must_use]
    pub fn bounds(&self) -> (f32, f32, f32, f32) {
        let h = self.size / 2.0;
        let (x, y) = self.centre;
        (x - h, y - h, x + h, y + h)
    }

    /// Whether the point `(x, y)` (relative coordinates) lies inside the shape.
    #[must_use]
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let h = self.size / 2.0;
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        match self.shape {
            ShapeKind::Circle => dx * dx + dy * dy <= h * h,
            ShapeKind::Square => dx.abs() <= h && dy.abs() <= h,
            // Apex at the top centre; the half-width grows by 1/2 per unit of depth.
            ShapeKind::Triangle => dy.abs() <= h && dx.abs() <= (dy + h) / 2.0,
        }
    }

    /// A point well inside the shape (the centroid for a triangle).
    #[must_use]
    pub fn interior_point(&self) -> (f32, f32) {
        match self.shape {
            ShapeKind::Triangle => (self.centre.0, self.centre.1 + self.size / 6.0),
            ShapeKind::Circle | ShapeKind::Square => self.centre,
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        let (l0, t0, r0, b0) = self.bounds();
        let (l1, t1, r1, b1) = other.bounds();
        l0 < r1 + GAP && l1 < r0 + GAP && t0 < b1 + GAP && t1 < b0 + GAP
    }
}

/// One generated preference triple with its image.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeSample {
    /// The rendered scene.
    pub image: RgbImage,
    /// The question, without an image placeholder.
    pub question: String,
    /// A short correct answer.
    pub chosen: String,
    /// A wrong or vague answer.
    pub rejected: String,
    /// What the question asks about.
    pub kind: QuestionKind,
    /// The word a correct answer contains (e.g. `red`, `circle`, `two`, `left`).
    pub key: String,
    /// The shapes of the scene, in drawing order.
    pub objects: Vec<ShapeObject>,
}

impl ShapeSample {
    /// Whether `answer` gives this sample's key word (see [`answer_key`]).
    #[must_use]
    pub fn is_correct(&self, answer: &str) -> bool {
        answer_key(answer, self.kind).as_deref() == Some(self.key.as_str())
    }
}

/// The answer word of kind `kind` that `text` gives, or `None` when it gives none or several
/// different ones (a vague or hedging answer). Matching is by whole word and ignores case;
/// digits count as number words.
#[must_use]
pub fn answer_key(text: &str, kind: QuestionKind) -> Option<String> {
    let vocabulary = kind.answer_words();
    let mut found: Option<&str> = None;
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        let word = word.to_lowercase();
        let word = match (kind, word.as_str()) {
            (QuestionKind::Count, "1") => "one",
            (QuestionKind::Count, "2") => "two",
            (QuestionKind::Count, "3") => "three",
            _ => word.as_str(),
        };
        if let Some(&hit) = vocabulary.iter().find(|&&v| v == word) {
            match found {
                Some(previous) if previous != hit => return None,
                _ => found = Some(hit),
            }
        }
    }
    found.map(str::to_string)
}

/// Generates `count` samples, cycling through the question kinds so that they are balanced.
///
/// The result depends only on `(count, seed, image_size)`, and scenes and texts do not depend
/// on `image_size` at all. `image_size` is the side of the square images in pixels; sizes from
/// 56 to 448 give shapes that span several 14-pixel patches.
#[must_use]
pub fn generate(count: usize, seed: u64, image_size: u32) -> Vec<ShapeSample> {
    generate_kinds(count, seed, image_size, &QuestionKind::ALL)
}

/// [`generate`] with questions of the given kinds only (cycled; all kinds when empty).
#[must_use]
pub fn generate_kinds(
    count: usize,
    seed: u64,
    image_size: u32,
    kinds: &[QuestionKind],
) -> Vec<ShapeSample> {
    let kinds = if kinds.is_empty() {
        &QuestionKind::ALL[..]
    } else {
        kinds
    };
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| sample(kinds[i % kinds.len()], &mut rng, image_size))
        .collect()
}

fn sample(kind: QuestionKind, rng: &mut StdRng, image_size: u32) -> ShapeSample {
    let texts = match kind {
        QuestionKind::Colour => colour_question(rng),
        QuestionKind::Shape => shape_question(rng),
        QuestionKind::Count => count_question(rng),
        QuestionKind::Position => position_question(rng),
    };
    let image = render(&texts.objects, rng, image_size);
    ShapeSample {
        image,
        question: texts.question,
        chosen: texts.chosen,
        rejected: texts.rejected,
        kind,
        key: texts.key.to_string(),
        objects: texts.objects,
    }
}

/// A scene with its question and answers, before rendering.
struct Texts {
    objects: Vec<ShapeObject>,
    question: String,
    chosen: String,
    rejected: String,
    key: &'static str,
}

/// Picks the rejected answer: mostly `wrong`, otherwise one of the `vague` ones.
fn rejected(rng: &mut StdRng, wrong: String, vague: &[&str]) -> String {
    if rng.random_bool(WRONG_SHARE) {
        wrong
    } else {
        vague.choose(rng).map_or(wrong, |v| (*v).to_string())
    }
}

/// A value of `all` other than `not`.
fn other<T: Copy + PartialEq>(rng: &mut StdRng, all: &[T], not: T) -> T {
    let others: Vec<T> = all.iter().copied().filter(|&v| v != not).collect();
    others.choose(rng).copied().unwrap_or(not)
}

fn pick<T: Copy>(rng: &mut StdRng, all: &[T]) -> T {
    // Every list passed in is a non-empty constant.
    all[rng.random_range(0..all.len())]
}

fn colour_question(rng: &mut StdRng) -> Texts {
    let shape = pick(rng, &ShapeKind::ALL);
    let colour = pick(rng, &Colour::ALL);
    let objects = place(rng, &[(shape, colour, Span::Anywhere)], LONE_SIZE_RANGE);
    let wrong = other(rng, &Colour::ALL, colour);
    let (s, c) = (shape.name(), colour.name());
    Texts {
        objects,
        question: format!("What colour is the {s}?"),
        chosen: format!("The {s} is {c}."),
        rejected: rejected(
            rng,
            format!("The {s} is {}.", wrong.name()),
            &["It is hard to tell.", "It has some colour."],
        ),
        key: c,
    }
}

fn shape_question(rng: &mut StdRng) -> Texts {
    let shape = pick(rng, &ShapeKind::ALL);
    let colour = pick(rng, &Colour::ALL);
    let objects = place(rng, &[(shape, colour, Span::Anywhere)], LONE_SIZE_RANGE);
    let wrong = other(rng, &ShapeKind::ALL, shape);
    let (s, c) = (shape.name(), colour.name());
    Texts {
        objects,
        question: format!("What shape is the {c} object?"),
        chosen: format!("The {c} object is a {s}."),
        rejected: rejected(
            rng,
            format!("The {c} object is a {}.", wrong.name()),
            &["It is hard to tell.", "It is some kind of shape."],
        ),
        key: s,
    }
}

fn count_question(rng: &mut StdRng) -> Texts {
    let n: usize = rng.random_range(1..=3);
    let kinds: Vec<_> = (0..n)
        .map(|_| {
            let shape = pick(rng, &ShapeKind::ALL);
            let colour = pick(rng, &Colour::ALL);
            (shape, colour, Span::Anywhere)
        })
        .collect();
    let objects = place(rng, &kinds, SIZE_RANGE);
    let wrong = other(rng, &[1, 2, 3], n);
    Texts {
        objects,
        question: "How many shapes are there?".to_string(),
        chosen: count_sentence(n),
        rejected: rejected(
            rng,
            count_sentence(wrong),
            &["It is hard to tell.", "There are some shapes."],
        ),
        key: COUNT_WORDS[n - 1],
    }
}

fn count_sentence(n: usize) -> String {
    match n {
        1 => "There is one shape.".to_string(),
        _ => format!("There are {} shapes.", COUNT_WORDS[n - 1]),
    }
}

fn position_question(rng: &mut StdRng) -> Texts {
    let shape = pick(rng, &ShapeKind::ALL);
    let colour = pick(rng, &Colour::ALL);
    let on_left = rng.random_bool(0.5);
    let span = if on_left { Span::Left } else { Span::Right };
    let objects = place(rng, &[(shape, colour, span)], SIZE_RANGE);
    let (side, wrong) = if on_left {
        (SIDES[0], SIDES[1])
    } else {
        (SIDES[1], SIDES[0])
    };
    let (s, c) = (shape.name(), colour.name());
    Texts {
        objects,
        question: format!("Is the {c} {s} on the left or the right?"),
        chosen: format!("It is on the {side}."),
        rejected: rejected(
            rng,
            format!("It is on the {wrong}."),
            &["It is hard to tell.", "It is somewhere in the image."],
        ),
        key: side,
    }
}

/// Where a shape may lie horizontally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Span {
    /// Anywhere in the image.
    Anywhere,
    /// Wholly in the left half.
    Left,
    /// Wholly in the right half.
    Right,
}

/// Places the given shapes without overlap, each within its span, with sides drawn from
/// `sizes`.
fn place(
    rng: &mut StdRng,
    kinds: &[(ShapeKind, Colour, Span)],
    sizes: (f32, f32),
) -> Vec<ShapeObject> {
    for _ in 0..SCENE_TRIES {
        let mut objects: Vec<ShapeObject> = Vec::with_capacity(kinds.len());
        for &(shape, colour, span) in kinds {
            let size = rng.random_range(sizes.0..=sizes.1);
            let (x_min, x_max) = match span {
                Span::Left => (MARGIN, 0.5 - GAP / 2.0 - size),
                Span::Right => (0.5 + GAP / 2.0, 1.0 - MARGIN - size),
                Span::Anywhere => (MARGIN, 1.0 - MARGIN - size),
            };
            let y_max = 1.0 - MARGIN - size;
            let placed = (0..PLACEMENT_TRIES).find_map(|_| {
                let left = rng.random_range(x_min..=x_max.max(x_min));
                let top = rng.random_range(MARGIN..=y_max);
                let object = ShapeObject {
                    shape,
                    colour,
                    centre: (left + size / 2.0, top + size / 2.0),
                    size,
                };
                (!objects.iter().any(|o| o.overlaps(&object))).then_some(object)
            });
            match placed {
                Some(object) => objects.push(object),
                None => break,
            }
        }
        if objects.len() == kinds.len() {
            return objects;
        }
    }
    fallback_layout(kinds, sizes.0)
}

/// A fixed layout that always fits shapes of the smallest size: a lone one in the middle or
/// its half, up to three in two rows (rarely reached, but it keeps `place` total).
fn fallback_layout(kinds: &[(ShapeKind, Colour, Span)], size: f32) -> Vec<ShapeObject> {
    const SLOTS: [(f32, f32); 3] = [(0.25, 0.25), (0.75, 0.25), (0.5, 0.75)];
    const MIDDLE: [(f32, f32); 1] = [(0.5, 0.5)];
    let slots: &[(f32, f32)] = if kinds.len() == 1 { &MIDDLE } else { &SLOTS };
    kinds
        .iter()
        .zip(slots)
        .map(|(&(shape, colour, span), &slot)| {
            let centre = match span {
                Span::Left => (0.25, 0.5),
                Span::Right => (0.75, 0.5),
                Span::Anywhere => slot,
            };
            ShapeObject {
                shape,
                colour,
                centre,
                size,
            }
        })
        .collect()
}

/// Draws the scene on a slightly varying light background, with 2×2 supersampled edges.
fn render(objects: &[ShapeObject], rng: &mut StdRng, image_size: u32) -> RgbImage {
    let base: i16 = rng.random_range(232..=250);
    let background = Rgb([0, 1, 2].map(|_| channel(base + rng.random_range(-4..=4))));
    let mut image = RgbImage::from_pixel(image_size, image_size, background);
    let side = image_size as f32;
    for object in objects {
        let nominal = object.colour.rgb();
        let colour = nominal.map(|c| channel(i16::from(c) + rng.random_range(-10..=10)));
        let (left, top, right, bottom) = object.bounds();
        let x_range = pixel_range(left, right, image_size);
        let y_range = pixel_range(top, bottom, image_size);
        for py in y_range {
            for px in x_range.clone() {
                let covered = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
                    .iter()
                    .filter(|(ox, oy)| {
                        object.contains((px as f32 + ox) / side, (py as f32 + oy) / side)
                    })
                    .count();
                if covered > 0 {
                    let pixel = image.get_pixel_mut(px, py);
                    *pixel = blend(*pixel, colour, covered as f32 / 4.0);
                }
            }
        }
    }
    image
}

/// Pixels that a relative span `[from, to]` touches, clamped to the image.
fn pixel_range(from: f32, to: f32, image_size: u32) -> std::ops::Range<u32> {
    let side = image_size as f32;
    let start = (from * side).floor().max(0.0) as u32;
    let end = ((to * side).ceil().max(0.0) as u32).min(image_size);
    start..end
}

fn channel(value: i16) -> u8 {
    value.clamp(0, 255) as u8
}

fn blend(under: Rgb<u8>, over: [u8; 3], alpha: f32) -> Rgb<u8> {
    let mut out = [0u8; 3];
    for ((o, &u), &v) in out.iter_mut().zip(&under.0).zip(&over) {
        *o = (f32::from(u) * (1.0 - alpha) + f32::from(v) * alpha).round() as u8;
    }
    Rgb(out)
}

/// One line of the JSONL file written by [`write_jsonl`].
#[derive(serde::Serialize)]
struct Record<'a> {
    image: String,
    question: &'a str,
    chosen: &'a str,
    rejected: &'a str,
    kind: &'static str,
    key: &'a str,
}

/// Writes `samples` as `dir/{name}.jsonl` plus one PNG per sample in
/// `dir/images/{name}_{i:05}.png`, and returns the path of the JSONL file.
///
/// Each line holds `image` (relative to `dir`, so the file reads back with the data file's
/// directory as image root), `question`, `chosen`, `rejected`, `kind` and `key`. `name` should
/// be a plain file-name stem. Directories are created as needed.
///
/// # Errors
///
/// Any failure to create the directories or to write a file; PNG encoding errors come as
/// [`io::ErrorKind::Other`].
pub fn write_jsonl(dir: &Path, samples: &[ShapeSample], name: &str) -> io::Result<PathBuf> {
    let images = dir.join("images");
    fs::create_dir_all(&images)?;
    let jsonl = dir.join(format!("{name}.jsonl"));
    let mut out = BufWriter::new(fs::File::create(&jsonl)?);
    for (i, sample) in samples.iter().enumerate() {
        let file = format!("{name}_{i:05}.png");
        sample
            .image
            .save_with_format(images.join(&file), ImageFormat::Png)
            .map_err(io::Error::other)?;
        let record = Record {
            image: format!("images/{file}"),
            question: &sample.question,
            chosen: &sample.chosen,
            rejected: &sample.rejected,
            kind: sample.kind.name(),
            key: &sample.key,
        };
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(jsonl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_after<'a>(text: &'a str, before: &str) -> &'a str {
        let rest = &text[text.find(before).unwrap() + before.len()..];
        rest.split(|c: char| !c.is_alphanumeric()).next().unwrap()
    }

    fn shape_named(name: &str) -> ShapeKind {
        *ShapeKind::ALL.iter().find(|s| s.name() == name).unwrap()
    }

    fn colour_named(name: &str) -> Colour {
        *Colour::ALL.iter().find(|c| c.name() == name).unwrap()
    }

    /// The correct key of a sample, worked out from its question and its layout alone.
    fn derive_key(sample: &ShapeSample) -> String {
        let q = &sample.question;
        let objects = &sample.objects;
        match sample.kind {
            QuestionKind::Colour => {
                let shape = shape_named(word_after(q, "the "));
                let hits: Vec<_> = objects.iter().filter(|o| o.shape == shape).collect();
                assert_eq!(hits.len(), 1, "{q}: {objects:?}");
                hits[0].colour.name().to_string()
            }
            QuestionKind::Shape => {
                let colour = colour_named(word_after(q, "the "));
                let hits: Vec<_> = objects.iter().filter(|o| o.colour == colour).collect();
                assert_eq!(hits.len(), 1, "{q}: {objects:?}");
                hits[0].shape.name().to_string()
            }
            QuestionKind::Count => COUNT_WORDS[objects.len() - 1].to_string(),
            QuestionKind::Position => {
                assert_eq!(objects.len(), 1, "{q}: {objects:?}");
                let colour = colour_named(word_after(q, "the "));
                let shape = shape_named(word_after(q, &format!("{} ", colour.name())));
                let target = objects[0];
                assert_eq!((target.colour, target.shape), (colour, shape), "{q}");
                // The shape lies wholly in one half.
                let (left, _, right, _) = target.bounds();
                if right <= 0.5 {
                    "left".to_string()
                } else {
                    assert!(left >= 0.5, "{q}: {objects:?}");
                    "right".to_string()
                }
            }
        }
    }

    #[test]
    fn deterministic() {
        let a = generate(40, 7, 112);
        let b = generate(40, 7, 112);
        assert_eq!(a, b);
        let c = generate(40, 8, 112);
        assert_ne!(a, c);
    }

    #[test]
    fn scenes_do_not_depend_on_image_size() {
        let small = generate(20, 3, 56);
        let large = generate(20, 3, 448);
        for (s, l) in small.iter().zip(&large) {
            assert_eq!(s.question, l.question);
            assert_eq!(s.chosen, l.chosen);
            assert_eq!(s.rejected, l.rejected);
            assert_eq!(s.objects, l.objects);
            assert_eq!(s.image.dimensions(), (56, 56));
            assert_eq!(l.image.dimensions(), (448, 448));
        }
    }

    #[test]
    fn shapes_inside_bounds_and_apart() {
        for sample in generate(2000, 11, 112) {
            let objects = &sample.objects;
            assert!((1..=3).contains(&objects.len()));
            for (i, o) in objects.iter().enumerate() {
                let (l, t, r, b) = o.bounds();
                assert!(l >= MARGIN - 1e-6 && t >= MARGIN - 1e-6, "{o:?}");
                assert!(
                    r <= 1.0 - MARGIN + 1e-6 && b <= 1.0 - MARGIN + 1e-6,
                    "{o:?}"
                );
                let (lo, hi) = match sample.kind {
                    QuestionKind::Colour | QuestionKind::Shape => LONE_SIZE_RANGE,
                    QuestionKind::Count | QuestionKind::Position => SIZE_RANGE,
                };
                assert!((lo..=hi).contains(&o.size), "{o:?}");
                for p in &objects[i + 1..] {
                    assert!(!o.overlaps(p), "{o:?} overlaps {p:?}");
                }
            }
        }
    }

    #[test]
    fn answers_match_the_layout() {
        for sample in generate(1000, 5, 112) {
            let key = derive_key(&sample);
            assert_eq!(sample.key, key, "{sample:?}");
            assert_eq!(answer_key(&sample.chosen, sample.kind), Some(key.clone()));
            assert!(sample.is_correct(&sample.chosen));
            assert!(!sample.is_correct(&sample.rejected), "{}", sample.rejected);
        }
    }

    #[test]
    fn image_shows_the_layout() {
        for size in [56, 112, 448] {
            for sample in generate(200, 9, size) {
                for object in &sample.objects {
                    let (x, y) = object.interior_point();
                    let px = (x * size as f32) as u32;
                    let py = (y * size as f32) as u32;
                    let pixel = sample.image.get_pixel(px, py).0;
                    let nominal = object.colour.rgb();
                    for (p, n) in pixel.iter().zip(nominal) {
                        assert!(p.abs_diff(n) <= 10, "{pixel:?} vs {nominal:?}");
                    }
                }
                // A corner is background: light grey.
                let corner = sample.image.get_pixel(0, 0).0;
                assert!(corner.iter().all(|&c| c >= 228), "{corner:?}");
            }
        }
    }

    #[test]
    fn kinds_are_balanced() {
        let samples = generate(400, 1, 56);
        for kind in QuestionKind::ALL {
            assert_eq!(samples.iter().filter(|s| s.kind == kind).count(), 100);
        }
        let counts = samples.iter().filter(|s| s.kind == QuestionKind::Count);
        for n in 1..=3 {
            let with_n = counts.clone().filter(|s| s.objects.len() == n).count();
            assert!((20..=47).contains(&with_n), "{n} shapes: {with_n}");
        }
    }

    #[test]
    fn rejected_answers_mix_wrong_and_vague() {
        let samples = generate(1000, 2, 56);
        let mut vague = 0;
        for sample in &samples {
            assert_ne!(sample.rejected, sample.chosen);
            match answer_key(&sample.rejected, sample.kind) {
                Some(key) => assert_ne!(key, sample.key),
                None => vague += 1,
            }
        }
        assert!((220..=380).contains(&vague), "vague: {vague}");
    }

    #[test]
    fn answers_are_short() {
        for sample in generate(400, 4, 56) {
            for text in [&sample.chosen, &sample.rejected] {
                assert!(text.split_whitespace().count() <= 6, "{text}");
            }
        }
    }

    #[test]
    fn answer_key_matching() {
        use QuestionKind::*;
        assert_eq!(
            answer_key("The circle is red.", Colour).as_deref(),
            Some("red")
        );
        assert_eq!(answer_key("RED", Colour).as_deref(), Some("red"));
        assert_eq!(answer_key("red or blue", Colour), None);
        assert_eq!(answer_key("It has some colour.", Colour), None);
        assert_eq!(
            answer_key("The red object is a square.", Shape).as_deref(),
            Some("square")
        );
        assert_eq!(
            answer_key("There are 2 shapes.", Count).as_deref(),
            Some("two")
        );
        assert_eq!(answer_key("someone", Count), None);
        assert_eq!(
            answer_key("It is on the left.", Position).as_deref(),
            Some("left")
        );
    }

    #[test]
    fn writes_jsonl_and_pngs() {
        let dir = std::env::temp_dir().join(format!("phantom-shapes-{}", std::process::id()));
        let samples = generate(6, 3, 56);
        let path = write_jsonl(&dir, &samples, "train").unwrap();
        assert_eq!(path, dir.join("train.jsonl"));
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        for (i, (line, sample)) in lines.iter().zip(&samples).enumerate() {
            assert_eq!(line["image"], format!("images/train_{i:05}.png"));
            assert_eq!(line["question"], sample.question.as_str());
            assert_eq!(line["chosen"], sample.chosen.as_str());
            assert_eq!(line["rejected"], sample.rejected.as_str());
            assert_eq!(line["kind"], sample.kind.name());
            assert_eq!(line["key"], sample.key.as_str());
            let png = image::open(dir.join(line["image"].as_str().unwrap()))
                .unwrap()
                .to_rgb8();
            assert_eq!(png, sample.image);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
