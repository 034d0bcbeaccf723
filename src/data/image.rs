//! The image bridge (cv_bridge for this crate): `sensor_msgs/Image` and
//! `sensor_msgs/CompressedImage` payloads ⇄ `image` buffers.
//!
//! It works on plain field views ([`RawImageRef`]) rather than r2r types, so the
//! same code serves live topics, CDR-decoded bag messages and tests without ROS.

use image::{DynamicImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Errors of the image bridge. Each names the message field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unsupported image encoding `{0}` (field `encoding`); supported: rgb8, bgr8, rgba8, bgra8, mono8 (8UC1), mono16 (16UC1)")]
    UnsupportedEncoding(String),
    #[error("image is {width}x{height} (fields `width`, `height`): both must be non-zero")]
    ZeroSize { width: u32, height: u32 },
    #[error("field `step` is {step} bytes but a row of {width} `{encoding}` pixels needs at least {min}")]
    StepTooSmall {
        step: u32,
        width: u32,
        encoding: Encoding,
        min: u64,
    },
    #[error(
        "field `data` holds {len} bytes but `step` × `height` = {step} × {height} = {expected}"
    )]
    DataLength {
        len: usize,
        step: u32,
        height: u32,
        expected: u64,
    },
    #[error("unsupported compressed image format `{0}` (field `format`); supported: jpeg, png")]
    UnsupportedFormat(String),
    #[error("cannot {action} {format} image (field `data`): {source}")]
    Codec {
        action: &'static str,
        format: CompressedFormat,
        #[source]
        source: image::ImageError,
    },
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// Raw `sensor_msgs/Image` encodings the bridge understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Rgb8,
    Bgr8,
    Rgba8,
    Bgra8,
    Mono8,
    Mono16,
}

impl Encoding {
    /// Bytes per pixel.
    pub fn pixel_bytes(self) -> u32 {
        match self {
            Encoding::Rgb8 | Encoding::Bgr8 => 3,
            Encoding::Rgba8 | Encoding::Bgra8 => 4,
            Encoding::Mono8 => 1,
            Encoding::Mono16 => 2,
        }
    }

    /// The name as written in `sensor_msgs/Image.encoding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Rgb8 => "rgb8",
            Encoding::Bgr8 => "bgr8",
            Encoding::Rgba8 => "rgba8",
            Encoding::Bgra8 => "bgra8",
            Encoding::Mono8 => "mono8",
            Encoding::Mono16 => "mono16",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encoding {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self> {
        // The OpenCV type names are what cameras publish for single-channel images.
        Ok(match s {
            "rgb8" => Encoding::Rgb8,
            "bgr8" => Encoding::Bgr8,
            "rgba8" => Encoding::Rgba8,
            "bgra8" => Encoding::Bgra8,
            "mono8" | "8UC1" => Encoding::Mono8,
            "mono16" | "16UC1" => Encoding::Mono16,
            other => return Err(ImageError::UnsupportedEncoding(other.to_string())),
        })
    }
}

/// Colour order of 3-channel frames as stored (episodes) or fed to a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    /// The Mobile VLA camera order, and the default for episodes that do not say.
    #[default]
    Bgr,
}

impl ChannelOrder {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelOrder::Rgb => "rgb",
            ChannelOrder::Bgr => "bgr",
        }
    }
}

impl fmt::Display for ChannelOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelOrder {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rgb" => Ok(ChannelOrder::Rgb),
            "bgr" => Ok(ChannelOrder::Bgr),
            other => Err(format!(
                "unknown channel order `{other}`: expected `rgb` or `bgr`"
            )),
        }
    }
}

/// Borrowed view of the fields of a `sensor_msgs/Image`.
#[derive(Debug, Clone, Copy)]
pub struct RawImageRef<'a> {
    pub width: u32,
    pub height: u32,
    pub encoding: &'a str,
    pub is_bigendian: bool,
    pub step: u32,
    pub data: &'a [u8],
}

