//! A small CDR (XCDR1, plain little/big endian — what ROS 2's rmw implementations put in
//! rosbag2) decoder for the handful of standard messages the importer needs, and the matching
//! little-endian encoder the MCAP export writes them with. Every read is bounds-checked: corrupt
//! bytes give [`CdrError`], never a panic or a huge allocation.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CdrError {
    #[error("message of {len} bytes is too short for the 4-byte CDR encapsulation header")]
    NoHeader { len: usize },
    #[error("unsupported CDR representation {0:#06x} (only XCDR1 CDR_BE 0x0000 / CDR_LE 0x0001)")]
    Representation(u16),
    #[error("truncated at byte {offset} reading {what}: need {need} byte(s), {left} left")]
    Truncated {
        offset: usize,
        what: &'static str,
        need: usize,
        left: usize,
    },
    #[error("string field `{field}` is not valid UTF-8")]
    Utf8 { field: &'static str },
}

pub type Result<T> = std::result::Result<T, CdrError>;

/// Cursor over a CDR payload; alignment is relative to the end of the encapsulation header.
pub struct CdrReader<'a> {
    body: &'a [u8],
    pos: usize,
    little: bool,
}

impl<'a> CdrReader<'a> {
    pub fn new(data: &'a [u8]) -> Result<Self> {
        if data.len() < 4 {
            return Err(CdrError::NoHeader { len: data.len() });
        }
        let rep = u16::from_be_bytes([data[0], data[1]]);
        let little = match rep {
            0x0000 => false,
            0x0001 => true,
            other => return Err(CdrError::Representation(other)),
        };
        Ok(Self {
            body: &data[4..],
            pos: 0,
            little,
        })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let left = self.body.len().saturating_sub(self.pos);
        if n > left {
            return Err(CdrError::Truncated {
                offset: self.pos + 4,
                what,
                need: n,
                left,
            });
        }
        let out = &self.body[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn align(&mut self, n: usize, what: &'static str) -> Result<()> {
        let pad = (n - self.pos % n) % n;
        self.take(pad, what).map(|_| ())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        self.align(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        if self.little != cfg!(target_endian = "little") {
            out.reverse();
        }
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.array::<4>(what).map(u32::from_ne_bytes)
    }
    pub fn i32(&mut self, what: &'static str) -> Result<i32> {
        self.array::<4>(what).map(i32::from_ne_bytes)
    }
    pub fn f64(&mut self, what: &'static str) -> Result<f64> {
        self.array::<8>(what).map(f64::from_ne_bytes)
    }

    /// `string`: u32 length including the terminating NUL, then the bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        let text = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        std::str::from_utf8(text)
            .map(str::to_owned)
            .map_err(|_| CdrError::Utf8 { field: what })
    }

    /// `sequence<uint8>` without copying.
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }
}

/// `std_msgs/msg/Header`.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub sec: i32,
    pub nanosec: u32,
    pub frame_id: String,
}

impl Header {
    fn read(r: &mut CdrReader) -> Result<Self> {
        Ok(Self {
            sec: r.i32("header.stamp.sec")?,
            nanosec: r.u32("header.stamp.nanosec")?,
            frame_id: r.string("header.frame_id")?,
        })
    }
}

/// `sensor_msgs/msg/Image` (pixels borrowed from the message buffer).
#[derive(Debug, Clone, PartialEq)]
pub struct Image<'a> {
    pub header: Header,
    pub height: u32,
    pub width: u32,
    pub encoding: String,
    pub is_bigendian: bool,
    pub step: u32,
    pub data: &'a [u8],
}

pub fn image(data: &[u8]) -> Result<Image<'_>> {
    let mut r = CdrReader::new(data)?;
    Ok(Image {
        header: Header::read(&mut r)?,
        height: r.u32("height")?,
        width: r.u32("width")?,
        encoding: r.string("encoding")?,
        is_bigendian: r.u8("is_bigendian")? != 0,
        step: r.u32("step")?,
        data: r.bytes("data")?,
    })
}

/// `sensor_msgs/msg/CompressedImage`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedImage<'a> {
    pub header: Header,
    pub format: String,
    pub data: &'a [u8],
}

pub fn compressed_image(data: &[u8]) -> Result<CompressedImage<'_>> {
    let mut r = CdrReader::new(data)?;
    Ok(CompressedImage {
        header: Header::read(&mut r)?,
        format: r.string("format")?,
        data: r.bytes("data")?,
    })
}

/// `geometry_msgs/msg/Twist`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Twist {
    pub linear: [f64; 3],
    pub angular: [f64; 3],
}

impl Twist {
    fn read(r: &mut CdrReader) -> Result<Self> {
        let mut v = [0.0; 6];
        const NAMES: [&str; 6] = [
            "linear.x",
            "linear.y",
            "linear.z",
            "angular.x",
            "angular.y",
            "angular.z",
        ];
        for (slot, name) in v.iter_mut().zip(NAMES) {
            *slot = r.f64(name)?;
        }
        Ok(Self {
            linear: [v[0], v[1], v[2]],
            angular: [v[3], v[4], v[5]],
        })
    }
}

