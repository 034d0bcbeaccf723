//! Data on its way in: the image bridge, episodes (HDF5), step sampling, live recording, datasets
//! and bag import; and out: episodes as MCAP.

pub mod bag;
pub mod dataset;
pub mod episode;
pub mod image;
pub mod mcap_export;
pub mod recording;
pub mod sampling;