/// Owned fields of a `sensor_msgs/Image`, ready to copy into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    pub width: u32,
    pub height: u32,
    pub encoding: String,
    pub is_bigendian: bool,
    pub step: u32,
    pub data: Vec<u8>,
}

impl RawImage {
    pub fn as_ref(&self) -> RawImageRef<'_> {
        RawImageRef {
            width: self.width,
            height: self.height,
            encoding: &self.encoding,
            is_bigendian: self.is_bigendian,
            step: self.step,
            data: &self.data,
        }
    }
}

/// Checks a raw image's fields (encoding, size, `step`, `data` length) without decoding it.
pub fn validate(raw: &RawImageRef) -> Result<Encoding> {
    check_layout(raw).map(|(encoding, _)| encoding)
}

/// Checks the geometry fields and returns the encoding and the tight row length in bytes.
fn check_layout(raw: &RawImageRef) -> Result<(Encoding, usize)> {
    let encoding: Encoding = raw.encoding.parse()?;
    if raw.width == 0 || raw.height == 0 {
        return Err(ImageError::ZeroSize {
            width: raw.width,
            height: raw.height,
        });
    }
    let row = u64::from(raw.width) * u64::from(encoding.pixel_bytes());
    if u64::from(raw.step) < row {
        return Err(ImageError::StepTooSmall {
            step: raw.step,
            width: raw.width,
            encoding,
            min: row,
        });
    }
    let expected = u64::from(raw.step) * u64::from(raw.height);
    if raw.data.len() as u64 != expected {
        return Err(ImageError::DataLength {
            len: raw.data.len(),
            step: raw.step,
            height: raw.height,
            expected,
        });
    }
    // `row` ≤ step ≤ u32::MAX, so it fits in usize.
    Ok((encoding, row as usize))
}

/// Concatenates the first `row` bytes of every `step`-long line (drops padding).
fn tight_rows(raw: &RawImageRef, row: usize) -> Vec<u8> {
    raw.data
        .chunks_exact(raw.step as usize)
        .flat_map(|line| &line[..row])
        .copied()
        .collect()
}

fn swap_red_blue(pixels: &mut [u8], channels: usize) {
    for px in pixels.chunks_exact_mut(channels) {
        px.swap(0, 2);
    }
}

/// Decodes a raw `sensor_msgs/Image`. Colour images come back in RGB(A) order,
/// whatever their wire order; `mono16` honours `is_bigendian`.
pub fn decode(raw: &RawImageRef) -> Result<DynamicImage> {
    let (encoding, row) = check_layout(raw)?;
    let (w, h) = (raw.width, raw.height);
    let mut bytes = tight_rows(raw, row);
    // The buffer length equals w*h*channels by construction, so from_raw cannot fail.
    let img = match encoding {
        Encoding::Rgb8 | Encoding::Bgr8 => {
            if encoding == Encoding::Bgr8 {
                swap_red_blue(&mut bytes, 3);
            }
            ImageBuffer::<Rgb<u8>, _>::from_raw(w, h, bytes).map(DynamicImage::ImageRgb8)
        }
        Encoding::Rgba8 | Encoding::Bgra8 => {
            if encoding == Encoding::Bgra8 {
                swap_red_blue(&mut bytes, 4);
            }
            ImageBuffer::<Rgba<u8>, _>::from_raw(w, h, bytes).map(DynamicImage::ImageRgba8)
        }
        Encoding::Mono8 => {
            ImageBuffer::<Luma<u8>, _>::from_raw(w, h, bytes).map(DynamicImage::ImageLuma8)
        }
        Encoding::Mono16 => {
            let words = bytes
                .chunks_exact(2)
                .map(|b| {
                    let b = [b[0], b[1]];
                    if raw.is_bigendian {
                        u16::from_be_bytes(b)
                    } else {
                        u16::from_le_bytes(b)
                    }
                })
                .collect();
            ImageBuffer::<Luma<u16>, _>::from_raw(w, h, words).map(DynamicImage::ImageLuma16)
        }
    };
    Ok(img.unwrap_or_else(|| unreachable!("buffer sized from checked width/height")))
}