impl fmt::Display for Twist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linear {:?} angular {:?}", self.linear, self.angular)
    }
}

pub fn twist(data: &[u8]) -> Result<Twist> {
    Twist::read(&mut CdrReader::new(data)?)
}

/// `geometry_msgs/msg/TwistStamped`.
pub fn twist_stamped(data: &[u8]) -> Result<(Header, Twist)> {
    let mut r = CdrReader::new(data)?;
    Ok((Header::read(&mut r)?, Twist::read(&mut r)?))
}

/// `std_msgs/msg/String`.
pub fn string(data: &[u8]) -> Result<String> {
    CdrReader::new(data)?.string("data")
}

/// Little-endian CDR (`CDR_LE`, what rmw_fastrtps writes) with the same alignment rules as
/// [`CdrReader`]: relative to the end of the encapsulation header.
pub struct CdrWriter {
    buf: Vec<u8>,
}

impl Default for CdrWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CdrWriter {
    pub fn new() -> Self {
        Self {
            buf: vec![0, 1, 0, 0],
        }
    }

    fn align(&mut self, n: usize) {
        let pad = (n - (self.buf.len() - 4) % n) % n;
        self.buf.resize(self.buf.len() + pad, 0);
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.align(8);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Length including the terminating NUL, the bytes, the NUL.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32 + 1);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self
    }
    /// `sequence<uint8>`.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

impl Header {
    fn write(&self, w: &mut CdrWriter) {
        w.i32(self.sec).u32(self.nanosec).string(&self.frame_id);
    }
}

/// Encodes a `sensor_msgs/msg/Image`.
pub fn encode_image(m: &Image) -> Vec<u8> {
    let mut w = CdrWriter::new();
    m.header.write(&mut w);
    w.u32(m.height)
        .u32(m.width)
        .string(&m.encoding)
        .u8(m.is_bigendian.into())
        .u32(m.step)
        .bytes(m.data)
        .finish()
}

/// Encodes a `geometry_msgs/msg/Twist`.
pub fn encode_twist(t: &Twist) -> Vec<u8> {
    let mut w = CdrWriter::new();
    for v in t.linear.iter().chain(&t.angular) {
        w.f64(*v);
    }
    w.finish()
}

/// Encodes a `std_msgs/msg/String`.
pub fn encode_string(s: &str) -> Vec<u8> {
    CdrWriter::new().string(s).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twist { linear: (1, 2, 3), angular: (4, 5, 6) } as rclpy serialises it (CDR_LE).
    fn twist_le() -> Vec<u8> {
        let mut b = vec![0, 1, 0, 0];
        for v in [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn twist_both_endians() {
        assert_eq!(
            twist(&twist_le()).unwrap(),
            Twist {
                linear: [1.0, 2.0, 3.0],
                angular: [4.0, 5.0, 6.0]
            }
        );
        let mut be = vec![0, 0, 0, 0];
        for v in [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0] {
            be.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(twist(&be).unwrap(), twist(&twist_le()).unwrap());
    }

    #[test]
    fn string_with_alignment_padding() {
        // Header{sec 7, nanosec 9, frame_id "cam"} then format "jpeg" then 2 data bytes.
        let mut b = vec![0, 1, 0, 0];
        b.extend_from_slice(&7i32.to_le_bytes());
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(b"cam\0");
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(b"jpeg\0");
        b.extend_from_slice(&[0, 0, 0]); // pad to 4
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xd8]);
        let m = compressed_image(&b).unwrap();
        assert_eq!(
            m.header,
            Header {
                sec: 7,
                nanosec: 9,
                frame_id: "cam".into()
            }
        );
        assert_eq!(m.format, "jpeg");
        assert_eq!(m.data, &[0xff, 0xd8]);
    }

    #[test]
    fn encoders_match_rclpy_and_round_trip() {
        let t = Twist {
            linear: [1.0, 2.0, 3.0],
            angular: [4.0, 5.0, 6.0],
        };
        assert_eq!(encode_twist(&t), twist_le());
        assert_eq!(string(&encode_string("go left")).unwrap(), "go left");
        let img = Image {
            header: Header {
                sec: 3,
                nanosec: 5,
                frame_id: "camera".into(),
            },
            height: 1,
            width: 2,
            encoding: "bgr8".into(),
            is_bigendian: false,
            step: 6,
            data: &[1, 2, 3, 4, 5, 6],
        };
        let bytes = encode_image(&img);
        assert_eq!(image(&bytes).unwrap(), img);
    }

    #[test]
    fn errors_name_the_field() {
        let b = twist_le();
        let e = twist(&b[..16]).unwrap_err();
        assert!(
            matches!(
                e,
                CdrError::Truncated {
                    what: "linear.y",
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(twist(&[0, 1]), Err(CdrError::NoHeader { len: 2 })));
        assert!(matches!(
            twist(&[0, 7, 0, 0]),
            Err(CdrError::Representation(7))
        ));
        // A length far past the buffer is an error, not an allocation.
        let mut s = vec![0, 1, 0, 0];
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            string(&s),
            Err(CdrError::Truncated { what: "data", .. })
        ));
    }
}
