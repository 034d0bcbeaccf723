//! Conversions between r2r messages and library types.

use crate::data::image::{self, RawImage, RawImageRef};
use crate::data::recording::CameraFrame;
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::{Twist, Vector3};
use r2r::sensor_msgs::msg::{CompressedImage, Image};
use r2r::std_msgs::msg::Header;

/// Borrowed bridge view of a `sensor_msgs/Image`.
pub fn raw_image(msg: &Image) -> RawImageRef<'_> {
    RawImageRef {
        width: msg.width,
        height: msg.height,
        encoding: &msg.encoding,
        is_bigendian: msg.is_bigendian != 0,
        step: msg.step,
        data: &msg.data,
    }
}

/// Takes a camera message's pixels without decoding them (that happens off the callback path).
pub fn camera_frame(msg: Image) -> CameraFrame {
    let r = raw_image(&msg);
    let raw = RawImage {
        width: r.width,
        height: r.height,
        encoding: msg.encoding.clone(),
        is_bigendian: r.is_bigendian,
        step: r.step,
        data: msg.data,
    };
    CameraFrame::Raw(raw)
}

/// A `sensor_msgs/Image` carrying `raw`.
pub fn image_msg(header: Header, raw: RawImage) -> Image {
    Image {
        header,
        height: raw.height,
        width: raw.width,
        encoding: raw.encoding,
        is_bigendian: u8::from(raw.is_bigendian),
        step: raw.step,
        data: raw.data,
    }
}

/// Decodes either kind of camera message with the image bridge.
pub fn decode_image(msg: &Image) -> image::Result<::image::DynamicImage> {
    image::decode(&raw_image(msg))
}

pub fn decode_compressed(msg: &CompressedImage) -> image::Result<::image::DynamicImage> {
    image::decode_compressed(&msg.format, &msg.data)
}

/// `[linear.x, linear.y, angular.z]`: the planar base command the Mobile VLA format stores.
pub fn twist_to_action(t: &Twist) -> [f32; 3] {
    [t.linear.x as f32, t.linear.y as f32, t.angular.z as f32]
}

pub fn action_to_twist(a: [f32; 3]) -> Twist {
    Twist {
        linear: Vector3 {
            x: f64::from(a[0]),
            y: f64::from(a[1]),
            z: 0.0,
        },
        angular: Vector3 {
            x: 0.0,
            y: 0.0,
            z: f64::from(a[2]),
        },
    }
}

/// Seconds since the epoch of a message stamp.
pub fn stamp_secs(t: &Time) -> f64 {
    f64::from(t.sec) + f64::from(t.nanosec) * 1e-9
}