/// Encodes an image as a raw `sensor_msgs/Image` payload (tight rows, little-endian).
/// Colour is converted as needed (e.g. RGB → mono8 by luminance).
pub fn encode(img: &DynamicImage, encoding: Encoding) -> RawImage {
    let (width, height) = (img.width(), img.height());
    let data = match encoding {
        Encoding::Rgb8 => img.to_rgb8().into_raw(),
        Encoding::Bgr8 => {
            let mut d = img.to_rgb8().into_raw();
            swap_red_blue(&mut d, 3);
            d
        }
        Encoding::Rgba8 => img.to_rgba8().into_raw(),
        Encoding::Bgra8 => {
            let mut d = img.to_rgba8().into_raw();
            swap_red_blue(&mut d, 4);
            d
        }
        Encoding::Mono8 => img.to_luma8().into_raw(),
        Encoding::Mono16 => img
            .to_luma16()
            .into_raw()
            .into_iter()
            .flat_map(u16::to_le_bytes)
            .collect(),
    };
    RawImage {
        width,
        height,
        encoding: encoding.as_str().to_string(),
        is_bigendian: false,
        step: width * encoding.pixel_bytes(),
        data,
    }
}

/// Compression of a `sensor_msgs/CompressedImage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressedFormat {
    Jpeg,
    Png,
}

impl CompressedFormat {
    /// Parses the `format` field. image_transport writes e.g. `"bgr8; jpeg compressed bgr8"`,
    /// other publishers just `"jpeg"` or `"png"`.
    pub fn parse(format: &str) -> Result<Self> {
        let f = format.to_ascii_lowercase();
        if f.contains("jpeg") || f.contains("jpg") {
            Ok(CompressedFormat::Jpeg)
        } else if f.contains("png") {
            Ok(CompressedFormat::Png)
        } else {
            Err(ImageError::UnsupportedFormat(format.to_string()))
        }
    }

    fn image_format(self) -> image::ImageFormat {
        match self {
            CompressedFormat::Jpeg => image::ImageFormat::Jpeg,
            CompressedFormat::Png => image::ImageFormat::Png,
        }
    }

    /// The `format` field value to publish.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressedFormat::Jpeg => "jpeg",
            CompressedFormat::Png => "png",
        }
    }
}

impl fmt::Display for CompressedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes a `sensor_msgs/CompressedImage` payload (colour comes back as RGB).
pub fn decode_compressed(format: &str, data: &[u8]) -> Result<DynamicImage> {
    let fmt = CompressedFormat::parse(format)?;
    image::load_from_memory_with_format(data, fmt.image_format()).map_err(|source| {
        ImageError::Codec {
            action: "decode",
            format: fmt,
            source,
        }
    })
}

/// Encodes an image for a `sensor_msgs/CompressedImage` (JPEG at quality 90).
pub fn encode_compressed(img: &DynamicImage, format: CompressedFormat) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    let res = match format {
        CompressedFormat::Jpeg => {
            // JPEG has no alpha or 16-bit: encode what a camera would send.
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
            match img {
                DynamicImage::ImageLuma8(_) | DynamicImage::ImageLuma16(_) => {
                    img.to_luma8().write_with_encoder(enc)
                }
                _ => img.to_rgb8().write_with_encoder(enc),
            }
        }
        CompressedFormat::Png => img.write_to(&mut out, image::ImageFormat::Png),
    };
    res.map_err(|source| ImageError::Codec {
        action: "encode",
        format,
        source,
    })?;
    Ok(out.into_inner())
}

/// An 8-bit, 3-channel H×W×3 buffer in `order` (for BGR the buffer's "R" slot holds blue).
/// This is the layout of episode `images` datasets.
pub fn to_interleaved(img: &DynamicImage, order: ChannelOrder) -> RgbImage {
    let mut rgb = img.to_rgb8();
    if order == ChannelOrder::Bgr {
        swap_red_blue(&mut rgb, 3);
    }
    rgb
}

/// The inverse of [`to_interleaved`]: a stored H×W×3 frame in `order` → true RGB.
pub fn from_interleaved(mut buf: RgbImage, order: ChannelOrder) -> RgbImage {
    if order == ChannelOrder::Bgr {
        swap_red_blue(&mut buf, 3);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw<'a>(w: u32, h: u32, enc: &'a str, step: u32, data: &'a [u8]) -> RawImageRef<'a> {
        RawImageRef {
            width: w,
            height: h,
            encoding: enc,
            is_bigendian: false,
            step,
            data,
        }
    }

    #[test]
    fn bgr8_with_row_padding_decodes_to_rgb() {
        // 2×2 image, step 8 (6 bytes of pixels + 2 padding bytes per row).
        let data = [
            1, 2, 3, 4, 5, 6, 0xEE, 0xEE, //
            7, 8, 9, 10, 11, 12, 0xEE, 0xEE,
        ];
        let img = decode(&raw(2, 2, "bgr8", 8, &data)).unwrap().to_rgb8();
        assert_eq!(img.get_pixel(0, 0).0, [3, 2, 1]);
        assert_eq!(img.get_pixel(1, 0).0, [6, 5, 4]);
        assert_eq!(img.get_pixel(0, 1).0, [9, 8, 7]);
        assert_eq!(img.get_pixel(1, 1).0, [12, 11, 10]);
    }

    #[test]
    fn rgb8_rgba8_bgra8_mono8_decode() {
        let rgb = decode(&raw(1, 1, "rgb8", 3, &[10, 20, 30])).unwrap();
        assert_eq!(rgb.to_rgb8().get_pixel(0, 0).0, [10, 20, 30]);
        let rgba = decode(&raw(1, 1, "rgba8", 4, &[10, 20, 30, 40])).unwrap();
        assert_eq!(rgba.to_rgba8().get_pixel(0, 0).0, [10, 20, 30, 40]);
        let bgra = decode(&raw(1, 1, "bgra8", 4, &[10, 20, 30, 40])).unwrap();
        assert_eq!(bgra.to_rgba8().get_pixel(0, 0).0, [30, 20, 10, 40]);
        let mono = decode(&raw(2, 1, "8UC1", 2, &[7, 9])).unwrap();
        assert_eq!(mono.to_luma8().into_raw(), vec![7, 9]);
    }

    #[test]
    fn mono16_honours_endianness() {
        let data = [0x01, 0x02, 0x03, 0x04];
        let le = decode(&raw(2, 1, "16UC1", 4, &data)).unwrap();
        assert_eq!(le.to_luma16().into_raw(), vec![0x0201, 0x0403]);
        let mut be = raw(2, 1, "mono16", 4, &data);
        be.is_bigendian = true;
        let be = decode(&be).unwrap();
        assert_eq!(be.to_luma16().into_raw(), vec![0x0102, 0x0304]);
    }

    #[test]
    fn encode_round_trips_every_encoding() {
        let mut src = RgbImage::new(3, 2);
        for (i, px) in src.pixels_mut().enumerate() {
            *px = Rgb([i as u8 * 10, i as u8 * 20 + 1, 255 - i as u8]);
        }
        let src = DynamicImage::ImageRgb8(src);
        for enc in [
            Encoding::Rgb8,
            Encoding::Bgr8,
            Encoding::Rgba8,
            Encoding::Bgra8,
        ] {
            let msg = encode(&src, enc);
            assert_eq!(msg.step, 3 * enc.pixel_bytes());
            assert_eq!(decode(&msg.as_ref()).unwrap().to_rgb8(), src.to_rgb8());
        }
        let bgr = encode(&src, Encoding::Bgr8);
        assert_eq!(&bgr.data[..3], &[255, 1, 0]);
        let mono = encode(&src, Encoding::Mono16);
        assert_eq!(decode(&mono.as_ref()).unwrap().to_luma16(), src.to_luma16());
    }

    #[test]
    fn bad_fields_are_named() {
        let e = decode(&raw(1, 1, "yuv422", 2, &[0, 0])).unwrap_err();
        assert!(e.to_string().contains("`encoding`") && e.to_string().contains("yuv422"));
        let e = decode(&raw(4, 1, "rgb8", 11, &[0; 11])).unwrap_err();
        assert!(matches!(e, ImageError::StepTooSmall { min: 12, .. }), "{e}");
        assert!(e.to_string().contains("`step`"));
        let e = decode(&raw(2, 2, "mono8", 2, &[0; 3])).unwrap_err();
        assert!(
            matches!(e, ImageError::DataLength { expected: 4, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("`data`"));
        let e = decode(&raw(0, 2, "mono8", 0, &[])).unwrap_err();
        assert!(matches!(e, ImageError::ZeroSize { .. }));
    }

    #[test]
    fn compressed_round_trip_png_exact_jpeg_close() {
        let mut src = RgbImage::new(16, 8);
        for (x, y, px) in src.enumerate_pixels_mut() {
            *px = Rgb([(x * 16) as u8, (y * 32) as u8, 128]);
        }
        let src = DynamicImage::ImageRgb8(src);
        let png = encode_compressed(&src, CompressedFormat::Png).unwrap();
        assert_eq!(
            decode_compressed("png", &png).unwrap().to_rgb8(),
            src.to_rgb8()
        );
        let jpg = encode_compressed(&src, CompressedFormat::Jpeg).unwrap();
        let back = decode_compressed("bgr8; jpeg compressed bgr8", &jpg)
            .unwrap()
            .to_rgb8();
        let max_diff = back
            .as_raw()
            .iter()
            .zip(src.to_rgb8().as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max_diff < 24, "jpeg max diff {max_diff}");
        assert!(matches!(
            decode_compressed("tiff", &png),
            Err(ImageError::UnsupportedFormat(_))
        ));
        assert!(matches!(
            decode_compressed("jpeg", &png[..20]),
            Err(ImageError::Codec { .. })
        ));
    }

    #[test]
    fn interleaved_orders_are_inverse() {
        let src = DynamicImage::ImageRgb8(RgbImage::from_raw(1, 1, vec![1, 2, 3]).unwrap());
        let bgr = to_interleaved(&src, ChannelOrder::Bgr);
        assert_eq!(bgr.as_raw(), &vec![3, 2, 1]);
        assert_eq!(
            from_interleaved(bgr, ChannelOrder::Bgr).as_raw(),
            &vec![1, 2, 3]
        );
        let rgb = to_interleaved(&src, ChannelOrder::Rgb);
        assert_eq!(rgb.as_raw(), &vec![1, 2, 3]);
        assert_eq!("BGR".parse::<ChannelOrder>().unwrap(), ChannelOrder::Bgr);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_messages_never_panic(
            w in 0u32..40, h in 0u32..40, step in 0u32..200,
            enc in prop::sample::select(vec!["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "8UC3", ""]),
            be in any::<bool>(),
            data in prop::collection::vec(any::<u8>(), 0..2000),
        ) {
            let r = RawImageRef { width: w, height: h, encoding: enc, is_bigendian: be, step, data: &data };
            if let Ok(img) = decode(&r) {
                prop_assert_eq!((img.width(), img.height()), (w, h));
            }
        }

        #[test]
        fn random_compressed_never_panics(
            fmt in prop::sample::select(vec!["jpeg", "png", "rgb8; jpeg compressed bgr8", "bmp"]),
            data in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = decode_compressed(fmt, &data);
        }

        #[test]
        fn valid_padded_messages_decode(w in 1u32..20, h in 1u32..20, pad in 0u32..8, seed in any::<u8>()) {
            let step = w * 3 + pad;
            let data: Vec<u8> = (0..step * h).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let img = decode(&RawImageRef { width: w, height: h, encoding: "rgb8", is_bigendian: false, step, data: &data }).unwrap().to_rgb8();
            for y in 0..h {
                for x in 0..w {
                    let o = (y * step + x * 3) as usize;
                    prop_assert_eq!(img.get_pixel(x, y).0, [data[o], data[o + 1], data[o + 2]]);
                }
            }
        }
    }
}
